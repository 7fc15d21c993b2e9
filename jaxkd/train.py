"""The trainer: one jitted, data-parallel step for every mode, read top to bottom.

``train_and_evaluate(config, workdir)`` checks the config (:func:`jaxkd.config.parse_run`),
builds the data, the student and its teachers (:mod:`jaxkd.teachers`), the objective, the
optimizer and the compression methods (:mod:`jaxkd.methods`), then loops::

    state, metrics = train_step(state, batch, teacher_variables)

``train_step`` is a pure function, compiled once with ``donate_argnums=(0,)``: the batch is
sharded over the ``data`` axis of a mesh of every device and the state is replicated, so
XLA inserts the gradient all-reduce. A teacher runs inside the same step, in inference
mode and under ``stop_gradient``, on the same (augmented) batch as the student: the
"consistent teaching" of Beyer et al. 2022. What a batch holds and what is measured is the
task's (:mod:`jaxkd.tasks`); what a compression method changes is the method's hooks, in
:data:`jaxkd.methods.METHODS` order: the loop has no branch for either.

The run resumes from the newest Orbax checkpoint in ``workdir``. Because the batch at step
``k`` and the dropout key of step ``k`` are pure functions of (config, seed, k), a resumed
run ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

import jaxkd
from jaxkd import (
    checkpoint,
    evaluation,
    export,
    files,
    methods,
    metrics,
    models,
    multihost,
    objective,
    optim,
    partitioning,
    preemption,
    pruning,
    quant,
    sequence_logits,
    sharing,
    student_init,
    tasks,
    teacher_logits,
    teachers,
)
from jaxkd.config import Run, parse_run
from jaxkd.data import datasets, pipeline
from jaxkd.prefetch import device_batches, to_global
from jaxkd.schema import ConfigError
from jaxkd.workdir import check as check_workdir

CLASSIFICATION = tasks.CLASSIFICATION
ARTIFACT_DIR = "artifact"
FORMATS_DIR = "formats"


@struct.dataclass
class TrainState:
    """Everything a run needs to continue: one pytree, saved and restored whole."""

    step: jax.Array  # int32 scalar: number of updates applied
    params: Any  # the student's parameters
    batch_stats: Any  # BatchNorm running statistics ({} when the model has none)
    # Other variable collections the student's forward reads, and updates in training, e.g.
    # QAT's activation observers (jaxkd.quant.OBSERVERS); {} when none.
    collections: Any
    adapters: Any  # trainable feature-KD adapters (FitNets regressors), not part of the model
    opt_state: optax.OptState  # over {'model': params, 'adapters': adapters}
    rng: jax.Array  # base PRNG key; step k uses fold_in(rng, k)
    # Steps whose loss or gradients were not finite (their updates were not applied), and
    # the first of them: its index and which metric (1 = loss, 2 = gradients).
    nonfinite_steps: jax.Array
    first_nonfinite: jax.Array  # int32 [2]: (step, metric); (-1, 0) when none


def model_variables(params: Any, batch_stats: Any, collections: Any = None) -> dict[str, Any]:
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    return {**variables, **(collections or {})}


def init_state(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
               seed: int, init_adapters: Callable[[jax.Array], Any] | None = None, *,
               task: tasks.Task = CLASSIFICATION) -> TrainState:
    """A fresh state: parameters drawn from ``seed``, optimizer state at step 0."""
    rng = jax.random.PRNGKey(seed)
    init_rng, params_rng, dropout_rng, adapters_rng = jax.random.split(rng, 4)
    inputs = task.example_inputs(tuple(input_shape), 1)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, *inputs, train=False)
    params = variables["params"]
    adapters = init_adapters(adapters_rng) if init_adapters else {}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), collections={},
                      adapters=adapters,
                      opt_state=tx.init({"model": params, "adapters": adapters}), rng=init_rng,
                      nonfinite_steps=jnp.zeros((), jnp.int32),
                      first_nonfinite=jnp.array([-1, 0], jnp.int32))


def student_variables(state: TrainState) -> dict[str, Any]:
    """The variables the student's forward reads (params, BatchNorm statistics, and any
    method's collections, e.g. QAT's frozen activation ranges)."""
    return model_variables(state.params, state.batch_stats, state.collections)


def per_example_grad_sq(loss: Callable[[Any, Any, Any], jax.Array], trainable: Any,
                        examples: Any, m: int) -> Any:
    """``mean_i g_i^2`` over the first ``m`` of ``examples`` (a tree of ``[B, ...]``
    arrays, e.g. ``(batch, teacher_outs)``), ``g_i`` the gradient of ``loss(trainable,
    *example_i)``; shaped like ``trainable``.

    One example at a time (``lax.scan``), squares summed as they come: a batch of
    per-example gradients (vmap) would hold m copies of the parameters and, on CPU, was
    20x slower for the 784-800-800 MLP (bench/compress_step.py)."""

    def add(total, example):
        return jax.tree.map(lambda t, g: t + jnp.square(g), total,
                            jax.grad(loss)(trainable, *example)), None

    head = jax.tree.map(lambda x: x[:m], examples)
    total, _ = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, trainable), head)
    return jax.tree.map(lambda t: t / m, total)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    objective_fn: Callable,
    teacher_models: Sequence[nn.Module] = (),
    *,
    student_apply: Callable[..., Any] | None = None,
    project: Callable[[Any, Any], Any] | None = None,
    per_example: int = 0,
    task: tasks.Task = CLASSIFICATION,
    gather: Callable[[Any], Any] | None = None,
    teacher_gathers: Sequence[Callable[[Any], Any]] = (),
    prepare: Callable[..., Any] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Returns the pure ``train_step(state, batch, teacher_variables) -> (state, metrics)``.

    ``teacher_variables`` is a list, one entry per model of ``teacher_models`` (empty for
    supervised training or precomputed teacher logits); ``objective_fn`` is built by
    :func:`jaxkd.objective.build_objective`; ``task`` says what the batch holds.

    ``student_apply`` replaces ``model.apply`` for the student's forward pass (same
    signature); compression methods use it to run the student on transformed weights or
    with intercepted layers (e.g. quantization-aware training). ``project(params,
    opt_state) -> params`` runs after each update (e.g. clustering's snap to centroids).
    ``per_example > 0`` computes the gradients of the first ``per_example`` examples one by
    one (``jax.lax.scan``, the model in inference mode) and passes their mean square to
    ``tx.update(..., per_example_grad_sq=...)`` (Fisher pruning's empirical Fisher).
    ``gather`` (the student's parameters) and ``teacher_gathers`` (one per teacher's
    variables) place weights for the compute (:meth:`jaxkd.partitioning.Layout.gather`:
    FSDP's all-gather); the identity when None. ``prepare(student_variables,
    teacher_variables, batch, rng, step) -> batch`` rewrites the batch first (generated
    text: :func:`jaxkd.on_policy.make_prepare`).
    """
    apply = student_apply or model.apply
    gather = gather or (lambda tree: tree)
    teacher_gathers = list(teacher_gathers) or [lambda tree: tree] * len(teacher_models)

    def example_loss(state, trainable, example, teacher_out):
        """The objective on one example (batch axis 1), the model in inference mode."""
        example, teacher_out = jax.tree.map(lambda x: x[None], (example, teacher_out))
        out = apply(model_variables(gather(trainable["model"]), state.batch_stats,
                                    state.collections),
                    *task.model_inputs(example), train=False, return_features=True)
        loss, _ = objective_fn(trainable["adapters"], out, teacher_out, example, state.step,
                               task.targets(example))
        return loss

    def train_step(state, batch, teacher_variables):
        if prepare is not None:
            batch = prepare(
                model_variables(gather(state.params), state.batch_stats, state.collections),
                teacher_gathers[0](teacher_variables[0]) if teacher_models else None,
                batch, state.rng, state.step)
        inputs, targets = task.model_inputs(batch), task.targets(batch)
        teacher_outs = [
            jax.lax.stop_gradient(m.apply(g(v), *inputs, train=False, return_features=True))
            for m, v, g in zip(teacher_models, teacher_variables or (), teacher_gathers,
                               strict=True)
        ]
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(trainable):
            (logits, features), updates = apply(
                model_variables(gather(trainable["model"]), state.batch_stats,
                                state.collections),
                *inputs, train=True, return_features=True,
                mutable=["batch_stats", *state.collections], rngs={"dropout": dropout_rng},
            )
            loss, values = objective_fn(trainable["adapters"], (logits, features), teacher_outs,
                                        batch, state.step, targets)
            return loss, (logits, updates, values)

        trainable = {"model": state.params, "adapters": state.adapters}
        (loss, (logits, updated, values)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable
        )
        extra = {}
        if per_example:
            extra["per_example_grad_sq"] = per_example_grad_sq(
                functools.partial(example_loss, state), trainable, (batch, teacher_outs),
                per_example)

        def update(state):
            updates, opt_state = tx.update(grads, state.opt_state, trainable, **extra)
            new = optax.apply_updates(trainable, updates)
            if project is not None:
                new = {**new, "model": project(new["model"], opt_state)}
            return state.replace(
                params=new["model"], adapters=new["adapters"],
                batch_stats=updated.get("batch_stats", {}), opt_state=opt_state,
                collections={k: updated.get(k, v) for k, v in state.collections.items()})

        # A step with a non-finite loss or gradient is not applied (optax.apply_if_finite);
        # the host stops the run, or skips up to config.skip_nonfinite_steps such steps. The
        # update runs inside the cond: selecting between a computed new state and the old
        # one instead cost 15 % of the Hinton MLP step at batch 128 (bench/kd_step.py).
        grad_norm = optax.tree.norm(grads)
        loss_ok, grads_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
        ok = loss_ok & grads_ok
        new_state = jax.lax.cond(ok, update, lambda state: state, state)
        first_bad = jnp.where(
            (state.first_nonfinite[0] < 0) & ~ok,
            jnp.stack([state.step, jnp.where(loss_ok, 2, 1)]), state.first_nonfinite)
        new_state = new_state.replace(step=state.step + 1, first_nonfinite=first_bad,
                                      nonfinite_steps=state.nonfinite_steps + (~ok).astype(
                                          jnp.int32))
        step_metrics = {"loss_sum": loss, "loss_count": jnp.ones(()),
                        **task.train_metrics(logits, targets),
                        "grad_norm_sum": grad_norm, "grad_norm_count": jnp.ones(())}
        for label, value in values.items():
            step_metrics[f"loss_{label}_sum"] = value
            step_metrics[f"loss_{label}_count"] = jnp.ones(())
        return new_state, step_metrics

    return train_step


