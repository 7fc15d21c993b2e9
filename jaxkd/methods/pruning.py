"""Pruning in the trainer: ``config.pruning`` -> :func:`jaxkd.pruning.masked` (outermost)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxkd import pruning, schema
from jaxkd.methods.base import (
    Artifact,
    Context,
    Method,
    StructureError,
    check_shrinkable,
    shrunk_kwargs,
)
from jaxkd.pruning.plan import make_plan


class Pruning(Method):
    """Masks in the optimizer state; pattern 'channels' exports a physically smaller model."""

    block = "pruning"

    def label(self) -> str:
        s = self.settings
        if s.pattern == "n:m":
            return f"{s.method}-{s.n}:{s.m}"
        structured = "channels-" if s.pattern == "channels" else ""
        if s.overrides:  # per-layer sparsities: each override's, in order
            rates = "/".join(str(round(100 * o["sparsity"])) for o in s.overrides)
            return f"{s.method}-{structured}{rates}%"
        return f"{s.method}-{structured}{round(100 * s.sparsity)}%"

    def check(self) -> None:
        if self.settings.pattern == "channels":
            check_shrinkable(self.run, "config.pruning.pattern")

    def per_example_gradients(self) -> int:
        return self.settings.fisher_examples if self.settings.method == "fisher" else 0

    def check_params(self, params: Any, ctx: Context) -> None:
        with schema.named("config.pruning"):
            make_plan(params, self.settings, total_steps=ctx.num_steps,
                      layer_order=ctx.layer_order)

    def optimizer(self, tx: optax.GradientTransformation, ctx: Context
                  ) -> optax.GradientTransformation:
        # Outermost: it needs the raw gradients (Taylor, Fisher, SNIP).
        with schema.named("config.pruning"):
            return pruning.masked(tx, total_steps=ctx.num_steps, params_key="model",
                                  layer_order=ctx.layer_order, **self.settings.kwargs())

    def export(self, artifact: Artifact, state: Any, ctx: Context) -> Artifact:
        if self.settings.pattern != "channels":
            return artifact
        params, _ = pruning.shrink_channels(jax.device_get(artifact.params),
                                            pruning.get_masks(state.opt_state))
        return artifact.replace(params=params, model_kwargs=shrunk_kwargs(
            self.run.model.name, artifact.model_kwargs, params))

    @staticmethod
    def check_structure(run: Any, structure: Mapping[str, Any],
                        previous: Mapping[str, Any] | None, *, stage: str) -> None:
        if not run.pruning.enabled:
            return
        layers = structure["layers"]
        if previous is not None and stage != "prune":
            for p, before in previous["layers"].items():
                now = layers.get(p)
                if now is None:
                    continue
                revived = np.setdiff1d(before["zeros"], now["zeros"]).size
                if revived:
                    raise StructureError(
                        f"compression stage {stage!r} broke stage 'prune': layer {p!r} has "
                        f"{revived} nonzero weight(s) where the pruned model had zeros")
        shapes = {p: {"kernel": np.zeros(v["shape"])} for p, v in layers.items()}
        with schema.named("config.pruning"):
            expected = make_plan(shapes, run.pruning).sparsity
        for p, want in expected.items():
            got = layers[p]["sparsity"]
            if got < want - 0.5 / layers[p]["shape"][-1] - 1e-6:  # rounding to whole units
                raise StructureError(f"compression stage {stage!r}: layer {p!r} has sparsity "
                                     f"{got:.4f} < config.pruning target {want:.4f}")
