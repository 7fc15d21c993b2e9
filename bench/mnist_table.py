"""Real MNIST and Fashion-MNIST beside the papers: Hinton et al. 2015 and Deep Compression.

    python -m jaxkd.data.fetch mnist fashion_mnist      # once
    python bench/mnist_table.py --part=hinton [--seeds=0,1,2] [--epochs=40] [--docs]
    python bench/mnist_table.py --part=compress [--docs]
    python bench/mnist_table.py --part=fashion [--docs]

Runs live in ``--root`` (default ``runs/mnist_table``)``/<part>/...`` (finished runs are
reused). Every accuracy is that of the exported artifact loaded from disk, on the test
split, read once after the choices below were made on the validation split (the last
10,000 training images, trained on the first 50,000: ``jaxkd.config.validation``).

- ``hinton`` (``configs/mnist_hinton.py``; table ``docs/tables/mnist_hinton.md``): teacher
  MLP 1200-1200 (dropout, jitter), the 800-800 student from scratch and distilled; the
  temperature is chosen on validation (seed 0) among ``TEMPERATURES``. Then the student
  distilled through the training set without any 3, before and after raising the bias of
  its 3 logit by the amount that is best on validation (``BIASES``).
- ``compress`` (``configs/mnist_compress.py``; table ``docs/tables/mnist_compress.md``):
  LeNet-300-100 and Caffe's LeNet-5, dense then prune -> cluster -> int8 with KD from the
  dense model; the number of clusters is chosen on validation (seed 0) among ``CLUSTERS``
  as the fewest whose validation error is within ``TOLERANCE`` points of the most
  accurate. Bytes counted two ways: the paper's (weights as cluster indices, positions as
  relative indices of 8 bits in conv and 5 in fc layers with filler entries where a gap is
  longer, one float32 codebook per layer; no biases; before Huffman coding) and ours (the
  whole artifact on disk: positions, indices, codebooks, float32 biases, scales and the
  JSON manifest, deflated). ``jaxkd.report`` writes each model's report and Pareto plot
  to ``docs/mnist/<model>/`` with ``--docs``.
- ``fashion`` (``configs/fashion_mnist.py``; table ``docs/tables/fashion_mnist.md``): the
  same on Fashion-MNIST: Caffe's LeNet-5 teacher, the classic LeNet-5 student from scratch
  and distilled (temperature chosen on validation), and the teacher compressed.

Wall times: each run's steps over its measured steps per second (``common.wall_seconds``).
"""

from __future__ import annotations

import argparse
import heapq
import math
import os
import sys

import jax
import numpy as np
from common import (
    ROOT,
    accuracy,
    add_output_args,
    choose,
    mean_std,
    publish,
    run,
    wall_seconds,
)

from jaxkd import checkpoint, configfile, export, report, train
from jaxkd.config import validation
from jaxkd.data import pipeline

TEMPERATURES = (4.0, 8.0, 20.0)
TEACHER_LRS = (0.1, 0.03, 0.01)
STUDENT_LRS = (0.1, 0.03, 0.01)
BIASES = tuple(np.round(np.arange(0.0, 10.01, 0.25), 2))
CLUSTERS = (16, 32)
TOLERANCE = 0.05  # points of validation error
PAPER_HINTON = {"teacher": 67, "scratch": 146, "student": 74, "student_no3": 206,
                "student_no3_3s": 133, "student_no3_bias": 109, "student_no3_bias_3s": 14}
PAPER_DC = {  # error %, bytes before, bytes after, ratio (Han et al. 2016, Table 1)
    "lenet300": (1.64, 1.58, 1070e3, 27e3, 40),
    "lenet5": (0.80, 0.74, 1720e3, 44e3, 39),
}


SMOKE = False  # --smoke: every config with its smoke arg (the plumbing, in a minute)


def config(name: str, arg: str = ""):
    arg = ",".join(a for a in (arg, "smoke" if SMOKE else "") if a)
    return configfile.load(os.path.join(ROOT, "configs", name) + (f":{arg}" if arg else ""))


