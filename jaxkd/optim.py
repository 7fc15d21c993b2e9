"""Optimizers and learning-rate schedules named in the config.

``config.optimizer``: ``name`` in {sgd, adam, adamw}, ``learning_rate`` (peak), ``momentum``
and ``nesterov`` (SGD), ``b1``/``b2`` (Adam), ``weight_decay`` (coupled L2 for SGD and
Adam, as PyTorch's ``weight_decay``; decoupled for AdamW, Loshchilov & Hutter 2019),
``grad_clip_norm`` (0 = off).

``config.schedule``: ``name`` in {constant, cosine, step}, ``warmup_steps``; ``step`` decays
the rate by ``decay_factor`` at ``boundaries_epochs`` (e.g. /10 at epochs 150, 180, 210, as
in the CRD CIFAR-100 recipe); cosine decays to 0 over the run (Loshchilov & Hutter 2017).
"""

from __future__ import annotations

from typing import Any

import optax

from jaxkd import schema
from jaxkd.config import Optimizer, Schedule


def learning_rate_schedule(
    schedule: Schedule | Any, *, peak: float, num_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate as a function of the step (``schedule``: ``config.schedule``)."""
    schedule = schema.parse(Schedule, schedule, "config.schedule")
    warmup = schedule.warmup_steps
    if schedule.name == "constant":
        main = optax.constant_schedule(peak)
    elif schedule.name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(num_steps - warmup, 1))
    elif schedule.name == "step":
        boundaries = [int(e * steps_per_epoch) - warmup for e in schedule.boundaries_epochs]
        factor = schedule.decay_factor
        main = optax.piecewise_constant_schedule(peak, {b: factor for b in boundaries if b > 0})
    else:
        raise AssertionError(schedule.name)  # the block allows no other name
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])
    return main


def make_optimizer(optimizer: Optimizer | Any, lr: optax.Schedule
                   ) -> optax.GradientTransformation:
    """The optax chain: [clip] -> [L2] -> optimizer with the schedule ``lr``
    (``optimizer``: ``config.optimizer``)."""
    optimizer = schema.parse(Optimizer, optimizer, "config.optimizer")
    chain = []
    if optimizer.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(optimizer.grad_clip_norm))
    wd = optimizer.weight_decay
    if optimizer.name == "sgd":
        if wd:
            chain.append(optax.add_decayed_weights(wd))
        chain.append(
            optax.sgd(lr, momentum=optimizer.momentum or None, nesterov=optimizer.nesterov)
        )
    elif optimizer.name == "adam":
        if wd:
            chain.append(optax.add_decayed_weights(wd))
        chain.append(optax.adam(lr, b1=optimizer.b1, b2=optimizer.b2))
    elif optimizer.name == "adamw":
        chain.append(
            optax.adamw(lr, b1=optimizer.b1, b2=optimizer.b2, weight_decay=wd)
        )
    else:
        raise AssertionError(optimizer.name)  # the block allows no other name
    return optax.chain(*chain)
