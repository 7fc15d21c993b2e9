"""A BERT artifact as a Hugging Face model directory: ``config.json`` + float ``model.safetensors``.

``export_hf(artifact_dir, out_dir)`` writes what ``transformers``' ``BertModel`` /
``BertForSequenceClassification`` and other HF-format readers load (our own
:func:`jaxkd.models.pretrained.from_pretrained` included):

- ``model.safetensors``: float32, HF names (``bert.embeddings.word_embeddings.weight``,
  ``bert.encoder.layer.{i}.attention.self.query.weight``, ..., ``bert.pooler.dense.*`` for
  ``pooling='pooler'``, ``classifier.weight`` / ``.bias`` for jaxkd's ``head``); Linear
  weights ``[out, in]`` (Flax kernels transposed). A quantized layer's weight is its
  dequantized kernel ``weight_scale * (weight_int - weight_zero_point)``: the float model
  the integer one approximates (activations are not quantized by an HF reader).
- ``config.json``: BertConfig's fields (``model_type: 'bert'``, ``hidden_act: 'gelu'``,
  sizes, ``layer_norm_eps``, dropouts, ``num_labels``), ``architectures``:
  ``BertForSequenceClassification`` when the model pools with HF's pooler (then HF computes
  jaxkd's logits: ``classifier(tanh(pooler(h_CLS)))``), else ``BertModel`` (the encoder;
  jaxkd's ``cls`` / ``mean`` pooling and head are recorded under ``jaxkd``: ``pooling``,
  the artifact's manifest sha256).

Refused in one line, naming the field: models HF's BertConfig cannot express (per-layer
head counts or FFN widths of a pruned student, ``head_dim`` other than ``hidden_size /
num_heads``) and models that are not BERT.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import save

from jaxkd import files, models
from jaxkd.export import artifact
from jaxkd.export.lineage import manifest_sha256
from jaxkd.export.safetensors_io import float_params
from jaxkd.models.pretrained import hf_names
from jaxkd.schema import ConfigError

CONFIG, WEIGHTS = "config.json", "model.safetensors"


def hf_config(model: models.BertEncoder, num_classes: int, sha256: str) -> dict[str, Any]:
    """``config.json`` of ``model`` (a :class:`~jaxkd.models.bert.BertEncoder`)."""
    return {
        "architectures": ["BertForSequenceClassification" if model.pooling == "pooler"
                          else "BertModel"],
        "model_type": "bert",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "intermediate_size": model.intermediate_size,
        "hidden_act": "gelu",
        "hidden_dropout_prob": model.dropout_rate,
        "attention_probs_dropout_prob": model.attention_dropout_rate,
        "max_position_embeddings": model.max_position,
        "type_vocab_size": model.type_vocab_size,
        "layer_norm_eps": model.layer_norm_eps,
        "initializer_range": 0.02,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "num_labels": num_classes,
        "torch_dtype": "float32",
        "jaxkd": {"pooling": model.pooling, "artifact_manifest_sha256": sha256},
    }


def _check(model: Any, where: str) -> None:
    if not isinstance(model, models.BertEncoder):
        raise ConfigError(f"{where}: model {type(model).__name__} is not a BERT; the HF "
                          "directory is written for bert only")
    for field in ("layer_heads", "layer_intermediate"):
        if len(set(getattr(model, field))) > 1:
            raise ConfigError(f"{where}: model.kwargs.{field}={getattr(model, field)!r} "
                              "varies by layer, which HF's BertConfig cannot express")
    heads = set(model.layer_heads) or {model.num_heads}
    ffn = set(model.layer_intermediate) or {model.intermediate_size}
    head_dim = model.head_dim or model.hidden_size // model.num_heads
    if heads.pop() * head_dim != model.hidden_size or ffn.pop() != model.intermediate_size:
        raise ConfigError(f"{where}: heads x head_dim (or the FFN width) differs from "
                          "hidden_size (intermediate_size), which HF's BertConfig cannot "
                          "express")


def export_hf(artifact_dir: str, out_dir: str) -> dict[str, Any]:
    """Writes ``out_dir/config.json`` and ``out_dir/model.safetensors`` (module docstring)
    from the BERT artifact in ``artifact_dir``; returns ``{"path", "bytes", "architecture",
    "tensors"}``. Each file is written to a temporary name and renamed into place."""
    manifest = artifact.verify(artifact_dir)
    spec = manifest["model"]
    where = os.path.join(artifact_dir, artifact.MANIFEST)
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    _check(model, where)
    params = float_params(artifact_dir, manifest)
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        names = hf_names(path)
        name = f"bert.{names[0]}" if names else (
            f"classifier.{'weight' if path[-1] == 'kernel' else 'bias'}")
        value = np.asarray(value, np.float32)
        out[name] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    assert len(out) == len(params), "two parameters map to one HF name"
    config = hf_config(model, spec["num_classes"], manifest_sha256(artifact_dir))
    files.makedirs(out_dir)
    weights = files.write_bytes(os.path.join(out_dir, WEIGHTS), save(out, metadata={
        "format": "pt", "jaxkd_artifact_manifest_sha256": config["jaxkd"][
            "artifact_manifest_sha256"]}))
    files.write_bytes(os.path.join(out_dir, CONFIG),
                      (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return {"path": str(out_dir), "bytes": weights + os.path.getsize(
                os.path.join(out_dir, CONFIG)),
            "architecture": config["architectures"][0], "tensors": len(out)}
