"""ONNX export of an artifact: its integer function, run by ONNX's integer operators.

``export_onnx(artifact_dir, out_path)`` writes an ONNX model computing what
``jaxkd.export.load(artifact_dir)[0]`` computes, for the zoo's ``mlp``, ``cnn1d``,
``lenet5``, CIFAR ``resnet*``, ``wrn*`` and ``bert``; ``verify_onnx`` compares the two. The graph is
written with ``onnx.helper``, walking each architecture's layers by name and the artifact's
tensors; a Conv's padding, strides and dilation are the Flax module's, resolved as the
integer runtime resolves them. Input ``"input"``: float32 ``[batch, *input_shape]`` (the
manifest's, in the jaxkd layout: NHWC images, ``[L]`` / ``[L, C]`` signals); output
``"logits"``: float32 ``[batch, num_classes]``; ``batch`` is symbolic. ``bert`` takes
``"input_ids"`` and ``"attention_mask"`` instead, int64 ``[batch, sequence]`` (both
symbolic, as HF's ONNX exports; the sequence at most ``max_position``). Convolutions run
channels-first inside; maps return to NHWC before a flatten (jaxkd's flatten order).

Artifact construct (:mod:`jaxkd.export.integer`) -> ONNX:

- a quantized layer's input -> ``QuantizeLinear`` (divides, rounds half to even) to
  uint8: zero point 0 for a non-negative grid (the unsigned 8-bit grid, int8 with zero
  point -128 in the artifact, is the same integers + 128), 128 for a signed one (the int8
  value + 128), then ``Clip`` to a narrower grid (``[-127, 127]``, 4/2-bit grids).
  Convolutions pad with the zero point, the integer of 0, as the artifact does. No stored
  scale: ``max|x| / q_max`` of the batch in-graph.
- quantized Dense -> ``MatMulInteger`` of the uint8 input and the int8 kernel + 128 (zero
  points + 128, per column), int32: ``sum (q_x - z_x)(q_w - z_w)``, the artifact's sum.
  u8 x u8 because ONNX Runtime computes it exactly on every x86 (16-bit products summed
  in int32), where its u8 x s8 kernels without AVX512-VNNI use VPMADDUBSW, whose int16
  pair sums saturate (its quantization guide warns; seen here on an AVX2 CPU: 4 % of a
  test MLP's examples 6 % of the logit scale off). Quantized Conv -> ``ConvInteger`` the
  same way, a per-channel weight zero point (ONNX Runtime's takes only a scalar) as the
  term ``- z_w[c] * ConvInteger(q_x, ones)``; then ``Cast``, ``Mul`` by ``s_x * s_w``,
  ``Add`` bias: the artifact's operations in its order.
- int4 / int2 weights -> uint8 initializers holding the values + 128 (exact: the
  artifact's GEMM multiplies the same int8 values; ONNX has no 4-bit integer matmul).
- weight-only layer -> ``Cast``, ``Sub`` z_w, ``Mul`` s_w of the int8 values (folded into a
  float initializer by ONNX Runtime), float ``MatMul`` / ``Conv``. Not ``DequantizeLinear``:
  ONNX Runtime 1.32 fuses ``DequantizeLinear`` (int8 or INT4) + ``MatMul`` into
  ``MatMulNBits``, which by default quantizes the activations to int8 (0.5 % of the logit
  scale off on a test MLP).
- float kernel -> ``MatMul`` / ``Conv`` + ``Add``; BatchNorm -> ``Sub`` mean, ``Mul``
  ``scale / sqrt(var + eps)``, ``Add`` bias (flax's order, not folded); ReLU, max pool,
  global average pool, residual -> ``Relu``, ``MaxPool``, ``GlobalAveragePool``, ``Add``.
- BERT: embeddings -> ``Gather``; LayerNorm -> ``LayerNormalization`` (opset >= 17, else
  its formula); attention -> ``MatMul`` of the float Q, K, V heads, ``Softmax`` with the
  padding bias; exact GELU -> ``Erf``; every projection (Q, K, V, attention output, FFN,
  pooler, head) is a layer as above, integer where the artifact quantized it. An integer
  embedding table (``embedding_bits``) -> ``Gather`` of its int8 rows and of their scales,
  ``Cast``, ``Mul``; a float one -> ``Gather``.

Anything else (a model outside the zoo, a non-float32 model, grouped, input-dilated,
circular or reflect convolutions, a bit width the manifest should not hold) is refused in
one :class:`~jaxkd.schema.ConfigError` line naming the layer.

**Tolerance.** Integer sums are exact on both sides, so most examples agree to float
rounding (``< 1e-6`` of the logit scale). Where the two compute a float an ulp apart, a
value at a rounding boundary of the next layer's grid rounds to the neighbouring integer:
one activation one step apart, a logit change of about ``s_x |w|`` (0.3 % of the logit
scale in the tests, on 0-2 of 500 examples). The ulps come from XLA:CPU's vectorised
float32 division, which is not always correctly rounded (``x / s`` = 33.499996 where IEEE
and ONNX Runtime give 33.5), and from BatchNorm's ``1 / sqrt`` and pooling sums. The tests
ask for argmax agreement on >= 99.9 % of the examples, >= 99 % of them within ``1e-5`` of
the logit scale and none beyond 2 %; float and weight-only models within ``1e-5``; on
AVX512-VNNI and on AVX2 CPUs alike (the u8 x u8 form above).

**jax2onnx** 0.17.1 (jax 0.10.2, onnx 1.23.2, onnxruntime 1.32.0) on the artifact's jitted
integer predict function (mlp, cnn1d w8a8): the ``int8 x int8 -> int32`` ``dot_general``
becomes ``Gemm`` / ``Einsum`` on int8 with an int8 result (the int32 accumulation is lost;
``onnx.checker`` with ``full_check`` and ONNX Runtime reject both models), never
``MatMulInteger`` / ``ConvInteger``; it also pins ``orbax-checkpoint<0.11.37`` against
jaxkd's ``>=0.12.8``. Hence the hand-written graph.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding

from jaxkd import files, models, quant
from jaxkd.config import ACTIVATION_BITS, WEIGHT_BITS
from jaxkd.export import artifact, integer
from jaxkd.models.bert import MASK_BIAS
from jaxkd.schema import ConfigError

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError as e:  # the optional extra
    raise ImportError("jaxkd.export.onnx needs onnx and onnxruntime: "
                      "pip install 'jaxkd[export]'") from e

INPUT, OUTPUT, BATCH, SEQUENCE = "input", "logits", "batch", "sequence"
MIN_OPSET = 13  # Clip of int8/uint8 (opset 12), Reshape/ReduceMax/... as of opset 13
SUPPORTED = "mlp, cnn1d, lenet5, resnet*, wrn*, bert"


class _Call(NamedTuple):
    """One Dense/Conv/BatchNorm of the model: its module and, for a Conv, ``(kernel_size,
    ONNX pads, strides, dilations)``."""

    module: nn.Module
    conv: tuple | None


def _layer_calls(model: nn.Module, variables: Any, input_shape: tuple[int, ...]
                 ) -> dict[str, _Call]:
    """Every Dense, Conv and BatchNorm the model calls on one example (eval mode), by path,
    with a Conv's geometry as the integer path resolves it (abstract: no FLOPs)."""
    calls: dict[str, _Call] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(
                module, nn.Dense | nn.Conv | nn.BatchNorm):
            path = "/".join(module.path)
            if path not in calls:
                calls[path] = _Call(module, _conv_geometry(path, module, args[0])
                                    if isinstance(module, nn.Conv) else None)
        return next_fun(*args, **kwargs)

    def run(v, inputs):
        with nn.intercept_methods(record):
            return model.apply(v, *inputs, train=False)

    example = jax.ShapeDtypeStruct((1, *input_shape), models.input_dtype(model))
    jax.eval_shape(run, variables, (example,) * len(models.input_names(model)))
    return calls


