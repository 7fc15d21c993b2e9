"""Is the exported integer model the model QAT trained? Logits of both, example by example.

    python bench/qat_agreement.py [--steps 1500] [--out runs/qat_agreement] [--docs]

For the MNIST-1D MLP 100-100 and CNN, QAT with min/max and with LSQ, weights at 4 bits
(first and last layer 8) and activations at 8 and at 4 bits, it trains a run, then runs
its test split through (a) the QAT forward in eval mode, as the trainer evaluates it
(``quant.qat_apply`` on the saved ``weights.npz``), and (b) the exported artifact loaded
from disk (``export.load``, the integer path). It prints each one's accuracy, the largest
|logit difference|, the fraction of test examples whose argmax differs, and how many
predictions of the QAT forward change when each example is evaluated alone (batch 1)
instead of in a batch of 1000. Then, over ``--seeds``, the a4 runs again with every
activation on the signed grid (``unsigned_activations=False``): the accuracy the unsigned
grid after a ReLU buys. With ``--docs`` both tables go to ``docs/tables/qat_agreement.md``.
About 6 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import inspect
import os

import jax
import numpy as np
from common import mean_std, publish

from jaxkd import checkpoint, export, models, quant, train
from jaxkd.config import run_config
from jaxkd.data import pipeline

SETUPS = {"mlp": {"widths": (100, 100)}, "cnn1d": {}}


def config(model: str, method: str, activation_bits: int, steps: int, seed: int = 0,
           unsigned: bool = True):
    c = run_config("mnist1d", model, **SETUPS[model])
    c.seed = seed
    c.batch_size, c.num_steps = 100, steps
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
    c.quantization.update(enabled=True, weight_bits=4, activation_bits=activation_bits,
                          method=method)
    if not unsigned:
        c.quantization.unsigned_activations = False
    return c


def qat_forward(model, c):
    """``quant.qat_apply`` whichever its signature (fields as keywords, or a config block)."""
    fields = c.quantization.to_dict()
    if "quantization" in inspect.signature(quant.qat_apply).parameters:
        return quant.qat_apply(model, **{k: v for k, v in fields.items() if k != "enabled"})
    return quant.qat_apply(model, c.quantization)


def load_variables(workdir: str):
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        flat = {tuple(k.split("/")): f[k] for k in f.files}
    variables: dict = {}
    for keys, value in flat.items():
        node = variables
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return variables


def measure(c, workdir: str) -> dict:
    summary = train.train_and_evaluate(c, workdir)
    model = models.get_model(c.model.name, num_classes=10, **SETUPS[c.model.name])
    variables = load_variables(workdir)
    apply = jax.jit(lambda v, x: qat_forward(model, c)(v, x, train=False))
    predict, _ = export.load(os.path.join(workdir, "artifact"))
    batch = next(pipeline.eval_batches(c.data, split="test", batch_size=1000))
    x, y = batch["image"], batch["label"]
    qat, art = np.asarray(apply(variables, x)), np.asarray(predict(x))
    alone = np.concatenate([np.asarray(apply(variables, x[i:i + 1])) for i in range(len(x))])
    return {"qat_acc": float(np.mean(qat.argmax(1) == y)),
            "artifact_acc": float(np.mean(art.argmax(1) == y)),
            "max_abs_diff": float(np.max(np.abs(qat - art))),
            # Examples where a float-rounding difference moved an activation across a
            # rounding boundary, so one integer differs (a full quantization step).
            "off_by_a_step": float(np.mean(np.abs(qat - art).max(1) > 1e-3)),
            "argmax_differs": float(np.mean(qat.argmax(1) != art.argmax(1))),
            "batch1_changes": float(np.mean(alone.argmax(1) != qat.argmax(1))),
            "summary_eval": summary["eval"]["accuracy"], "summary_acc": summary["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=os.path.join("runs", "qat_agreement"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    lines = ["| model | method | bits | QAT eval acc | artifact acc | max abs logit diff | "
             "examples with abs logit diff > 1e-3 | argmax differs | "
             "QAT argmax changes at batch 1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for model in SETUPS:
        for method in ("minmax", "lsq"):
            for abits in (8, 4):
                c = config(model, method, abits, args.steps)
                r = measure(c, os.path.join(args.out, f"{model}_{method}_a{abits}"))
                lines.append(f"| {model} | {method} | w4a{abits} | {100 * r['qat_acc']:.2f} % | "
                             f"{100 * r['artifact_acc']:.2f} % | {r['max_abs_diff']:.2e} | "
                             f"{100 * r['off_by_a_step']:.2f} % | "
                             f"{100 * r['argmax_differs']:.2f} % | "
                             f"{100 * r['batch1_changes']:.2f} % |")
                print(lines[-1], flush=True)
    seeds = [int(v) for v in args.seeds.split(",")]
    lines += ["", f"Test split of MNIST-1D, {args.steps} QAT steps, seed 0. w4a4, artifact "
              f"accuracy, mean ± sample std over seeds {args.seeds}:", "",
              "| model | method | signed grid everywhere | unsigned after ReLU | gain (pt) |",
              "|---|---|---:|---:|---:|"]
    for model in SETUPS:
        for method in ("minmax", "lsq"):
            acc = {}
            for unsigned in (False, True):
                acc[unsigned] = np.array([train.train_and_evaluate(
                    config(model, method, 4, args.steps, seed, unsigned),
                    os.path.join(args.out, f"{model}_{method}_a4_s{seed}_u{int(unsigned)}"))[
                    "accuracy"] for seed in seeds]) * 100
            lines.append(f"| {model} | {method} | {mean_std(acc[False])} % | "
                         f"{mean_std(acc[True])} % | {mean_std(acc[True] - acc[False])} |")
            print(lines[-1], flush=True)
    publish("qat_agreement", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
