"""Gemma 3 from a GGUF file (llama.cpp's format), read with the ``gguf`` package (numpy).

``from_gguf(path) -> (model, variables, info)``: the hyper-parameters come from the file's
metadata (``gemma3.*``), every tensor is dequantized to float32 by ``gguf.quants``
(Q4_K, Q5_0, Q6_K, Q8_0, F16, BF16 and F32, whatever the file holds) and renamed to
:class:`jaxkd.models.gemma.Gemma3`'s parameters; GGUF stores a matrix as ``[out, in]`` rows
(PyTorch's ``Linear`` layout), transposed here into Flax's ``[in, out]`` kernels. ``info``:
the metadata read (architecture, name, the tensor types counted, the tokenizer's special
ids). Anything it cannot build (another architecture, a missing or misshapen tensor) is
one :class:`~jaxkd.schema.ConfigError` line naming the file and the key.

Metadata the file does not hold keeps llama.cpp's Gemma 3 values: local RoPE base 10,000,
a global layer every 6 (``LLM_ARCH_GEMMA3``), queries scaled by ``key_length^-1/2``.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
from flax import traverse_util

from jaxkd.models.gemma import Gemma3
from jaxkd.schema import ConfigError, MissingError

ARCHITECTURE = "gemma3"
NORMS = {"attn_norm": "attn_norm", "post_attention_norm": "post_attention_norm",
         "ffn_norm": "ffn_norm", "post_ffw_norm": "post_ffw_norm",
         "attn_q_norm": "attention/attn_q_norm", "attn_k_norm": "attention/attn_k_norm"}
MATRICES = {"attn_q": "attention/attn_q", "attn_k": "attention/attn_k",
            "attn_v": "attention/attn_v", "attn_output": "attention/attn_output",
            "ffn_gate": "ffn_gate", "ffn_up": "ffn_up", "ffn_down": "ffn_down"}


def _reader(path: str) -> Any:
    import gguf

    if not os.path.isfile(path):
        raise MissingError(f"{path} does not exist: run python -m jaxkd.models.fetch "
                           "gemma-3-270m (or give a GGUF file)")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a readable GGUF file ({e})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def _first(value: Any) -> int:
    """A per-layer array's first value (the FFN widths of a width-pruned file), or the value."""
    return int(value[0]) if isinstance(value, list | tuple) else int(value)


def metadata(reader: Any, path: str) -> dict[str, Any]:
    """The model's hyper-parameters as :class:`Gemma3` kwargs (module docstring)."""
    arch = _field(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise ConfigError(f"{path}: general.architecture={arch!r}; jaxkd reads "
                          f"{ARCHITECTURE!r} GGUF files")

    def need(key: str) -> Any:
        value = _field(reader, f"{ARCHITECTURE}.{key}")
        if value is None:
            raise ConfigError(f"{path}: metadata {ARCHITECTURE}.{key} is missing")
        return value

    head_dim = int(need("attention.key_length"))
    if int(_field(reader, f"{ARCHITECTURE}.attention.value_length", head_dim)) != head_dim:
        raise ConfigError(f"{path}: attention.value_length differs from key_length, which "
                          "jaxkd's Gemma 3 does not build")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "vocab_size": len(tokens.data) if tokens is not None else None,
        "hidden_size": int(need("embedding_length")),
        "num_layers": int(need("block_count")),
        "num_heads": int(need("attention.head_count")),
        "num_kv_heads": int(need("attention.head_count_kv")),
        "head_dim": head_dim,
        "intermediate_size": _first(need("feed_forward_length")),
        "sliding_window": int(need("attention.sliding_window")),
        "rope_global_base": float(need("rope.freq_base")),
        "rms_eps": float(need("attention.layer_norm_rms_epsilon")),
    }


def from_gguf(path: str, *, dtype: Any = "float32") -> tuple[Gemma3, dict[str, Any],
                                                               dict[str, Any]]:
    """``(model, variables, info)`` of the Gemma 3 GGUF file at ``path`` (module docstring)."""
    from gguf import quants

    path = os.fspath(path)
    reader = _reader(path)
    kwargs = metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ConfigError(f"{path}: tensor token_embd.weight is missing")
    if kwargs["vocab_size"] is None:
        kwargs["vocab_size"] = int(embedding.shape[-1])

    def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = tensors.get(name)
        if t is None:
            raise ConfigError(f"{path}: tensor {name} is missing")
        value = quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32)
        if value.shape != shape:
            raise ConfigError(f"{path}: tensor {name} has shape {list(value.shape)}, not "
                              f"{list(shape)} (from the metadata)")
        return value

    d, n = kwargs["hidden_size"], kwargs["num_layers"]
    hd, q_dim = kwargs["head_dim"], kwargs["num_heads"] * kwargs["head_dim"]
    kv_dim = kwargs["num_kv_heads"] * hd
    widths = []
    for i in range(n):  # a width-pruned file may give each layer its own FFN width
        gate = tensors.get(f"blk.{i}.ffn_gate.weight")
        widths.append(int(gate.shape[-1]) if gate is not None else kwargs["intermediate_size"])
    if len(set(widths)) > 1:
        kwargs["layer_intermediate"] = tuple(widths)
    flat = {"embed/embedding": read("token_embd.weight", (kwargs["vocab_size"], d)),
            "output_norm/scale": read("output_norm.weight", (d,))}
    for i in range(n):
        f = widths[i]
        shapes = {"attn_q": (q_dim, d), "attn_k": (kv_dim, d), "attn_v": (kv_dim, d),
                  "attn_output": (d, q_dim), "ffn_gate": (f, d), "ffn_up": (f, d),
                  "ffn_down": (d, f)}
        for name, where in NORMS.items():
            size = hd if name in ("attn_q_norm", "attn_k_norm") else d
            flat[f"layer{i}/{where}/scale"] = read(f"blk.{i}.{name}.weight", (size,))
        for name, where in MATRICES.items():
            flat[f"layer{i}/{where}/kernel"] = np.ascontiguousarray(
                read(f"blk.{i}.{name}.weight", shapes[name]).T)
    extra = sorted(set(tensors) - {"token_embd.weight", "output_norm.weight"}
                   - {f"blk.{i}.{name}.weight" for i in range(n)
                      for name in (*NORMS, *MATRICES)})
    if extra:
        raise ConfigError(f"{path}: tensors jaxkd's Gemma 3 has no place for: "
                          f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    model = Gemma3(**kwargs, dtype=dtype, param_dtype="float32")
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    info = {
        "path": path,
        "name": _field(reader, "general.name"),
        "architecture": ARCHITECTURE,
        "tensor_types": dict(collections.Counter(t.tensor_type.name for t in reader.tensors)),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "padding_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "kwargs": kwargs,
    }
    return model, {"params": params}, info
