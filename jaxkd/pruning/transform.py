"""The optax transformation that trains a pruned model: masks kept in the optimizer state.

``masked(inner, sparsity=0.9, method='fisher', ...)`` wraps any optax optimizer (clip,
weight decay, schedules included) into a ``GradientTransformation`` whose state holds the
masks, the step and the gradient accumulators that Taylor/SNIP/Fisher need. It sees the
raw gradients (before ``inner``), masks them, runs ``inner``, and returns updates ``u``
with ``params + u == 0`` exactly at every pruned position. ``prune(...)`` is the same for
the end of an ``optax.chain`` (gradient-free methods only)::

    tx = pruning.masked(optax.adam(1e-3), sparsity=0.9, total_steps=num_steps)
    tx = optax.chain(optax.adam(1e-3), pruning.prune(sparsity=0.9, total_steps=num_steps))

The keyword arguments are the fields of :class:`jaxkd.config.Pruning` (what each means is
documented there); ``weights`` chooses which leaves are pruned and their layout
(:mod:`jaxkd.layers`: Flax kernels by default, or e.g. ``layers.TORCH`` for a
``{'weight': [out, in]}`` tree; Flax NNX ``State``\\s work as they are).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxkd import layers
from jaxkd.config import GRADIENT_METHODS
from jaxkd.pruning import patterns, scores
from jaxkd.pruning.plan import Plan, make_plan, settings
from jaxkd.pruning.schedules import is_update_step, target_sparsity
from jaxkd.schema import FieldError

_STATS = layers.Weights(name="kernel", min_ndim=0)  # the accumulators' own tree


class PruneState(NamedTuple):
    """State of ``masked``/``prune``.

    count: updates applied so far (the schedule's step).
    masks: bool tree shaped like the pruned parameters (True = kept).
    grad_stats: the sum since the last mask update of ``|g * w|`` (taylor), ``g`` (snip) or
      the per-example ``mean_i g_i^2`` (fisher) of every selected weight, as a tree
      ``{layer: {'kernel': sum}}``; ``{}`` for the other methods.
    stats_count: steps summed in ``grad_stats``.
    inner_state: the wrapped optimizer's state.
    """

    count: jax.Array
    masks: Any
    grad_stats: Any
    stats_count: jax.Array
    inner_state: optax.OptState


def _stats_tree(by_layer: Mapping[str, jax.Array]) -> dict[str, Any]:
    """``{'a/b': x}`` -> ``{'a': {'b': {'kernel': x}}}`` (checkpoint-friendly keys)."""
    return traverse_util.unflatten_dict({(*p.split("/"), "kernel"): v
                                         for p, v in by_layer.items()})


def _set_masks(masks: Any, new: Mapping[str, jax.Array]) -> Any:
    """``masks`` with the leaves named in ``new`` (``'layer/leaf'``) replaced."""
    return layers.map_leaves(lambda path, m: new.get(path, m), masks)


def compute_masks(plan: Plan, params: Any, masks: Any, grad_mean: Mapping[str, jax.Array],
                  step: jax.Array | int, key: jax.Array | None = None) -> Any:
    """The masks after the update at ``step``: scores of the selected weights (pruned
    entries score -inf, so they stay pruned), the pattern at ``target_sparsity``, ANDed with
    the old masks. ``grad_mean`` holds, for every selected layer, the mean over the steps
    since the last update of ``|g * w|`` (taylor), of the gradient (snip) or of the
    per-example squared gradient (fisher: the diagonal empirical Fisher). jit-able."""
    s, w = plan.settings, plan.weights
    weight = layers.find(params, w)
    leaf_of = layers.weight_paths(params, w)
    old = layers.leaves(masks)
    key = jax.random.PRNGKey(s.seed) if key is None else key
    score = {}
    for i, p in enumerate(plan.sparsity):
        x = weight[p].astype(jnp.float32)
        if s.method in ("magnitude", "global_magnitude"):
            score[p] = scores.magnitude_scores(x)
        elif s.method == "taylor":  # the mean of |g * w| over the steps since the last update
            score[p] = grad_mean[p]
        elif s.method == "snip":
            score[p] = scores.taylor_scores(x, grad_mean[p])
        elif s.method == "fisher":
            score[p] = scores.fisher_scores(x, grad_mean[p])
        else:
            score[p] = scores.random_scores(jax.random.fold_in(key, i), x.shape)
    if s.method == "snip" and plan.global_layers:
        score.update(scores.snip_scores({p: weight[p] for p in plan.global_layers},
                                        {p: grad_mean[p] for p in plan.global_layers}))
    score = {p: jnp.where(old[leaf_of[p]], v, -jnp.inf) for p, v in score.items()}
    sparsity = target_sparsity(plan, step)
    new: dict[str, jax.Array] = {}
    if plan.global_layers:
        new.update(patterns.global_masks({p: score[p] for p in plan.global_layers},
                                         sparsity[plan.global_layers[0]]))
    for p in plan.sparsity:
        if p in new:
            continue
        if s.pattern == "unstructured":
            new[p] = patterns.unstructured_mask(score[p], sparsity[p])
        elif s.pattern == "n:m":
            new[p] = patterns.n_m_mask(score[p], s.n, s.m, axis=w.in_axis)
        else:
            keep = patterns.channel_keep(score[p], sparsity[p], w.out_axis)
            new[p] = patterns.along(keep, tuple(score[p].shape), w.out_axis)
            bias = f"{p}/bias"
            if bias in old:
                new[bias] = old[bias] & keep
    new = {(leaf_of[p] if p in plan.sparsity else p): v for p, v in new.items()}
    new = {k: v & old[k] for k, v in new.items()}
    return _set_masks(masks, new)


def masked(inner: optax.GradientTransformation, *, total_steps: int | None = None,
           params_key: str | None = None, weights: layers.Weights = layers.FLAX,
           layer_order: Sequence[str] | None = None, **pruning: Any
           ) -> optax.GradientTransformation:
    """Wraps ``inner`` so that it trains a pruned model.

    ``update(grads, state, params)`` at step ``t`` (``state.count``):

    1. adds ``|g * w|`` (taylor: Molchanov et al. 2019's per-step first-order importance),
       ``g`` (snip) or ``mean_i g_i^2`` (fisher: the empirical Fisher from per-example
       gradients, ``per_example_grad_sq``) of the selected weights to the state;
    2. when the schedule says so (``is_update_step``, a ``lax.cond`` on the step, no host
       round-trip) recomputes the masks from ``params`` and the mean accumulated gradients
       (``compute_masks``) and resets the accumulators;
    3. runs ``inner`` on the masked gradients ``where(mask, g, 0)`` (pruned weights feed
       nothing into optimizer moments or gradient-clipping norms);
    4. returns ``where(mask, u, -params)``, so that ``optax.apply_updates(params, updates)``
       is exactly 0 at every pruned position (also on the step a weight gets pruned).

    ``fisher`` needs ``tx.update(..., per_example_grad_sq=...)``: the mean over a batch's
    examples of each one's squared gradient, shaped like the updates (jaxkd's trainer
    computes it on ``config.pruning.fisher_examples`` examples per step).

    Place it outermost, so that it sees the raw gradients:
    ``masked(optax.chain(clip, adam), ...)``. Shapes are static and everything runs under
    ``jit``; ``init`` checks the settings against the parameters. The schedule counts the
    updates this transformation has applied (``state.count``), so a step that the caller
    discards together with the new optimizer state does not advance it.

    Args:
      inner: any optax transformation (the optimizer).
      total_steps: the run's number of steps; needed when ``end_step=-1`` (polynomial).
      params_key: when the optimizer sees ``{params_key: model params, ...}`` (jaxkd's
        trainer passes ``{'model': ..., 'adapters': ...}``), prune only that entry.
      weights: which leaves are weights, and their layout (:mod:`jaxkd.layers`).
      layer_order: the layers in call order, for ``keep_first_last``.
      **pruning: the fields of :class:`jaxkd.config.Pruning` (``sparsity``, ``method``,
        ``pattern``, ``schedule``, ...), checked at once (a one-line :class:`FieldError`).
    """
    s = settings(pruning)
    if s.schedule == "polynomial" and s.end_step == -1 and total_steps is None:
        raise FieldError("end_step", "=-1 means the last training step: pass total_steps")
    key = jax.random.PRNGKey(s.seed)

    def view(tree: Any) -> Any:
        return tree if params_key is None else tree[params_key]

    def put(tree: Any, sub: Any) -> Any:
        return sub if params_key is None else {**tree, params_key: sub}

    def plan_of(sub: Any) -> Plan:
        return make_plan(sub, s, total_steps=total_steps, weights=weights,
                         layer_order=layer_order)

    def init(params: Any) -> PruneState:
        sub = view(params)
        plan = plan_of(sub)
        weight = layers.find(sub, weights)
        stats = {}
        if s.method in GRADIENT_METHODS:
            stats = _stats_tree({p: jnp.zeros(np.shape(weight[p]), jnp.float32)
                                 for p in plan.sparsity})
        masks = jax.tree.map(lambda x: jnp.ones(np.shape(x), bool), sub)
        if s.from_zeros:  # an already pruned model keeps its zeros
            leaf_of = layers.weight_paths(sub, weights)
            masks = _set_masks(masks, {leaf_of[p]: jnp.asarray(weight[p]) != 0
                                       for p in plan.sparsity})
        return PruneState(count=jnp.zeros((), jnp.int32), masks=masks, grad_stats=stats,
                          stats_count=jnp.zeros((), jnp.int32), inner_state=inner.init(params))

    def update(updates: Any, state: PruneState, params: Any = None,
               per_example_grad_sq: Any = None, **extra_args: Any) -> tuple[Any, PruneState]:
        del extra_args  # a chain's other arguments
        if params is None:
            raise ValueError("pruning.masked needs the parameters: call "
                             "tx.update(grads, opt_state, params)")
        grads, sub = view(updates), view(params)
        plan = plan_of(sub)
        stats, stats_count = layers.find(state.grad_stats, _STATS), state.stats_count
        if stats:
            g, w = layers.find(grads, weights), layers.find(sub, weights)
            if s.method == "fisher":
                if per_example_grad_sq is None:
                    raise ValueError("pruning method 'fisher' needs the per-example squared "
                                     "gradients: tx.update(grads, state, params, "
                                     "per_example_grad_sq=mean_i(g_i ** 2))")
                g_sq = layers.find(view(per_example_grad_sq), weights)
                stats = {p: v + g_sq[p] for p, v in stats.items()}
            elif s.method == "taylor":
                stats = {p: v + jnp.abs(g[p] * w[p]) for p, v in stats.items()}
            else:
                stats = {p: v + g[p] for p, v in stats.items()}
            stats_count = stats_count + 1
        hit = is_update_step(plan, state.count)

        def recompute() -> Any:
            mean = {p: v / jnp.maximum(stats_count, 1) for p, v in stats.items()}
            return compute_masks(plan, sub, state.masks, mean, state.count, key)

        masks = jax.lax.cond(hit, recompute, lambda: state.masks)
        stats = {p: jnp.where(hit, 0.0, v) for p, v in stats.items()}
        stats_count = jnp.where(hit, 0, stats_count)
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, masks)
        new_updates, inner_state = inner.update(put(updates, grads), state.inner_state, params)
        pruned = jax.tree.map(lambda u, m, p: jnp.where(m, u, -p).astype(u.dtype),
                              view(new_updates), masks, sub)
        return put(new_updates, pruned), PruneState(
            count=optax.safe_increment(state.count), masks=masks, grad_stats=_stats_tree(stats),
            stats_count=stats_count, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def prune(*, total_steps: int | None = None, params_key: str | None = None,
          weights: layers.Weights = layers.FLAX, layer_order: Sequence[str] | None = None,
          **pruning: Any) -> optax.GradientTransformation:
    """``masked(optax.identity(), ...)`` for the END of a chain:
    ``optax.chain(optimizer, prune(sparsity=0.9))``.

    It zeroes the final updates of pruned weights and makes ``params + updates`` 0 there.
    It sees the optimizer's updates, not the gradients, so it supports only the
    gradient-free methods (magnitude, global_magnitude, random); use ``masked`` otherwise.
    """
    s = settings(pruning)
    if s.method in GRADIENT_METHODS:
        raise FieldError("method", f"={s.method!r} needs the gradients, which a "
                                   "transformation chained after the optimizer never sees: "
                                   "use pruning.masked(optimizer, ...)")
    return masked(optax.identity(), total_steps=total_steps, params_key=params_key,
                  weights=weights, layer_order=layer_order, **s.kwargs())


def get_masks(opt_state: Any) -> Any:
    """The masks of the (first) ``PruneState`` inside an optimizer state, else None."""
    if isinstance(opt_state, PruneState):
        return opt_state.masks
    if isinstance(opt_state, tuple | list):
        for part in opt_state:
            found = get_masks(part)
            if found is not None:
                return found
    return None
