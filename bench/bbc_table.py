"""BERT on BBC News: the fine-tuned MiniLM teacher, its distilled and compressed students.

    python -m jaxkd.data.fetch bbc_news                  # once
    python -m jaxkd.models.fetch all-MiniLM-L6-v2        # once
    python bench/bbc_table.py [--seeds=0,1,2] [--layers=2,3] [--epochs=3] [--docs]

Every row is a run of ``configs/bbc_news_bert.py`` (its ``student`` arg), evaluated once
on the 444 test articles through its exported artifact; runs live in ``--root`` (default
``runs/bbc_table``) and finished ones are reused. What the table reads of each run (and
the speed ratios) is kept in ``bench/records/bbc_table.json`` (committed; ``common.Ledger``)
under the sha256 of the run's config, so the table can be built over several sessions on
machines that do not keep ``runs/`` (``--seeds=0`` first, then ``--seeds=0,1,2``; a
recorded run is not trained again while its config is unchanged; ``--fresh`` ignores the
records). Chosen on the validation split (seed 0; 10 % of the 1,558
training articles held out): the teacher's learning rate among ``TEACHER_LRS``, then the
students' among ``STUDENT_LRS`` on the KD student of ``max(--layers)`` layers.

Rows, per seed: the teacher (all-MiniLM-L6-v2 fine-tuned); for each ``--layers`` the
students ``scratch``, ``kd``, ``tinybert``, ``minilm`` and ``init``; then ``pruned`` (the
teacher with half its heads and FFN neurons, Michel et al.'s importance, + KD), ``qat``
(the teacher int8 everywhere, embedding tables included, + KD) and ``pipeline`` (layers ->
heads/FFN -> int8, KD throughout). Every student learns from the same teacher run of its
seed. Columns: test accuracy (mean ± sample std over seeds), parameters, bytes of the
artifact on disk, and inference tokens/s relative to the teacher's artifact (seed 0's
artifacts, 32 articles per call, interleaved rounds in this one process). The default
budget fits a seed in under an hour of a 2-core CPU: the first ``--max-length=64`` tokens
of each article, ``--teacher-epochs=3``, ``--epochs=3``, ``--qat-epochs=1``.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
from common import (
    ROOT,
    Ledger,
    accuracy,
    add_output_args,
    fingerprint,
    mean_std,
    publish,
    run,
    wall_seconds,
)
from timing import Ratio, interleaved

from jaxkd import configfile, export, stages
from jaxkd.config import validation

TEACHER_LRS = (5e-5, 1e-4)
STUDENT_LRS = (1e-4, 3e-4)
TINYBERT_ATTENTION = (True, False)  # the intermediate stage's attention-score term
STUDENTS = ("scratch", "kd", "tinybert", "minilm", "init")
COMPRESSED = ("pruned", "qat", "pipeline")
WHAT = {
    "scratch": "{L} layers, labels only",
    "kd": "{L} layers, KD (T = 4)",
    "tinybert": "{L} layers, TinyBERT's layer losses, then KD",
    "minilm": "{L} layers, KD + MiniLM attention and value relations",
    "init": "{L} layers from the teacher's + KD",
    "pruned": "teacher, half the heads and FFN neurons (Michel importance) + KD",
    "qat": "teacher, QAT int8 (w8a8, int8 embedding tables) + KD",
    "pipeline": "{L} layers from the teacher -> half the heads/FFN -> QAT int8, KD throughout",
}
SMOKE = False
BUDGET = {"teacher_epochs": 3, "qat_epochs": 1, "max_length": 64}


def config(student: str, layers: int, lr: float, teacher_lr: float, epochs: int,
           tinybert_attention: bool = True):
    arg = (f"student={student},layers={layers},lr={lr},teacher_lr={teacher_lr},epochs={epochs},"
           f"teacher_epochs={BUDGET['teacher_epochs']},qat_epochs={BUDGET['qat_epochs']},"
           f"max_length={BUDGET['max_length']},tinybert_attention={tinybert_attention}")
    return configfile.load(os.path.join(ROOT, "configs", "bbc_news_bert.py")
                           + f":{arg}{',smoke' if SMOKE else ''}")


def run_after_teacher(c, teacher_dir: str, directory: str, *, validate: bool = False) -> dict:
    """The stages of chain ``c`` after its teacher, in ``directory/<stage>``, with
    ``stage:teacher`` meaning ``teacher_dir``: the last stage's summary."""
    c = validation(c) if validate else c
    summary = {}
    for name in c.stage_order[1:]:
        stage = c.stages[name]
        for get, put in (
                (lambda r: r.distill.teacher.workdir,
                 lambda r, v: setattr(r.distill.teacher, "workdir", v)),
                (lambda r: r.init.teacher_workdir,
                 lambda r, v: setattr(r.init, "teacher_workdir", v))):
            value = get(stage)
            if value.startswith(stages.PREFIX):
                ref = value[len(stages.PREFIX):]
                put(stage, teacher_dir if ref == "teacher" else os.path.join(directory, ref))
        summary = run(stage, os.path.join(directory, name))
    return summary


