"""A Gemma 3 student as a GGUF file that llama.cpp runs, its matrices Q8_0 or Q4_0.

``export_gguf(model, variables, out_path, qtype='Q8_0', tokenizer_from=TEACHER_GGUF)``
writes :class:`jaxkd.models.gemma.Gemma3` in the layout :mod:`jaxkd.models.gguf_io` reads
(the same tensor names, ``[out, in]`` rows) with the ``gemma3.*`` metadata llama.cpp
needs; a width-pruned student's per-layer FFN widths become an array
``gemma3.feed_forward_length``, as llama.cpp accepts. The tokenizer (every
``tokenizer.ggml.*`` key) is copied from ``tokenizer_from``, normally the teacher's file.

Quantization is llama.cpp's, by the ``gguf`` package, of every matrix and of the embedding
table (rows in blocks of 32 values with one float16 scale each: ``Q8_0`` ``x = d q``,
``q`` in [-127, 127], 34 bytes per block; ``Q4_0`` ``x = d (q - 8)``, ``q`` in [0, 15], 18
bytes per block); norms stay float32. ``'F32'`` writes everything in float32.
``jaxkd.lineage`` (JSON) records where the model came from when given.

:func:`export_gguf_artifact` writes a run's exported artifact (the trainer's
``config.export.formats`` ``'gguf'``, :mod:`jaxkd.export.formats`): its float model (the
dequantized kernels of a quantized student), ``Q4_0`` when its weights were trained at
4 bits or fewer or already lie on ``Q4_0``'s grid (``config.gguf_quantization``), else
``Q8_0`` (lossless for weights on its grid), the tokenizer copied from the GGUF teacher its
lineage names, and that lineage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jaxkd import files
from jaxkd.models.gemma import Gemma3
from jaxkd.models.gguf_io import MATRICES, NORMS
from jaxkd.schema import ConfigError

QTYPES = ("Q8_0", "Q4_0", "F32")


def gguf_tensors(model: Gemma3, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The model's float32 tensors by GGUF name (matrices as ``[out, in]``)."""
    flat = {"/".join(k): np.asarray(v, np.float32)
            for k, v in traverse_util.flatten_dict(dict(params)).items()}
    out = {"token_embd.weight": flat["embed/embedding"],
           "output_norm.weight": flat["output_norm/scale"]}
    for i in range(model.num_layers):
        for name, where in NORMS.items():
            out[f"blk.{i}.{name}.weight"] = flat[f"layer{i}/{where}/scale"]
        for name, where in MATRICES.items():
            kernel = flat.get(f"layer{i}/{where}/kernel")
            if kernel is not None:  # a layer without FFN neurons has no FFN matrices
                out[f"blk.{i}.{name}.weight"] = np.ascontiguousarray(kernel.T)
    return out


def on_grid(tensors: Mapping[str, np.ndarray], qtype: str) -> bool:
    """Whether every matrix of ``tensors`` (GGUF names and layout) is exactly representable
    in ``qtype``: quantizing it then dequantizing gives it back (a model trained with
    ``config.gguf_quantization``)."""
    from gguf import GGMLQuantizationType, quants

    target = getattr(GGMLQuantizationType, qtype)
    for value in tensors.values():
        if value.ndim == 2 and (value.shape[-1] % 32 or not np.array_equal(
                quants.dequantize(quants.quantize(value, target), target), value)):
            return False
    return True


