"""Importance scores of single weights (larger = more important).

- ``magnitude``: ``|w|`` (Han et al., "Learning both Weights and Connections for Efficient
  Neural Networks", NeurIPS 2015).
- ``taylor``: first-order Taylor expansion of the loss change when ``w`` is set to 0,
  ``|w * g|``, averaged over the steps since the last mask update (Molchanov et al.,
  "Pruning Convolutional Neural Networks for Resource Efficient Inference", ICLR 2017;
  "Importance Estimation for Neural Network Pruning", CVPR 2019): the magnitude is taken
  every step, so that gradients of opposite signs near convergence do not cancel.
- ``snip``: connection sensitivity at initialisation ``|w * g| / sum |w * g|`` (Lee et al.,
  "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019).
- ``fisher``: the diagonal empirical Fisher information ``F = mean_i g_i^2`` over examples
  ``i`` (per-example gradients, not the mini-batch mean) times ``w^2``, the loss increase
  ``~ F w^2 / 2`` of removing ``w`` (LeCun et al., "Optimal Brain Damage", 1990; Theis et
  al., "Faster gaze prediction with dense networks and Fisher pruning", 2018).
- ``random``: a fixed uniform draw per weight (the random-pruning baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def magnitude_scores(params: jax.Array) -> jax.Array:
    """``|w|`` (Han et al. 2015)."""
    return jnp.abs(params)


def taylor_scores(params: jax.Array, grads: jax.Array) -> jax.Array:
    """``|w * g|``: first-order Taylor estimate of the loss change when ``w`` is set to 0
    (Molchanov et al. 2017); ``g`` is a gradient or the mean gradient over steps."""
    return jnp.abs(params * grads)


def snip_scores(params: Any, grads: Any) -> Any:
    """SNIP's connection sensitivity (Lee et al. 2019, eq. 6): ``|w * g| / sum |w * g|``,
    normalised over every leaf of the ``params``/``grads`` trees together."""
    raw = jax.tree.map(taylor_scores, params, grads)
    total = sum(jnp.sum(leaf) for leaf in jax.tree.leaves(raw))
    return jax.tree.map(lambda x: x / jnp.maximum(total, jnp.finfo(x.dtype).tiny), raw)


def fisher_scores(params: jax.Array, grad_sq: jax.Array) -> jax.Array:
    """``F * w^2`` with ``F = mean(g^2)`` the diagonal empirical Fisher information; the loss
    increase of removing ``w`` is about ``F w^2 / 2`` (LeCun et al. 1990, Theis et al. 2018)."""
    return grad_sq * jnp.square(params)


def random_scores(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """Uniform ``[0, 1)`` scores: random pruning."""
    return jax.random.uniform(key, tuple(shape), jnp.float32)
