r"""Gemma 3's decoder (Gemma Team 2025, "Gemma 3 Technical Report"), as llama.cpp runs it.

On token ids ``[B, L]`` (right-padded; ``mask`` ``[B, L]``, 1 = token)::

    x_0 = E[ids] * sqrt(D)
    per layer i:   a = RMSNorm_post_attn(Attention_i(RMSNorm_attn(x)))      x = x + a
                   f = RMSNorm_post_ffw(W_down(gelu_tanh(x W_gate) * (x W_up)))   on
                       RMSNorm_ffn(x)                                        x = x + f
    h = RMSNorm_out(x)            logits = h E^T       (the embedding table, tied)

``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w`` with the scale ``w`` as stored in the GGUF
file (its converter has added Gemma's ``1 +`` already). Attention is grouped-query
(``num_heads`` query heads share ``num_kv_heads`` key/value heads, ``head_dim`` each), with
RMSNorm of every query and key head (QK-norm, its own ``[head_dim]`` scale), rotary
position embeddings on halves (NeoX layout, as llama.cpp's ``LLAMA_ROPE_TYPE_NEOX``) of base
``rope_global_base`` on global layers and ``rope_local_base`` on local ones, the queries
scaled by ``query_scale`` (``head_dim^-1/2``), causal; local layers see only the last
``sliding_window`` positions (``i - j < window``); every ``global_every``-th layer is
global (layers 5, 11, 17 of 18). Softmax in float32; padding keys are never attended.

Parameter names follow the GGUF tensors (:mod:`jaxkd.models.gguf_io` loads them):
``embed/embedding`` ``[V, D]``; ``layer{i}/{attn_norm, attn_q_norm, attn_k_norm,
post_attention_norm, ffn_norm, post_ffw_norm}/scale``; ``layer{i}/attn_{q,k,v,output}`` and
``layer{i}/ffn_{gate,up,down}`` (Dense ``kernel`` ``[in, out]``, no bias); ``output_norm/scale``.

``apply(variables, ids, mask, return_logits=True, return_features=False)`` returns float32
logits ``[B, L, V]``; with ``return_features`` also ``{'embeddings': x_0, 'hidden{i}': x
after layer i, 'final_hidden': h, 'lm_head': E, 'mask': mask}`` (``lm_head`` is the
``[V, D]`` table the logits are ``h E^T`` of). For distillation at large ``V`` give
``final_hidden`` and ``lm_head`` to :func:`jaxkd.token_kd.token_losses`
(:func:`jaxkd.token_kd.tied_head`), which never forms the logits: the objective's token
terms do (:mod:`jaxkd.objective`), and under ``jit`` the unused logits are never computed.
``return_logits=False`` returns the features alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

NEG_INF = -1e30  # additive mask of an unseen key (finite: a fully masked row stays finite)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in float32."""

    eps: float
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Rotary embedding on halves (NeoX): ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]``
    with ``theta_k = positions * base^(-2k/d)``; ``x`` ``[B, L, H, d]``, ``positions``
    ``[B, L]``."""
    half = x.shape[-1] // 2
    inv = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
    angles = positions.astype(jnp.float32)[..., None, None] * inv  # [B, L, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def attention_bias(query_positions: jax.Array, key_positions: jax.Array, key_mask: jax.Array,
                   window: int | None) -> jax.Array:
    """``[B, 1, Lq, Lk]`` additive bias: 0 where a query at position ``i`` may see a key at
    position ``j`` (``j <= i``, ``i - j < window`` if a window is given, the key a token,
    not padding), ``NEG_INF`` elsewhere. Positions ``[B, Lq]``, ``[B, Lk]``; mask ``[B, Lk]``."""
    i, j = query_positions[:, :, None], key_positions[:, None, :]
    seen = (j <= i) & (key_mask[:, None, :] != 0)
    if window is not None:
        seen &= (i - j) < window
    return jnp.where(seen, 0.0, NEG_INF).astype(jnp.float32)[:, None]


class GemmaAttention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    query_scale: float
    rope_base: float
    eps: float
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array,
                 cache: dict[str, jax.Array] | None = None, index: Any = 0) -> tuple:
        """``(output, cache)``: with a ``cache`` (``{'k', 'v'}`` ``[B, S, KV, d]``) this
        call's keys and values are written at ``index`` and the queries attend to all
        ``S`` cached positions (``bias`` ``[B, 1, L, S]``)."""
        batch, length, _ = x.shape
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        q = nn.Dense(self.num_heads * self.head_dim, name="attn_q", **dense)(x)
        k = nn.Dense(self.num_kv_heads * self.head_dim, name="attn_k", **dense)(x)
        v = nn.Dense(self.num_kv_heads * self.head_dim, name="attn_v", **dense)(x)
        q = q.reshape(batch, length, self.num_heads, self.head_dim)
        k = k.reshape(batch, length, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, length, self.num_kv_heads, self.head_dim)
        q = RMSNorm(self.eps, self.param_dtype, name="attn_q_norm")(q)
        k = RMSNorm(self.eps, self.param_dtype, name="attn_k_norm")(k)
        q = rope(q, positions, self.rope_base) * jnp.asarray(self.query_scale, q.dtype)
        k = rope(k, positions, self.rope_base)
        if cache is not None:
            at = (0, index, 0, 0)
            cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
                     "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)}
            k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
        group = self.num_heads // self.num_kv_heads  # query heads per key/value head
        q = q.reshape(batch, length, self.num_kv_heads, group, self.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = scores + bias[:, :, None]  # [B, 1, 1, L, L] over kv heads and groups
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return nn.Dense(x.shape[-1], name="attn_output", **dense)(out), cache


class GemmaBlock(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    query_scale: float
    rope_base: float
    eps: float
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, bias: jax.Array,
                 cache: dict[str, jax.Array] | None = None, index: Any = 0) -> tuple:
        norm = dict(eps=self.eps, param_dtype=self.param_dtype)
        h = RMSNorm(**norm, name="attn_norm")(x)
        h, cache = GemmaAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                  self.query_scale, self.rope_base, self.eps, self.dtype,
                                  self.param_dtype, name="attention")(h, positions, bias,
                                                                      cache, index)
        x = x + RMSNorm(**norm, name="post_attention_norm")(h)
        h = RMSNorm(**norm, name="ffn_norm")(x)
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.intermediate_size:
            gate = nn.Dense(self.intermediate_size, name="ffn_gate", **dense)(h)
            up = nn.Dense(self.intermediate_size, name="ffn_up", **dense)(h)
            h = nn.Dense(x.shape[-1], name="ffn_down", **dense)(
                jax.nn.gelu(gate, approximate=True) * up)
        else:  # every FFN neuron pruned: the branch adds nothing
            h = jnp.zeros_like(x)
        return x + RMSNorm(**norm, name="post_ffw_norm")(h), cache


class Gemma3(nn.Module):
    """Gemma 3's decoder (module docstring). ``layer_intermediate``: per-layer FFN widths
    (a width-pruned student), else ``intermediate_size`` everywhere."""

    vocab_size: int = 262_144
    hidden_size: int = 640
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 2048
    sliding_window: int = 512
    global_every: int = 6
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    query_scale: float | None = None
    rms_eps: float = 1e-6
    layer_intermediate: Sequence[int] | None = None
    dtype: DTypeLike = jnp.float32
    param_dtype: DTypeLike = jnp.float32

    def is_global(self, layer: int) -> bool:
        return (layer + 1) % self.global_every == 0

    def init_cache(self, batch: int, length: int, dtype: DTypeLike = jnp.float32
                   ) -> dict[str, Any]:
        """An empty KV cache of ``length`` positions: per layer ``{'k', 'v'}`` ``[B, S,
        KV, d]``, and the ``positions`` and ``mask`` ``[B, S]`` of what has been written."""
        shape = (batch, length, self.num_kv_heads, self.head_dim)
        return {"layers": [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                           for _ in range(self.num_layers)],
                "positions": jnp.zeros((batch, length), jnp.int32),
                "mask": jnp.zeros((batch, length), jnp.int32)}

    @nn.compact
    def __call__(self, input_ids: jax.Array, mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, cache: dict[str, Any] | None = None,
                 index: Any = 0, train: bool = False, return_logits: bool = True,
                 return_features: bool = False) -> Any:
        """Logits ``[B, L, V]`` (module docstring). ``positions`` ``[B, L]`` (default
        ``0..L-1``; left-padded prompts: ``cumsum(mask) - 1``). With a ``cache``
        (:meth:`init_cache`) the tokens are written at cache slots ``index..index+L-1``,
        attend to every cached token, and ``(output, cache)`` is returned."""
        del train  # no dropout
        ids = jnp.asarray(input_ids)
        mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        positions = jnp.asarray(positions, jnp.int32)
        key_positions, key_mask = positions, mask
        if cache is not None:
            key_positions = jax.lax.dynamic_update_slice(cache["positions"], positions,
                                                         (0, index))
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask, (0, index))
        embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(ids) * jnp.asarray(math.sqrt(self.hidden_size), self.dtype)
        features: dict[str, jax.Array] = {"embeddings": x}
        scale = self.query_scale or self.head_dim ** -0.5
        biases = {True: attention_bias(positions, key_positions, key_mask, None),
                  False: attention_bias(positions, key_positions, key_mask,
                                        self.sliding_window)}
        widths = self.layer_intermediate or (self.intermediate_size,) * self.num_layers
        layer_caches = []
        for i in range(self.num_layers):
            glob = self.is_global(i)
            x, layer_cache = GemmaBlock(
                self.num_heads, self.num_kv_heads, self.head_dim, int(widths[i]), scale,
                self.rope_global_base if glob else self.rope_local_base, self.rms_eps,
                self.dtype, self.param_dtype, name=f"layer{i}")(
                x, positions, biases[glob], None if cache is None else cache["layers"][i],
                index)
            layer_caches.append(layer_cache)
            features[f"hidden{i + 1}"] = x
        h = RMSNorm(self.rms_eps, self.param_dtype, name="output_norm")(x)
        features["final_hidden"] = h
        features["lm_head"] = embed.embedding
        features["mask"] = mask
        if not return_logits:
            out = features
        else:
            logits = embed.attend(h.astype(self.dtype)).astype(jnp.float32)
            out = (logits, features) if return_features else logits
        if cache is None:
            return out
        return out, {"layers": layer_caches, "positions": key_positions, "mask": key_mask}


def build_gemma3(*, num_classes: int, hidden_size: int = 640, num_layers: int = 18,
                 num_heads: int = 4, num_kv_heads: int = 1, head_dim: int = 256,
                 intermediate_size: int = 2048, sliding_window: int = 512,
                 global_every: int = 6, rope_local_base: float = 10_000.0,
                 rope_global_base: float = 1_000_000.0, query_scale: float | None = None,
                 rms_eps: float = 1e-6, layer_intermediate: Sequence[int] | None = None,
                 dtype: DTypeLike = jnp.float32, param_dtype: DTypeLike = jnp.float32
                 ) -> Gemma3:
    """The zoo's ``gemma3``: :class:`Gemma3` whose vocabulary is ``num_classes`` (the
    tokenizer's, for a causal LM task); the defaults are Gemma 3 270M's."""
    return Gemma3(vocab_size=num_classes, hidden_size=hidden_size, num_layers=num_layers,
                  num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                  intermediate_size=intermediate_size, sliding_window=sliding_window,
                  global_every=global_every, rope_local_base=rope_local_base,
                  rope_global_base=rope_global_base, query_scale=query_scale,
                  rms_eps=rms_eps,
                  layer_intermediate=None if layer_intermediate is None
                  else tuple(layer_intermediate),
                  dtype=dtype, param_dtype=param_dtype)


def config_of(model: Gemma3) -> dict[str, Any]:
    """The model's fields (its kwargs), for manifests and summaries."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
