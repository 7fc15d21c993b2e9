"""Clustering in the trainer: ``config.clustering`` -> :func:`jaxkd.sharing.cluster`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxkd import schema, sharing
from jaxkd.methods.base import Context, Method, StructureError


class Clustering(Method):
    """The optimizer trains ``k`` centroids per layer; a fresh run snaps its weights to them."""

    block = "clustering"

    def label(self) -> str:
        return f"cluster{self.settings.num_clusters}"

    def check_params(self, params: Any, ctx: Context) -> None:
        with schema.named("config.clustering"):
            sharing.select_layers(params, self.settings, layer_order=ctx.layer_order)

    def optimizer(self, tx: optax.GradientTransformation, ctx: Context
                  ) -> optax.GradientTransformation:
        return sharing.cluster(tx, params_key="model", layer_order=ctx.layer_order,
                               **self.settings.kwargs())

    def prepare(self, state: Any, ctx: Context) -> Any:
        # Snap each clustered kernel to its codebook once; updates keep it clustered.
        clusters = sharing.find_cluster_state(state.opt_state)
        params = jax.jit(sharing.materialize, out_shardings=ctx.sharding)(
            state.params, clusters.codebooks, clusters.assignments)
        return state.replace(params=params)

    @staticmethod
    def check_structure(run: Any, structure: Mapping[str, Any],
                        previous: Mapping[str, Any] | None, *, stage: str) -> None:
        if not run.clustering.enabled:
            return
        k = run.clustering.num_clusters
        per_channel = run.clustering.granularity == "channel"
        layers = structure["layers"]
        shapes = {p: {"kernel": np.zeros(v["shape"])} for p, v in layers.items()}
        with schema.named("config.clustering"):
            selected = sharing.select_layers(shapes, run.clustering)
        for p in selected:
            count = layers[p].get("distinct_nonzero_per_channel" if per_channel else
                                  "distinct_nonzero")
            if count is not None and count > k:
                raise StructureError(
                    f"compression stage {stage!r} broke stage 'cluster': layer {p!r} has "
                    f"{count} distinct nonzero values > config.clustering.num_clusters={k}")
        for p in selected if "integers" in structure else ():
            q = structure["integers"].get(p)
            if q is not None and q["distinct_per_channel"] > k + 1:
                raise StructureError(
                    f"compression stage {stage!r} broke stage 'cluster': the integer kernel "
                    f"of layer {p!r} has {q['distinct_per_channel']} distinct values in one "
                    f"output channel > num_clusters + 1 = {k + 1}")
