"""Similarity merging in the trainer: ``config.merging`` at export, or at the start."""

from __future__ import annotations

from typing import Any

import jax

from jaxkd import schema, sharing
from jaxkd.methods.base import Artifact, Context, Method, check_shrinkable, shrunk_kwargs
from jaxkd.schema import ConfigError


class Merging(Method):
    """``at='export'`` merges the trained model (data-free, as the paper); ``at='start'``
    merges the weights ``config.init`` copies and trains the smaller model."""

    block = "merging"

    def label(self) -> str:
        s = self.settings
        return f"merge-{s.metric}{s.threshold:g}{'-then-train' if s.at == 'start' else ''}"

    def check(self) -> None:
        check_shrinkable(self.run, "config.merging.enabled")
        if self.settings.at != "start":
            return
        init = self.run.init
        if init.method != "copy":
            raise ConfigError("config.merging.at='start' merges the weights that config.init "
                              f"copies: set config.init.method='copy' (got {init.method!r})")
        if not (init.teacher_workdir or self.run.distill.teacher.workdir):
            raise ConfigError("config.merging.at='start' needs config.init.teacher_workdir")

    def _merged(self, params: Any, model_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        with schema.named("config.merging"):
            params, _, _ = sharing.merge_layers(jax.device_get(params), **self.settings.kwargs())
        return params, shrunk_kwargs(self.run.model.name, model_kwargs, params)

    def start(self, variables: dict[str, Any], model_kwargs: dict[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.settings.at != "start":
            return variables, model_kwargs
        params, kwargs = self._merged(variables["params"], model_kwargs)
        return {**jax.device_get(variables), "params": params}, kwargs

    def export(self, artifact: Artifact, state: Any, ctx: Context) -> Artifact:
        if self.settings.at != "export":
            return artifact
        params, kwargs = self._merged(artifact.params, artifact.model_kwargs)
        return artifact.replace(params=params, model_kwargs=kwargs)
