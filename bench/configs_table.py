"""Every offline config run as README shows it: accuracy, size and wall time, from this code.

    python bench/configs_table.py [--root runs/configs_table] [--docs]

Runs ``python launch.py`` (a subprocess each, as a user would) for the quickstart and every
config that needs no download, in order (the students after their teachers), each in
``--root/<name>`` (a finished run is reused; delete ``--root`` to time everything again),
and prints two tables: the quickstart's stages (``docs/tables/quickstart.md`` with
``--docs``) and every config's stages with their wall time (``docs/tables/configs.md``).
About 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, add_output_args, publish

LAUNCH = os.path.join(ROOT, "launch.py")
# name: (config as typed after --config=, extra flags; {root} is --root)
RUNS = {
    "default": ("configs/default.py", []),
    "mnist1d_teacher": ("configs/mnist1d_teacher.py", []),
    "mnist1d_scratch": ("configs/mnist1d_teacher.py:model=mlp", []),
    "mnist1d_student": ("configs/mnist1d_student.py",
                        ["--config.distill.teacher.workdir={root}/mnist1d_teacher"]),
    "mnist1d_student_precomputed": ("configs/mnist1d_student.py:precomputed="
                                    "{root}/mnist1d_teacher_top3", []),
    "mnist1d_ta_chain": ("configs/mnist1d_ta_chain.py", []),
    "mnist1d_compress": ("configs/mnist1d_compress.py", []),
    "digits_teacher": ("configs/digits_teacher.py", []),
    "digits_student": ("configs/digits_student.py",
                       ["--config.distill.teacher.workdir={root}/digits_teacher"]),
    "digits_scratch": ("configs/digits_student.py:scratch", []),
}


def launch(name: str, root: str) -> float | None:
    """Runs one config; its wall seconds, or None when it had finished before."""
    workdir = os.path.join(root, name)
    if os.path.exists(os.path.join(workdir, "summary.json")):
        return None
    if name == "mnist1d_student_precomputed":  # the top-3 logits, written once
        subprocess.run([sys.executable, "-m", "jaxkd.teacher_logits",
                        f"--teacher_workdir={root}/mnist1d_teacher",
                        f"--out={root}/mnist1d_teacher_top3", "--top_k=3", "--temperature=4",
                        "--transfer_split=unlabelled"], check=True, cwd=ROOT)
    config, flags = RUNS[name]
    command = [sys.executable, LAUNCH, "--config=" + config.format(root=root),
               f"--workdir={workdir}", *(f.format(root=root) for f in flags)]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def stages(workdir: str) -> list[tuple[str, dict]]:
    """``(stage, summary)`` of a run, or of every stage of a chain (a pipeline: its end)."""
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    if "stages" in summary and "accuracy" not in summary:
        return [(s, row) for s, row in summary["stages"].items()]
    return [("", summary)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_output_args(parser, "configs_table")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    walls = {}
    for name in RUNS:
        wall = launch(name, root)
        walls_path = os.path.join(root, name, "wall_seconds.json")
        if wall is not None:
            with open(walls_path, "w") as f:
                json.dump(wall, f)
        with open(walls_path) as f:
            walls[name] = json.load(f)
    quick = ["| stage | model | method | accuracy | params | artifact bytes |",
             "|---|---|---|---:|---:|---:|"]
    for stage, r in stages(os.path.join(root, "default")):
        quick.append(f"| {stage} | {r['model']} | {r['method']} | {100 * r['accuracy']:.2f} % "
                     f"| {r['num_params']:,} | {r['artifact_bytes']:,} |")
    quick += ["", f"`python launch.py`: seed 0, {walls['default']:.0f} s wall for the three "
              "stages, data preparation included when it ran first."]
    publish("quickstart", "\n".join(quick), docs=args.docs)
    rows = ["| command | stage | model | method | accuracy | artifact bytes | wall |",
            "|---|---|---|---|---:|---:|---:|"]
    for name, (config, flags) in RUNS.items():
        shown = " ".join(["--config=" + config.replace("{root}", "DIR"),
                          *(f.replace("{root}", "DIR") for f in flags)])
        for i, (stage, r) in enumerate(stages(os.path.join(root, name))):
            rows.append(f"| {f'`{shown}`' if i == 0 else ''} | {stage or '—'} | {r['model']} "
                        f"| {r['method']} | {100 * r['accuracy']:.2f} % | "
                        f"{r['artifact_bytes']:,} | "
                        f"{f'{walls[name]:.0f} s' if i == 0 else ''} |")
    rows += ["", "Seed 0; accuracy of the exported artifact on the test split; wall time of "
             "the whole `launch.py` command (all stages); DIR is the directory of the runs "
             "the command names."]
    publish("configs", "\n".join(rows), docs=args.docs)


if __name__ == "__main__":
    main()
