"""The one evaluation loop: a metrics function over batches, summed, then averaged.

A *metrics function* maps a batch to ``(sum, count)`` pairs, ``{'accuracy_sum': ...,
'accuracy_count': ...}`` (as a task's ``eval_metrics`` gives them, :mod:`jaxkd.tasks`);
:func:`evaluate` adds them over every batch and divides (:func:`jaxkd.metrics.mean_of`),
so padding rows (mask 0) and uneven last batches never bias a mean. The trainer's eval on
sharded batches, the exported artifact's accuracy and the per-layer sensitivity sweep all
go through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from jaxkd import metrics

MetricsFn = Callable[[Any], Mapping[str, Any]]


def evaluate(metrics_fn: MetricsFn, batches: Iterable[Any], *, timed: bool = False
             ) -> dict[str, float]:
    """Means of ``metrics_fn``'s ``(sum, count)`` pairs over ``batches``.

    The per-batch results stay on the device until the end (one transfer). ``timed`` waits
    for each batch and adds ``eval_latency_ms``, the mean wall time per batch with the
    first (compiling) batch left out.
    """
    results, times = [], []
    for batch in batches:
        start = time.perf_counter()
        result = metrics_fn(batch)
        if timed:
            jax.block_until_ready(result)
            times.append(time.perf_counter() - start)
        results.append(result)
    means = metrics.mean_of(metrics.sum_pairs(jax.device_get(results)))
    if timed:
        timed_batches = times[1:] or times
        means["eval_latency_ms"] = (1000.0 * float(np.mean(timed_batches)) if timed_batches
                                    else float("nan"))
    return means
