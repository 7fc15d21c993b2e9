"""Uniform integer quantization: quantizer math, quantization-aware training, PTQ calibration.

The quantizer (Jacob et al., "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", CVPR 2018) maps a float ``x`` to an integer ``q`` of
``bits`` bits with a scale ``s > 0`` and an integer zero point ``z``::

    q = clip(round(x / s) + z, q_min, q_max)          x_hat = s * (q - z)

i.e. ``Q(x) = x * B + Z`` with ``B = 1/s``. Ranges (``int_range``):

- symmetric (``z = 0``): ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` ("narrow" range, as TFLite's int8
  weights; 2 bits give the ternary grid {-1, 0, 1}), ``s = max|x| / q_max``;
- asymmetric: ``[-2^(b-1), 2^(b-1) - 1]``, ``s = (hi - lo) / (2^b - 1)`` and
  ``z = round(q_min - lo / s)`` with ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)`` so that
  0 is represented exactly.

Per-tensor statistics reduce over every axis; per-channel statistics keep ``axis`` (the
output-feature axis ``-1`` of a Flax ``Dense`` or ``Conv`` kernel).

``fake_quant`` runs ``x_hat`` in float with the straight-through estimator (Bengio et al.
2013): its gradient is 1 inside the representable range and 0 outside (or 1 everywhere).
``lsq_fake_quant`` learns the step size (LSQ: Esser et al., "Learned Step Size
Quantization", ICLR 2020).

Quantization-aware training (QAT) of any jaxkd model (``qat_apply``) composes two pieces:

- weights: a pure transform of the parameters before ``model.apply`` (every selected
  ``Dense``/``Conv`` kernel is fake-quantized, per output channel by default);
- activations (``activation_bits > 0``): the inputs of the selected layers are
  fake-quantized by intercepting the Linen layers (``flax.linen.intercept_methods``),
  symmetric per tensor with a dynamic range (``'minmax'``) or a learned step (``'lsq'``).

Layers are chosen by a regex over their parameter path (``'stage1_block0/conv1'``) and
listed in call order by tracing the model once (``plan``); the first layer and the last
(the classifier ``head``) keep 8 bits by default. Bit widths are 8, 4 and 2.

Embedding tables (``flax.linen.Embed``, with ``embedding_bits``) are weight-only, symmetric
with one scale per row, ``s_v = max_j |E[v, j]| / q_max``: a token's vector is looked up
and scaled by its own row's scale, ``E[v] ~= s_v q[v]``, so that a rare token with small
entries keeps its resolution (as TFLite and ONNX Runtime quantize Gather tables).

The settings are the fields of :class:`jaxkd.config.Quantization`: ``qat_apply`` and
``init_qat_params`` take them as keyword arguments; the lower-level ``plan``,
``fake_quant_params`` and ``quantize_params`` take the checked block (``settings(...)``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxkd import layers, schema
from jaxkd.config import ACTIVATION_BITS, WEIGHT_BITS, Quantization
from jaxkd.schema import FieldError

CALIBRATION_METHODS = ("minmax", "percentile")
KERNEL_STEP = "kernel_step"  # LSQ's learned weight step, a sibling of the layer's kernel
INPUT_STEP = "input_step"  # LSQ's learned step of the layer's input activations
STEP_NAMES = (KERNEL_STEP, INPUT_STEP)
LAYER_TYPES = (nn.Dense, nn.Conv)
EMBED = "embed"  # LayerPlan.kind of an embedding table


# ----------------------------------------------------------------------------- settings


def settings(values: Mapping[str, Any] | Quantization | None = None) -> Quantization:
    """The checked :class:`jaxkd.config.Quantization` of keyword fields (or as given)."""
    if isinstance(values, Quantization):
        return values
    return schema.build(Quantization, values or {})


def check_bits(bits: Any, *, field: str = "weight_bits") -> int:
    """``bits`` as an int if ``field`` (weight_bits or activation_bits) allows it."""
    allowed = ACTIVATION_BITS if field == "activation_bits" else WEIGHT_BITS
    return schema.Choice(allowed).convert(field, bits)


def kernel_paths(params: Any) -> list[str]:
    """Paths (``'a/b'``) of every Dense/Conv kernel (:func:`jaxkd.layers.find`)."""
    return list(layers.find(params))


def validate(s: Quantization, params: Any) -> Quantization:
    """Checks the settings against a model's parameters, before compiling.

    Raises:
      FieldError: one line naming ``layers`` when its regex matches no layer of ``params``.
    """
    paths = kernel_paths(params)
    if not any(re.fullmatch(s.layers, p) for p in paths):
        raise FieldError("layers", f"={s.layers!r} matches no layer; "
                                   f"layers: {', '.join(paths) or '(none)'}")
    return s


# ----------------------------------------------------------------------------- quantizer


def int_range(bits: int, *, symmetric: bool = True) -> tuple[int, int]:
    """``(q_min, q_max)``: ``[-(2^(b-1)-1), 2^(b-1)-1]`` symmetric, else
    ``[-2^(b-1), 2^(b-1)-1]``."""
    q_max = 2 ** (bits - 1) - 1
    return (-q_max if symmetric else -q_max - 1), q_max


def _reduce_axes(ndim: int, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    keep = {a % ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(a for a in range(ndim) if a not in keep)


def min_max(x: jax.Array, axis: int | tuple[int, ...] | None = None
            ) -> tuple[jax.Array, jax.Array]:
    """Per-tensor (``axis=None``) or per-channel (keep ``axis``) min and max, kept dims."""
    axes = _reduce_axes(jnp.ndim(x), axis)
    return jnp.min(x, axis=axes, keepdims=True), jnp.max(x, axis=axes, keepdims=True)


def scale_zero_point(x_min: jax.Array, x_max: jax.Array, *, bits: int = 8,
                     symmetric: bool = True) -> tuple[jax.Array, jax.Array]:
    """Scale ``s`` and integer zero point ``z`` that cover ``[x_min, x_max]``.

    Symmetric: ``s = max(|x_min|, |x_max|) / q_max``, ``z = 0``. Asymmetric:
    ``s = (hi - lo) / (q_max - q_min)``, ``z = clip(round(q_min - lo / s), q_min, q_max)``
    with ``lo = min(x_min, 0)``, ``hi = max(x_max, 0)``. An all-zero range gives ``s = 1``.
    Shapes broadcast (per-channel statistics give per-channel scales); ``z`` is int32.
    """
    check_bits(bits)
    q_min, q_max = int_range(bits, symmetric=symmetric)
    x_min = jnp.asarray(x_min, jnp.float32)
    x_max = jnp.asarray(x_max, jnp.float32)
    if symmetric:
        absmax = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max))
        scale = jnp.where(absmax > 0, absmax / q_max, 1.0)
        return scale, jnp.zeros(scale.shape, jnp.int32)
    lo, hi = jnp.minimum(x_min, 0.0), jnp.maximum(x_max, 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / (q_max - q_min), 1.0)
    zero_point = jnp.clip(jnp.round(q_min - lo / scale), q_min, q_max).astype(jnp.int32)
    return scale, zero_point


def quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array | int = 0, *,
             bits: int = 8, symmetric: bool = True) -> jax.Array:
    """``q = clip(round(x / s) + z, q_min, q_max)`` as int8 (round half to even)."""
    q_min, q_max = int_range(check_bits(bits), symmetric=symmetric)
    q = jnp.round(jnp.asarray(x, jnp.float32) / scale) + zero_point
    return jnp.clip(q, q_min, q_max).astype(jnp.int8)


def dequantize(q: jax.Array, scale: jax.Array, zero_point: jax.Array | int = 0) -> jax.Array:
    """``x_hat = s * (q - z)`` in float32."""
    return scale * (jnp.asarray(q, jnp.float32) - zero_point)


def fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array | int = 0, *,
               bits: int = 8, symmetric: bool = True, clip_gradient: bool = True) -> jax.Array:
    """``dequantize(quantize(x))`` in float, differentiable by the straight-through estimator.

    Forward: ``s * (clip(round(x / s) + z, q_min, q_max) - z)``. Gradient with respect to
    ``x`` (Bengio et al. 2013, "Estimating or propagating gradients through stochastic
    neurons"): 1 where ``q_min <= round(x / s) + z <= q_max`` (the input is not clipped)
    and 0 elsewhere when ``clip_gradient`` (as PyTorch's ``fake_quantize``), else 1
    everywhere. ``scale`` and ``zero_point`` get no gradient.
    """
    q_min, q_max = int_range(check_bits(bits), symmetric=symmetric)
    x = jnp.asarray(x, jnp.float32)
    scale = jax.lax.stop_gradient(scale)
    zero_point = jax.lax.stop_gradient(jnp.asarray(zero_point, jnp.float32))
    q = jnp.round(x / scale) + zero_point
    x_hat = scale * (jnp.clip(q, q_min, q_max) - zero_point)
    if clip_gradient:
        x = jnp.where((q >= q_min) & (q <= q_max), x, jax.lax.stop_gradient(x))
    return x + jax.lax.stop_gradient(x_hat - x)


def lsq_range(bits: int) -> tuple[int, int]:
    """LSQ's signed grid ``(-Q_N, Q_P) = (-2^(b-1), 2^(b-1) - 1)``."""
    return int_range(check_bits(bits), symmetric=False)


def lsq_activation_range(bits: int, *, unsigned: Any) -> tuple[Any, Any]:
    """LSQ's grid of an activation: ``(0, 2^b - 1)`` for non-negative data (Q_N = 0, Q_P =
    2^b - 1, Esser et al. 2020, Sec. 2.1), else the signed ``lsq_range``; ``unsigned`` may
    be traced (then the bounds are arrays)."""
    signed, top = lsq_range(bits), 2 ** check_bits(bits) - 1
    if isinstance(unsigned, bool | np.bool_):
        return (0, top) if unsigned else signed
    return jnp.where(unsigned, 0, signed[0]), jnp.where(unsigned, top, signed[1])


def lsq_grad_scale(num_elements: int, bits: int, *, unsigned: Any = False) -> Any:
    """LSQ's step-gradient scale ``g = 1 / sqrt(N * Q_P)`` (Esser et al. 2020, Sec. 2.2):
    ``N`` weights of the layer (of one channel, per channel) or features of an activation."""
    q_p = lsq_activation_range(bits, unsigned=unsigned)[1]
    if isinstance(q_p, int):
        return 1.0 / math.sqrt(num_elements * q_p)
    return jax.lax.rsqrt(jnp.float32(num_elements) * q_p.astype(jnp.float32))


def lsq_init_step(x: jax.Array, *, bits: int, axis: int | None = None,
                  unsigned: bool = False) -> jax.Array:
    """LSQ's initial step ``2 mean(|x|) / sqrt(Q_P)``, per tensor or per channel ``axis``
    (shape ``()`` or ``[x.shape[axis]]``)."""
    axes = _reduce_axes(jnp.ndim(x), axis)
    q_p = lsq_activation_range(bits, unsigned=unsigned)[1]
    step = 2.0 * jnp.mean(jnp.abs(x), axis=axes) / math.sqrt(q_p)
    return jnp.maximum(step, 1e-8).astype(jnp.float32)


def lsq_step(step: jax.Array) -> jax.Array:
    """The step LSQ uses: ``max(|s|, 1e-8)``. An optimizer (Adam moves every parameter by
    about its learning rate) may push a learned step through zero; the magnitude keeps a
    gradient there, where clamping at a minimum would freeze the layer."""
    return jnp.maximum(jnp.abs(jnp.asarray(step, jnp.float32)), 1e-8)


def _round_ste(x: jax.Array) -> jax.Array:
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


def lsq_fake_quant(x: jax.Array, step: jax.Array, *, bits: int, grad_scale: Any,
                   unsigned: Any = False) -> jax.Array:
    """LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020), eq. (1)-(3).

    ``x_hat = round(clip(x / s, -Q_N, Q_P)) * s``, with gradients

    - ``d x_hat / d x = 1`` if ``-Q_N < x / s < Q_P``, else 0;
    - ``d x_hat / d s = g * (round(x / s) - x / s)`` inside, ``g * -Q_N`` below,
      ``g * Q_P`` above, where ``g = grad_scale`` (see ``lsq_grad_scale``).

    ``step`` broadcasts against ``x`` (``()`` per tensor, ``[C]`` per last-axis channel);
    ``lsq_step(step)`` is used, so a step that an optimizer pushed negative still works.
    ``unsigned`` uses ``(-Q_N, Q_P) = (0, 2^b - 1)`` (non-negative activations).
    """
    q_min, q_max = lsq_activation_range(bits, unsigned=unsigned)
    step = lsq_step(step)
    scaled_step = step * grad_scale + jax.lax.stop_gradient(step - step * grad_scale)
    v = jnp.asarray(x, jnp.float32) / scaled_step
    inside = (v > q_min) & (v < q_max)
    v = jnp.where(inside, v, jax.lax.stop_gradient(jnp.clip(v, q_min, q_max)))
    return _round_ste(v) * scaled_step


# ----------------------------------------------------------------------------- activations

OBSERVERS = "quant_ranges"  # the variable collection of the activation observers


def activation_grid(bits: int, *, unsigned: Any) -> tuple[Any, Any]:
    """The integers an activation takes: ``[0, 2^b - 1]`` for non-negative data (e.g. after
    a ReLU), else the symmetric ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (zero point 0 in both).
    ``unsigned`` may be traced (an observer's flag): then the bounds are int32 arrays."""
    bits = check_bits(bits, field="activation_bits")
    signed = int_range(bits, symmetric=True)
    if isinstance(unsigned, bool | np.bool_):
        return (0, 2 ** bits - 1) if unsigned else signed
    return (jnp.where(unsigned, 0, signed[0]), jnp.where(unsigned, 2 ** bits - 1, signed[1]))


def activation_scale(lo: jax.Array, hi: jax.Array, *, bits: int, unsigned: Any) -> jax.Array:
    """Scale of a range on its grid: ``hi / (2^b - 1)`` unsigned, ``max(|lo|, |hi|) /
    (2^(b-1) - 1)`` signed; 1 for an empty range. float32 ``[]``."""
    q_max = activation_grid(bits, unsigned=unsigned)[1]
    lo, hi = jnp.asarray(lo, jnp.float32), jnp.asarray(hi, jnp.float32)
    top = jnp.where(unsigned, jnp.maximum(hi, 0.0), jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    return jnp.where(top > 0, top / q_max, 1.0).astype(jnp.float32)


def fake_quant_activation(x: jax.Array, scale: jax.Array, *, bits: int, unsigned: Any
                          ) -> jax.Array:
    """``s * clip(round(x / s), q_min, q_max)`` on the activation grid, straight-through
    inside the grid and zero gradient where clipped (PyTorch's ``fake_quantize``)."""
    q_min, q_max = activation_grid(bits, unsigned=unsigned)
    x = jnp.asarray(x, jnp.float32)
    scale = jax.lax.stop_gradient(scale)
    q = jnp.round(x / scale)
    x_hat = scale * jnp.clip(q, q_min, q_max)
    x = jnp.where((q >= q_min) & (q <= q_max), x, jax.lax.stop_gradient(x))
    return x + jax.lax.stop_gradient(x_hat - x)


def update_observer(observer: Mapping[str, jax.Array], x: jax.Array, momentum: float
                    ) -> dict[str, jax.Array]:
    """The running range after batch ``x``: ``lo <- lo + m (min x - lo)``, the same for
    ``hi`` (an exponential moving average of each batch's min and max, as TensorFlow's and
    PyTorch's QAT observers keep); ``unsigned`` never changes."""
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    lo, hi = observer["lo"], observer["hi"]
    return {"lo": lo + momentum * (jnp.min(x) - lo), "hi": hi + momentum * (jnp.max(x) - hi),
            "unsigned": observer["unsigned"]}


# ----------------------------------------------------------------------------- layers


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """How one Dense/Conv layer or embedding table is quantized: its path, kind and bit
    widths."""

    path: str  # parameter path, e.g. 'stage1_block0/conv1'
    kind: str  # 'dense', 'conv' or 'embed'
    weight_bits: int
    activation_bits: int  # 0 = float input (always for 'embed')

    @property
    def param(self) -> str:
        """The name of the quantized parameter: ``'embedding'`` or ``'kernel'``."""
        return param_name(self.kind)


def param_name(kind: str) -> str:
    """The quantized parameter of a layer of ``kind``: an embedding table's ``'embedding'``,
    a Dense/Conv ``'kernel'``."""
    return "embedding" if kind == EMBED else "kernel"


def channel_axis(kind: str) -> int:
    """The axis that keeps its own scales: an embedding table's rows (0), a Dense/Conv
    kernel's output channels (-1)."""
    return 0 if kind == EMBED else -1


def dequantize_layer(values: np.ndarray, scale: np.ndarray, zero_point: Any, kind: str
                     ) -> np.ndarray:
    """The float tensor of a stored layer, ``scale * (values - zero_point)``, with per-channel
    scales and zero points broadcast along ``channel_axis(kind)``."""
    values = np.asarray(values, np.float32)
    zero_point = np.zeros((), np.float32) if zero_point is None else np.asarray(zero_point)
    scale = np.asarray(scale, np.float32)
    if channel_axis(kind) == 0 and scale.ndim:
        scale = scale.reshape(-1, *([1] * (values.ndim - 1)))
        zero_point = zero_point.reshape(-1, *([1] * (values.ndim - 1))) if zero_point.ndim \
            else zero_point
    return (scale * (values - zero_point.astype(np.float32))).astype(np.float32)


def layer_of(context: Any) -> tuple[str, str] | None:
    """``(path, kind)`` when an ``nn.intercept_methods`` context is a Dense/Conv call."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, LAYER_TYPES):
        return None
    kind = "dense" if isinstance(module, nn.Dense) else "conv"
    return layers.join(module.path), kind


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def model_inputs(x: Any) -> tuple[Any, ...]:
    """A batch as ``model.apply``'s positional inputs: a tuple stays one (a token model's
    ids and attention mask, :meth:`jaxkd.tasks.Task.model_inputs`), an array is the one
    input. Every ``sample`` / ``x`` of this module may be either."""
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def embedding_of(context: Any) -> str | None:
    """The path of an ``nn.Embed`` whose table an ``nn.intercept_methods`` context reads
    (a lookup, ``__call__``, or ``attend``)."""
    module = context.module
    if context.method_name not in ("__call__", "attend") or not isinstance(module, nn.Embed):
        return None
    return layers.join(module.path)


def find_layers(model: nn.Module, variables: Mapping[str, Any], sample: Any, *,
                embeddings: bool = False) -> list[tuple[str, str]]:
    """The Dense/Conv layers ``model`` calls on ``sample``, in call order: ``(path, kind)``;
    with ``embeddings`` the ``nn.Embed`` tables it reads, as ``(path, 'embed')``, instead.

    Traces the model abstractly (no FLOPs); ``sample`` is an input batch or its
    ``jax.ShapeDtypeStruct`` (or a tuple of them, :func:`model_inputs`). A layer called
    twice is listed once.
    """
    seen: dict[str, str] = {}

    def record(next_fun, args, kwargs, context):
        if embeddings:
            path = embedding_of(context)
            if path is not None:
                seen.setdefault(path, EMBED)
        else:
            layer = layer_of(context)
            if layer is not None:
                seen.setdefault(*layer)
        return next_fun(*args, **kwargs)

    def run(v, x):
        with nn.intercept_methods(record):
            return model.apply(v, *x, train=False)

    jax.eval_shape(run, _abstract(dict(variables)), _abstract(model_inputs(sample)))
    return list(seen.items())


def plan(model: nn.Module, variables: Mapping[str, Any], sample: Any,
         s: Quantization) -> dict[str, LayerPlan]:
    """The selected layers and their bit widths, in call order.

    A layer is selected when ``re.fullmatch(s.layers, path)``; with
    ``keep_first_last_8bit`` the first layer called and the ``head`` (else the last layer
    called) use 8 bits (:func:`jaxkd.layers.edge_layers`), for weights and, when
    activations are quantized, for their input. With ``embedding_bits`` every embedding
    table the model reads follows, kind ``'embed'`` (weight-only).

    Raises:
      FieldError: one line naming ``layers`` when the regex selects no layer, or
        ``activation_bits`` when the model calls no Dense/Conv layer that could be
        intercepted, or ``embedding_bits`` when it reads no ``nn.Embed`` table.
    """
    variables = dict(variables)
    variables["params"] = strip_steps(variables["params"])
    called = find_layers(model, variables, sample)
    if not called:
        field = "activation_bits" if s.activation_bits else "layers"
        raise FieldError(field, f": model {type(model).__name__} calls no flax.linen Dense or "
                                "Conv layer that can be intercepted for quantization")
    selected = [(p, k) for p, k in called if re.fullmatch(s.layers, p)]
    if not selected:
        raise FieldError("layers", f"={s.layers!r} matches no layer; "
                                   f"layers: {', '.join(p for p, _ in called)}")
    paths = [p for p, _ in called]
    edges = set(layers.edge_layers(paths, paths))
    out = {}
    for path, kind in selected:
        wb, ab = s.weight_bits, s.activation_bits
        if s.keep_first_last_8bit and path in edges:
            wb, ab = 8, (8 if ab else 0)
        out[path] = LayerPlan(path=path, kind=kind, weight_bits=wb, activation_bits=ab)
    if s.embedding_bits:
        tables = find_layers(model, variables, sample, embeddings=True)
        if not tables:
            raise FieldError("embedding_bits", f"={s.embedding_bits} but model "
                                               f"{type(model).__name__} looks up no "
                                               "flax.linen.Embed table")
        for path, kind in tables:
            out[path] = LayerPlan(path=path, kind=kind, weight_bits=s.embedding_bits,
                                  activation_bits=0)
    return out


def strip_steps(params: Any) -> Any:
    """``params`` without LSQ's step leaves (``kernel_step``, ``input_step``)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] not in STEP_NAMES})


def _layer_get(flat: Mapping[tuple[str, ...], Any], path: str, name: str) -> Any:
    return flat.get((*path.split("/"), name))


# ----------------------------------------------------------------------------- QAT


def weight_scale(kernel: jax.Array, *, bits: int, per_channel: bool, symmetric: bool,
                 axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Scale and zero point of a Dense/Conv ``kernel`` (output channels on the last axis;
    an embedding table's rows with ``axis=0``), from its min/max: per channel
    ``[1, ..., 1, C]`` (``[V, 1]``) or per tensor ``[1, ..., 1]``."""
    axis = axis if per_channel else None
    if symmetric:  # only max|w| matters: one reduction instead of two
        absmax = jnp.max(jnp.abs(kernel), axis=_reduce_axes(jnp.ndim(kernel), axis),
                         keepdims=True)
        return scale_zero_point(-absmax, absmax, bits=bits, symmetric=True)
    return scale_zero_point(*min_max(kernel, axis=axis), bits=bits, symmetric=False)


def fake_quant_params(params: Any, layer_plan: Mapping[str, LayerPlan],
                      s: Quantization) -> Any:
    """``params`` with every planned kernel fake-quantized (LSQ steps, if any, removed).

    ``'minmax'``: range from the kernel itself (no gradient), STE gradient. ``'lsq'``: the
    learned ``kernel_step`` sibling of each kernel (see ``init_qat_params``). Embedding
    tables: symmetric min/max per row, whatever the method.
    """
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in STEP_NAMES}
    for path, layer in layer_plan.items():
        key = (*path.split("/"), layer.param)
        kernel = out[key]
        if layer.kind == EMBED:
            scale, _ = weight_scale(jax.lax.stop_gradient(kernel), bits=layer.weight_bits,
                                    per_channel=True, symmetric=True, axis=0)
            out[key] = fake_quant(kernel, scale, bits=layer.weight_bits, clip_gradient=False)
        elif s.method == "lsq":
            step = _layer_get(flat, path, KERNEL_STEP)
            if step is None:
                raise FieldError("method", f"='lsq' but params have no {path}/{KERNEL_STEP}: "
                                           "initialise them with jaxkd.quant.init_qat_params")
            n = kernel.size // (kernel.shape[-1] if s.per_channel else 1)
            out[key] = lsq_fake_quant(kernel, step, bits=layer.weight_bits,
                                      grad_scale=lsq_grad_scale(n, layer.weight_bits))
        else:
            scale, zp = weight_scale(jax.lax.stop_gradient(kernel), bits=layer.weight_bits,
                                     per_channel=s.per_channel, symmetric=s.symmetric)
            # The range covers the kernel, so nothing is clipped: the STE's mask is all ones
            # and is not computed (it would cost a pass over the weights in the backward).
            out[key] = fake_quant(kernel, scale, zp, bits=layer.weight_bits,
                                  symmetric=s.symmetric, clip_gradient=False)
    return traverse_util.unflatten_dict(out)


def dynamic_activation_scale(x: jax.Array, bits: int) -> jax.Array:
    """Symmetric per-tensor scale ``max|x| / q_max`` of a batch (no gradient)."""
    scale, _ = scale_zero_point(*min_max(jax.lax.stop_gradient(x)), bits=bits)
    return scale.reshape(())


def _nested_get(tree: Mapping[str, Any] | None, path: str) -> Any:
    for key in path.split("/"):
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})


def qat_apply(model: nn.Module, **quantization: Any) -> Callable[..., Any]:
    """A drop-in ``model.apply`` that runs the model quantization-aware (QAT).

    ``fn(variables, *inputs, train=False, mutable=False, rngs=None, return_features=False)``
    has ``model.apply``'s signature and returns what it returns; pass it as
    ``train.make_train_step(..., student_apply=fn)``. Weights of the selected Dense/Conv
    layers are fake-quantized (``fake_quant_params``); with ``activation_bits > 0`` their
    inputs are too, via ``flax.linen.intercept_methods``, per tensor on the layer's grid
    (``activation_grid``: unsigned for non-negative inputs) with a *static* scale, so that
    an example's output never depends on the rest of its batch and the exported integer
    model computes the same function:

    - ``'minmax'``: the scale of the layer's running input range, ``variables[OBSERVERS]``
      (``init_observers``); in training (``train=True`` with ``OBSERVERS`` in ``mutable``)
      each batch first moves the range (``update_observer``, ``range_momentum``) and the
      new ranges are returned with the other mutable collections; in eval it is frozen.
    - ``'lsq'``: the learned ``input_step`` (``init_qat_params``).

    Gradients follow the straight-through estimator (LSQ's for ``'lsq'``). The layer plan
    is traced once per input shape. ``quantization``: the fields of
    :class:`jaxkd.config.Quantization`; bad fields raise at once, a ``layers`` regex that
    matches nothing at the first call.
    """
    s = settings(quantization)
    plans: dict[Any, dict[str, LayerPlan]] = {}

    def apply(variables: Mapping[str, Any], *inputs: Any, train: bool = False,
              mutable: Any = False, rngs: Any = None, return_features: bool = False) -> Any:
        variables = dict(variables)
        observers = variables.pop(OBSERVERS, None)
        params = variables["params"]
        stripped = strip_steps(params)
        key = (jax.tree.structure(stripped),
               tuple((tuple(jnp.shape(x)[1:]), jnp.result_type(x)) for x in inputs))
        if key not in plans:
            plans[key] = plan(model, {**variables, "params": stripped}, _abstract(inputs), s)
        layer_plan = plans[key]
        flat = traverse_util.flatten_dict(params)
        variables["params"] = fake_quant_params(params, layer_plan, s)
        collections = [mutable] if isinstance(mutable, str) else list(mutable or [])
        observe = train and OBSERVERS in collections
        collections = [c for c in collections if c != OBSERVERS]
        moved: dict[str, Any] = {}

        def quantize_inputs(next_fun, args, kwargs, context):
            layer = layer_of(context)
            lp = layer_plan.get(layer[0]) if layer else None
            if lp is None or not lp.activation_bits:
                return next_fun(*args, **kwargs)
            h = jnp.asarray(args[0], jnp.float32)
            observer = moved.get(lp.path, _nested_get(observers, lp.path))
            if observer is None:
                raise FieldError("activation_bits", f": layer {lp.path!r} has no activation "
                                                    f"observer in variables[{OBSERVERS!r}]: "
                                                    "make them with jaxkd.quant.init_observers")
            unsigned = observer["unsigned"]  # the grid, fixed when the observers were made
            bits = lp.activation_bits
            if s.method == "lsq":
                step = _layer_get(flat, lp.path, INPUT_STEP)
                if step is None:
                    raise FieldError("method", f"='lsq' with activation_bits but params have "
                                               f"no {lp.path}/{INPUT_STEP}: initialise them "
                                               "with jaxkd.quant.init_qat_params")
                g = lsq_grad_scale(math.prod(h.shape[1:]), bits, unsigned=unsigned)
                h = lsq_fake_quant(h, step, bits=bits, grad_scale=g, unsigned=unsigned)
            else:
                if observe:
                    observer = moved[lp.path] = update_observer(observer, h, s.range_momentum)
                scale = activation_scale(observer["lo"], observer["hi"], bits=bits,
                                         unsigned=unsigned)
                h = fake_quant_activation(h, scale, bits=bits, unsigned=unsigned)
            return next_fun(h, *args[1:], **kwargs)

        kwargs = {"train": train, "rngs": rngs}
        if return_features:
            kwargs["return_features"] = True
        with nn.intercept_methods(quantize_inputs):
            if collections:
                out, updates = model.apply(variables, *inputs, mutable=collections, **kwargs)
            else:
                out, updates = model.apply(variables, *inputs, **kwargs), {}
        if not mutable:
            return out
        if observe:
            flat_obs = traverse_util.flatten_dict(dict(observers))
            for path, observer in moved.items():
                flat_obs.update({(*path.split("/"), k): v for k, v in observer.items()})
            updates = {**updates, OBSERVERS: traverse_util.unflatten_dict(flat_obs)}
        return out, updates

    return apply


def observed_ranges(observers: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{layer path: {'lo', 'hi', 'unsigned'}}`` of an ``OBSERVERS`` collection (host
    values), as :func:`jaxkd.export.export` takes activation ranges."""
    out: dict[str, dict[str, Any]] = {}
    for keys, value in traverse_util.flatten_dict(dict(jax.device_get(observers))).items():
        out.setdefault("/".join(keys[:-1]), {})[keys[-1]] = value
    return out


def init_observers(model: nn.Module, variables: Mapping[str, Any], sample: Any,
                   **quantization: Any) -> dict[str, Any]:
    """``variables[OBSERVERS]`` of the layers whose inputs QAT quantizes: each layer's
    input range on the representative batch ``sample`` (``{'lo', 'hi'}``) and whether the
    input is non-negative there (``unsigned``, with ``unsigned_activations``: the layer's
    grid, fixed from now on)."""
    s = settings(quantization)
    layer_plan = plan(model, variables, sample, s)
    quantized = [p for p, lp in layer_plan.items() if lp.activation_bits]
    if not quantized:
        return {}
    inputs = jax.jit(lambda v, x: capture_inputs(model, v, x))(dict(variables), sample)
    return _nested({p: {"lo": jnp.min(inputs[p]), "hi": jnp.max(inputs[p]),
                        "unsigned": (jnp.min(inputs[p]) >= 0) & s.unsigned_activations}
                    for p in quantized})


def capture_inputs(model: nn.Module, variables: Mapping[str, Any], x: Any
                   ) -> dict[str, jax.Array]:
    """The input of every Dense/Conv layer of ``model`` on batch ``x`` (eval mode; a tuple
    for several inputs, :func:`model_inputs`), by path.

    A layer called several times reports the input of its first call.
    """
    captured: dict[str, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
        layer = layer_of(context)
        if layer is not None and layer[0] not in captured:
            captured[layer[0]] = jnp.asarray(args[0], jnp.float32)
        return next_fun(*args, **kwargs)

    variables = dict(variables)
    variables["params"] = strip_steps(variables["params"])
    with nn.intercept_methods(record):
        model.apply(variables, *model_inputs(x), train=False)
    return captured


def init_qat_params(model: nn.Module, variables: Mapping[str, Any], sample: Any,
                    **quantization: Any) -> Any:
    """``variables['params']`` ready for QAT: unchanged for ``'minmax'``; for ``'lsq'``
    with a ``kernel_step`` (and, with ``activation_bits``, an ``input_step``) added beside
    each selected kernel, initialised as LSQ prescribes: ``2 mean|v| / sqrt(Q_P)`` over the
    weights (per output channel when ``per_channel``) or over the layer's inputs on
    ``sample`` (a representative batch). Call it before ``optimizer.init``. ``quantization``:
    the fields of :class:`jaxkd.config.Quantization`."""
    s = settings(quantization)
    params = variables["params"]
    if s.method != "lsq":
        return params
    layer_plan = plan(model, variables, sample, s)
    flat = traverse_util.flatten_dict(strip_steps(params))
    inputs = {}
    if any(lp.activation_bits for lp in layer_plan.values()):
        inputs = jax.jit(lambda v, x: capture_inputs(model, v, x))(dict(variables), sample)
    for path, lp in layer_plan.items():
        if lp.kind == EMBED:  # min/max per row (fake_quant_params): no step to learn
            continue
        kernel = flat[(*path.split("/"), "kernel")]
        flat[(*path.split("/"), KERNEL_STEP)] = lsq_init_step(
            kernel, bits=lp.weight_bits, axis=-1 if s.per_channel else None)
        if lp.activation_bits:  # on the grid the observers will fix (unsigned if x >= 0)
            unsigned = bool(jnp.min(inputs[path]) >= 0) and s.unsigned_activations
            flat[(*path.split("/"), INPUT_STEP)] = lsq_init_step(
                inputs[path], bits=lp.activation_bits, unsigned=unsigned)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- PTQ


def calibrate(model: nn.Module, variables: Mapping[str, Any], batches: Iterable[Any], *,
              method: str = "minmax", percentile: float = 99.99) -> dict[str, tuple[float, float]]:
    """Input ranges ``(lo, hi)`` of every Dense/Conv layer over ``batches`` (eval mode).

    ``'minmax'``: the smallest and largest input seen. ``'percentile'``: the mean over
    batches of the ``100 - percentile`` and ``percentile`` percentiles of each batch's
    inputs (clips rare outliers; Wu et al. 2020, "Integer Quantization for Deep Learning
    Inference"). ``batches`` yields input arrays or dicts with an ``'image'`` entry.
    """
    if method not in CALIBRATION_METHODS:
        raise FieldError("calibration", f"={method!r} is not a calibration method; "
                                        f"allowed: {', '.join(CALIBRATION_METHODS)}")
    q = float(percentile)

    @jax.jit
    def stats(v, x):
        captured = capture_inputs(model, v, x)
        if method == "minmax":
            return {p: (jnp.min(h), jnp.max(h)) for p, h in captured.items()}
        return {p: (jnp.percentile(h, 100.0 - q), jnp.percentile(h, q))
                for p, h in captured.items()}

    lows: dict[str, list[float]] = {}
    highs: dict[str, list[float]] = {}
    for batch in batches:
        x = batch["image"] if isinstance(batch, Mapping) else batch
        for path, (lo, hi) in jax.device_get(stats(dict(variables), x)).items():
            lows.setdefault(path, []).append(float(lo))
            highs.setdefault(path, []).append(float(hi))
    if not lows:
        raise ValueError("calibrate got no batches")
    if method == "minmax":
        return {p: (min(lows[p]), max(highs[p])) for p in lows}
    return {p: (float(np.mean(lows[p])), float(np.mean(highs[p]))) for p in lows}


@dataclasses.dataclass(frozen=True)
class QuantizedKernel:
    """A kernel as integers: ``kernel ~= scale * (values - zero_point)``.

    ``values`` int8 of the kernel's shape, each within ``bits`` bits; ``scale`` float32 and
    ``zero_point`` int8, both ``[C]`` (per output channel) or ``[]`` (per tensor); for an
    embedding table ``[V]``, one per row (:func:`dequantize_layer` broadcasts them).
    """

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int


@functools.partial(jax.jit, static_argnames=("bits", "per_channel", "symmetric", "axis"))
def _quantize_kernel(kernel, step, *, bits, per_channel, symmetric, axis):
    if step is not None:
        q_min, q_max = lsq_range(bits)
        scale = lsq_step(step)
        values = jnp.clip(jnp.round(kernel / scale), q_min, q_max).astype(jnp.int8)
        return values, scale, jnp.zeros(scale.shape, jnp.int32)
    scale, zero_point = weight_scale(kernel, bits=bits, per_channel=per_channel,
                                     symmetric=symmetric, axis=axis)
    values = quantize(kernel, scale, zero_point, bits=bits, symmetric=symmetric)
    shape = (kernel.shape[axis],) if per_channel else ()
    return values, scale.reshape(shape), zero_point.reshape(shape)


def quantize_kernel(kernel: Any, *, bits: int, per_channel: bool = True,
                    symmetric: bool = True, step: Any = None, axis: int = -1
                    ) -> QuantizedKernel:
    """Integer values, scale and zero point of one kernel (min/max range, or an LSQ step);
    per channel along ``axis`` (an embedding table's rows: ``axis=0``)."""
    values, scale, zero_point = _quantize_kernel(
        jnp.asarray(kernel, jnp.float32), step, bits=check_bits(bits),
        per_channel=bool(per_channel), symmetric=bool(symmetric), axis=int(axis))
    return QuantizedKernel(values=np.asarray(values, np.int8),
                           scale=np.asarray(scale, np.float32),
                           zero_point=np.asarray(zero_point, np.int8), bits=int(bits))


def quantize_params(params: Any, s: Quantization, *,
                    layer_plan: Mapping[str, LayerPlan] | None = None
                    ) -> dict[str, QuantizedKernel]:
    """Post-training quantization of the selected kernels: ``{path: QuantizedKernel}``.

    ``layer_plan`` (from ``plan(model, variables, sample, config)``) fixes each layer's bit
    width. Without it every kernel of ``params`` matching ``layers`` is quantized at
    ``weight_bits``; that needs ``keep_first_last_8bit=False`` because which layer is first
    is known only by tracing the model. LSQ-trained params use their learned steps.
    """
    if layer_plan is None:
        if s.keep_first_last_8bit:
            raise FieldError("keep_first_last_8bit", "=True needs the layer order: pass "
                                                     "layer_plan=jaxkd.quant.plan(...)")
        validate(s, params)
        layer_plan = {p: LayerPlan(p, "", s.weight_bits, s.activation_bits)
                      for p in kernel_paths(params) if re.fullmatch(s.layers, p)}
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, lp in layer_plan.items():
        if lp.kind == EMBED:  # symmetric per row, as QAT fake-quantized it
            out[path] = quantize_kernel(_layer_get(flat, path, lp.param), bits=lp.weight_bits,
                                        axis=channel_axis(lp.kind))
            continue
        step = _layer_get(flat, path, KERNEL_STEP) if s.method == "lsq" else None
        out[path] = quantize_kernel(_layer_get(flat, path, "kernel"), bits=lp.weight_bits,
                                    per_channel=s.per_channel, symmetric=s.symmetric,
                                    step=step)
    return out
