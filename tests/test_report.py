"""jaxkd.report: the accuracy-vs-size table and Pareto plot from runs' summary.json files."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxkd import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(root, name, **summary):
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return str(run_dir)


@pytest.fixture
def runs(tmp_path):
    base = {"num_params": 5210, "params_bytes": 22_852, "model": "cnn1d", "dataset": "mnist1d"}
    return [
        write_run(tmp_path, "fp32-s0", method="fp32", accuracy=0.94, **base),
        write_run(tmp_path, "fp32-s1", method="fp32", accuracy=0.92, **base),
        write_run(tmp_path, "int8", method="qat-int8", accuracy=0.935, artifact_bytes=8_344,
                  storage={"nonzero_weights": 2_600}, **base),
        write_run(tmp_path, "int4", method="qat-int4", accuracy=0.90, artifact_bytes=5_800,
                  **base),
        write_run(tmp_path, "ptq8", method="ptq-int8", accuracy=0.91, artifact_bytes=8_400,
                  **base),
        # Older summaries: no method (the directory names it), accuracy under eval, no sizes.
        write_run(tmp_path, "legacy", eval={"accuracy": 0.5}),
    ]


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    points = [(float(b), float(a)) for b, a in zip(rng.integers(1, 6, 12),
                                                    rng.integers(0, 5, 12), strict=True)]
    front = report.pareto_front(points)
    for i, (b, a) in enumerate(points):
        beaten = any(b2 <= b and a2 >= a and (b2, a2) != (b, a) for b2, a2 in points)
        assert (i in front) == (not beaten)
    assert [points[i][0] for i in front] == sorted(points[i][0] for i in front)
    assert report.pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.9), (0.5, 0.1)]) == [3, 0, 1]


def test_table_groups_seeds_and_divides_by_the_fp32_baseline(runs, tmp_path):
    out = tmp_path / "out"
    result = report.write_report(runs, str(out))
    assert result["baseline"] == "fp32"
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["fp32", "qat-int8", "qat-int4", "ptq-int8", "legacy"]
    assert rows["fp32"]["runs"] == 2
    assert rows["fp32"]["accuracy"] == pytest.approx(0.93)
    assert rows["fp32"]["accuracy_std"] == pytest.approx(np.std([0.94, 0.92], ddof=1))
    assert rows["legacy"]["accuracy"] == 0.5 and rows["legacy"]["bytes"] is None
    lines = (out / "report.md").read_text().splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]]
             for line in lines if line.startswith("| ") and "---" not in line]
    table = {row[2]: row[3:] for row in cells}  # by method (after dataset and model)
    assert table["fp32 (baseline)"] == ["2", "93.00 ± 1.41", "5,210", "—",
                                        "22.9 kB (22,852 B)", "1.000×", "1.00×"]
    assert table["qat-int8"] == ["1", "93.50", "5,210", "2,600", "8.3 kB (8,344 B)",
                                 f"{8344 / 22852:.3f}×", f"{22852 / 8344:.2f}×"]
    assert table["legacy"] == ["1", "50.00", "—", "—", "—", "—", "—"]
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_cli_with_an_explicit_baseline_and_bad_input(runs, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "jaxkd.report", *runs[2:4], "--out", str(out),
           "--baseline", runs[0]]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    md = (out / "report.md").read_text()
    assert "| mnist1d | cnn1d | fp32 (baseline) | 1 | 94.00 |" in md  # the baseline joins
    assert f"{5800 / 22852:.3f}×" in md and "python -m jaxkd.report" in md
    missing = str(tmp_path / "nowhere")
    result = subprocess.run([sys.executable, "-m", "jaxkd.report", missing, "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip() == (f"error: {missing}/summary.json is missing: is "
                                     f"{missing!r} a finished jaxkd run?")


def test_baseline_defaults_to_the_largest_without_an_fp32_method(tmp_path):
    dirs = [write_run(tmp_path, f"r{i}", accuracy=a, params_bytes=b)
            for i, (a, b) in enumerate(itertools.product([0.9], [1000, 4000]))]
    result = report.write_report(dirs, str(tmp_path / "o"))
    assert result["baseline"] == "r1"


def test_models_are_rows_of_their_own_and_chains_are_their_stages(tmp_path):
    """A teacher and a student with the same method are two rows, not one averaged row; a
    chain's directory stands for its stages; a summary without accuracy is refused."""
    chain = tmp_path / "chain"
    chain.mkdir()
    write_run(chain, "teacher", method="fp32", model="cnn1d", dataset="mnist1d",
              accuracy=0.946, artifact_bytes=22_000)
    write_run(chain, "scratch", method="fp32", model="mlp", dataset="mnist1d",
              accuracy=0.672, artifact_bytes=62_000)
    (chain / "summary.json").write_text(json.dumps(
        {"stages": {"teacher": {}, "scratch": {}}, "stage_order": ["teacher", "scratch"]}))
    result = report.write_report([str(chain)], str(tmp_path / "out"))
    rows = [(r["model"], r["method"], r["accuracy"], r["runs"]) for r in result["rows"]]
    assert rows == [("cnn1d", "fp32", 0.946, 1), ("mlp", "fp32", 0.672, 1)]
    broken = write_run(tmp_path, "broken", method="fp32")
    with pytest.raises(ValueError, match="broken/summary.json has no accuracy"):
        report.write_report([broken], str(tmp_path / "o2"))
