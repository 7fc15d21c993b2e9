"""Wall-clock timing shared by the bench scripts (never used by tests).

Every ratio a bench prints is measured in one process, the variants interleaved round by
round so that machine noise hits both sides alike; it is reported as the median over rounds
with its min-max, judged against its target, and flagged when the spread over rounds
(max - min) / median exceeds ``max_spread``: then the ratio means nothing and the bench
says so instead of a verdict.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

MAX_SPREAD = 0.2


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
    """Mean seconds of ``fn()`` over ``calls`` back-to-back calls, after two warm-up calls
    (compilation); waits for the device before stopping the clock."""
    fn()
    fn()
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def interleaved(fns: Mapping[str, Callable[[], Any]], *, rounds: int, calls: int
                ) -> dict[str, np.ndarray]:
    """Seconds per call of every function, one value per round, the functions taking turns
    within each round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(seconds_per_call(fn, calls))
    return {k: np.asarray(v) for k, v in times.items()}


@dataclasses.dataclass(frozen=True)
class Ratio:
    """A ratio over rounds: its median, min and max."""

    values: np.ndarray

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    @property
    def spread(self) -> float:
        return float((self.values.max() - self.values.min()) / abs(self.median))

    def text(self, *, target: tuple[str, float] | None = None,
             max_spread: float = MAX_SPREAD, digits: int = 3) -> str:
        """``'1.003 (0.981-1.020), target >= 0.95: met'``; ``'... : too noisy (spread 34 %)
        to judge'`` when the rounds disagree."""
        out = (f"{self.median:.{digits}f} ({self.values.min():.{digits}f}-"
               f"{self.values.max():.{digits}f})")
        if self.spread > max_spread:
            return out + (f" TOO NOISY (spread {100 * self.spread:.0f} % > "
                          f"{100 * max_spread:.0f} %): rerun on a quiet machine")
        if target is not None:
            op, bound = target
            met = self.median >= bound if op == ">=" else self.median <= bound
            out += f", target {op} {bound:g}: {'met' if met else 'MISSED'}"
        return out


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> Ratio:
    """Round-by-round ratio of two interleaved measurements."""
    return Ratio(np.asarray(numerator) / np.asarray(denominator))
