"""Sparsity over training: one-shot, or Zhu & Gupta's gradual ramp.

One-shot prunes to ``s_f`` at ``begin_step``. Gradual pruning (Zhu & Gupta, "To prune, or
not to prune: exploring the efficacy of pruning for model compression", 2017, eq. 1)::

    s_t = s_f + (s_i - s_f) (1 - progress)^3,  progress = clip((t - t_0) / (t_1 - t_0), 0, 1)

is ``optax.polynomial_schedule`` with power 3, held constant between mask updates: the
masks are recomputed every ``frequency`` steps from ``t_0 = begin_step`` and at
``t_1 = end_step``. A pruned weight stays pruned (masks only shrink).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxkd.pruning.plan import Plan


def polynomial_sparsity(step: jax.Array | int, *, initial_sparsity: float,
                        final_sparsity: float, begin_step: int, end_step: int,
                        frequency: int = 1) -> jax.Array:
    """Gradual pruning (Zhu & Gupta 2017, eq. 1), held constant between mask updates.

    ``optax.polynomial_schedule(s_i, s_f, power=3)`` evaluated at ``t'``, the last update
    step at or before ``t``: ``begin + j * frequency``, or ``end`` from ``end`` on. Before
    ``begin_step`` this is ``s_i`` (the wrapper applies no mask until then). float32 ``[]``.
    """
    step = jnp.asarray(step, jnp.int32)
    t = jnp.clip(step, begin_step, end_step)
    t = begin_step + (t - begin_step) // frequency * frequency
    t = jnp.where(step >= end_step, end_step, t)
    ramp = optax.polynomial_schedule(
        init_value=initial_sparsity, end_value=final_sparsity, power=3,
        transition_steps=end_step - begin_step, transition_begin=begin_step)
    return ramp(t).astype(jnp.float32)


def one_shot_sparsity(step: jax.Array | int, *, final_sparsity: float, begin_step: int
                      ) -> jax.Array:
    """``s_f`` from ``begin_step`` on, 0 before. float32 ``[]``."""
    return jnp.where(jnp.asarray(step) >= begin_step, jnp.float32(final_sparsity),
                     jnp.float32(0.0))


def target_sparsity(plan: Plan, step: jax.Array | int) -> dict[str, jax.Array]:
    """``{layer: sparsity of its mask after the update at step}`` (0 before begin_step)."""
    s = plan.settings
    out = {}
    for p, final in plan.sparsity.items():
        if s.schedule == "one_shot":
            out[p] = one_shot_sparsity(step, final_sparsity=final, begin_step=s.begin_step)
        else:
            ramp = polynomial_sparsity(step, initial_sparsity=min(s.initial_sparsity, final),
                                       final_sparsity=final, begin_step=s.begin_step,
                                       end_step=plan.resolved_end_step(),
                                       frequency=s.frequency)
            out[p] = jnp.where(jnp.asarray(step) >= s.begin_step, ramp, 0.0)
    return out


def is_update_step(plan: Plan, step: jax.Array | int) -> jax.Array:
    """Whether the masks are recomputed at ``step`` (a bool ``[]``, jit-able)."""
    s, step = plan.settings, jnp.asarray(step)
    if s.schedule == "one_shot":
        return step == s.begin_step
    end = plan.resolved_end_step()
    on_grid = ((step - s.begin_step) % s.frequency == 0) | (step == end)
    return (step >= s.begin_step) & (step <= end) & on_grid
