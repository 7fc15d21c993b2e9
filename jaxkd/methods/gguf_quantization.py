"""QAT on llama.cpp's grid in the trainer: the student trains as its GGUF file will hold it.

Every matrix that a GGUF export quantizes is fake-quantized in the student's forward
(:func:`jaxkd.gguf_quant.fake_quant_gemma`: blocks of 32 values, ``Q8_0`` or ``Q4_0``, the
straight-through gradient), and the artifact holds the quantized weights themselves
(:func:`jaxkd.gguf_quant.block_quantize_dequantize`), which
:func:`jaxkd.export.gguf_export.export_gguf_artifact` writes on the same grid losslessly.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import traverse_util

from jaxkd import gguf_quant
from jaxkd.methods.base import Apply, Artifact, Context, Method
from jaxkd.models.gemma import Gemma3
from jaxkd.schema import ConfigError


class GgufQuantization(Method):
    """Weights on llama.cpp's ``Q8_0``/``Q4_0`` grid during training and in the export."""

    block = "gguf_quantization"

    def label(self) -> str:
        return f"qat-{self.settings.qtype.lower()}"

    def check(self) -> None:
        if self.run.quantization.enabled:
            raise ConfigError("config.gguf_quantization and config.quantization are both "
                              "enabled: choose llama.cpp's grid or jaxkd's integer one")
        if self.run.model.name != "gemma3":
            raise ConfigError(f"config.gguf_quantization: llama.cpp's grid is for the gemma3 "
                              f"model, not config.model.name={self.run.model.name!r}")

    def check_params(self, params: Any, ctx: Context) -> None:
        assert isinstance(ctx.model, Gemma3), type(ctx.model)
        for key, value in traverse_util.flatten_dict(dict(params)).items():
            rows = np.shape(value)[0] if key[-1] == "kernel" else np.shape(value)[-1]
            if key[-1] in ("kernel", "embedding") and rows % gguf_quant.BLOCK:
                raise ConfigError(f"config.gguf_quantization: {'/'.join(key)} has rows of "
                                  f"{rows} values, not whole blocks of {gguf_quant.BLOCK}")

    def apply(self, apply: Apply, ctx: Context) -> Apply:
        qtype = self.settings.qtype

        def quantized(variables: Any, *inputs: Any, **kwargs: Any) -> Any:
            params = gguf_quant.fake_quant_gemma(variables["params"], qtype)
            return apply({**variables, "params": params}, *inputs, **kwargs)

        return quantized

    def export(self, artifact: Artifact, state: Any, ctx: Context) -> Artifact:
        params = jax.jit(gguf_quant.fake_quant_gemma, static_argnums=1)(
            artifact.params, self.settings.qtype)
        return artifact.replace(params=params)
