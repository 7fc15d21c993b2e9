r"""One short run of every training mode, for ``bench/equality.py`` (results must not move).

    python launch.py --config=bench/equality_config.py --workdir=runs/equality/chain
    python launch.py --config=bench/equality_config.py:precomputed=DIR --workdir=runs/equality/pre

A chain on MNIST-1D: a CNN teacher, then one stage per mode (plain SGD with a cosine
schedule, warm-up, clipping and weight decay; Hinton KD through the transfer set with
jitter; FitNets hint; a two-teacher probability ensemble; teacher -> assistant -> student;
``prune_width`` init; QAT min/max and LSQ; gradual Fisher pruning; channel pruning with
physical shrink; clustering; merging at start; tied layers; the prune -> cluster ->
quantize pipeline). ``:precomputed=DIR`` is a single run distilling from stored top-3
logits in ``DIR``. A few hundred steps each: the point is equality of the final weights
across code changes, not accuracy. Expected: about 4 minutes on 2 CPU cores, every stage's
weights equal to ``bench/equality_reference.json``.
"""

from jaxkd.config import chain_config, hinton_losses, parse_arg, run_config, smoke


def run(model: str, steps: int = 300, **model_kwargs):
    c = run_config("mnist1d", model, **model_kwargs)
    c.batch_size = 100
    c.eval_batch_size = 1000
    c.num_steps = steps
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps = 100
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    return c


def distilled(model: str, teacher: str = "stage:teacher", steps: int = 300, **model_kwargs):
    c = run(model, steps, **model_kwargs)
    c.data.transfer_split = "unlabelled"
    c.distill.teacher.workdir = teacher
    c.distill.losses = hinton_losses(alpha=0.9, temperature=4.0)
    return c


def copied(steps: int = 200):
    """The kd stage's MLP continued (compression starts from trained weights)."""
    c = distilled("mlp", teacher="stage:kd", steps=steps, widths=(100, 100))
    c.init.method, c.init.teacher_workdir = "copy", "stage:kd"
    c.optimizer.learning_rate = 1e-3
    return c


def stages() -> dict:
    teacher = run("cnn1d", 400)
    teacher.optimizer.learning_rate = 1e-2

    plain = run("mlp", widths=(64, 64), dropout_rate=0.1)
    plain.optimizer.update(name="sgd", learning_rate=0.05, momentum=0.9, nesterov=True,
                           weight_decay=1e-4, grad_clip_norm=1.0)
    plain.schedule.update(name="cosine", warmup_steps=20)

    kd = distilled("mlp", widths=(100, 100))
    kd.data.augment = "jitter"

    hint = distilled("mlp", widths=(64, 64))
    hint.distill.losses.hint = {"name": "hint_mse", "weight": 0.5,
                                "student_feature": "embedding", "teacher_feature": "embedding"}

    ensemble = distilled("mlp", widths=(64,))
    ensemble.distill.teacher.workdir = ""
    ensemble.distill.teachers = ({"workdir": "stage:teacher", "weight": 2.0},
                                 {"workdir": "stage:kd", "weight": 1.0})
    ensemble.distill.ensemble = "probabilities"

    ta_student = distilled("mlp", teacher="stage:kd", steps=200, widths=(32, 32))

    init = distilled("mlp", steps=200, widths=(48, 48))
    init.init.method, init.init.teacher_workdir = "prune_width", "stage:kd"

    qat_minmax = distilled("mlp", widths=(64, 64))
    qat_minmax.quantization.update(enabled=True, weight_bits=4, activation_bits=8)

    qat_lsq = distilled("mlp", widths=(64, 64))
    qat_lsq.quantization.update(enabled=True, weight_bits=4, activation_bits=8, method="lsq")

    prune = copied(300)
    prune.pruning.update(enabled=True, method="fisher", sparsity=0.75, frequency=20,
                         end_step=200)

    channels = copied()
    channels.pruning.update(enabled=True, method="magnitude", pattern="channels",
                            sparsity=0.5, schedule="one_shot")

    cluster = copied()
    cluster.clustering.update(enabled=True, num_clusters=16)

    merge = copied()
    merge.merging.update(enabled=True, metric="cosine", threshold=0.5, at="start")

    tied = distilled("mlp", widths=(64, 64, 64), tie_hidden=True)

    pipeline = copied()
    pipeline.pruning.update(method="fisher", sparsity=0.8, keep_first_last=False,
                            frequency=20, end_step=120)
    pipeline.clustering.update(num_clusters=16, keep_first_last=False)
    pipeline.quantization.update(weight_bits=8, activation_bits=8, per_channel=False)
    pipeline.export.entropy_coding = True
    pipeline.compression.stages = ("prune", "cluster", "quantize")
    pipeline.compression.num_steps = (150, 100, 100)

    return {"teacher": teacher, "plain": plain, "kd": kd, "hint": hint, "ensemble": ensemble,
            "ta_student": ta_student, "init_prune_width": init, "qat_minmax": qat_minmax,
            "qat_lsq": qat_lsq, "prune_fisher": prune, "prune_channels": channels,
            "cluster": cluster, "merge_start": merge, "tied": tied, "pipeline": pipeline}


def get_config(arg=None):
    args = parse_arg(arg, precomputed="", smoke=False)
    if args["precomputed"]:
        config = run("mlp", widths=(64, 64))
        config.data.transfer_split = "unlabelled"
        config.distill.teacher_logits = args["precomputed"]
        config.distill.losses = {
            "kd": {"name": "topk_soft_target_kl", "weight": 0.9,
                   "kwargs": {"temperature": 4.0}},
            "ce": {"name": "cross_entropy", "weight": 0.1}}
    else:
        config = chain_config(stages())
    if args["smoke"]:
        smoke(config)
    return config