def make_eval_step(model: nn.Module, apply: Callable[..., Any] | None = None, *,
                   task: tasks.Task = CLASSIFICATION, gather: Callable[[Any], Any] | None = None
                   ) -> Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]]:
    """Returns ``eval_step(variables, batch) -> (sum, count) metrics`` of the task (which
    honours the batch's ``mask``). ``apply`` replaces ``model.apply`` (e.g. QAT's);
    ``gather`` places the variables for the compute (as in :func:`make_train_step`)."""
    apply = apply or model.apply
    gather = gather or (lambda tree: tree)

    def eval_step(variables, batch):
        return task.eval_metrics(apply(gather(variables), *task.model_inputs(batch),
                                       train=False), batch)

    return eval_step


# ----------------------------------------------------------------------------- building


@dataclasses.dataclass(frozen=True)
class Setup:
    """A run's parts, every one checked before anything is compiled."""

    run: Run
    info: pipeline.DatasetInfo
    task: tasks.Task
    mesh: Mesh
    layout: partitioning.Layout  # the student's
    methods: list[methods.Method]
    model: nn.Module
    model_kwargs: dict[str, Any]
    init_source: teachers.Teacher | None  # the weights config.init starts from
    start_variables: dict[str, Any] | None  # init_source's, after the methods' start hooks
    teachers: list[teachers.Teacher]
    precomputed: str
    terms: list[objective.Term]
    student_out: Any  # (logits, features) ShapeDtypeStructs
    teacher_outs: list[Any]
    objective_fn: Callable
    lr: optax.Schedule
    tx: optax.GradientTransformation
    student_apply: Callable[..., Any]
    project: Callable[[Any, Any], Any] | None
    per_example: int
    ctx: methods.Context
    num_steps: int
    prepare: Callable[..., Any] | None = None  # generated batches (jaxkd.on_policy)

    @property
    def replicated(self) -> NamedSharding:
        return self.layout.replicated

    @property
    def data_sharding(self) -> NamedSharding:
        """Batches: split over the mesh's ('data', 'fsdp') axes."""
        return self.layout.batch


