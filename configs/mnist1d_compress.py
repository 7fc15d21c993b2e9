r"""Deep Compression on MNIST-1D: prune 90 % -> 16 shared values -> int8, distilled throughout.

    python launch.py --config=configs/mnist1d_compress.py --workdir=runs/mnist1d_compress
    python launch.py --config=configs/mnist1d_compress.py:stages=cluster     # sharing only
    python launch.py --config=configs/mnist1d_compress.py:stages=prune+quantize

A chain of three stages, each in ``runs/mnist1d_compress/<stage>``:
  1. ``teacher``: the MNIST-1D CNN (as in the quickstart);
  2. ``dense``: the MLP 40-100-100-10 distilled from it through the transfer set;
  3. ``compressed``: ``config.compression.stages`` (default prune -> cluster -> quantize),
     each stage a run of its own in ``compressed/<stage>`` starting from the previous one
     and distilled from ``dense`` (the uncompressed model): Fisher pruning (g^2 w^2) of
     every layer to 90 % (gradual, Zhu & Gupta, 2000 steps), then 16 shared values per
     layer (Han et al.; 1000 steps; pruned weights stay 0), then QAT int8 with per-tensor
     scales (1000 steps; clusters stay <= 17 integers). The artifact stores sparse kernels
     as bitmask or CSR and clustered ones as 4-bit indices into a codebook, then deflates
     its files.
After each compression stage the run checks that the earlier stages' structure survived
(zeros, distinct values, integer ranges) and stops with an error naming the layer if not.

Measured: README's configs table (bench/configs_table.py). Over 3 seeds, and
the same pipeline on the over-parameterised 300-100 MLP on digits: README's compression
table (bench/compress_table.py).

Args (after the colon): ``stages=prune+cluster+quantize`` (any of them, in order, joined by
``+``); ``smoke`` (two tiny steps per stage).
"""

from jaxkd.config import chain_config, hinton_losses, parse_arg, run_config, smoke


def mnist1d_run(model: str, **model_kwargs):
    c = run_config("mnist1d", model, **model_kwargs)
    c.batch_size = 100
    c.num_steps = 6000
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 500
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 2000
    return c


def get_config(arg=None):
    args = parse_arg(arg, stages="prune+cluster+quantize", smoke=False)
    teacher = mnist1d_run("cnn1d")
    dense = mnist1d_run("mlp", widths=(100, 100))
    dense.data.transfer_split = "unlabelled"
    dense.distill.teacher.workdir = "stage:teacher"
    dense.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)

    compressed = mnist1d_run("mlp", widths=(100, 100))
    compressed.data.transfer_split = "unlabelled"
    compressed.distill.teacher.workdir = "stage:dense"  # teacher = the uncompressed model
    compressed.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    compressed.init.method, compressed.init.teacher_workdir = "copy", "stage:dense"
    compressed.optimizer.learning_rate = 1e-3
    compressed.pruning.update(method="fisher", sparsity=0.9, keep_first_last=False,
                              end_step=1500)
    compressed.clustering.update(num_clusters=16, keep_first_last=False)
    compressed.quantization.update(weight_bits=8, activation_bits=8, per_channel=False)
    compressed.export.entropy_coding = True
    stages = tuple(args["stages"].split("+"))
    steps = {"prune": 2000, "cluster": 1000, "quantize": 1000}
    compressed.compression.stages = stages
    compressed.compression.num_steps = tuple(steps.get(s, 1000) for s in stages)
    config = chain_config({"teacher": teacher, "dense": dense, "compressed": compressed})
    if args["smoke"]:
        smoke(config)
    return config
