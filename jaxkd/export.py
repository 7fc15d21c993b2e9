"""A compressed-model artifact that loads without executing code and runs integer matmuls.

``export(directory, ...)`` writes::

    directory/
      manifest.json       model (name, kwargs, num_classes, input_shape), jaxkd version,
                          quantization settings, per-layer tensor index, metrics, and the
                          size and sha256 of every other file
      int_weights.bin     the quantized kernels: int8 values, or int4 / int2 values packed
                          two / four per byte (two's complement, low bits first), and the
                          int8 zero points of asymmetric kernels
      float_tensors.bin   float32, little-endian: the weight scales and everything that
                          stays float (biases, BatchNorm parameters and statistics, the
                          kernels of layers that are not quantized)

Raw little-endian bytes indexed by ``manifest.json`` (offset, byte count, dtype, shape):
reading them needs ``json`` and ``numpy.frombuffer`` only, never pickle.

``load(directory)`` checks every file against the manifest (``verify``), rebuilds the
model by name and returns ``predict_fn(x) -> logits`` that runs the **integer path**: each
quantized ``Dense``/``Conv`` (intercepted with ``flax.linen.intercept_methods``) quantizes
its input to int8 (a static scale from calibration or LSQ, else ``max|x| / q_max`` of the
batch), computes ``int8 x int8 -> int32`` with ``lax.dot_general`` /
``lax.conv_general_dilated`` and ``preferred_element_type=int32``, then rescales by
``s_x * s_w`` and adds the float bias (Jacob et al. 2018, "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference")::

    y = s_x s_w (sum_k q_x[k] q_w[k, c] - z_w[c] sum_k q_x[k]) + b[c]

Everything else (ReLU, pooling, BatchNorm, residual adds) runs in float32.

CLI: ``python -m jaxkd.export verify DIR`` exits 1 with one line naming the file whose
bytes do not match the manifest, or that is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding

import jaxkd
from jaxkd import models, quant

FORMAT = "jaxkd.export/1"
MANIFEST = "manifest.json"
INT_FILE = "int_weights.bin"
FLOAT_FILE = "float_tensors.bin"


class ArtifactError(ValueError):
    """An exported directory whose files do not match its manifest."""


# ----------------------------------------------------------------------------- packing


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Packs signed integers of ``bits`` bits (8, 4 or 2) into uint8, ``8 // bits`` per byte.

    Element ``i`` of the flattened array takes bits ``[bits * (i % k), bits * (i % k + 1))``
    of byte ``i // k`` (``k = 8 // bits``), as two's complement; the tail is zero-padded.
    """
    bits = quant.check_bits(bits)
    flat = np.asarray(values, np.int8).reshape(-1)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(f"values outside [{lo}, {hi}] do not fit in {bits} bits")
    if bits == 8:
        return flat.view(np.uint8).copy()
    per_byte = 8 // bits
    padded = np.zeros(math.ceil(flat.size / per_byte) * per_byte, np.uint8)
    padded[:flat.size] = flat.view(np.uint8) & ((1 << bits) - 1)
    groups = padded.reshape(-1, per_byte)
    out = np.zeros(groups.shape[0], np.uint8)
    for j in range(per_byte):
        out |= groups[:, j] << np.uint8(bits * j)
    return out


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack``: the first ``count`` signed values as int8."""
    bits = quant.check_bits(bits)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if bits == 8:
        return packed[:count].view(np.int8).copy()
    per_byte = 8 // bits
    mask, sign = (1 << bits) - 1, 1 << (bits - 1)
    fields = np.stack([(packed >> np.uint8(bits * j)) & mask for j in range(per_byte)], -1)
    fields = fields.reshape(-1)[:count].astype(np.int16)
    return ((fields ^ sign) - sign).astype(np.int8)


# ----------------------------------------------------------------------------- writing


class _Blob:
    """Bytes of one tensor file, and the manifest entries that index them."""

    def __init__(self, name: str):
        self.name = name
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, array: np.ndarray, *, dtype: str) -> dict[str, Any]:
        data = np.ascontiguousarray(array).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        entry = {"file": self.name, "offset": self.size, "nbytes": len(data), "dtype": dtype,
                 "shape": list(np.shape(array))}
        self.chunks.append(data)
        self.size += len(data)
        return entry

    def write(self, directory: str) -> dict[str, Any]:
        data = b"".join(self.chunks)
        with open(os.path.join(directory, self.name), "wb") as f:
            f.write(data)
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _flat_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], np.ndarray]:
    host = jax.device_get(dict(variables))
    flat = traverse_util.flatten_dict(dict(host))
    return {tuple(str(p) for p in k): np.asarray(v) for k, v in flat.items()}


def _activation_entry(path: str, lp: quant.LayerPlan, settings: quant.Settings,
                      flat: Mapping[tuple[str, ...], np.ndarray],
                      activation_ranges: Mapping[str, Any] | None) -> dict[str, Any]:
    bits = lp.activation_bits or 8
    step = flat.get(("params", *path.split("/"), quant.INPUT_STEP))
    if settings.method == "lsq" and step is not None:
        q_min, q_max = quant.lsq_range(bits)
        scale, source = float(quant.lsq_step(step)), "lsq"
    else:
        q_min, q_max = quant.int_range(bits, symmetric=True)
        scale, source = None, "dynamic"
        if activation_ranges is not None:
            if path not in activation_ranges:
                raise ValueError(
                    f"activation_ranges has no range for layer {path!r}; "
                    f"it has: {', '.join(sorted(activation_ranges))}"
                )
            lo, hi = (float(v) for v in activation_ranges[path])
            absmax = max(abs(lo), abs(hi))
            scale = float(np.float32(absmax / q_max)) if absmax > 0 else 1.0
            source = "calibrated"
    return {"bits": bits, "q_min": q_min, "q_max": q_max, "scale": scale, "source": source}


def _prepare_directory(directory: str, overwrite: bool) -> None:
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} exists and is not a directory")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not empty: choose a new directory or pass overwrite=True"
        )


def _move_into_place(tmp: str, directory: str) -> None:
    if not os.path.exists(directory):
        os.rename(tmp, directory)
        return
    old = tempfile.mkdtemp(prefix=".export-old-", dir=os.path.dirname(directory) or ".")
    os.rmdir(old)
    os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old)


def export(directory: str, model_name: str, model_kwargs: Mapping[str, Any], num_classes: int,
           variables: Mapping[str, Any], quant_config: Mapping[str, Any] | None,
           activation_ranges: Mapping[str, Any] | None, metrics: Mapping[str, Any], *,
           input_shape: tuple[int, ...], overwrite: bool = False) -> dict[str, Any]:
    """Writes the artifact of a trained model to ``directory``; returns its manifest.

    Args:
      directory: created; an existing non-empty directory is refused unless ``overwrite``
        (then it is replaced only once the new artifact is completely written).
      model_name, model_kwargs, num_classes: as for ``jaxkd.models.get_model``.
      variables: ``{'params': ..., ['batch_stats': ...]}`` (LSQ steps, if any, are used).
      quant_config: a ``config.quantization`` block, or None for a float32 artifact.
      activation_ranges: ``quant.calibrate`` output, for static activation scales; None
        quantizes activations dynamically (per batch) unless LSQ learned their step.
      metrics: JSON-serialisable numbers to record (e.g. the eval accuracy).
      input_shape: one example's shape, e.g. ``(40,)``: traces the model's layer order.
    """
    _prepare_directory(directory, overwrite)
    model = models.get_model(model_name, num_classes=num_classes, **dict(model_kwargs))
    flat = _flat_variables(variables)
    int_blob, float_blob = _Blob(INT_FILE), _Blob(FLOAT_FILE)
    layers: list[dict[str, Any]] = []
    quantized: set[tuple[str, ...]] = set()
    settings = None
    if quant_config is not None:
        settings = quant.settings(quant_config)
        sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        layer_plan = quant.plan(model, variables, sample, settings)
        kernels = quant.quantize_params(variables["params"], settings, layer_plan=layer_plan)
        for path, lp in layer_plan.items():
            qk = kernels[path]
            entry: dict[str, Any] = {
                "path": path, "kind": lp.kind, "weight_bits": qk.bits,
                "kernel": int_blob.add(pack(qk.values, qk.bits), dtype="uint8"),
                "kernel_shape": list(qk.values.shape),
                "scale": float_blob.add(qk.scale, dtype="float32"),
                "zero_point": (int_blob.add(qk.zero_point, dtype="int8")
                               if np.any(qk.zero_point) else None),
                "activation": _activation_entry(path, lp, settings, flat, activation_ranges),
            }
            layers.append(entry)
            quantized.add(("params", *path.split("/"), "kernel"))
    float_tensors = []
    for key, value in flat.items():
        if key in quantized or key[-1] in quant.STEP_NAMES:
            continue
        float_tensors.append({"collection": key[0], "path": "/".join(key[1:]),
                              **float_blob.add(value, dtype="float32")})
    manifest = {
        "format": FORMAT,
        "jaxkd_version": jaxkd.__version__,
        "model": {"name": model_name, "kwargs": dict(model_kwargs),
                  "num_classes": int(num_classes), "input_shape": list(input_shape)},
        "quantization": settings.to_dict() if settings else None,
        "layers": layers,
        "float_tensors": float_tensors,
        "metrics": dict(metrics),
        "files": {},
    }
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        for blob in (int_blob, float_blob):
            manifest["files"][blob.name] = blob.write(tmp)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            # Compact (one line): on a 5k-parameter model the manifest is a third of the bytes.
            json.dump(manifest, f, sort_keys=True, separators=(",", ":"), default=_json_default)
        _prepare_directory(directory, overwrite)  # still free to write?
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_manifest(directory)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    return str(value)


def artifact_bytes(directory: str) -> int:
    """Bytes on disk of every file of an artifact, the manifest included."""
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)
               if os.path.isfile(os.path.join(directory, n)))


# ----------------------------------------------------------------------------- reading


def read_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: is {directory!r} a jaxkd export?")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify(directory: str) -> dict[str, Any]:
    """Checks the size and sha256 of every file the manifest lists; returns the manifest.

    Raises:
      FileNotFoundError: one line naming the missing file.
      ArtifactError: one line naming the file whose bytes do not match the manifest.
    """
    manifest = read_manifest(directory)
    for name, expected in sorted(manifest["files"].items()):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (listed in {MANIFEST})")
        with open(path, "rb") as f:
            data = f.read()
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != expected["bytes"] or digest != expected["sha256"]:
            raise ArtifactError(
                f"{path} does not match {MANIFEST}: {len(data)} bytes, sha256 {digest[:16]}..., "
                f"expected {expected['bytes']} bytes, sha256 {expected['sha256'][:16]}..."
            )
    return manifest


def _read(files: Mapping[str, bytes], entry: Mapping[str, Any]) -> np.ndarray:
    data = files[entry["file"]][entry["offset"]:entry["offset"] + entry["nbytes"]]
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    return np.frombuffer(data, dtype).astype(entry["dtype"]).reshape(entry["shape"])


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


def load(directory: str, *, check: bool = True
         ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
    """``(predict_fn, manifest)``: ``predict_fn(x) -> logits [B, num_classes]`` (jitted).

    Files are checked against the manifest first (``verify``) unless ``check=False``.
    Quantized layers run the integer path (``integer_layer``); the rest runs in float32.
    """
    manifest = verify(directory) if check else read_manifest(directory)
    files = {}
    for name in manifest["files"]:
        with open(os.path.join(directory, name), "rb") as f:
            files[name] = f.read()
    spec = manifest["model"]
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    flat = {(t["collection"], *t["path"].split("/")): _read(files, t)
            for t in manifest["float_tensors"]}
    variables = traverse_util.unflatten_dict(flat)
    layers = {}
    for entry in manifest["layers"]:
        path = entry["path"]
        packed = _read(files, entry["kernel"])
        shape = tuple(entry["kernel_shape"])
        values = unpack(packed, entry["weight_bits"], math.prod(shape)).reshape(shape)
        zero_point = _read(files, entry["zero_point"]) if entry["zero_point"] else None
        layers[path] = {
            "values": jnp.asarray(values, jnp.int8),
            "scale": jnp.asarray(_read(files, entry["scale"]), jnp.float32),
            "zero_point": None if zero_point is None else jnp.asarray(zero_point, jnp.int8),
            "bias": flat.get(("params", *path.split("/"), "bias")),
            "activation": entry["activation"],
        }

    def integer_path(next_fun, args, kwargs, context):
        found = quant.layer_of(context)
        if found is None or found[0] not in layers:
            return next_fun(*args, **kwargs)
        return integer_layer(context.module, args[0], layers[found[0]])

    def predict(x):
        with nn.intercept_methods(integer_path):
            return model.apply(variables, x, train=False)

    return jax.jit(predict), manifest


def evaluate(predict_fn: Callable[[jax.Array], jax.Array], batches: Iterable[Mapping[str, Any]]
             ) -> dict[str, float]:
    """Accuracy of ``predict_fn`` over ``batches`` (``image``, ``label``, optional ``mask``)
    and its mean wall time per batch in ms, the first (compiling) batch excluded."""
    correct = count = 0.0
    times = []
    for batch in batches:
        start = time.perf_counter()
        logits = jax.block_until_ready(predict_fn(batch["image"]))
        times.append(time.perf_counter() - start)
        mask = np.asarray(batch.get("mask", np.ones(len(batch["label"]))), np.float64)
        hits = np.asarray(np.argmax(logits, -1) == np.asarray(batch["label"]), np.float64)
        correct += float((hits * mask).sum())
        count += float(mask.sum())
    timed = times[1:] or times
    return {"accuracy": correct / count if count else float("nan"), "num_examples": count,
            "eval_latency_ms": 1000.0 * float(np.mean(timed)) if timed else float("nan")}


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.export",
                                     description="Checks an exported jaxkd artifact.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("verify", help="check every file against manifest.json (sha256)")
    check.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        manifest = verify(args.directory)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.directory}: {len(manifest['files'])} files match {MANIFEST} "
          f"({artifact_bytes(args.directory)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
