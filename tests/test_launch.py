"""launch.py end to end: a smoke run, and one clear line for bad input."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_default_smoke_run_and_resume(tmp_path):
    args = ["--config=" + os.path.join(ROOT, "configs/default.py:smoke"),
            f"--workdir={tmp_path}"]
    first = launch(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[:3000]
    assert "| student | mlp |" in first.stdout
    for stage in ("teacher", "scratch", "student"):
        assert os.path.exists(tmp_path / stage / "summary.json")
    again = launch(*args, cwd=tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier") == 3
    # A chain killed inside its last stage runs that stage again, and only that one.
    os.remove(tmp_path / "student" / "summary.json")
    shutil.rmtree(tmp_path / "student" / "checkpoints" / "2")
    resumed = launch(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("finished earlier") == 2
    assert "=== stage student" in resumed.stdout and "| student | mlp |" in resumed.stdout


@pytest.mark.parametrize("override, expected", [
    ("--config.not_a_field=1", "not_a_field"),
    ("--config.model.name=resnet9000", "config.model.name='resnet9000' is not a model"),
    ("--config.data.name=mnist2d", "config.data.name"),
    ("--config.optimizer.name=lion9", "config.optimizer.name='lion9' is not an optimizer"),
    ("--config.distill.losses.ce.name=cross_entropyy", "is not a loss; choose one of"),
    ("--config.batch_size=0", "config.batch_size=0 must be a positive multiple"),
])
def test_bad_input_is_one_line(tmp_path, override, expected):
    config = "--config=" + os.path.join(ROOT, "configs/mnist1d_teacher.py:smoke")
    proc = launch(config, override, f"--workdir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("jaxkd: error:") and expected in lines[0], lines[0]
