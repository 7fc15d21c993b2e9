"""The trainer: one jitted, data-parallel step for every mode, read top to bottom.

``train_and_evaluate(config, workdir)`` builds the data, the student (and the teacher when
``config.distill.teacher.workdir`` is set), the objective and the optimizer, then loops::

    state, metrics = train_step(state, batch, teacher_variables)

``train_step`` is a pure function, compiled once with ``donate_argnums=(0,)``: the batch is
sharded over the ``data`` axis of a mesh of every device and the state is replicated, so
XLA inserts the gradient all-reduce. A teacher runs inside the same step, in inference
mode and under ``stop_gradient``, on the same (augmented) batch as the student: the
"consistent teaching" of Beyer et al. 2022.

The run resumes from the newest Orbax checkpoint in ``workdir``. Because the batch at step
``k`` and the dropout key of step ``k`` are pure functions of (config, seed, k), a resumed
run ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxkd
from jaxkd import (
    checkpoint,
    export,
    losses,
    metrics,
    models,
    objective,
    optim,
    preemption,
    pruning,
    quant,
    sharing,
    student_init,
)
from jaxkd.data import pipeline


@struct.dataclass
class TrainState:
    """Everything a run needs to continue: one pytree, saved and restored whole."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # the student's parameters
    batch_stats: Any  # BatchNorm running statistics ({} when the model has none)
    adapters: Any  # trainable feature-KD adapters (FitNets regressors), not part of the model
    opt_state: optax.OptState  # over {'model': params, 'adapters': adapters}
    rng: jax.Array  # base PRNG key; step k uses fold_in(rng, k)
    # Steps whose loss or gradients were not finite (their updates were not applied), and
    # the first of them: its index and which metric (1 = loss, 2 = gradients).
    nonfinite_steps: jax.Array
    first_nonfinite: jax.Array  # int32 [2]: (step, metric); (-1, 0) when none


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its model and variables, read from a finished run's checkpoint."""

    workdir: str
    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    weight: float = 1.0

    @property
    def num_classes(self) -> int:
        return int(self.variables["params"]["head"]["bias"].shape[-1])


