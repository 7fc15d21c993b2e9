"""Channel pruning made physical: the pruned units leave the model (:mod:`jaxkd.surgery`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util

from jaxkd import layers, surgery


def shrink_channels(params: Any, masks: Any) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Physically removes pruned output neurons/channels: a smaller dense model.

    A channel of a hidden layer is removed when its whole kernel column is masked; its
    kernel column and bias go, and so do the matching input rows of the next layer (for
    ``cnn1d``'s position-major flatten, the rows ``l * C + c`` of the ``head``). A removed
    ReLU unit whose bias is not 0 outputs the constant ``relu(b)``; it is folded into the
    next layer's bias (exact before a Dense layer; a Conv successor sees padding, so there
    the bias must be 0, as ``masked`` with pattern 'channels' makes it).

    Supported: ``mlp`` (``hidden1..K``, ``head``) and ``cnn1d`` (``conv1..K``, ``head``),
    see :func:`jaxkd.surgery.successors`. The logits of ``mlp(widths=widths)`` (or of
    ``cnn1d`` with ``channels=widths``) with the returned parameters equal those of the
    original model with ``params * masks``.

    Returns:
      (params, widths): numpy parameters, and the new output width of every hidden layer in
      order (``hidden1..K`` or ``conv1..K``).
    Raises:
      ValueError: for another family, a layer with every output pruned, or a nonzero bias
        before a Conv.
    """
    successors = surgery.successors(params)
    if not successors:
        raise ValueError("shrink_channels supports the mlp (hidden1..K, head) and cnn1d "
                         f"(conv1..K, head) families; layers: {', '.join(layers.find(params))}")
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    flat_m = {k: np.asarray(v, bool) for k, v in traverse_util.flatten_dict(masks).items()}
    for k, m in flat_m.items():
        if k in flat:
            flat[k] = flat[k] * m
    plan: surgery.Plan = {}
    kept_in = None
    widths = []
    for layer, nxt in successors.items():
        w, b = flat[(layer, "kernel")], flat.get((layer, "bias"))
        column = flat_m.get((layer, "kernel"), np.ones(w.shape, bool))
        keep = column.reshape(-1, column.shape[-1]).any(axis=0)
        if not keep.any():
            raise ValueError(f"shrink_channels: every output of layer {layer!r} is pruned")
        removed = np.flatnonzero(~keep)
        act = np.maximum(b[removed], 0.0) if b is not None else np.zeros(removed.size)
        if np.any(act != 0):
            w_next, b_next = flat[(nxt, "kernel")], flat[(nxt, "bias")]
            if w_next.ndim != 2:
                raise ValueError(f"shrink_channels: pruned channels of {layer!r} have a "
                                 f"nonzero bias and feed the Conv {nxt!r}; mask the bias too")
            rows = surgery.input_rows(removed, keep.size, w_next.shape[0])
            repeats = w_next.shape[0] // keep.size
            flat[(nxt, "bias")] = b_next + np.tile(act, repeats) @ w_next[rows]
        kept = np.flatnonzero(keep)
        plan[(layer,)] = (kept_in, kept)
        kept_in = surgery.input_rows(kept, keep.size, flat[(nxt, "kernel")].shape[-2])
        widths.append(int(keep.sum()))
    plan[(layers.HEAD,)] = (kept_in, None)
    sliced = surgery.slice_variables({("params", *k): v for k, v in flat.items()}, plan)
    return traverse_util.unflatten_dict({k[1:]: v for k, v in sliced.items()}), tuple(widths)