def build(run: Run) -> Setup:
    """Every part of the run, checked in the user's words before anything is compiled."""
    info = pipeline.get_info(run.data)
    task = tasks.get(datasets.task_of(run.data))
    data, fsdp, _ = partitioning.resolved_shape(run.mesh)
    _check_batch_sizes(run, data * fsdp)
    mesh = partitioning.make_mesh(run.mesh)
    layout = partitioning.layout(mesh, run.mesh, run.model.name)

    def layout_of(name: str) -> partitioning.Layout:  # teachers: the same table and mesh
        return partitioning.layout(mesh, run.mesh, name)

    compute = compute_kwargs(run)
    enabled = methods.enabled(run)
    model_kwargs = dict(run.model.kwargs)
    source, start_variables = None, None
    if run.init.method and run.init.method != "pretrained":
        source = load_init_source(run, layout_of)
        teachers.check_fit([source], num_classes=info.num_classes, dataset=run.data.name,
                           input_shape=info.input_shape, tokenizer=run.data.tokenizer)
        if run.init.method == "copy":
            start_variables = source.variables
            for m in enabled:  # e.g. similarity merging shrinks the copied weights
                start_variables, model_kwargs = m.start(start_variables, model_kwargs)
    model = models.get_model(run.model.name, num_classes=info.num_classes, **model_kwargs,
                             **compute, **remat_kwargs(run))
    if run.init.method == "pretrained":  # its config.json, before anything is written
        student_init.check_pretrained(run.init.pretrained, model)
    if run.export.formats:  # formats named explicitly must work: say so before training
        from jaxkd.export import formats as export_formats_module

        export_formats_module.check(run.export.formats, model)
    loaded = teachers.load_all(run.distill, layout_of=layout_of, compute=compute)
    teachers.check_fit(loaded, num_classes=info.num_classes, dataset=run.data.name,
                       input_shape=info.input_shape, tokenizer=run.data.tokenizer)
    precomputed = run.distill.teacher_logits
    if precomputed and loaded:
        raise ConfigError("config.distill.teacher_logits and a teacher model are both set; "
                          "use one of them")
    terms = objective.parse_terms(run.distill.losses, has_teacher=bool(loaded or precomputed))
    headless = next((t for t in loaded if t.spec.get("pretrained")), None)
    reads_logits = next((t for t in terms if t.kind in ("logits", "logits_labels")), None)
    if headless and reads_logits:
        raise ConfigError(f"config.distill.losses.{reads_logits.label} ({reads_logits.name}) "
                          f"reads the teacher's logits, but {headless.field}="
                          f"{headless.workdir!r} is a pretrained encoder without a trained "
                          "head: only feature terms can learn from it (e.g. hint_mse on "
                          "'embedding')")
    try:
        student_out, teacher_outs = output_shapes(model, loaded, info.input_shape, task)
    except ConfigError as e:  # a model that cannot take this dataset's inputs
        raise ConfigError(f"config.model.name={run.model.name!r} cannot take the inputs "
                          f"{tuple(info.input_shape)} of config.data.name={run.data.name!r}: "
                          f"{e}") from None
    objective.check_features(terms, student_out, teacher_outs)
    topk_terms = [t for t in terms if t.kind == "token_topk"]
    if topk_terms and not (precomputed and sequence_logits.is_sequence_logits(precomputed)):
        raise ConfigError(f"config.distill.losses.{topk_terms[0].label} ({topk_terms[0].name}) "
                          "reads stored top-k logits: set config.distill.teacher_logits to "
                          "a directory of python -m jaxkd.sequence_logits")
    if precomputed and sequence_logits.is_sequence_logits(precomputed):
        sequence_logits.check_terms(sequence_logits.check(precomputed, run.data), terms,
                                    where=precomputed)
    elif precomputed:
        teacher_logits.check_terms(
            teacher_logits.check(precomputed, run.data,
                                 allow_augment=run.distill.allow_augment_with_precomputed),
            terms, num_classes=info.num_classes, where=precomputed)
    num_steps, _ = schedule_lengths(run, info)
    if num_steps <= 0:
        raise ConfigError(f"config.num_steps={run.num_steps} and config.num_epochs="
                          f"{run.num_epochs} give no training step")
    objective_fn = objective.build_objective(
        terms, num_steps=num_steps, teacher_weights=[t.weight for t in loaded] or (1.0,),
        ensemble=run.distill.ensemble)
    lr, tx = build_optimizer(run, info)
    example = task.example_inputs(info.input_shape, 1)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *example))
    layout.check_rules(abstract["params"], run.model.name)
    ctx = methods.Context(
        run=run, model=model, model_kwargs=model_kwargs, info=info, task=task,
        num_steps=num_updates(run, num_steps),
        shardings=functools.partial(layout.follow, reference=dict(abstract)),
        layer_order=[p for p, _ in quant.find_layers(model, abstract, example)],
        sample=functools.partial(_first_batches, run, 1, one=True),
        batches=functools.partial(_first_batches, run))
    for m in enabled:
        m.check_params(abstract["params"], ctx)
    for m in reversed(enabled):  # the first method wraps outermost
        tx = m.optimizer(tx, ctx)
    if run.grad_accum_steps > 1:  # outermost: every method sees the accumulated gradient
        tx = optax.MultiSteps(tx, every_k_schedule=run.grad_accum_steps)
    ctx = dataclasses.replace(ctx, tx=tx)
    student_apply = model.apply
    for m in enabled:
        student_apply = m.apply(student_apply, ctx)
    projections = [p for p in (m.project(ctx) for m in enabled) if p is not None]
    project = functools.reduce(
        lambda f, g: lambda params, opt: g(f(params, opt), opt), projections) if projections \
        else None
    prepare = None
    if run.distill.on_policy.fraction > 0:
        from jaxkd import on_policy

        on_policy.check(run.distill.on_policy, task=task.name, max_length=run.data.max_length,
                        bucket_lengths=run.data.bucket_lengths, model=model)
        prepare = on_policy.make_prepare(run.distill.on_policy, model,
                                         loaded[0].model if loaded else None)
    return Setup(run=run, info=info, task=task, mesh=mesh, layout=layout, prepare=prepare,
                 methods=enabled, model=model,
                 model_kwargs=model_kwargs, init_source=source, start_variables=start_variables,
                 teachers=loaded, precomputed=precomputed, terms=terms,
                 student_out=student_out, teacher_outs=teacher_outs, objective_fn=objective_fn,
                 lr=lr, tx=tx, student_apply=student_apply, project=project,
                 per_example=max([m.per_example_gradients() for m in enabled], default=0),
                 ctx=ctx, num_steps=num_steps)


