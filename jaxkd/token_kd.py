"""Token-level distillation of language models at large vocabularies, one chunk at a time.

A causal LM's distillation loss compares, at every position, the student's next-token
distribution with the teacher's: per token ``D(p_t, p_s)`` with ``p = softmax(h W / T)``,
``h`` the final hidden state and ``W`` the LM head (for Gemma, the tied embedding table).
Written naively it holds the ``[B, L, V]`` logits of both models, and their gradients: at
Gemma 3's ``V = 262,144``, 8 sequences of 512 tokens are 4 GiB per float32 copy.

:func:`token_losses` never materialises them. The ``B L`` tokens are cut into chunks of
``chunk_tokens``; a ``lax.scan`` computes, per chunk, both heads' logits ``[chunk, V]``,
the divergence per token (and the student's cross-entropy on the next-token labels), and
drops the logits; the chunk body is rematerialised (``jax.checkpoint``), so the backward
pass recomputes a chunk's logits instead of keeping them. Peak memory is a few
``[chunk, V]`` arrays instead of a few ``[B L, V]`` ones, for the same values and
gradients (``bench/token_kd_memory.py`` measures both from XLA's compiled memory analysis).

Divergences (``divergence=``), per token, the functions of :mod:`jaxkd.losses`:

==============  ===============================================  ==========================
``forward_kl``  ``T^2 KL(p_t || p_s)``                            Hinton et al. 2015
``reverse_kl``  ``T^2 KL(p_s || p_t)``                            Gu et al. 2024 (MiniLLM)
``jsd``         ``T^2 [b KL(p_t || m) + (1-b) KL(p_s || m)]``,    Agarwal et al. 2024 (GKD)
                ``m = b p_t + (1 - b) p_s``
``tvd``         ``1/2 sum_v |p_t - p_s|``                         Agarwal et al. 2024 (GKD)
==============  ===============================================  ==========================

A teacher stored offline as its top-k logits, their ids and its residual mass per token
(:func:`topk_token_losses`) is compared the same way, the student's logits in chunks.

The heads are functions ``hidden [c, D] -> logits [c, V]`` (:func:`dense_head`,
:func:`tied_head`, or any other, e.g. with logit soft-capping), so the head's parameters are
differentiated through the closure. Values are per token ``[B, L]``, 0 where ``mask`` is 0
(reduce with :func:`jaxkd.losses.masked_mean`); like every loss of :mod:`jaxkd.losses`,
nothing here stops the teacher's gradient: the caller decides what is trained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxkd import losses

Head = Callable[[jax.Array], jax.Array]
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


class TokenLosses(NamedTuple):
    """Per-token values ``[B, L]`` (0 where the mask is 0)."""

    divergence: jax.Array
    cross_entropy: jax.Array | None  # the student's, when labels were given


def dense_head(kernel: ArrayLike, bias: ArrayLike | None = None) -> Head:
    """``h -> h @ kernel (+ bias)`` with a ``[D, V]`` kernel, accumulated in float32."""

    def head(h: jax.Array) -> jax.Array:
        z = jnp.dot(h, kernel, preferred_element_type=jnp.float32)
        return z if bias is None else z + bias

    return head


def tied_head(embedding: ArrayLike) -> Head:
    """``h -> h @ E^T`` with the ``[V, D]`` embedding table (tied input and output
    embeddings, as Gemma's), accumulated in float32, without transposing ``E``."""

    def head(h: jax.Array) -> jax.Array:
        return jax.lax.dot_general(h, embedding, (((h.ndim - 1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    return head


def divergence_fn(divergence: str, *, temperature: float = 1.0, beta: float = 0.5
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(student_logits, teacher_logits) -> [...]``: the per-token divergence named
    ``divergence`` (one of ``DIVERGENCES``)."""
    if divergence == "forward_kl":
        return lambda s, t: losses.soft_target_kl(s, t, temperature)
    if divergence == "reverse_kl":
        return lambda s, t: losses.reverse_kl(s, t, temperature)
    if divergence == "jsd":
        return lambda s, t: losses.generalized_jsd(s, t, beta, temperature)
    if divergence == "tvd":
        return lambda s, t: losses.total_variation(s, t, temperature)
    raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")


def token_losses(student_hidden: ArrayLike, teacher_hidden: ArrayLike, mask: ArrayLike, *,
                 student_head: Head, teacher_head: Head, labels: ArrayLike | None = None,
                 divergence: str = "forward_kl", temperature: float = 1.0,
                 beta: float = 0.5, chunk_tokens: int = 256) -> TokenLosses:
    """Per-token distillation divergence (and cross-entropy) without ``[B, L, V]`` logits.

    Args:
      student_hidden: ``[B, L, D_s]``, the student's final hidden states (after its final
        norm), any float dtype.
      teacher_hidden: ``[B, L, D_t]``.
      mask: ``[B, L]``, nonzero where the token counts (not padding, not the prompt).
      student_head, teacher_head: ``[c, D] -> [c, V]`` (:func:`dense_head`,
        :func:`tied_head`); both give the same ``V``.
      labels: optional ``[B, L]`` integer next-token ids: the student's cross-entropy too
        (negative ids give 0, as :func:`jaxkd.losses.cross_entropy`).
      divergence: one of ``DIVERGENCES``; ``temperature`` ``T``; ``beta`` for ``'jsd'``.
      chunk_tokens: tokens per chunk; peak memory grows with ``chunk_tokens * V``.

    Returns:
      :class:`TokenLosses` of ``[B, L]`` arrays, 0 where ``mask`` is 0.
    """
    per_token = divergence_fn(divergence, temperature=temperature, beta=beta)
    hs, ht, mask = jnp.asarray(student_hidden), jnp.asarray(teacher_hidden), jnp.asarray(mask)
    if hs.ndim != 3 or ht.ndim != 3 or hs.shape[:2] != ht.shape[:2] or mask.shape != hs.shape[:2]:
        raise ValueError(f"token_losses: hidden states must be [B, L, D] with one [B, L] mask; "
                         f"got student {hs.shape}, teacher {ht.shape}, mask {mask.shape}")

    def values(z_s, h_t):
        return per_token(z_s, teacher_head(h_t))

    return _chunked("token_losses", values, hs, (ht,), mask, student_head, labels,
                    chunk_tokens)


def _chunked(name: str, divergence: Callable[..., jax.Array], hidden: jax.Array,
             teacher: tuple[jax.Array, ...], mask: jax.Array, head: Head,
             labels: ArrayLike | None, chunk_tokens: int) -> TokenLosses:
    """The chunked scan shared by :func:`token_losses` and :func:`topk_token_losses`:
    ``divergence(student_logits [c, V], *teacher_chunk) -> [c]`` per chunk of tokens."""
    if int(chunk_tokens) < 1:
        raise ValueError(f"{name}: chunk_tokens must be >= 1, got {chunk_tokens}")
    batch, length = mask.shape
    n = batch * length
    chunk = min(int(chunk_tokens), n)
    pad = -n % chunk
    with_labels = labels is not None
    flat_labels = (jnp.asarray(labels) if with_labels else jnp.zeros((batch, length), jnp.int32))

    def chunks(x: jax.Array, fill=0) -> jax.Array:
        x = x.reshape(n, *x.shape[2:])
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
        return x.reshape(-1, chunk, *x.shape[1:])

    @jax.checkpoint  # the backward recomputes the chunk's logits instead of saving them
    def chunk_values(h_s, m, y, *t):
        z_s = head(h_s)
        keep = m != 0
        d = jnp.where(keep, divergence(z_s, *t), 0.0)
        ce = (jnp.where(keep, losses.cross_entropy(z_s, y), 0.0) if with_labels
              else jnp.zeros_like(d))
        return d, ce

    def body(carry, xs):
        return carry, chunk_values(*xs)

    _, (d, ce) = jax.lax.scan(body, None, (chunks(hidden), chunks(mask), chunks(flat_labels, -1),
                                          *(chunks(t) for t in teacher)))
    d = d.reshape(-1)[:n].reshape(batch, length)
    ce = ce.reshape(-1)[:n].reshape(batch, length) if with_labels else None
    return TokenLosses(d, ce)


def token_cross_entropy(hidden: ArrayLike, labels: ArrayLike, mask: ArrayLike, *,
                        head: Head, chunk_tokens: int = 256) -> jax.Array:
    """The next-token cross-entropy ``-log softmax(h W)[y]`` per token ``[B, L]`` (0 where
    ``mask`` is 0), the ``[B, L, V]`` logits never formed (chunks, as :func:`token_losses`)."""
    hidden, mask = jnp.asarray(hidden), jnp.asarray(mask)
    if hidden.ndim != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"token_cross_entropy: hidden states [B, L, D] and mask [B, L]; got "
                         f"{hidden.shape} and {mask.shape}")

    def nothing(z_s):
        return jnp.zeros(z_s.shape[:-1], jnp.float32)

    return _chunked("token_cross_entropy", nothing, hidden, (), mask, head, labels,
                    chunk_tokens).cross_entropy


def topk_token_losses(student_hidden: ArrayLike, topk_logits: ArrayLike,
                      topk_indices: ArrayLike, residual: ArrayLike | None, mask: ArrayLike, *,
                      student_head: Head, labels: ArrayLike | None = None,
                      temperature: float = 1.0, chunk_tokens: int = 256) -> TokenLosses:
    """:func:`jaxkd.losses.topk_soft_target_kl` per token against a teacher stored as its
    top-k logits ``[B, L, k]``, their ids ``[B, L, k]`` and its residual mass ``[B, L]``
    outside them (None: renormalised over the k), the student's ``[B, L, V]`` logits never
    formed (chunks, as :func:`token_losses`; the student's log-normaliser over all ``V``
    ids is computed inside each chunk)."""
    hs, mask = jnp.asarray(student_hidden), jnp.asarray(mask)
    values, ids = jnp.asarray(topk_logits), jnp.asarray(topk_indices)
    if hs.ndim != 3 or values.shape[:2] != hs.shape[:2] or ids.shape != values.shape \
            or mask.shape != hs.shape[:2]:
        raise ValueError(f"topk_token_losses: student hidden [B, L, D], top-k logits and ids "
                         f"[B, L, k], mask [B, L]; got {hs.shape}, {values.shape}, "
                         f"{ids.shape}, {mask.shape}")
    teacher: tuple[jax.Array, ...] = (values, ids)
    if residual is not None:
        teacher += (jnp.asarray(residual, jnp.float32),)

    def divergence(z_s, t_values, t_ids, *r):
        return losses.topk_soft_target_kl(z_s, t_values, t_ids, temperature,
                                          r[0] if r else None)

    return _chunked("topk_token_losses", divergence, hs, teacher, mask, student_head, labels,
                    chunk_tokens)


def naive_token_losses(student_hidden: ArrayLike, teacher_hidden: ArrayLike, mask: ArrayLike,
                       *, student_head: Head, teacher_head: Head,
                       labels: ArrayLike | None = None, divergence: str = "forward_kl",
                       temperature: float = 1.0, beta: float = 0.5) -> TokenLosses:
    """:func:`token_losses` computed on the whole ``[B, L, V]`` logits at once (the
    reference for tests and the memory bench)."""
    per_token = divergence_fn(divergence, temperature=temperature, beta=beta)
    z_s, z_t = student_head(jnp.asarray(student_hidden)), teacher_head(jnp.asarray(teacher_hidden))
    keep = jnp.asarray(mask) != 0
    d = jnp.where(keep, per_token(z_s, z_t), 0.0)
    ce = None if labels is None else jnp.where(keep, losses.cross_entropy(z_s, labels), 0.0)
    return TokenLosses(d, ce)
