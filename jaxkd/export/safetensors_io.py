"""An artifact's tensors, decoded to dense arrays, in one ``model.safetensors`` file.

The artifact (:mod:`jaxkd.export.artifact`) stores tensors packed (int4 / int2), sparse
(bitmask, CSR) and clustered (codebooks), readable by jaxkd. ``export_safetensors`` writes
the same tensors as plain dense arrays with the ``safetensors`` numpy API, so any
safetensors reader (numpy, PyTorch, Rust, ...) gets every number without jaxkd. The module
is named ``safetensors_io`` so that it does not shadow the ``safetensors`` package.

Names are Flax paths joined by dots; layouts are Flax's (a Dense kernel is
``[in, out]``, a Conv kernel ``[*window, in, out]``: output channels last):

- ``<collection>.<path>``: every float tensor of the artifact, float32, as stored: biases
  (``params.hidden1.bias``), BatchNorm parameters and statistics
  (``params.stem_bn.scale``, ``batch_stats.stem_bn.mean``, ``batch_stats.stem_bn.var``),
  and the kernels of layers that are not quantized (``params.stem.kernel``).
- for each quantized layer at Flax path ``P`` (its float kernel is ``params.P.kernel``):

  - ``params.P.weight_int``: int8, the kernel's shape: the integers as stored (int4 and
    int2 kernels unpacked to one sign-extended int8 per weight);
  - ``params.P.weight_scale``: float32, ``[C]`` (per output channel) or ``[]`` (per
    tensor);
  - ``params.P.weight_zero_point``: int8, the scale's shape; only for asymmetric kernels
    (absent: zero). The kernel is ``weight_scale * (weight_int - weight_zero_point)``;
  - ``params.P.input_scale`` (float32 ``[]``) and ``params.P.input_zero_point`` (int8
    ``[]``): the static grid on which the layer quantizes its input,
    ``q_x = clip(round(x / input_scale) + input_zero_point, q_min, q_max)`` with
    ``q_min``, ``q_max`` from the metadata's ``layers`` (an unsigned 8-bit grid ``[0,
    255]`` is stored as int8 ``[-128, 127]`` with zero point -128, as the integer runtime
    runs it). Absent when the input stays float (weight-only layers) and when its scale is
    computed per batch (``activation.source == "dynamic"``); then the layer computes
    ``y = s_x s_w sum_k (q_x - z_x)(q_w - z_w) + b`` (:mod:`jaxkd.export.integer`).
- with ``include_float=True``, also ``float.params.P.kernel``: float32, the dequantized
  kernel ``weight_scale * (weight_int - weight_zero_point)`` of each quantized layer, so
  that a float model is the file's ``params.*`` / ``batch_stats.*`` float tensors plus
  these kernels with ``float.`` stripped. Off by default: the file then holds exactly the
  numbers the integer runtime uses, and a float copy of every kernel would be ~4x their
  size.

The safetensors ``__metadata__`` (strings; JSON where a value is structured): ``format``
(``FORMAT``), ``artifact_format``, ``jaxkd_version``, ``model`` (the zoo name),
``model_kwargs`` (JSON), ``num_classes``, ``input_shape`` (JSON, one example),
``quantization`` (JSON of the settings, ``null`` for float32), ``layers`` (JSON:
``{P: {"kind", "weight_bits", "activation": the manifest's entry: bits, q_min, q_max,
zero_point, scale, unsigned, source}}``), ``include_float`` and ``manifest_sha256`` (of
the artifact's ``manifest.json``, naming the artifact the file was decoded from).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors.numpy import save

from jaxkd import files, quant
from jaxkd.export import artifact
from jaxkd.export.encoding import ArtifactError
from jaxkd.schema import ConfigError, MissingError

FILE = "model.safetensors"
FORMAT = "jaxkd.safetensors/1"
FLOAT_PREFIX = "float."


def tensor_name(collection: str, path: str, leaf: str | None = None) -> str:
    """``params.block1.conv1.bias``: a collection, a Flax path (``/``-separated) and an
    optional leaf, joined by dots."""
    return ".".join([collection, *path.split("/"), *([leaf] if leaf else [])])


def _array(value: Any, dtype: Any) -> np.ndarray:
    # np.ascontiguousarray would turn a 0-d scale into shape [1].
    return np.array(value, dtype=dtype, order="C")


def float_params(artifact_dir: str, manifest: Mapping[str, Any]
                 ) -> dict[tuple[str, ...], np.ndarray]:
    """The artifact's float model, by Flax parameter path: its float tensors and the
    dequantized kernels and tables of its quantized layers (what other runtimes that have
    no integer kernels load: HF, GGUF)."""
    tensors = dense_tensors(artifact_dir, manifest, include_float=True)
    flat = {}
    for name, value in tensors.items():
        if name.startswith(FLOAT_PREFIX):
            flat[name.removeprefix(FLOAT_PREFIX)] = value
        elif name.startswith("params.") and not name.endswith(
                (".weight_int", ".weight_scale", ".weight_zero_point", ".input_scale",
                 ".input_zero_point")):
            flat[name] = value
    return {tuple(n.removeprefix("params.").split(".")): v for n, v in flat.items()}


def dense_tensors(directory: str, manifest: Mapping[str, Any], *, include_float: bool = False
                  ) -> dict[str, np.ndarray]:
    """Every tensor of an artifact by its safetensors name (the module docstring's scheme),
    decoded from the files of ``directory`` that ``manifest`` lists (already verified)."""
    contents = artifact.read_files(directory, manifest)
    tensors: dict[str, np.ndarray] = {}

    def add(name: str, value: np.ndarray) -> None:
        if name in tensors:
            raise ArtifactError(f"{directory}: two tensors are both named {name!r}")
        tensors[name] = value

    for entry in manifest["float_tensors"]:
        add(tensor_name(entry["collection"], entry["path"]),
            _array(artifact.read_tensor(contents, entry), np.float32))
    for layer in manifest["layers"]:
        prefix = tensor_name("params", layer["path"])
        values = _array(artifact.read_tensor(contents, layer["kernel"]), np.int8)
        scale = _array(artifact.read_tensor(contents, layer["scale"]), np.float32)
        add(f"{prefix}.weight_int", values)
        add(f"{prefix}.weight_scale", scale)
        zero_point = np.int8(0)
        if layer["zero_point"] is not None:
            zero_point = _array(artifact.read_tensor(contents, layer["zero_point"]), np.int8)
            add(f"{prefix}.weight_zero_point", zero_point)
        act = layer["activation"]
        if act["bits"] and act["scale"] is not None:
            add(f"{prefix}.input_scale", _array(act["scale"], np.float32))
            add(f"{prefix}.input_zero_point", _array(act["zero_point"], np.int8))
        if include_float:
            add(f"{FLOAT_PREFIX}{prefix}.{quant.param_name(layer['kind'])}",
                quant.dequantize_layer(values, scale, zero_point, layer["kind"]))
    return tensors


def metadata(manifest: Mapping[str, Any], manifest_sha256: str, *, include_float: bool
             ) -> dict[str, str]:
    """The safetensors ``__metadata__`` of an artifact (string values, see above)."""
    model = manifest["model"]
    layers = {layer["path"]: {"kind": layer["kind"], "weight_bits": layer["weight_bits"],
                              "activation": layer["activation"]}
              for layer in manifest["layers"]}
    return {
        "format": FORMAT,
        "artifact_format": manifest["format"],
        "jaxkd_version": manifest["jaxkd_version"],
        "model": model["name"],
        "model_kwargs": json.dumps(model["kwargs"], sort_keys=True),
        "num_classes": str(model["num_classes"]),
        "input_shape": json.dumps(model["input_shape"]),
        "quantization": json.dumps(manifest["quantization"], sort_keys=True),
        "layers": json.dumps(layers),
        "include_float": json.dumps(include_float),
        "manifest_sha256": manifest_sha256,
    }


def huggingface_config(manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    """The Hugging Face ``config.json`` of a BERT-family student, written beside
    ``model.safetensors`` so that ``transformers`` can build the model; None for every other
    model.

    None for every artifact today, a ``bert`` one included: a ``config.json`` alone would
    not make the file loadable, since ``transformers`` also needs its own tensor names
    (``encoder.layer.0...``) and ``[out, in]`` kernel layouts, while this file keeps Flax's.
    The change that writes a BERT student in Hugging Face's form adds its mapping here
    (hidden size, layers, heads, vocabulary from ``model_kwargs``) together with those
    names and layouts.
    """
    del manifest
    return None


def export_safetensors(artifact_dir: str, out_path: str, *, include_float: bool = False
                       ) -> dict[str, Any]:
    """Writes every tensor of an artifact, dense, to ``out_path`` (``model.safetensors``).

    The artifact is checked against its manifest first; the file is written under a
    temporary name beside ``out_path`` and renamed into place, so ``out_path`` is never
    half-written. For a BERT-family student, ``config.json`` is written beside it
    (:func:`huggingface_config`).

    Args:
      artifact_dir: a directory written by :func:`jaxkd.export.export`.
      out_path: the file to write; its directory must exist.
      include_float: also write the dequantized kernels under ``float.`` (see above).

    Returns:
      ``{"path", "bytes", "tensors": {name: {"dtype", "shape"}}, "metadata"}``.
    """
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise MissingError(f"out_path={out_path!r}: its directory {parent} does not exist")
    if os.path.isdir(out_path):
        raise ConfigError(f"out_path={out_path!r} is a directory; give a file name, e.g. "
                          f"{os.path.join(out_path, FILE)}")
    manifest = artifact.verify(artifact_dir)
    tensors = dense_tensors(artifact_dir, manifest, include_float=include_float)
    meta = metadata(manifest, files.sha256(os.path.join(artifact_dir, artifact.MANIFEST)),
                    include_float=include_float)
    # A temporary file beside it, then os.replace (and the usual file mode).
    files.write_bytes(out_path, save(tensors, metadata=meta))
    config = huggingface_config(manifest)
    if config is not None:
        files.write_json(os.path.join(parent, "config.json"), config)
    return {
        "path": out_path,
        "bytes": os.path.getsize(out_path),
        "tensors": {name: {"dtype": value.dtype.name, "shape": list(value.shape)}
                    for name, value in tensors.items()},
        "metadata": meta,
    }
