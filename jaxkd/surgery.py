"""Removing units from a trained network: the one place that slices layers.

Three methods make a network physically smaller and all end here: channel pruning
(:func:`jaxkd.pruning.shrink_channels`: the units whose weights are masked), similarity
merging (:func:`jaxkd.sharing.merge_similar_neurons`: a unit folded into its twin) and
width pruning of a teacher into a student (:mod:`jaxkd.student_init`, Minitron).

Removing unit ``c`` of a layer takes column ``c`` of its kernel (``[..., in, out]``, Flax
layout), its bias and its BatchNorm parameters and statistics, and the inputs that ``c``
fed in the next layer: row ``c`` of a following Dense or Conv, or, after a position-major
flatten of ``[L, C]`` feature maps (the ``cnn1d`` head), rows ``l * C + c`` for every
position ``l`` (:func:`input_rows`).

A *plan* maps a module path (names from the top, e.g. ``('stage1_block0', 'conv1')``) to
``(kept inputs, kept outputs)``, index arrays or None for the whole axis;
:func:`slice_variables` applies it to flattened variables.

Which layers feed which is known for the two chain-shaped zoo families
(:func:`successors`): ``mlp`` (``hidden1..K`` then ``head``) and ``cnn1d`` (``conv1..K``,
a flatten, ``head``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jaxkd import layers

Plan = dict[tuple[str, ...], tuple[np.ndarray | None, np.ndarray | None]]


def successors(params: Mapping[str, Any]) -> dict[str, str]:
    """``{layer: next layer}`` for the layers whose outputs can be removed.

    Supported families (top-level layers only, nothing else with parameters): ``mlp``
    (``hidden1..K`` then ``head``) and ``cnn1d`` (``conv1..K``, flatten, ``head``). The
    ``head`` cannot shrink (its outputs are the classes); other models give ``{}``.
    """
    top = layers.find(params)
    if layers.HEAD not in top or set(top) != set(params) or len(top) < 2:
        return {}
    for prefix, ndim in (("hidden", 2), ("conv", 3)):
        chain = [f"{prefix}{i}" for i in range(1, len(top))]
        if set(chain) != set(top) - {layers.HEAD}:
            continue
        if any(top[p].ndim != ndim for p in chain) or top[layers.HEAD].ndim != 2:
            return {}
        chain.append(layers.HEAD)
        for layer, nxt in zip(chain[:-1], chain[1:], strict=True):
            width, fan_in = top[layer].shape[-1], top[nxt].shape[-2]
            if fan_in != width and not (nxt == layers.HEAD and prefix == "conv"
                                        and fan_in % width == 0):
                return {}
        return dict(zip(chain[:-1], chain[1:], strict=True))
    return {}


def input_rows(kept: np.ndarray, width: int, fan_in: int) -> np.ndarray:
    """Rows of the next layer's kernel that the kept units (indices into ``width``) feed:
    ``kept`` itself, or after a position-major flatten of ``[fan_in / width, width]``
    maps the rows ``l * width + c`` for every position ``l``, in order."""
    positions = fan_in // width
    return (np.arange(positions)[:, None] * width + np.asarray(kept)[None, :]).reshape(-1)


def outgoing_rows(kernel: np.ndarray, next_kernel: np.ndarray) -> np.ndarray | None:
    """The next layer's kernel as ``[..., C, out]`` with axis -2 this layer's ``C`` units
    (a conv followed by a flattening head reads position-major ``[L * C]`` rows); None when
    the shapes do not chain."""
    c = kernel.shape[-1]
    if next_kernel.ndim == kernel.ndim and next_kernel.shape[-2] == c:
        return next_kernel
    if next_kernel.ndim == 2 and kernel.ndim > 2 and next_kernel.shape[0] % c == 0:
        return next_kernel.reshape(next_kernel.shape[0] // c, c, next_kernel.shape[1])
    return None


def slice_variables(flat: Mapping[tuple[str, ...], Any], plan: Plan
                    ) -> dict[tuple[str, ...], np.ndarray]:
    """Applies ``plan`` to flattened ``(collection, *module, leaf)`` variables.

    A ``kernel`` (``[..., in, out]``) keeps its inputs on axis -2 and outputs on axis -1;
    every other leaf (bias, BatchNorm scale/bias/mean/var) is per output unit.
    """
    out = {}
    for key, value in flat.items():
        kept_in, kept_out = plan.get(tuple(key[1:-1]), (None, None))
        value = np.asarray(value)
        if key[-1] == "kernel" and kept_in is not None:
            value = np.take(value, kept_in, axis=-2)
        if kept_out is not None:
            value = np.take(value, kept_out, axis=-1)
        out[key] = value
    return out


def keep_units(params: Mapping[str, Any], layer: str, kept: np.ndarray, next_layer: str
               ) -> dict[str, Any]:
    """``params`` with only the ``kept`` outputs of ``layer`` and the inputs they feed in
    ``next_layer`` (numpy arrays; every other layer as it is)."""
    width = np.shape(params[layer]["kernel"])[-1]
    fan_in = np.shape(params[next_layer]["kernel"])[-2]
    plan: Plan = {(layer,): (None, np.asarray(kept)),
                  (next_layer,): (input_rows(kept, width, fan_in), None)}
    flat = traverse_util.flatten_dict({"params": dict(params)})
    return traverse_util.unflatten_dict(slice_variables(flat, plan))["params"]
