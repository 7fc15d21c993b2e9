"""A compressed-model artifact that loads without executing code and runs integer matmuls.

``export(directory, ...)`` writes::

    directory/
      manifest.json       model (name, kwargs, num_classes, input_shape), jaxkd version,
                          quantization settings, per-layer tensor index, storage summary,
                          metrics, and the size, sha256 and codec of every other file
      int_weights.bin     every integer payload: quantized values (int8, or int4 / int2
                          packed two / four per byte: two's complement, low bits first, see
                          ``pack``), the int8 zero points of asymmetric kernels, and the
                          sparsity and codebook structure of every tensor (bitmasks, CSR row
                          pointers and column indices, packed codebook indices)
      float_tensors.bin   float32, little-endian: the stored values and codebooks of the
                          float tensors (weight scales, biases, BatchNorm parameters and
                          statistics, the kernels of layers that are not quantized)

The rule is by dtype: float32 arrays go to ``float_tensors.bin``, every other array
(uint8 / uint16 / uint32) to ``int_weights.bin``. Raw little-endian bytes indexed by
``manifest.json``: reading them needs ``json``, ``zlib`` and ``numpy`` only, never pickle.

**Tensor encodings.** Every tensor is written in whichever of six encodings takes the
fewest bytes (``encoded_nbytes``; ties go to the simpler: dense before bitmask before csr,
raw before codebook), so pruned kernels (exact zeros) and clustered ones (Han, Mao &
Dally, "Deep Compression", ICLR 2016: at most ``k + 1`` distinct values) are stored
compactly. An encoding is ``POSITIONS+VALUES``:

- positions: ``dense`` (every element), ``bitmask`` (one bit per element, set where the
  element is nonzero, packed little-endian like ``sharing.pack_indices(..., 1)``; only the
  nonzeros are stored) or ``csr`` (the tensor as a ``[prod(shape[:-1]), shape[-1]]``
  matrix: row pointers and column indices, each uint8/16/32, the smallest that holds its
  largest value; only the nonzeros are stored, row-major). A float is "zero" when all its
  bits are (so ``-0.0`` is stored and every tensor round-trips bit for bit).
- values of the stored elements: ``raw`` (integers packed at the kernel's bits, floats as
  float32) or ``codebook`` (the sorted distinct stored values, raw, and each element's
  index in them packed at ``sharing.index_bits(u)`` bits by ``sharing.pack_indices``).

A tensor's manifest entry is ``{"enc": "bitmask+codebook", "shape": [...], "bits": b
(integer tensors only), "u": codebook size (codebooks only), PART: [offset, nbytes
(, dtype)], ...}``; its parts are ``mask``, ``ptr``, ``col`` (these two with their
dtype), ``val``, ``cb`` and ``idx``, each the bytes at ``offset`` of its file (after
decompression). ``manifest["storage"]`` is ``{"encodings": {encoding: [tensors,
bytes]}, "weights": W, "nonzero_weights": N}``: how many tensors each encoding stores and
their bytes (before entropy coding), and how many kernel weights there are and how many
are not zero (a quantized weight is zero when its integer is the zero point); see
``storage_report``.

**Entropy coding** (Deep Compression's last stage; ``export(..., entropy_coding=True)``):
each ``.bin`` file is compressed with ``zlib`` (level 9) when, and only when, that makes
it smaller; ``files[name]`` gives its ``codec`` (``"zlib"`` or ``"none"``) and the size and
sha256 of the bytes on disk (plus ``raw_bytes`` after decompression for ``"zlib"``).

``load(directory)`` checks every file against the manifest (``verify``), decodes every
tensor back to its exact dense array (``read_tensor``), rebuilds the model by name and
returns ``predict_fn(x) -> logits`` that runs the **integer path**: each
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
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.linen.linear import canonicalize_padding

import jaxkd
from jaxkd import models, quant, sharing

FORMAT = "jaxkd.export/2"
MANIFEST = "manifest.json"
INT_FILE = "int_weights.bin"
FLOAT_FILE = "float_tensors.bin"
CODECS = ("none", "zlib")
POSITIONS = ("dense", "bitmask", "csr")
VALUE_CODINGS = ("raw", "codebook")
# Every encoding, simplest first: ties between equal byte counts go to the earlier one.
ENCODINGS = tuple(f"{p}+{v}" for p in POSITIONS for v in VALUE_CODINGS)
PARTS = ("mask", "ptr", "col", "val", "cb", "idx")
INDEX_DTYPES = ("uint8", "uint16", "uint32")


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


# ----------------------------------------------------------------------------- encoding


def index_dtype(max_value: int) -> np.dtype:
    """The smallest of uint8, uint16, uint32 that holds ``max_value`` (CSR indices)."""
    for name in INDEX_DTYPES:
        if max_value <= np.iinfo(name).max:
            return np.dtype(name)
    raise ValueError(f"{max_value} does not fit in uint32: the tensor is too large for CSR")


def _flat(values: Any, bits: int | None) -> np.ndarray:
    if bits is None:
        return np.asarray(values, np.float32).reshape(-1)
    quant.check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"a tensor of {bits}-bit integers must have an integer dtype, "
                         f"got {flat.dtype}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(f"values outside [{lo}, {hi}] do not fit in {bits} bits")
    return flat.astype(np.int8)


def _nonzero(flat: np.ndarray, bits: int | None) -> np.ndarray:
    """Where the elements are nonzero; a float is zero only when all its bits are."""
    return (flat.view(np.uint32) if bits is None else flat) != 0


def _grid(shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, columns)`` of the CSR view ``[prod(shape[:-1]), shape[-1]]`` (a scalar is
    ``[1, 1]``)."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)


def _distinct(stored: np.ndarray, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of ``stored`` and each element's index in them; floats
    are told apart by their bits (``-0.0 != 0.0``, every NaN kept as it is)."""
    if bits is not None:
        codebook, inverse = np.unique(stored, return_inverse=True)
        return codebook.astype(np.int8), inverse.reshape(-1)
    keys, inverse = np.unique(stored.view(np.uint32), return_inverse=True)
    order = np.lexsort((keys, keys.view(np.float32)))  # by value, then by bits
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return keys[order].view(np.float32), rank[inverse.reshape(-1)]


