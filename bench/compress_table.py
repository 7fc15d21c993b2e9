"""The pruning / sharing table: every method of jaxkd.pruning and jaxkd.sharing, over seeds.

    python bench/compress_table.py --setup=mnist1d_mlp [--seeds=0,1,2] [--docs]
    python bench/compress_table.py --setup=all --docs     # every setup, then README's table

Runs live in ``--root`` (default ``runs/compress_table``)``/<setup>/seed<k>/<method>``
(finished runs are reused); then ``jaxkd.report`` writes ``<root>/<setup>/report/`` (with
``--docs``: ``docs/compression/<setup>/``), and ``--setup=all --docs`` writes README's table
of every setup to ``docs/tables/compress.md``. Every accuracy is the exported artifact's,
loaded back from disk; every size is the artifact's bytes on disk (manifest included).

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
  export (data-free, as in the paper), and of ``dense`` before the fine-tuning
  (``merging.at='start'``); each cosine threshold is chosen on the validation split of seed
  0 (``MERGE_THRESHOLDS``; dense and fine-tuning trained on the first 90 % of train, scored
  on the last 10 %) as the lowest threshold, i.e. the most merging, whose validation
  accuracy is within ``MERGE_TOLERANCE`` points of the dense model's;
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

from common import accuracy, add_output_args, choose, mean_std, publish, run

from jaxkd import report
from jaxkd.config import hinton_losses, run_config, validation

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


def variants(setup: str, seed: int, dense: str, cnn: str | None,
             thresholds: dict[str, float]):
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
    out["merge"] = merged(setup, seed, dense, thresholds["merge"], "export")
    out["merge_train"] = merged(setup, seed, dense, thresholds["merge_train"], "start")
    widths = SETUPS[setup][1]
    if len(set(widths)) == 1:  # 4 hidden layers of dense's width, hidden2..4 one layer
        c = base(setup, seed, widths=widths[:1] * 4, tie_hidden=True)
        out["tied"] = distilled(c, cnn) if cnn else c
    c = fine_tune(setup, seed, dense)
    c.pruning.update(method="fisher", sparsity=0.9)  # the "information" criterion
    c.clustering.update(num_clusters=16)
    c.quantization.update(weight_bits=8, activation_bits=8, per_channel=False)
    c.compression.stages = ("prune", "cluster", "quantize")
    c.compression.num_steps = (FINE_TUNE_STEPS, FINE_TUNE_STEPS // 2, FINE_TUNE_STEPS // 2)
    out["pipeline"] = c
    return out


MERGE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MERGE_TOLERANCE = 1.0  # points of validation accuracy below the dense model's


def merged(setup: str, seed: int, dense: str, threshold: float, at: str):
    c = fine_tune(setup, seed, dense)
    c.merging.update(enabled=True, metric="cosine", threshold=threshold, at=at)
    return c


def dense_config(setup: str, seed: int, root: str, *, on_validation: bool = False
                 ) -> tuple[object, str | None]:
    """The dense run's config and, on MNIST-1D, the CNN it is distilled from (trained in
    ``root``, on the validation split's training part with ``on_validation``)."""
    c = base(setup, seed)
    if SETUPS[setup][0] != "mnist1d":
        return c, None
    teacher = base(setup, seed)
    teacher.model.name, teacher.model.kwargs = "cnn1d", {}
    if on_validation:
        validation(teacher)
    cnn = os.path.join(root, "cnn_teacher")
    run(teacher, cnn)
    return distilled(c, cnn), cnn


def choose_thresholds(setup: str, root: str) -> dict[str, tuple[float, dict[float, float]]]:
    """``{'merge' | 'merge_train': (threshold, {threshold: validation accuracy %})}``."""
    d = os.path.join(root, setup, "validation")
    c, _ = dense_config(setup, 0, d, on_validation=True)
    dense = os.path.join(d, "dense")
    floor = accuracy(run(validation(c), dense)) - MERGE_TOLERANCE

    def most_merging(scores: dict[float, float]) -> float:
        good = [t for t, a in scores.items() if a >= floor]
        return min(good) if good else max(scores)

    return {name: choose({t: merged(setup, 0, dense, t, at) for t in MERGE_THRESHOLDS},
                         os.path.join(d, name), rule=most_merging)
            for name, at in (("merge", "export"), ("merge_train", "start"))}


def one_seed(setup: str, seed: int, root: str, only: str | None,
             thresholds: dict[str, float]) -> dict[str, tuple[str, dict]]:
    """``{variant: (run dir, summary)}`` of one seed, ``dense`` first."""
    d = os.path.join(root, setup, f"seed{seed}")
    c, cnn = dense_config(setup, seed, d)
    dense = os.path.join(d, "dense")
    out = {"dense": (dense, run(c, dense))}
    for name, c in variants(setup, seed, dense, cnn, thresholds).items():
        if only and name not in only.split(","):
            continue
        out[name] = (os.path.join(d, name), run(c, os.path.join(d, name)))
    return out


