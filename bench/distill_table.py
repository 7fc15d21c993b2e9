"""The distillation table: every method, same student and budget, mean ± std over seeds.

    python bench/distill_table.py --dataset=mnist1d [--seeds=0,1,2] [--docs]
    python bench/distill_table.py --dataset=digits [--seeds=0,1,2] [--docs]

Runs live in ``--root`` (default ``runs/distill_table``)``/<dataset>/...``; finished runs
are reused, so the command can be interrupted and relaunched. MNIST-1D: CNN teacher, MLP
100-100 student, 6000 Adam steps (1e-2, batch 100), distillation through the 20,000-input
transfer set. Digits: LeNet-5 teacher, MLP 32 student, 3000 steps, 1-pixel jitter as the
transfer.

The temperature of every Hinton-KD row is chosen first, on the validation split of seed 0
(teacher and students trained on the first 90 % of train, scored on the last 10 %,
``jaxkd.config.validation``), from ``TEMPERATURES``; then every row is trained on the
whole train split with that temperature and scored once on the test split. With
``--docs`` the table goes to ``docs/tables/distill_<dataset>.md``.
"""

from __future__ import annotations

import argparse
import os

from common import accuracy, add_output_args, choose, mean_std, publish, run

from jaxkd import teacher_logits
from jaxkd.config import hinton_losses, run_config, validation

TOP_K = 3
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ALPHA = 0.9  # the weight of the soft-target term (Hinton et al.'s "considerably lower" CE)


def base(dataset: str, model: str, seed: int, **kwargs):
    c = run_config(dataset, model, **kwargs)
    c.seed = seed
    if dataset == "mnist1d":
        c.batch_size, c.num_steps = 100, 6000
    else:
        c.data.augment, c.data.jitter_pixels = "jitter", 1
        c.batch_size, c.eval_batch_size, c.num_steps = 64, 360, 3000
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 1000
    c.eval_every_steps = 100000
    c.checkpoint_every_steps = 100000
    return c


def teacher(dataset: str, seed: int):
    c = base(dataset, "cnn1d" if dataset == "mnist1d" else "lenet5", seed)
    c.optimizer.learning_rate = 1e-2 if dataset == "mnist1d" else 3e-3
    return c


def student(dataset, seed, teacher_dir=None, losses=None):
    widths = (100, 100) if dataset == "mnist1d" else (32,)
    c = base(dataset, "mlp", seed, widths=widths)
    if teacher_dir:
        if dataset == "mnist1d":
            c.data.transfer_split = "unlabelled"
        c.distill.teacher.workdir = teacher_dir
        c.distill.losses = losses
    return c


def topk(temperature: float, residual: bool) -> dict:
    return {"kd": {"name": "topk_soft_target_kl", "weight": ALPHA,
                   "kwargs": {"temperature": temperature, "residual": residual}},
            "ce": {"name": "cross_entropy", "weight": 1 - ALPHA}}


def choose_temperature(dataset: str, root: str) -> tuple[float, dict[float, float]]:
    """The Hinton-KD temperature with the best validation accuracy (seed 0)."""
    d = os.path.join(root, dataset, "validation")
    teacher_dir = os.path.join(d, "teacher")
    run(validation(teacher(dataset, 0)), teacher_dir)  # never sees the validation labels
    candidates = {t: student(dataset, 0, teacher_dir, hinton_losses(ALPHA, t))
                  for t in TEMPERATURES}
    return choose(candidates, os.path.join(d, "kd_T"))