def model_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def init_state(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
               seed: int, init_adapters: Callable[[jax.Array], Any] | None = None
               ) -> TrainState:
    """A fresh state: parameters drawn from ``seed``, optimizer state at step 0."""
    rng = jax.random.PRNGKey(seed)
    init_rng, params_rng, dropout_rng, adapters_rng = jax.random.split(rng, 4)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
    params = variables["params"]
    adapters = init_adapters(adapters_rng) if init_adapters else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), adapters=adapters,
                      opt_state=tx.init({"model": params, "adapters": adapters}), rng=init_rng,
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      first_nonfinite=jnp.array([-1, 0], jnp.int32))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    objective_fn: Callable,
    teacher_models: Sequence[nn.Module] = (),
    *,
    student_apply: Callable[..., Any] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure ``train_step(state, batch, teacher_variables) -> (state, metrics)``.

    ``teacher_variables`` is a list, one entry per model of ``teacher_models`` (empty for
    supervised training or precomputed teacher logits); ``objective_fn`` is built by
    :func:`jaxkd.objective.build_objective`.

    ``student_apply`` replaces ``model.apply`` for the student's forward pass (same
    signature); compression methods use it to run the student on transformed weights or
    with intercepted layers (e.g. quantization-aware training).
    """
    apply = student_apply or model.apply

    def train_step(state, batch, teacher_variables):
        images, labels = batch["image"], batch["label"]
        teacher_outs = [
            jax.lax.stop_gradient(m.apply(v, images, train=False, return_features=True))
            for m, v in zip(teacher_models, teacher_variables or (), strict=True)
        ]
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(trainable):
            (logits, features), updates = apply(
                model_variables(trainable["model"], state.batch_stats), images, train=True,
                return_features=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng},
            )
            loss, values = objective_fn(trainable["adapters"], (logits, features), teacher_outs,
                                        batch, state.step)
            return loss, (logits, updates.get("batch_stats", {}), values)

        trainable = {"model": state.params, "adapters": state.adapters}
        (loss, (logits, batch_stats, values)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        new_state = state.replace(params=trainable["model"], adapters=trainable["adapters"],
                                  batch_stats=batch_stats, opt_state=opt_state)
        # A step with a non-finite loss or gradient is not applied (optax.apply_if_finite);
        # the host stops the run, or skips up to config.skip_nonfinite_steps such steps.
        grad_norm = optax.tree.norm(grads)
        loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
        ok = loss_ok & grads_ok
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        first_bad = jnp.where(
            (state.first_nonfinite[0] < 0) & ~ok,
            jnp.stack([state.step, jnp.where(loss_ok, 2, 1)]), state.first_nonfinite)
        new_state = new_state.replace(step=state.step + 1, first_nonfinite=first_bad,
                                      nonfinite_steps=state.nonfinite_steps + (~ok).astype(
                                          jnp.int32))
        labelled = (labels >= 0).astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * labelled
        step_metrics = {"loss_sum": loss, "loss_count": jnp.ones(()),
                        "accuracy_sum": correct.sum(), "accuracy_count": labelled.sum(),
                        "grad_norm_sum": grad_norm, "grad_norm_count": jnp.ones(())}
        for label, value in values.items():
            step_metrics[f"loss_{label}_sum"] = value
            step_metrics[f"loss_{label}_count"] = jnp.ones(())
        return new_state, step_metrics

    return train_step


def make_eval_step(model: nn.Module, apply: Callable[..., Any] | None = None
                   ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
    """Returns ``eval_step(variables, batch) -> (sum, count) metrics`` honouring ``mask``.

    ``apply`` replaces ``model.apply`` (e.g. the fake-quantized forward of QAT).
    """
    apply = apply or model.apply

    def eval_step(variables, batch):
        logits = apply(variables, batch["image"], train=False)
        mask = batch["mask"]
        ce = losses.cross_entropy(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss_sum": (ce * mask).sum(), "loss_count": mask.sum(),
                "accuracy_sum": (correct * mask).sum(), "accuracy_count": mask.sum()}

    return eval_step


def evaluate(eval_step: Callable, variables: Any, config: ml_collections.ConfigDict,
             sharding: NamedSharding) -> dict[str, float]:
    """Accuracy and cross-entropy over the whole ``config.data.eval_split``."""
    batches = pipeline.eval_batches(
        config.data, split=config.data.eval_split, batch_size=config.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    sums = [eval_step(variables, _to_global(b, sharding)) for b in batches]
    return metrics.mean_of(metrics.sum_pairs(jax.device_get(sums)))


def _to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local rows -> one global array per field, sharded over the ``data`` axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_prefetch(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding,
                    size: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Moves batches to the devices from a background thread, ``size`` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def producer():
        try:
            for batch in batches:
                item = _to_global(batch, sharding)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def load_teacher(workdir: str, *, sharding: NamedSharding, weight: float = 1.0,
                 field: str = "config.distill.teacher.workdir") -> Teacher:
    """Reads a finished run's model variables from its newest Orbax checkpoint.

    Only ``params`` and ``batch_stats`` are read (a partial restore); the teacher's
    checkpoint is never written to.
    """
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{field}={workdir!r} does not exist")
    config = checkpoint.read_config(workdir)
    step = checkpoint.latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"{field}={workdir!r} has no checkpoint: train the teacher first")
    spec = checkpoint.read_json(os.path.join(workdir, checkpoint.MODEL_FILE))
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"])
    abstract = jax.eval_shape(lambda: dict(model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *spec["input_shape"]), jnp.float32), train=False)))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    variables = checkpoint.restore_variables(workdir, step, abstract, field=field)
    return Teacher(workdir=workdir, model=model, config=config, variables=variables,
                   weight=weight)


def load_teachers(config: ml_collections.ConfigDict, *, sharding: NamedSharding
                  ) -> list[Teacher]:
    """The teachers of ``config.distill``: ``teachers`` (a list) or ``teacher.workdir``."""
    distill = config.distill
    if distill.get("teachers"):
        return [load_teacher(t["workdir"], sharding=sharding, weight=float(t.get("weight", 1.0)),
                             field=f"config.distill.teachers[{i}].workdir")
                for i, t in enumerate(distill.teachers)]
    if distill.teacher.workdir:
        return [load_teacher(distill.teacher.workdir, sharding=sharding)]
    return []


def output_shapes(model: nn.Module, teachers: Sequence[Teacher], input_shape: tuple[int, ...]
                  ) -> tuple[Any, list[Any]]:
    """(logits, features) ShapeDtypeStructs of the student and of each teacher."""
    x = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    student = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, return_features=True), variables, x)
    return student, [jax.eval_shape(
        lambda v, x, m=t.model: m.apply(v, x, train=False, return_features=True),
        t.variables, x) for t in teachers]


def check_precomputed(config: ml_collections.ConfigDict, terms: Sequence[objective.Term],
                      info: pipeline.DatasetInfo) -> None:
    """The logits file must match the data; with top-k < C only top-k terms can use it."""
    from jaxkd import teacher_logits

    manifest = teacher_logits.check(
        config.distill.teacher_logits, config.data,
        allow_augment=bool(config.distill.get("allow_augment_with_precomputed", False)))
    k = int(manifest["k"]) or info.num_classes
    for term in terms:
        if term.kind in ("features", "batch"):
            raise ValueError(f"config.distill.losses.{term.label} ({term.name}) needs teacher "
                             "features, which precomputed logits do not have")
        if k < info.num_classes and term.kind in ("logits", "logits_labels"):
            raise ValueError(
                f"config.distill.losses.{term.label} ({term.name}) needs all "
                f"{info.num_classes} teacher logits but {config.distill.teacher_logits} "
                f"stores the top {k}; use topk_soft_target_kl")


def init_from_teacher(config: ml_collections.ConfigDict, model: nn.Module,
                      tx: optax.GradientTransformation, state: TrainState,
                      teachers: Sequence[Teacher], sharding: NamedSharding) -> TrainState:
    """A fresh state whose student weights come from a teacher (``config.init``)."""
    init = config.init
    if init.teacher_workdir:
        source = load_teacher(init.teacher_workdir, sharding=sharding,
                              field="config.init.teacher_workdir")
    elif teachers:
        source = teachers[0]
    else:
        raise ValueError(f"config.init.method={init.method!r} needs a teacher: set "
                         "config.init.teacher_workdir or config.distill.teacher.workdir")
    images = None
    if init.method == "prune_width":  # the same batch in every process
        images = next(pipeline.train_batches(config.data, batch_size=init.calibration_examples,
                                             seed=config.seed))["image"]
    variables = student_init.init_from_teacher(
        init, teacher_model=source.model, teacher_variables=source.variables,
        student_model=model, student_variables=model_variables(state.params, state.batch_stats),
        calibration_images=images)
    return start_from(state, variables, tx, sharding)


def start_from(state: TrainState, variables: dict[str, Any], tx: optax.GradientTransformation,
               sharding: NamedSharding) -> TrainState:
    """``state`` with the model ``variables`` put on the devices and a fresh optimizer
    state for them (masks and codebooks are computed from these weights)."""
    variables = jax.device_put(variables, sharding)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = jax.jit(tx.init, out_shardings=sharding)(
        {"model": params, "adapters": state.adapters})
    return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)


def method_name(config: ml_collections.ConfigDict, *, distilled: bool) -> str:
    """A short name of what the run did, for reports: e.g. ``qat-w4a8+kd`` or
    ``magnitude-90%>cluster16>qat-w8+kd``."""
    parts = []
    pc = config.pruning
    if pc.enabled:
        if pc.pattern == "n:m":
            parts.append(f"{pc.method}-{pc.n}:{pc.m}")
        else:
            structured = "channels-" if pc.pattern == "channels" else ""
            parts.append(f"{pc.method}-{structured}{round(100 * pc.sparsity)}%")
    if config.clustering.enabled:
        parts.append(f"cluster{config.clustering.num_clusters}")
    if config.merging.enabled:
        parts.append(f"merge-{config.merging.metric}{config.merging.threshold:g}"
                     f"{'-then-train' if config.merging.at == 'start' else ''}")
    kwargs = config.model.get("kwargs", {})
    if kwargs.get("tie_hidden") or kwargs.get("tie_convs"):
        parts.append("tied")
    qc = config.quantization
    if qc.enabled:
        parts.append(f"{'qat' if qc.qat else 'ptq'}-w{qc.weight_bits}"
                     f"{f'a{qc.activation_bits}' if qc.activation_bits else ''}"
                     f"{'-lsq' if qc.method == 'lsq' else ''}")
    return ">".join(parts or ["fp32"]) + ("+kd" if distilled else "")


def _with_widths(config: ml_collections.ConfigDict, kwargs: dict[str, Any], params: Any
                 ) -> dict[str, Any]:
    """``kwargs`` with the hidden widths (``mlp``) or channels (``cnn1d``) of ``params``."""
    chain = pruning.shrinkable_layers(params)
    widths = tuple(int(np.shape(params[p]["kernel"])[-1]) for p in chain)
    return {**kwargs, ("channels" if config.model.name == "cnn1d" else "widths"): widths}


def _prunes_channels(config: ml_collections.ConfigDict) -> bool:
    return bool(config.pruning.enabled) and config.pruning.pattern == "channels"


def shrink_for_export(config: ml_collections.ConfigDict, params: Any, opt_state: Any,
                      kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The parameters and model kwargs of the physically smaller model that the artifact
    holds: channels removed by ``config.pruning.pattern='channels'`` (``shrink_channels``)
    and neurons merged by ``config.merging`` at export (``merge_layers``). Unchanged
    otherwise. ``kwargs``: the trained model's."""
    shrink = _prunes_channels(config)
    merge = config.merging.enabled and config.merging.at == "export"
    if not shrink and not merge:
        return params, kwargs
    params = jax.device_get(params)
    if shrink:
        params, _ = pruning.shrink_channels(params, pruning.get_masks(opt_state))
    if merge:
        params, _, _ = sharing.merge_layers(params, config.merging)
    return params, _with_widths(config, kwargs, params)