def export_gguf(model: Gemma3, variables: Mapping[str, Any], out_path: str, *,
                qtype: str = "Q8_0", tokenizer_from: str | None = None,
                name: str = "jaxkd Gemma 3 student", context_length: int = 32768,
                lineage: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``out_path`` (module docstring); returns ``{'path', 'bytes', 'qtype',
    'tensor_types'}``. The file is written whole or not at all."""
    import gguf
    from gguf import GGMLQuantizationType, quants

    if qtype not in QTYPES:
        raise ConfigError(f"qtype={qtype!r} is not one of {', '.join(QTYPES)}")
    if model.query_scale not in (None, model.head_dim ** -0.5) or model.global_every != 6 \
            or model.rope_local_base != 10_000.0:
        raise ConfigError("llama.cpp's Gemma 3 fixes query_scale = head_dim^-1/2, a global "
                          "layer every 6 and a local RoPE base of 10,000: this model differs")
    widths = list(model.layer_intermediate or (model.intermediate_size,) * model.num_layers)
    if 0 in widths:
        raise ConfigError("a layer without FFN neurons cannot be written as GGUF: llama.cpp "
                          "expects every layer's ffn_gate/up/down")
    out_path = os.fspath(out_path)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    files.makedirs(os.path.dirname(os.path.abspath(out_path)))
    writer = gguf.GGUFWriter(tmp, "gemma3")
    writer.add_name(name)
    writer.add_context_length(int(context_length))
    writer.add_embedding_length(model.hidden_size)
    writer.add_block_count(model.num_layers)
    writer.add_feed_forward_length(widths if len(set(widths)) > 1 else widths[0])
    writer.add_head_count(model.num_heads)
    writer.add_head_count_kv(model.num_kv_heads)
    writer.add_key_length(model.head_dim)
    writer.add_value_length(model.head_dim)
    writer.add_layer_norm_rms_eps(float(model.rms_eps))
    writer.add_rope_freq_base(float(model.rope_global_base))
    writer.add_sliding_window(model.sliding_window)
    if lineage is not None:
        writer.add_string("jaxkd.lineage", json.dumps(dict(lineage), sort_keys=True,
                                                      default=str))
    if tokenizer_from is not None:
        _copy_tokenizer(gguf.GGUFReader(tokenizer_from), writer, model.vocab_size,
                        tokenizer_from)
    target = getattr(GGMLQuantizationType, qtype)
    types: dict[str, int] = {}
    for tensor_name, value in gguf_tensors(model, variables["params"]).items():
        if value.ndim == 1 or qtype == "F32":
            writer.add_tensor(tensor_name, value)
            kind = "F32"
        else:
            if value.shape[-1] % 32:
                raise ConfigError(f"{tensor_name}: rows of {value.shape[-1]} values are not "
                                  f"whole blocks of 32, which {qtype} needs")
            writer.add_tensor(tensor_name, quants.quantize(value, target), raw_dtype=target)
            kind = qtype
        types[kind] = types.get(kind, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": out_path, "bytes": os.path.getsize(out_path), "qtype": qtype,
            "tensor_types": types}


def export_gguf_artifact(artifact_dir: str, out_path: str, *, qtype: str | None = None,
                         tokenizer_from: str | None = None) -> dict[str, Any]:
    """The Gemma 3 artifact in ``artifact_dir`` as a GGUF file (module docstring);
    ``tokenizer_from`` defaults to the GGUF file among the run's teachers (and the run it
    started from). Returns :func:`export_gguf`'s dict."""
    from jaxkd import models
    from jaxkd.export import artifact, lineage
    from jaxkd.export.safetensors_io import float_params

    manifest = artifact.verify(artifact_dir)
    spec = manifest["model"]
    where = os.path.join(artifact_dir, artifact.MANIFEST)
    if spec["name"] != "gemma3":
        raise ConfigError(f"{where}: model {spec['name']!r} is not gemma3; GGUF is written "
                          "for Gemma 3 only")
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    history = lineage.read_lineage(artifact_dir) or {}
    if tokenizer_from is None:
        sources = [*history.get("teachers", []), history.get("init") or {},
                   (history.get("precomputed_logits") or {}).get("teacher") or {}]
        tokenizer_from = next((e["file"] for e in sources
                               if str(e.get("file", "")).endswith(".gguf")), None)
    if tokenizer_from is None:
        raise ConfigError(f"{where}: the run had no GGUF teacher to copy a tokenizer from, "
                          "and llama.cpp needs one")
    params = traverse_util.unflatten_dict(float_params(artifact_dir, manifest))
    if qtype is None:
        bits = [e["weight_bits"] for e in manifest["layers"]]
        on_q4_0 = not bits and on_grid(gguf_tensors(model, params), "Q4_0")
        qtype = "Q4_0" if (bits and max(bits) <= 4) or on_q4_0 else "Q8_0"
    return export_gguf(model, {"params": params}, out_path, qtype=qtype,
                       tokenizer_from=tokenizer_from, lineage=history)


def _copy_tokenizer(reader: Any, writer: Any, vocab_size: int, where: str) -> None:
    import gguf

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConfigError(f"{where} holds no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens.data) != vocab_size:
        raise ConfigError(f"{where}'s tokenizer has {len(tokens.data)} tokens, the model "
                          f"{vocab_size}")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
