"""Do code changes move results? Final weights of every training mode, against a reference.

    python bench/equality.py                                  # compare with the reference
    python bench/equality.py --write_reference                # record a new reference

Runs ``bench/equality_config.py`` through ``launch.py`` (the chain of every mode, then the
precomputed-logits run on top-3 logits written by ``python -m jaxkd.teacher_logits``) in
``--out`` (default ``runs/equality``, removed first), then hashes, for every stage (every
compression stage of the pipeline too), each array of ``weights.npz`` and each tensor file
of the exported artifact. It prints a table of stage, weights equal, artifact tensors equal
and accuracy before -> after, and exits 1 if any stage's weights differ. Weights are
bit-identical only on the same machine kind and jax/XLA version as the reference (CPU).
About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = os.path.join(HERE, "equality_config.py")
REFERENCE = os.path.join(HERE, "equality_reference.json")
TENSOR_FILES = ("int_weights.bin", "float_tensors.bin")


def launch(*args: str) -> None:
    command = [sys.executable, os.path.join(ROOT, "launch.py"), *args]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def digest_weights(path: str) -> dict[str, str]:
    with np.load(path, allow_pickle=False) as f:
        return {k: hashlib.sha256(np.ascontiguousarray(f[k]).tobytes()
                                  + str(f[k].dtype).encode() + str(f[k].shape).encode()
                                  ).hexdigest()[:16] for k in sorted(f.files)}


def digest_artifact(directory: str) -> dict[str, str]:
    out = {}
    for name in TENSOR_FILES:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()[:16]
    return out


def record(out: str) -> dict[str, dict]:
    """``{stage: {weights, artifact, accuracy}}`` for every finished run under ``out``."""
    results = {}
    for weights in sorted(glob.glob(os.path.join(out, "**", "weights.npz"), recursive=True)):
        run_dir = os.path.dirname(weights)
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        results[os.path.relpath(run_dir, out)] = {
            "weights": digest_weights(weights),
            "artifact": digest_artifact(os.path.join(run_dir, "artifact")),
            "accuracy": summary.get("accuracy")}
    return results


def compare(reference: dict, now: dict) -> tuple[str, bool]:
    lines = ["| run | weights | artifact tensors | accuracy (reference -> now) |",
             "|---|---|---|---|"]
    ok = True
    for name in sorted(set(reference) | set(now)):
        before, after = reference.get(name), now.get(name)
        if before is None or after is None:
            ok = False
            lines.append(f"| {name} | {'missing now' if after is None else 'new'} | | |")
            continue
        same_w = before["weights"] == after["weights"]
        same_a = before["artifact"] == after["artifact"]
        ok &= same_w
        acc = f"{before['accuracy']:.4f} -> {after['accuracy']:.4f}"
        lines.append(f"| {name} | {'equal' if same_w else 'DIFFERENT'} | "
                     f"{'equal' if same_a else 'different'} | {acc} |")
    return "\n".join(lines), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("runs", "equality"))
    parser.add_argument("--reference", default=REFERENCE)
    parser.add_argument("--write_reference", action="store_true")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    chain = os.path.join(args.out, "chain")
    launch(f"--config={CONFIG}", f"--workdir={chain}")
    logits = os.path.join(args.out, "logits_top3")
    subprocess.run([sys.executable, "-m", "jaxkd.teacher_logits",
                    f"--teacher_workdir={os.path.join(chain, 'teacher')}", f"--out={logits}",
                    "--top_k=3", "--temperature=4", "--transfer_split=unlabelled"],
                   check=True, cwd=ROOT)
    launch(f"--config={CONFIG}:precomputed={os.path.abspath(logits)}",
           f"--workdir={os.path.join(args.out, 'precomputed')}")
    now = record(args.out)
    if args.write_reference:
        with open(args.reference, "w") as f:
            json.dump(now, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {args.reference} ({len(now)} runs)")
        return 0
    with open(args.reference) as f:
        reference = json.load(f)
    table, ok = compare(reference, now)
    print(table)
    print("every run's final weights are bit-identical to the reference" if ok else
          "some runs' weights differ from the reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
