"""Clustering in the trainer: ``config.clustering`` -> :func:`jaxkd.sharing.cluster`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import optax

from jaxkd import schema, sharing
from jaxkd.methods.base import Context, Method, StructureError
from jaxkd.schema import ConfigError


class Clustering(Method):
    """The optimizer trains ``k`` centroids per layer; a fresh run snaps its weights to them.

    Clustering is the second stage of Deep Compression: it starts from trained weights
    (with assignments fixed at a random initialisation only ``k`` numbers per layer would
    be trained), and from a pruned model when pruning comes first; both are refused
    otherwise, in one line saying what to do instead.
    """

    block = "clustering"

    def label(self) -> str:
        return f"cluster{self.settings.num_clusters}"

    def check(self) -> None:
        run = self.run
        if not run.init.method:
            raise ConfigError(
                "config.clustering.enabled=True on a random initialisation would train only "
                f"{self.settings.num_clusters} values per layer: cluster a trained model "
                "(config.init.method='copy' with config.init.teacher_workdir=<its run>, or "
                "config.compression.stages=(..., 'cluster') after it)")
        if run.pruning.enabled and not run.pruning.from_zeros:
            raise ConfigError(
                "config.clustering and config.pruning in one run: the codebooks would be made "
                "before the weights are pruned; prune first, then cluster the pruned model "
                "(config.compression.stages=('prune', 'cluster'))")

    def project(self, ctx: Context) -> Any:
        if not self.settings.reassign_every:
            return None  # the updates keep every weight on its centroid exactly

        def snap(params: Any, opt_state: Any) -> Any:
            # A weight that changed cluster lands on its centroid only up to rounding
            # (w + (c - w)): put every weight exactly on its centroid.
            clusters = sharing.find_cluster_state(opt_state)
            return sharing.materialize(params, clusters.codebooks, clusters.assignments)

        return snap

    def check_params(self, params: Any, ctx: Context) -> None:
        with schema.named("config.clustering"):
            sharing.select_layers(params, self.settings, layer_order=ctx.layer_order)

    def optimizer(self, tx: optax.GradientTransformation, ctx: Context
                  ) -> optax.GradientTransformation:
        return sharing.cluster(tx, params_key="model", layer_order=ctx.layer_order,
                               **self.settings.kwargs())

    def export(self, artifact: Any, state: Any, ctx: Context) -> Any:
        """Checks that the trained weights hold at most ``k`` values per clustered layer
        (``k + 1`` with pruned zeros): a broken invariant is jaxkd's own bug."""
        s = self.settings
        values = sharing.unique_values(jax.device_get(state.params))
        for p in sharing.select_layers(state.params, s, layer_order=ctx.layer_order):
            if values[p] > s.num_clusters + 1:
                raise StructureError(f"layer {p!r} has {values[p]} distinct values after "
                                     f"clustering with num_clusters={s.num_clusters}")
        return artifact

    def prepare(self, state: Any, ctx: Context) -> Any:
        # Snap each clustered kernel to its codebook once; updates keep it clustered.
        clusters = sharing.find_cluster_state(state.opt_state)
        params = jax.jit(sharing.materialize, out_shardings=ctx.shardings(state.params))(
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
            if q is not None and q["distinct"] > k + 1:
                raise StructureError(
                    f"compression stage {stage!r} broke stage 'cluster': the integer kernel "
                    f"of layer {p!r} has {q['distinct']} distinct values > num_clusters + 1 "
                    f"= {k + 1}")
