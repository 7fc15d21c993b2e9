"""Precomputed teacher logits read from disk, against no teacher and an in-step teacher.

    python bench/precomputed_stream.py [--rounds 7] [--steps 300] [--docs]

The real path, end to end: MNIST-1D with its 20,000-input transfer set through
``jaxkd.data.pipeline.train_dataset``, into the jitted train step of the MLP 100-100
student, in one process:

- ``student``: the label loss alone (no teacher);
- ``precomputed, in memory``: top-8 logits written by ``jaxkd.teacher_logits.write``, read
  into host memory once with the examples (the default), with the residual-bucket KD loss;
- ``student, from disk`` and ``precomputed, from disk``: the same two with examples and
  logits streamed from their array_record files (``config.data.in_memory=False``: batched
  random reads, a tfds decode per example and a fingerprint check per batch), each
  compared with the student reading its examples the same way;
- ``in-step teacher``: the MNIST-1D CNN run inside the step (Hinton KD).

Rounds are interleaved; it prints median steps/s with its min-max, and each ratio of step
time to the student-only step (median over rounds, min-max, flagged when too noisy to
mean anything: ``bench/timing.py``). With ``--docs`` the table goes to
``docs/tables/precomputed_stream.md``. About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from common import publish
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from timing import ratio

from jaxkd import models, objective, optim, teacher_logits, teachers, train
from jaxkd.config import Optimizer, data_config, hinton_losses, run_config, supervised_losses
from jaxkd.data import pipeline
from jaxkd.prefetch import device_batches

TOP_K = 8


def runner(terms_spec, teacher, *, has_teacher: bool, extra=None, in_memory=True):
    data = data_config("mnist1d")
    data.transfer_split, data.in_memory = "unlabelled", in_memory
    student = models.get_model("mlp", num_classes=10, widths=(100, 100))
    tx = optim.make_optimizer(Optimizer(), 1e-3)
    terms = objective.parse_terms(terms_spec, has_teacher=has_teacher)
    teachers = [teacher[0]] if teacher else []
    step = jax.jit(train.make_train_step(student, tx, objective.build_objective(
        terms, num_steps=10**6), teachers), donate_argnums=(0,))
    box = {"state": train.init_state(student, tx, (40,), 0)}
    teacher_vars = [teacher[1]] if teacher else []
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))

    def run(steps: int) -> float:
        fields = extra(data) if extra else None
        batches = device_batches(iter(pipeline.train_dataset(
            data, batch_size=100, seed=0, extra_fields=fields)), sharding)
        state, _ = step(box["state"], next(batches), teacher_vars)
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, next(batches), teacher_vars)
        jax.block_until_ready(m)
        box["state"] = state
        return steps / (time.perf_counter() - start)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = os.path.join(tmp, "teacher")
        c = run_config("mnist1d", "cnn1d")
        c.batch_size, c.num_steps = 100, 200
        c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 200
        train.train_and_evaluate(c, teacher_dir)
        data = data_config("mnist1d")
        data.transfer_split = "unlabelled"
        logits_dir = os.path.join(tmp, "top8")
        teacher_logits.write(teacher_dir, data, logits_dir, top_k=TOP_K, temperature=4.0)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        loaded = teachers.load(teacher_dir, sharding=NamedSharding(mesh, P()))
        topk = {"kd": {"name": "topk_soft_target_kl", "weight": 0.9,
                       "kwargs": {"temperature": 4.0}},
                "ce": {"name": "cross_entropy", "weight": 0.1}}

        def stream(d):
            return teacher_logits.stream(logits_dir, d)

        runs = {
            "student": runner(supervised_losses(), None, has_teacher=False),
            "precomputed, in memory": runner(topk, None, has_teacher=True, extra=stream),
            "student, from disk": runner(supervised_losses(), None, has_teacher=False,
                                         in_memory=False),
            "precomputed, from disk": runner(topk, None, has_teacher=True, extra=stream,
                                             in_memory=False),
            "in-step teacher": runner(hinton_losses(0.9, 4.0), (loaded.model, loaded.variables),
                                      has_teacher=True),
        }
        rates = {k: [] for k in runs}
        for r in range(args.rounds + 1):
            for k, run in runs.items():
                rate = run(args.steps)
                if r:  # round 0 warms up threads and caches
                    rates[k].append(rate)
    lines = ["| step | median steps/s (min - max) | step time / student-only, same input |",
             "|---|---:|---|"]
    for k, r in rates.items():
        # Step time ratio = student-only rate / this rate, round by round, both reading
        # their examples the same way (host memory, or tfds records decoded from disk).
        base = rates["student, from disk" if "disk" in k else "student"]
        lines.append(f"| {k} | {np.median(r):.0f} ({min(r):.0f} - {max(r):.0f}) | "
                     f"{ratio(base, r).text(digits=2)} |")
    lines += ["", f"MLP 100-100 student, batch 100, MNIST-1D + transfer set, median over "
              f"{args.rounds} interleaved rounds of {args.steps} steps (after one warm-up "
              "round). 'from disk': examples and logits read from their array_record files "
              "at every step (config.data.in_memory=False); 'in memory' (the default): both "
              "read into host memory once."]
    publish("precomputed_stream", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
