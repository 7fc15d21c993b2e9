"""Weight pruning: importance scores, sparsity patterns, schedules and an optax wrapper.

A pruning *mask* is a boolean pytree shaped like the parameters (True = kept). The masks
of the selected weights (Flax ``Dense``/``Conv`` kernels by default, any leaves by a
:class:`jaxkd.layers.Weights` rule) are computed from an importance *score* per weight,
at the *sparsity* (fraction of removed weights) that a *schedule* gives, with a *pattern*;
every other leaf's mask is all True. One concept per module:

- :mod:`~jaxkd.pruning.scores`: magnitude, Taylor, SNIP, Fisher, random;
- :mod:`~jaxkd.pruning.patterns`: unstructured (per layer or global), N:M, channels;
- :mod:`~jaxkd.pruning.schedules`: one-shot and Zhu & Gupta's gradual ramp;
- :mod:`~jaxkd.pruning.plan`: which layers a configuration prunes, checked against a model;
- :mod:`~jaxkd.pruning.transform`: ``masked``/``prune``, the optax transformation;
- :mod:`~jaxkd.pruning.sparsity` and :mod:`~jaxkd.pruning.shrink`: measuring the zeros,
  and removing pruned channels physically.

``global_magnitude`` and ``snip`` rank the layers together only with the unstructured
pattern (``snip`` with 'n:m'/'channels' ranks within each layer); a layer with an override
is always ranked on its own, at its own sparsity. The settings are the fields of
:class:`jaxkd.config.Pruning`, passed as keyword arguments::

    tx = pruning.masked(optax.adam(1e-3), sparsity=0.9, method="fisher", total_steps=n)
"""

from jaxkd.pruning.patterns import (
    channel_keep,
    channel_mask,
    channel_scores,
    global_masks,
    n_m_mask,
    unstructured_mask,
)
from jaxkd.pruning.plan import Plan, make_plan
from jaxkd.pruning.schedules import (
    is_update_step,
    one_shot_sparsity,
    polynomial_sparsity,
    target_sparsity,
)
from jaxkd.pruning.scores import (
    fisher_scores,
    magnitude_scores,
    random_scores,
    snip_scores,
    taylor_scores,
)
from jaxkd.pruning.shrink import shrink_channels
from jaxkd.pruning.sparsity import check_sparsity, sparsity_report
from jaxkd.pruning.transform import PruneState, compute_masks, get_masks, masked, prune

__all__ = [
    "Plan", "PruneState", "channel_keep", "channel_mask", "channel_scores", "check_sparsity",
    "compute_masks", "fisher_scores", "get_masks", "global_masks", "is_update_step",
    "magnitude_scores", "make_plan", "masked", "n_m_mask", "one_shot_sparsity",
    "polynomial_sparsity", "prune", "random_scores", "shrink_channels", "snip_scores",
    "sparsity_report", "target_sparsity", "taylor_scores", "unstructured_mask",
]