def _count_distinct(stored: np.ndarray, bits: int | None) -> int:
    if bits is not None:
        return int(np.count_nonzero(np.bincount(stored.astype(np.int16) + 128, minlength=256)))
    return int(np.unique(stored.view(np.uint32)).size)


def raw_nbytes(count: int, bits: int | None) -> int:
    """Bytes of ``count`` raw values: ``ceil(count * bits / 8)``, or ``4 count`` (float32)."""
    return 4 * count if bits is None else math.ceil(count * bits / 8)


def encoded_nbytes(values: Any, *, bits: int | None = None) -> dict[str, int]:
    """Bytes of ``values`` in every encoding: ``{"dense+raw": ..., "csr+codebook": ...}``.

    ``bits``: the width of an integer tensor (8, 4 or 2); None for float32. With ``n``
    elements, ``m`` nonzeros, ``b`` bits per raw value (32 for floats), ``u`` distinct
    stored values (of all ``n`` elements for dense, of the ``m`` nonzeros otherwise) and the
    CSR view ``[R, C]``::

        dense     = 0                                      (n elements stored)
        bitmask   = ceil(n / 8)                            (m elements stored)
        csr       = (R + 1) size(ptr) + m size(col)        (m elements stored)
        raw       = ceil(stored b / 8)
        codebook  = ceil(u b / 8) + ceil(stored index_bits(u) / 8)

    where ``size(ptr)`` is the bytes of the smallest unsigned dtype holding ``m`` and
    ``size(col)`` that of the largest column index; an encoding's bytes are its positions'
    plus its values'.
    """
    shape = np.shape(values)
    flat = _flat(values, bits)
    nonzero = _nonzero(flat, bits)
    n, m = flat.size, int(nonzero.sum())
    rows, cols = _grid(shape)
    max_col = int((np.flatnonzero(nonzero) % max(cols, 1)).max()) if m else 0
    csr = (rows + 1) * index_dtype(m).itemsize + m * index_dtype(max_col).itemsize
    stored = {"dense": (n, _count_distinct(flat, bits), 0),
              "bitmask": (m, None, math.ceil(n / 8)), "csr": (m, None, csr)}
    distinct_nonzero = _count_distinct(flat[nonzero], bits)
    sizes = {}
    for position, (count, distinct, overhead) in stored.items():
        u = distinct_nonzero if distinct is None else distinct
        sizes[f"{position}+raw"] = overhead + raw_nbytes(count, bits)
        sizes[f"{position}+codebook"] = (overhead + raw_nbytes(u, bits)
                                         + math.ceil(count * sharing.index_bits(u) / 8))
    return sizes