def tokens_per_second(artifacts: dict[str, str], rounds: int) -> dict[str, Ratio]:
    """Each artifact's inference speed relative to the teacher's, on the same 32 random
    articles of the artifacts' length (every position a token), interleaved rounds."""
    fns = {}
    rng = np.random.default_rng(0)
    for key, directory in artifacts.items():
        predict, manifest = export.load(os.path.join(directory, "artifact"))
        vocab = manifest["model"]["kwargs"]["vocab_size"]
        length = manifest["model"]["input_shape"][0]
        ids = jax.device_put(rng.integers(1, vocab, size=(32, length)).astype(np.int32))
        mask = jax.device_put(np.ones((32, length), np.int32))
        fns[key] = (lambda p, i, m: lambda: p(i, m))(predict, ids, mask)
    times = interleaved(fns, rounds=rounds, calls=2)
    return {k: Ratio(times["teacher"] / t) for k, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--layers", default="2,3", help="the students' depths")
    parser.add_argument("--epochs", type=int, default=3, help="the students' epochs")
    parser.add_argument("--teacher-epochs", type=int, default=BUDGET["teacher_epochs"])
    parser.add_argument("--qat-epochs", type=int, default=BUDGET["qat_epochs"])
    parser.add_argument("--max-length", type=int, default=BUDGET["max_length"],
                        help="tokens kept of each article")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--smoke", action="store_true",
                        help="two tiny steps per stage: checks the plumbing, not the numbers")
    parser.add_argument("--fresh", action="store_true",
                        help="ignore bench/records/bbc_table.json: run everything again")
    add_output_args(parser, "bbc_table")
    args = parser.parse_args()
    global SMOKE
    SMOKE = args.smoke
    BUDGET.update(teacher_epochs=args.teacher_epochs, qat_epochs=args.qat_epochs,
                  max_length=args.max_length)
    seeds = [int(s) for s in args.seeds.split(",")]
    depths = [int(n) for n in args.layers.split(",")]
    val = os.path.join(args.root, "validation")
    ledger = Ledger("bbc_table", fresh=args.fresh, **({"directory": args.root} if SMOKE else {}))

    def teacher(lr, seed=0):
        t = config("kd", max(depths), STUDENT_LRS[0], lr, args.epochs).stages["teacher"]
        t.seed = seed
        return t

    def validated(key, c, train):
        return accuracy(ledger.run(f"validation/{key}", validation(c), train))

    t_scores = {lr: validated(f"teacher/{lr}", teacher(lr), lambda lr=lr: run(
        validation(teacher(lr)), os.path.join(val, "teacher", str(lr))))
        for lr in TEACHER_LRS}
    t_lr = max(t_scores, key=lambda k: t_scores[k])
    val_teacher = os.path.join(val, "teacher", str(t_lr))

    def after_val_teacher(c, directory):
        run(validation(teacher(t_lr)), val_teacher)  # again, where only its record was kept
        return run_after_teacher(c, val_teacher, directory, validate=True)

    s_scores = {lr: validated(f"kd/{lr}", config("kd", max(depths), lr, t_lr, args.epochs),
                              lambda lr=lr: after_val_teacher(
                                  config("kd", max(depths), lr, t_lr, args.epochs),
                                  os.path.join(val, "kd", str(lr))))
                for lr in STUDENT_LRS}
    s_lr = max(s_scores, key=lambda k: s_scores[k])

    def tinybert(att):
        return config("tinybert", max(depths), s_lr, t_lr, args.epochs, att)

    tb_scores = {att: validated(f"tinybert/attention_{att}".lower(), tinybert(att),
                                lambda att=att: after_val_teacher(tinybert(att), os.path.join(
                                    val, "tinybert", f"attention_{att}".lower())))
                 for att in TINYBERT_ATTENTION}
    tb_att = max(tb_scores, key=lambda k: tb_scores[k])
    print(f"validation: teacher lr {t_scores} -> {t_lr:g}; student lr {s_scores} -> {s_lr:g}; "
          f"TinyBERT attention term {tb_scores} -> {tb_att}", flush=True)

    rows = [("teacher", 0)] + [(s, n) for n in depths for s in STUDENTS] + [
        ("pruned", 0), ("qat", 0), ("pipeline", max(depths))]
    results: dict[tuple[str, int], list[dict]] = {r: [] for r in rows}
    seed0: dict[str, str] = {}  # seed 0's artifacts, trained again if only recorded
    prints: dict[str, str] = {}  # and the fingerprints of their configs
    for seed in seeds:
        d = os.path.join(args.root, f"seed{seed}")
        t_dir = os.path.join(d, "teacher")
        t = teacher(t_lr, seed)
        results[("teacher", 0)].append(ledger.run(f"seed{seed}/teacher", t,
                                                  lambda t=t, t_dir=t_dir: run(t, t_dir)))
        if seed == seeds[0]:
            seed0["teacher"] = (lambda t=t, t_dir=t_dir: run(t, t_dir), t_dir)
            prints["teacher"] = fingerprint(t)
        for student, n in rows[1:]:
            c = config(student, n or max(depths), s_lr, t_lr, args.epochs, tb_att)
            for name in c.stage_order:
                c.stages[name].seed = seed
            key = f"{student}{n or ''}"
            directory = os.path.join(d, key)

            def train(c=c, t=t, t_dir=t_dir, directory=directory):
                run(t, t_dir)  # the teacher again, where only its record was kept
                return run_after_teacher(c, t_dir, directory)

            if seed == seeds[0]:
                seed0[key] = (train, os.path.join(directory, c.stage_order[-1]))
                prints[key] = fingerprint(c)
            results[(student, n)].append(ledger.run(f"seed{seed}/{key}", c, train))

    def measure_speed():
        for train, _ in seed0.values():
            train()
        ratios = tokens_per_second({k: v[1] for k, v in seed0.items()}, args.rounds)
        return {k: r.values.tolist() for k, r in ratios.items()}

    speed_config = {"artifacts": prints, "rounds": args.rounds, "seed": seeds[0]}
    speed_key = f"speed/seed{seeds[0]}"
    ratios = ledger.get(speed_key, speed_config) or ledger.put(speed_key, speed_config,
                                                               measure_speed())
    speed = {k: Ratio(np.asarray(v)) for k, v in ratios.items()}
    if ledger.reused:
        print(f"{len(ledger.reused)} measurements from {os.path.relpath(ledger.path, ROOT)} "
              f"(their runs not trained again): {', '.join(ledger.reused)}", flush=True)

    lines = ["| model | test accuracy (%) | per seed | parameters | artifact bytes | "
             "tokens/s vs teacher | train wall time |", "|---|---:|---|---:|---:|---:|---:|"]
    for student, n in rows:
        runs = results[(student, n)]
        acc = [accuracy(s) for s in runs]
        what = ("teacher: all-MiniLM-L6-v2 (6 layers, 384 wide) fine-tuned" if student ==
                "teacher" else WHAT[student].format(L=n))
        key = "teacher" if student == "teacher" else f"{student}{n or ''}"
        minutes = np.mean([wall_seconds(s) for s in runs]) / 60
        lines.append(f"| {what} | {mean_std(acc)} | {', '.join(f'{a:.2f}' for a in acc)} | "
                     f"{runs[0]['num_params']:,} | {runs[0]['artifact_bytes']:,} | "
                     f"{speed[key].text(digits=2)} | {minutes:.1f} min |")
    lines += ["", f"Mean ± sample std over seeds {','.join(map(str, seeds))} on the 444 test "
              "articles (the exported artifact); parameters, bytes and speed of seed "
              f"{seeds[0]}'s runs (tokens/s: the teacher's time over the row's, median "
              f"(min-max) of {args.rounds} interleaved rounds, 32 articles x "
              f"{args.max_length} tokens). Every article cut to its first {args.max_length} "
              f"tokens. Teacher: AdamW, {args.teacher_epochs} epochs; students: AdamW, "
              f"{args.epochs} epochs (QAT: {args.qat_epochs} at a tenth of the rate), batch "
              "32, 10 % warm-up, cosine decay; KD: T = 4, alpha = 0.5. Learning rates "
              "chosen on the validation split (seed 0): the teacher's "
              + ", ".join(f"{lr:g}: {a:.2f} %" for lr, a in t_scores.items())
              + f" -> {t_lr:g}; the students' (KD, {max(depths)} layers) "
              + ", ".join(f"{lr:g}: {a:.2f} %" for lr, a in s_scores.items())
              + f" -> {s_lr:g}; TinyBERT's intermediate stage (its own {args.epochs} epochs, "
              "embedding, hidden-state and attention-score MSE) with the attention term "
              + ", ".join(f"{a}: {v:.2f} %" for a, v in tb_scores.items())
              + f" -> {tb_att}. Wall time: the row's last stage (pipeline: its QAT stage; "
              "TinyBERT: its KD stage)."]
    publish("bbc_news_bert", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
