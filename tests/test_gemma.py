"""Gemma 3's decoder read from a GGUF file that the ``gguf`` package writes in the test
(Q8_0 matrices, as llama.cpp quantizes them), against a forward pass written out in numpy."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from jaxkd.models import gguf_io
from jaxkd.schema import ConfigError, MissingError

V, D, N, H, KV, HD, F, WINDOW = 64, 32, 6, 4, 2, 16, 64, 4  # layer 5 is the global one


def write_gguf(path, *, arch="gemma3", drop=None, seed=0, vocab=None):
    """A tiny random Gemma 3 in GGUF: Q8_0 matrices, float32 norms, the keys llama.cpp
    reads. ``vocab``: ``(tokens, scores, types)`` of a SentencePiece tokenizer (bos 2,
    eos 1), else ``V`` placeholder tokens. Returns the float tensors as written (before
    quantization)."""
    rng = np.random.default_rng(seed)
    v = V if vocab is None else len(vocab[0])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(WINDOW)
    if vocab is None:
        w.add_token_list([f"t{i}" for i in range(V)])
    else:
        w.add_tokenizer_model("llama")
        w.add_token_list(vocab[0])
        w.add_token_scores(vocab[1])
        w.add_token_types(vocab[2])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_add_bos_token(True)
    shapes = {"token_embd.weight": (v, D), "output_norm.weight": (D,)}
    for i in range(N):
        shapes.update({f"blk.{i}.attn_q.weight": (H * HD, D),
                       f"blk.{i}.attn_k.weight": (KV * HD, D),
                       f"blk.{i}.attn_v.weight": (KV * HD, D),
                       f"blk.{i}.attn_output.weight": (D, H * HD),
                       f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                       f"blk.{i}.ffn_down.weight": (D, F)})
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            shapes[f"blk.{i}.{norm}.weight"] = (D,)
        shapes[f"blk.{i}.attn_q_norm.weight"] = shapes[f"blk.{i}.attn_k_norm.weight"] = (HD,)
    written = {}
    for name, shape in shapes.items():
        if name == drop:
            continue
        if len(shape) == 1:  # norms: scales around 1
            value = (1 + 0.2 * rng.normal(size=shape)).astype(np.float32)
            w.add_tensor(name, value)
        else:
            value = (rng.normal(size=shape) * (0.5 if "embd" in name else 0.2)).astype(np.float32)
            w.add_tensor(name, quants.quantize(value, Q.Q8_0), raw_dtype=Q.Q8_0)
        written[name] = value
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def np_forward(t, ids):
    """Gemma 3 written out in float64 numpy from the dequantized tensors ``t`` (GGUF names,
    ``[out, in]`` matrices): one sequence ``ids`` ``[L]`` -> logits ``[L, V]``."""
    L = len(ids)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6) * w

    def rotate(x, base):  # x [L, heads, HD], NeoX halves
        half = HD // 2
        theta = np.arange(L)[:, None, None] * base ** (-np.arange(half) * 2.0 / HD)
        a, b = x[..., :half], x[..., half:]
        return np.concatenate([a * np.cos(theta) - b * np.sin(theta),
                               b * np.cos(theta) + a * np.sin(theta)], -1)

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = t["token_embd.weight"][ids] * np.sqrt(D)
    for i in range(N):
        g = {k[len(f"blk.{i}."):-len(".weight")]: v for k, v in t.items()
             if k.startswith(f"blk.{i}.")}
        is_global = (i + 1) % 6 == 0
        h = rms(x, g["attn_norm"])
        q = rms((h @ g["attn_q"].T).reshape(L, H, HD), g["attn_q_norm"])
        k = rms((h @ g["attn_k"].T).reshape(L, KV, HD), g["attn_k_norm"])
        v = (h @ g["attn_v"].T).reshape(L, KV, HD)
        base = 1e6 if is_global else 1e4
        q, k = rotate(q, base) / np.sqrt(HD), rotate(k, base)
        out = np.zeros((L, H, HD))
        for head in range(H):
            kv = head // (H // KV)
            s = q[:, head] @ k[:, kv].T
            for a in range(L):
                for b in range(L):
                    if b > a or (not is_global and a - b >= WINDOW):
                        s[a, b] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + rms(out.reshape(L, H * HD) @ g["attn_output"].T, g["post_attention_norm"])
        h = rms(x, g["ffn_norm"])
        f = (gelu_tanh(h @ g["ffn_gate"].T) * (h @ g["ffn_up"].T)) @ g["ffn_down"].T
        x = x + rms(f, g["post_ffw_norm"])
    return rms(x, t["output_norm.weight"]) @ t["token_embd.weight"].T


def test_gguf_gemma_matches_numpy_and_is_causal_with_a_sliding_window(tmp_path):
    written = write_gguf(tmp_path / "tiny.gguf")
    model, variables, info = gguf_io.from_gguf(str(tmp_path / "tiny.gguf"))
    assert info["tensor_types"] == {"Q8_0": 1 + 7 * N, "F32": 1 + 6 * N}
    assert (model.vocab_size, model.num_layers, model.num_kv_heads, model.sliding_window) == (
        V, N, KV, WINDOW)
    # Dequantized Q8_0 (blocks of 32, one float16 scale each): within half a step of what
    # was written, plus the scale's float16 rounding over up to 127 steps.
    reader = gguf.GGUFReader(str(tmp_path / "tiny.gguf"))
    tensors = {t.name: quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64)
               for t in reader.tensors}
    emb = written["token_embd.weight"]
    step = np.abs(emb.reshape(V, -1, 32)).max(-1, keepdims=True) / 127
    assert np.all(np.abs(tensors["token_embd.weight"] - emb).reshape(V, -1, 32)
                  <= step * (0.5 + 127 * 2.0**-11))
    np.testing.assert_array_equal(variables["params"]["layer0"]["attention"]["attn_q"]["kernel"],
                                  tensors["blk.0.attn_q.weight"].T.astype(np.float32))
    ids = np.random.default_rng(1).integers(0, V, size=(2, 10))
    logits = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(ids)))
    for row in range(2):
        ref = np_forward(tensors, ids[row])
        np.testing.assert_allclose(logits[row], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # Causal, and right-padding changes nothing before it.
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    mask = np.ones_like(ids)
    mask[:, 7:] = 0
    again = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(changed), jnp.asarray(mask)))
    np.testing.assert_allclose(again[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
    # return_logits=False: the final hidden states, whose tied head gives the logits.
    feats = model.apply(variables, jnp.asarray(ids), return_logits=False)
    table = np.asarray(variables["params"]["embed"]["embedding"])
    np.testing.assert_allclose(np.asarray(feats["final_hidden"]) @ table.T, logits,
                               rtol=1e-4, atol=1e-4)
    assert sorted(feats) == sorted([f"hidden{i}" for i in range(1, N + 1)]
                                   + ["embeddings", "final_hidden", "lm_head", "mask"])
    np.testing.assert_array_equal(feats["lm_head"], table)  # the head the KD terms read


def test_files_it_cannot_build_are_one_line(tmp_path):
    with pytest.raises(MissingError, match="python -m jaxkd.models.fetch gemma-3-270m"):
        gguf_io.from_gguf(str(tmp_path / "absent.gguf"))
    write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ConfigError, match=r"llama.gguf: general.architecture='llama'; jaxkd "
                                          r"reads 'gemma3' GGUF files$"):
        gguf_io.from_gguf(str(tmp_path / "llama.gguf"))
    write_gguf(tmp_path / "short.gguf", drop="blk.3.ffn_up.weight")
    with pytest.raises(ConfigError, match=r"short.gguf: tensor blk.3.ffn_up.weight is missing$"):
        gguf_io.from_gguf(str(tmp_path / "short.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match=r"junk.gguf is not a readable GGUF file"):
        gguf_io.from_gguf(str(tmp_path / "junk.gguf"))


def test_the_teacher_file_is_verified_and_a_missing_one_names_the_command(tmp_path):
    from jaxkd.models import fetch

    with pytest.raises(MissingError, match=r"gemma-3-270m-q4_k_m.gguf does not exist: run "
                                           r"python -m jaxkd.models.fetch gemma-3-270m --dir "):
        fetch.verified_gguf("gemma-3-270m", str(tmp_path))
    path = fetch.gguf_path("gemma-3-270m", str(tmp_path))
    write_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "gemma-3-270m").mkdir()
    (tmp_path / "tiny.gguf").rename(path)  # a GGUF file, but not the published one
    with pytest.raises(ConfigError, match=r"has sha256 [0-9a-f]{16}\.\.\., not gemma-3-270m's "
                                          r"a5fd3b62230aa5ec\.\.\.: run python -m jaxkd"):
        fetch.verified_gguf("gemma-3-270m", str(tmp_path))
