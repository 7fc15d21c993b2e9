"""Every field of a run's config: its typed block, default and rule, for configs to start from.

A *run* config trains one model (optionally distilling from teachers); a *chain* config
(:func:`chain_config`) lists run configs as stages, run in order by :mod:`jaxkd.chain`.
Configs are plain ``ml_collections.ConfigDict``s (big_vision style), built from
:func:`run_config` and changed field by field; every field that changes a result lives
here and is echoed into ``summary.json``.

Each block of a run (``config.data``, ``config.pruning``, ...) is a frozen dataclass of
:mod:`jaxkd.schema` below: its fields, their defaults and their rules. The trainer reads
``parse_run(config)``: the typed blocks, checked once, with errors that name the field as
the user wrote it (``config.pruning.sparsity=1.5 must be in [0, 1)``). Library functions
take a block's fields as keyword arguments (``pruning.masked(tx, **settings.kwargs())``)
and check them with the same block, so every rule lives once.

This module imports only ``ml_collections`` and jaxkd's light modules: loading a config
file imports neither jax nor tfds, grain or orbax.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from jaxkd import schema
from jaxkd.data import datasets
from jaxkd.data.augment import AUGMENTATIONS
from jaxkd.schema import Block, ConfigError, FieldError

# ----------------------------------------------------------------------------- data, model


@dataclasses.dataclass(frozen=True)
class Data(Block):
    """``config.data``: which tfds dataset, which splits, and how batches are made.

    Fields:
      name: a registered dataset (:mod:`jaxkd.data.datasets`).
      builder_config: tfds builder config, '' = the default one.
      data_dir: where tfds datasets live; None = ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.
      train_split, eval_split: the splits trained on and evaluated.
      transfer_split: unlabelled extra training inputs (label -1), '' = none.
      augment: 'none', 'jitter' or 'crop_flip' (:mod:`jaxkd.data.augment`).
      jitter_pixels: the largest shift of 'jitter'.
      image_size: side of variable-size images (imagenet2012) after resize and crop.
      in_memory: hold the training examples in host memory.
      drop_labels: examples of ``train_split`` with one of these labels are left out of
        the training stream (Hinton et al. 2015, section 3: a transfer set without any 3);
        ``num_epochs`` still counts the whole split.

    Text datasets (whose tfds features have ``text``, e.g. ``bbc_news``;
    :mod:`jaxkd.data.text`) are tokenised once into host memory (``in_memory`` and the
    image fields do not apply; ``augment`` must be 'none'):
      tokenizer: path of a Hugging Face ``tokenizer.json``, or 'bytes' (one token per
        UTF-8 byte, vocabulary 260; no file); required for text, '' for images. Its own
        padding and truncation settings are replaced by the two below.
      max_length: tokens kept of each example, special tokens included (truncation).
      bucket_lengths: each batch is padded to the smallest of these (capped at
        ``max_length``, which is always one) that holds its longest sequence: a few
        shapes, so a few compilations of the step.
      task: '' = the dataset's own task (:mod:`jaxkd.tasks`); 'causal_lm' makes a text
        dataset a language-modelling corpus: each document is tokenised whole and cut
        into consecutive windows of ``max_length`` tokens, each window one example
        (:func:`jaxkd.data.text.windows`), and the vocabulary is the classes.
    """

    name: str = "mnist1d"
    builder_config: str = ""
    data_dir: str | None = schema.text(None, optional=True)
    train_split: str = "train"
    eval_split: str = "test"
    transfer_split: str = ""
    augment: str = schema.choice("none", AUGMENTATIONS, noun="known")
    jitter_pixels: int = schema.integer(2, minimum=0)
    image_size: int = schema.integer(224, minimum=1)
    in_memory: bool = True
    drop_labels: tuple = schema.items((), schema.Integer(minimum=0))
    tokenizer: str = ""
    max_length: int = schema.integer(128, minimum=2)  # room for [CLS] and [SEP]
    bucket_lengths: tuple = schema.items((32, 64, 128), schema.Integer(minimum=1))
    task: str = ""

    def check(self) -> None:
        datasets.get(self.name)
        if self.task:
            from jaxkd import tasks  # the task registry (user tasks register at run time)

            tasks.get(self.task)
            if self.task == "sentence_embedding" and datasets.get(self.name).task != \
                    "text_classification":
                raise schema.FieldError("task", f"={self.task!r} needs a text dataset; "
                                        f"config.data.name={self.name!r} is not one")


def data_config(name: str) -> ml_collections.ConfigDict:
    """Every ``config.data`` field, with the defaults of dataset ``name``."""
    with schema.named("config.data"):
        dataset = datasets.get(name)
    c = schema.defaults(Data)
    c.name, c.eval_split, c.in_memory = name, dataset.eval_split, dataset.in_memory
    return c


@dataclasses.dataclass(frozen=True)
class Model(Block):
    """``config.model``: a registered model (:mod:`jaxkd.models`) and its kwargs."""

    name: str = "mlp"
    kwargs: dict = schema.free({})


# ----------------------------------------------------------------------------- optimizer

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class Optimizer(Block):
    """``config.optimizer`` (:mod:`jaxkd.optim`).

    Fields: ``name`` (sgd, adam, adamw), ``learning_rate`` (the peak), ``momentum`` and
    ``nesterov`` (SGD), ``b1``/``b2`` (Adam), ``weight_decay`` (coupled L2 for SGD and
    Adam, decoupled for AdamW), ``grad_clip_norm`` (0 = off).
    """

    name: str = schema.choice("adam", OPTIMIZERS, noun="an optimizer")
    learning_rate: float = schema.number(1e-3, lo=0.0, lo_open=True)
    momentum: float = schema.number(0.9, lo=0.0, hi=1.0, hi_open=True)
    nesterov: bool = False
    b1: float = schema.number(0.9, lo=0.0, hi=1.0, hi_open=True)
    b2: float = schema.number(0.999, lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = schema.number(0.0, lo=0.0)
    grad_clip_norm: float = schema.number(0.0, lo=0.0)


@dataclasses.dataclass(frozen=True)
class Schedule(Block):
    """``config.schedule``: the learning rate over the run (:mod:`jaxkd.optim`).

    ``name`` constant, cosine (to 0 over the run) or step (times ``decay_factor`` at each
    of ``boundaries_epochs``), after ``warmup_steps`` of linear warm-up.
    """

    name: str = schema.choice("constant", LR_SCHEDULES, noun="a schedule")
    warmup_steps: int = schema.integer(0, minimum=0)
    boundaries_epochs: tuple = schema.items((), schema.Number(lo=0.0))
    decay_factor: float = schema.number(0.1, lo=0.0, lo_open=True)


# ----------------------------------------------------------------------------- distillation

ENSEMBLES = ("sum_losses", "probabilities")
LOSS_SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class LossTerm(Block):
    """One term of ``config.distill.losses`` (:mod:`jaxkd.objective`).

    Fields: ``name`` (a function of :mod:`jaxkd.losses`; '' = the term's label),
    ``weight``, ``kwargs`` (the loss function's, e.g. ``temperature``), the features a
    feature term compares (``student_feature``, ``teacher_feature``), ``schedule``
    (constant, linear or cosine) moving ``weight`` to ``weight_end`` and the temperature
    to ``temperature_end`` over the run, and ``adapter`` (a trainable map from the
    student's feature to the teacher's width; default: on for ``hint_mse``).
    """

    name: str = ""
    weight: float = schema.number(1.0)
    kwargs: dict = schema.free({})
    student_feature: str = schema.text("", optional=True)
    teacher_feature: str = schema.text("", optional=True)
    schedule: str = schema.choice("constant", LOSS_SCHEDULES, noun="a schedule")
    weight_end: float | None = schema.maybe(None, schema.Number())
    temperature_end: float | None = schema.maybe(None, schema.Number(lo=0.0, lo_open=True))
    adapter: bool | None = schema.maybe(None, schema.Flag())


@dataclasses.dataclass(frozen=True)
class TeacherRef(Block):
    """One teacher: a finished run's workdir (``'stage:NAME'`` in a chain) and its weight."""

    workdir: str = ""
    weight: float = schema.number(1.0, lo=0.0, lo_open=True)


ON_POLICY_POLICIES = ("student", "teacher")


@dataclasses.dataclass(frozen=True)
class OnPolicy(Block):
    """``config.distill.on_policy``: distillation on generated text (:mod:`jaxkd.on_policy`).

    Fields: ``fraction`` of the batches whose windows are replaced by generated ones (GKD's
    lambda; 0 = off); ``policy`` 'student' (on-policy GKD, Agarwal et al. 2024) or
    'teacher' (sequence-level KD, Kim & Rush 2016) writes them; the first
    ``prompt_tokens`` of each window are the prompt, ``new_tokens`` are sampled at
    ``temperature`` (0 = greedy), ``top_k`` (0 = all) and ``top_p``.
    """

    fraction: float = schema.number(0.0, lo=0.0, hi=1.0)
    policy: str = schema.choice("student", ON_POLICY_POLICIES, noun="a policy")
    prompt_tokens: int = schema.integer(32, minimum=1)
    new_tokens: int = schema.integer(32, minimum=1)
    temperature: float = schema.number(1.0, lo=0.0)
    top_k: int = schema.integer(0, minimum=0)
    top_p: float = schema.number(1.0, lo=0.0, lo_open=True, hi=1.0)


@dataclasses.dataclass(frozen=True)
class Distill(Block):
    """``config.distill``: the teachers and the objective (:mod:`jaxkd.objective`).

    Fields:
      teacher: ``{workdir}`` of a finished run whose model is the teacher; '' = none.
      teachers: several teachers, ``({workdir, weight}, ...)``; replaces ``teacher``.
      ensemble: 'sum_losses' or 'probabilities' (how several teachers combine).
      teacher_logits: a directory of precomputed logits (:mod:`jaxkd.teacher_logits`).
      allow_augment_with_precomputed: use stored (un-augmented) logits with augmentation.
      losses: the terms of the objective, checked by :func:`jaxkd.objective.parse_terms`.
      on_policy: distillation on generated text (:class:`OnPolicy`), off by default.
    """

    teacher: TeacherRef = schema.nested(TeacherRef)
    teachers: tuple = schema.items((), schema.Record(TeacherRef))
    ensemble: str = schema.choice("sum_losses", ENSEMBLES, noun="an ensemble mode")
    teacher_logits: str = ""
    allow_augment_with_precomputed: bool = False
    losses: Any = schema.free({"ce": {"name": "cross_entropy", "weight": 1.0}})
    on_policy: OnPolicy = schema.nested(OnPolicy)


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


INIT_IMPORTANCE = ("activation", "gradient")
PRETRAINED = ("all-MiniLM-L6-v2", "gemma-3-270m")  # what python -m jaxkd.models.fetch fetches


def pretrained_dir(name: str, directory: str | None = None) -> str:
    """Where ``python -m jaxkd.models.fetch NAME`` puts pretrained model ``name``:
    ``directory``, else ``$JAXKD_MODELS``, else ``~/jaxkd_models``, then ``name`` (it may
    not be there yet). Here, not in :mod:`jaxkd.models.fetch`, so that configs can name it
    without importing jax."""
    if name not in PRETRAINED:
        raise ConfigError(f"{name!r} is not a model this fetches; choose one of: "
                          f"{', '.join(PRETRAINED)}")
    root = directory or os.environ.get("JAXKD_MODELS") or "~/jaxkd_models"
    return os.path.join(os.path.expanduser(root), name)


INIT_METHODS = ("", "copy", "layer_select", "prune_width", "pretrained", "minitron")


@dataclasses.dataclass(frozen=True)
class Init(Block):
    """``config.init``: how the student's weights start (:mod:`jaxkd.student_init`).

    Fields:
      method: '' (random), 'copy' (continue a finished run's model), 'layer_select' or
        'prune_width' (a slice of a teacher), 'pretrained' (the weights of a Hugging Face
        BERT directory), 'minitron' (a Gemma 3 student cut out of a Gemma 3 teacher:
        the student's ``num_layers`` layers of highest Block Influence, keeping the
        local/global pattern, each with its ``intermediate_size`` most important FFN
        neurons, ranked on ``calibration_examples`` training windows; :mod:`jaxkd.minitron`).
      teacher_workdir: the run whose weights seed the student; '' = the distillation
        teacher.
      keep_layers: layer_select's kept teacher layers (MLP) or blocks per stage (ResNets),
        0-based, in order; () = every other one. For minitron, () = by Block Influence.
      calibration_examples: prune_width's images over which the mean |activation| ranks
        neurons and channels.
      importance: prune_width's ranking: 'activation' (mean |activation|, Minitron) or, for
        BERT heads and FFN neurons, 'gradient' (Michel et al. 2019: mean over calibration
        examples of |dL/d gate| of the teacher's cross-entropy).
      pretrained: for 'pretrained', the directory (``config.json``, ``model.safetensors``;
        :func:`jaxkd.models.from_pretrained`) whose weights the BERT student starts from;
        its head too when the file holds a classifier with as many classes.
    """

    method: str = schema.choice("", INIT_METHODS, noun="an init method")
    teacher_workdir: str = ""
    keep_layers: Any = schema.free(())
    calibration_examples: int = schema.integer(512, minimum=1)
    pretrained: str = ""
    importance: str = schema.choice("activation", INIT_IMPORTANCE, noun="an importance")

    def check(self) -> None:
        if self.method == "pretrained" and not self.pretrained:
            raise FieldError("pretrained", "is required by method='pretrained': the path of "
                                           "a Hugging Face BERT directory")
        if self.importance != "activation" and self.method != "prune_width":
            raise FieldError("importance", f"={self.importance!r} is only read by "
                                           "method='prune_width'")
        if self.pretrained and self.method != "pretrained":
            raise FieldError("pretrained", f"={self.pretrained!r} is only read by "
                                           "method='pretrained'")


# ----------------------------------------------------------------------------- compression

WEIGHT_BITS = (2, 4, 8)
ACTIVATION_BITS = (0, 2, 4, 8)  # 0 = float activations
EMBEDDING_BITS = (0, 4, 8)  # 0 = float embedding tables


@dataclasses.dataclass(frozen=True)
class Quantization(Block):
    """``config.quantization`` (:mod:`jaxkd.quant`): QAT or PTQ and the integer export.

    Fields:
      enabled: quantize this run: export an integer artifact (and train QAT if ``qat``).
      qat: train with fake-quantized weights (quantization-aware training); False trains in
        float and quantizes after training (post-training quantization, PTQ).
      weight_bits: 8, 4 or 2.
      activation_bits: 0 (float activations), 8, 4 or 2: fake-quantize the inputs of the
        selected layers during QAT (the exported artifact always runs int8 or narrower).
      per_channel: one weight scale per output channel (else one per tensor).
      symmetric: symmetric weights (zero point 0); activations are always symmetric.
      layers: regex, matched against the whole parameter path of each Dense/Conv layer.
      keep_first_last_8bit: the first layer and the classifier ``head`` keep 8 bits.
      method: 'minmax' (scale from the tensor's range) or 'lsq' (learned step size).
      calibration: 'minmax' or 'percentile': the activation ranges of post-training
        quantization and of the exported artifact's static activation scales.
      percentile: for ``calibration='percentile'``, the upper percentile of the range.
      calibration_batches: how many training batches calibrate the activation ranges of
        post-training quantization.
      range_momentum: QAT min/max: the weight of each batch's min and max in the running
        activation ranges (an exponential moving average; PyTorch's observers use 0.01,
        TensorFlow's 0.001). The ranges are kept in the training state and frozen for
        evaluation and export.
      embedding_bits: 0 (float tables), 8 or 4: quantize every embedding table the model
        looks up (``flax.linen.Embed``: BERT's word, position and token-type tables),
        weight-only, symmetric with one scale per row (per token), in QAT and in the
        artifact, whose integer runtime gathers the integer rows and scales them.

    With ``unsigned_activations`` a layer whose input is non-negative on the first batch
    (after a ReLU) gets the unsigned grid ``[0, 2^b - 1]``, others the symmetric signed
    one; LSQ likewise (``Q_N = 0``). With ``activation_bits=0`` the artifact is
    weight-only: integer weights, float activations, as QAT trained it.
    """

    enabled: bool = False
    qat: bool = True
    weight_bits: int = schema.choice(8, WEIGHT_BITS)
    activation_bits: int = schema.choice(0, ACTIVATION_BITS)
    per_channel: bool = True
    symmetric: bool = True
    layers: str = schema.regex(".*")
    keep_first_last_8bit: bool = True
    method: str = schema.choice("minmax", ("minmax", "lsq"), noun="a method")
    calibration: str = schema.choice("minmax", ("minmax", "percentile"),
                                     noun="a calibration method")
    percentile: float = schema.number(99.99, lo=50.0, hi=100.0, lo_open=True)
    calibration_batches: int = schema.integer(8, minimum=1)
    range_momentum: float = schema.number(0.01, lo=0.0, hi=1.0, lo_open=True)
    unsigned_activations: bool = True
    embedding_bits: int = schema.choice(0, EMBEDDING_BITS)

    def check(self) -> None:
        if self.method == "lsq" and not self.symmetric:
            raise FieldError("method", "='lsq' learns a symmetric step: set symmetric=True")


GGUF_QTYPES = ("Q8_0", "Q4_0")


@dataclasses.dataclass(frozen=True)
class GgufQuantization(Block):
    """``config.gguf_quantization`` (:mod:`jaxkd.gguf_quant`): QAT on llama.cpp's own grid.

    Fields:
      enabled: train a Gemma 3 student with every matrix llama.cpp quantizes (attention,
        FFN, the tied embedding table) fake-quantized on ``qtype``'s grid, weights only.
      qtype: 'Q8_0' (8-bit, blocks of 32 values with a float16 scale) or 'Q4_0' (4-bit).

    The artifact holds the quantized weights, and its GGUF file (``config.export.formats``
    'gguf') writes them in ``qtype`` losslessly: llama.cpp runs exactly the weights that
    trained. Not combined with ``config.quantization`` (jaxkd's own integer grid).
    """

    enabled: bool = False
    qtype: str = schema.choice("Q8_0", GGUF_QTYPES, noun="a GGUF quantization type")


PRUNING_METHODS = ("magnitude", "global_magnitude", "taylor", "snip", "fisher", "random")
PATTERNS = ("unstructured", "n:m", "channels")
SPARSITY_SCHEDULES = ("one_shot", "polynomial")
GLOBAL_METHODS = ("global_magnitude", "snip")  # one threshold over layers (unstructured)
GRADIENT_METHODS = ("taylor", "snip", "fisher")  # scores that need the gradients

_OVERRIDE = schema.Keys((("layers", schema.Regex()),
                         ("sparsity", schema.Number(0.0, 1.0, hi_open=True))))


@dataclasses.dataclass(frozen=True)
class Pruning(Block):
    """``config.pruning`` (:mod:`jaxkd.pruning`): masks kept in the optimizer state.

    Fields:
      enabled: prune this run.
      method: importance score: 'magnitude', 'global_magnitude', 'taylor', 'snip', 'fisher'
        or 'random' (see :mod:`jaxkd.pruning.scores`).
      pattern: 'unstructured', 'n:m' or 'channels'.
      n, m: for 'n:m', keep ``n`` of every ``m`` consecutive input weights (2:4).
      sparsity: final fraction ``s_f`` of removed weights of each selected layer, in [0, 1)
        (unused by 'n:m', whose sparsity is ``(m - n) / m``).
      initial_sparsity: ``s_i`` of the polynomial schedule, in [0, sparsity].
      schedule: 'one_shot' (``s_f`` from ``begin_step`` on) or 'polynomial' (Zhu & Gupta).
      begin_step: first step that prunes.
      end_step: last step of the polynomial ramp; -1 = the last training step
        (``total_steps - 1``). Ending earlier (about 3/4 of the run) leaves steps to recover.
      frequency: the polynomial schedule recomputes masks every ``frequency`` steps.
      layers: regex, matched (``re.fullmatch``) against the path of each weight's layer
        (``'hidden2'``, ``'stage1_block0/conv1'``).
      overrides: tuple of ``{'layers': regex, 'sparsity': float}``: the first override whose
        regex matches a layer sets its final sparsity, and selects the layer even when
        ``layers`` or ``keep_first_last`` leave it out (sparsity 0 leaves it dense).
      keep_first_last: leave the first layer and the classifier ``head`` dense
        (:func:`jaxkd.layers.edge_layers`).
      seed: the draw of method 'random'.
      fisher_examples: method 'fisher': the examples of each batch whose per-example
        gradients (one at a time, ``jax.lax.scan``) estimate the empirical Fisher every
        step; they cost about 0.05 plain steps each on the 784-800-800 MLP
        (bench/compress_step.py).
      from_zeros: the masks start as ``params != 0`` of the selected weights at ``init``
        (instead of all True), so the zeros of an already pruned model stay zero while it
        is fine-tuned, clustered or quantized; the schedule may then prune further.
    """

    enabled: bool = False
    method: str = schema.choice("magnitude", PRUNING_METHODS)
    pattern: str = schema.choice("unstructured", PATTERNS)
    n: int = schema.integer(2)
    m: int = schema.integer(4, minimum=1)
    sparsity: float = schema.number(0.5, lo=0.0, hi=1.0, hi_open=True)
    initial_sparsity: float = schema.number(0.0, lo=0.0)
    schedule: str = schema.choice("polynomial", SPARSITY_SCHEDULES)
    begin_step: int = schema.integer(0, minimum=0)
    end_step: int = schema.integer(-1, minimum=-1)
    frequency: int = schema.integer(100, minimum=1)
    layers: str = schema.regex(".*")
    overrides: tuple = schema.items((), _OVERRIDE)
    keep_first_last: bool = True
    seed: int = schema.integer(0, minimum=0)
    fisher_examples: int = schema.integer(16, minimum=1)
    from_zeros: bool = False

    def check(self) -> None:
        if not 1 <= self.n <= self.m:
            raise FieldError("n", f"={self.n!r} must be an integer in [1, m={self.m}]")
        if self.initial_sparsity > self.sparsity:
            raise FieldError("initial_sparsity", f"={self.initial_sparsity!r} must be in "
                                                 f"[0, sparsity={self.sparsity}]")
        if (self.schedule == "polynomial" and self.end_step != -1
                and self.end_step <= self.begin_step):
            raise FieldError("end_step", f"={self.end_step} must be > begin_step="
                                         f"{self.begin_step} for the polynomial schedule (or "
                                         "-1 for the last step)")
        if self.method == "global_magnitude" and self.pattern != "unstructured":
            raise FieldError("method", f"='global_magnitude' ranks single weights; it needs "
                                       f"pattern='unstructured', not {self.pattern!r}")
        if self.method == "snip" and self.schedule != "one_shot":
            raise FieldError("schedule", f"={self.schedule!r}: method 'snip' prunes once, at "
                                         "begin_step; use schedule='one_shot'")
        if self.pattern == "n:m" and self.schedule != "one_shot":
            raise FieldError("schedule", f"={self.schedule!r}: pattern 'n:m' has a fixed "
                                         "sparsity (m - n) / m; use schedule='one_shot'")
        if self.pattern == "n:m" and self.overrides:
            raise FieldError("overrides", "must be empty with pattern 'n:m' (its sparsity is "
                                          "(m - n) / m); select layers with layers")


CLUSTER_INITS = ("linear", "kmeans++", "density")
GRANULARITIES = ("layer", "channel")


@dataclasses.dataclass(frozen=True)
class Clustering(Block):
    """``config.clustering`` (:mod:`jaxkd.sharing.cluster`): k shared values per layer.

    Fields:
      enabled: cluster this run.
      num_clusters: ``k >= 2`` shared values per layer (or per channel), plus a pinned zero
        centroid for pruned weights; 16 gives 4-bit indices.
      init: initial centroids: 'linear', 'kmeans++' or 'density'.
      granularity: 'layer' (one codebook per kernel) or 'channel' (one per output channel).
      layers: regex, matched (``re.fullmatch``) against the path of each weight's layer.
      reassign_every: re-assign weights to their nearest centroid every this many steps
        (from latent dense weights); 0 keeps the assignments made at init (Han et al.).
        The latent kernels are trained by the optimizer too (TF-MOT style), and the
        weights are projected onto their centroids after every update: about 1.6x the
        plain step on a dense 784-800-800 MLP (bench/compress_step.py), against <= 1.0x
        with fixed assignments.
      keep_first_last: leave the first layer and the classifier ``head`` unclustered
        (Deep Compression clusters every layer, hence False).
      lloyd_iterations: Lloyd (k-means) steps after the initial centroids; 0 keeps them.
      seed: the draw of 'kmeans++'.
    """

    enabled: bool = False
    num_clusters: int = schema.integer(16, minimum=2)
    init: str = schema.choice("linear", CLUSTER_INITS, noun="an init")
    granularity: str = schema.choice("layer", GRANULARITIES, noun="a granularity")
    layers: str = schema.regex(".*")
    reassign_every: int = schema.integer(0, minimum=0)
    keep_first_last: bool = False
    lloyd_iterations: int = schema.integer(10, minimum=0)
    seed: int = schema.integer(0, minimum=0)


MERGE_METRICS = ("euclidean", "cosine")
MERGE_AT = ("export", "start")


@dataclasses.dataclass(frozen=True)
class Merging(Block):
    """``config.merging`` (:mod:`jaxkd.sharing.merge`): similarity merging of neurons.

    Fields:
      enabled: merge similar neurons (the layers shrink).
      layers: regex over the layers that can shrink (``hidden*`` of ``mlp``, ``conv*`` of
        ``cnn1d``-style models; never ``head``).
      metric: 'euclidean' (merge when ``||v_i - v_j|| < threshold``) or 'cosine' (when the
        cosine similarity ``> threshold``) of the incoming weights and bias.
      threshold: >= 0 for 'euclidean' (0 merges nothing); in [-1, 1] for 'cosine' (1
        merges nothing).
      at: 'export' merges the trained model when it is exported (data-free, as in the
        paper); 'start' merges the weights that ``config.init`` copies (``method='copy'``)
        and then trains the smaller model (merge, then fine-tune).
    """

    enabled: bool = False
    layers: str = schema.regex(".*")
    metric: str = schema.choice("euclidean", MERGE_METRICS, noun="a metric")
    threshold: float = schema.number(0.0)
    at: str = schema.choice("export", MERGE_AT)

    def check(self) -> None:
        rule = (schema.Number(lo=0.0) if self.metric == "euclidean"
                else schema.Number(lo=-1.0, hi=1.0))
        try:
            rule.convert("threshold", self.threshold)
        except FieldError as e:
            raise FieldError("threshold", f"{e.detail} for metric {self.metric!r}") from None


COMPRESSION_STAGES = ("prune", "cluster", "quantize")


@dataclasses.dataclass(frozen=True)
class Compression(Block):
    """``config.compression`` (:mod:`jaxkd.compression`): ordered stages of one run.

    Fields:
      stages: ordered stage names from 'prune', 'cluster', 'quantize' (each at most once;
        'quantize' last).
      num_steps: steps of each stage (same length as ``stages``); () = ``config.num_steps``.
      learning_rates: peak learning rate of each stage; () = ``config.optimizer``'s.
    """

    stages: tuple = schema.items((), schema.Choice(COMPRESSION_STAGES, noun="a stage"))
    num_steps: tuple = schema.items((), schema.Integer(minimum=1))
    learning_rates: tuple = schema.items((), schema.Number(lo=0.0, lo_open=True))

    def check(self) -> None:
        names = list(self.stages)
        if len(set(names)) != len(names):
            raise FieldError("stages", f"={names} names a stage twice")
        if "quantize" in names and names[-1] != "quantize":
            raise FieldError("stages", f"={names}: 'quantize' must be the last stage (the "
                                       "integer export follows it)")
        for field in ("num_steps", "learning_rates"):
            values = getattr(self, field)
            if values and len(values) != len(names):
                raise FieldError(field, f"has {len(values)} entries; it needs one per stage "
                                        f"({len(names)}) or none")


EXPORT_FORMATS = ("stablehlo", "onnx", "safetensors", "hf", "gguf")


@dataclasses.dataclass(frozen=True)
class Export(Block):
    """``config.export``: the artifact (:mod:`jaxkd.export`) and the other formats.

    ``entropy_coding`` compresses its tensor files with zlib (Deep Compression's final
    Huffman stage) when that makes them smaller. ``formats`` (:mod:`jaxkd.export.formats`,
    written to ``DIR/formats/``): ``()`` every one of 'stablehlo', 'onnx', 'safetensors'
    that can express the model (the others skipped with one logged line) and, for BERT,
    'hf' (an HF model directory), for Gemma 3 'gguf' (llama.cpp's file, the tokenizer
    copied from its GGUF teacher), a list of them (each must succeed), or ``('none',)``.
    """

    entropy_coding: bool = False
    formats: tuple = schema.items((), schema.Choice(EXPORT_FORMATS + ("none",),
                                                    noun="an export format"))

    def check(self) -> None:
        if "none" in self.formats and len(self.formats) > 1:
            raise FieldError("formats", f"={list(self.formats)}: 'none' goes alone")


MESH_AXES = ("data", "fsdp", "tensor")
# Logical axes of the parameters (jaxkd.models.axes) -> mesh axes: FSDP splits a kernel's
# input channels, tensor parallelism its outputs and attention heads.
LOGICAL_AXES = {"batch": ["data", "fsdp"], "embed": "fsdp", "mlp": "tensor",
                "vocab": "tensor", "heads": "tensor", "kv": None}
_MESH_RULE = schema.Keys((("params", schema.Regex()),
                          ("spec", schema.Items(schema.Maybe(schema.Choice(MESH_AXES))))))


@dataclasses.dataclass(frozen=True)
class Mesh(Block):
    """``config.mesh`` (:mod:`jaxkd.partitioning`): the device mesh and the layout on it.

    Fields:
      data, fsdp, tensor: the sizes of the mesh axes; ``-1`` (at most one) takes the
        devices left. The batch is split over data x fsdp, the weights over fsdp (FSDP)
        and tensor (tensor parallelism). The default is pure data parallelism.
      logical: logical axis of a parameter dimension (``embed``, ``mlp``, ``vocab``,
        ``heads``, ``kv``; :mod:`jaxkd.models.axes`) -> a mesh axis, a list of them, or
        None (replicated).
      rules: ``{'params': regex, 'spec': [mesh axis or None per dimension]}`` for whole
        parameters, before the logical table; each must match a parameter of the student.
    """

    data: int = schema.integer(-1, minimum=-1)
    fsdp: int = schema.integer(1, minimum=-1)
    tensor: int = schema.integer(1, minimum=-1)
    logical: dict = schema.free(LOGICAL_AXES)
    rules: tuple = schema.items((), _MESH_RULE)

    def check(self) -> None:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for axis, size in sizes.items():
            if size == 0:
                raise FieldError(axis, "=0 must be a positive size or -1 (the devices left)")
        if list(sizes.values()).count(-1) > 1:
            raise FieldError("data", f": at most one axis may be -1, got {sizes}")
        for name, target in self.logical.items():
            for axis in [target] if isinstance(target, str) or target is None else target:
                if axis is not None and axis not in MESH_AXES:
                    raise FieldError(f"logical.{name}", f"={target!r} is not a mesh axis; "
                                                        f"allowed: {', '.join(MESH_AXES)}, None")


PRECISIONS = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("", "full", "dots", "dots_no_batch")


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass(frozen=True)
class Run(Block):
    """A whole run: the blocks above and the loop's own fields.

    Fields of the loop: ``seed``; ``batch_size`` (global, over every device and process)
    and ``eval_batch_size``; ``num_steps`` (> 0 wins over ``num_epochs``); how often to
    log, evaluate and checkpoint; ``max_to_keep`` checkpoints; and
    ``skip_nonfinite_steps``: steps with a non-finite loss or gradient are never applied,
    and more than this many stop the run with an error naming the first.

    Scale: ``mesh`` (:class:`Mesh`); ``dtype``, the precision of activations and matmuls
    of the student and teachers, and ``param_dtype``, of the stored weights (float32
    master weights; losses and the softmax of logits are always float32); ``remat``, a
    ``jax.checkpoint`` policy for the student's blocks ('' = off, 'full' saves nothing,
    'dots' / 'dots_no_batch' save matmul outputs); ``grad_accum_steps`` = k: the optimizer
    (``optax.MultiSteps``) applies the mean gradient of k consecutive steps, so k steps of
    ``batch_size`` make the update of one batch k times larger; ``num_steps`` still counts
    steps (micro-batches), and every schedule counts updates.
    """

    seed: int = schema.integer(0, minimum=0)
    data: Data = schema.nested(Data)
    model: Model = schema.nested(Model)
    batch_size: int = 128
    eval_batch_size: int = 1000
    num_steps: int = schema.integer(0, minimum=0)
    num_epochs: float = schema.number(10.0, lo=0.0)
    optimizer: Optimizer = schema.nested(Optimizer)
    schedule: Schedule = schema.nested(Schedule)
    distill: Distill = schema.nested(Distill)
    init: Init = schema.nested(Init)
    quantization: Quantization = schema.nested(Quantization)
    gguf_quantization: GgufQuantization = schema.nested(GgufQuantization)
    pruning: Pruning = schema.nested(Pruning)
    clustering: Clustering = schema.nested(Clustering)
    merging: Merging = schema.nested(Merging)
    compression: Compression = schema.nested(Compression)
    export: Export = schema.nested(Export)
    mesh: Mesh = schema.nested(Mesh)
    dtype: str = schema.choice("float32", PRECISIONS, noun="a precision")
    param_dtype: str = schema.choice("float32", PRECISIONS, noun="a precision")
    remat: str = schema.choice("", REMAT_POLICIES, noun="a remat policy")
    grad_accum_steps: int = schema.integer(1, minimum=1)
    log_every_steps: int = schema.integer(100, minimum=1)
    eval_every_steps: int = schema.integer(1000, minimum=1)
    checkpoint_every_steps: int = schema.integer(1000, minimum=1)
    max_to_keep: int = schema.integer(3, minimum=1)
    skip_nonfinite_steps: int = schema.integer(0, minimum=0)


def run_config(dataset: str, model: str, **model_kwargs: Any) -> ml_collections.ConfigDict:
    """Every field of a single training run, with defaults; configs override what they need."""
    c = schema.defaults(Run)
    c.data = data_config(dataset)
    c.model = ml_collections.ConfigDict({"name": model, "kwargs": dict(model_kwargs)})
    c.distill.losses = supervised_losses()
    return c


def parse_run(config: ml_collections.ConfigDict | Mapping[str, Any] | Run) -> Run:
    """The typed blocks of a run config, every field checked (one line naming it)."""
    return schema.parse(Run, config, "config")


def validation(c: ml_collections.ConfigDict, fraction: float = 0.1) -> ml_collections.ConfigDict:
    """``c`` (a run, or every stage of a chain) trained on the first ``1 - fraction`` of its
    train split and evaluated on the rest: the validation split, carved deterministically
    (tfds slices ``train[:90%]`` / ``train[90%:]``, or the dataset's own
    ``validation_examples``: ``train[:-10000]`` / ``train[-10000:]`` for MNIST), on which
    hyper-parameters are chosen before the test split is read once."""
    runs = [c.stages[name] for name in c.stage_order] if "stages" in c else [c]
    for run in runs:
        base = run.data.train_split.split("[", 1)[0]
        dataset = datasets.get(run.data.name)
        if dataset.validation_split:  # a split of its own
            run.data.eval_split = dataset.validation_split
            continue
        held_out = dataset.validation_examples
        cut = f"-{held_out}" if held_out else f"{round(100 * (1 - fraction))}%"
        run.data.train_split, run.data.eval_split = f"{base}[:{cut}]", f"{base}[{cut}:]"
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
        run.eval_batch_size = 256  # the whole test split still, in few batches
        run.log_every_steps = 1
        run.eval_every_steps = steps
        run.checkpoint_every_steps = steps
        if run.get("pruning") is not None and run.pruning.end_step >= steps:
            run.pruning.end_step = -1  # the ramp must end inside the shortened run
        if run.get("compression") is not None and run.compression.num_steps:
            run.compression.num_steps = (steps,) * len(run.compression.num_steps)
    return c


def parse_arg(arg: str | None, **declared: Any) -> dict[str, Any]:
    """The ``configs/x.py:ARG`` string as the config's declared args.

    ``declared`` names every arg the config takes with its default, whose type the value
    takes: a bool arg is a flag (``:smoke``, or ``:smoke=false``), others need a value
    (``:model=mlp``, ``:stages=prune+quantize``). ``parse_arg('smoke,model=mlp',
    smoke=False, model='cnn1d')`` -> ``{'smoke': True, 'model': 'mlp'}``; an arg the config
    does not declare, or a value of the wrong type, is a :class:`ConfigError`.
    """
    out = dict(declared)
    allowed = ", ".join(f"{k}" if isinstance(v, bool) else f"{k}=..." for k, v in
                        declared.items()) or "none"
    for token in (arg or "").split(","):
        token = token.strip()
        if not token:
            continue
        key, eq, value = (t.strip() for t in token.partition("="))
        if key not in declared:
            near = difflib.get_close_matches(key, list(declared), n=1)
            raise ConfigError(f"unknown config arg {key!r}"
                              + (f" (did you mean {near[0]!r}?)" if near else "")
                              + f"; this config takes: {allowed}")
        default = declared[key]
        if isinstance(default, bool):
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"config arg {key}={value!r} must be true or false")
            out[key] = not eq or value.lower() in ("true", "1")
        elif not eq or not value:
            raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
        else:
            try:
                out[key] = type(default)(value) if default is not None else value
            except ValueError:
                raise ConfigError(f"config arg {key}={value!r} must be a "
                                  f"{type(default).__name__}") from None
    return out
