"""How sparse a model is, and whether a later stage kept the zeros pruning made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxkd import layers


def sparsity_report(params: Any, masks: Any = None, *,
                    weights: layers.Weights = layers.FLAX) -> dict[str, float]:
    """``{layer: fraction of zeros in its weight}``, or of False in its weight's mask when
    ``masks`` is given, for every weight. Host floats."""
    source = layers.find(params if masks is None else masks, weights)
    return {p: float(np.mean(np.asarray(v) == 0)) for p, v in source.items()}


def check_sparsity(params: Any, expected: Mapping[str, float], *, masks: Any = None,
                   atol: float = 0.0, weights: layers.Weights = layers.FLAX
                   ) -> dict[str, float]:
    """Checks that a later stage (clustering, quantization, ...) kept the pruning.

    Every layer of ``expected`` must have at least its sparsity (minus ``atol``) of exact
    zeros, and, with ``masks``, every pruned position of every leaf must be exactly 0.
    Returns ``sparsity_report(params)``.

    Raises:
      ValueError: one line naming the layer.
    """
    report = sparsity_report(params, weights=weights)
    for p, want in expected.items():
        if p not in report:
            raise ValueError(f"check_sparsity: {p!r} is no weight of the parameters; "
                             f"layers: {', '.join(report)}")
        if report[p] < want - atol:
            raise ValueError(f"layer {p!r} has sparsity {report[p]:.4f} < expected "
                             f"{want:.4f}: pruned weights became nonzero")
    if masks is not None:
        values = layers.leaves(params)
        for path, m in layers.leaves(masks).items():
            revived = int(np.sum((np.asarray(values[path]) != 0) & ~np.asarray(m, bool)))
            if revived:
                raise ValueError(f"{path!r} has {revived} nonzero weight(s) where its pruning "
                                 "mask is 0")
    return report