def compute_kwargs(run: Run) -> dict[str, str]:
    """The precision kwargs every model of the run is built with (none at float32, so
    models registered without them keep working); one line for a model that lacks them."""
    if run.dtype == "float32" and run.param_dtype == "float32":
        return {}
    if run.quantization.enabled:
        raise ConfigError(f"config.dtype={run.dtype!r} with config.quantization.enabled: QAT's "
                          "fake quantization and its integer export run in float32; use "
                          "config.dtype='float32'")
    if not models.takes_precision(run.model.name):
        raise ConfigError(f"config.dtype={run.dtype!r}: model {run.model.name!r} takes no "
                          "dtype/param_dtype kwargs; use float32 or give its builder them")
    return {"dtype": run.dtype, "param_dtype": run.param_dtype}


def remat_kwargs(run: Run) -> dict[str, str]:
    """``remat_policy`` for the student's blocks, or a one-line error for a model without."""
    if not run.remat:
        return {}
    if run.quantization.enabled:  # its calibration intercepts layers inside nn.remat
        raise ConfigError(f"config.remat={run.remat!r} with config.quantization.enabled: QAT "
                          "observes the layers' inputs, which rematerialised blocks hide; use "
                          "config.remat=''")
    if not models.takes_remat(run.model.name):
        raise ConfigError(f"config.remat={run.remat!r}: model {run.model.name!r} has no blocks "
                          "to rematerialise; the models that take it: "
                          f"{', '.join(n for n in models.names() if models.takes_remat(n))}")
    return {"remat_policy": run.remat}


