"""Classification of one input per example: images (``[B, H, W, C]``) or signals (``[B, L]``).

Batch keys: ``image`` (the model's input), ``label`` (int32 ``[B]``; ``-1`` marks a
transfer-set input without a label) and, in evaluation, ``mask`` (1 for real rows, 0 for
the padding of the last batch). Label terms average over labelled examples, teacher terms
over every example; the metrics are accuracy (and, in evaluation, cross-entropy).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import losses
from jaxkd.tasks.base import Targets


class Classification:
    name = "classification"

    def model_inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]:
        return (batch["image"],)

    def example_inputs(self, input_shape: tuple[int, ...], n: int) -> tuple[Any, ...]:
        return (jnp.zeros((n, *input_shape), jnp.float32),)

    def targets(self, batch: dict[str, Any]) -> Targets:
        labels = batch["label"]
        return Targets(labels=labels, labelled=(labels >= 0).astype(jnp.float32), mask=None)

    def train_metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]:
        correct = (jnp.argmax(logits, -1) == targets.labels).astype(jnp.float32)
        correct = correct * targets.labelled
        return {"accuracy_sum": correct.sum(), "accuracy_count": targets.labelled.sum()}

    def eval_metrics(self, logits: jax.Array, batch: dict[str, Any]) -> dict[str, jax.Array]:
        mask = batch.get("mask")
        if mask is None:
            mask = jnp.ones(jnp.shape(batch["label"]), jnp.float32)
        ce = losses.cross_entropy(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss_sum": (ce * mask).sum(), "loss_count": mask.sum(),
                "accuracy_sum": (correct * mask).sum(), "accuracy_count": mask.sum()}
