"""Quantization in the trainer: QAT's forward, LSQ's steps, and the integer artifact."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from jaxkd import models, quant, schema
from jaxkd.methods.base import Apply, Artifact, Context, Method, StructureError


class Quantization(Method):
    """QAT trains the fake-quantized student (``qat=True``) or PTQ quantizes the float one;
    either way the export calibrates activation ranges and writes integer kernels."""

    block = "quantization"

    def label(self) -> str:
        s = self.settings
        return (f"{'qat' if s.qat else 'ptq'}-w{s.weight_bits}"
                f"{f'a{s.activation_bits}' if s.activation_bits else ''}"
                f"{'-lsq' if s.method == 'lsq' else ''}")

    def check_params(self, params: Any, ctx: Context) -> None:
        with schema.named("config.quantization"):
            quant.validate(self.settings, params)

    def apply(self, apply: Apply, ctx: Context) -> Apply:
        if not self.settings.qat:
            return apply
        return quant.qat_apply(ctx.model, **self.settings.kwargs())

    def prepare(self, state: Any, ctx: Context) -> Any:
        if not (self.settings.qat and self.settings.method == "lsq"):
            return state
        # The learned step sizes join the parameters (LSQ's initialisation on one batch).
        sample = ctx.task.model_inputs(ctx.sample())[0]
        variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                                if state.batch_stats else {})}
        params = jax.device_put(quant.init_qat_params(ctx.model, variables, sample,
                                                      **self.settings.kwargs()), ctx.sharding)
        return ctx.reinit_optimizer(state.replace(params=params))

    def export(self, artifact: Artifact, state: Any, ctx: Context) -> Artifact:
        s = self.settings
        params = artifact.params
        if s.method == "lsq":  # the learned step sizes are part of the quantized model
            params = state.params
        model = ctx.model
        if artifact.model_kwargs != ctx.model_kwargs:
            model = models.get_model(self.run.model.name, num_classes=ctx.info.num_classes,
                                     **artifact.model_kwargs)
        variables = {"params": params, **({"batch_stats": artifact.batch_stats}
                                          if artifact.batch_stats else {})}
        ranges = quant.calibrate(model, variables, ctx.batches(s.calibration_batches),
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
