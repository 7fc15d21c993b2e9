"""Sampling continuations from a causal LM with a KV cache, under jit.

``generate(model, variables, prompts, prompt_mask, rng, max_new_tokens=N, ...)`` runs the
prompts (left-padded ``[B, P]``; :func:`left_pad`) through the model once, filling a KV
cache of ``P + N`` slots, then draws ``N`` tokens one at a time in a ``lax.scan``, each step
a single-token forward that reads the cache: ``O(N)`` token forwards instead of the
``O(N^2)`` of re-running the whole prefix. The model is any decoder with
:class:`jaxkd.models.gemma.Gemma3`'s cache interface (``init_cache``, ``positions``,
``cache``, ``index``).

Each token is drawn from ``softmax(z / T)`` restricted to the ``top_k`` most likely tokens
(0 = all) and to the smallest set whose probability reaches ``top_p`` (nucleus sampling,
Holtzman et al. 2020; 1.0 = all); ``temperature=0`` is greedy. A row that has produced
``eos_id`` stops: its later tokens are ``pad_id`` with mask 0. Left padding keeps every
row's positions its own (``cumsum(mask) - 1``), so a prompt gives the same continuation
in any batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray,
                                                                       np.ndarray]:
    """``(ids, mask)`` ``[B, max length]`` int32 with every prompt aligned to the right."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        if len(p):
            ids[row, length - len(p):], mask[row, length - len(p):] = p, 1
    return ids, mask


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """``logits`` ``[B, V]`` with every token outside the ``top_k`` and the ``top_p``
    nucleus set to ``-inf`` (the most likely token always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        probs = jax.nn.softmax(sorted_logits, -1)
        before = jnp.cumsum(probs, -1) - probs  # mass of the more likely tokens
        keep_sorted = before < top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample(rng: jax.Array, logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """One token per row of ``logits`` ``[B, V]`` (module docstring)."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature",
                                             "top_k", "top_p", "eos_id", "pad_id"))
def generate(model: Any, variables: Any, prompts: jax.Array, prompt_mask: jax.Array,
             rng: jax.Array, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             pad_id: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(tokens, mask)`` ``[B, max_new_tokens]``: the continuations of the left-padded
    ``prompts`` ``[B, P]`` (module docstring), mask 1 for every token a row produced (its
    ``eos_id`` included), 0 after it."""
    batch, length = prompts.shape
    positions = jnp.cumsum(prompt_mask, -1) - 1
    cache = model.init_cache(batch, length + max_new_tokens)
    logits, cache = model.apply(variables, prompts, prompt_mask, positions=positions,
                                cache=cache, index=0)
    last = logits[:, -1]
    next_position = positions[:, -1] + 1
    draw = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)

    def step(carry, key):
        cache, last, position, done, t = carry
        token = draw(key, last)
        token = jnp.where(done, pad_id, token)
        live = ~done
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, cache = model.apply(variables, token[:, None], live[:, None].astype(jnp.int32),
                                    positions=position[:, None], cache=cache,
                                    index=length + t)
        return (cache, logits[:, 0], position + 1, done, t + 1), (token, live)

    keys = jax.random.split(rng, max_new_tokens)
    init = (cache, last, next_position, jnp.zeros((batch,), bool), jnp.int32(0))
    _, (tokens, live) = jax.lax.scan(step, init, keys)
    return tokens.T, live.T.astype(jnp.int32)
