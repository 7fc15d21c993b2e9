"""The one evaluation loop: a metrics function over batches, summed, then averaged.

A *metrics function* maps a batch to ``(sum, count)`` pairs, ``{'accuracy_sum': ...,
'accuracy_count': ...}`` (as a task's ``eval_metrics`` gives them, :mod:`jaxkd.tasks`);
:func:`evaluate` adds them over every batch and divides (:func:`jaxkd.metrics.mean_of`),
so padding rows (mask 0) and uneven last batches never bias a mean. The trainer's eval on
sharded batches, the exported artifact's accuracy and the per-layer sensitivity sweep all
go through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from jaxkd import metrics

MetricsFn = Callable[[Any], Mapping[str, Any]]


def evaluate(metrics_fn: MetricsFn, batches: Iterable[Any]) -> dict[str, float]:
    """Means of ``metrics_fn``'s ``(sum, count)`` pairs over ``batches``; the per-batch
    results stay on the device until the end (one transfer). Speed is measured elsewhere
    (``bench/latency.py``), not while evaluating."""
    results = [metrics_fn(batch) for batch in batches]
    return metrics.mean_of(metrics.sum_pairs(jax.device_get(results)))
