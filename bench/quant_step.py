"""Cost of QAT: the QAT train step against the fp32 step.

    python bench/quant_step.py [--steps 100] [--batch_size 128] [--rounds 9] [--docs]

For the Hinton student MLP 784-800-800-10 and the MNIST-1D CNN (``cnn1d``), measured in
this one process on the default device: ``jaxkd.train.make_train_step`` with
``student_apply=quant.qat_apply(...)`` (int8 weights; int8 weights and activations with
their EMA observers in the state; int4 weights; LSQ w4a4 with learned steps) against the
same step of the float model (target <= 1.3), and qwix's ``QtProvider`` int8 weight-only
QAT for comparison when qwix is installed. Variants are interleaved in ``--rounds`` rounds;
each ratio is the median over rounds with its min-max, judged or flagged as too noisy
(``bench/timing.py``). Inference latency of the artifact: ``bench/latency.py``. With
``--docs`` the table goes to ``docs/tables/quant_step.md``.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import publish
from timing import interleaved, ratio

from jaxkd import models, objective, quant, train
from jaxkd.config import supervised_losses

MODELS = {
    "mlp 784-800-800-10": ("mlp", {"widths": (800, 800)}, (784,)),
    "cnn1d": ("cnn1d", {}, (40,)),
}
QAT = {
    "QAT w8": {"weight_bits": 8},
    "QAT w8a8": {"weight_bits": 8, "activation_bits": 8},
    "QAT w4": {"weight_bits": 4},
    "QAT LSQ w4a4": {"weight_bits": 4, "activation_bits": 4, "method": "lsq"},
}


def quant_config(**fields):
    return quant.settings(fields)


class WithQATParams:
    """``model`` whose ``init`` also returns what QAT trains (LSQ's steps), for
    ``train.init_state`` (the trainer does the same in ``jaxkd.methods.quantization``)."""

    def __init__(self, model, quant_config, sample):
        self.model, self.quant_config, self.sample = model, quant_config, sample

    def init(self, *args, **kwargs):
        variables = self.model.init(*args, **kwargs)
        return {**variables, "params": quant.init_qat_params(self.model, variables, self.sample,
                                                             **self.quant_config.kwargs())}


def step_runner(model, input_shape, data, steps, quant_config=None, apply=None):
    tx = optax.adam(1e-3)
    terms = objective.parse_terms(supervised_losses(), has_teacher=False)
    if quant_config is not None:
        apply = quant.qat_apply(model, **quant_config.kwargs())
    step = jax.jit(train.make_train_step(model, tx, objective.build_objective(
        terms, num_steps=steps), student_apply=apply), donate_argnums=(0,))
    init_model = model if quant_config is None else WithQATParams(model, quant_config,
                                                                  data["image"])
    state = train.init_state(init_model, tx, input_shape, 0)
    if quant_config is not None:  # the activation observers, as the trainer starts them
        variables = {"params": state.params}
        observers = quant.init_observers(model, variables, data["image"],
                                         **quant_config.kwargs())
        if observers:
            state = state.replace(collections={quant.OBSERVERS: observers})
    box = {"s": state}

    def run():
        box["s"], m = step(box["s"], data, [])
        return m["loss_sum"]

    return run


def qwix_apply(model):
    try:
        import qwix
    except ImportError:
        return None
    rules = [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8)]
    return qwix.quantize_model(model, qwix.QtProvider(rules)).apply


def bench_model(label, name, kwargs, shape, args, rng) -> list[str]:
    model = models.get_model(name, num_classes=10, **kwargs)
    x = jnp.asarray(rng.normal(size=(args.batch_size, *shape)), jnp.float32)
    data = {"image": x, "label": jnp.asarray(rng.integers(0, 10, args.batch_size))}
    runners = {"fp32": step_runner(model, shape, data, args.steps)}
    for qlabel, fields in QAT.items():
        runners[qlabel] = step_runner(model, shape, data, args.steps, quant_config(**fields))
    qwix_fn = qwix_apply(model)
    if qwix_fn is not None:
        runners["qwix QtProvider w8"] = step_runner(model, shape, data, args.steps, apply=qwix_fn)
    times = interleaved(runners, rounds=args.rounds, calls=args.steps)
    rows = [f"| {label} | {k} | {1e3 * np.median(times[k]):.3f} | "
            f"{ratio(times[k], times['fp32']).text(target=('<=', 1.3))} |"
            for k in runners if k != "fp32"]
    return [f"| {label} | fp32 | {1e3 * np.median(times['fp32']):.3f} | 1 |", *rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    lines = ["| model | step | ms/step | step time / fp32 |", "|---|---|---:|---|"]
    for label, (name, kwargs, shape) in MODELS.items():
        lines += bench_model(label, name, kwargs, shape, args, rng)
        print("\n".join(lines[-len(QAT) - 1:]), flush=True)
    lines += ["", f"Train batch {args.batch_size}, median over {args.rounds} interleaved rounds "
              f"of {args.steps} steps (min-max in brackets)."]
    publish("quant_step", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
