"""Where a run's numbers go: console, ``metrics.jsonl``, TensorBoard and ``summary.json``.

Metrics travel as ``(sum, count)`` pairs so that averages stay unbiased across devices,
hosts and logging windows (as in Tunix): :func:`mean_of` turns the summed pairs into means.
Only process 0 writes files; TensorBoard event files come from tensorboardX (no TensorFlow).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd import files, multihost

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def sum_pairs(pairs: list[Mapping[str, Any]]) -> dict[str, float]:
    """Adds up a list of metric dicts (already on the host) key by key."""
    total: dict[str, float] = {}
    for pair in pairs:
        for k, v in pair.items():
            total[k] = total.get(k, 0.0) + float(np.asarray(v))
    return total


def mean_of(sums: Mapping[str, float]) -> dict[str, float]:
    """``{'x_sum': s, 'x_count': n}`` -> ``{'x': s / n}``; other keys pass through."""
    out = {}
    for k, v in sums.items():
        if k.endswith("_sum"):
            name = k[: -len("_sum")]
            count = sums.get(name + "_count", 0.0)
            out[name] = v / count if count else math.nan
        elif not k.endswith("_count"):
            out[k] = v
    return out


class MetricWriter:
    """Writes scalars to the console, ``metrics.jsonl`` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, *, total_steps: int, tensorboard: bool = True):
        self.enabled = multihost.is_leader()
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._last_time: float | None = None
        self._last_step: int | None = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, prefix: str, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def progress(self, step: int, scalars: Mapping[str, float]) -> float:
        """Prints a progress line with steps/s and ETA; returns the steps/s of the window."""
        now = time.perf_counter()
        rate = math.nan
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) / (now - self._last_time)
        self._last_time, self._last_step = now, step
        if self.enabled:
            eta = (self.total_steps - step) / rate if rate and rate == rate else math.nan
            shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
            print(f"step {step}/{self.total_steps} {shown} | {rate:.1f} steps/s | ETA {eta_text}",
                  flush=True)
        return rate

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def append_jsonl(workdir: str, record: Mapping[str, Any]) -> None:
    """Appends one record to ``metrics.jsonl`` (process 0 only)."""
    if multihost.is_leader():
        with open(os.path.join(workdir, METRICS_FILE), "a") as f:
            f.write(json.dumps(record) + "\n")


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """Writes ``summary.json`` atomically (process 0 only)."""
    if not multihost.is_leader():
        return
    files.write_json(os.path.join(workdir, SUMMARY_FILE), summary, indent=2, sort_keys=True,
                     default=str)


def read_summary(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
