"""The fields of a run's config, with their defaults, for ``configs/*.py`` to start from.

A *run* config trains one model (optionally distilling from a teacher); a *chain* config
(:func:`chain_config`) lists several run configs as stages, run in order by
:mod:`jaxkd.chain`. Configs are plain ``ml_collections.ConfigDict``s (big_vision style):
every field that changes a result lives here and is echoed into ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from jaxkd.compression import default_compression_config
from jaxkd.data import pipeline
from jaxkd.pruning import default_pruning_config
from jaxkd.quant import default_quantization_config
from jaxkd.sharing import default_clustering_config, default_merging_config
from jaxkd.student_init import default_init_config


def supervised_losses() -> ml_collections.ConfigDict:
    """The plain label loss: cross-entropy with the labels."""
    return ml_collections.ConfigDict({"ce": {"name": "cross_entropy", "weight": 1.0}})


def hinton_losses(alpha: float, temperature: float) -> ml_collections.ConfigDict:
    """Hinton et al. 2015: ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(labels)``."""
    return ml_collections.ConfigDict({
        "kd": {"name": "soft_target_kl", "weight": float(alpha),
               "kwargs": {"temperature": float(temperature)}},
        "ce": {"name": "cross_entropy", "weight": float(1.0 - alpha)},
    })


def run_config(dataset: str, model: str, **model_kwargs) -> ml_collections.ConfigDict:
    """Every field of a single training run, with defaults; configs override what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = pipeline.default_data_config(dataset)
    c.model = ml_collections.ConfigDict({"name": model, "kwargs": dict(model_kwargs)})

    c.batch_size = 128  # global, over every device and process
    c.eval_batch_size = 1000
    c.num_steps = 0  # > 0 wins over num_epochs
    c.num_epochs = 10.0

    c.optimizer = ml_collections.ConfigDict({
        "name": "adam", "learning_rate": 1e-3, "momentum": 0.9, "nesterov": False,
        "b1": 0.9, "b2": 0.999, "weight_decay": 0.0, "grad_clip_norm": 0.0,
    })
    c.schedule = ml_collections.ConfigDict({
        "name": "constant", "warmup_steps": 0, "boundaries_epochs": (), "decay_factor": 0.1,
    })

    c.distill = ml_collections.ConfigDict()
    # Workdir of a finished run whose model is the teacher; '' = no teacher. In a chain,
    # 'stage:NAME' names an earlier stage of the same chain.
    c.distill.teacher = ml_collections.ConfigDict({"workdir": ""})
    # Several teachers: a list of {workdir, weight}; when set it replaces teacher.workdir.
    c.distill.teachers = ()
    c.distill.ensemble = "sum_losses"  # or 'probabilities' (see jaxkd.objective)
    # Precomputed teacher logits (python -m jaxkd.teacher_logits); '' = run a teacher.
    c.distill.teacher_logits = ""
    c.distill.allow_augment_with_precomputed = False
    c.distill.losses = supervised_losses()
    # Student weights taken from a teacher ("parameter distillation"); method '' = random.
    c.init = default_init_config()
    # Quantization-aware training (or PTQ with qat=False) and the integer export.
    c.quantization = default_quantization_config()
    # Pruning: masks kept in the optimizer state (a wrapper around the optimizer).
    c.pruning = default_pruning_config()
    # Weight clustering (Deep Compression): the optimizer trains k centroids per layer.
    c.clustering = default_clustering_config()
    # Similarity merging (Srinivas & Babu 2015), applied to the trained model at export.
    c.merging = default_merging_config()
    # Ordered stages (prune -> cluster -> quantize), each a run continuing the previous.
    c.compression = default_compression_config()
    # The artifact: entropy_coding compresses its tensor files with zlib (Deep Compression's
    # final Huffman stage) when that makes them smaller.
    c.export = ml_collections.ConfigDict({"entropy_coding": False})

    c.log_every_steps = 100
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    c.max_to_keep = 3
    # Steps with a non-finite loss/gradient are never applied; more than this many stop the
    # run with an error naming the first one.
    c.skip_nonfinite_steps = 0
    return c


def chain_config(stages: Mapping[str, ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """Several runs, in order; a stage's teacher may be an earlier stage (``'stage:NAME'``)."""
    c = ml_collections.ConfigDict()
    c.stage_order = tuple(stages)
    c.stages = ml_collections.ConfigDict(dict(stages))
    return c


def smoke(c: ml_collections.ConfigDict, *, steps: int = 2, batch_size: int = 8
          ) -> ml_collections.ConfigDict:
    """Shrinks a run (or every stage of a chain) to a few tiny steps, for tests."""
    runs = [c.stages[name] for name in c.stage_order] if "stages" in c else [c]
    for run in runs:
        run.num_steps = steps
        run.batch_size = batch_size
        run.eval_batch_size = batch_size
        run.log_every_steps = 1
        run.eval_every_steps = steps
        run.checkpoint_every_steps = steps
        if run.get("pruning") is not None and run.pruning.end_step >= steps:
            run.pruning.end_step = -1  # the ramp must end inside the shortened run
        if run.get("compression") is not None and run.compression.num_steps:
            run.compression.num_steps = (steps,) * len(run.compression.num_steps)
    return c


def parse_arg(arg: str | None) -> dict[str, str]:
    """``'smoke,seed=3'`` -> ``{'smoke': '', 'seed': '3'}`` (the ``configs/x.py:ARG`` string)."""
    out = {}
    for token in (arg or "").split(","):
        token = token.strip()
        if token:
            key, _, value = token.partition("=")
            out[key.strip()] = value.strip()
    return out
