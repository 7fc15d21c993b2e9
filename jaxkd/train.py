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
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
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
from jaxkd import checkpoint, losses, metrics, models, objective, optim
from jaxkd.data import pipeline


@struct.dataclass
class TrainState:
    """Everything a run needs to continue: one pytree, saved and restored whole."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # the student's parameters
    batch_stats: Any  # BatchNorm running statistics ({} when the model has none)
    opt_state: optax.OptState
    rng: jax.Array  # base PRNG key; step k uses fold_in(rng, k)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its model and variables, read from a finished run's checkpoint."""

    workdir: str
    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict


def model_variables(params: Any, batch_stats: Any) -> dict[str, Any]:
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return variables


def init_state(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
               seed: int) -> TrainState:
    """A fresh state: parameters drawn from ``seed``, optimizer state at step 0."""
    rng = jax.random.PRNGKey(seed)
    init_rng, params_rng, dropout_rng = jax.random.split(rng, 3)
    dummy = jnp.zeros((1, *input_shape), jnp.float32)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params), rng=init_rng)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    objective_fn: Callable,
    teacher_model: nn.Module | None,
    *,
    student_apply: Callable[..., Any] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure ``train_step(state, batch, teacher_variables) -> (state, metrics)``.

    ``student_apply`` replaces ``model.apply`` for the student's forward pass (same
    signature); compression methods use it to run the student on transformed weights or
    with intercepted layers (e.g. quantization-aware training).
    """
    apply = student_apply or model.apply

    def train_step(state, batch, teacher_variables):
        images, labels = batch["image"], batch["label"]
        teacher_logits = None
        if teacher_model is not None:
            teacher_logits = jax.lax.stop_gradient(
                teacher_model.apply(teacher_variables, images, train=False)
            )
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logits, updates = apply(
                model_variables(params, state.batch_stats), images, train=True,
                mutable=["batch_stats"], rngs={"dropout": dropout_rng},
            )
            loss, values = objective_fn(logits, teacher_logits, labels)
            return loss, (logits, updates.get("batch_stats", {}), values)

        (loss, (logits, batch_stats, values)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                                  opt_state=opt_state)
        labelled = (labels >= 0).astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * labelled
        step_metrics = {"loss_sum": loss, "loss_count": jnp.ones(()),
                        "accuracy_sum": correct.sum(), "accuracy_count": labelled.sum(),
                        "grad_norm_sum": optax.tree.norm(grads), "grad_norm_count": jnp.ones(())}
        for label, value in values.items():
            step_metrics[f"loss_{label}_sum"] = value
            step_metrics[f"loss_{label}_count"] = jnp.ones(())
        return new_state, step_metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
    """Returns ``eval_step(variables, batch) -> (sum, count) metrics`` honouring ``mask``."""

    def eval_step(variables, batch):
        logits = model.apply(variables, batch["image"], train=False)
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


def load_teacher(workdir: str, *, sharding: NamedSharding) -> Teacher:
    """Reads a finished run's model and variables from its newest Orbax checkpoint.

    The teacher's checkpoint is only read, never re-saved.
    """
    config = checkpoint.read_config(workdir)
    step = checkpoint.latest_step(workdir)
    if step is None:
        raise FileNotFoundError(
            f"config.distill.teacher.workdir={workdir!r} has no checkpoint: train the teacher first"
        )
    info = pipeline.get_info(config.data)
    model = models.get_model(config.model.name, num_classes=info.num_classes,
                             **config.model.get("kwargs", {}))
    _, tx = build_optimizer(config, info)
    abstract = jax.eval_shape(
        lambda: init_state(model, tx, info.input_shape, config.seed)
    )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )
    manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep, asynchronous=False)
    try:
        state = checkpoint.restore(manager, step, abstract)
    finally:
        manager.close()
    return Teacher(workdir=workdir, model=model, config=config,
                   variables=model_variables(state.params, state.batch_stats))


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
    return lr, optim.make_optimizer(config.optimizer, lr)


def _check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if size <= 0 or size % jax.device_count():
            raise ValueError(
                f"config.{field}={size} must be a positive multiple of the device count "
                f"({jax.device_count()})"
            )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``config`` in ``workdir``; returns its summary."""
    os.makedirs(workdir, exist_ok=True)
    _check_batch_sizes(config)
    info = pipeline.get_info(config.data)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    data_sharding = NamedSharding(mesh, P("data"))

    model = models.get_model(config.model.name, num_classes=info.num_classes,
                             **config.model.get("kwargs", {}))
    teacher = None
    if config.distill.teacher.workdir:
        teacher = load_teacher(config.distill.teacher.workdir, sharding=replicated)
        teacher_classes = pipeline.get_info(teacher.config.data).num_classes
        if teacher_classes != info.num_classes:
            raise ValueError(
                f"the teacher at config.distill.teacher.workdir={teacher.workdir!r} predicts "
                f"{teacher_classes} classes but config.data.name={config.data.name!r} has "
                f"{info.num_classes}"
            )
    terms = objective.parse_terms(config.distill.losses, has_teacher=teacher is not None)
    objective_fn = objective.build_objective(terms)
    num_steps, _ = schedule_lengths(config, info)
    lr, tx = build_optimizer(config, info)

    state = jax.jit(lambda: init_state(model, tx, info.input_shape, config.seed),
                    out_shardings=replicated)()
    manager = checkpoint.make_manager(workdir, max_to_keep=config.max_to_keep)
    start_step = manager.latest_step() or 0
    if start_step:
        state = checkpoint.restore(manager, start_step, checkpoint.abstract_like(state))
        print(f"Resuming from the checkpoint at step {start_step} in {workdir}", flush=True)
    if jax.process_index() == 0:
        checkpoint.write_config(workdir, config)

    train_step = jax.jit(make_train_step(model, tx, objective_fn, teacher and teacher.model),
                         donate_argnums=(0,), out_shardings=(replicated, replicated))
    eval_step = jax.jit(make_eval_step(model))
    teacher_variables = teacher.variables if teacher else None

    writer = metrics.MetricWriter(workdir, total_steps=num_steps)
    summary: dict[str, Any] = {}
    if teacher is not None:
        teacher_eval = evaluate(jax.jit(make_eval_step(teacher.model)), teacher.variables,
                                config, data_sharding)
        summary["teacher"] = {"workdir": teacher.workdir, "eval": teacher_eval,
                              "num_params": models.count_params(teacher.variables["params"])}
        print(f"teacher eval accuracy {teacher_eval['accuracy']:.4f}", flush=True)

    batches = device_prefetch(
        pipeline.train_batches(config.data, batch_size=config.batch_size, seed=config.seed,
                               start_step=start_step, process_index=jax.process_index(),
                               process_count=jax.process_count()),
        data_sharding,
    )
    window: list[dict[str, jax.Array]] = []
    timed_steps, timed_start = 0, None
    step = start_step
    while step < num_steps:
        state, step_metrics = train_step(state, next(batches), teacher_variables)
        step += 1
        window.append(step_metrics)
        if timed_start is None:  # the first step of this process compiles; time the rest.
            jax.block_until_ready(state)
            timed_start = time.perf_counter()
        else:
            timed_steps += 1
        if step % config.log_every_steps == 0 or step == num_steps:
            train_means = metrics.mean_of(metrics.sum_pairs(jax.device_get(window)))
            train_means["learning_rate"] = float(lr(step - 1))
            window = []
            writer.write(step, "train", train_means)
            writer.progress(step, {"loss": train_means["loss"],
                                   "acc": train_means["accuracy"]})
        if step % config.eval_every_steps == 0 and step != num_steps:
            eval_means = evaluate(eval_step, model_variables(state.params, state.batch_stats),
                                  config, data_sharding)
            writer.write(step, "eval", eval_means)
        if step % config.checkpoint_every_steps == 0 or step == num_steps:
            checkpoint.save(manager, step, state)
    batches.close()  # stops and joins the prefetch thread
    jax.block_until_ready(state)
    train_time = time.perf_counter() - timed_start if timed_start else 0.0
    manager.wait_until_finished()
    manager.close()

    final_eval = evaluate(eval_step, model_variables(state.params, state.batch_stats), config,
                          data_sharding)
    writer.write(num_steps, "eval", final_eval)
    writer.close()
    weights_bytes = checkpoint.save_weights(
        workdir, model_variables(state.params, state.batch_stats)
    )
    summary.update({
        "jaxkd_version": jaxkd.__version__,
        "model": config.model.name,
        "dataset": config.data.name,
        "eval": final_eval,
        "accuracy": final_eval["accuracy"],
        "num_params": models.count_params(state.params),
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
