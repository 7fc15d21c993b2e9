"""How a zoo model computes: in which dtype, and what it keeps for the backward pass.

**Mixed precision** (Micikevicius et al., "Mixed Precision Training", ICLR 2018): every
model takes ``dtype`` and ``param_dtype``. Parameters are stored in ``param_dtype`` (float32
master weights, which the optimizer updates) and cast to ``dtype`` where a layer uses them;
the input is cast to ``dtype`` and activations, matmuls and convolutions run in ``dtype``.
BatchNorm computes its statistics in at least float32 (Flax) and keeps its running averages
in float32. The logits are always returned in float32; the features of
``return_features=True`` stay in ``dtype`` (feature losses cast as they need). With the
defaults (float32 for both) a model computes exactly what it computed before these options.
On TPUs and recent GPUs ``dtype='bfloat16'`` halves activation memory and runs matmuls at
the bf16 rate; ``'float16'`` needs loss scaling, which jaxkd does not do.

**Rematerialisation** (Chen, Xu, Zhang & Guestrin, "Training Deep Nets with Sublinear Memory
Cost", 2016): models with repeated residual blocks (:mod:`~jaxkd.models.resnet`,
:mod:`~jaxkd.models.wrn`) take ``remat_policy``; each block is then wrapped in
``flax.linen.remat`` (``jax.checkpoint``), and the backward pass recomputes the block's
intermediates that the policy does not save instead of keeping them from the forward pass.
Parameter names and values, the loss and the gradients are unchanged. Policies
(``jax.checkpoint_policies``):

- ``''``: off, every intermediate is kept;
- ``'full'``: ``nothing_saveable``, only the block inputs are kept (least memory, one extra
  forward pass of every block);
- ``'dots'``: ``checkpoint_dots``, matmul/convolution outputs are kept, elementwise ops
  (BatchNorm, ReLU) are recomputed;
- ``'dots_no_batch'``: ``checkpoint_dots_with_no_batch_dims``, only dot products without
  batch dimensions are kept (none for convolutions, so close to ``'full'`` for CNNs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxkd.schema import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("", "full", "dots", "dots_no_batch")  # '' = off

_POLICIES: dict[str, Callable[..., bool]] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def as_dtype(value: DTypeLike, field: str = "dtype") -> jnp.dtype:
    """The dtype named by ``value`` (``'bfloat16'``, ``jnp.bfloat16``, ...), one of
    :data:`DTYPES`.

    Raises:
      ConfigError: one line naming ``config.{field}`` and the allowed names.
    """
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if isinstance(value, bool) or dtype is None or dtype.name not in DTYPES:
        raise ConfigError(f"config.{field}={value!r} is not a precision; allowed: "
                          f"{', '.join(DTYPES)}")
    return dtype


def checkpoint_policy(name: str) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy named ``name`` (one of :data:`REMAT_POLICIES`); None for
    ``''`` (rematerialisation off).

    Raises:
      ConfigError: one line naming ``config.remat`` and the allowed names.
    """
    if name == "":
        return None
    if not isinstance(name, str) or name not in _POLICIES:
        raise ConfigError(f"config.remat={name!r} is not a remat policy; allowed: "
                          f"{', '.join(repr(p) for p in REMAT_POLICIES)} ('' = off)")
    return _POLICIES[name]


@functools.cache
def remat_block(block: type[nn.Module], policy: str) -> Any:
    """``block`` itself for ``policy=''``, else ``block`` under ``nn.remat`` with the named
    policy. The block is called as ``block(...)(x, train)``: ``train`` (argument 2, counting
    ``self``) is static. Instances keep their names, so parameter paths do not change."""
    checkpoint = checkpoint_policy(policy)
    if checkpoint is None:
        return block
    return nn.remat(block, static_argnums=(2,), policy=checkpoint)