def _conv_geometry(path: str, module: nn.Conv, x: Any) -> tuple:
    """``(kernel_size, ONNX pads, strides, dilations)`` of a flax Conv call, as
    :mod:`jaxkd.export.integer` resolves them; refuses what ONNX Conv cannot express."""
    kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                   else tuple(module.kernel_size))
    padding = canonicalize_padding(module.padding, len(kernel_size))
    input_dilation = np.atleast_1d(1 if module.input_dilation is None else module.input_dilation)
    unsupported = [
        (padding in ("CIRCULAR", "REFLECT"), f"padding={padding!r}"),
        (module.feature_group_count != 1, f"feature_group_count={module.feature_group_count}"),
        (np.any(input_dilation != 1), f"input_dilation={module.input_dilation}"),
        (module.mask is not None or not module.shared_weights, "a mask or unshared weights"),
        (x.ndim != len(kernel_size) + 2, f"an input of shape {tuple(x.shape)}"),
    ]
    for refused, what in unsupported:
        if refused:
            raise ConfigError(f"layer {path!r}: a Conv with {what} has no ONNX export")
    # The integer runtime's own resolution of flax's padding (SAME, CAUSAL, explicit).
    _, pads, strides, dilations, _, _ = integer.conv_setup(module, x, kernel_size)
    onnx_pads = [p[0] for p in pads] + [p[1] for p in pads]
    return kernel_size, onnx_pads, list(strides), list(dilations)


