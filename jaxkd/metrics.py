"""Where a run's numbers go: console, ``metrics.jsonl``, TensorBoard and ``summary.json``.

Metrics travel as ``(sum, count)`` pairs so that averages stay unbiased across devices,
hosts and logging windows (as in Tunix): :func:`mean_of` turns the summed pairs into means.
Only process 0 writes files; TensorBoard event files are written with tensorboardX's
protos (no TensorFlow), synchronously.
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
    """Writes scalars to the console, ``metrics.jsonl`` and TensorBoard (process 0 only).

    Both logs hold every step trained exactly once: a run resumed from step ``k`` first
    drops the records after ``k`` (steps that a kill lost and that are trained again) and
    the final evaluation (written again at the end), and TensorBoard is told to purge its
    events from step ``k + 1`` on (``purge_step``). Every write is flushed, so both logs
    are live during a run and complete after a kill.
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True):
        self.enabled = multihost.is_leader()
        self.total_steps = total_steps
        self._jsonl = None
        self._tb = None
        self._last_time: float | None = None
        self._last_step: int | None = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, METRICS_FILE)
        if os.path.exists(path):
            drop_records_after(path, start_step)
        self._jsonl = open(path, "a")
        if tensorboard:
            self._tb = EventFile(os.path.join(workdir, "tensorboard"), start_step=start_step)

    def started(self, step: int) -> None:
        """The step that compiled has finished: rates are measured from here."""
        self._last_time, self._last_step = time.perf_counter(), step

    def write(self, step: int, prefix: str, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": v for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(step, {f"{prefix}/{k}": v for k, v in scalars.items()})

    def progress(self, step: int, scalars: Mapping[str, float]) -> float:
        """Prints a progress line with steps/s and ETA; returns the steps/s of the window."""
        now = time.perf_counter()
        rate = math.nan
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) / (now - self._last_time)
        self._last_time, self._last_step = now, step
        if self.enabled:
            shown = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
            if rate == rate:
                eta = time.strftime("%H:%M:%S", time.gmtime((self.total_steps - step) / rate))
                speed = f"{rate:.1f} steps/s | ETA {eta}"
            else:
                speed = "compiling"
            print(f"step {step}/{self.total_steps} {shown} | {speed}", flush=True)
        return rate

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class EventFile:
    """A TensorBoard event file written synchronously (tensorboardX's ``EventsWriter``, not
    its queue and thread): every scalar is on disk when :meth:`scalars` returns.

    A run resumed from step ``k`` starts its own file with a session start at step
    ``k + 1``, TensorBoard's signal to purge the earlier files' events from that step on
    (what ``SummaryWriter(purge_step=...)`` writes).
    """

    def __init__(self, directory: str, *, start_step: int = 0):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2

        self._pb = event_pb2
        os.makedirs(directory, exist_ok=True)
        self._writer = EventsWriter(os.path.join(directory, "events"),
                                    f".{os.getpid()}.from{start_step}")
        if start_step:
            self._write(event_pb2.Event(step=start_step + 1, session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START)))

    def _write(self, event: Any) -> None:
        event.wall_time = time.time()
        self._writer.write_event(event)
        self._writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboardX.proto import summary_pb2

        self._write(self._pb.Event(step=step, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])))

    def close(self) -> None:
        self._writer.close()


def drop_records_after(path: str, step: int) -> None:
    """Rewrites ``metrics.jsonl`` without the records after ``step`` and without the final
    evaluation (``"final": true``); a torn last line (a kill mid-write) goes too."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step and not record.get("final"):
                kept.append(line if line.endswith("\n") else line + "\n")
    files.write_text(path, "".join(kept))


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