def stage(c, name: str):
    """Stage ``name`` of chain ``c`` as a run of its own."""
    return c.stages[name]


def predictions(workdir: str, data, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the artifact in ``workdir`` over ``split``."""
    predict, _ = export.load(os.path.join(workdir, "artifact"))
    predict = jax.jit(predict)
    logits, labels = [], []
    for batch in pipeline.eval_batches(data, split=split, batch_size=1000):
        keep = batch["mask"] > 0
        logits.append(np.asarray(predict(batch["image"]))[keep])
        labels.append(batch["label"][keep])
    return np.concatenate(logits), np.concatenate(labels)


def errors(summary) -> int:
    return int(round((1 - float(summary["accuracy"])) * 10_000))


# ----------------------------------------------------------------------------- Hinton


def hinton_run(name: str, seed: int, epochs: int, teacher: str | None = None,
               temperature: float | None = None, teacher_lr: float = 0.1,
               student_lr: float = 0.1):
    c = stage(config("mnist_hinton.py", f"epochs={epochs},no3,teacher_lr={teacher_lr},"
                                        f"scratch_lr={student_lr},student_lr={student_lr}"),
              name)
    c.seed = seed
    if teacher is not None:
        c.distill.teacher.workdir = teacher
    if temperature is not None:
        c.distill.losses.kd.kwargs.temperature = temperature
    return c


def choose_finite(candidates: dict, root: str) -> tuple:
    """:func:`common.choose` where a run whose gradients overflow (``NonFiniteError``)
    scores 0 instead of stopping the bench."""
    scores = {}
    for key, c in candidates.items():
        name = "_".join(f"{k:g}" for k in key) if isinstance(key, tuple) else f"{key:g}"
        try:
            scores[key] = accuracy(run(validation(c), os.path.join(root, name)))
        except train.NonFiniteError as e:
            print(f"{root}/{name}: {e}", flush=True)
            scores[key] = 0.0
    return max(scores, key=lambda k: scores[k]), scores


def hinton(args) -> None:
    root = os.path.join(args.root, "hinton")
    val = os.path.join(root, "validation")
    lr_star, lr_scores = choose({lr: hinton_run("teacher", 0, args.epochs, teacher_lr=lr)
                                 for lr in TEACHER_LRS}, os.path.join(val, "teacher"))
    teacher = os.path.join(val, "teacher", str(lr_star))
    s_star, s_scores = choose_finite({lr: hinton_run("scratch", 0, args.epochs, student_lr=lr)
                                      for lr in STUDENT_LRS}, os.path.join(val, "scratch"))
    (t_star, d_star), t_scores = choose_finite(
        {(t, lr): hinton_run("student", 0, args.epochs, teacher, t, student_lr=lr)
         for t in TEMPERATURES for lr in STUDENT_LRS}, os.path.join(val, "student"))
    no3_val = os.path.join(val, "student_no3")
    no3 = validation(hinton_run("student_no3", 0, args.epochs, teacher, t_star,
                                student_lr=d_star))
    run(no3, no3_val)
    logits, labels = predictions(no3_val, no3.data, no3.data.eval_split)
    shift = np.eye(logits.shape[1])[3]
    val_acc = {b: float(np.mean((logits + b * shift).argmax(1) == labels)) for b in BIASES}
    b_star = max(BIASES, key=lambda b: (val_acc[b], -b))
    print(f"T on validation: {t_scores} -> {t_star}; bias of 3 -> {b_star} "
          f"({100 * val_acc[b_star]:.2f} % vs {100 * val_acc[0.0]:.2f} %)", flush=True)

    rows: dict[str, list] = {k: [] for k in ("teacher", "scratch", "student", "student_no3",
                                             "student_no3_3s", "student_no3_bias",
                                             "student_no3_bias_3s")}
    wall: dict[str, list] = {k: [] for k in ("teacher", "scratch", "student", "student_no3")}
    for seed in args.seeds:
        d = os.path.join(root, f"seed{seed}")
        t = os.path.join(d, "teacher")
        summaries = {"teacher": run(hinton_run("teacher", seed, args.epochs,
                                               teacher_lr=lr_star), t)}
        summaries["scratch"] = run(hinton_run("scratch", seed, args.epochs,
                                              student_lr=s_star), os.path.join(d, "scratch"))
        for name in ("student", "student_no3"):
            summaries[name] = run(hinton_run(name, seed, args.epochs, t, t_star,
                                             student_lr=d_star), os.path.join(d, name))
        for name, s in summaries.items():
            rows[name].append(errors(s))
            wall[name].append(wall_seconds(s))
        c = hinton_run("student_no3", seed, args.epochs, t, t_star, student_lr=d_star)
        logits, labels = predictions(os.path.join(d, "student_no3"), c.data, "test")
        threes = labels == 3
        for suffix, b in (("", 0.0), ("_bias", b_star)):
            wrong = (logits + b * shift).argmax(1) != labels
            if suffix:
                rows["student_no3_bias"].append(int(wrong.sum()))
            assert suffix or int(wrong.sum()) == rows["student_no3"][-1]
            rows[f"student_no3{suffix}_3s"].append(int(wrong[threes].sum()))
    what = {
        "teacher": "teacher MLP 1200-1200, dropout, jitter ±2 px",
        "scratch": "student MLP 800-800, labels only",
        "student": f"student distilled, T = {t_star:g}",
        "student_no3": "student distilled without any 3 in its training set",
        "student_no3_bias": f"the same, bias of the 3 logit + {b_star:g}",
    }
    lines = ["| model | test errors (of 10,000), ours | per seed | paper | of them on the "
             "1,010 threes, ours | paper | train wall time |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for name, text in what.items():
        threes = ((mean_std(rows[f"{name}_3s"], 1), PAPER_HINTON[f"{name}_3s"])
                  if f"{name}_3s" in rows else ("", ""))
        minutes = (f"{np.mean(wall[name]) / 60:.1f} min" if name in wall else "")
        lines.append(f"| {text} | {mean_std(rows[name], 1)} | "
                     f"{', '.join(str(v) for v in rows[name])} | {PAPER_HINTON[name]} | "
                     f"{threes[0]} | {threes[1]} | {minutes} |")
    lines += ["", f"Mean ± sample std over seeds {','.join(map(str, args.seeds))}; errors of "
              f"the exported artifact on the 10,000 test images; {args.epochs} epochs per "
              f"model (SGD, momentum 0.9, batch 128, cosine decay from {lr_star:g} for the "
              f"teacher, {s_star:g} for the scratch student, {d_star:g} for the distilled "
              "ones). Chosen on the "
              "validation split (seed 0, trained on 50,000): the teacher's learning rate "
              f"among {', '.join(f'{lr:g}' for lr in TEACHER_LRS)} (validation accuracy "
              + ", ".join(f"{lr:g}: {a:.2f} %" for lr, a in lr_scores.items())
              + "), the scratch student's among the same (validation accuracy "
              + ", ".join(f"{lr:g}: {a:.2f} %" for lr, a in s_scores.items())
              + "), T and the distilled students' learning rate among "
              f"{', '.join(f'{t:g}' for t in TEMPERATURES)} x the same (validation "
              "accuracy; 0 for a run whose gradients overflowed: "
              + ", ".join(f"T {t:g} lr {lr:g}: {a:.2f} %" for (t, lr), a in t_scores.items())
              + f"); the bias of the 3 logit among 0 to 10 in steps of 0.25 ({b_star:g}: "
              f"{100 * val_acc[b_star]:.2f} % vs {100 * val_acc[0.0]:.2f} % without). "
              "Paper: Hinton, Vinyals & Dean 2015, section 3."]
    publish("mnist_hinton", "\n".join(lines), docs=args.docs)


# ----------------------------------------------------------------------------- Deep Compression


def huffman_bits(counts: np.ndarray) -> int:
    """Bits of a Huffman code (Huffman 1952) of symbols occurring ``counts`` times, plus
    its table (one byte per symbol's code length)."""
    counts = [int(c) for c in counts if c > 0]
    if len(counts) < 2:
        return sum(counts) + 8 * len(counts)
    heap = [(c, i, 0) for i, c in enumerate(counts)]  # (weight, tie-break, cost so far)
    heapq.heapify(heap)
    total, order = 0, len(counts)
    while len(heap) > 1:  # every merge adds one bit to each symbol below it
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a[0] + b[0]
        heapq.heappush(heap, (a[0] + b[0], order, 0))
        order += 1
    return total + 8 * len(counts)


def paper_bytes(workdir: str) -> tuple[float, float, float]:
    """(bytes the paper's way before Huffman coding, after it, float32 bytes of the same
    kernels) of the final weights of ``workdir``."""
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        weights = {k: f[k] for k in f.files}
    bits = huffman = dense = 0
    for key, w in weights.items():
        if not key.startswith("params/") or not key.endswith("kernel"):
            continue
        dense += 32 * w.size
        flat = w.ravel()
        nonzero = np.flatnonzero(flat != 0)
        codebook, codes = np.unique(flat[nonzero], return_inverse=True)
        k = max(len(codebook), 2)
        index_bits = 8 if w.ndim == 4 else 5  # conv 8, fc 5 (Han et al. 2016, section 3)
        limit = 2 ** index_bits - 1
        # Relative positions: the gap to the previous stored entry; a gap longer than the
        # index allows takes filler entries (a zero stored at the farthest reach).
        gaps = np.diff(np.concatenate([[-1], nonzero]))
        fillers = np.maximum(np.ceil(gaps / limit).astype(int) - 1, 0)
        entries = len(nonzero) + int(fillers.sum())
        bits += entries * (index_bits + math.ceil(math.log2(k + 1))) + 32 * k
        # Huffman-coded: the gap symbols (fillers count as gaps of `limit`) and the cluster
        # indices (fillers as one more symbol), each with its own code.
        last = gaps - fillers * limit
        gap_counts = np.bincount(last, minlength=limit + 1)
        gap_counts[limit] += int(fillers.sum())
        code_counts = np.concatenate([np.bincount(codes, minlength=len(codebook)),
                                      [int(fillers.sum())]])
        huffman += huffman_bits(gap_counts) + huffman_bits(code_counts) + 32 * k
    return bits / 8, huffman / 8, dense / 8


def compress_run(dataset: str, model: str, seed: int, clusters: int):
    c = config("mnist_compress.py", f"model={model},clusters={clusters},dataset={dataset}")
    for name in c.stage_order:
        c.stages[name].seed = seed
    return c


def last_stage(workdir: str) -> str:
    stages = sorted(os.listdir(os.path.join(workdir, "compressed")))
    order = [s for s in ("prune", "cluster", "quantize") if s in stages]
    return os.path.join(workdir, "compressed", order[-1])


def compress(args, dataset: str = "mnist", part: str = "compress",
             models: tuple[str, ...] = ("lenet300", "lenet5"),
             clusters_from: str | None = None) -> list[str]:
    """The Deep Compression rows of ``models`` on ``dataset``; ``clusters_from`` reuses the
    number of clusters chosen in that earlier part (MNIST's validation split)."""
    root = os.path.join(args.root, part)
    lines = ["| model | | test error, ours | paper | the paper's way, Huffman-coded | ratio "
             "| before Huffman | artifact on disk | ratio | paper | paper ratio |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for model in models:
        def fewest(scores: dict[int, float]) -> int:
            best = max(scores.values())
            return min(k for k, a in scores.items() if a >= best - TOLERANCE)

        # One chain on the validation split: the dense model once, then one compressed
        # stage per number of clusters, each distilled from and started from it.
        val_root = os.path.join(clusters_from or root, model, "validation")
        c = validation(compress_run("mnist" if clusters_from else dataset, model, 0,
                                    CLUSTERS[0]))
        compressed = c.stages.compressed
        c.stages = {"dense": c.stages.dense,
                    **{f"compressed_{k}": compressed.copy_and_resolve_references()
                       for k in CLUSTERS}}
        c.stage_order = ("dense", *(f"compressed_{k}" for k in CLUSTERS))
        for k in CLUSTERS:
            c.stages[f"compressed_{k}"].clustering.num_clusters = k
        chain_summary = run(c, val_root)
        k_scores = {k: 100 * float(chain_summary["stages"][f"compressed_{k}"]["accuracy"])
                    for k in CLUSTERS}
        k_star = fewest(k_scores)
        notes.append(f"{model}: {k_star} clusters ({'MNIST ' if clusters_from else ''}"
                     "validation accuracy "
                     + ", ".join(f"{k}: {a:.2f} %" for k, a in k_scores.items()) + ")")
        dense_err, comp_err, ours, theirs, huffman, float_bytes, dense_disk = (
            [] for _ in range(7))
        dirs = []
        for seed in args.seeds:
            d = os.path.join(root, model, f"seed{seed}")
            summary = run(compress_run(dataset, model, seed, k_star), d)
            dense_err.append(100 - 100 * float(summary["stages"]["dense"]["accuracy"]))
            comp_err.append(100 - 100 * float(summary["stages"]["compressed"]["accuracy"]))
            last = last_stage(d)
            paper, coded, full = paper_bytes(last)
            theirs.append(paper)
            huffman.append(coded)
            float_bytes.append(full)
            ours.append(float(summary["stages"]["compressed"]["artifact_bytes"]))
            dense_disk.append(float(summary["stages"]["dense"]["artifact_bytes"]))
            dirs += [os.path.join(d, "dense"), last]
        before, after, coded = np.mean(float_bytes), np.mean(theirs), np.mean(huffman)
        p = PAPER_DC[model] if dataset == "mnist" else (None,) * 5
        label = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5 (Caffe)"}[model]
        def paper(value, unit):
            return "—" if value is None else f"{value:,.2f} %" if unit == "%" else (
                f"{value / 1e3:,.0f} kB" if unit == "kB" else f"{value}×")

        lines.append(f"| {label} | dense | {mean_std(dense_err)} % | {paper(p[0], '%')} | "
                     f"{before / 1e3:,.1f} kB | 1× | | {np.mean(dense_disk) / 1e3:,.1f} kB | "
                     f"1× | {paper(p[2], 'kB')} | {'1×' if p[2] else '—'} |")
        lines.append(f"| | pruned, {k_star} clusters, int8, KD | {mean_std(comp_err)} % | "
                     f"{paper(p[1], '%')} | {coded / 1e3:,.1f} kB | {before / coded:.1f}× | "
                     f"{after / 1e3:,.1f} kB ({before / after:.1f}×) | "
                     f"{np.mean(ours) / 1e3:,.1f} kB | "
                     f"{np.mean(dense_disk) / np.mean(ours):.1f}× | {paper(p[3], 'kB')} | "
                     f"{paper(p[4], 'x')} |")
        print(lines[-2] + "\n" + lines[-1], flush=True)
        out = (os.path.join(ROOT, "docs", part, model) if args.docs
               else os.path.join(root, model, "report"))
        report.write_report(dirs, out, command=" ".join(["python", *sys.argv]))
    lines += ["", f"Mean ± sample std over seeds {','.join(map(str, args.seeds))}; error of "
              "the exported artifact on the 10,000 test images. Clusters chosen on the "
              "validation split (seed 0): " + "; ".join(notes) + ". The paper's way: the "
              "kernels' nonzero weights as cluster indices and their positions as relative "
              "indices (8 bits in conv, 5 in fc layers, filler entries for longer gaps), one "
              "float32 codebook per layer, no biases; Huffman-coded as the paper does (one "
              "code for the gaps and one for the indices per layer, with their tables), and "
              "before that at fixed widths; its ratio is to the float32 kernels. On disk: the "
              "whole artifact (positions as bitmask or CSR, packed indices, codebooks, float32 "
              "biases, scales and the JSON manifest, deflated), against the dense model's "
              "float32 artifact. Paper: Han, Mao & Dally 2016, Table 1 (after Huffman "
              "coding)."]
    return lines


# ----------------------------------------------------------------------------- Fashion-MNIST


FASHION_TEMPERATURES = (2.0, 4.0, 8.0)
FASHION_LRS = (0.05, 0.02)


def fashion_run(name: str, seed: int, teacher: str | None = None,
                temperature: float | None = None, learning_rate: float | None = None):
    c = stage(config("fashion_mnist.py"), name)
    c.seed = seed
    if teacher is not None:
        c.distill.teacher.workdir = teacher
    if temperature is not None:
        c.distill.losses.kd.kwargs.temperature = temperature
    if learning_rate is not None:
        c.optimizer.learning_rate = learning_rate
    return c


def fashion(args) -> list[str]:
    root = os.path.join(args.root, "fashion")
    val = os.path.join(root, "validation")
    teacher = os.path.join(val, "teacher")
    run(validation(fashion_run("teacher", 0)), teacher)
    s_lr, s_scores = choose_finite({lr: fashion_run("scratch", 0, learning_rate=lr)
                                    for lr in FASHION_LRS}, os.path.join(val, "scratch"))
    (t_star, d_lr), t_scores = choose_finite(
        {(t, lr): fashion_run("student", 0, teacher, t, lr)
         for t in FASHION_TEMPERATURES for lr in FASHION_LRS}, os.path.join(val, "student"))
    acc: dict[str, list] = {"teacher": [], "scratch": [], "student": []}
    params, disk = {}, {}
    for seed in args.seeds:
        d = os.path.join(root, f"seed{seed}")
        t = os.path.join(d, "teacher")
        for name in acc:
            c = {"teacher": fashion_run("teacher", seed),
                 "scratch": fashion_run("scratch", seed, learning_rate=s_lr),
                 "student": fashion_run("student", seed, t, t_star, d_lr)}[name]
            s = run(c, os.path.join(d, name))
            acc[name].append(100 * float(s["accuracy"]))
            params[name], disk[name] = s["num_params"], s["artifact_bytes"]
    what = {"teacher": "teacher: Caffe's LeNet-5 (conv 20, 50; fc 500)",
            "scratch": "student: LeNet-5 (conv 6, 16; fc 120, 84), labels only",
            "student": f"student distilled, T = {t_star:g}"}
    lines = ["| model | test accuracy | params | artifact on disk |", "|---|---:|---:|---:|"]
    lines += [f"| {text} | {mean_std(acc[name])} % | {params[name]:,} | "
              f"{disk[name] / 1e3:,.1f} kB |" for name, text in what.items()]
    lines += ["", f"Mean ± sample std over seeds {','.join(map(str, args.seeds))}, test split; "
              "chosen on the validation split (seed 0): the scratch student's learning rate "
              "among " + ", ".join(f"{lr:g}" for lr in FASHION_LRS) + " (validation accuracy "
              + ", ".join(f"{lr:g}: {a:.2f} %" for lr, a in s_scores.items())
              + f") -> {s_lr:g}; T and the distilled student's learning rate among "
              + ", ".join(f"{t:g}" for t in FASHION_TEMPERATURES) + " x the same ("
              + ", ".join(f"T {t:g} lr {lr:g}: {a:.2f} %" for (t, lr), a in t_scores.items())
              + f") -> T {t_star:g}, lr {d_lr:g}. The teacher: lr 0.05.", ""]
    compressed = compress(args, "fashion_mnist", "fashion", ("lenet5",),
                          clusters_from=os.path.join(args.root, "compress"))
    compressed[0] = compressed[0].replace("| paper |", "| |").replace(
        "| paper bytes | paper ratio |", "| | |")
    return lines + compressed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("hinton", "compress", "fashion"), required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=40, help="hinton: epochs per model")
    parser.add_argument("--smoke", action="store_true",
                        help="two tiny steps per stage: checks the plumbing, not the numbers")
    add_output_args(parser, "mnist_table")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if args.part == "hinton":
        hinton(args)
    elif args.part == "compress":
        publish("mnist_compress", "\n".join(compress(args)), docs=args.docs)
    else:
        publish("fashion_mnist", "\n".join(fashion(args)), docs=args.docs)


if __name__ == "__main__":
    main()
