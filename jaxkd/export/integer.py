"""The integer runtime: quantized Dense and Conv layers as int8 x int8 -> int32 matmuls.

Each quantized ``Dense``/``Conv`` of a model (intercepted with
``flax.linen.intercept_methods``) quantizes its input to int8 (a static scale from
calibration or LSQ, else ``max|x| / q_max`` of the batch), computes ``int8 x int8 ->
int32`` with ``lax.dot_general`` (convolutions as im2col plus one int8 GEMM), then
rescales by ``s_x * s_w`` and adds the float bias (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference")::

    y = s_x s_w (sum_k q_x[k] q_w[k, c] - z_w[c] sum_k q_x[k]) + b[c]

Everything else (ReLU, pooling, BatchNorm, residual adds) runs in float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from jaxkd import quant


def _int_matmul(q_x: jax.Array, q_w: jax.Array, zero_point: jax.Array | None) -> jax.Array:
    """``q_x [..., K] x q_w [K, C]`` in int32, minus ``z_w[c] sum_k q_x[..., k]``."""
    dims = (((q_x.ndim - 1,), (0,)), ((), ()))
    acc = jax.lax.dot_general(q_x, q_w, dims, preferred_element_type=jnp.int32)
    if zero_point is not None:
        acc = acc - zero_point.astype(jnp.int32) * jnp.sum(q_x, -1, dtype=jnp.int32)[..., None]
    return acc


def _int_conv(module: nn.Conv, q_x: jax.Array, q_w: jax.Array, zero_point: jax.Array | None
              ) -> jax.Array:
    """``module``'s convolution (``flax.linen.Conv`` semantics) on int8, in int32.

    Lowered as im2col (strided slices of the padded int8 input) and one int8 GEMM
    (``lax.dot_general``): XLA:CPU's int8 GEMM is faster than its float one while its
    int8 convolution can be 10x slower. Grouped or input-dilated convolutions use
    ``lax.conv_general_dilated`` with ``preferred_element_type=int32``.
    """
    if module.mask is not None or not module.shared_weights:
        raise ValueError(f"layer {'/'.join(module.path)}: masked or unshared Conv is not "
                         "supported by the integer path")
    kernel_size = q_w.shape[:-2]
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
        q_x = jnp.pad(q_x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
        padding = "VALID"
    elif padding == "CAUSAL":
        q_x = jnp.pad(q_x, [(0, 0), (dilated[0] - 1, 0), (0, 0)])
        padding = "VALID"
    if module.feature_group_count != 1 or any(d != 1 for d in input_dilation):
        ndim = q_x.ndim
        spec = (0, ndim - 1, *range(1, ndim - 1))
        numbers = jax.lax.ConvDimensionNumbers(spec, (ndim - 1, ndim - 2, *range(ndim - 2)),
                                               spec)

        def conv(w):
            return jax.lax.conv_general_dilated(
                q_x, w, strides, padding, lhs_dilation=input_dilation,
                rhs_dilation=kernel_dilation, dimension_numbers=numbers,
                feature_group_count=module.feature_group_count,
                preferred_element_type=jnp.int32)

        acc = conv(q_w)
        if zero_point is not None:
            acc = acc - zero_point.astype(jnp.int32) * conv(jnp.ones_like(q_w))
        return acc
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(q_x.shape[1:-1], dilated, strides, padding)
    q_x = jnp.pad(q_x, [(0, 0), *[tuple(p) for p in padding], (0, 0)])
    out = [(q_x.shape[1 + i] - dilated[i]) // strides[i] + 1 for i in range(rank)]
    columns = []
    for offsets in itertools.product(*(range(k) for k in kernel_size)):
        start = [o * d for o, d in zip(offsets, kernel_dilation, strict=True)]
        limit = [b + (n - 1) * st + 1 for b, n, st in zip(start, out, strides, strict=True)]
        columns.append(jax.lax.slice(q_x, (0, *start, 0), (q_x.shape[0], *limit, q_x.shape[-1]),
                                     (1, *strides, 1)))
    patches = jnp.stack(columns, axis=-2)  # [B, *out, prod(kernel_size), C_in]
    patches = patches.reshape(*patches.shape[:-2], -1)
    return _int_matmul(patches, q_w.reshape(-1, q_w.shape[-1]), zero_point)


def integer_layer(module: nn.Module, x: jax.Array, layer: Mapping[str, Any]) -> jax.Array:
    """One quantized Dense/Conv on float input ``x``: int8 input, int32 accumulation,
    float32 output ``s_x s_w (acc - z_w sum(q_x)) + b``.

    ``layer``: ``values`` (int8 kernel), ``scale`` and optional ``zero_point`` (``[C]`` or
    ``[]``), optional ``bias``, and ``activation`` (``q_min``, ``q_max``, ``scale`` or None).
    """
    act = layer["activation"]
    x = jnp.asarray(x, jnp.float32)
    batch_shape = None
    if isinstance(module, nn.Conv):
        rank = layer["values"].ndim - 2
        if x.ndim - (rank + 1) != 1:  # flax.linen.Conv's batch-dimension convention
            batch_shape = x.shape[:x.ndim - (rank + 1)]
            x = x.reshape((-1, *x.shape[x.ndim - (rank + 1):]))
    if act["scale"] is None:
        s_x = quant.dynamic_activation_scale(x, act["bits"])
    else:
        s_x = jnp.float32(act["scale"])
    q_x = jnp.clip(jnp.round(x / s_x), act["q_min"], act["q_max"]).astype(jnp.int8)
    if isinstance(module, nn.Conv):
        acc = _int_conv(module, q_x, layer["values"], layer.get("zero_point"))
    else:
        acc = _int_matmul(q_x, layer["values"], layer.get("zero_point"))
    y = acc.astype(jnp.float32) * (s_x * layer["scale"])
    if layer.get("bias") is not None:
        y = y + layer["bias"]
    if batch_shape is not None:
        y = y.reshape((*batch_shape, *y.shape[1:]))
    return y


def integer_apply(model: nn.Module, variables: Mapping[str, Any],
                  layers: Mapping[str, Mapping[str, Any]]) -> Callable[[jax.Array], jax.Array]:
    """``predict(x) -> logits``: ``model`` in inference mode with the layers of ``layers``
    (by path, as :func:`integer_layer` takes them) on the integer path."""

    def integer_path(next_fun, args, kwargs, context):
        found = quant.layer_of(context)
        if found is None or found[0] not in layers:
            return next_fun(*args, **kwargs)
        return integer_layer(context.module, args[0], layers[found[0]])

    def predict(x):
        with nn.intercept_methods(integer_path):
            return model.apply(variables, x, train=False)

    return predict
