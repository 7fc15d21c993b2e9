"""The task protocol (see :mod:`jaxkd.tasks`)."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax


class Targets(NamedTuple):
    """What a batch asks of the student: ``labels``, which positions have one
    (``labelled``, float ``[B, ...]``) and which positions count at all (``mask``, None =
    every one)."""

    labels: jax.Array
    labelled: jax.Array
    mask: jax.Array | None


class Task(Protocol):
    name: str

    def model_inputs(self, batch: dict[str, Any]) -> tuple[Any, ...]: ...

    def example_inputs(self, input_shape: tuple[int, ...], n: int) -> tuple[Any, ...]: ...

    def targets(self, batch: dict[str, Any]) -> Targets: ...

    def train_metrics(self, logits: jax.Array, targets: Targets) -> dict[str, jax.Array]: ...

    def eval_metrics(self, logits: jax.Array, batch: dict[str, Any]) -> dict[str, jax.Array]: ...