def one_seed(dataset: str, seed: int, root: str, temperature: float) -> dict[str, float]:
    d = os.path.join(root, dataset, f"seed{seed}")
    kd = hinton_losses(ALPHA, temperature)
    t_dir = os.path.join(d, "teacher")
    acc = {"teacher": accuracy(run(teacher(dataset, seed), t_dir))}
    acc["scratch"] = accuracy(run(student(dataset, seed), os.path.join(d, "scratch")))
    acc["hinton_kd"] = accuracy(run(student(dataset, seed, t_dir, kd), os.path.join(d, "kd")))
    dkd = {"dkd": {"name": "decoupled_kd", "kwargs": {"alpha": 1.0, "beta": 8.0,
                                                      "temperature": 4.0}},
           "ce": {"name": "cross_entropy", "weight": 1.0}}
    acc["dkd"] = accuracy(run(student(dataset, seed, t_dir, dkd), os.path.join(d, "dkd")))
    mse = {"mse": {"name": "logit_mse", "weight": ALPHA},
           "ce": {"name": "cross_entropy", "weight": 1 - ALPHA}}
    acc["logit_mse"] = accuracy(run(student(dataset, seed, t_dir, mse),
                                    os.path.join(d, "logit_mse")))
    hint = dict(kd.to_dict())
    hint["hint"] = {"name": "hint_mse", "weight": 0.5, "student_feature": "embedding",
                    "teacher_feature": "embedding"}
    acc["kd_fitnets_hint"] = accuracy(run(student(dataset, seed, t_dir, hint),
                                          os.path.join(d, "kd_hint")))
    # Precomputed top-k logits: written once from the teacher, then streamed; with the
    # residual bucket (the default) and without (renormalised over the top k).
    logits_dir = os.path.join(d, f"teacher_top{TOP_K}")
    for residual in (True, False):
        sc = student(dataset, seed, t_dir, topk(temperature, residual))
        sc.distill.teacher.workdir = ""
        sc.data.augment = "none"  # the stored logits saw un-augmented inputs
        teacher_logits.write(t_dir, sc.data, logits_dir, top_k=TOP_K, dtype="float16",
                             temperature=temperature)  # resumes; a no-op once written
        sc.distill.teacher_logits = logits_dir
        name = f"precomputed_top{TOP_K}" + ("" if residual else "_no_residual")
        acc[name] = accuracy(run(sc, os.path.join(d, name)))
    # Teacher -> assistant -> student (Mirzadeh et al. 2020).
    ac = student(dataset, seed, t_dir, kd)
    ac.model.kwargs = {"widths": (400, 400) if dataset == "mnist1d" else (128,)}
    assistant = os.path.join(d, "assistant")
    run(ac, assistant)
    acc["ta_chain"] = accuracy(run(student(dataset, seed, assistant, kd),
                                   os.path.join(d, "ta_student")))
    # Student initialised from the (same-family) assistant by width pruning, then KD from
    # the teacher.
    ic = student(dataset, seed, t_dir, kd)
    ic.init.method, ic.init.teacher_workdir = "prune_width", assistant
    acc["init_prune_width_kd"] = accuracy(run(ic, os.path.join(d, "init_kd")))
    return acc


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"])
    parser.add_argument("--seeds", default="0,1,2")
    add_output_args(parser, "distill_table")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    temperature, scores = choose_temperature(args.dataset, args.root)
    per_seed = [one_seed(args.dataset, s, args.root, temperature) for s in seeds]
    lines = ["| method | test accuracy (%) | per seed |", "|---|---:|---|"]
    for method in per_seed[0]:
        values = [p[method] for p in per_seed]
        lines.append(f"| {method} | {mean_std(values)} | "
                     + ", ".join(f"{v:.1f}" for v in values) + " |")
    logits_dir = os.path.join(args.root, args.dataset, f"seed{seeds[0]}", f"teacher_top{TOP_K}")
    lines += ["", f"Mean ± sample std over seeds {args.seeds}, test split. Hinton KD at T = "
              f"{temperature:g}, chosen on the validation split (seed 0; validation accuracy "
              + ", ".join(f"T={t:g}: {a:.1f} %" for t, a in scores.items()) + "). Stored "
              f"top-{TOP_K} logits (float16 values, int32 indices, float32 residual): "
              f"{teacher_logits.bytes_per_example(logits_dir):.1f} bytes per example."]
    publish(f"distill_{args.dataset}", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
