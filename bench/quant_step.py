"""Cost of quantization: QAT train step vs fp32 step, integer artifact vs fp32 inference.

    python bench/quant_step.py [--steps 100] [--batch_size 128] [--eval_batch_size 1000]

For the Hinton student MLP 784-800-800-10 and the MNIST-1D CNN (``cnn1d``), measured in
this one process on the default device, interleaved so that machine noise hits all alike:

- ``jaxkd.train.make_train_step`` step time with ``student_apply=quant.qat_apply(...)``
  (int8 weights; int8 weights + int8 activations; int4 weights; LSQ int4) divided by the
  same step with the plain float model (target <= 1.3);
- the same ratio for qwix's ``QtProvider`` int8 weight-only QAT, for comparison, when
  qwix is installed;
- ``jaxkd.export.load`` predict_fn (int8 x int8 -> int32 matmuls) time divided by the
  jitted float ``model.apply`` on the same batch.
"""

import argparse
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import seconds_per_call

from jaxkd import export, models, objective, quant, train
from jaxkd.config import supervised_losses

MODELS = {
    "mlp 784-800-800-10": ("mlp", {"widths": (800, 800)}, (784,)),
    "cnn1d": ("cnn1d", {}, (40,)),
}
QAT = {
    "QAT w8": {"weight_bits": 8},
    "QAT w8a8": {"weight_bits": 8, "activation_bits": 8},
    "QAT w4": {"weight_bits": 4},
    "QAT LSQ w4": {"weight_bits": 4, "method": "lsq"},
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
    box = {"s": train.init_state(init_model, tx, input_shape, 0)}

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


def bench_model(label, name, kwargs, shape, args, rng):
    model = models.get_model(name, num_classes=10, **kwargs)
    x = jnp.asarray(rng.normal(size=(args.batch_size, *shape)), jnp.float32)
    data = {"image": x, "label": jnp.asarray(rng.integers(0, 10, args.batch_size))}
    variables = model.init(jax.random.PRNGKey(0), x[:1])
    runners = {"fp32": step_runner(model, shape, data, args.steps)}
    for qlabel, fields in QAT.items():
        runners[qlabel] = step_runner(model, shape, data, args.steps, quant_config(**fields))
    qwix_fn = qwix_apply(model)
    if qwix_fn is not None:
        runners["qwix QtProvider w8"] = step_runner(model, shape, data, args.steps, apply=qwix_fn)

    # Inference: the exported int8 artifact (int8 weights, static int8 activations from a
    # calibration batch) against the float model, on one eval batch.
    xe = jnp.asarray(rng.normal(size=(args.eval_batch_size, *shape)), jnp.float32)
    ranges = quant.calibrate(model, variables, [xe[:256]])
    with tempfile.TemporaryDirectory() as tmp:
        export.export(f"{tmp}/int8", name, kwargs, 10, variables, quant_config(), ranges, {},
                      input_shape=shape)
        predict_int8, _ = export.load(f"{tmp}/int8")
        nbytes = export.artifact_bytes(f"{tmp}/int8")
    predict_fp32 = jax.jit(lambda v, x: model.apply(v, x, train=False))
    runners["infer fp32"] = lambda: predict_fp32(variables, xe)
    runners["infer int8 artifact"] = lambda: predict_int8(xe)

    times = {k: [] for k in runners}
    for _ in range(args.repeats):
        for k, run in runners.items():
            times[k].append(seconds_per_call(run, args.steps))
    best = {k: min(v) for k, v in times.items()}
    print(f"{label}, train batch {args.batch_size}: fp32 step {1e3 * best['fp32']:.3f} ms")
    for k in runners:
        if k.startswith("QAT") or k.startswith("qwix"):
            print(f"  {k:>18}: {1e3 * best[k]:.3f} ms/step, QAT / fp32 = "
                  f"{best[k] / best['fp32']:.3f} (target <= 1.3)")
    print(f"  inference, batch {args.eval_batch_size}: fp32 {1e3 * best['infer fp32']:.3f} ms, "
          f"int8 artifact {1e3 * best['infer int8 artifact']:.3f} ms, int8 / fp32 = "
          f"{best['infer int8 artifact'] / best['infer fp32']:.3f} (artifact {nbytes:,} bytes)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--eval_batch_size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}")
    rng = np.random.default_rng(0)
    for label, (name, kwargs, shape) in MODELS.items():
        bench_model(label, name, kwargs, shape, args, rng)


if __name__ == "__main__":
    main()
