"""The integer runtime: quantized Dense and Conv layers as int8 x int8 -> int32 matmuls.

Each quantized ``Dense``/``Conv`` of a model (intercepted with
``flax.linen.intercept_methods``) quantizes its input to int8 on its grid (a static scale
and zero point: QAT's frozen observers, LSQ's learned step or PTQ calibration), computes
``int8 x int8 -> int32`` with ``lax.dot_general`` (convolutions as im2col plus one int8
GEMM), then rescales by ``s_x * s_w`` and adds the float bias (Jacob et al. 2018,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference")::

    y = s_x s_w sum_k (q_x[k] - z_x) (q_w[k, c] - z_w[c]) + b[c]

A layer whose activations stay float (weight-only quantization) multiplies by the
dequantized kernel.

An integer embedding table (``nn.Embed``, one scale per row) is looked up as integers and
each gathered row scaled by its own scale, ``E[ids] = s[ids] * q[ids]``; ``attend`` (a tied
output layer) multiplies by the dequantized table.

Everything else (ReLU, pooling, BatchNorm, residual adds) runs in float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding

from jaxkd import quant


def _matmul(x: jax.Array, w: jax.Array, acc: Any) -> jax.Array:
    """``x [..., K] x w [K, C]``, accumulated in ``acc`` (int32 for int8 operands)."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=acc)


def conv_setup(module: nn.Conv, x: jax.Array, kernel_size: tuple[int, ...]) -> tuple:
    """``(x, padding, strides, kernel dilation, input dilation, dilated kernel)`` of a
    ``flax.linen.Conv`` call, with CIRCULAR/REFLECT padding applied to ``x`` already."""
    if module.mask is not None or not module.shared_weights:
        raise ValueError(f"layer {'/'.join(module.path)}: masked or unshared Conv is not "
                         "supported by the integer path")
    rank = len(kernel_size)

    def broadcast(v):
        v = 1 if v is None else v
        return (v,) * rank if isinstance(v, int) else tuple(v)

    strides, kernel_dilation = broadcast(module.strides), broadcast(module.kernel_dilation)
    input_dilation = broadcast(module.input_dilation)
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    padding = canonicalize_padding(module.padding, rank)
    if padding in ("CIRCULAR", "REFLECT"):
        pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
        x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = [(0, 0)] * rank
    elif padding == "CAUSAL":
        padding = [(dilated[0] - 1, 0)]
    if isinstance(padding, str):
        size = tuple((n - 1) * d + 1 for n, d in zip(x.shape[1:-1], input_dilation, strict=True))
        padding = jax.lax.padtype_to_pads(size, dilated, strides, padding)
    return x, [tuple(p) for p in padding], strides, kernel_dilation, input_dilation, dilated


def _im2col(module: nn.Conv, x: jax.Array, kernel_size: tuple[int, ...], pad_value: Any
            ) -> jax.Array | None:
    """The patches ``[B, *out, prod(kernel_size) * C_in]`` of ``module``'s convolution of
    ``x`` (padded with ``pad_value``, the integer that stands for 0), so that the conv is
    one GEMM with the kernel reshaped to ``[-1, C_out]``: XLA:CPU's int8 GEMM is faster
    than its float one while its int8 convolution can be 10x slower. None for grouped or
    input-dilated convolutions (they go through ``lax.conv_general_dilated``)."""
    x, padding, strides, kernel_dilation, input_dilation, dilated = conv_setup(
        module, x, kernel_size)
    if module.feature_group_count != 1 or any(d != 1 for d in input_dilation):
        return None
    x = jnp.pad(x, [(0, 0), *padding, (0, 0)], constant_values=pad_value)
    out = [(x.shape[1 + i] - dilated[i]) // strides[i] + 1 for i in range(len(kernel_size))]
    columns = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * d for o, d in zip(offsets, kernel_dilation, strict=True)]
        limit = [b + (n - 1) * st + 1 for b, n, st in zip(start, out, strides, strict=True)]
        columns.append(jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]),
                                     (1, *strides, 1)))
    patches = jnp.stack(columns, axis=-2)  # [B, *out, prod(kernel_size), C_in]
    return patches.reshape(*patches.shape[:-2], -1)


