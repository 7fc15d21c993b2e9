"""The exported model in the formats other runtimes load, written beside its artifact.

After a run exports ``DIR/artifact/`` (jaxkd's own format) it writes ``DIR/formats/``:

- ``model.stablehlo``: the integer model as a serialized ``jax.export`` module (symbolic
  batch), callable from a program that has only ``jax`` (:mod:`jaxkd.export.stablehlo`);
- ``model.onnx``: an ONNX graph with the integer arithmetic kept (QuantizeLinear,
  MatMulInteger / ConvInteger, rescale), checked by ``onnx.checker`` and run by ONNX
  Runtime on the eval split against the artifact (:mod:`jaxkd.export.onnx`);
- ``model.safetensors``: every tensor, integer kernels with their scales and zero points
  (:mod:`jaxkd.export.safetensors_io`);
- ``hf/`` (BERT only): ``config.json`` and the float weights under HF's names, which
  ``transformers`` and other HF-format readers load (:mod:`jaxkd.export.hf`);
- ``model.gguf`` (Gemma 3 distilled from a GGUF teacher only): llama.cpp's format, Q8_0
  or Q4_0, with the teacher's tokenizer (:mod:`jaxkd.export.gguf_export`);
- ``formats.json``: for each format its file, bytes and sha256 (or why it was skipped),
  the ONNX check's figures, and the sha256 of the artifact manifest they were made from.

``config.export.formats`` chooses: ``()`` (the default) writes every format that can
express the model (``hf`` for BERT and ``gguf`` for Gemma 3 only, silently) and skips
the others with one logged line (a model outside ONNX's zoo, a missing optional
package: ``pip install 'jaxkd[export]'``); a list of names writes those or stops the run
with one line; ``('none',)`` writes none. Each file is written to a temporary name and renamed into
place, so nothing half-written is ever left.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkd import files
from jaxkd.export.lineage import manifest_sha256
from jaxkd.models.bert import BertEncoder
from jaxkd.models.gemma import Gemma3
from jaxkd.schema import ConfigError

FORMATS = ("stablehlo", "onnx", "safetensors", "hf", "gguf")
FILES = {"stablehlo": "model.stablehlo", "onnx": "model.onnx",
         "safetensors": "model.safetensors", "hf": "hf", "gguf": "model.gguf"}
INDEX = "formats.json"


def _export(name: str, artifact_dir: str, path: str, inputs: Any) -> dict[str, Any]:
    if name == "stablehlo":
        from jaxkd.export.stablehlo import export_stablehlo

        return export_stablehlo(artifact_dir, path)
    if name == "safetensors":
        from jaxkd.export.safetensors_io import export_safetensors

        return export_safetensors(artifact_dir, path)
    if name == "hf":
        from jaxkd.export.hf import export_hf

        return export_hf(artifact_dir, path)
    if name == "gguf":
        from jaxkd.export.gguf_export import export_gguf_artifact

        return export_gguf_artifact(artifact_dir, path)
    from jaxkd.export.onnx import export_onnx, verify_onnx

    info = export_onnx(artifact_dir, path)
    if inputs is not None:
        info["check"] = verify_onnx(artifact_dir, path, inputs)
    return info


def check(formats: Sequence[str], model: Any) -> None:
    """Before training: every format asked for by name can express ``model`` and its
    package is installed; else one line (the default, ``()``, skips instead)."""
    for name in formats:
        if name == "none":
            continue
        try:
            if name == "onnx":
                from jaxkd.export.onnx import ARCHITECTURES, SUPPORTED
            elif name == "stablehlo":
                import flatbuffers  # noqa: F401  (jax.export's serializer needs it)
            elif name == "gguf":
                import gguf  # noqa: F401
            else:
                import safetensors  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"config.export.formats: {name} needs {e.name}: pip install "
                              "'jaxkd[export]'") from None
        if name == "gguf" and not isinstance(model, Gemma3):
            raise ConfigError(f"config.export.formats: gguf is written for gemma3 only, not "
                              f"{type(model).__name__}")
        if name == "hf" and not isinstance(model, BertEncoder):
            raise ConfigError(f"config.export.formats: hf is written for bert only, not "
                              f"{type(model).__name__}")
        if name == "onnx" and type(model) not in ARCHITECTURES:
            raise ConfigError(f"config.export.formats: onnx cannot express model "
                              f"{type(model).__name__}; its zoo: {SUPPORTED} (or leave "
                              "formats empty to skip it)")


def write(artifact_dir: str, out_dir: str, formats: Sequence[str] = (), *,
          inputs: np.ndarray | tuple[np.ndarray, ...] | None = None) -> dict[str, Any]:
    """Writes ``formats`` (``()``: every one, skipping what cannot express the model) of
    the artifact in ``artifact_dir`` into ``out_dir``; ``inputs`` (e.g. the eval split; a
    tuple for a model of several inputs) check the ONNX model against the artifact.
    Returns ``formats.json``'s contents."""
    strict = bool(formats)
    names = [] if tuple(formats) == ("none",) else list(formats or FORMATS)
    if not strict:
        model_name = _model_name(artifact_dir)
        names = [n for n in names if {"hf": "bert", "gguf": "gemma3"}.get(n, model_name)
                 == model_name]
    os.makedirs(out_dir, exist_ok=True)
    index: dict[str, Any] = {"artifact_manifest_sha256": manifest_sha256(artifact_dir),
                             "formats": {}}
    for name in names:
        path = os.path.join(out_dir, FILES[name])
        try:
            info = _export(name, artifact_dir, path, inputs)
        except (ConfigError, ImportError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if strict:
                raise ConfigError(f"config.export.formats: {name} cannot express this "
                                  f"model: {reason}") from None
            print(f"jaxkd: {name} export skipped: {reason}", file=sys.stderr, flush=True)
            index["formats"][name] = {"skipped": reason}
            continue
        if os.path.isdir(path):  # hf/: a directory of files
            entry = {"file": FILES[name] + "/", "bytes": info["bytes"],
                     "sha256": {f: files.sha256(os.path.join(path, f))
                                for f in sorted(os.listdir(path))}}
        else:
            entry = {"file": FILES[name], "bytes": os.path.getsize(path),
                     "sha256": files.sha256(path)}
        if name == "onnx" and "check" in info:
            entry["check"] = info["check"]
        index["formats"][name] = entry
    files.write_json(os.path.join(out_dir, INDEX), index, default=_plain)
    return index


def _model_name(artifact_dir: str) -> str:
    from jaxkd.export.artifact import read_manifest

    return read_manifest(artifact_dir)["model"]["name"]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return np.asarray(value).tolist()
    return str(value)
