"""A model's weight matrices in any parameter tree, and which layers are its first and last.

A *weight* is a leaf of a parameter pytree that a :class:`Weights` rule selects (by default
a leaf named ``kernel`` with at least 2 dimensions); its *layer* is its path without the
leaf's name, keys joined by ``/`` (``('stage1_block0', 'conv1', 'kernel')`` ->
``'stage1_block0/conv1'``). The same rule carries the *layout*, where a weight keeps its
input and output features:

- :data:`FLAX` (Linen and NNX): ``Dense`` kernels ``[in, out]``, ``Conv`` kernels
  ``[..., in, out]``: ``out_axis=-1``, ``in_axis=-2``;
- :data:`TORCH` (a PyTorch-style ``{'weight': [out, in]}`` tree, e.g. read from
  safetensors): ``Linear`` ``[out, in]``, ``Conv`` ``[out, in, ...]``: ``out_axis=0``,
  ``in_axis=1``.

Trees may be nested dicts, Flax ``FrozenDict``\\s or Flax NNX ``State``\\s (an NNX
``Variable``'s ``value`` is its array; the ``value`` key is not part of the path). Weights
are listed in the tree's own order (insertion order of its mappings), which for a freshly
initialised Flax model is the order the layers were created in.

**Edge layers** (:func:`edge_layers`), one rule for quantization, pruning and clustering:
the *first* layer is the one that reads the input, the first in the order the model calls
its layers. jaxkd's trainer always knows that order (:func:`jaxkd.quant.find_layers`
traces it) and passes it; a library call on a bare parameter tree may not, and then the
zoo's first layers (``hidden1``, ``conv1``, ``stem_conv``) are recognised by name, else the
tree's first layer is taken (a tree that went through ``jax.tree.map`` has its keys
sorted, so pass the order for other models). The *last* layer is the classifier: the layer
named ``head`` if there is one, else the last in call order (else in the tree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax

HEAD = "head"
FIRST_LAYERS = ("hidden1", "conv1", "stem_conv")  # the zoo's input layers, by name


@dataclasses.dataclass(frozen=True)
class Weights:
    """Which leaves are weights (``name``, at least ``min_ndim`` dimensions, or any
    ``predicate(path_keys, leaf)``) and their layout (``out_axis``, ``in_axis``)."""

    name: str = "kernel"
    min_ndim: int = 2
    out_axis: int = -1
    in_axis: int = -2
    predicate: Callable[[tuple[str, ...], Any], bool] | None = None

    def selects(self, keys: tuple[str, ...], leaf: Any) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(keys, leaf))
        return bool(keys) and keys[-1] == self.name and _ndim(leaf) >= self.min_ndim


FLAX = Weights()
TORCH = Weights(name="weight", out_axis=0, in_axis=1)


def _ndim(leaf: Any) -> int:
    return len(getattr(leaf, "shape", ()))


def _unwrap(node: Any) -> Any:
    """An NNX ``Variable``'s array, else the node."""
    if not isinstance(node, Mapping) and hasattr(node, "get_value") and hasattr(node,
                                                                               "get_metadata"):
        return node.get_value()
    return node


def _walk(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    tree = _unwrap(tree)
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _walk(value, (*prefix, str(key)))
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            yield from _walk(value, (*prefix, str(i)))
    elif tree is not None:
        yield prefix, tree


def key_name(key: Any) -> str:
    """The name of one ``jax.tree_util`` path key (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_keys(path: Sequence[Any]) -> tuple[str, ...]:
    """``jax.tree_util`` path -> names, without the ``value`` of an NNX Variable."""
    keys = tuple(key_name(k) for k in path)
    if keys and keys[-1] == "value" and path and not hasattr(path[-1], "key"):
        keys = keys[:-1]
    return keys


def join(keys: Sequence[Any]) -> str:
    return "/".join(key_name(k) for k in keys)


def find(tree: Any, weights: Weights = FLAX) -> dict[str, Any]:
    """``{layer: weight}`` of every weight of ``tree``, in the tree's order."""
    return {join(keys[:-1]): leaf for keys, leaf in _walk(tree) if weights.selects(keys, leaf)}


def weight_paths(tree: Any, weights: Weights = FLAX) -> dict[str, str]:
    """``{layer: 'layer/leaf'}``: the path of every weight (its key in :func:`leaves`)."""
    return {join(keys[:-1]): join(keys) for keys, leaf in _walk(tree)
            if weights.selects(keys, leaf)}


def leaves(tree: Any) -> dict[str, Any]:
    """``{'layer/leaf': array}`` of every leaf of ``tree``, in the tree's order."""
    return {join(keys): leaf for keys, leaf in _walk(tree)}


def map_weights(fn: Callable[[str, Any], Any], tree: Any, weights: Weights = FLAX) -> Any:
    """``tree`` with every weight replaced by ``fn(layer, weight)`` (same structure)."""

    def visit(path, leaf):
        keys = path_keys(path)
        return fn(join(keys[:-1]), leaf) if weights.selects(keys, leaf) else leaf

    return jax.tree_util.tree_map_with_path(visit, tree)


def map_leaves(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """``tree`` with every leaf replaced by ``fn('layer/leaf', leaf)`` (same structure)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(join(path_keys(p)), x), tree)


def edge_layers(paths: Sequence[str], order: Sequence[str] | None = None) -> tuple[str, ...]:
    """``(first, last)`` of the layers ``paths`` by the module's rule; ``order`` is the
    call order when known. ``()`` for no layer."""
    order = list(order) if order else None
    listed = order or list(paths)
    if not listed:
        return ()
    first = order[0] if order else next((p for p in FIRST_LAYERS if p in paths), listed[0])
    return (first, HEAD if HEAD in listed else listed[-1])
