"""Compression methods as the trainer sees them: one plug-in per method, in one order.

Each method is a :class:`~jaxkd.methods.base.Method` whose hooks the trainer calls for
every enabled method, in the order of :data:`METHODS` (see the base class for the hooks).
The order is the pipeline's (prune, cluster, merge, tie, quantize): it names runs
(``fisher-90%>cluster16>qat-w8a8+kd``), runs ``export`` (channels leave before neurons
merge; quantization calibrates the final model) and ``prepare`` (weights are snapped to
their clusters before LSQ measures them); optimizers are wrapped from the last method
inward, so that pruning, the first, is outermost and sees the raw gradients.

Adding a method: a module here with a ``Method`` subclass, its settings block in
:mod:`jaxkd.config` (so configs load without jax), one line in :data:`METHODS`, and a test.
"""

from __future__ import annotations

from jaxkd.config import Run
from jaxkd.methods.base import Artifact, Context, Method, StructureError
from jaxkd.methods.clustering import Clustering
from jaxkd.methods.gguf_quantization import GgufQuantization
from jaxkd.methods.merging import Merging
from jaxkd.methods.pruning import Pruning
from jaxkd.methods.quantization import Quantization
from jaxkd.methods.tying import Tying

METHODS: tuple[type[Method], ...] = (Pruning, Clustering, Merging, Tying, Quantization,
                                     GgufQuantization)


def enabled(run: Run) -> list[Method]:
    """The methods ``run`` switches on, in :data:`METHODS` order, each checked."""
    methods = [cls(run) for cls in METHODS if cls.enabled(run)]
    for m in methods:
        m.check()
    return methods


def label(methods: list[Method], *, distilled: bool) -> str:
    """A short name of what the run did: e.g. ``qat-w4a8+kd`` or
    ``magnitude-90%>cluster16>qat-w8+kd``."""
    return ">".join([m.label() for m in methods] or ["fp32"]) + ("+kd" if distilled else "")


__all__ = ["METHODS", "Artifact", "Context", "Method", "StructureError", "enabled", "label"]
