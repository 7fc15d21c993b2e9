"""The quantization table: fp32, PTQ int8, QAT int8, QAT int4 (+/- KD), over seeds.

    python bench/quant_table.py --setup=mnist1d_cnn --seeds=0,1,2
    python bench/quant_table.py --setup=mnist1d_mlp --seeds=0,1,2
    python bench/quant_table.py --setup=digits_mlp --seeds=0,1,2

Runs live in ``runs/quant_table/<setup>/seed<k>/<method>`` (finished runs are reused);
then ``python -m jaxkd.report`` writes ``docs/quantization/<setup>/report.md`` and
``pareto.png``. Every accuracy is that of the exported artifact loaded back from disk
(integer path for the quantized ones); every size is the artifact's bytes on disk. The KD
rows distil from the fp32 run of the same architecture (teacher in full precision, student
quantized). QAT int8 quantizes weights and activations to 8 bits (w8a8); QAT int4 quantizes
the weights of the inner layers to 4 bits with 8-bit activations (first and last layers stay
at 8 bits).
"""

from __future__ import annotations

import argparse
import os

from jaxkd import metrics, report, train
from jaxkd.config import hinton_losses, run_config

SETUPS = {
    # name: (dataset, model, model kwargs, steps, batch, learning rate)
    "mnist1d_cnn": ("mnist1d", "cnn1d", {}, 6000, 100, 1e-2),
    "mnist1d_mlp": ("mnist1d", "mlp", {"widths": (100, 100)}, 6000, 100, 1e-2),
    "digits_mlp": ("digits", "mlp", {"widths": (32,)}, 3000, 64, 1e-2),
}


def config(setup: str, seed: int):
    dataset, model, kwargs, steps, batch, lr = SETUPS[setup]
    c = run_config(dataset, model, **kwargs)
    c.seed, c.num_steps, c.batch_size = seed, steps, batch
    c.optimizer.learning_rate = lr
    if dataset == "digits":
        c.eval_batch_size = 360
        c.data.augment, c.data.jitter_pixels = "jitter", 1
    c.log_every_steps = 1000
    c.eval_every_steps = 100000
    c.checkpoint_every_steps = 100000
    return c


def quantized(c, *, bits: int, activation_bits: int, qat: bool = True, teacher: str = ""):
    c.quantization.enabled = True
    c.quantization.qat = qat
    c.quantization.weight_bits = bits
    c.quantization.activation_bits = activation_bits
    if teacher:
        c.distill.teacher.workdir = teacher
        c.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
        if c.data.name == "mnist1d":
            c.data.transfer_split = "unlabelled"
    return c


def run(c, workdir):
    if metrics.read_summary(workdir) is None:
        train.train_and_evaluate(c, workdir)
    return workdir


def one_seed(setup: str, seed: int, root: str) -> list[str]:
    d = os.path.join(root, setup, f"seed{seed}")
    fp32 = run(config(setup, seed), os.path.join(d, "fp32"))
    dirs = [fp32]
    variants = {
        "ptq_int8": dict(bits=8, activation_bits=8, qat=False),
        "qat_int8": dict(bits=8, activation_bits=8),
        "qat_int4": dict(bits=4, activation_bits=8),
        "qat_int8_kd": dict(bits=8, activation_bits=8, teacher=fp32),
        "qat_int4_kd": dict(bits=4, activation_bits=8, teacher=fp32),
    }
    for name, kwargs in variants.items():
        dirs.append(run(quantized(config(setup, seed), **kwargs), os.path.join(d, name)))
    return dirs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", default="mnist1d_cnn", choices=sorted(SETUPS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs/quant_table")
    parser.add_argument("--out", default="docs/quantization")
    args = parser.parse_args()
    dirs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        dirs += one_seed(args.setup, seed, args.root)
    out = os.path.join(args.out, args.setup)
    report.main(dirs + ["--out", out])
    print(open(os.path.join(out, "report.md")).read())


if __name__ == "__main__":
    main()
