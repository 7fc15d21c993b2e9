"""What the table benches share: finished runs reused, choices made on the validation split,
mean ± sample std, and tables published into ``docs/tables/`` (then README, by
``bench/readme.py``).

Every table bench writes its runs under ``--root`` (default ``runs/<bench>``; never into
the source tree) and prints its table; with ``--docs`` it also writes
``docs/tables/<name>.md`` with the command that made it and the machine. A bench longer
than one machine's session keeps its measurements in a :class:`Ledger`
(``bench/records/<bench>.json``, committed), so its table can be built over several.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLES = os.path.join(ROOT, "docs", "tables")
RECORDS = os.path.join(ROOT, "bench", "records")
KEPT = ("accuracy", "num_params", "artifact_bytes", "num_steps", "train_steps_per_sec")


def add_output_args(parser: argparse.ArgumentParser, bench: str) -> None:
    parser.add_argument("--root", default=os.path.join("runs", bench),
                        help="where the runs go (finished runs are reused)")
    parser.add_argument("--docs", action="store_true",
                        help="also write the table into docs/tables/ (for README)")


def run(c: Any, workdir: str) -> dict[str, Any]:
    """The summary of the run ``c`` in ``workdir``: read when it finished before, else
    trained (a chain through ``jaxkd.chain``, a pipeline through ``jaxkd.compression``)."""
    from jaxkd import chain, compression, metrics, train

    summary = metrics.read_summary(workdir)
    if summary is None or ("accuracy" not in summary and "stages" not in summary):
        if chain.is_chain(c):
            summary = chain.run_chain(c, workdir)
        elif compression.is_pipeline(c):
            summary = compression.run_pipeline(c, workdir)
        else:
            summary = train.train_and_evaluate(c, workdir)
    return summary


def fingerprint(config: Any) -> str:
    """The sha256 of a config as JSON (keys sorted; the home directory written ``~``, so
    the same config on another machine hashes the same)."""
    data = config.to_dict() if hasattr(config, "to_dict") else config
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.replace(os.path.expanduser("~"), "~").encode()).hexdigest()


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Ledger:
    """The measurements of a bench that outlive its runs: ``bench/records/<bench>.json``.

    Each entry is keyed by the run (``seed1/kd2``) and holds the :func:`fingerprint` of
    its config, the numbers the table reads (:data:`KEPT` of its summary, or what the
    bench measured), the jaxkd commit it ran at, the machine and the date. An entry stands
    for its run only while the config fingerprints the same: a changed config (or budget)
    runs again. ``fresh`` ignores every entry (and overwrites them). Entries are written
    as soon as a run ends, atomically, so a session cut off keeps what it finished.
    """

    def __init__(self, bench: str, *, fresh: bool = False, directory: str = RECORDS):
        self.path = os.path.join(directory, f"{bench}.json")
        self.fresh = fresh
        self.entries: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                self.entries = json.load(f)
        self.reused: list[str] = []

    def get(self, key: str, config: Any) -> dict[str, Any] | None:
        """The numbers recorded for ``key`` under this ``config``, else None."""
        entry = self.entries.get(key)
        if self.fresh or entry is None or entry["config_sha256"] != fingerprint(config):
            return None
        self.reused.append(key)
        return entry["numbers"]

    def put(self, key: str, config: Any, numbers: dict[str, Any]) -> dict[str, Any]:
        """Records ``numbers`` for ``key`` under ``config`` (or its fingerprint) and
        returns them."""
        sha = config if isinstance(config, str) else fingerprint(config)
        self.entries[key] = {"config_sha256": sha, "numbers": numbers, "commit": _commit(),
                             "machine": machine(), "date": datetime.date.today().isoformat()}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(self.path),
                                         delete=False) as f:
            json.dump(self.entries, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(f.name, self.path)
        return numbers

    def run(self, key: str, config: Any, train: Callable[[], dict[str, Any]]
            ) -> dict[str, Any]:
        """The recorded numbers of ``key`` under ``config``, else those of ``train()``'s
        run summary (:data:`KEPT`), recorded under the config as it was before training."""
        sha = fingerprint(config)
        numbers = self.get(key, config)
        if numbers is None:
            summary = train()
            numbers = self.put(key, sha, {k: summary[k] for k in KEPT if k in summary})
        return numbers


def accuracy(summary: Mapping[str, Any]) -> float:
    """A run's (or a pipeline's last stage's) test accuracy in %."""
    if "accuracy" in summary:
        return 100 * float(summary["accuracy"])
    last = summary["stage_order"][-1]
    return 100 * float(summary["stages"][last]["accuracy"])


def wall_seconds(summary: Mapping[str, Any]) -> float:
    """A run's training wall time: its steps over its measured steps per second (the rate
    of the timed steps, compilation left out; NaN when it was not measured)."""
    rate = summary.get("train_steps_per_sec")
    return float(summary["num_steps"]) / rate if rate else float("nan")


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``'mean ± std'`` with the sample std (ddof = 1), the one convention of our tables."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def choose(candidates: Mapping[Any, Any], root: str, *,
           rule: Callable[[dict[Any, float]], Any] | None = None) -> tuple[Any, dict[Any, float]]:
    """Trains every candidate config on the validation split (``jaxkd.config.validation``:
    the first 90 % of train for training, the last 10 % to evaluate) in ``root/<key>`` and
    returns ``(chosen key, {key: validation accuracy %})``; the chosen key is the most
    accurate one unless ``rule`` picks from the accuracies."""
    from jaxkd.config import validation

    scores = {key: accuracy(run(validation(c), os.path.join(root, str(key))))
              for key, c in candidates.items()}
    chosen = rule(scores) if rule else max(scores, key=lambda k: scores[k])
    return chosen, scores


def machine() -> str:
    """One line naming the machine the numbers were measured on."""
    import jax

    device = jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # int8 speed depends on the vector extensions
        with open("/proc/cpuinfo") as f:
            flags = set(next((ln for ln in f if ln.startswith("flags")), "").split())
        cpu += " " + ("avx512_vnni" if "avx512_vnni" in flags else "avx_vnni" if "avx_vnni"
                      in flags else "avx2" if "avx2" in flags else "no avx2")
    return (f"{cpu}, {os.cpu_count()} cores, "
            f"{device.platform} ({kind}) x{jax.device_count()}, jax {jax.__version__}")


def publish(name: str, table: str, *, docs: bool) -> None:
    """Prints ``table``; with ``docs`` writes it to ``docs/tables/<name>.md`` followed by
    the command that made it and the machine."""
    print(table, flush=True)
    if not docs:
        return
    command = "python " + " ".join(shlex.quote(a) for a in [
        os.path.relpath(os.path.abspath(sys.argv[0]), ROOT), *sys.argv[1:]])
    os.makedirs(TABLES, exist_ok=True)
    path = os.path.join(TABLES, f"{name}.md")
    with open(path, "w") as f:
        f.write(table.rstrip("\n") + f"\n\n<sub>`{command}` on {machine()}</sub>\n")
    print(f"wrote {os.path.relpath(path, ROOT)}", flush=True)
