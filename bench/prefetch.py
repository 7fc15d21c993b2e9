"""Batches onto the devices ahead of the step: jaxkd's prefetch thread vs grain's device_put.

    python bench/prefetch.py [--rounds 5] [--steps 300]

Feeds the real training stream (MNIST-1D through ``jaxkd.data.pipeline.train_dataset``,
with jitter) to a jitted KD step of the MNIST-1D CNN teacher and MLP 100-100 student, in
one process on the default device(s), three ways:

- ``thread``: :func:`jaxkd.prefetch.device_prefetch` (what the trainer uses: a thread that
  calls ``jax.make_array_from_process_local_data``, 2 batches ahead);
- ``grain``: ``grain.experimental.device_put`` (a CPU buffer of 4 and 2 batches per device);
- ``none``: :func:`jaxkd.prefetch.to_global` of each batch as the step asks for it (no
  overlap; what :func:`jaxkd.prefetch.device_batches` does on CPU).

Rounds are interleaved (thread, grain, none, thread, ...); it prints the median steps/s of
each, the spread (min-max over rounds), and thread/grain. ``grain.experimental.device_put``
takes the batch as the global array, so it cannot feed several processes, each of which
holds only its own rows; the thread can. About 1 minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import models, objective, optim, train
from jaxkd.config import Optimizer, data_config, hinton_losses
from jaxkd.data import pipeline
from jaxkd.prefetch import device_prefetch, to_global


def kd_step(batch_size: int):
    student = models.get_model("mlp", num_classes=10, widths=(100, 100))
    teacher = models.get_model("cnn1d", num_classes=10)
    tx = optim.make_optimizer(Optimizer(), 1e-3)
    terms = objective.parse_terms(hinton_losses(0.9, 4.0), has_teacher=True)
    step = jax.jit(train.make_train_step(student, tx, objective.build_objective(
        terms, num_steps=10**6), [teacher]), donate_argnums=(0,))
    state = train.init_state(student, tx, (40,), 0)
    teacher_vars = teacher.init(jax.random.PRNGKey(1), np.zeros((1, 40), np.float32))
    return step, state, [teacher_vars]


def timed(feed, step, state, teachers, steps: int):
    batches = iter(feed)
    state, _ = step(state, next(batches), teachers)  # compile
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, next(batches), teachers)
    jax.block_until_ready(m)
    rate = steps / (time.perf_counter() - start)
    if hasattr(batches, "close"):
        batches.close()
    return rate, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=100)
    args = parser.parse_args()
    data = data_config("mnist1d")
    data.augment = "jitter"
    data.transfer_split = "unlabelled"
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    step, state, teachers = kd_step(args.batch_size)

    def dataset():
        return pipeline.train_dataset(data, batch_size=args.batch_size, seed=0)

    feeds = {
        "thread": lambda: device_prefetch(iter(dataset()), sharding),
        "grain": lambda: grain.experimental.device_put(dataset(), sharding),
        "none": lambda: (to_global(b, sharding) for b in dataset()),
    }
    rates = {name: [] for name in feeds}
    for _ in range(args.rounds):
        for name, feed in feeds.items():
            rate, state = timed(feed(), step, state, teachers, args.steps)
            rates[name].append(rate)
    print(f"{jax.device_count()} device(s), batch {args.batch_size}, {args.rounds} interleaved "
          f"rounds of {args.steps} KD steps (CNN teacher -> MLP 100-100, MNIST-1D, jitter):")
    print("| feed | median steps/s | min - max |")
    print("|---|---:|---:|")
    for name, r in rates.items():
        print(f"| {name} | {np.median(r):.0f} | {min(r):.0f} - {max(r):.0f} |")
    ratio = np.median(rates["thread"]) / np.median(rates["grain"])
    print(f"thread / grain steps/s = {ratio:.3f}")


if __name__ == "__main__":
    main()