def _lax_conv(module: nn.Conv, x: jax.Array, w: jax.Array, *, pad_value: Any, acc: Any
              ) -> jax.Array:
    """``module``'s convolution by ``lax.conv_general_dilated`` (grouped, input-dilated)."""
    x, padding, strides, kernel_dilation, input_dilation, _ = conv_setup(
        module, x, w.shape[:-2])
    if any(d != 1 for d in input_dilation):
        if pad_value != 0:  # the inserted holes would be read as 0, not as pad_value
            raise ValueError(f"layer {'/'.join(module.path)}: an input-dilated Conv "
                             "needs activations with zero point 0 (a signed grid)")
    else:
        x = jnp.pad(x, [(0, 0), *padding, (0, 0)], constant_values=pad_value)
        padding = [(0, 0)] * (x.ndim - 2)
    ndim = x.ndim
    spec = (0, ndim - 1, *range(1, ndim - 1))
    numbers = jax.lax.ConvDimensionNumbers(spec, (ndim - 1, ndim - 2, *range(ndim - 2)), spec)
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
        dimension_numbers=numbers, feature_group_count=module.feature_group_count,
        preferred_element_type=acc)


def _window_sum(w: jax.Array, acc: Any) -> jax.Array:
    """``sum_k w[k, c]`` over all but the output axis: ``[C]``."""
    return jnp.sum(w, axis=tuple(range(w.ndim - 1)), dtype=acc)


