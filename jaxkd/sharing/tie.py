"""Cross-layer parameter sharing: one copy of the weights for several layers (ALBERT).

**Cross-layer sharing** (Lan et al., "ALBERT: A Lite BERT for Self-supervised Learning of
Language Representations", ICLR 2020): ``tie_params`` keeps one copy per group of
identically shaped layers, ``untie`` rebuilds the full tree for ``model.apply``; training
the tied tree gives the shared copy the sum of its members' gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util


def _flat(params: Any) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _members(flat: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``{suffix: leaf}`` of the leaves at ``path`` (a leaf: suffix ``''``) or under it."""
    return {k[len(path):]: v for k, v in flat.items() if k == path or k.startswith(path + "/")}


def _check_groups(flat: Mapping[str, Any], groups: Sequence[Sequence[str]], *,
                  tied: bool) -> None:
    seen: set[str] = set()
    for g, group in enumerate(groups):
        if len(group) < 2:
            raise ValueError(f"groups[{g}]={list(group)!r} must name at least 2 layers to tie")
        for m, path in enumerate(group):
            if path in seen:
                raise ValueError(f"groups[{g}][{m}]={path!r} is in more than one group")
            seen.add(path)
            present = bool(_members(flat, path))
            if (m == 0 or not tied) and not present:
                layers = sorted({k.rsplit("/", 1)[0] for k in flat})
                raise ValueError(f"groups[{g}][{m}]={path!r} is not in the parameters; "
                                 f"layers: {', '.join(layers)}")
            if m > 0 and tied and present:
                raise ValueError(f"groups[{g}][{m}]={path!r} is already present: untie expects "
                                 "the tree from tie_params")
        if not tied:
            ref = {s: np.shape(v) for s, v in _members(flat, group[0]).items()}
            for m, path in enumerate(group[1:], start=1):
                got = {s: np.shape(v) for s, v in _members(flat, path).items()}
                if got != ref:
                    raise ValueError(f"groups[{g}][{m}]={path!r} has parameters {got} but "
                                     f"{group[0]!r} has {ref}; tied layers need the same shapes")


def tie_params(params: Any, groups: Sequence[Sequence[str]]) -> Any:
    """One shared copy per group (ALBERT): ``params`` without the layers ``group[1:]``;
    the copy kept is ``group[0]``'s. Paths are layers (``'hidden2'``) or leaves."""
    flat = _flat(params)
    _check_groups(flat, groups, tied=False)
    drop = {p for group in groups for p in group[1:]}
    kept = {k: v for k, v in flat.items()
            if not any(k == p or k.startswith(p + "/") for p in drop)}
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in kept.items()})


def untie(tied: Any, groups: Sequence[Sequence[str]]) -> Any:
    """The full parameters from ``tie_params``' tree: each ``group[1:]`` layer is a copy of
    ``group[0]``. Differentiable: the shared copy's gradient sums its members'."""
    flat = _flat(tied)
    _check_groups(flat, groups, tied=True)
    for group in groups:
        for suffix, v in _members(flat, group[0]).items():
            for path in group[1:]:
                flat[path + suffix] = v
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def unique_param_count(params: Any, groups: Sequence[Sequence[str]] = ()) -> int:
    """Number of distinct parameter scalars once ``groups`` are tied (full ``params``)."""
    tied = tie_params(params, groups) if groups else params
    return sum(math.prod(np.shape(x)) for x in jax.tree.leaves(tied))
