"""The protocol between the trainer and a compression method (see :mod:`jaxkd.methods`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxkd import surgery
from jaxkd.config import Run
from jaxkd.data.pipeline import DatasetInfo
from jaxkd.schema import ConfigError
from jaxkd.tasks import Task

Apply = Callable[..., Any]  # model.apply's signature


@dataclasses.dataclass(frozen=True)
class Context:
    """What the trainer knows when it calls a method's hooks.

    ``layer_order``: the model's Dense/Conv layers in call order (traced once);
    ``sample()``: the first training batch; ``batches(n)``: the first ``n`` training
    batches (calibration); ``tx``: the run's optimizer, once every method has wrapped it.
    """

    run: Run
    model: nn.Module
    model_kwargs: dict[str, Any]
    info: DatasetInfo
    task: Task
    num_steps: int
    layer_order: list[str]
    # Shardings of any tree of the run's state (jaxkd.partitioning.Layout.follow): leaves
    # shaped like a parameter follow it, the rest are replicated.
    shardings: Callable[[Any], Any]
    sample: Callable[[], dict[str, np.ndarray]]
    batches: Callable[[int], Iterator[dict[str, np.ndarray]]]
    tx: optax.GradientTransformation | None = None

    def reinit_optimizer(self, state: Any) -> Any:
        """``state`` with a fresh optimizer state for its parameters (after a hook changed
        them); the trainer's state trains ``{'model': params, 'adapters': adapters}``."""
        trainable = {"model": state.params, "adapters": state.adapters}
        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings(
            jax.eval_shape(self.tx.init, trainable)))(trainable)
        return state.replace(opt_state=opt_state)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """What the export writes: the model's variables and kwargs (a physically smaller model
    when a method shrank it), and the integer plan when it is quantized."""

    params: Any
    batch_stats: Any
    model_kwargs: dict[str, Any]
    quantization: Any = None  # jaxkd.config.Quantization of an integer artifact
    activation_ranges: Mapping[str, tuple[float, float]] | None = None

    def replace(self, **changes: Any) -> Artifact:
        return dataclasses.replace(self, **changes)


class Method:
    """A compression method as the trainer calls it; every hook does nothing by default.

    The trainer builds one instance per enabled method and calls, in the order of
    :data:`jaxkd.methods.METHODS`: ``check`` (config rules, before anything is built),
    ``start`` (the weights a copied init starts from), ``check_params`` (against the
    abstract parameters), ``optimizer`` (wrapped from the last method inward, so the first
    is outermost), ``apply`` (the student's forward), ``project`` (after each update, in
    the step), ``prepare`` (a fresh run's starting state), ``export`` (what the artifact
    holds) and ``label`` (the run's name in reports).
    ``check_structure`` runs after each stage of a compression pipeline.
    """

    block = ""  # the config block that switches the method on

    def __init__(self, run: Run):
        self.run = run
        self.settings = getattr(run, self.block) if self.block else None

    @classmethod
    def enabled(cls, run: Run) -> bool:
        return bool(getattr(run, cls.block).enabled)

    def label(self) -> str:
        return self.block

    def check(self) -> None:
        """Rules between this block and the rest of the run; raise ``ConfigError``."""

    def start(self, variables: dict[str, Any], model_kwargs: dict[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The variables (host arrays) and model kwargs a copied init starts from."""
        return variables, model_kwargs

    def check_params(self, params: Any, ctx: Context) -> None:
        """Checks the block against the student's (abstract) parameters."""

    def optimizer(self, tx: optax.GradientTransformation, ctx: Context
                  ) -> optax.GradientTransformation:
        return tx

    def apply(self, apply: Apply, ctx: Context) -> Apply:
        return apply

    def per_example_gradients(self) -> int:
        """How many examples per step the trainer should compute per-example gradients of
        (their mean square reaches the optimizer as ``per_example_grad_sq``); 0 = none."""
        return 0

    def project(self, ctx: Context) -> Callable[[Any, Any], Any] | None:
        """A function ``(params, opt_state) -> params`` applied inside the step after each
        update (a projection onto the method's constraint set), or None."""
        return None

    def prepare(self, state: Any, ctx: Context) -> Any:
        """A fresh run's starting state, after its weights are initialised (a resumed run
        replaces it by its checkpoint, which has the same structure)."""
        return state

    def export(self, artifact: Artifact, state: Any, ctx: Context) -> Artifact:
        return artifact

    @staticmethod
    def check_structure(run: Run, structure: Mapping[str, Any],
                        previous: Mapping[str, Any] | None, *, stage: str) -> None:
        """After a compression stage: raise ``StructureError`` if it broke this method's
        structure (called for every registered method)."""


class StructureError(ConfigError):
    """A compression stage undid the structure an earlier stage made."""


def check_shrinkable(run: Run, field: str) -> None:
    """Physical shrinking (channel pruning, merging) needs an untied mlp or cnn1d."""
    kwargs = run.model.kwargs
    if run.model.name not in ("mlp", "cnn1d"):
        raise ConfigError(f"{field}: physically shrinking layers supports the mlp and cnn1d "
                          f"models, not config.model.name={run.model.name!r}")
    if kwargs.get("tie_hidden") or kwargs.get("tie_convs"):
        raise ConfigError(f"{field}: tied layers (config.model.kwargs.tie_*) cannot shrink "
                          "one at a time")
    if run.quantization.enabled and run.quantization.method == "lsq":
        raise ConfigError(f"{field} with config.quantization.method='lsq' is not supported "
                          "(the learned per-channel steps would need shrinking too)")


def shrunk_kwargs(model_name: str, kwargs: dict[str, Any], params: Any) -> dict[str, Any]:
    """``kwargs`` with the hidden widths (``mlp``) or channels (``cnn1d``) of ``params``."""
    chain = surgery.successors(params)
    widths = tuple(int(np.shape(params[p]["kernel"])[-1]) for p in chain)
    return {**kwargs, ("channels" if model_name == "cnn1d" else "widths"): widths}
