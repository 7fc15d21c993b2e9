"""Accuracy against size: a Markdown table and a Pareto plot from several runs' summaries.

    python -m jaxkd.report RUN_DIR... --out DIR [--baseline RUN_DIR]

Reads ``RUN_DIR/summary.json`` of every run; a chain's directory stands for its stages
(each ``RUN_DIR/<stage>``). Fields used: ``accuracy`` (else ``eval.accuracy``; a summary
with neither is refused), ``dataset`` and ``model``, ``artifact_num_params`` (else
``num_params``), ``storage.nonzero_weights`` (the artifact's nonzero kernel weights, else
read from its manifest), ``artifact_bytes`` (bytes on disk of the exported artifact; else
``params_bytes``, the float weights file) and ``method`` (else the run directory's name).
Runs of the same dataset, model and method (e.g. three seeds) are one row: accuracy as mean
± sample std (ddof = 1) over the runs.

Writes ``DIR/report.md`` (dataset, model, method, accuracy, params, bytes on disk, size
relative to the baseline and its inverse, the compression ratio) and ``DIR/pareto.png``
(accuracy against bytes, log x, the Pareto front, i.e. the rows no other row beats on both
size and accuracy, highlighted and joined). The baseline is ``--baseline`` or else the
first row whose method is ``fp32`` (else the largest). Speed is not a column: a latency
measured while evaluating depends on whatever else the machine runs; ``bench/latency.py``
measures it one way.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkd.schema import MissingError

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
PLOT_FILE = "pareto.png"
MISSING = "—"


def read_runs(run_dir: str) -> list[dict[str, Any]]:
    """The report rows' fields of one run, or of each stage of a chain."""
    path = os.path.join(run_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        raise MissingError(f"{path} is missing: is {run_dir!r} a finished jaxkd run?")
    with open(path) as f:
        try:
            summary = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if "stages" in summary and "accuracy" not in summary:  # a chain: one row per stage
        return [run for stage in summary.get("stage_order", summary["stages"])
                for run in read_runs(os.path.join(run_dir, stage))]
    accuracy = summary.get("accuracy")
    if accuracy is None and isinstance(summary.get("eval"), dict):
        accuracy = summary["eval"].get("accuracy")
    if accuracy is None:
        raise ValueError(f"{path} has no accuracy: is {run_dir!r} a finished jaxkd run?")
    size = summary.get("artifact_bytes") or summary.get("params_bytes")
    storage = summary.get("storage")
    last = summary["stage_order"][-1] if summary.get("stage_order") else ""  # a pipeline
    manifest = os.path.join(run_dir, last, "artifact", "manifest.json")
    if storage is None and os.path.isfile(manifest):  # summaries older than the field
        with open(manifest) as f:
            storage = json.load(f).get("storage")
    return [{
        "run_dir": run_dir,
        "dataset": summary.get("dataset") or MISSING,
        "model": summary.get("model") or MISSING,
        "method": str(summary.get("method") or os.path.basename(os.path.normpath(run_dir))),
        "accuracy": float(accuracy),
        # The stored model's parameters (a channel-pruned or merged model is smaller), and
        # its kernels' nonzero weights (pruning), when the summary has them.
        "num_params": summary.get("artifact_num_params") or summary.get("num_params"),
        "nonzero_weights": (storage or {}).get("nonzero_weights"),
        "bytes": None if size is None else int(size),
    }]


def _mean(values: Sequence[Any]) -> float | None:
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


def group_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, model, method), in first-seen order: means over its runs,
    accuracy's sample std."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["model"], run["method"]), []).append(run)
    rows = []
    for (dataset, model, method), members in groups.items():
        accs = [m["accuracy"] for m in members]
        rows.append({
            "dataset": dataset, "model": model, "method": method,
            "runs": len(members),
            "run_dirs": [m["run_dir"] for m in members],
            "accuracy": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
            "num_params": _mean([m["num_params"] for m in members]),
            "nonzero_weights": _mean([m.get("nonzero_weights") for m in members]),
            "bytes": _mean([m["bytes"] for m in members]),
        })
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(bytes, accuracy)`` that no other point dominates (no larger
    and at least as accurate, one of the two strictly), sorted by bytes."""
    front = []
    for i, (b, a) in enumerate(points):
        dominated = any(
            (b2 <= b and a2 >= a) and (b2 < b or a2 > a)
            for j, (b2, a2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _key(run: dict[str, Any]) -> tuple[str, str, str]:
    return run["dataset"], run["model"], run["method"]


def _baseline(rows: Sequence[dict[str, Any]], baseline_key: tuple | None) -> dict | None:
    sized = [r for r in rows if r["bytes"]]
    if baseline_key is not None:
        return next((r for r in rows if _key(r) == baseline_key), None)
    for r in sized:
        if r["method"].lower() == "fp32":
            return r
    return max(sized, key=lambda r: r["bytes"]) if sized else None


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return MISSING
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({int(round(n)):,} B)"
    return f"{int(round(n)):,} B"


def _tick_bytes(n: float, _pos: Any = None) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def markdown_table(rows: Sequence[dict[str, Any]], baseline: dict[str, Any] | None) -> str:
    """The report's table (one line per row; ``—`` where a value is missing)."""
    lines = [
        "| dataset | model | method | runs | accuracy (%) | params | nonzero weights "
        "| bytes on disk | size vs baseline | compression |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = baseline["bytes"] if baseline else None
    for r in rows:
        acc = MISSING
        if r["accuracy"] is not None:
            acc = f"{100 * r['accuracy']:.2f}"
            if r["accuracy_std"] is not None:
                acc += f" ± {100 * r['accuracy_std']:.2f}"
        size_ratio = compression = MISSING
        if base and r["bytes"]:
            size_ratio = f"{r['bytes'] / base:.3f}×"
            compression = f"{base / r['bytes']:.2f}×"
        params = MISSING if r["num_params"] is None else f"{int(round(r['num_params'])):,}"
        nonzero = r.get("nonzero_weights")
        nonzero = MISSING if nonzero is None else f"{int(round(nonzero)):,}"
        name = r["method"] + (" (baseline)" if r is baseline else "")
        lines.append(f"| {r['dataset']} | {r['model']} | {name} | {r['runs']} | {acc} "
                     f"| {params} | {nonzero} | {_fmt_bytes(r['bytes'])} "
                     f"| {size_ratio} | {compression} |")
    return "\n".join(lines) + "\n"


def _label(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The row's method, with the model when the plot shows several models."""
    several = len({r["model"] for r in rows}) > 1
    return f"{row['model']} {row['method']}" if several else row["method"]


def pareto_plot(rows: Sequence[dict[str, Any]], path: str, *, title: str = "") -> None:
    """Accuracy (%) against bytes on disk (log x); the Pareto front highlighted and joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    plotted = [r for r in rows if r["bytes"] and r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=130)
    if plotted:
        xs = np.array([r["bytes"] for r in plotted], float)
        ys = np.array([100 * r["accuracy"] for r in plotted])
        errs = np.array([100 * (r["accuracy_std"] or 0.0) for r in plotted])
        front = pareto_front(list(zip(xs, ys, strict=True)))
        others = [i for i in range(len(plotted)) if i not in front]
        ax.errorbar(xs[others], ys[others], yerr=errs[others], fmt="o", color="0.55",
                    ms=7, capsize=3, label="dominated")
        ax.errorbar(xs[front], ys[front], yerr=errs[front], fmt="o", color="tab:red",
                    ms=9, capsize=3, label="Pareto front")
        ax.plot(xs[front], ys[front], "-", color="tab:red", lw=1.5, alpha=0.7)
        for i, r in enumerate(plotted):
            ax.annotate(_label(r, plotted), (xs[i], ys[i]), textcoords="offset points",
                        xytext=(7, 6), fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_tick_bytes))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        lo, hi = xs.min(), xs.max()
        ax.set_xlim(lo / 1.6, hi * 2.2)  # room for the labels on the right
        span = max(ys.max() - ys.min(), 1.0)
        ax.set_ylim(ys.min() - 0.25 * span - errs.max(), ys.max() + 0.25 * span + errs.max())
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no run has both accuracy and bytes", ha="center",
                transform=ax.transAxes)
    ax.set_xlabel("bytes on disk (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Accuracy vs model size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dirs: Sequence[str], out_dir: str, *, baseline: str | None = None,
                 command: str | None = None) -> dict[str, Any]:
    """Writes ``report.md`` and ``pareto.png`` into ``out_dir``; returns the rows and paths.

    ``baseline`` is a run directory (its dataset, model and method's row is the baseline)
    or None.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [run for d in run_dirs for run in read_runs(d)]
    baseline_key = None
    if baseline is not None:
        base_run = read_runs(baseline)[0]
        baseline_key = _key(base_run)
        if baseline_key not in {_key(r) for r in runs}:
            runs.append(base_run)
    rows = group_runs(runs)
    base = _baseline(rows, baseline_key)
    os.makedirs(out_dir, exist_ok=True)
    md_path, png_path = os.path.join(out_dir, REPORT_FILE), os.path.join(out_dir, PLOT_FILE)
    parts = ["# Accuracy vs size\n"]
    if command:
        parts.append(f"Regenerate with `{command}`.\n")
    parts.append(markdown_table(rows, base))
    parts.append(
        "\nBytes on disk are those of the exported artifact (`artifact_bytes`) when the run "
        "has one, else of its float weights file (`params_bytes`). Size vs fp32 = bytes / "
        "baseline bytes; compression = its inverse. Accuracy is mean ± sample std (ddof = 1) "
        "over a row's runs.\n"
    )
    parts.append(f"\n![accuracy vs bytes]({PLOT_FILE})\n")
    with open(md_path, "w") as f:
        f.write("\n".join(parts))
    pareto_plot(rows, png_path)
    return {"rows": rows, "baseline": base and base["method"], "markdown": md_path,
            "plot": png_path}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.report", description=__doc__.split(
        "\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, help="directory for report.md and pareto.png")
    parser.add_argument("--baseline", default=None, help="the fp32 run (default: method fp32, "
                        "else the largest)")
    args = parser.parse_args(argv)
    command = "python -m jaxkd.report " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    try:
        result = write_report(args.run_dirs, args.out, baseline=args.baseline, command=command)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with open(result["markdown"]) as f:
        print(f.read())
    print(f"wrote {result['markdown']} and {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

