"""Cost of pruning and weight clustering: compressed train step vs the plain step.

    python bench/compress_step.py [--steps 100] [--batch_size 128] [--rounds 7] [--docs]

For the Hinton student MLP 784-800-800-10 and the MNIST-1D CNN (``cnn1d``), measured in
this one process on the default device, ``jaxkd.train.make_train_step`` (jitted with
``donate_argnums=(0,)`` as the trainer does) with ``optax.adam(1e-3)`` wrapped as
``jaxkd.train.build_optimizer`` wraps it:

- ``pruning.masked``: magnitude scores, polynomial schedule to 90 % sparsity, masks
  recomputed every 100 steps; Fisher scores (squared per-example gradients of 16 examples
  of each batch, summed every step, as the trainer computes them), same schedule; 2:4
  ('n:m', one-shot);
- ``sharing.cluster``: 16 clusters per layer with fixed assignments; re-assigned every 100
  steps from latent dense kernels;
- both, pruning outermost (``masked(cluster(adam))``), 90 % and 16 clusters.

Clustered states are snapped to their codebooks once after init (``sharing.materialize``),
as ``train_and_evaluate`` does. The schedules span the whole benchmark, so the every-100-
steps mask and assignment updates are amortised over the timed steps as in training.
Variants are interleaved in ``--rounds`` rounds, each timed over ``--steps`` steps between
two timings of the plain step and divided by their mean, so that machine noise hits both
sides of a ratio alike; the table gives the median ms/step and the median ratio (target
<= 1.2). With the default 100 steps every timed window holds one mask update of the
every-100-steps schedules.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import publish
from timing import Ratio, seconds_per_call

from jaxkd import models, objective, pruning, sharing, train
from jaxkd.config import Pruning, supervised_losses

MODELS = {
    "mlp 784-800-800-10": ("mlp", {"widths": (800, 800)}, (784,)),
    "cnn1d": ("cnn1d", {}, (40,)),
}
GRADUAL = {"sparsity": 0.9, "schedule": "polynomial", "frequency": 100}
# label: (config.pruning fields or None, config.clustering fields or None)
VARIANTS = {
    "plain": (None, None),
    "prune magnitude 90%": ({"method": "magnitude", **GRADUAL}, None),
    "prune fisher 90%": ({"method": "fisher", **GRADUAL}, None),
    "prune 2:4": ({"method": "magnitude", "pattern": "n:m", "n": 2, "m": 4,
                   "schedule": "one_shot"}, None),
    "cluster 16 fixed": (None, {"num_clusters": 16}),
    "cluster 16 reassign/100": (None, {"num_clusters": 16, "reassign_every": 100}),
    "prune 90% + cluster 16": ({"method": "magnitude", **GRADUAL}, {"num_clusters": 16}),
}
TARGET = 1.2


def make_tx(prune_fields, cluster_fields, total_steps):
    """``adam`` wrapped as ``train.build_optimizer`` does: clustering inside, pruning outside."""
    tx = optax.adam(1e-3)
    if cluster_fields is not None:
        tx = sharing.cluster(tx, **cluster_fields, params_key="model")
    if prune_fields is not None:
        tx = pruning.masked(tx, **prune_fields, total_steps=total_steps, params_key="model")
    return tx


def step_runner(model, input_shape, data, tx, num_steps, per_example=0):
    terms = objective.parse_terms(supervised_losses(), has_teacher=False)
    step = jax.jit(train.make_train_step(model, tx, objective.build_objective(
        terms, num_steps=num_steps), per_example=per_example), donate_argnums=(0,))
    state = train.init_state(model, tx, input_shape, 0)
    clusters = sharing.find_cluster_state(state.opt_state)
    if clusters is not None:  # snap once, as train_and_evaluate does
        state = state.replace(params=jax.jit(sharing.materialize)(
            state.params, clusters.codebooks, clusters.assignments))
    box = {"s": state}

    def run():
        box["s"], m = step(box["s"], data, [])
        return m["loss_sum"]

    return run


def bench_model(label, name, kwargs, shape, args, rng):
    model = models.get_model(name, num_classes=10, **kwargs)
    x = jnp.asarray(rng.normal(size=(args.batch_size, *shape)), jnp.float32)
    data = {"image": x, "label": jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32)}
    # Every variant takes rounds * (steps + 2 warm-up) steps; the schedules span them all.
    total = args.rounds * (args.steps + 2) + 1
    runners, skipped = {}, {}
    for v, (p, c) in VARIANTS.items():
        try:
            # Fisher scores need per-example gradients, as the trainer computes them.
            per_example = Pruning().fisher_examples if p and p["method"] == "fisher" else 0
            runners[v] = step_runner(model, shape, data, make_tx(p, c, total), total,
                                     per_example)
        except ValueError as e:  # e.g. 2:4 on cnn1d, whose convs have 25 input channels
            skipped[v] = str(e)
    # Each variant is timed between two plain timings and divided by their mean, so that a
    # change of machine load hits both sides of a ratio alike.
    times = {v: [] for v in runners}
    ratios = {v: [] for v in runners}
    for _ in range(args.rounds):
        before = seconds_per_call(runners["plain"], args.steps)
        for v, run in runners.items():
            if v == "plain":
                continue
            t = seconds_per_call(run, args.steps)
            after = seconds_per_call(runners["plain"], args.steps)
            times[v].append(t)
            times["plain"].append(after)
            ratios[v].append(2 * t / (before + after))
            before = after
    rows = [f"| {label} | plain | {1e3 * np.median(times['plain']):.3f} | 1 |"]
    for v, t in times.items():
        if v != "plain":
            rows.append(f"| {label} | {v} | {1e3 * np.median(t):.3f} | "
                        f"{Ratio(np.asarray(ratios[v])).text(target=('<=', TARGET))} |")
    rows += [f"| {label} | {v} | skipped: {e} | |" for v, e in skipped.items()]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lines = ["| model | variant | ms/step | step time / plain |", "|---|---|---:|---|"]
    for label, (name, kwargs, shape) in MODELS.items():
        lines += bench_model(label, name, kwargs, shape, args, rng)
        print("\n".join(lines[2:]), flush=True)
    lines += ["", f"Batch {args.batch_size}, median over {args.rounds} interleaved rounds of "
              f"{args.steps} steps, each variant divided by the mean of the plain steps timed "
              "before and after it (min-max in brackets)."]
    publish("compress_step", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