class _Graph:
    """The ONNX graph under construction: nodes, initializers (once per name), names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.uses: collections.Counter[str] = collections.Counter()

    def const(self, name: str, value: Any, dtype: Any = None) -> str:
        """An initializer holding ``value`` (numpy dtype ``dtype``); reused by name."""
        if name not in self.initializers:
            array = np.asarray(value, dtype)
            self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """Appends one node; returns its (unique) output name."""
        self.uses[name] += 1
        out = name if self.uses[name] == 1 else f"{name}:{self.uses[name] - 1}"
        if out in self.initializers:
            out = f"{out}:out"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


class _Builder:
    """Emits the ONNX nodes of one artifact's layers (quantized, weight-only or float),
    BatchNorms and the glue between them, by layer path."""

    def __init__(self, graph: _Graph, calls: Mapping[str, _Call],
                 floats: Mapping[tuple[str, ...], np.ndarray],
                 quantized: Mapping[str, dict[str, Any]], manifest_path: str, opset: int):
        self.g, self.calls, self.floats, self.quantized = graph, calls, floats, quantized
        self.where, self.opset = manifest_path, opset
        self.kinds: dict[str, str] = {}  # layer path: 'integer', 'weight_only' or 'float'

    # --------------------------------------------------------------------- glue

    def relu(self, x: str) -> str:
        return self.g.op("Relu", [x], "relu")

    def add(self, a: str, b: str) -> str:
        return self.g.op("Add", [a, b], "residual")

    def flatten(self, x: str) -> str:
        """``x.reshape(B, -1)``, batch kept (Reshape's 0 copies the dimension)."""
        return self.g.op("Reshape", [x, self.g.const("flat", [0, -1], np.int64)], "flatten")

    def channels_first(self, x: str, rank: int) -> str:
        return self.g.op("Transpose", [x], "nchw", perm=[0, rank + 1, *range(1, rank + 1)])

    def channels_last(self, x: str, rank: int) -> str:
        return self.g.op("Transpose", [x], "nhwc", perm=[0, *range(2, rank + 2), 1])

    def max_pool(self, x: str, window: int) -> str:
        return self.g.op("MaxPool", [x], "max_pool", kernel_shape=[window, window],
                         strides=[window, window])

    def global_average_pool(self, x: str) -> str:
        """``mean(x, spatial axes)``: ``[B, C]``."""
        return self.flatten(self.g.op("GlobalAveragePool", [x], "mean"))

    def layer_norm(self, path: str, x: str, epsilon: float) -> str:
        """``LayerNormalization`` over the last axis (opset 17; before it, its definition:
        ``(x - mean) / sqrt(var + eps) * scale + bias`` with the two-pass variance)."""
        scale = self.g.const(f"{path}/scale", self._float(path, "scale"), np.float32)
        bias = self.g.const(f"{path}/bias", self._float(path, "bias"), np.float32)
        if self.opset >= 17:
            return self.g.op("LayerNormalization", [x, scale, bias], f"{path}/layer_norm",
                             axis=-1, epsilon=float(epsilon))
        mean = self.g.op("ReduceMean", [x], f"{path}/mean", axes=[-1], keepdims=1)
        centred = self.g.op("Sub", [x, mean], f"{path}/centred")
        var = self.g.op("ReduceMean", [self.g.op("Mul", [centred, centred], f"{path}/square")],
                        f"{path}/var", axes=[-1], keepdims=1)
        std = self.g.op("Sqrt", [self.g.op("Add", [var, self.g.const(
            f"{path}/epsilon", epsilon, np.float32)], f"{path}/var_eps")], f"{path}/std")
        y = self.g.op("Div", [centred, std], f"{path}/normalized")
        return self.g.op("Add", [self.g.op("Mul", [y, scale], f"{path}/scaled"), bias],
                         f"{path}/layer_norm")

    def gelu(self, x: str) -> str:
        """The exact GELU, ``x / 2 (1 + erf(x / sqrt 2))`` (``Erf``: any opset here)."""
        erf = self.g.op("Erf", [self.g.op("Div", [x, self.g.const(
            "sqrt2", np.sqrt(2.0), np.float32)], "gelu_scaled")], "gelu_erf")
        half = self.g.op("Mul", [x, self.g.const("half", 0.5, np.float32)], "gelu_half")
        return self.g.op("Mul", [half, self.g.op("Add", [erf, self.g.const(
            "one", 1.0, np.float32)], "gelu_cdf")], "gelu")

    def image(self, x: str, input_shape: tuple[int, ...], rank: int) -> str:
        """The model's input ``[B, *spatial(, C)]`` as channels-first ``[B, C, *spatial]``
        (a missing channel axis is 1, as the zoo models add it)."""
        if len(input_shape) == rank:
            shape = [0, *input_shape, 1]
            x = self.g.op("Reshape", [x, self.g.const("with_channel", shape, np.int64)],
                          "with_channel")
        return self.channels_first(x, rank)

    # --------------------------------------------------------------------- layers

    def _float(self, path: str, name: str) -> np.ndarray | None:
        return self.floats.get(("params", *path.split("/"), name))

    def _per_channel(self, path: str, value: np.ndarray) -> np.ndarray:
        """A per-output-channel vector shaped to broadcast over ``path``'s output (``[C]``
        for a Dense, ``[C, 1, ..]`` for a channels-first Conv); a scalar stays one."""
        conv = self.calls[path].conv
        value = np.asarray(value)
        if conv is None or value.ndim == 0:
            return value
        return value.reshape(-1, *[1] * len(conv[0]))

    def layer(self, path: str, x: str) -> str:
        """The Dense or Conv at ``path`` applied to ``x`` (channels-first for a Conv)."""
        if path not in self.calls:
            raise ConfigError(f"{self.where}: the model calls no layer {path!r}")
        entry, kernel = self.quantized.get(path), self._float(path, "kernel")
        if entry is None and kernel is None:
            raise ConfigError(f"{self.where}: layer {path!r} has neither an integer kernel "
                              "nor a float one")
        if entry is None:
            self.kinds[path] = "float"
            y = self._product(path, x, self.g.const(f"{path}/kernel", self._kernel(path, kernel),
                                                    np.float32))
        elif not entry["activation"]["bits"]:
            self.kinds[path] = "weight_only"
            y = self._product(path, x, self._dequantized(path, entry))
        else:
            self.kinds[path] = "integer"
            y = self._integer(path, x, entry)
        bias = self._float(path, "bias")
        if bias is not None:
            y = self.g.op("Add", [y, self.g.const(f"{path}/bias", self._per_channel(path, bias),
                                                  np.float32)], f"{path}/bias_add")
        return y

    def table(self, path: str) -> np.ndarray:
        """The float embedding table at ``path`` (an integer one dequantized)."""
        entry = self.quantized.get(path)
        if entry is None:
            return self._float(path, "embedding")
        return quant.dequantize_layer(entry["values"], entry["scale"], entry["zero_point"],
                                      quant.EMBED)

    def lookup(self, path: str, ids: str) -> str:
        """The rows ``ids`` of the embedding table at ``path``: ``Gather`` of the float
        table, or of the int8 table and of its per-row scales, then ``Cast`` and ``Mul``
        (the artifact's ``s[ids] * q[ids]``)."""
        g, entry = self.g, self.quantized.get(path)
        if entry is None:
            return g.op("Gather", [g.const(path, self._float(path, "embedding")), ids],
                        f"{path}/lookup", axis=0)
        self.kinds[path] = "integer_table"
        rows = g.op("Gather", [g.const(f"{path}/values", entry["values"], np.int8), ids],
                    f"{path}/lookup_int", axis=0)
        scales = g.op("Gather", [g.const(f"{path}/scale", entry["scale"], np.float32), ids],
                      f"{path}/lookup_scale", axis=0)
        scales = g.op("Unsqueeze", [scales, g.const("axes_last", [-1], np.int64)],
                      f"{path}/row_scale")
        return g.op("Mul", [scales, g.op("Cast", [rows], f"{path}/rows", to=TensorProto.FLOAT)],
                    f"{path}/rows_scaled")

    def _kernel(self, path: str, kernel: np.ndarray) -> np.ndarray:
        """A flax kernel in ONNX's layout: Dense ``[K, C]`` as is, Conv ``[*k, I, O]`` as
        ``[O, I, *k]``."""
        if self.calls[path].conv is None:
            return kernel
        rank = kernel.ndim - 2
        return np.transpose(kernel, (rank + 1, rank, *range(rank)))

    def _product(self, path: str, x: str, w: str) -> str:
        """Float ``x @ w`` or ``conv(x, w)``."""
        conv = self.calls[path].conv
        if conv is None:
            return self.g.op("MatMul", [x, w], f"{path}/matmul")
        _, pads, strides, dilations = conv
        return self.g.op("Conv", [x, w], f"{path}/conv", pads=pads, strides=strides,
                         dilations=dilations)

    def _dequantized(self, path: str, entry: Mapping[str, Any]) -> str:
        """The float kernel ``s_w (q_w - z_w)`` in ONNX's layout, from int8 values: ``Cast``,
        ``Sub``, ``Mul`` (the artifact's operations; see the module docstring for why not
        ``DequantizeLinear``)."""
        q_w = self._kernel(path, entry["values"])

        def per_output(value):  # broadcast over the output axis: Dense [K, C], Conv [C, ...]
            value = np.asarray(value, np.float32)
            if self.calls[path].conv is None or value.ndim == 0:
                return value
            return value.reshape(-1, *[1] * (q_w.ndim - 1))

        w = self.g.op("Cast", [self.g.const(f"{path}/kernel_q", q_w, np.int8)],
                      f"{path}/kernel_int", to=TensorProto.FLOAT)
        if entry["zero_point"] is not None:
            z_w = self.g.const(f"{path}/kernel_zero_point", per_output(entry["zero_point"]))
            w = self.g.op("Sub", [w, z_w], f"{path}/kernel_centred")
        s_w = self.g.const(f"{path}/scale", per_output(entry["scale"]))
        return self.g.op("Mul", [w, s_w], f"{path}/kernel")

    def _quantize_input(self, path: str, x: str, act: Mapping[str, Any]
                        ) -> tuple[str, str, str]:
        """``(q_x, s_x, z_x)``: ``x`` on the layer's activation grid as uint8 with ONNX zero
        point ``z_x``: 0 for a non-negative grid (the artifact's int8 with zero point -128
        is the same integers + 128), 128 for a signed one (``q + 128``)."""
        offset = -int(act.get("zero_point", 0))
        if offset not in (0, 128):
            raise ConfigError(f"{self.where}: layer {path!r} has activation zero point "
                              f"{-offset}, which the ONNX graph cannot express (0 or -128)")
        lo, hi = int(act["q_min"]) + offset, int(act["q_max"]) + offset
        shift = 0 if lo >= 0 else 128  # a signed grid, stored as uint8 around 128
        lo, hi = lo + shift, hi + shift
        if act["scale"] is None:  # per batch: max|x| / q_max, 1 for an all-zero batch
            absmax = self.g.op("ReduceMax", [self.g.op("Abs", [x], f"{path}/abs")],
                               f"{path}/absmax", keepdims=0)
            q_max = quant.int_range(act["bits"])[1]
            scale = self.g.op("Div", [absmax, self.g.const(f"{path}/q_max", q_max, np.float32)],
                              f"{path}/dynamic_scale")
            positive = self.g.op("Greater", [absmax, self.g.const("zero", 0.0, np.float32)],
                                 f"{path}/nonzero")
            scale = self.g.op("Where", [positive, scale, self.g.const("one", 1.0, np.float32)],
                              f"{path}/input_scale")
        else:
            scale = self.g.const(f"{path}/input_scale", act["scale"], np.float32)
        zero = self.g.const(f"uint8_{shift}", shift, np.uint8)
        q = self.g.op("QuantizeLinear", [x, scale, zero], f"{path}/quantize")
        if (lo, hi) != (0, 255):
            q = self.g.op("Clip", [q, self.g.const(f"uint8_{lo}", lo, np.uint8),
                                   self.g.const(f"uint8_{hi}", hi, np.uint8)], f"{path}/grid")
        return q, scale, zero

    def _integer(self, path: str, x: str, entry: Mapping[str, Any]) -> str:
        """``Cast((q_x - z_x) * (q_w - z_w) -> int32) * (s_x * s_w)``: the artifact's integer
        layer, both operands uint8 (``int8 + 128``, the zero points + 128)."""
        q_x, s_x, z_x = self._quantize_input(path, x, entry["activation"])
        q_w = self.g.const(f"{path}/kernel_u8",
                           (self._kernel(path, entry["values"]).astype(np.int16) + 128), np.uint8)
        z_w = entry["zero_point"]
        conv = self.calls[path].conv
        if conv is None:
            z = 128 + (0 if z_w is None else np.asarray(z_w, np.int16))
            inputs = [q_x, q_w, z_x, self.g.const(f"{path}/kernel_zero_point", z, np.uint8)]
            acc = self.g.op("MatMulInteger", inputs, f"{path}/matmul_integer")
        else:
            _, pads, strides, dilations = conv
            geometry = {"pads": pads, "strides": strides, "dilations": dilations}
            scalar_zp = z_w is not None and np.ndim(z_w) == 0
            z = 128 + (int(z_w) if scalar_zp else 0)  # ONNX Runtime's is a scalar
            inputs = [q_x, q_w, z_x, self.g.const(f"{path}/kernel_zero_point", z, np.uint8)]
            acc = self.g.op("ConvInteger", inputs, f"{path}/conv_integer", **geometry)
            if z_w is not None and not scalar_zp:  # - z_w[c] * sum of q_x over the window
                *window, c_in, _ = entry["values"].shape
                ones = np.ones((1, c_in, *window), np.uint8)
                sums = self.g.op("ConvInteger", [q_x, self.g.const(f"{path}/ones", ones), z_x],
                                 f"{path}/window_sum", **geometry)
                z = self.g.const(f"{path}/kernel_zero_point_i32",
                                 self._per_channel(path, z_w), np.int32)
                acc = self.g.op("Sub", [acc, self.g.op("Mul", [z, sums], f"{path}/zp_term")],
                                f"{path}/accumulator")
        y = self.g.op("Cast", [acc], f"{path}/to_float", to=TensorProto.FLOAT)
        s_w = self._per_channel(path, entry["scale"]).astype(np.float32)
        if entry["activation"]["scale"] is None:
            rescale = self.g.op("Mul", [s_x, self.g.const(f"{path}/scale", s_w)],
                                f"{path}/rescale")
        else:  # the artifact's float32 product s_x * s_w, computed once here
            rescale = self.g.const(f"{path}/rescale",
                                   np.float32(entry["activation"]["scale"]) * s_w)
        return self.g.op("Mul", [y, rescale], f"{path}/rescaled")

    def batch_norm(self, path: str, x: str) -> str:
        """Inference BatchNorm, as flax computes it: ``(x - mean) * (scale * rsqrt(var +
        eps)) + bias``, channels-first."""
        module = self.calls[path].module
        if module.axis != -1 or not module.use_running_average:
            raise ConfigError(f"layer {path!r}: a BatchNorm over axis {module.axis} (or in "
                              "training mode) has no ONNX export")
        keys = path.split("/")
        mean = self.floats[("batch_stats", *keys, "mean")]
        var = self.floats[("batch_stats", *keys, "var")]
        mul = np.float32(1.0) / np.sqrt(var + np.float32(module.epsilon))
        if module.use_scale:
            mul = mul * self.floats[("params", *keys, "scale")]
        y = self.g.op("Sub", [x, self.g.const(f"{path}/mean", self._channels(mean))],
                      f"{path}/centred")
        y = self.g.op("Mul", [y, self.g.const(f"{path}/mul", self._channels(mul))],
                      f"{path}/normalized")
        if module.use_bias:
            bias = self.floats[("params", *keys, "bias")]
            y = self.g.op("Add", [y, self.g.const(f"{path}/bias", self._channels(bias))],
                          f"{path}/shifted")
        return y

    def _channels(self, value: np.ndarray) -> np.ndarray:
        """A BatchNorm vector ``[C]`` as ``[C, 1, 1]`` (maps are NCHW)."""
        return np.asarray(value, np.float32).reshape(-1, 1, 1)


# ------------------------------------------------------------------------- architectures


def _mlp(b: _Builder, model: models.MLP, x: str, input_shape: tuple[int, ...]) -> str:
    """flatten -> (Dense -> ReLU) per width -> head (dropout is off at inference)."""
    x = b.flatten(x)
    for i in range(1, len(model.widths) + 1):
        x = b.relu(b.layer("hidden2" if model.tie_hidden and i >= 2 else f"hidden{i}", x))
    return b.layer("head", x)


def _cnn1d(b: _Builder, model: models.CNN1D, x: str, input_shape: tuple[int, ...]) -> str:
    """Three (Conv1d -> ReLU), position-major flatten, head."""
    x = b.image(x, input_shape, rank=1)
    for i in (1, 2, 3):
        x = b.relu(b.layer("conv2" if model.tie_convs and i == 3 else f"conv{i}", x))
    return b.layer("head", b.flatten(b.channels_last(x, 1)))


def _lenet5(b: _Builder, model: models.LeNet5, x: str, input_shape: tuple[int, ...]) -> str:
    """(Conv 5x5 -> ReLU -> max pool 2x2) per channel width, NHWC flatten, (Dense -> ReLU)
    per width, head."""
    x = b.image(x, input_shape, rank=2)
    for i in range(1, len(model.channels) + 1):
        x = b.max_pool(b.relu(b.layer(f"conv{i}", x)), 2)
    x = b.flatten(b.channels_last(x, 2))
    for i in range(1, len(model.widths) + 1):
        x = b.relu(b.layer(f"fc{i}", x))
    return b.layer("head", x)


def _resnet(b: _Builder, model: models.CifarResNet, x: str, input_shape: tuple[int, ...]
            ) -> str:
    """Stem, post-activation basic blocks (projection shortcut where the model has one),
    global average pool, head."""
    x = b.relu(b.batch_norm("stem_bn", b.layer("stem_conv", b.image(x, input_shape, 2))))
    for s in range(1, len(model.widths) + 1):
        for i in range((model.depth - 2) // 6):
            p = f"stage{s}_block{i}"
            y = b.relu(b.batch_norm(f"{p}/bn1", b.layer(f"{p}/conv1", x)))
            y = b.batch_norm(f"{p}/bn2", b.layer(f"{p}/conv2", y))
            shortcut = x
            if f"{p}/shortcut_conv" in b.calls:
                shortcut = b.batch_norm(f"{p}/shortcut_bn", b.layer(f"{p}/shortcut_conv", x))
            x = b.relu(b.add(y, shortcut))
    return b.layer("head", b.global_average_pool(x))


def _wrn(b: _Builder, model: models.WideResNet, x: str, input_shape: tuple[int, ...]) -> str:
    """Stem, pre-activation blocks (the shortcut conv reads the activated input), final
    BatchNorm-ReLU, global average pool, head."""
    x = b.layer("stem_conv", b.image(x, input_shape, 2))
    for s in (1, 2, 3):
        for i in range((model.depth - 4) // 6):
            p = f"stage{s}_block{i}"
            activated = b.relu(b.batch_norm(f"{p}/bn1", x))
            y = b.relu(b.batch_norm(f"{p}/bn2", b.layer(f"{p}/conv1", activated)))
            y = b.layer(f"{p}/conv2", y)
            shortcut = x
            if f"{p}/shortcut_conv" in b.calls:
                shortcut = b.layer(f"{p}/shortcut_conv", activated)
            x = b.add(y, shortcut)
    x = b.relu(b.batch_norm("final_bn", x))
    return b.layer("head", b.global_average_pool(x))


def _heads(b: _Builder, path: str, x: str, h: int, d: int) -> str:
    """The Dense at ``path`` on ``x`` split into heads: ``[B, L, h d] -> [B, h, L, d]``."""
    y = b.layer(path, x)
    y = b.g.op("Reshape", [y, b.g.const(f"heads_{h}x{d}", [0, 0, h, d], np.int64)],
               f"{path}_heads")
    return b.g.op("Transpose", [y], f"{path}_bhld", perm=[0, 2, 1, 3])


def _bert(b: _Builder, model: models.BertEncoder, inputs: tuple[str, str],
          input_shape: tuple[int, ...]) -> str:
    """Token ids and attention mask (int64 ``[B, L]``) -> embeddings (Gather of the word and
    position tables, token type 0) -> LayerNorm -> per layer: Q, K, V (the layer's Dense,
    integer or float), ``Softmax(Q K^T / sqrt(d) + M)`` in float32, ``M = -10000 (1 -
    mask)``, the output Dense, residual, LayerNorm; FFN (Dense, exact GELU, Dense),
    residual, LayerNorm -> pooling -> head. A layer with 0 heads (or FFN units) adds only
    its output bias on that branch, as the model does."""
    g = b.g
    ids, mask = inputs

    x = b.lookup("embeddings/word_embeddings", ids)
    length = g.op("Gather", [g.op("Shape", [ids], "ids_shape"),
                             g.const("axis_1", 1, np.int64)], "length", axis=0)
    positions = g.op("Range", [g.const("int64_0", 0, np.int64), length,
                               g.const("int64_1", 1, np.int64)], "positions")
    x = g.op("Add", [x, b.lookup("embeddings/position_embeddings", positions)],
             "embeddings/word_position")
    x = g.op("Add", [x, g.const("embeddings/token_type_0",
                                b.table("embeddings/token_type_embeddings")[0])],
             "embeddings/sum")
    x = b.layer_norm("embeddings/LayerNorm", x, model.layer_norm_eps)
    mask_float = g.op("Cast", [mask], "mask_float", to=TensorProto.FLOAT)
    bias = g.op("Mul", [g.op("Sub", [g.const("one", 1.0, np.float32), mask_float],
                              "padding"), g.const("mask_bias", MASK_BIAS, np.float32)],
                "mask_bias")
    bias = g.op("Unsqueeze", [bias, g.const("axes_1_2", [1, 2], np.int64)], "mask_bias_bhqk")
    head_dim = model.head_dim or model.hidden_size // model.num_heads

    def branch_bias(path: str, x: str) -> str:  # a branch with no units: its bias only
        return g.op("Add", [x, g.const(f"{path}/bias", b._float(path, "bias"), np.float32)],
                    f"{path}/bias_only")

    for i in range(model.num_layers):
        p, h = f"layer{i}", model.heads_of(i)
        if h:
            q, k, v = (_heads(b, f"{p}/attention/{name}", x, h, head_dim)
                       for name in ("query", "key", "value"))
            k_t = g.op("Transpose", [k], f"{p}/attention/key_t", perm=[0, 1, 3, 2])
            scores = g.op("Div", [g.op("MatMul", [q, k_t], f"{p}/attention/qk"), g.const(
                f"sqrt_{head_dim}", math.sqrt(head_dim), np.float32)], f"{p}/attention/scaled")
            probs = g.op("Softmax", [g.op("Add", [scores, bias], f"{p}/attention/scores")],
                         f"{p}/attention/probs", axis=-1)
            context = g.op("Transpose", [g.op("MatMul", [probs, v], f"{p}/attention/pv")],
                           f"{p}/attention/context_blhd", perm=[0, 2, 1, 3])
            context = g.op("Reshape", [context, g.const("merge_heads", [0, 0, -1], np.int64)],
                           f"{p}/attention/context")
            out = b.layer(f"{p}/attention/output", context)
            y = g.op("Add", [x, out], f"{p}/attention/residual")
        else:
            y = branch_bias(f"{p}/attention/output", x)
        x = b.layer_norm(f"{p}/attention/LayerNorm", y, model.layer_norm_eps)
        if model.intermediate_of(i):
            y = b.layer(f"{p}/output", b.gelu(b.layer(f"{p}/intermediate", x)))
            y = g.op("Add", [x, y], f"{p}/residual")
        else:
            y = branch_bias(f"{p}/output", x)
        x = b.layer_norm(f"{p}/LayerNorm", y, model.layer_norm_eps)
    if model.pooling == "mean":  # sum_t m_t h_t / max(sum_t m_t, 1e-9)
        m = g.op("Unsqueeze", [mask_float, g.const("axes_2", [2], np.int64)], "mask_blh")
        total = g.op("ReduceSum", [g.op("Mul", [x, m], "masked"),
                                   g.const("axes_1", [1], np.int64)], "token_sum", keepdims=0)
        count = g.op("ReduceSum", [m, g.const("axes_1", [1], np.int64)], "token_count",
                     keepdims=0)
        count = g.op("Max", [count, g.const("min_count", 1e-9, np.float32)], "token_count_min")
        pooled = g.op("Div", [total, count], "mean_pool")
    else:
        pooled = g.op("Gather", [x, g.const("int64_0", 0, np.int64)], "cls", axis=1)
        if model.pooling == "pooler":
            pooled = g.op("Tanh", [b.layer("pooler", pooled)], "pooler_tanh")
    return b.layer("head", pooled)


ARCHITECTURES = {models.MLP: _mlp, models.CNN1D: _cnn1d, models.LeNet5: _lenet5,
                 models.CifarResNet: _resnet, models.WideResNet: _wrn,
                 models.BertEncoder: _bert}


# ------------------------------------------------------------------------- artifact


def _read_artifact(artifact_dir: str) -> tuple[dict[str, Any], dict, dict]:
    """``(manifest, float tensors by key, quantized layers by path)``, checked against the
    manifest (sizes and sha256) and decoded to dense arrays."""
    manifest = artifact.verify(artifact_dir)
    contents = artifact.read_files(artifact_dir, manifest)
    floats = {(t["collection"], *t["path"].split("/")): artifact.read_tensor(contents, t)
              for t in manifest["float_tensors"]}
    where = os.path.join(artifact_dir, artifact.MANIFEST)
    quantized = {}
    for e in manifest["layers"]:
        bits, act_bits = e["weight_bits"], e["activation"]["bits"]
        if bits not in WEIGHT_BITS or act_bits not in ACTIVATION_BITS:
            raise ConfigError(f"{where}: layer {e['path']!r} has weight_bits={bits}, "
                              f"activation bits {act_bits}, which the ONNX graph cannot "
                              f"express (weight bits {WEIGHT_BITS}, activation bits "
                              f"{ACTIVATION_BITS})")
        quantized[e["path"]] = {
            "values": artifact.read_tensor(contents, e["kernel"]).astype(np.int8),
            "scale": artifact.read_tensor(contents, e["scale"]).astype(np.float32),
            "zero_point": (None if not e["zero_point"] else
                           artifact.read_tensor(contents, e["zero_point"]).astype(np.int8)),
            "bits": bits, "activation": e["activation"], "kind": e["kind"]}
    return manifest, floats, quantized


def _abstract_variables(floats: Mapping[tuple[str, ...], np.ndarray],
                        quantized: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The model's variables as shapes (quantized kernels by their integer values)."""
    flat = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in floats.items()}
    for path, e in quantized.items():
        flat[("params", *path.split("/"), quant.param_name(e["kind"]))] = jax.ShapeDtypeStruct(
            e["values"].shape, jnp.float32)
    return traverse_util.unflatten_dict(flat)


def export_onnx(artifact_dir: str, out_path: str, *, opset: int = 21) -> dict[str, Any]:
    """Writes the ONNX model of the artifact in ``artifact_dir`` to ``out_path``.

    The file is written whole or not at all (a temporary file beside it, then renamed).

    Returns:
      ``{"path", "opset", "bytes", "input": {"name", "shape"} (a token model: "inputs",
      one per input), "output": {"name", "shape"}, "layers": {"integer", "weight_only",
      "float"} (counts of Dense/Conv layers), "integer_tables" (int8 embedding lookups),
      "ops": {op_type: count}}``; shapes name the batch dimension ``"batch"``.

    Raises:
      ConfigError: one line, for an opset outside ``[13, onnx's newest]``, a model
        outside the zoo or not float32, or a layer the graph cannot express (naming it).
      MissingError, ArtifactError: as :func:`jaxkd.export.verify`.
    """
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not (
            MIN_OPSET <= opset <= newest):
        raise ConfigError(f"opset={opset!r} is not supported: choose {MIN_OPSET}..{newest}")
    manifest, floats, quantized = _read_artifact(artifact_dir)
    spec = manifest["model"]
    where = os.path.join(artifact_dir, artifact.MANIFEST)
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    build = ARCHITECTURES.get(type(model))
    if build is None:
        raise ConfigError(f"{where}: model {spec['name']!r} ({type(model).__name__}) has no "
                          f"ONNX export; supported: {SUPPORTED}")
    for field in ("dtype", "param_dtype"):
        if jnp.dtype(getattr(model, field)) != jnp.float32:
            raise ConfigError(f"{where}: model.kwargs.{field}="
                              f"{jnp.dtype(getattr(model, field)).name!r}: the ONNX graph "
                              "computes in float32; export a float32 model")
    input_shape = tuple(int(d) for d in spec["input_shape"])
    calls = _layer_calls(model, _abstract_variables(floats, quantized), input_shape)
    graph = _Graph()
    builder = _Builder(graph, calls, floats, quantized, where, opset)
    names = models.input_names(model)
    if len(names) == 1:
        in_shape, in_type = [BATCH, *input_shape], TensorProto.FLOAT
        logits = build(builder, model, names[0], input_shape)
    else:  # token ids and their mask, int64 as tokenizers' numpy output (and HF's ONNX)
        in_shape, in_type = [BATCH, SEQUENCE], TensorProto.INT64
        logits = build(builder, model, names, input_shape)
    graph.nodes.append(helper.make_node("Identity", [logits], [OUTPUT], name=OUTPUT))
    out_shape = [BATCH, int(spec["num_classes"])]
    proto = helper.make_model_gen_version(  # the oldest IR version of that opset
        helper.make_graph(graph.nodes, f"jaxkd_{spec['name']}",
                          [helper.make_tensor_value_info(n, in_type, in_shape) for n in names],
                          [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)],
                          list(graph.initializers.values())),
        opset_imports=[helper.make_opsetid("", opset)], producer_name="jaxkd",
        doc_string=f"jaxkd artifact {spec['name']} ({artifact_dir})")
    with open(where, "rb") as f:
        helper.set_model_props(proto, {"jaxkd.model": spec["name"],
                                       "jaxkd.format": manifest["format"],
                                       "jaxkd.manifest_sha256": hashlib.sha256(
                                           f.read()).hexdigest()})
    data = proto.SerializeToString()
    files.makedirs(os.path.dirname(os.path.abspath(out_path)))
    files.write_bytes(out_path, data)  # a temporary file beside it, then os.replace
    inputs = [{"name": n, "shape": in_shape} for n in names]
    return {"path": str(out_path), "opset": opset, "bytes": len(data),
            **({"input": inputs[0]} if len(inputs) == 1 else {"inputs": inputs}),
            "output": {"name": OUTPUT, "shape": out_shape},
            "layers": {k: sum(v == k for v in builder.kinds.values())
                       for k in ("integer", "weight_only", "float")},
            "integer_tables": sum(v == "integer_table" for v in builder.kinds.values()),
            "ops": dict(sorted(collections.Counter(n.op_type for n in graph.nodes).items()))}


def verify_onnx(artifact_dir: str, onnx_path: str, inputs: Any, *, rtol: float = 1e-5
                ) -> dict[str, Any]:
    """Checks the ONNX model (``onnx.checker``, with shape inference) and compares ONNX
    Runtime's logits (CPUExecutionProvider) with the artifact's integer path
    (``jaxkd.export.load(artifact_dir)[0]``) on ``inputs``: ``[B, ...]`` for one input, a
    tuple in the model's input order for several (token ids and attention mask ``[B, L]``).

    Returns ``{"examples", "max_abs_diff", "logit_scale" (max |artifact logit|),
    "relative_diff" (their ratio), "matching" (fraction of examples whose logits all agree
    within ``rtol * logit_scale``), "argmax_agreement" (fraction of examples)}``.
    """
    import onnxruntime

    onnx.checker.check_model(onnx_path, full_check=True)
    arrays = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feed = {}
    for spec, x in zip(session.get_inputs(), arrays, strict=True):
        dtype = np.int64 if spec.type == "tensor(int64)" else np.float32
        feed[spec.name] = np.asarray(x).astype(dtype)
    got = session.run([OUTPUT], feed)[0]
    expected = np.asarray(artifact.load(artifact_dir)[0](*(np.asarray(x) for x in arrays)))
    diff = np.abs(got - expected).max(axis=-1)
    scale = float(np.abs(expected).max())
    return {"examples": int(arrays[0].shape[0]), "max_abs_diff": float(diff.max()),
            "logit_scale": scale,
            "relative_diff": float(diff.max()) / scale if scale else float(diff.max()),
            "matching": float(np.mean(diff <= rtol * scale)),
            "argmax_agreement": float(np.mean(got.argmax(-1) == expected.argmax(-1)))}