def cell(runs: list[list[dict]], params: bool = False) -> str:
    """``'a ± s % · b kB'`` of one variant's runs, or ``'a / b / c % · b kB'`` of several."""
    accs = [[accuracy(s) for s in r] for r in runs]
    sizes = [sum(s["artifact_bytes"] for s in r) / len(r) / 1e3 for r in runs]
    acc = (mean_std(accs[0]) if len(runs) == 1
           else " / ".join(f"{sum(a) / len(a):.2f}" for a in accs))
    size = (f"{sizes[0]:.1f}" if max(sizes) - min(sizes) < 0.1
            else " / ".join(f"{b:.1f}" for b in sizes))
    text = f"{acc} % · {size} kB"
    if params:
        n = sum(s.get("artifact_num_params") or s["num_params"]
                for s in runs[0]) / len(runs[0])
        text += f" ({n:,.0f} params)"
    return text


ROWS = {
    # README row: (variants, show the stored parameter count)
    "dense": (("dense",), False),
    "magnitude / Taylor / Fisher 75 %": (("magnitude_75", "taylor_75", "fisher_75"), False),
    "magnitude / Taylor / Fisher 90 %": (("magnitude_90", "taylor_90", "fisher_90"), False),
    "magnitude 2:4": (("2of4",), False),
    "channels 50 % (physically smaller)": (("channels_50",), True),
    "16 / 8 / 4 clusters": (("cluster_16", "cluster_8", "cluster_4"), False),
    "merging at export (cosine > t)": (("merge",), True),
    "merging, then fine-tune (cosine > t)": (("merge_train",), True),
    "tied hidden2..4 (4 layers, dense's unique params)": (("tied",), False),
    "**Fisher 90 % → 16 clusters → int8, + KD**": (("pipeline",), False),
}


def combined(results: dict[str, list[dict]], thresholds: dict, seeds: str) -> str:
    """README's table: one column per setup."""
    setups = list(results)
    lines = ["| | " + " | ".join(SETUP_NAMES[s] for s in setups) + " |",
             "|---|" + "---:|" * len(setups)]
    for row, (names, params) in ROWS.items():
        cells = []
        for s in setups:
            if not all(n in results[s][0] for n in names):
                cells.append("—")
                continue
            cells.append(cell([[p[n][1] for p in results[s]] for n in names], params))
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample std over seeds {seeds} (rows of several methods: the "
              "means); accuracy of the loaded artifact, bytes on disk including the manifest. "
              "Merging thresholds chosen on validation (most merging within "
              f"{MERGE_TOLERANCE:g} pt of dense): "
              + "; ".join(f"{SETUP_NAMES[s]}: at export {thresholds[s]['merge'][0]:g}, "
                          f"then fine-tune {thresholds[s]['merge_train'][0]:g}" for s in setups)
              + "."]
    return "\n".join(lines)


SETUP_NAMES = {"digits_300_100": "digits, MLP 64-300-100-10",
               "digits_mlp": "digits, MLP 64-64-64-10",
               "mnist1d_mlp": "MNIST-1D, MLP 40-100-100-10"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", default="mnist1d_mlp", choices=[*sorted(SETUPS), "all"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated variant names")
    add_output_args(parser, "compress_table")
    args = parser.parse_args()
    setups = list(SETUP_NAMES) if args.setup == "all" else [args.setup]
    results, thresholds = {}, {}
    for setup in setups:
        thresholds[setup] = choose_thresholds(setup, args.root)
        for name, (t, scores) in thresholds[setup].items():
            print(f"{setup}: {name} threshold {t:g} (validation accuracy "
                  + ", ".join(f"{k:g}: {a:.1f} %" for k, a in scores.items()) + ")")
        chosen = {name: t for name, (t, _) in thresholds[setup].items()}
        results[setup] = [one_seed(setup, int(s), args.root, args.only, chosen)
                          for s in args.seeds.split(",")]
        dirs = [d for p in results[setup] for d, _ in p.values()]
        out = (os.path.join("docs", "compression", setup) if args.docs
               else os.path.join(args.root, setup, "report"))
        report.write_report(dirs, out, baseline=dirs[0],
                            command=f"python bench/compress_table.py --setup={setup} "
                                    f"--seeds={args.seeds}")
    if args.setup == "all" and not args.only:
        publish("compress", combined(results, thresholds, args.seeds), docs=args.docs)


if __name__ == "__main__":
    main()