def _contract(module: nn.Module, x: jax.Array, w: jax.Array, *, pad_value: Any, acc: Any,
              input_sums: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """``(x * w, sum of x over each output's inputs)`` of a Dense or Conv layer; the sums
    only with ``input_sums`` (a kernel zero point needs them)."""
    if isinstance(module, nn.Conv):
        patches = _im2col(module, x, w.shape[:-2], pad_value)
        if patches is None:
            out = _lax_conv(module, x, w, pad_value=pad_value, acc=acc)
            sums = (_lax_conv(module, x, jnp.ones_like(w), pad_value=pad_value, acc=acc)
                    if input_sums else None)
            return out, sums
        x, w = patches, w.reshape(-1, w.shape[-1])
    out = _matmul(x, w, acc)
    return out, (jnp.sum(x, -1, dtype=acc)[..., None] if input_sums else None)


def integer_layer(module: nn.Module, x: jax.Array, layer: Mapping[str, Any]) -> jax.Array:
    """One quantized Dense/Conv on float input ``x``.

    With quantized activations: int8 input ``q_x = clip(round(x / s_x) + z_x, q_min,
    q_max)``, int32 accumulation, float32 output::

        s_x s_w (sum q_x q_w - z_w sum q_x - z_x sum q_w + K z_x z_w) + b

    (``K`` inputs per output; an unsigned 8-bit grid ``[0, 255]`` is stored as int8 with
    ``z_x = -128``). Weight-only (``activation['bits'] == 0``): the float input times the
    dequantized kernel ``s_w (q_w - z_w)``, as weight-only QAT trained it.

    ``layer``: ``values`` (int8 kernel), ``scale`` and optional ``zero_point`` (``[C]`` or
    ``[]``), optional ``bias``, and ``activation`` (``bits``, ``q_min``, ``q_max``,
    ``zero_point``, ``scale`` or None for a per-batch scale).
    """
    act = layer["activation"]
    x = jnp.asarray(x, jnp.float32)
    batch_shape = None
    if isinstance(module, nn.Conv):
        rank = layer["values"].ndim - 2
        if x.ndim - (rank + 1) != 1:  # flax.linen.Conv's batch-dimension convention
            batch_shape = x.shape[:x.ndim - (rank + 1)]
            x = x.reshape((-1, *x.shape[x.ndim - (rank + 1):]))
    q_w, z_w = layer["values"], layer.get("zero_point")
    if not act["bits"]:  # weight-only
        w = layer["scale"] * (q_w.astype(jnp.float32) - (0 if z_w is None else z_w))
        y, _ = _contract(module, x, w, pad_value=0.0, acc=jnp.float32)
    else:
        s_x = (quant.dynamic_activation_scale(x, act["bits"]) if act["scale"] is None
               else jnp.float32(act["scale"]))
        z_x = int(act.get("zero_point", 0))
        q_x = jnp.clip(jnp.round(x / s_x) + z_x, act["q_min"], act["q_max"]).astype(jnp.int8)
        acc, sums = _contract(module, q_x, q_w, pad_value=z_x, acc=jnp.int32,
                              input_sums=z_w is not None)
        if z_w is not None:
            acc = acc - z_w.astype(jnp.int32) * sums
        if z_x:
            acc = acc - z_x * _window_sum(q_w, jnp.int32)
            if z_w is not None:
                acc = acc + int(np.prod(q_w.shape[:-1])) * z_x * z_w.astype(jnp.int32)
        y = acc.astype(jnp.float32) * (s_x * layer["scale"])
    if layer.get("bias") is not None:
        y = y + layer["bias"]
    if batch_shape is not None:
        y = y.reshape((*batch_shape, *y.shape[1:]))
    return y


def integer_embedding(module: nn.Embed, method: str, x: jax.Array,
                      layer: Mapping[str, Any]) -> jax.Array:
    """An ``nn.Embed`` call on its integer table ``layer['values']`` ``[V, H]`` with one
    scale per row ``layer['scale']`` ``[V]``: ``__call__(ids)`` gathers the int8 rows and
    scales each, ``s[ids, None] * q[ids]``; ``attend(query)`` is ``query @ (s q)^T``."""
    values, scale = layer["values"], layer["scale"]
    if method == "attend":
        table = scale[:, None] * values.astype(jnp.float32)
        return jnp.dot(jnp.asarray(x, jnp.float32), table.T)
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise ValueError(f"layer {'/'.join(module.path)}: Embed input must be integers")
    rows = jnp.take(values, x, axis=0)
    return jnp.take(scale, x, axis=0)[..., None] * rows.astype(jnp.float32)


def integer_apply(model: nn.Module, variables: Mapping[str, Any],
                  layers: Mapping[str, Mapping[str, Any]]) -> Callable[[jax.Array], jax.Array]:
    """``predict(x) -> logits``: ``model`` in inference mode with the layers of ``layers``
    (by path, as :func:`integer_layer` takes them; embedding tables, ``kind='embed'``, as
    :func:`integer_embedding` does) on the integer path."""

    def integer_path(next_fun, args, kwargs, context):
        table = quant.embedding_of(context)
        if table is not None and table in layers:
            return integer_embedding(context.module, context.method_name, args[0],
                                     layers[table])
        found = quant.layer_of(context)
        if found is None or found[0] not in layers:
            return next_fun(*args, **kwargs)
        return integer_layer(context.module, args[0], layers[found[0]])

    tables = {tuple(path.split("/")): layer["values"].shape
              for path, layer in layers.items() if layer.get("kind") == quant.EMBED}

    def predict(*inputs):  # the model's inputs (images; or token ids and their mask)
        v = variables
        if tables:  # nn.Embed declares its float table in setup: a placeholder, never read
            flat = traverse_util.flatten_dict(dict(v["params"]))
            flat.update({(*k, "embedding"): jnp.zeros(shape) for k, shape in tables.items()})
            v = {**v, "params": traverse_util.unflatten_dict(flat)}
        with nn.intercept_methods(integer_path):
            return model.apply(v, *inputs, train=False)

    return predict