def choose_encoding(values: Any, *, bits: int | None = None,
                    allowed: Sequence[str] = ENCODINGS) -> str:
    """The encoding of ``allowed`` with the fewest bytes (``encoded_nbytes``); ties go to
    the one earliest in ``ENCODINGS`` (the simpler)."""
    allowed = check_encodings(allowed)
    sizes = encoded_nbytes(values, bits=bits)
    return min((e for e in ENCODINGS if e in allowed), key=sizes.__getitem__)


def check_encodings(encodings: Sequence[str] | None) -> tuple[str, ...]:
    """``encodings`` (None: all of them) as a tuple, or a ValueError naming the allowed."""
    if encodings is None:
        return ENCODINGS
    encodings = (encodings,) if isinstance(encodings, str) else tuple(encodings)
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown or not encodings:
        raise ValueError(f"encodings={list(encodings)!r}: each must be one of "
                         f"{', '.join(ENCODINGS)} (and at least one given)")
    return encodings


def _raw(stored: np.ndarray, bits: int | None) -> np.ndarray:
    return stored.astype(np.float32) if bits is None else pack(stored, bits)


def _unraw(data: np.ndarray, count: int, bits: int | None, part: str) -> np.ndarray:
    expected = raw_nbytes(count, bits)
    if data.nbytes != expected:
        raise ArtifactError(f"part {part!r} has {data.nbytes} bytes, expected {expected} "
                            f"for {count} values")
    return np.asarray(data, np.float32) if bits is None else unpack(data, bits, count)


