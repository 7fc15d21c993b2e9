"""The quantization table: fp32, PTQ, QAT at 8 and 4 bits (min/max and LSQ), weight-only
QAT, and QAT distilled from the fp32 model, over seeds.

    python bench/quant_table.py --setup=mnist1d_cnn [--seeds=0,1,2] [--docs]
    python bench/quant_table.py --setup=mnist1d_mlp [--seeds=0,1,2] [--docs]
    python bench/quant_table.py --setup=digits_mlp [--seeds=0,1,2] [--docs]

Runs live in ``--root`` (default ``runs/quant_table``)``/<setup>/seed<k>/<variant>``
(finished runs are reused). Every accuracy is that of the exported artifact loaded back
from disk (integer path for the quantized ones); every size is the artifact's bytes on
disk. The KD rows distil from the fp32 run of the same seed (teacher in full precision,
student quantized; Hinton, T=4, alpha=0.9). Rows are named by what the layers got
(``qat-w4/8a8``: inner layers at 4 bits, the first and last kept at 8). Activations are
quantized with static ranges (EMA min/max observers in the train state, or LSQ's learned
steps), on an unsigned grid after ReLU, exactly as the artifact runs them. The digits MLP
64-32-10 has no inner layer, so its 4-bit rows quantize every layer at 4 bits.

Writes ``<root>/<setup>/report/`` (``jaxkd.report``: table and Pareto plot); with
``--docs`` the report goes to ``docs/quantization/<setup>/`` and README's table to
``docs/tables/quant_<setup>.md``.
"""

from __future__ import annotations

import argparse
import os

from common import add_output_args, mean_std, publish, run

from jaxkd import report
from jaxkd.config import hinton_losses, run_config

SETUPS = {
    # name: (dataset, model, model kwargs, steps, batch, learning rate)
    "mnist1d_cnn": ("mnist1d", "cnn1d", {}, 6000, 100, 1e-2),
    "mnist1d_mlp": ("mnist1d", "mlp", {"widths": (100, 100)}, 6000, 100, 1e-2),
    "digits_mlp": ("digits", "mlp", {"widths": (32,)}, 3000, 64, 1e-2),
}
VARIANTS = {
    # name: (what, quantization fields, distil from fp32)
    "ptq_int8": ("PTQ int8 (w8a8, min/max calibration)",
                 dict(qat=False, weight_bits=8, activation_bits=8), False),
    "qat_int8": ("QAT int8 (w8a8)", dict(weight_bits=8, activation_bits=8), False),
    "qat_int4": ("QAT int4 weights, int8 activations",
                 dict(weight_bits=4, activation_bits=8), False),
    "qat_int4_a4_lsq": ("QAT w4a4, learned step size",
                        dict(weight_bits=4, activation_bits=4, method="lsq"), False),
    "qat_int4_weights_only": ("QAT int4 weights only (float activations)",
                              dict(weight_bits=4, activation_bits=0), False),
    "qat_int8_kd": ("QAT int8 + KD from the fp32 model",
                    dict(weight_bits=8, activation_bits=8), True),
    "qat_int4_kd": ("QAT int4 weights + KD from the fp32 model",
                    dict(weight_bits=4, activation_bits=8), True),
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


def quantized(setup: str, seed: int, fields: dict, teacher: str = ""):
    c = config(setup, seed)
    c.quantization.update(enabled=True, **fields)
    if setup == "digits_mlp" and fields["weight_bits"] < 8:
        c.quantization.keep_first_last_8bit = False  # its two layers are first and last
    if teacher:
        c.distill.teacher.workdir = teacher
        c.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
        if c.data.name == "mnist1d":
            c.data.transfer_split = "unlabelled"
    return c


def one_seed(setup: str, seed: int, root: str) -> dict[str, tuple[str, dict]]:
    """``{variant: (run dir, summary)}`` of one seed."""
    d = os.path.join(root, setup, f"seed{seed}")
    fp32 = os.path.join(d, "fp32")
    out = {"fp32": (fp32, run(config(setup, seed), fp32))}
    for name, (_, fields, kd) in VARIANTS.items():
        workdir = os.path.join(d, name)
        out[name] = (workdir, run(quantized(setup, seed, fields, fp32 if kd else ""), workdir))
    return out


def table(setup: str, per_seed: list[dict[str, tuple[str, dict]]], seeds: str) -> str:
    """README's table: what, the effective label, accuracy, bytes, bytes vs fp32."""
    dataset, model, *_ = SETUPS[setup]
    params = per_seed[0]["fp32"][1]["num_params"]
    fp32_bytes = per_seed[0]["fp32"][1]["artifact_bytes"]
    lines = [f"| {dataset} {model} ({params:,} params) | run | accuracy (%) | bytes | vs fp32 |",
             "|---|---|---:|---:|---:|"]
    whats = {"fp32": "fp32", **{k: v[0] for k, v in VARIANTS.items()}}
    for name, what in whats.items():
        summaries = [p[name][1] for p in per_seed]
        labels = sorted({s.get("method", name) for s in summaries})
        nbytes = summaries[0]["artifact_bytes"]
        lines.append(f"| {what} | {', '.join(labels)} | "
                     f"{mean_std([100 * s['accuracy'] for s in summaries])} | "
                     f"{nbytes:,} | {nbytes / fp32_bytes:.3f}× |")
    lines += ["", f"Mean ± sample std over seeds {seeds}; accuracy of the artifact loaded from "
              "disk, bytes of the artifact on disk (manifest included)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", default="mnist1d_cnn", choices=sorted(SETUPS))
    parser.add_argument("--seeds", default="0,1,2")
    add_output_args(parser, "quant_table")
    args = parser.parse_args()
    per_seed = [one_seed(args.setup, int(s), args.root) for s in args.seeds.split(",")]
    out = (os.path.join("docs", "quantization", args.setup) if args.docs
           else os.path.join(args.root, args.setup, "report"))
    report.write_report([d for p in per_seed for d, _ in p.values()], out,
                        command=f"python bench/quant_table.py --setup={args.setup} "
                                f"--seeds={args.seeds}")
    publish(f"quant_{args.setup}", table(args.setup, per_seed, args.seeds), docs=args.docs)


if __name__ == "__main__":
    main()
