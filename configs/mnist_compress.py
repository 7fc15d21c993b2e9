r"""Deep Compression on MNIST (Han, Mao & Dally 2016, Table 1): LeNet-300-100 and LeNet-5.

    python -m jaxkd.data.fetch mnist       # once: the verified offline copy of MNIST
    python launch.py --config=configs/mnist_compress.py:model=lenet300 --workdir=runs/lenet300
    python launch.py --config=configs/mnist_compress.py:model=lenet5 --workdir=runs/lenet5

A chain of two stages, each in ``DIR/<stage>``:
  1. ``dense``: the model trained on the labels (SGD with momentum; 20 epochs for
     LeNet-300-100, 10 for LeNet-5, Caffe's LeNet budget);
  2. ``compressed``: ``config.compression.stages``, each a run of its own in
     ``compressed/<stage>`` starting from the previous one and distilled from ``dense``
     (Hinton KD, T = 4, alpha = 0.5): magnitude pruning to the paper's per-layer densities
     (Han et al. 2015, Table 2: LeNet-300-100 keeps 8 % / 9 % / 26 % of fc1 / fc2 / fc3,
     LeNet-5 66 % / 12 % / 8 % / 19 % of conv1 / conv2 / fc1 / fc2; gradual, Zhu & Gupta,
     over 3/4 of the stage), then ``clusters`` shared values per layer (a pinned zero
     keeps pruned weights at 0), then QAT int8 with per-tensor scales (w8a8; clusters
     stay at most ``clusters`` + 1 integers); 8 / 4 / 2 epochs for LeNet-300-100, 4 / 2 / 1
     for LeNet-5; lr 0.01 for pruning, 0.001 after it (a shared value moves by the sum of
     its members' gradients). The artifact stores pruned kernels as a bitmask or CSR of
     positions and clustered ones as packed indices into a codebook, then deflates its
     files.

The models: ``lenet300`` is the MLP 784-300-100-10 (266,610 parameters, 1,066 kB in
float32); ``lenet5`` is Caffe's LeNet (conv 20 and 50 of 5x5, fc 500; 431,080 parameters,
1,724 kB), the "LeNet-5" of the paper. The paper: LeNet-300-100 1.64 % -> 1.58 % error at
40x (1,070 kB -> 27 kB); LeNet-5 0.80 % -> 0.74 % at 39x (1,720 kB -> 44 kB), counting
weights, indices and codebooks (after Huffman coding).

Measured: README's Deep Compression table (docs/mnist.md; ``python bench/mnist_table.py
--part=compress --docs``, 3 seeds), with bytes counted the paper's way and as the
artifact on disk.

Args (after the colon): ``model=lenet300`` or ``lenet5``; ``dataset=mnist`` or
``fashion_mnist`` (the same recipe on Fashion-MNIST); ``epochs=N`` (dense; 0 = the
model's default above);
``clusters=32``; ``stages=prune+cluster+quantize`` (any of them, in order, joined by ``+``);
``smoke`` (two tiny steps per stage).
"""

from jaxkd.config import chain_config, hinton_losses, parse_arg, run_config, smoke
from jaxkd.schema import ConfigError

MODELS = {
    "lenet300": ("mlp", {"widths": (300, 100)}),
    "lenet5": ("lenet5", {"channels": (20, 50), "widths": (500,)}),
}
# The fraction of weights each layer keeps (Han et al. 2015, Table 2), as sparsities.
KEPT = {
    "lenet300": {"hidden1": 0.08, "hidden2": 0.09, "head": 0.26},
    "lenet5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "head": 0.19},
}
EPOCH = 60_000 // 128  # steps per epoch at batch 128
# Epochs of the dense model and of each compression stage. LeNet-5's dense budget is
# Caffe's LeNet solver (10,000 steps of 64, 10.7 epochs); an epoch of it costs about 30 s
# on 2 CPU cores, one of LeNet-300-100 about 1 s.
EPOCHS = {"lenet300": (20, {"prune": 8, "cluster": 4, "quantize": 2}),
          "lenet5": (10, {"prune": 4, "cluster": 2, "quantize": 1})}


def mnist_run(model: str, epochs: float, dataset: str = "mnist"):
    name, kwargs = MODELS[model]
    c = run_config(dataset, name, **kwargs)
    c.batch_size = 128
    c.num_epochs = float(epochs)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.schedule.name = "cosine"
    c.log_every_steps = 500
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 2000
    return c


def get_config(arg=None):
    args = parse_arg(arg, model="lenet300", dataset="mnist", epochs=0, clusters=32,
                     stages="prune+cluster+quantize", smoke=False)
    model, dataset = args["model"], args["dataset"]
    if model not in MODELS:
        raise ConfigError(f"config arg model={model!r} is not one of: {', '.join(MODELS)}")
    if dataset not in ("mnist", "fashion_mnist"):
        raise ConfigError(f"config arg dataset={dataset!r} is not one of: mnist, "
                          "fashion_mnist")
    dense_epochs, stage_epochs = EPOCHS[model]
    dense = mnist_run(model, args["epochs"] or dense_epochs, dataset)

    compressed = mnist_run(model, 1, dataset)  # each compression stage sets its own steps
    compressed.distill.teacher.workdir = "stage:dense"  # teacher = the uncompressed model
    compressed.distill.losses = hinton_losses(alpha=0.5, temperature=4.0)
    compressed.init.method, compressed.init.teacher_workdir = "copy", "stage:dense"
    compressed.optimizer.learning_rate = 0.01
    compressed.pruning.update(
        method="magnitude", keep_first_last=False, end_step=3 * stage_epochs["prune"] * EPOCH // 4,
        frequency=EPOCH // 4,
        overrides=tuple({"layers": layer, "sparsity": round(1 - kept, 4)}
                        for layer, kept in KEPT[model].items()))
    compressed.clustering.update(num_clusters=args["clusters"], keep_first_last=False)
    compressed.quantization.update(weight_bits=8, activation_bits=8, per_channel=False)
    compressed.export.entropy_coding = True
    stages = tuple(args["stages"].split("+"))
    compressed.compression.stages = stages
    compressed.compression.num_steps = tuple(stage_epochs.get(s, 2) * EPOCH for s in stages)
    # A shared value moves by the sum of its members' gradients (Han et al.): at lr 0.01
    # LeNet-5's fc1 centroids (about 2,000 members each at 16) diverge; 0.001 after pruning.
    compressed.compression.learning_rates = tuple(0.01 if s == "prune" else 0.001
                                                  for s in stages)
    config = chain_config({"dense": dense, "compressed": compressed})
    if args["smoke"]:
        smoke(config)
    return config
