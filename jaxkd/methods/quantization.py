"""Quantization in the trainer: QAT's forward, its observers and steps, the integer artifact.

QAT (``qat=True``) trains the fake-quantized student: its activation ranges (min/max) or
steps (LSQ) are kept in the training state (``TrainState.collections[OBSERVERS]``, the
learned steps in the parameters) and frozen for evaluation and export, so the artifact's
integer model computes what the QAT eval forward computes. PTQ (``qat=False``) trains in
float and calibrates the ranges on training batches at export. The run is named after
what each layer got (``plan``), not after ``weight_bits`` alone.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import jax

from jaxkd import models, quant, schema
from jaxkd.methods.base import Apply, Artifact, Context, Method, StructureError


class Quantization(Method):
    """QAT trains the fake-quantized student (``qat=True``) or PTQ quantizes the float one;
    either way the export writes integer kernels and static activation scales."""

    block = "quantization"

    def __init__(self, run: Any):
        super().__init__(run)
        self.layer_plan: dict[str, quant.LayerPlan] = {}

    def label(self) -> str:
        """``qat-w4a8``: the weight and activation bits the layers got (``w4/8`` when they
        differ, e.g. the first and last layers kept at 8 bits; ``e8``: int8 embedding
        tables)."""
        s = self.settings
        plan = [lp for lp in self.layer_plan.values() if lp.kind != quant.EMBED]
        weight_bits = sorted({lp.weight_bits for lp in plan}) or [s.weight_bits]
        act_bits = sorted({lp.activation_bits for lp in plan}) or [s.activation_bits]
        act = "/".join(str(b) for b in act_bits if b)
        return (f"{'qat' if s.qat else 'ptq'}-w{'/'.join(map(str, weight_bits))}"
                f"{f'a{act}' if act else ''}"
                f"{f'e{s.embedding_bits}' if s.embedding_bits else ''}"
                f"{'-lsq' if s.method == 'lsq' else ''}")

    def check_params(self, params: Any, ctx: Context) -> None:
        s = self.settings
        with schema.named("config.quantization"):
            quant.validate(s, params)
            self.layer_plan = quant.plan(ctx.model, {"params": params},
                                         ctx.task.example_inputs(ctx.info.input_shape, 1), s)
        if s.weight_bits < 8 and all(lp.weight_bits == 8 for lp in self.layer_plan.values()
                                     if lp.kind != quant.EMBED):
            print(f"jaxkd: warning: config.quantization.weight_bits={s.weight_bits} but no layer "
                  f"is quantized below 8 bits: keep_first_last_8bit keeps "
                  f"{', '.join(self.layer_plan)} at 8 bits", file=sys.stderr, flush=True)

    def apply(self, apply: Apply, ctx: Context) -> Apply:
        if not self.settings.qat:
            return apply
        return quant.qat_apply(ctx.model, **self.settings.kwargs())

    def prepare(self, state: Any, ctx: Context) -> Any:
        s = self.settings
        if not s.qat:
            return state
        variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                                if state.batch_stats else {})}
        sample = ctx.task.model_inputs(ctx.sample())
        observers = quant.init_observers(ctx.model, variables, sample, **s.kwargs())
        if observers:
            state = state.replace(collections={**state.collections, quant.OBSERVERS:
                                               jax.device_put(observers,
                                                              ctx.shardings(observers))})
        if s.method != "lsq":
            return state
        # The learned step sizes join the parameters (LSQ's initialisation on one batch).
        params = quant.init_qat_params(ctx.model, variables, sample, **s.kwargs())
        params = jax.device_put(params, ctx.shardings(params))
        return ctx.reinit_optimizer(state.replace(params=params))

    def export(self, artifact: Artifact, state: Any, ctx: Context) -> Artifact:
        s = self.settings
        params = artifact.params
        if s.method == "lsq":  # the learned step sizes are part of the quantized model
            params = state.params
        if s.qat:  # the ranges QAT trained with, frozen
            ranges = quant.observed_ranges(state.collections.get(quant.OBSERVERS, {}))
        else:
            model = ctx.model
            if artifact.model_kwargs != ctx.model_kwargs:
                model = models.get_model(self.run.model.name, num_classes=ctx.info.num_classes,
                                         **artifact.model_kwargs)
            variables = {"params": params, **({"batch_stats": artifact.batch_stats}
                                              if artifact.batch_stats else {})}
            ranges = quant.calibrate(model, variables,
                                     (ctx.task.model_inputs(b)
                                      for b in ctx.batches(s.calibration_batches)),
                                     method=s.calibration, percentile=s.percentile)
        return artifact.replace(params=params, quantization=s, activation_ranges=ranges)

    @staticmethod
    def check_structure(run: Any, structure: Mapping[str, Any],
                        previous: Mapping[str, Any] | None, *, stage: str) -> None:
        for p, q in structure.get("integers", {}).items():
            lo, hi = quant.int_range(q["bits"], symmetric=False)
            if q["min"] < lo or q["max"] > hi:
                raise StructureError(f"compression stage {stage!r}: the integer kernel of layer "
                                     f"{p!r} spans [{q['min']}, {q['max']}], outside the "
                                     f"{q['bits']}-bit range [{lo}, {hi}]")