def num_updates(run: Run, num_steps: int) -> int:
    """Optimizer updates in ``num_steps`` steps (``grad_accum_steps`` steps per update)."""
    return max(num_steps // run.grad_accum_steps, 1)


def _first_batches(run: Run, n: int, *, one: bool = False) -> Any:
    """The first ``n`` global training batches (all rows, on every process)."""
    batches = pipeline.train_batches(run.data, batch_size=run.batch_size, seed=run.seed)
    return next(batches) if one else itertools.islice(batches, n)


def load_init_source(run: Run, layout_of: Callable[[str], partitioning.Layout]
                     ) -> teachers.Teacher:
    """The finished run whose weights ``config.init`` starts from."""
    if run.init.teacher_workdir:
        return teachers.load(run.init.teacher_workdir, layout_of=layout_of,
                             field="config.init.teacher_workdir")
    if run.distill.teachers or run.distill.teacher.workdir:
        return teachers.load_all(run.distill, layout_of=layout_of)[0]
    raise ConfigError(f"config.init.method={run.init.method!r} needs a teacher: set "
                      "config.init.teacher_workdir or config.distill.teacher.workdir")


def output_shapes(model: nn.Module, loaded: Sequence[teachers.Teacher],
                  input_shape: tuple[int, ...], task: tasks.Task = CLASSIFICATION
                  ) -> tuple[Any, list[Any]]:
    """(logits, features) ShapeDtypeStructs of the student and of each teacher."""
    x = jax.eval_shape(lambda: task.example_inputs(tuple(input_shape), 2))
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), *x), x)
    student = jax.eval_shape(
        lambda v, x: model.apply(v, *x, train=False, return_features=True), variables, x)
    return student, [jax.eval_shape(
        lambda v, x, m=t.model: m.apply(v, *x, train=False, return_features=True),
        t.variables, x) for t in loaded]


def num_train_examples(run: Run, info: pipeline.DatasetInfo) -> int:
    n = info.num_examples[run.data.train_split]
    if run.data.transfer_split:
        n += info.num_examples[run.data.transfer_split]
    return n


