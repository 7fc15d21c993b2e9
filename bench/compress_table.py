"""The pruning / sharing table: every method of jaxkd.pruning and jaxkd.sharing, over seeds.

    python bench/compress_table.py --setup=mnist1d_mlp --seeds=0,1,2
    python bench/compress_table.py --setup=digits_mlp --seeds=0,1,2

Runs live in ``runs/compress_table/<setup>/seed<k>/<method>`` (finished runs are reused);
then ``python -m jaxkd.report`` writes ``docs/compression/<setup>/report.md`` and
``pareto.png``. Every accuracy is the exported artifact's, loaded back from disk; every size
is the artifact's bytes on disk (manifest included).

Recipe. ``dense``: the uncompressed MLP (on MNIST-1D distilled from the paper's CNN through
the 20,000-input transfer set, as in the quickstart; on digits trained on the labels). Every
compressed row starts from ``dense`` (``config.init.method='copy'``) and is fine-tuned for
``FINE_TUNE_STEPS`` steps, distilled from ``dense`` itself (Hinton, T=4, alpha=0.9: the
teacher is the uncompressed model), every layer included (``keep_first_last=False``, as
Deep Compression prunes and clusters every layer):

- pruning: magnitude, Taylor (|w g|) and Fisher (g^2 w^2) scores at 50 / 75 / 90 %
  sparsity (gradual, Zhu & Gupta, over the first 3/4 of the fine-tuning); magnitude 2:4;
  50 % of the hidden neurons by L1 norm (exported physically smaller);
- clustering with 16 / 8 / 4 shared values per layer (linear init, Han et al.);
- similarity merging (Srinivas & Babu) of the hidden neurons: of the fine-tuned model at
  export (cosine > 0.6, data-free as in the paper), and of ``dense`` before the fine-tuning
  (cosine > 0.5, ``merging.at='start'``);
- cross-layer sharing (setups whose hidden widths are equal): an MLP of 4 hidden layers of
  the same width whose ``hidden2..4`` are one shared layer (``tie_hidden``; trained like
  ``dense``, from scratch: a different architecture, as many unique parameters as
  ``dense`` for twice its depth);
- the full pipeline (``config.compression``): Fisher-prune 90 % -> 16 clusters -> QAT int8
  (per-tensor scales, so clusters stay clusters), with entropy coding of the artifact.
"""

from __future__ import annotations

import argparse
import os

from jaxkd import compression, metrics, report, train
from jaxkd.config import hinton_losses, run_config

SETUPS = {
    # name: (dataset, widths, dense steps, batch, learning rate)
    "mnist1d_mlp": ("mnist1d", (100, 100), 6000, 100, 1e-2),
    "digits_mlp": ("digits", (64, 64), 3000, 64, 1e-2),
    # The shape of Deep Compression's LeNet-300-100, on 8x8 digits: over-parameterised.
    "digits_300_100": ("digits", (300, 100), 3000, 64, 1e-2),
}
FINE_TUNE_STEPS = 2000
FINE_TUNE_LR = 1e-3


def base(setup: str, seed: int, **model_kwargs):
    dataset, widths, steps, batch, lr = SETUPS[setup]
    c = run_config(dataset, "mlp", **{"widths": widths, **model_kwargs})
    c.seed, c.num_steps, c.batch_size = seed, steps, batch
    c.optimizer.learning_rate = lr
    if dataset == "digits":
        c.eval_batch_size = 360
        c.data.augment, c.data.jitter_pixels = "jitter", 1
    c.log_every_steps = 1000
    c.eval_every_steps = 100000
    c.checkpoint_every_steps = 100000
    return c


def distilled(c, teacher: str):
    c.distill.teacher.workdir = teacher
    c.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    if c.data.name == "mnist1d":
        c.data.transfer_split = "unlabelled"
    return c


def fine_tune(setup: str, seed: int, dense: str):
    c = distilled(base(setup, seed), dense)
    c.init.method, c.init.teacher_workdir = "copy", dense
    c.num_steps = FINE_TUNE_STEPS
    c.optimizer.learning_rate = FINE_TUNE_LR
    c.pruning.keep_first_last = False
    c.pruning.end_step = 3 * FINE_TUNE_STEPS // 4
    c.clustering.keep_first_last = False
    c.export.entropy_coding = True
    return c


