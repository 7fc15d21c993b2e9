"""Similarity merging of neurons: twins fold into one and the layer shrinks.

**Similarity merging** (Srinivas & Babu, "Data-free parameter pruning for Deep Neural
Networks", BMVC 2015): two ReLU neurons ``i, j`` of one layer whose incoming weight vectors
``v = [kernel[..., j], bias[j]]`` are close compute (almost) the same activation, so ``j``
can be removed once its outgoing weights are added to ``i``'s::

    W_next[i, :] += s * W_next[j, :];  delete neuron j
    s = 1 (euclidean: ||v_i - v_j|| < threshold),
    s = ||v_j|| / ||v_i|| (cosine: v_i . v_j / (||v_i|| ||v_j||) > threshold)

ReLU is positively homogeneous, so the merge is exact when ``v_j = v_i`` (euclidean) or
``v_j = s v_i`` with ``s > 0`` (cosine). ``merge_similar_neurons`` shrinks the layer
physically (``mlp`` hidden layers, ``cnn1d``-style conv channels); the smaller ``mlp`` is
``MLP(widths=...)`` with the new widths (``CNN1D`` has one ``channels`` for every conv, so
a merged conv net needs per-layer channels).

The units leave the model through :mod:`jaxkd.surgery`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd import schema, surgery
from jaxkd.config import Merging
from jaxkd.layers import HEAD
from jaxkd.schema import FieldError


def settings(**merging: Any) -> Merging:
    """The checked :class:`jaxkd.config.Merging` of keyword arguments."""
    return schema.build(Merging, merging)


def _next_layer(params: Mapping[str, Any], layer: str) -> str:
    """The layer that reads ``layer``'s outputs: ``<name><i+1>``, else ``head``."""
    m = re.fullmatch(r"(.*?)(\d+)", layer)
    candidate = f"{m.group(1)}{int(m.group(2)) + 1}" if m else None
    return candidate if candidate in params else HEAD


def merge_similar_neurons(params: Any, layer: str, *, metric: str = "euclidean",
                          threshold: float = 0.0
                          ) -> tuple[dict[str, Any], int, list[tuple[int, int]]]:
    """Merges the similar neurons (output channels) of ``layer`` (Srinivas & Babu 2015).

    Pairs ``i < j`` are visited from the most similar down; a pair passing the threshold
    whose neurons are both still present merges ``j`` into ``i``: ``i``'s outgoing weights
    (the next layer's input rows) gain ``s * `` ``j``'s, with ``s = 1`` (euclidean) or
    ``||v_j|| / ||v_i||`` (cosine), and ``j`` is deleted from ``layer``'s kernel and bias
    and from the next layer. Host-side (numpy); the shapes change.

    Args:
      params: ``mlp`` (``hidden1..K``, ``head``) or ``cnn1d``-style (``conv1..K``, a
        position-major flatten, ``head``) parameters.
      layer: the layer to shrink, e.g. ``'hidden1'``; not ``head``.
      metric: 'euclidean' or 'cosine'.
      threshold: see ``default_merging_config``.

    Returns:
      ``(new_params, new_width, merged_pairs)`` with ``merged_pairs`` the ``(kept,
      removed)`` original indices.
    """
    settings(metric=metric, threshold=threshold)
    params = dict(params)
    if layer == HEAD or layer not in params or "kernel" not in params[layer]:
        shrinkable = [p for p in params if p != HEAD and "kernel" in params[p]]
        raise FieldError("layers", f": layer {layer!r} cannot shrink; layers that can: "
                                   f"{', '.join(shrinkable) or '(none)'}")
    next_name = _next_layer(params, layer)
    if next_name not in params:
        raise FieldError("layers", f": layer {layer!r} has no next layer to absorb merged "
                                   "neurons")
    kernel = np.asarray(params[layer]["kernel"])
    bias = params[layer].get("bias")
    c = kernel.shape[-1]
    v = np.moveaxis(kernel, -1, 0).reshape(c, -1).astype(np.float64)
    if bias is not None:
        v = np.concatenate([v, np.asarray(bias, np.float64)[:, None]], axis=1)
    nxt = np.asarray(params[next_name]["kernel"])
    rows = surgery.outgoing_rows(kernel, nxt)
    if rows is None:
        raise FieldError("layers", f": layer {layer!r} ({c} outputs) cannot shrink: its next "
                                   f"layer {next_name!r} has kernel shape {nxt.shape}")
    norms = np.linalg.norm(v, axis=1)
    i, j = np.triu_indices(c, k=1)
    if metric == "euclidean":
        score = np.linalg.norm(v[i] - v[j], axis=1)  # ascending: most similar first
        passing = score < threshold
    else:
        denom = norms[i] * norms[j]
        cosine = np.clip(np.sum(v[i] * v[j], axis=1) / np.maximum(denom, 1e-300), -1.0, 1.0)
        similarity = np.where(denom > 0, cosine, -np.inf)  # a zero vector is like nothing
        score, passing = -similarity, similarity > threshold
    order = np.lexsort((j, i, score))
    removed: set[int] = set()
    pairs: list[tuple[int, int]] = []
    out = np.array(rows, dtype=np.float64)
    for t in order:
        if not passing[t]:
            continue
        a, b = int(i[t]), int(j[t])
        if a in removed or b in removed:
            continue
        s = 1.0 if metric == "euclidean" else norms[b] / norms[a]
        out[..., a, :] += s * out[..., b, :]
        removed.add(b)
        pairs.append((a, b))
    keep = np.array([n for n in range(c) if n not in removed], dtype=np.int64)
    merged = out.astype(nxt.dtype)
    params[next_name] = {**params[next_name], "kernel": merged.reshape(nxt.shape)}
    params = surgery.keep_units(params, layer, keep, next_name)
    return params, int(keep.size), pairs


def merge_layers(params: Any, **merging: Any
                 ) -> tuple[dict[str, Any], dict[str, int], dict[str, list[tuple[int, int]]]]:
    """``merge_similar_neurons`` on every shrinkable layer matching ``layers`` (input side
    first): ``(params, {layer: width}, {layer: merged pairs})``. ``merging``: the fields of
    :class:`jaxkd.config.Merging` (``metric``, ``threshold``, ``layers``, ...)."""
    s = settings(**merging)
    candidates = [p for p in params if p != HEAD and "kernel" in params[p]
                  and re.fullmatch(r".*?\d+", p) and re.fullmatch(s.layers, p)]
    if not candidates:
        raise FieldError("layers", f"={s.layers!r} matches no layer that can shrink; "
                                   f"layers: {', '.join(params)}")
    candidates.sort(key=lambda p: (re.fullmatch(r"(.*?)(\d+)", p).group(1),
                                   int(re.fullmatch(r"(.*?)(\d+)", p).group(2))))
    widths, pairs = {}, {}
    for p in candidates:
        params, widths[p], pairs[p] = merge_similar_neurons(
            params, p, metric=s.metric, threshold=s.threshold)
    return params, widths, pairs
