"""The distillation table: every method, same student and budget, mean +- std over seeds.

    python bench/distill_table.py --dataset=mnist1d --seeds=0,1,2 --out=docs/distillation.md
    python bench/distill_table.py --dataset=digits --seeds=0,1,2 --out=docs/distillation.md

Runs live in ``runs/distill_table/<dataset>/seed<k>/<method>``; finished runs are reused,
so the command can be interrupted and relaunched. MNIST-1D: CNN teacher, MLP 100-100
student, 6000 Adam steps (1e-2, batch 100), distillation through the 20,000-input transfer
set. Digits: LeNet-5 teacher, MLP 32 student, 3000 steps, 1-pixel jitter as the transfer.
The table is appended to ``--out`` under a heading per dataset.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from jaxkd import metrics, teacher_logits, train
from jaxkd.config import hinton_losses, run_config

TOP_K = 3


def base(dataset: str, model: str, seed: int, **kwargs):
    c = run_config(dataset, model, **kwargs)
    c.seed = seed
    if dataset == "mnist1d":
        c.batch_size, c.num_steps = 100, 6000
        c.optimizer.learning_rate = 1e-2
    else:
        c.data.augment, c.data.jitter_pixels = "jitter", 1
        c.batch_size, c.eval_batch_size, c.num_steps = 64, 360, 3000
        c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 1000
    c.eval_every_steps = 100000
    c.checkpoint_every_steps = 100000
    return c


def student(dataset, seed, teacher_dir=None, losses=None):
    widths = (100, 100) if dataset == "mnist1d" else (32,)
    c = base(dataset, "mlp", seed, widths=widths)
    if teacher_dir:
        if dataset == "mnist1d":
            c.data.transfer_split = "unlabelled"
        c.distill.teacher.workdir = teacher_dir
        c.distill.losses = losses or hinton_losses(0.9, 4.0)
    return c


def run(c, workdir):
    summary = metrics.read_summary(workdir)
    if summary is None or "accuracy" not in summary:
        summary = train.train_and_evaluate(c, workdir)
    return summary


def one_seed(dataset: str, seed: int, root: str) -> dict[str, float]:
    d = os.path.join(root, dataset, f"seed{seed}")
    teacher_model = "cnn1d" if dataset == "mnist1d" else "lenet5"
    teacher_lr = 1e-2 if dataset == "mnist1d" else 3e-3
    tc = base(dataset, teacher_model, seed)
    tc.optimizer.learning_rate = teacher_lr
    teacher = os.path.join(d, "teacher")
    acc = {"teacher": run(tc, teacher)["accuracy"]}
    acc["scratch"] = run(student(dataset, seed), os.path.join(d, "scratch"))["accuracy"]
    acc["hinton_kd"] = run(student(dataset, seed, teacher), os.path.join(d, "kd"))["accuracy"]
    dkd = {"dkd": {"name": "decoupled_kd", "kwargs": {"alpha": 1.0, "beta": 8.0,
                                                      "temperature": 4.0}},
           "ce": {"name": "cross_entropy", "weight": 1.0}}
    acc["dkd"] = run(student(dataset, seed, teacher, dkd), os.path.join(d, "dkd"))["accuracy"]
    mse = {"mse": {"name": "logit_mse", "weight": 0.9},
           "ce": {"name": "cross_entropy", "weight": 0.1}}
    acc["logit_mse"] = run(student(dataset, seed, teacher, mse),
                           os.path.join(d, "logit_mse"))["accuracy"]
    hint = dict(hinton_losses(0.9, 4.0).to_dict())
    hint["hint"] = {"name": "hint_mse", "weight": 0.5, "student_feature": "embedding",
                    "teacher_feature": "embedding"}
    acc["kd_fitnets_hint"] = run(student(dataset, seed, teacher, hint),
                                 os.path.join(d, "kd_hint"))["accuracy"]
    # Precomputed top-k logits: written once from the teacher, then streamed.
    sc = student(dataset, seed, teacher, {
        "kd": {"name": "topk_soft_target_kl", "weight": 0.9, "kwargs": {"temperature": 4.0}},
        "ce": {"name": "cross_entropy", "weight": 0.1}})
    sc.distill.teacher.workdir = ""
    sc.data.augment = "none"  # the stored logits saw un-augmented inputs
    logits_dir = os.path.join(d, f"teacher_top{TOP_K}")
    teacher_logits.write(teacher, sc.data, logits_dir, top_k=TOP_K, dtype="float16",
                         temperature=4.0)  # resumes
    sc.distill.teacher_logits = logits_dir
    acc[f"precomputed_top{TOP_K}"] = run(sc, os.path.join(d, "topk"))["accuracy"]
    # Teacher -> assistant -> student (Mirzadeh et al. 2020).
    assistant_widths = (400, 400) if dataset == "mnist1d" else (128,)
    ac = student(dataset, seed, teacher)
    ac.model.kwargs = {"widths": assistant_widths}
    assistant = os.path.join(d, "assistant")
    run(ac, assistant)
    acc["ta_chain"] = run(student(dataset, seed, assistant),
                          os.path.join(d, "ta_student"))["accuracy"]
    # Student initialised from the (same-family) assistant by width pruning, then KD from
    # the teacher.
    ic = student(dataset, seed, teacher)
    ic.init.method = "prune_width"
    ic.init.teacher_workdir = assistant
    acc["init_prune_width_kd"] = run(ic, os.path.join(d, "init_kd"))["accuracy"]
    return acc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs/distill_table")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = [one_seed(args.dataset, s, args.root) for s in seeds]
    lines = [f"### {args.dataset} ({len(seeds)} seeds: {args.seeds})", "",
             "| method | test accuracy (mean ± std) | per seed |", "|---|---:|---|"]
    for method in per_seed[0]:
        values = 100 * np.array([p[method] for p in per_seed])
        lines.append(f"| {method} | {values.mean():.2f} ± {values.std():.2f} % | "
                     + ", ".join(f"{v:.1f}" for v in values) + " |")
    logits_dir = os.path.join(args.root, args.dataset, f"seed{seeds[0]}", f"teacher_top{TOP_K}")
    lines += ["", f"Stored top-{TOP_K} logits (float16 values + int32 indices): "
              f"{teacher_logits.bytes_per_example(logits_dir):.1f} bytes per example.", ""]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