def schedule_lengths(run: Run | ml_collections.ConfigDict, info: pipeline.DatasetInfo
                     ) -> tuple[int, int]:
    """(total steps, steps per epoch); ``num_steps`` wins over ``num_epochs`` when > 0."""
    run = parse_run(run)
    steps_per_epoch = max(num_train_examples(run, info) // run.batch_size, 1)
    if run.num_steps > 0:
        return run.num_steps, steps_per_epoch
    return int(round(run.num_epochs * steps_per_epoch)), steps_per_epoch


def build_optimizer(run: Run | ml_collections.ConfigDict, info: pipeline.DatasetInfo
                    ) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule and the optimizer, before any method wraps it."""
    run = parse_run(run)
    num_steps, steps_per_epoch = schedule_lengths(run, info)
    k = run.grad_accum_steps  # the schedule counts updates
    lr = optim.learning_rate_schedule(run.schedule, peak=run.optimizer.learning_rate,
                                      num_steps=num_updates(run, num_steps),
                                      steps_per_epoch=max(steps_per_epoch // k, 1))
    return lr, optim.make_optimizer(run.optimizer, lr)


# ----------------------------------------------------------------------------- the state


def fresh_state(s: Setup, *, initialise: bool) -> TrainState:
    """Step 0: random parameters drawn from the seed, with ``initialise`` the weights
    ``config.init`` gives, then every method's starting state (LSQ steps, cluster snap)."""

    def init_adapters(rng):
        return objective.init_adapters(s.terms, s.student_out, s.teacher_outs, rng)

    def init():
        return init_state(s.model, s.tx, s.info.input_shape, s.run.seed, init_adapters,
                          task=s.task)

    state = jax.jit(init, out_shardings=state_shardings(s.layout, jax.eval_shape(init)))()
    if initialise and s.run.init.method:
        state = init_weights(s, state)
    for m in s.methods:
        state = m.prepare(state, s.ctx)
    return state


def state_shardings(layout: partitioning.Layout, state: TrainState) -> TrainState:
    """A ``TrainState`` of shardings: parameters, adapters and BatchNorm statistics by the
    layout's rules, whatever is shaped like them (optimizer state) alike, the rest
    replicated (:mod:`jaxkd.partitioning`)."""
    return layout.follow(state, reference={"params": state.params, "adapters": state.adapters,
                                           "batch_stats": state.batch_stats})


def init_weights(s: Setup, state: TrainState) -> TrainState:
    """``state`` with the student's weights from ``config.init`` (:mod:`jaxkd.student_init`)
    and a fresh optimizer state for them (masks and codebooks come from these weights)."""
    student = model_variables(state.params, state.batch_stats)
    if s.start_variables is not None:  # init.method == 'copy'
        variables = student_init.copy_variables(s.start_variables, student)
    elif s.run.init.method == "pretrained":
        variables = student_init.pretrained_variables(s.run.init.pretrained, s.model, student)
    else:
        images = labels = None
        if s.run.init.method in ("prune_width", "minitron"):  # the same batch everywhere
            batch = next(pipeline.train_batches(
                s.run.data, batch_size=s.run.init.calibration_examples, seed=s.run.seed))
            inputs = s.task.model_inputs(batch)
            images = inputs[0] if len(inputs) == 1 else inputs
            labels = batch["label"]
        teacher_variables = s.init_source.variables
        if s.init_source.spec.get("pretrained") and "head" in student["params"]:
            # A Hugging Face encoder's head is new: the student keeps its own.
            teacher_variables = {**teacher_variables, "params": {
                **teacher_variables["params"], "head": student["params"]["head"]}}
        variables = student_init.init_from_teacher(
            s.run.init, teacher_model=s.init_source.model,
            teacher_variables=teacher_variables, student_model=s.model,
            student_variables=student, calibration_images=images, calibration_labels=labels)
    variables = jax.device_put(variables, s.layout.params(variables))
    state = state.replace(params=variables["params"],
                          batch_stats=variables.get("batch_stats", {}))
    return s.ctx.reinit_optimizer(state)


def start_or_resume(s: Setup, workdir: str) -> tuple[TrainState, int, Any]:
    """The state to train from and its step: the newest usable checkpoint, else step 0."""
    fresh = checkpoint.latest_step(workdir) is None
    state = fresh_state(s, initialise=fresh)
    manager = checkpoint.make_manager(workdir, max_to_keep=s.run.max_to_keep)
    restored, start_step = checkpoint.restore_latest(manager, workdir,
                                                     checkpoint.abstract_like(state))
    if restored is not None:
        print(f"Resuming from the checkpoint at step {start_step} in {workdir}", flush=True)
        return restored, start_step, manager
    if not fresh:  # every checkpoint was unusable: start over
        state = fresh_state(s, initialise=True)
    return state, 0, manager


# ----------------------------------------------------------------------------- the loop


def evaluate(eval_step: Callable, variables: Any, run: Run, sharding: NamedSharding
             ) -> dict[str, float]:
    """The task's metrics over the whole ``config.data.eval_split``."""
    batches = pipeline.eval_batches(
        run.data, split=run.data.eval_split, batch_size=run.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    return evaluation.evaluate(lambda b: eval_step(variables, to_global(b, sharding)), batches)


def jitted_train_step(s: Setup, state: TrainState) -> Callable:
    """The run's step, jitted: the state donated and kept in its layout (sharded like
    ``state``'s parameters), weights gathered for the compute as the mesh says."""
    teacher_gathers = [partitioning.layout(s.mesh, s.run.mesh, t.spec["name"]).gather
                       for t in s.teachers]
    return jax.jit(make_train_step(s.model, s.tx, s.objective_fn, [t.model for t in s.teachers],
                                   student_apply=s.student_apply, project=s.project,
                                   per_example=s.per_example, task=s.task,
                                   gather=s.layout.gather, teacher_gathers=teacher_gathers,
                                   prepare=s.prepare),
                   donate_argnums=(0,),
                   out_shardings=(state_shardings(s.layout, state), s.replicated))


def train_loop(s: Setup, state: TrainState, start_step: int, manager: Any, workdir: str
               ) -> tuple[TrainState, float, int]:
    """Trains from ``start_step`` to the end; returns the state, the timed seconds and the
    number of timed steps (the first step of a process compiles and is not timed)."""
    run = s.run
    train_step = jitted_train_step(s, state)
    eval_step = jax.jit(make_eval_step(s.model, s.student_apply, task=s.task,
                                       gather=s.layout.gather))
    teacher_variables = [t.variables for t in s.teachers]
    writer = metrics.MetricWriter(workdir, total_steps=s.num_steps, start_step=start_step)
    extra = None
    if s.precomputed:
        stored = sequence_logits if sequence_logits.is_sequence_logits(s.precomputed) \
            else teacher_logits
        extra = stored.stream(s.precomputed, run.data)
    batches = device_batches(
        pipeline.train_batches(run.data, batch_size=run.batch_size, seed=run.seed,
                               start_step=start_step, process_index=jax.process_index(),
                               process_count=jax.process_count(), extra_fields=extra),
        s.data_sharding)
    window: list[dict[str, jax.Array]] = []
    timed_steps, timed_start = 0, None
    step = start_step
    try:
        with preemption.StopSignal() as stop:
            while step < s.num_steps:
                state, step_metrics = train_step(state, next(batches), teacher_variables)
                step += 1
                window.append(step_metrics)
                if timed_start is None:
                    jax.block_until_ready(state)
                    timed_start = time.perf_counter()
                    writer.started(step)
                else:
                    timed_steps += 1
                at_log = step % run.log_every_steps == 0 or step == s.num_steps
                at_checkpoint = step % run.checkpoint_every_steps == 0 or step == s.num_steps
                if at_log:
                    train_means = metrics.mean_of(metrics.sum_pairs(jax.device_get(window)))
                    train_means["learning_rate"] = float(
                        s.lr((step - 1) // run.grad_accum_steps))
                    window = []
                    writer.write(step, "train", train_means)
                    writer.progress(step, {"loss": train_means["loss"], **(
                        {"acc": train_means["accuracy"]} if "accuracy" in train_means else {})})
                if at_log or at_checkpoint:
                    check_finite(state, run.skip_nonfinite_steps, manager, workdir)
                if step % run.eval_every_steps == 0 and step != s.num_steps:
                    scores = evaluate(eval_step, student_variables(state), run, s.data_sharding)
                    writer.write(step, "eval", scores)
                    if multihost.is_leader():
                        print(f"step {step}/{s.num_steps} eval accuracy "
                              f"{scores['accuracy']:.4f} ({run.data.eval_split}, float model)",
                              flush=True)
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
    return state, (time.perf_counter() - timed_start if timed_start else 0.0), timed_steps


class NonFiniteError(ConfigError):
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


# ----------------------------------------------------------------------------- the end


def export_artifact(s: Setup, state: TrainState, workdir: str, extra_metrics: dict[str, Any]
                    ) -> dict[str, Any]:
    """Exports ``workdir/artifact`` (what the methods made of the trained model: smaller,
    quantized) and evaluates it as loaded from disk."""
    artifact = methods.Artifact(params=quant.strip_steps(state.params),
                                batch_stats=state.batch_stats, model_kwargs=s.model_kwargs)
    for m in s.methods:
        artifact = m.export(artifact, state, s.ctx)
    directory = os.path.join(workdir, ARTIFACT_DIR)
    result = None
    if multihost.is_leader():  # the only process that writes, reads and evaluates it
        export.export(directory, s.run.model.name, artifact.model_kwargs, s.info.num_classes,
                      model_variables(artifact.params, artifact.batch_stats),
                      artifact.quantization, artifact.activation_ranges, extra_metrics,
                      input_shape=s.info.input_shape, overwrite=True,
                      entropy_coding=s.run.export.entropy_coding, lineage=lineage(s))
        predict, manifest = export.load(directory)
        task, metrics_of = s.task, jax.jit(s.task.eval_metrics)
        artifact_eval = evaluation.evaluate(  # predict outside a jit: its weights stay arguments
            lambda b: metrics_of(predict(*task.model_inputs(b)), b),
            pipeline.eval_batches(s.run.data, split=s.run.data.eval_split,
                                  batch_size=s.run.eval_batch_size))
        formats = export_formats(s, directory, os.path.join(workdir, FORMATS_DIR))
        result = {"artifact_eval": artifact_eval,
                  "formats": formats,
                  "artifact_bytes": export.artifact_bytes(directory),
                  "artifact_num_params": models.count_params(quant.strip_steps(artifact.params)),
                  "storage": export.storage_report(manifest),
                  "artifact_model_kwargs": artifact.model_kwargs}
    return multihost.broadcast_json(result)


def embedding_report(s: Setup, state: TrainState) -> dict[str, float]:
    """The ``sentence_embedding`` task's metrics (:mod:`jaxkd.sentence_embedding`): the
    trained student's linear-probe accuracy (fitted on ``config.data.train_split``, measured
    on the eval split) and, beside the first teacher, the cosine between their embeddings
    and the teacher's own probe accuracy."""
    from jaxkd import sentence_embedding

    def batches(split: str) -> Callable[[], Any]:
        return lambda: pipeline.eval_batches(s.run.data, split=split,
                                             batch_size=s.run.eval_batch_size)

    teacher = (s.teachers[0].model.apply, s.teachers[0].variables) if s.teachers else None
    return sentence_embedding.report((s.student_apply, student_variables(state)), teacher,
                                     batches(s.run.data.train_split),
                                     batches(s.run.data.eval_split))


def export_formats(s: Setup, artifact_dir: str, out_dir: str) -> dict[str, Any]:
    """The artifact in the formats of ``config.export.formats`` (:mod:`jaxkd.export.formats`),
    the ONNX model checked on the eval split; their ``formats.json`` entries."""
    from jaxkd.export import formats

    if tuple(s.run.export.formats) == ("none",):
        return {}
    parts: list[tuple[np.ndarray, ...]] = []
    for b in pipeline.eval_batches(s.run.data, split=s.run.data.eval_split,
                                   batch_size=s.run.eval_batch_size):
        parts.append(tuple(np.asarray(x)[b["mask"] > 0] for x in s.task.model_inputs(b)))
    inputs = []
    for arrays in zip(*parts, strict=True):  # one model input over all batches
        if arrays[0].ndim == 2 and np.issubdtype(arrays[0].dtype, np.integer):
            # Token inputs differ in length between batches (buckets): pad with zeros
            # (token id 0, attention mask 0), which the model ignores.
            longest = max(a.shape[1] for a in arrays)
            arrays = tuple(np.pad(a, ((0, 0), (0, longest - a.shape[1]))) for a in arrays)
        inputs.append(np.concatenate(arrays))
    return formats.write(artifact_dir, out_dir, s.run.export.formats,
                         inputs=tuple(inputs) if len(inputs) > 1 else inputs[0])["formats"]


def lineage(s: Setup) -> dict[str, Any]:
    """Where the run's model came from (:mod:`jaxkd.export.lineage`): its config, data,
    teachers, the run its weights started from and its precomputed logits."""
    from jaxkd.export import lineage as lineage_module

    init = None
    if s.init_source is not None:
        init = s.init_source.workdir
    precomputed = None
    if s.precomputed:
        precomputed = files.read_json(os.path.join(s.precomputed, teacher_logits.MANIFEST_FILE))
    return lineage_module.of_run(s.run.to_dict(), pipeline.train_inputs(s.run.data).spec,
                                 teachers=[t.workdir for t in s.teachers], init=init,
                                 precomputed=precomputed,
                                 pretrained=s.run.init.pretrained or None)


def evaluate_teachers(s: Setup) -> dict[str, Any]:
    """Each teacher's eval metrics (printed), as ``summary.json`` records them."""
    summary = {}
    for i, t in enumerate(s.teachers):
        if t.spec.get("pretrained"):  # its head is new: nothing to evaluate but its features
            summary["teacher" if i == 0 else f"teacher_{i}"] = {
                "workdir": t.workdir, "model": t.spec["name"], "pretrained": True,
                "num_params": models.count_params(t.variables["params"])}
            continue
        gather = partitioning.layout(s.mesh, s.run.mesh, t.spec["name"]).gather
        teacher_eval = evaluate(jax.jit(make_eval_step(t.model, task=s.task, gather=gather)),
                                t.variables, s.run, s.data_sharding)
        summary["teacher" if i == 0 else f"teacher_{i}"] = {
            "workdir": t.workdir, "eval": teacher_eval, "model": t.spec["name"],
            "num_params": models.count_params(t.variables["params"])}
        if s.task.name == "causal_lm":
            summary["teacher" if i == 0 else f"teacher_{i}"]["perplexity"] = math.exp(
                teacher_eval["loss"])
        print(f"teacher {t.workdir} eval accuracy {teacher_eval['accuracy']:.4f}"
              + (f", perplexity {math.exp(teacher_eval['loss']):.4g}"
                 if s.task.name == "causal_lm" else ""), flush=True)
    return summary


def summarise(s: Setup, state: TrainState, workdir: str, teacher_summary: dict[str, Any], *,
              train_time: float, timed_steps: int, start_step: int,
              config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Final eval, ``weights.npz``, the artifact and ``summary.json``."""
    run = s.run
    eval_step = jax.jit(make_eval_step(s.model, s.student_apply, task=s.task,
                                       gather=s.layout.gather))
    final_eval = evaluate(eval_step, student_variables(state), run, s.data_sharding)
    metrics.append_jsonl(workdir, {"step": s.num_steps, "final": True,
                                    **{f"eval/{k}": v for k, v in final_eval.items()}})
    per_device = {"params": partitioning.per_device_bytes(state.params),
                  "opt_state": partitioning.per_device_bytes(state.opt_state)}
    # What the host reads from here on (weights.npz, the artifact, the reports) needs the
    # whole of every weight: one replicated copy of the trained variables.
    state = jax.jit(lambda st: st, out_shardings=s.replicated)(state)
    weights_bytes = checkpoint.save_weights(workdir, student_variables(state))
    summary: dict[str, Any] = dict(teacher_summary)
    summary["method"] = methods.label(s.methods, distilled=bool(s.teachers or s.precomputed))
    # The accuracy reported is that of the exported artifact, as loaded back from disk.
    summary.update(export_artifact(s, state, workdir, {"train_eval": final_eval}))
    if s.task.name == "sentence_embedding":  # what its embeddings know, and the teacher's
        summary["embedding"] = embedding_report(s, state)
    params = quant.strip_steps(state.params)
    summary.update({
        "jaxkd_version": jaxkd.__version__,
        "model": run.model.name,
        "dataset": run.data.name,
        "eval": final_eval,
        "accuracy": (summary["embedding"]["linear_probe_accuracy"] if "embedding" in summary
                     else summary.get("artifact_eval", final_eval)["accuracy"]),
        **({"perplexity": math.exp(summary.get("artifact_eval", final_eval)["loss"])}
           if s.task.name == "causal_lm" else {}),  # exp(nats per next token)
        "num_params": models.count_params(params),
        "sparsity": pruning.sparsity_report(params),
        "unique_values": sharing.unique_values(params),
        "params_bytes": weights_bytes,
        "num_steps": s.num_steps,
        "train_steps_per_sec": timed_steps / train_time if train_time else None,
        "train_examples_per_sec": timed_steps * run.batch_size / train_time
        if train_time else None,
        "resumed_from_step": start_step,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "mesh": partitioning.describe(s.mesh),
        # What one device holds of the student's parameters and optimizer state.
        "per_device_bytes": per_device,
        "unsharded_dims": s.layout.uneven,
        "dtype": run.dtype, "param_dtype": run.param_dtype,
        "platform": jax.devices()[0].platform,
        "config": config.to_dict(),
    })
    metrics.write_summary(workdir, summary)
    artifact = summary.get("artifact_eval", {}).get("accuracy")  # every process has it
    if "embedding" in summary:  # the head is untrained: the probe's accuracy is reported
        print("final eval (sentence embeddings): " + ", ".join(
            f"{k} {v:.4f}" for k, v in summary["embedding"].items())
            + f" ({run.data.eval_split}, {workdir})", flush=True)
        return summary
    if "perplexity" in summary:
        print(f"final eval perplexity {summary['perplexity']:.4g} (exp of the next-token "
              f"cross-entropy, {run.data.eval_split})", flush=True)
    print(f"final eval accuracy {final_eval['accuracy']:.4f} (float model in training)"
          + (f", {artifact:.4f} (exported artifact loaded from disk: the reported accuracy)"
             if artifact is not None else "") + f" ({run.data.eval_split}, {workdir})",
          flush=True)
    return summary


def _check_batch_sizes(run: Run, shards: int) -> None:
    """Batches are split over data x fsdp = ``shards`` (and each process reads its own
    rows)."""
    what = (f"the device count ({shards})" if shards == jax.device_count() else
            f"data x fsdp = {shards} (config.mesh)")
    for field in ("batch_size", "eval_batch_size"):
        size = getattr(run, field)
        if size <= 0 or size % shards or size % jax.process_count():
            raise ConfigError(f"config.{field}={size} must be a positive multiple of {what}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``config`` in ``workdir``; returns its summary.

    Everything the config names is checked before anything is compiled; a ``workdir`` that
    holds checkpoints of a different config is refused unless ``allow_config_change``.
    """
    run = parse_run(config)
    if run.compression.stages:
        raise ConfigError(f"config.compression.stages={list(run.compression.stages)} makes "
                          "this a pipeline of runs: use jaxkd.compression.run_pipeline "
                          "(launch.py does)")
    check_workdir(workdir, config, allow_config_change)
    s = build(run)
    os.makedirs(workdir, exist_ok=True)  # only once the run is known to be valid
    teacher_summary = evaluate_teachers(s)
    state, start_step, manager = start_or_resume(s, workdir)
    if multihost.is_leader():
        files.write_json(os.path.join(workdir, checkpoint.MODEL_FILE), {
            "name": run.model.name, "kwargs": s.model_kwargs,
            "num_classes": s.info.num_classes, "input_shape": list(s.info.input_shape)})
        checkpoint.write_config(workdir, config)
    state, train_time, timed_steps = train_loop(s, state, start_step, manager, workdir)
    return summarise(s, state, workdir, teacher_summary, train_time=train_time,
                     timed_steps=timed_steps, start_step=start_step, config=config)