def encode(values: Any, *, bits: int | None = None, encoding: str | None = None
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(parts, meta)``: ``values`` in ``encoding`` (None: ``choose_encoding``).

    ``parts`` maps part names (``PARTS``) to 1-D arrays (``mask``, ``idx``: uint8 bit
    streams; ``ptr``, ``col``: uint8/16/32; ``val``, ``cb``: float32, or uint8 holding
    ``pack(..., bits)``); their total bytes are ``encoded_nbytes(values)[encoding]``.
    ``meta``: ``{"enc", "shape", ["bits"], ["u"]}``, all ``decode`` needs besides the parts.
    """
    encoding = choose_encoding(values, bits=bits) if encoding is None else encoding
    check_encodings([encoding])
    position, coding = encoding.split("+")
    shape = list(np.shape(values))
    flat = _flat(values, bits)
    parts: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"enc": encoding, "shape": shape}
    if bits is not None:
        meta["bits"] = int(bits)
    nonzero = _nonzero(flat, bits)
    stored = flat if position == "dense" else flat[nonzero]
    if position == "bitmask":  # == sharing.pack_indices(nonzero, 1)
        parts["mask"] = np.packbits(nonzero, bitorder="little")
    elif position == "csr":
        rows, cols = _grid(shape)
        row, col = np.divmod(np.flatnonzero(nonzero), max(cols, 1))
        ptr = np.zeros(rows + 1, np.int64)
        ptr[1:] = np.cumsum(np.bincount(row, minlength=rows))
        parts["ptr"] = ptr.astype(index_dtype(stored.size))
        parts["col"] = col.astype(index_dtype(int(col.max()) if col.size else 0))
    if coding == "raw":
        parts["val"] = _raw(stored, bits)
    else:
        codebook, indices = _distinct(stored, bits)
        meta["u"] = int(codebook.size)
        parts["cb"] = _raw(codebook, bits)
        parts["idx"] = sharing.pack_indices(indices, sharing.index_bits(codebook.size))
    return parts, meta


def decode(parts: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> np.ndarray:
    """Inverse of ``encode``: the dense tensor, int8 (``meta`` has ``bits``) or float32."""
    position, coding = str(meta["enc"]).split("+")
    shape = tuple(meta["shape"])
    bits = meta.get("bits")
    n = math.prod(shape)
    if position == "dense":
        count = n
    elif position == "bitmask":
        if parts["mask"].size != math.ceil(n / 8):
            raise ArtifactError(f"part 'mask' has {parts['mask'].size} bytes, expected "
                                f"{math.ceil(n / 8)} for {n} elements")
        nonzero = np.unpackbits(parts["mask"], count=n, bitorder="little").astype(bool)
        count = int(nonzero.sum())
    else:
        rows, cols = _grid(shape)
        ptr = np.asarray(parts["ptr"], np.int64)
        col = np.asarray(parts["col"], np.int64)
        count = col.size
        if (ptr.size != rows + 1 or ptr[0] != 0 or ptr[-1] != count or np.any(np.diff(ptr) < 0)
                or (count and col.max() >= cols)):
            raise ArtifactError(f"parts 'ptr'/'col' are not a CSR index of a {rows}x{cols} "
                                f"matrix")
    if coding == "raw":
        stored = _unraw(parts["val"], count, bits, "val")
    else:
        u = int(meta["u"])
        codebook = _unraw(parts["cb"], u, bits, "cb")
        indices = sharing.unpack_indices(parts["idx"], sharing.index_bits(u), (count,))
        if count and indices.max() >= u:
            raise ArtifactError(f"part 'idx' points past the {u} codebook entries")
        stored = codebook[indices]
    if position == "dense":
        return stored.reshape(shape)
    out = np.zeros(n, stored.dtype)
    if position == "bitmask":
        out[nonzero] = stored
    else:
        out[np.repeat(np.arange(rows), np.diff(ptr)) * cols + col] = stored
    return out.reshape(shape)


# ----------------------------------------------------------------------------- writing


class _Blob:
    """Bytes of one tensor file."""

    def __init__(self, name: str):
        self.name = name
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, array: np.ndarray) -> list[int]:
        """Appends ``array`` (little-endian); returns its ``[offset, nbytes]``."""
        array = np.ascontiguousarray(array)
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        ref = [self.size, len(data)]
        self.chunks.append(data)
        self.size += len(data)
        return ref


class _Writer:
    """The two tensor files, and the storage summary of the tensors written to them."""

    def __init__(self, encodings: Sequence[str]):
        self.encodings = encodings
        self.blobs = {INT_FILE: _Blob(INT_FILE), FLOAT_FILE: _Blob(FLOAT_FILE)}
        self.by_encoding: dict[str, list[int]] = {}  # encoding: [tensors, bytes]

    def add(self, values: Any, *, bits: int | None = None) -> dict[str, Any]:
        """Writes one tensor in its smallest allowed encoding; returns its manifest entry."""
        encoding = choose_encoding(values, bits=bits, allowed=self.encodings)
        parts, entry = encode(values, bits=bits, encoding=encoding)
        for name, array in parts.items():
            file = FLOAT_FILE if array.dtype == np.float32 else INT_FILE
            entry[name] = self.blobs[file].add(array)
            if name in ("ptr", "col"):
                entry[name].append(array.dtype.name)
        total = self.by_encoding.setdefault(encoding, [0, 0])
        total[0] += 1
        total[1] += sum(int(a.nbytes) for a in parts.values())
        return entry

    def write(self, directory: str, entropy_coding: bool) -> dict[str, dict[str, Any]]:
        """Writes the files (zlib-compressed where that is smaller, with ``entropy_coding``);
        returns their ``manifest["files"]`` entries."""
        files = {}
        for name, blob in self.blobs.items():
            data = raw = b"".join(blob.chunks)
            codec = "none"
            if entropy_coding:
                packed = zlib.compress(raw, 9)
                if len(packed) < len(raw):
                    data, codec = packed, "zlib"
            with open(os.path.join(directory, name), "wb") as f:
                f.write(data)
            files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                           "codec": codec}
            if codec != "none":
                files[name]["raw_bytes"] = len(raw)
        return files


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
           input_shape: tuple[int, ...], overwrite: bool = False,
           encodings: Sequence[str] | None = None, entropy_coding: bool = False
           ) -> dict[str, Any]:
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
      encodings: the tensor encodings to choose from (``ENCODINGS``, the default: all);
        ``("dense+raw",)`` stores every tensor element by element.
      entropy_coding: zlib-compress each ``.bin`` file that gets smaller by it.
    """
    _prepare_directory(directory, overwrite)
    writer = _Writer(check_encodings(encodings))
    model = models.get_model(model_name, num_classes=num_classes, **dict(model_kwargs))
    flat = _flat_variables(variables)
    layers: list[dict[str, Any]] = []
    quantized: set[tuple[str, ...]] = set()
    weights = nonzero_weights = 0
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
                "kernel": writer.add(qk.values, bits=qk.bits),
                "scale": writer.add(qk.scale),
                "zero_point": (writer.add(qk.zero_point, bits=8)
                               if np.any(qk.zero_point) else None),
                "activation": _activation_entry(path, lp, settings, flat, activation_ranges),
            }
            layers.append(entry)
            quantized.add(("params", *path.split("/"), "kernel"))
            weights += qk.values.size
            # A weight is zero when its integer is the zero point.
            nonzero_weights += int(np.count_nonzero(
                qk.values.astype(np.int16) != qk.zero_point.astype(np.int16)))
    float_tensors = []
    for key, value in flat.items():
        if key in quantized or key[-1] in quant.STEP_NAMES:
            continue
        float_tensors.append({"collection": key[0], "path": "/".join(key[1:]),
                              **writer.add(value)})
        if key[0] == "params" and key[-1] == "kernel":
            weights += value.size
            nonzero_weights += int(np.count_nonzero(value))
    manifest = {
        "format": FORMAT,
        "jaxkd_version": jaxkd.__version__,
        "model": {"name": model_name, "kwargs": dict(model_kwargs),
                  "num_classes": int(num_classes), "input_shape": list(input_shape)},
        "quantization": settings.to_dict() if settings else None,
        "layers": layers,
        "float_tensors": float_tensors,
        "storage": {"encodings": writer.by_encoding, "weights": int(weights),
                    "nonzero_weights": int(nonzero_weights)},
        "metrics": dict(metrics),
        "files": {},
    }
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        manifest["files"] = writer.write(tmp, entropy_coding)
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


