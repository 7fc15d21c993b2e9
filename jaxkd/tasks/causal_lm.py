"""Causal language modelling: every token predicts the next one (a decoder such as Gemma 3).

Batch keys (:mod:`jaxkd.data.text` with ``config.data.task='causal_lm'``): ``input_ids``
and ``attention_mask`` (int32 ``[B, L]``, right-padded windows of documents). The model is
called as ``model.apply(variables, input_ids, attention_mask)`` and returns logits
``[B, L, V]`` (:class:`jaxkd.models.gemma.Gemma3`).

Position ``t`` is trained to predict token ``t + 1``: the targets are the ids shifted left,
and a position counts when it and its successor are both tokens::

    labels[b, t]   = ids[b, t + 1]            (0 at t = L - 1)
    labelled[b, t] = mask[b, t] * mask[b, t + 1]   (0 at t = L - 1)

Label terms and teacher terms alike average over those positions (``Targets.mask`` is
``labelled``), times the batch's ``loss_mask`` ``[B, L]`` when it has one (a generated
batch counts only the positions whose next token was generated: :mod:`jaxkd.on_policy`).
At large vocabularies the objective's token terms (``token_kd``, ``token_cross_entropy``:
:mod:`jaxkd.objective`) compare final hidden states through the LM head in chunks;
training logs no logit metric, so under ``jit`` the ``[B, L, V]`` logits of the training
step are never formed. Evaluation reports the next-token cross-entropy
(``loss``, nats per token; perplexity is ``exp(loss)``) and top-1 accuracy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.tasks.base import Targets
from jaxkd.tasks.text import TextClassification


def next_token_targets(input_ids: jax.Array, attention_mask: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """``(labels int32 [B, L], labelled float32 [B, L])`` (module docstring)."""
    ids, mask = jnp.asarray(input_ids), jnp.asarray(attention_mask)
    labels = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    labelled = jnp.pad((mask[:, 1:] != 0) & (mask[:, :-1] != 0), ((0, 0), (0, 1)))
    return labels.astype(jnp.int32), labelled.astype(jnp.float32)


class CausalLM(TextClassification):
    name = "causal_lm"

    def targets(self, batch: dict[str, Any]) -> Targets:
        labels, labelled = next_token_targets(batch["input_ids"], batch["attention_mask"])
        if "loss_mask" in batch:
            labelled = labelled * jnp.asarray(batch["loss_mask"], jnp.float32)
        return Targets(labels=labels, labelled=labelled, mask=labelled)

    def train_metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        """None: the objective's terms are logged, and a metric of the logits would make
        the step form them."""
        del logits
        return {"tokens_sum": targets.labelled.sum(), "tokens_count": jnp.ones(())}

    def eval_metrics(self, logits: jax.Array, batch: dict[str, Any]) -> dict[str, jax.Array]:
        labels, labelled = next_token_targets(batch["input_ids"], batch["attention_mask"])
        if batch.get("mask") is not None:  # the padding rows of the last batch
            labelled = labelled * jnp.asarray(batch["mask"], jnp.float32)[:, None]
        ce = losses.cross_entropy(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return {"loss_sum": (ce * labelled).sum(), "loss_count": labelled.sum(),
                "accuracy_sum": (correct * labelled).sum(), "accuracy_count": labelled.sum()}
