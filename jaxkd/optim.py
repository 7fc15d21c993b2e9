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

import ml_collections
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


def learning_rate_schedule(
    schedule: ml_collections.ConfigDict, *, peak: float, num_steps: int, steps_per_epoch: int
) -> optax.Schedule:
    """The learning rate as a function of the step."""
    warmup = int(schedule.get("warmup_steps", 0))
    if schedule.name == "constant":
        main = optax.constant_schedule(peak)
    elif schedule.name == "cosine":
        main = optax.cosine_decay_schedule(peak, decay_steps=max(num_steps - warmup, 1))
    elif schedule.name == "step":
        boundaries = [int(e * steps_per_epoch) - warmup for e in schedule.boundaries_epochs]
        factor = float(schedule.get("decay_factor", 0.1))
        main = optax.piecewise_constant_schedule(peak, {b: factor for b in boundaries if b > 0})
    else:
        raise ValueError(
            f"config.schedule.name={schedule.name!r} is not a schedule; "
            f"choose one of: {', '.join(SCHEDULES)}"
        )
    if warmup:
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])
    return main


def make_optimizer(
    optimizer: ml_collections.ConfigDict, lr: optax.Schedule
) -> optax.GradientTransformation:
    """The optax chain: [clip] -> [L2] -> optimizer with the schedule ``lr``."""
    chain = []
    if optimizer.get("grad_clip_norm", 0.0):
        chain.append(optax.clip_by_global_norm(optimizer.grad_clip_norm))
    wd = float(optimizer.get("weight_decay", 0.0))
    if optimizer.name == "sgd":
        if wd:
            chain.append(optax.add_decayed_weights(wd))
        chain.append(
            optax.sgd(lr, momentum=optimizer.get("momentum", 0.9) or None,
                      nesterov=bool(optimizer.get("nesterov", False)))
        )
    elif optimizer.name == "adam":
        if wd:
            chain.append(optax.add_decayed_weights(wd))
        chain.append(optax.adam(lr, b1=optimizer.get("b1", 0.9), b2=optimizer.get("b2", 0.999)))
    elif optimizer.name == "adamw":
        chain.append(
            optax.adamw(lr, b1=optimizer.get("b1", 0.9), b2=optimizer.get("b2", 0.999),
                        weight_decay=wd)
        )
    else:
        raise ValueError(
            f"config.optimizer.name={optimizer.name!r} is not an optimizer; "
            f"choose one of: {', '.join(OPTIMIZERS)}"
        )
    return optax.chain(*chain)
