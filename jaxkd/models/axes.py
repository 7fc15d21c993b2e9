"""Logical axes of each model's parameters: what every dimension of a weight *is*.

A rule is ``(regex, axes)``: the first rule whose regex ``re.fullmatch``-es a parameter's
path (``'stage1_block0/conv1/kernel'``) names its trailing dimensions ``axes`` (leading
dimensions, e.g. a convolution's window, get ``None``); a parameter that no rule fits
(scalars) has no logical axes. :mod:`jaxkd.partitioning` maps logical axes onto the mesh
with ``config.mesh.logical``, as Flax's logical partitioning (``nn.logical_to_mesh``) and
MaxText's rule tables do, without touching the modules.

The zoo (MLP, the MNIST-1D CNN, LeNet-5, CIFAR ResNets and WRNs) is made of Dense and Conv
layers with biases and BatchNorm, so one table serves it all (:data:`ZOO`): a kernel's
input channels are ``embed`` and its output channels ``mlp`` (so FSDP shards the first and
tensor parallelism the second), the classifier's outputs are ``vocab``, and every vector
(bias, BatchNorm scale, mean and variance, per-channel LSQ step) follows its layer's
outputs. A model registered with its own axes (``register(name, rules)``) uses those.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Rule = tuple[str, tuple[str | None, ...]]

ZOO: tuple[Rule, ...] = (
    (r"(.*/)?head/kernel", ("embed", "vocab")),
    (r"(.*/)?head/(bias|.*step.*)", ("vocab",)),
    (r".*kernel", ("embed", "mlp")),
    (r".*", ("mlp",)),
)

# Gemma 3 (:mod:`jaxkd.models.gemma`): the tied table is [vocab, embed]; projections into
# heads and the FFN are embed -> mlp, out of them mlp -> embed (Megatron's pairing: tensor
# parallelism splits the first by columns and the second by rows); QK-norm scales are
# per head dimension, replicated.
GEMMA3: tuple[Rule, ...] = (
    (r"embed/embedding", ("vocab", "embed")),
    (r".*/(attn_output|ffn_down)/kernel", ("mlp", "embed")),
    (r".*kernel", ("embed", "mlp")),
    (r".*attn_(q|k)_norm/scale", (None,)),
    (r".*scale", ("embed",)),
)

_RULES: dict[str, tuple[Rule, ...]] = {"gemma3": GEMMA3}


def register(name: str, rules: Sequence[Rule]) -> None:
    """Gives model ``name`` its own logical axes (the zoo's table otherwise)."""
    _RULES[name] = tuple((pattern, tuple(axes)) for pattern, axes in rules)


def rules_of(name: str) -> tuple[Rule, ...]:
    """The logical-axis rules of model ``name``."""
    return _RULES.get(name, ZOO)


def axes_of(path: str, ndim: int, rules: Sequence[Rule]) -> tuple[str | None, ...]:
    """The logical axis of each dimension of the ``ndim``-dimensional parameter at ``path``
    (``None`` for a dimension no rule names)."""
    for pattern, axes in rules:
        if len(axes) <= ndim and re.fullmatch(pattern, path):
            return (None,) * (ndim - len(axes)) + tuple(axes)
    return (None,) * ndim