def run(c, workdir):
    if metrics.read_summary(workdir) is None:
        if compression.is_pipeline(c):
            compression.run_pipeline(c, workdir)
        else:
            train.train_and_evaluate(c, workdir)
    return workdir


def variants(setup: str, seed: int, dense: str, cnn: str | None):
    """``{name: config}`` of every compressed row."""
    out = {}
    for method in ("magnitude", "taylor", "fisher"):
        for sparsity in (0.5, 0.75, 0.9):
            c = fine_tune(setup, seed, dense)
            c.pruning.update(enabled=True, method=method, sparsity=sparsity)
            out[f"{method}_{round(100 * sparsity)}"] = c
    c = fine_tune(setup, seed, dense)
    c.pruning.update(enabled=True, pattern="n:m", n=2, m=4, schedule="one_shot")
    out["2of4"] = c
    c = fine_tune(setup, seed, dense)
    c.pruning.update(enabled=True, pattern="channels", sparsity=0.5, layers="hidden.*")
    out["channels_50"] = c
    for k in (16, 8, 4):
        c = fine_tune(setup, seed, dense)
        c.clustering.update(enabled=True, num_clusters=k)
        out[f"cluster_{k}"] = c
    c = fine_tune(setup, seed, dense)
    c.merging.update(enabled=True, metric="cosine", threshold=MERGE_COSINE)
    out["merge"] = c
    c = fine_tune(setup, seed, dense)
    c.merging.update(enabled=True, metric="cosine", threshold=MERGE_COSINE_THEN_TRAIN,
                     at="start")
    out["merge_train"] = c
    widths = SETUPS[setup][1]
    if len(set(widths)) == 1:  # 4 hidden layers of dense's width, hidden2..4 one layer
        c = base(setup, seed, widths=widths[:1] * 4, tie_hidden=True)
        out["tied"] = distilled(c, cnn) if cnn else c
    c = fine_tune(setup, seed, dense)
    c.pruning.update(method="fisher", sparsity=0.9)  # the best 90 % scores in the table
    c.clustering.update(num_clusters=16)
    c.quantization.update(weight_bits=8, activation_bits=8, per_channel=False)
    c.compression.stages = ("prune", "cluster", "quantize")
    c.compression.num_steps = (FINE_TUNE_STEPS, FINE_TUNE_STEPS // 2, FINE_TUNE_STEPS // 2)
    out["pipeline"] = c
    return out


MERGE_COSINE = 0.6  # data-free, at export: only near-duplicates
MERGE_COSINE_THEN_TRAIN = 0.5  # merged before the fine-tuning, which recovers


def one_seed(setup: str, seed: int, root: str, only: str | None) -> list[str]:
    d = os.path.join(root, setup, f"seed{seed}")
    cnn = None
    dense_config = base(setup, seed)
    if SETUPS[setup][0] == "mnist1d":
        teacher = base(setup, seed)
        teacher.model.name, teacher.model.kwargs = "cnn1d", {}
        cnn = run(teacher, os.path.join(d, "cnn_teacher"))
        dense_config = distilled(dense_config, cnn)
    dense = run(dense_config, os.path.join(d, "dense"))
    dirs = [dense]
    for name, c in variants(setup, seed, dense, cnn).items():
        if only and name not in only.split(","):
            continue
        dirs.append(run(c, os.path.join(d, name)))
    return dirs


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--setup", default="mnist1d_mlp", choices=sorted(SETUPS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    parser.add_argument("--root", default="runs/compress_table")
    parser.add_argument("--out", default="docs/compression")
    args = parser.parse_args()
    dirs = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        dirs += one_seed(args.setup, seed, args.root, args.only)
    out = os.path.join(args.out, args.setup)
    report.main([*dirs, "--out", out, "--baseline", dirs[0]])
    print(open(os.path.join(out, "report.md")).read())


if __name__ == "__main__":
    main()
