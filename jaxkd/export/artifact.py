"""The artifact on disk: write it, check it against its manifest, read it back and run it.

``export(directory, ...)`` writes::

    directory/
      manifest.json       model (name, kwargs, num_classes, input_shape), jaxkd version,
                          quantization settings, per-layer tensor index, storage summary,
                          metrics, and the size, sha256 and codec of every other file
      int_weights.bin     every integer payload: quantized values (int8, or int4 / int2
                          packed two / four per byte by :mod:`jaxkd.bitpack`), the int8 zero
                          points of asymmetric kernels, and the sparsity and codebook
                          structure of every tensor (bitmasks, CSR row pointers and column
                          indices, packed codebook indices)
      float_tensors.bin   float32, little-endian: the stored values and codebooks of the
                          float tensors (weight scales, biases, BatchNorm parameters and
                          statistics, the kernels of layers that are not quantized)
      lineage.json        where the model came from (:mod:`jaxkd.export.lineage`), pinned by
                          its size and sha256 in ``manifest["lineage"]``; provenance, so
                          ``artifact_bytes`` (the model's bytes on disk) leaves it out

The rule is by dtype: float32 arrays go to ``float_tensors.bin``, every other array
(uint8 / uint16 / uint32) to ``int_weights.bin``. Raw little-endian bytes indexed by
``manifest.json``: reading them needs ``json``, ``zlib`` and ``numpy`` only, never pickle.
Each tensor is stored in its smallest encoding (:mod:`jaxkd.export.encoding`); a tensor's
manifest entry is ``{"enc": "bitmask+codebook", "shape": [...], "bits": b (integer tensors
only), "u": codebook size (codebooks only), PART: [offset, nbytes (, dtype)], ...}``, each
part the bytes at ``offset`` of its file (after decompression). ``manifest["storage"]`` is
``{"encodings": {encoding: [tensors, bytes]}, "weights": W, "nonzero_weights": N}``: how
many tensors each encoding stores and their bytes (before entropy coding), and how many
kernel weights there are and how many are not zero (a quantized weight is zero when its
integer is the zero point); see ``storage_report``.

**Entropy coding** (Deep Compression's last stage; ``export(..., entropy_coding=True)``):
each ``.bin`` file is compressed with ``zlib`` (level 9) when, and only when, that makes
it smaller; ``files[name]`` gives its ``codec`` (``"zlib"`` or ``"none"``) and the size and
sha256 of the bytes on disk (plus ``raw_bytes`` after decompression for ``"zlib"``).

``load(directory)`` checks every file against the manifest (``verify``), decodes every
tensor back to its exact dense array (``read_tensor``), rebuilds the model by its registry
name (:func:`jaxkd.models.get_model`) and returns ``(predict_fn, manifest)``:
``predict_fn(x) -> logits`` runs the integer path (:mod:`jaxkd.export.integer`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

import jaxkd
from jaxkd import files, models, quant
from jaxkd.config import Quantization
from jaxkd.export import integer
from jaxkd.export.encoding import (
    ENCODINGS,
    INDEX_DTYPES,
    PARTS,
    ArtifactError,
    check_encodings,
    choose_encoding,
    decode,
    encode,
)
from jaxkd.schema import MissingError

FORMAT = "jaxkd.export/2"
MANIFEST = "manifest.json"
LINEAGE = "lineage.json"
INT_FILE = "int_weights.bin"
FLOAT_FILE = "float_tensors.bin"
CODECS = ("none", "zlib")


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

    def write(self, directory: epath.Path, entropy_coding: bool) -> dict[str, dict[str, Any]]:
        """Writes the files (zlib-compressed where that is smaller, with ``entropy_coding``);
        returns their ``manifest["files"]`` entries."""
        entries = {}
        for name, blob in self.blobs.items():
            data = raw = b"".join(blob.chunks)
            codec = "none"
            if entropy_coding:
                packed = zlib.compress(raw, 9)
                if len(packed) < len(raw):
                    data, codec = packed, "zlib"
            files.write_bytes(directory / name, data)
            entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                             "codec": codec}
            if codec != "none":
                entries[name]["raw_bytes"] = len(raw)
        return entries


def _flat_variables(variables: Mapping[str, Any]) -> dict[tuple[str, ...], np.ndarray]:
    host = jax.device_get(dict(variables))
    flat = traverse_util.flatten_dict(dict(host))
    return {tuple(str(p) for p in k): np.asarray(v) for k, v in flat.items()}


def _activation_entry(path: str, lp: quant.LayerPlan, settings: Quantization,
                      flat: Mapping[tuple[str, ...], np.ndarray],
                      activation_ranges: Mapping[str, Any] | None) -> dict[str, Any]:
    """How the integer runtime quantizes a layer's input: ``bits`` (0: the input stays
    float, weight-only), the int8 ``q_min``/``q_max``/``zero_point`` of its grid and the
    static ``scale`` (None: per batch, when no range was given)."""
    bits = lp.activation_bits
    if not bits:
        return {"bits": 0, "source": "float"}
    if activation_ranges is not None and path not in activation_ranges:
        raise ValueError(f"activation_ranges has no range for layer {path!r}; "
                         f"it has: {', '.join(sorted(activation_ranges))}")
    observed = None if activation_ranges is None else activation_ranges[path]
    if isinstance(observed, Mapping):
        lo, hi, unsigned = (float(observed["lo"]), float(observed["hi"]),
                            bool(observed["unsigned"]))
    elif observed is not None:  # (lo, hi) of quant.calibrate
        lo, hi = (float(v) for v in observed)
        unsigned = lo >= 0
    step = flat.get(("params", *path.split("/"), quant.INPUT_STEP))
    if settings.method == "lsq" and step is not None:
        unsigned = observed is not None and unsigned
        q_min, q_max = quant.lsq_activation_range(bits, unsigned=unsigned)
        scale, source = float(quant.lsq_step(step)), "lsq"
    elif observed is None:
        q_min, q_max = quant.int_range(bits, symmetric=True)
        scale, source, unsigned = None, "dynamic", False
    else:
        q_min, q_max = quant.activation_grid(bits, unsigned=unsigned)
        scale = float(quant.activation_scale(lo, hi, bits=bits, unsigned=unsigned))
        source = "static"
    shift = max(q_max - 127, 0)  # an unsigned 8-bit grid [0, 255] is stored as int8
    return {"bits": bits, "q_min": q_min - shift, "q_max": q_max - shift, "zero_point": -shift,
            "scale": scale, "unsigned": unsigned, "source": source}


def _prepare_directory(directory: epath.Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and list(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} exists and is not empty: choose a new directory or pass overwrite=True"
        )


def _move_into_place(tmp: epath.Path, directory: epath.Path) -> None:
    if not directory.exists():
        tmp.rename(directory)
        return
    old = directory.with_name(f".export-old-{uuid.uuid4().hex}")
    directory.rename(old)
    tmp.rename(directory)
    old.rmtree()


def export(directory: str, model_name: str, model_kwargs: Mapping[str, Any], num_classes: int,
           variables: Mapping[str, Any], quantization: Quantization | Mapping[str, Any] | None,
           activation_ranges: Mapping[str, Any] | None, metrics: Mapping[str, Any], *,
           input_shape: tuple[int, ...], overwrite: bool = False,
           encodings: Sequence[str] | None = None, entropy_coding: bool = False,
           lineage: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes the artifact of a trained model to ``directory``; returns its manifest.

    Args:
      directory: created; an existing non-empty directory is refused unless ``overwrite``
        (then it is replaced only once the new artifact is completely written).
      model_name, model_kwargs, num_classes: as for ``jaxkd.models.get_model``.
      variables: ``{'params': ..., ['batch_stats': ...]}`` (LSQ steps, if any, are used).
      quantization: a :class:`jaxkd.config.Quantization` (or its fields), or None for a
        float32 artifact.
      activation_ranges: per layer, ``(lo, hi)`` (``quant.calibrate``; a non-negative
        range gets the unsigned grid) or QAT's observers ``{'lo', 'hi', 'unsigned'}``, for
        static activation scales; None quantizes activations per batch unless LSQ learned
        their step.
      metrics: JSON-serialisable numbers to record (e.g. the eval accuracy).
      input_shape: one example's shape, e.g. ``(40,)``: traces the model's layer order.
      encodings: the tensor encodings to choose from (``ENCODINGS``, the default: all);
        ``("dense+raw",)`` stores every tensor element by element.
      entropy_coding: zlib-compress each ``.bin`` file that gets smaller by it.
      lineage: where the model came from (:func:`jaxkd.export.lineage.of_run`), written
        to ``lineage.json`` beside the tensors; the manifest pins it by size and sha256.
    """
    directory = files.path(directory)
    _prepare_directory(directory, overwrite)
    writer = _Writer(check_encodings(encodings))
    model = models.get_model(model_name, num_classes=num_classes, **dict(model_kwargs))
    flat = _flat_variables(variables)
    layers: list[dict[str, Any]] = []
    quantized: set[tuple[str, ...]] = set()
    weights = nonzero_weights = 0
    settings = None
    if quantization is not None:
        settings = quant.settings(quantization)
        sample = (jax.ShapeDtypeStruct((1, *input_shape), models.input_dtype(model)),
                  ) * len(models.input_names(model))
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
            quantized.add(("params", *path.split("/"), lp.param))
            if lp.kind == quant.EMBED:  # a table, not among the weights that sparsity counts
                continue
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
        "lineage": None,
        "files": {},
    }
    # Everything goes to a fresh directory beside the target, renamed into place at the end.
    tmp = files.makedirs(directory.parent).joinpath(f".export-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        manifest["files"] = writer.write(tmp, entropy_coding)
        if lineage is not None:
            files.write_json(tmp / LINEAGE, dict(lineage), compact=True, sort_keys=True,
                             default=_json_default)
            data = (tmp / LINEAGE).read_bytes()
            manifest["lineage"] = {"file": LINEAGE, "bytes": len(data),
                                   "sha256": hashlib.sha256(data).hexdigest()}
        # Compact (one line): on a 5k-parameter model the manifest is a third of the bytes.
        files.write_json(tmp / MANIFEST, manifest, compact=True, sort_keys=True,
                         default=_json_default)
        _prepare_directory(directory, overwrite)  # still free to write?
        _move_into_place(tmp, directory)
    except BaseException:
        if tmp.exists():
            tmp.rmtree()
        raise
    return read_manifest(directory)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    return str(value)


def artifact_bytes(directory: str) -> int:
    """Bytes on disk of the model: the manifest and the tensor files it lists.

    Provenance is not the model and is left out: ``lineage.json`` (whose size grows with
    every stage a model descends from) and a signature (:mod:`jaxkd.export.signing`).
    """
    manifest = read_manifest(directory)
    return os.path.getsize(os.path.join(directory, MANIFEST)) + sum(
        os.path.getsize(os.path.join(directory, name)) for name in manifest["files"])


def read_lineage(directory: str) -> dict[str, Any] | None:
    """The artifact's lineage (:mod:`jaxkd.export.lineage`), checked against the size and
    sha256 its manifest records; None for an artifact exported without one."""
    entry = read_manifest(directory).get("lineage")
    if not entry:
        return None
    if "file" not in entry:  # written by jaxkd 0.1.0 before lineage.json: in the manifest
        return dict(entry)
    _check_file(directory, entry["file"], entry)
    with open(os.path.join(directory, entry["file"])) as f:
        return json.load(f)


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
        raise MissingError(f"{path} is missing: is {directory!r} a jaxkd export?")
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
        _check_file(directory, name, expected)
    if manifest.get("lineage") and "file" in manifest["lineage"]:
        _check_file(directory, manifest["lineage"]["file"], manifest["lineage"])
    return manifest


def _check_file(directory: str, name: str, expected: Mapping[str, Any]) -> None:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise MissingError(f"{path} is missing (listed in {MANIFEST})")
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != expected["bytes"] or digest != expected["sha256"]:
        raise ArtifactError(
            f"{path} does not match {MANIFEST}: {len(data)} bytes, sha256 {digest[:16]}..., "
            f"expected {expected['bytes']} bytes, sha256 {expected['sha256'][:16]}..."
        )


def read_files(directory: str, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """The decompressed bytes of every file the manifest lists."""
    contents = {}
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
        contents[name] = data
    return contents


def read_tensor(contents: Mapping[str, bytes], entry: Mapping[str, Any]) -> np.ndarray:
    """The dense tensor of one manifest entry (int8 with ``bits``, else float32), from the
    (decompressed) ``contents`` bytes by name."""
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
        data = contents[file][offset:offset + nbytes]
        if len(data) != nbytes or nbytes % np.dtype(dtype).itemsize:
            raise ArtifactError(f"part {name!r} [{offset}, +{nbytes}) of {file} is not "
                                f"whole {dtype} values inside its {len(contents[file])} bytes")
        parts[name] = np.frombuffer(data, np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return decode(parts, entry)


def integer_kernels(directory: str) -> dict[str, dict[str, Any]]:
    """``{layer: {'values': int8 array, 'bits': b}}``: the integer kernels of an artifact as
    stored (decoded, after ``verify``), for checks such as ``jaxkd.compression``'s."""
    manifest = verify(directory)
    contents = read_files(directory, manifest)
    return {e["path"]: {"values": read_tensor(contents, e["kernel"]), "bits": e["weight_bits"]}
            for e in manifest["layers"]}


def load(directory: str, *, check: bool = True
         ) -> tuple[Callable[[jax.Array], jax.Array], dict[str, Any]]:
    """``(predict_fn, manifest)``: ``predict_fn(x) -> logits [B, num_classes]`` (a jitted
    function of the weights, on the default device, and the inputs).

    Files are checked against the manifest first (``verify``) unless ``check=False``.
    Quantized layers run the integer path (:mod:`jaxkd.export.integer`); the rest runs in
    float32.
    """
    manifest = verify(directory) if check else read_manifest(directory)
    contents = read_files(directory, manifest)
    spec = manifest["model"]
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    flat = {(t["collection"], *t["path"].split("/")): read_tensor(contents, t)
            for t in manifest["float_tensors"]}
    variables = traverse_util.unflatten_dict(flat)
    arrays: dict[str, np.ndarray] = {}  # the integer kernels: arguments of the jit
    kinds: dict[str, dict[str, Any]] = {}  # the rest, per channel at most: constants
    for entry in manifest["layers"]:
        path = entry["path"]
        zero_point = read_tensor(contents, entry["zero_point"]) if entry["zero_point"] else None
        arrays[path] = np.asarray(read_tensor(contents, entry["kernel"]), np.int8)
        kinds[path] = {
            "scale": jnp.asarray(read_tensor(contents, entry["scale"]), jnp.float32),
            "zero_point": None if zero_point is None else jnp.asarray(zero_point, jnp.int8),
            "kind": entry["kind"],
            "bias": flat.get(("params", *path.split("/"), "bias")),
            "activation": entry["activation"],
        }

    def apply(variables, arrays, *inputs):
        layers = {path: {"values": arrays[path], **kinds[path]} for path in arrays}
        return integer.integer_apply(model, variables, layers)(*inputs)

    # The weights are arguments, not constants of the trace: XLA would constant-fold
    # them (an embedding gather over the whole table takes minutes to compile).
    weights = jax.device_put((variables, arrays))
    return functools.partial(jax.jit(apply), *weights), manifest