def storage_report(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """How an artifact stores its tensors, from its manifest (for reports and summaries).

    Returns ``encodings`` (``{encoding: {"tensors", "bytes"}}``, bytes before entropy
    coding), ``tensor_bytes`` (their sum), ``file_bytes`` (the ``.bin`` files on disk),
    ``codecs`` (``{file: codec}``), ``weights`` and ``nonzero_weights`` (kernel elements,
    and those not zero) and ``density`` (their ratio; None without kernels).
    """
    storage = manifest["storage"]
    encodings = {e: {"tensors": int(storage["encodings"][e][0]),
                     "bytes": int(storage["encodings"][e][1])}
                 for e in ENCODINGS if e in storage["encodings"]}
    weights, nonzero = int(storage["weights"]), int(storage["nonzero_weights"])
    return {
        "encodings": encodings,
        "tensor_bytes": sum(v["bytes"] for v in encodings.values()),
        "file_bytes": sum(int(f["bytes"]) for f in manifest["files"].values()),
        "codecs": {name: f["codec"] for name, f in sorted(manifest["files"].items())},
        "weights": weights,
        "nonzero_weights": nonzero,
        "density": nonzero / weights if weights else None,
    }


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


def _read_files(directory: str, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """The decompressed bytes of every file the manifest lists."""
    files = {}
    for name, entry in manifest["files"].items():
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
        codec = entry.get("codec")
        if codec == "zlib":
            try:
                data = zlib.decompress(data)
            except zlib.error as e:
                raise ArtifactError(f"{path} is not valid zlib data: {e}") from None
            if len(data) != entry["raw_bytes"]:
                raise ArtifactError(f"{path} decompresses to {len(data)} bytes, expected "
                                    f"{entry['raw_bytes']}")
        elif codec != "none":
            raise ArtifactError(f"{path}: codec {codec!r} in {MANIFEST} is not one of "
                                f"{', '.join(CODECS)}")
        files[name] = data
    return files


def read_tensor(files: Mapping[str, bytes], entry: Mapping[str, Any]) -> np.ndarray:
    """The dense tensor of one manifest entry (int8 with ``bits``, else float32), from the
    (decompressed) ``files`` bytes by name."""
    parts = {}
    for name in PARTS:
        if name not in entry:
            continue
        offset, nbytes, *dtype = entry[name]
        if dtype:
            dtype = dtype[0]
            if dtype not in INDEX_DTYPES:
                raise ArtifactError(f"part {name!r} has dtype {dtype!r}, not one of "
                                    f"{', '.join(INDEX_DTYPES)}")
        else:
            dtype = "float32" if "bits" not in entry and name in ("val", "cb") else "uint8"
        file = FLOAT_FILE if dtype == "float32" else INT_FILE
        data = files[file][offset:offset + nbytes]
        if len(data) != nbytes or nbytes % np.dtype(dtype).itemsize:
            raise ArtifactError(f"part {name!r} [{offset}, +{nbytes}) of {file} is not "
                                f"whole {dtype} values inside its {len(files[file])} bytes")
        parts[name] = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return decode(parts, entry)


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


def integer_kernels(directory: str) -> dict[str, dict[str, Any]]:
    """``{layer: {'values': int8 array, 'bits': b}}``: the integer kernels of an artifact as
    stored (decoded, after ``verify``), for checks such as ``jaxkd.compression``'s."""
    manifest = verify(directory)
    files = _read_files(directory, manifest)
    return {e["path"]: {"values": read_tensor(files, e["kernel"]), "bits": e["weight_bits"]}
            for e in manifest["layers"]}


def load(directory: str, *, check: bool = True
         ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
    """``(predict_fn, manifest)``: ``predict_fn(x) -> logits [B, num_classes]`` (jitted).

    Files are checked against the manifest first (``verify``) unless ``check=False``.
    Quantized layers run the integer path (``integer_layer``); the rest runs in float32.
    """
    manifest = verify(directory) if check else read_manifest(directory)
    files = _read_files(directory, manifest)
    spec = manifest["model"]
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    flat = {(t["collection"], *t["path"].split("/")): read_tensor(files, t)
            for t in manifest["float_tensors"]}
    variables = traverse_util.unflatten_dict(flat)
    layers = {}
    for entry in manifest["layers"]:
        path = entry["path"]
        zero_point = read_tensor(files, entry["zero_point"]) if entry["zero_point"] else None
        layers[path] = {
            "values": jnp.asarray(read_tensor(files, entry["kernel"]), jnp.int8),
            "scale": jnp.asarray(read_tensor(files, entry["scale"]), jnp.float32),
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
