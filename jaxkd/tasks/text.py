"""Classification of token sequences, one label per sequence (BBC News topics with BERT).

Batch keys (:mod:`jaxkd.data.text`): ``input_ids`` and ``attention_mask`` (int32 ``[B, L]``,
1 on tokens, 0 on padding; ``L`` varies between batches), ``label`` (int32 ``[B]``; ``-1``
marks an unlabelled transfer-set text) and, in evaluation, ``mask`` (1 for real rows, 0 for
the padding of the last batch). The model is called as ``model.apply(variables, input_ids,
attention_mask)`` (:class:`jaxkd.models.bert.BertEncoder`). Targets and metrics are those of
:class:`jaxkd.tasks.classification.Classification`: only the inputs differ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd.tasks.base import Targets
from jaxkd.tasks.classification import Classification


class TextClassification(Classification):
    name = "text_classification"

    def model_inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]:
        return (batch["input_ids"], batch["attention_mask"])

    def example_inputs(self, input_shape: tuple[int, ...], n: int) -> tuple[Any, ...]:
        """Token ids 0 and an all-ones attention mask, int32 ``[n, *input_shape]``."""
        shape = (n, *input_shape)
        return (jnp.zeros(shape, jnp.int32), jnp.ones(shape, jnp.int32))


class SentenceEmbedding(TextClassification):
    """Sentence embeddings distilled from a sentence encoder (Reimers & Gurevych 2020): the
    labels are never learned (every ``labelled`` is 0), so only teacher terms train, e.g.
    ``hint_mse`` between the ``embedding`` features. The head's metrics stay as they are
    (an untrained head's); what a run reports is :mod:`jaxkd.sentence_embedding`'s cosine
    to the teacher and linear-probe accuracy, measured at its end on the embeddings."""

    name = "sentence_embedding"

    def targets(self, batch: dict[str, Any]) -> Targets:
        targets = super().targets(batch)
        return targets._replace(labelled=jnp.zeros_like(targets.labelled))

    def train_metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        return {}  # no label is learned: a training accuracy would be 0 / 0