def merge_at_start(config: ml_collections.ConfigDict, sharding: NamedSharding
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``config.merging.at='start'``: the variables that ``config.init`` copies, with their
    similar neurons merged, and the model kwargs of that smaller model."""
    init = config.init
    if init.method != "copy":
        raise ValueError("config.merging.at='start' merges the weights that config.init "
                         f"copies: set config.init.method='copy' (got {init.method!r})")
    workdir = init.teacher_workdir or config.distill.teacher.workdir
    if not workdir:
        raise ValueError("config.merging.at='start' needs config.init.teacher_workdir")
    source = load_teacher(workdir, sharding=sharding, field="config.init.teacher_workdir")
    params, _, _ = sharing.merge_layers(jax.device_get(source.variables["params"]),
                                        config.merging)
    kwargs = _with_widths(config, config.model.get("kwargs", {}).to_dict(), params)
    variables = {**jax.device_get(source.variables), "params": params}
    return variables, kwargs


def check_shrink(config: ml_collections.ConfigDict) -> None:
    """Physical shrinking (channel pruning, merging) needs an untied mlp or cnn1d."""
    shrink = _prunes_channels(config)
    if not (shrink or config.merging.enabled):
        return
    field = "config.merging.enabled" if config.merging.enabled else "config.pruning.pattern"
    kwargs = config.model.get("kwargs", {})
    if config.model.name not in ("mlp", "cnn1d"):
        raise ValueError(f"{field}: physically shrinking layers supports the mlp and cnn1d "
                         f"models, not config.model.name={config.model.name!r}")
    if kwargs.get("tie_hidden") or kwargs.get("tie_convs"):
        raise ValueError(f"{field}: tied layers (config.model.kwargs.tie_*) cannot shrink "
                         "one at a time")
    if config.quantization.enabled and config.quantization.method == "lsq":
        raise ValueError(f"{field} with config.quantization.method='lsq' is not supported "
                         "(the learned per-channel steps would need shrinking too)")


def export_artifact(config: ml_collections.ConfigDict, model: nn.Module,
                    info: pipeline.DatasetInfo, state: TrainState, workdir: str,
                    extra_metrics: dict[str, Any], model_kwargs: dict[str, Any]
                    ) -> dict[str, Any]:
    """Exports ``workdir/artifact`` and evaluates it as loaded from disk.

    With ``config.quantization.enabled`` the activations are calibrated first and the
    artifact holds integer weights, evaluated on the integer path (int8 x int8 -> int32).
    """
    qc = config.quantization
    params, kwargs = shrink_for_export(config, quant.strip_steps(state.params), state.opt_state,
                                       model_kwargs)
    if kwargs != model_kwargs:
        model = models.get_model(config.model.name, num_classes=info.num_classes, **kwargs)
    variables = model_variables(params, state.batch_stats)
    ranges = None
    if qc.enabled:
        if qc.method == "lsq":  # the learned step sizes are part of the quantized model
            variables = model_variables(state.params, state.batch_stats)
        calibration = itertools.islice(
            pipeline.train_batches(config.data, batch_size=config.batch_size, seed=config.seed),
            qc.calibration_batches)
        ranges = quant.calibrate(model, variables, calibration, method=qc.calibration,
                                 percentile=qc.percentile)
    directory = os.path.join(workdir, ARTIFACT_DIR)
    if jax.process_index() == 0:
        export.export(directory, config.model.name, kwargs, info.num_classes, variables,
                      qc if qc.enabled else None, ranges,
                      extra_metrics, input_shape=info.input_shape, overwrite=True,
                      entropy_coding=bool(config.export.entropy_coding))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxkd export")
    predict, manifest = export.load(directory)
    artifact_eval = export.evaluate(predict, pipeline.eval_batches(
        config.data, split=config.data.eval_split, batch_size=config.eval_batch_size))
    return {"artifact_eval": artifact_eval, "artifact_bytes": export.artifact_bytes(directory),
            "artifact_num_params": models.count_params(params),
            "storage": export.storage_report(manifest),
            "artifact_model_kwargs": kwargs,
            "eval_latency_ms": artifact_eval.get("eval_latency_ms")}


ARTIFACT_DIR = "artifact"


class NonFiniteError(ValueError):
    """The loss or the gradients stopped being finite."""


def check_finite(state: TrainState, allowed: int, manager: Any, workdir: str) -> None:
    """Stops the run once more than ``allowed`` steps had a non-finite loss or gradient."""
    count, (first_step, metric) = jax.device_get((state.nonfinite_steps, state.first_nonfinite))
    if int(count) > allowed:
        checkpoint.finish(manager)
        what = "loss" if int(metric) == 1 else "gradient norm"
        raise NonFiniteError(
            f"the {what} was not finite at step {int(first_step) + 1} ({int(count)} such "
            f"steps, config.skip_nonfinite_steps={allowed}); the last good checkpoint is step "
            f"{manager.latest_step()} in {workdir}")


def num_train_examples(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo) -> int:
    n = info.num_examples[config.data.train_split]
    if config.data.get("transfer_split"):
        n += info.num_examples[config.data.transfer_split]
    return n


def schedule_lengths(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo
                     ) -> tuple[int, int]:
    """(total steps, steps per epoch); ``num_steps`` wins over ``num_epochs`` when > 0."""
    steps_per_epoch = max(num_train_examples(config, info) // config.batch_size, 1)
    if config.get("num_steps", 0) > 0:
        return int(config.num_steps), steps_per_epoch
    return int(round(config.num_epochs * steps_per_epoch)), steps_per_epoch


def build_optimizer(config: ml_collections.ConfigDict, info: pipeline.DatasetInfo
                    ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    num_steps, steps_per_epoch = schedule_lengths(config, info)
    lr = optim.learning_rate_schedule(config.schedule, peak=config.optimizer.learning_rate,
                                      num_steps=num_steps, steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config.optimizer, lr)
    if config.clustering.enabled:  # the optimizer trains the centroids
        tx = sharing.cluster(tx, config.clustering, params_key="model")
    if config.pruning.enabled:  # outermost: it needs the raw gradients (Taylor, Fisher, SNIP)
        tx = pruning.masked(tx, config.pruning, total_steps=num_steps, params_key="model")
    return lr, tx


def _check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if size <= 0 or size % jax.device_count():
            raise ValueError(
                f"config.{field}={size} must be a positive multiple of the device count "
                f"({jax.device_count()})"
            )


def _check_workdir(workdir: str, config: ml_collections.ConfigDict,
                   allow_config_change: bool) -> None:
    """The workdir must be writable, and not hold another config's checkpoints."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".jaxkd-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--workdir={workdir!r} is not writable ({e.strerror})") from None
    if allow_config_change or checkpoint.latest_step(workdir) is None:
        return
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        return
    before = _flatten(checkpoint.read_config(workdir).to_dict())
    now = _flatten(ml_collections.ConfigDict(config.to_dict()).to_dict())
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not k.startswith(RESULT_NEUTRAL_FIELDS)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        raise ValueError(
            f"--workdir={workdir!r} holds checkpoints of a run with another config ({shown}"
            f"{'; ...' if len(changed) > 5 else ''}); use another workdir, or pass "
            "--allow_config_change to continue it with the new config")


# Fields that change what is logged or kept, not the result: may change on relaunch.
RESULT_NEUTRAL_FIELDS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                         "max_to_keep", "data.data_dir", "eval_batch_size")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, tuple | list):
        tree = [_flatten(v) if isinstance(v, dict) else v for v in tree]
    return {prefix[:-1]: tree}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``config`` in ``workdir``; returns its summary.

    Everything the config names is checked before anything is compiled; a ``workdir`` that
    holds checkpoints of a different config is refused unless ``allow_config_change``.
    """
    if config.get("compression") is not None and config.compression.stages:
        raise ValueError(f"config.compression.stages={list(config.compression.stages)} makes "
                         "this a pipeline of runs: use jaxkd.compression.run_pipeline "
                         "(launch.py does)")
    _check_batch_sizes(config)
    _check_workdir(workdir, config, allow_config_change)
    info = pipeline.get_info(config.data)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    check_shrink(config)
    model_kwargs = config.model.get("kwargs", {}).to_dict()
    start_variables = None
    if config.merging.enabled and config.merging.at == "start":  # merge, then train
        start_variables, model_kwargs = merge_at_start(config, replicated)
    model = models.get_model(config.model.name, num_classes=info.num_classes, **model_kwargs)
    qc = config.quantization
    if qc.enabled:
        quant.settings(qc)  # one-line errors naming config.quantization.<field>
    student_apply = quant.qat_apply(model, qc) if qc.enabled and qc.qat else None
    teachers = load_teachers(config, sharding=replicated)
    for t in teachers:
        teacher_classes = t.num_classes
        if teacher_classes != info.num_classes:
            raise ValueError(
                f"the teacher at {t.workdir!r} predicts {teacher_classes} classes but "
                f"config.data.name={config.data.name!r} has {info.num_classes}")
    precomputed = config.distill.get("teacher_logits", "")
    if precomputed and teachers:
        raise ValueError("config.distill.teacher_logits and a teacher model are both set; "
                         "use one of them")
    terms = objective.parse_terms(config.distill.losses,
                                  has_teacher=bool(teachers) or bool(precomputed))
    student_out, teacher_outs = output_shapes(model, teachers, info.input_shape)
    objective.check_features(terms, student_out, teacher_outs)
    if precomputed:
        check_precomputed(config, terms, info)
    num_steps, _ = schedule_lengths(config, info)
    if num_steps <= 0:
        raise ValueError(f"config.num_steps={config.get('num_steps')} and config.num_epochs="
                         f"{config.get('num_epochs')} give no training step")
    objective_fn = objective.build_objective(
        terms, num_steps=num_steps, teacher_weights=[t.weight for t in teachers] or (1.0,),
        ensemble=config.distill.get("ensemble", "sum_losses"))
    lr, tx = build_optimizer(config, info)

    if config.pruning.enabled:  # one-line errors naming config.pruning.<field>
        abstract_params = jax.eval_shape(lambda: model.init(
            jax.random.PRNGKey(0), jnp.zeros((1, *info.input_shape), jnp.float32)))["params"]
        pruning.validate(config.pruning, abstract_params, total_steps=num_steps)

    def init_adapters(rng):
        return objective.init_adapters(terms, student_out, teacher_outs, rng)

    state = jax.jit(lambda: init_state(model, tx, info.input_shape, config.seed, init_adapters),
                    out_shardings=replicated)()
    if qc.enabled:
        quant.validate(qc, state.params)  # e.g. a layer regex that matches nothing
    if student_apply is not None and qc.method == "lsq":  # learned step sizes join the params
        sample = next(pipeline.train_batches(config.data, batch_size=config.batch_size,
                                             seed=config.seed))["image"]
        params = jax.device_put(quant.init_qat_params(
            model, model_variables(state.params, state.batch_stats), sample, qc), replicated)
        state = state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=replicated)(
            {"model": params, "adapters": state.adapters}))
    abstract_state = checkpoint.abstract_like(state)
    initialised = False
    if start_variables is not None and checkpoint.latest_step(workdir) is None:
        state = start_from(state, start_variables, tx, replicated)
        initialised = True
    elif config.init.method and checkpoint.latest_step(workdir) is None:
        # A fresh run only (a resumed one has its own weights); before any file is written.
        state = init_from_teacher(config, model, tx, state, teachers, replicated)
        initialised = True
    manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep)
    restored, start_step = checkpoint.restore_latest(manager, workdir, abstract_state)
    if restored is not None:
        state = restored
        print(f"Resuming from the checkpoint at step {start_step} in {workdir}", flush=True)
    elif start_variables is not None and not initialised:  # every checkpoint was unusable
        state = start_from(state, start_variables, tx, replicated)
    elif config.init.method and not initialised:
        state = init_from_teacher(config, model, tx, state, teachers, replicated)
    if restored is None and config.clustering.enabled:
        # Snap each clustered kernel to its codebook once; updates keep it clustered.
        clusters = sharing.find_cluster_state(state.opt_state)
        state = state.replace(params=jax.jit(sharing.materialize, out_shardings=replicated)(
            state.params, clusters.codebooks, clusters.assignments))
    if jax.process_index() == 0:
        checkpoint.write_json(os.path.join(workdir, checkpoint.MODEL_FILE), {
            "name": config.model.name, "kwargs": model_kwargs,
            "num_classes": info.num_classes, "input_shape": list(info.input_shape)})
        checkpoint.write_config(workdir, config)

    train_step = jax.jit(make_train_step(model, tx, objective_fn, [t.model for t in teachers],
                                         student_apply=student_apply),
                         donate_argnums=(0,), out_shardings=(replicated, replicated))
    eval_step = jax.jit(make_eval_step(model, student_apply))
    teacher_variables = [t.variables for t in teachers]

    writer = metrics.MetricWriter(workdir, total_steps=num_steps)
    summary: dict[str, Any] = {}
    for i, t in enumerate(teachers):
        teacher_eval = evaluate(jax.jit(make_eval_step(t.model)), t.variables, config,
                                data_sharding)
        summary["teacher" if i == 0 else f"teacher_{i}"] = {
            "workdir": t.workdir, "eval": teacher_eval, "model": t.config.model.name,
            "num_params": models.count_params(t.variables["params"])}
        print(f"teacher {t.workdir} eval accuracy {teacher_eval['accuracy']:.4f}", flush=True)

    stream_kwargs = {"teacher_logits": precomputed} if precomputed else {}
    batches = device_prefetch(
        pipeline.train_batches(config.data, batch_size=config.batch_size, seed=config.seed,
                               start_step=start_step, process_index=jax.process_index(),
                               process_count=jax.process_count(), **stream_kwargs),
        data_sharding,
    )
    window: list[dict[str, jax.Array]] = []
    timed_steps, timed_start = 0, None
    step = start_step
    allowed_nonfinite = int(config.get("skip_nonfinite_steps", 0))
    try:
        with preemption.StopSignal() as stop:
            while step < num_steps:
                state, step_metrics = train_step(state, next(batches), teacher_variables)
                step += 1
                window.append(step_metrics)
                if timed_start is None:  # the first step of a process compiles: not timed.
                    jax.block_until_ready(state)
                    timed_start = time.perf_counter()
                else:
                    timed_steps += 1
                at_log = step % config.log_every_steps == 0 or step == num_steps
                at_checkpoint = step % config.checkpoint_every_steps == 0 or step == num_steps
                if at_log:
                    train_means = metrics.mean_of(metrics.sum_pairs(jax.device_get(window)))
                    train_means["learning_rate"] = float(lr(step - 1))
                    window = []
                    writer.write(step, "train", train_means)
                    writer.progress(step, {"loss": train_means["loss"],
                                           "acc": train_means["accuracy"]})
                if at_log or at_checkpoint:
                    check_finite(state, allowed_nonfinite, manager, workdir)
                if step % config.eval_every_steps == 0 and step != num_steps:
                    eval_means = evaluate(eval_step, model_variables(state.params,
                                                                     state.batch_stats),
                                          config, data_sharding)
                    writer.write(step, "eval", eval_means)
                signum = stop.requested(sync=at_log)
                if at_checkpoint or signum:
                    checkpoint.save(manager, step, state)
                if signum:
                    checkpoint.finish(manager)
                    raise preemption.Preempted(step, signum, workdir)
    finally:
        batches.close()  # stops and joins the prefetch thread
        checkpoint.finish(manager)
        manager.close()
        writer.close()
    jax.block_until_ready(state)
    train_time = time.perf_counter() - timed_start if timed_start else 0.0

    final_eval = evaluate(eval_step, model_variables(state.params, state.batch_stats), config,
                          data_sharding)
    metrics.append_jsonl(workdir, {"step": num_steps,
                                   **{f"eval/{k}": v for k, v in final_eval.items()}})
    weights_bytes = checkpoint.save_weights(
        workdir, model_variables(state.params, state.batch_stats)
    )
    summary["method"] = method_name(config, distilled=bool(teachers or precomputed))
    # The accuracy reported is that of the exported artifact, as loaded back from disk.
    summary.update(export_artifact(config, model, info, state, workdir,
                                   {"train_eval": final_eval}, model_kwargs))
    summary.update({
        "jaxkd_version": jaxkd.__version__,
        "model": config.model.name,
        "dataset": config.data.name,
        "eval": final_eval,
        "accuracy": summary.get("artifact_eval", final_eval)["accuracy"],
        "num_params": models.count_params(quant.strip_steps(state.params)),
        "sparsity": pruning.sparsity_report(quant.strip_steps(state.params)),
        "unique_values": sharing.unique_values(quant.strip_steps(state.params)),
        "params_bytes": weights_bytes,
        "num_steps": num_steps,
        "train_steps_per_sec": timed_steps / train_time if train_time else None,
        "train_examples_per_sec": timed_steps * config.batch_size / train_time
        if train_time else None,
        "resumed_from_step": start_step,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "platform": jax.devices()[0].platform,
        "config": config.to_dict(),
    })
    metrics.write_summary(workdir, summary)
    print(f"final eval accuracy {final_eval['accuracy']:.4f} ({workdir})", flush=True)
    return summary
