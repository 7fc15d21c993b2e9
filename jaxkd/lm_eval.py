"""Language-model evaluation on token rows: perplexity and the per-token KL to a teacher.

Text becomes rows with :func:`token_rows`: each document is its token ids (``<bos>`` first,
from the tokenizer), cut into windows of ``length`` tokens that each start with ``<bos>``
(:func:`jaxkd.data.text.windows`, as the trainer's ``causal_lm`` windows), the last one
right-padded; no row mixes two documents, so no token attends across a document boundary.
A row's position ``t`` predicts token ``t + 1``: every real token but a row's first is a
target.

:func:`evaluate` runs a causal LM (``apply(variables, ids, mask, return_logits=False)`` with
a ``final_hidden`` feature and a tied ``embed`` table, as :class:`jaxkd.models.gemma.Gemma3`)
over the rows in batches and returns the mean next-token cross-entropy in nats, its
perplexity ``exp(CE)``, and, given a teacher, the mean ``KL(p_teacher || p_student)`` per
target token; the ``[B, L, V]`` logits are never formed (:mod:`jaxkd.token_kd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import token_kd
from jaxkd.data import text


def token_rows(texts: Sequence[str], encode: Callable[[str], list[int]], length: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` int32 ``[rows, length]``: each text's tokens in windows (module
    docstring); windows of a single token are dropped (they predict nothing)."""
    encoded = [np.asarray(encode(t), np.int32) for t in texts]
    lengths = np.array([len(e) for e in encoded], np.int64)
    documents = text.TokenizedText(
        ids=np.concatenate(encoded) if encoded else np.zeros(0, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        labels=np.zeros(len(texts), np.int32), max_length=max(int(lengths.max(initial=1)), 1))
    rows = text.windows(documents, length)
    return rows.padded(np.arange(len(rows)), length)


def _head(variables: Any) -> Callable[[jax.Array], jax.Array]:
    return token_kd.tied_head(variables["params"]["embed"]["embedding"])


def evaluate(model: Any, variables: Any, ids: np.ndarray, mask: np.ndarray, *,
             teacher: tuple[Any, Any] | None = None, batch_size: int = 8,
             chunk_tokens: int = 256) -> dict[str, float]:
    """``{'tokens', 'cross_entropy', 'perplexity'[, 'kl_to_teacher']}`` over the rows
    (module docstring); ``teacher``: ``(model, variables)``."""

    def hidden(m, v, x, k):
        return m.apply(v, x, k, return_logits=False)["final_hidden"]

    @jax.jit  # the weights are arguments, not constants baked into the compiled function
    def sums(v_s, v_t, x, k):
        h_s = hidden(model, v_s, x, k)[:, :-1]
        targets = (k[:, 1:] * k[:, :-1]).astype(jnp.float32)  # real token, real predictor
        if teacher is None:
            h_t, t_head = h_s, _head(v_s)
        else:
            h_t, t_head = hidden(teacher[0], v_t, x, k)[:, :-1], _head(v_t)
        out = token_kd.token_losses(h_s, h_t, targets, student_head=_head(v_s),
                                    teacher_head=t_head, labels=x[:, 1:],
                                    chunk_tokens=chunk_tokens)
        return (jnp.sum(out.cross_entropy), jnp.sum(out.divergence), jnp.sum(targets))

    ce = kl = n = 0.0
    for start in range(0, len(ids), batch_size):
        x, k = ids[start:start + batch_size], mask[start:start + batch_size]
        if len(x) < batch_size:  # one compiled shape: pad with empty rows
            x = np.concatenate([x, np.zeros((batch_size - len(x), x.shape[1]), x.dtype)])
            k = np.concatenate([k, np.zeros((batch_size - len(k), k.shape[1]), k.dtype)])
        c, d, t = jax.device_get(sums(variables, None if teacher is None else teacher[1],
                                      jnp.asarray(x), jnp.asarray(k)))
        ce, kl, n = ce + float(c), kl + float(d), n + float(t)
    if not n:
        raise ValueError("evaluate: the rows hold no target token")
    result = {"tokens": int(n), "cross_entropy": ce / n, "perplexity": math.exp(ce / n)}
    if teacher is not None:
        result["kl_to_teacher"] = kl / n
    return result
