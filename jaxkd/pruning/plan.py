"""What a pruning config removes in one model: the selected layers and their sparsity."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxkd import layers, schema, surgery
from jaxkd.config import GLOBAL_METHODS, Pruning
from jaxkd.schema import FieldError


@dataclasses.dataclass(frozen=True)
class Plan:
    """``{layer path: final sparsity}`` of one model, by a :class:`jaxkd.config.Pruning`.

    ``global_layers`` share one threshold (``global_magnitude``/``snip``, no override);
    ``end_step`` is resolved (None when -1 and the number of steps is unknown); ``weights``
    says which leaves are weights and where their input and output axes are.
    """

    settings: Pruning
    sparsity: dict[str, float]
    global_layers: tuple[str, ...]
    end_step: int | None
    weights: layers.Weights = layers.FLAX

    def resolved_end_step(self) -> int:
        if self.end_step is None:
            raise FieldError("end_step", "=-1 means the last training step: pass total_steps")
        return self.end_step


def settings(values: dict[str, Any] | Pruning) -> Pruning:
    """The checked :class:`jaxkd.config.Pruning` of keyword arguments (or as given)."""
    return values if isinstance(values, Pruning) else schema.build(Pruning, values)


def make_plan(params: Any, s: Pruning, *, total_steps: int | None = None,
              weights: layers.Weights = layers.FLAX,
              layer_order: Sequence[str] | None = None) -> Plan:
    """Checks ``s`` against a model's parameters and resolves what it prunes.

    ``layer_order``: the layers in call order (for ``keep_first_last``, see
    :func:`jaxkd.layers.edge_layers`).

    Raises:
      FieldError: one line naming the field: a ``layers`` or ``overrides[i].layers`` regex
        that matches no weight, a selection that ``keep_first_last`` leaves empty,
        ``end_step=-1`` resolving to a step <= begin_step, an input size that ``m`` does not
        divide (``n:m``), or a layer whose outputs cannot shrink (``channels``, e.g. the
        ``head``).
    """
    shapes = {p: np.shape(k) for p, k in layers.find(params, weights).items()}
    paths = list(shapes)
    listing = ", ".join(paths) or "(none)"
    if not any(re.fullmatch(s.layers, p) for p in paths):
        raise FieldError("layers", f"={s.layers!r} matches no weight; layers: {listing}")
    for i, override in enumerate(s.overrides):
        if not any(re.fullmatch(override["layers"], p) for p in paths):
            raise FieldError(f"overrides[{i}].layers", f"={override['layers']!r} matches no "
                                                       f"weight; layers: {listing}")
    edges = layers.edge_layers(paths, layer_order) if s.keep_first_last else ()
    sparsity: dict[str, float] = {}
    global_layers = []
    for p in paths:
        override = next((o["sparsity"] for o in s.overrides
                         if re.fullmatch(o["layers"], p)), None)
        if override is not None:
            sparsity[p] = override
        elif re.fullmatch(s.layers, p) and p not in edges:
            sparsity[p] = (s.m - s.n) / s.m if s.pattern == "n:m" else s.sparsity
            if s.method in GLOBAL_METHODS and s.pattern == "unstructured":
                global_layers.append(p)
    if not sparsity:
        raise FieldError("layers", f"={s.layers!r} matches only layers that "
                                   f"keep_first_last=True leaves dense ({', '.join(edges)})")
    if s.pattern == "n:m":
        for p in sparsity:
            fan_in = shapes[p][weights.in_axis]
            if fan_in % s.m:
                raise FieldError("m", f"={s.m} does not divide the input size {fan_in} of "
                                      f"layer {p!r} (pattern 'n:m' groups the input axis)")
    if s.pattern == "channels" and weights == layers.FLAX:  # zoo models shrink physically
        shrinkable = surgery.successors(params)
        for p, value in sparsity.items():
            if value > 0 and p not in shrinkable:
                index = next((i for i, o in enumerate(s.overrides)
                              if re.fullmatch(o["layers"], p)), None)
                field, regex = ("layers", s.layers) if index is None else (
                    f"overrides[{index}].layers", s.overrides[index]["layers"])
                raise FieldError(field, f"={regex!r} selects layer {p!r}, whose outputs cannot "
                                        "shrink with pattern='channels'; shrinkable layers: "
                                        f"{', '.join(shrinkable) or '(none)'}")
    end: int | None = s.end_step
    if s.end_step == -1:
        end = total_steps - 1 if total_steps is not None else None
    if s.schedule == "polynomial" and end is not None and end <= s.begin_step:
        raise FieldError("end_step", f"={s.end_step} (step {end} of total_steps={total_steps}) "
                                     f"must be > begin_step={s.begin_step}")
    return Plan(settings=s, sparsity=sparsity, global_layers=tuple(global_layers),
                end_step=end, weights=weights)
