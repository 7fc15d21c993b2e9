"""README as a new user reads it: its tables are the benches' (docs/tables), and every code
block runs as written, in order, in a fresh directory.

Shell lines run as typed with two changes that keep the test short: every ``launch.py``
run gets the config arg ``smoke`` (two tiny steps per stage), and a bench script is asked
for its ``--help`` (the benches themselves run for minutes to hours). ``pip install`` and
``pytest`` (this very test) are left out.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import readme  # noqa: E402  (bench/readme.py)

BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def test_readme_and_docs_tables_agree():
    for path in readme.documents():
        with open(path) as f:
            text = f.read()
        assert readme.render(text) == text, (
            f"{os.path.relpath(path, ROOT)} differs from docs/tables/: run python bench/readme.py")
    with open(os.path.join(ROOT, "README.md")) as f:
        marked = readme.MARKED.findall(f.read())
    assert len(marked) >= 8  # quickstart, configs, distillation, quantization, compression, ...


def blocks() -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return BLOCK.findall(f.read())


def as_tested(line: str) -> list[str] | None:
    """The command the test runs for one README shell command, or None to leave it out."""
    args = shlex.split(line, comments=True)
    if not args or args[:4] == ["python", "-m", "pip", "install"] or args[:3] == [
            "python", "-m", "pytest"]:
        return None
    assert args[0] == "python", line
    if args[1].startswith("bench/"):
        return [sys.executable, os.path.join(ROOT, args[1]), "--help"]
    if args[1] == "launch.py":
        configs = [i for i, a in enumerate(args) if a.startswith("--config=")]
        if configs:
            spec = args[configs[0]]
            args[configs[0]] = spec + (",smoke" if ":" in spec else ":smoke")
        else:
            args.append("--config=configs/default.py:smoke")
        return [sys.executable, os.path.join(ROOT, "launch.py"), *args[2:]]
    return [sys.executable, *args[1:]]


def test_every_code_block_runs_as_written(tmp_path):
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    found = blocks()
    assert [kind for kind, _ in found].count("python") >= 2
    ran = 0
    for kind, body in found:
        if kind == "python":
            commands = [[sys.executable, "-c", body]]
        else:
            commands = [as_tested(part) for line in body.strip().splitlines()
                        for part in line.split("&&")]
        for command in commands:
            if command is None:
                continue
            proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
            ran += 1
    assert ran >= 19


@pytest.mark.parametrize("line, expected", [
    ("python launch.py          # the quickstart", ["launch.py",
                                                    "--config=configs/default.py:smoke"]),
    ("python launch.py --config=configs/x.py:stages=cluster",
     ["launch.py", "--config=configs/x.py:stages=cluster,smoke"]),
    ("python -m pip install -e '.[dev]'", None),
    ("python bench/kd_step.py --docs", ["kd_step.py", "--help"]),
])
def test_the_commands_are_shortened_as_the_docstring_says(line, expected):
    command = as_tested(line)
    if expected is None:
        assert command is None
    else:
        assert [os.path.basename(command[1]), *command[2:]] == expected
