"""Weight clustering: the weights of a layer share ``k`` trained values (Deep Compression).

Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding", ICLR 2016, Sec. 3; TF-MOT's ``cluster_weights``.
The weights ``w`` of a selected layer share the ``k`` values of a codebook ``c`` (one per
layer, or one per output channel)::

    w_hat = c[a]                          a = argmin_j |w - c_j|        (assignments)
    dL/dc_j = sum_{i : a_i = j} dL/dw_hat_i                              (Han et al., eq. 3)

The centroid gradient is the sum of its members' gradients: the transpose of the gather
``c[a]`` (``centroid_gradients``). Centroids start ``'linear'`` (evenly spaced over
``[min w, max w]``), ``'density'`` (at the quantiles ``(j + 1/2) / k`` of the weights' CDF)
or ``'kmeans++'`` (Arthur & Vassilvitskii, "k-means++", SODA 2007: seeds drawn with
probability proportional to ``D(w)^2``), then ``lloyd_iterations`` Lloyd steps (assign to
the nearest centroid, move each centroid to the mean of its members).

Zeros (pruned weights) stay exactly zero: every codebook has ``k + 1`` entries and the last,
``c[k]``, is pinned at 0; it holds exactly the weights that were 0 when the codebook was
made, never gets another member and never moves. The other weights use ``c[0..k-1]``, so a
layer has ``k`` distinct values, ``k + 1`` if it has zeros, and the indices of its nonzero
weights need ``log2(k)`` bits.

Training (``cluster``): an optax wrapper, like :func:`jaxkd.pruning.masked`. The parameters
keep their usual layout (each clustered weight holds ``c[a]``, so ``model.apply``,
evaluation, QAT and export need nothing new); the state holds the codebooks, the
assignments and the wrapped optimizer's state over the *codebooks* (its trainable leaves
are the centroids, not the weights). Each ``update`` sums the weight gradients into
centroid gradients, runs the optimizer on them, and returns ``c_new[a] - w``. With
``reassign_every = n > 0`` it also keeps a dense latent copy of each weight, trained with
the straight-through gradient ``dL/dw_hat`` (as TF-MOT), and every ``n`` steps re-assigns
each nonzero weight to the centroid nearest its latent value (inside ``jit``, a
``lax.cond``). Wiring in a trainer::

    tx = sharing.cluster(optimizer, num_clusters=16, params_key="model")
    opt_state = tx.init({"model": params, "adapters": adapters})
    state = sharing.find_cluster_state(opt_state)
    params = sharing.materialize(params, state.codebooks, state.assignments)  # snap once

The snap makes every member of a cluster bit-identical, and the updates keep them so (the
state's codebooks then equal the parameters' values exactly). With ``reassign_every > 0`` a
weight that changes cluster lands on its new centroid only up to float rounding
(``w + (c - w)``): snap again with ``materialize`` before exporting. Without training,
``materialize(params, *init_clusters(params, num_clusters=k))`` is post-training
clustering. To keep pruning masks while clustering, put pruning outermost
(``pruning.masked(sharing.cluster(adam, ...), ...)``); the zero centroid alone already keeps
every weight that was 0 at ``init`` at 0.

The keyword arguments are the fields of :class:`jaxkd.config.Clustering`; ``weights``
chooses the leaves and their layout (:mod:`jaxkd.layers`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jaxkd import layers, schema
from jaxkd.config import CLUSTER_INITS, GRANULARITIES, Clustering
from jaxkd.schema import FieldError


def settings(values: dict[str, Any] | Clustering) -> Clustering:
    """The checked :class:`jaxkd.config.Clustering` of keyword arguments (or as given)."""
    return values if isinstance(values, Clustering) else schema.build(Clustering, values)


def select_layers(params: Any, s: Clustering, *, layer_order: Sequence[str] | None = None,
                  weights: layers.Weights = layers.FLAX) -> list[str]:
    """The layers ``s`` clusters, checked against the model's ``params``.

    ``keep_first_last`` skips the first and last layer (:func:`jaxkd.layers.edge_layers`;
    ``layer_order`` is the call order when known).

    Raises:
      FieldError: one line naming the field: a ``layers`` regex matching no layer, nothing
        left after ``keep_first_last``, or ``num_clusters`` above the number of weights of a
        selected layer (per output channel for ``granularity='channel'``).
    """
    weight = layers.find(params, weights)
    paths = list(weight)
    selected = [p for p in paths if re.fullmatch(s.layers, p)]
    if not selected:
        raise FieldError("layers", f"={s.layers!r} matches no layer; layers: "
                                   f"{', '.join(paths) or '(none)'}")
    if s.keep_first_last:
        edges = set(layers.edge_layers(paths, layer_order))
        selected = [p for p in selected if p not in edges]
        if not selected:
            raise FieldError("keep_first_last", f"=True leaves no layer of layers={s.layers!r} "
                                                "to cluster")
    too_small = []
    for p in selected:
        shape = np.shape(weight[p])
        n = math.prod(shape) // (shape[weights.out_axis] if s.granularity == "channel" else 1)
        if s.num_clusters > n:
            too_small.append(f"{p!r} ({n})")
    if too_small:
        per = " per output channel" if s.granularity == "channel" else ""
        raise FieldError("num_clusters", f"={s.num_clusters} is larger than the number of "
                                         f"weights{per} of layer(s) {', '.join(too_small)}")
    return selected


# ----------------------------------------------------------------------------- codebooks


def _nearest(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the centroid nearest each ``x`` (the first on ties): ``[n] x [k] -> [n]``."""
    return jnp.argmin(jnp.abs(x[:, None] - centroids[None, :]), axis=1).astype(jnp.int32)


def _linear_init(x: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    lo = jnp.min(jnp.where(valid, x, jnp.inf))
    hi = jnp.max(jnp.where(valid, x, -jnp.inf))
    return lo + (hi - lo) * jnp.arange(k, dtype=x.dtype) / (k - 1)


def _density_init(x: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    # np.quantile(x[valid], (j + 0.5) / k), method 'linear', without boolean indexing.
    s = jnp.sort(jnp.where(valid, x, jnp.inf))
    n = jnp.sum(valid)
    pos = (jnp.arange(k, dtype=jnp.float32) + 0.5) / k * (n - 1).astype(jnp.float32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    return s[lo] + (pos - lo).astype(x.dtype) * (s[hi] - s[lo])


def _kmeanspp_init(x: jax.Array, valid: jax.Array, k: int, key: jax.Array) -> jax.Array:
    keys = jax.random.split(key, k)
    uniform = jnp.where(valid, 0.0, -jnp.inf)
    first = x[jax.random.categorical(keys[0], uniform)]

    def body(i, carry):
        c, d2 = carry
        p = jnp.where(valid, d2, 0.0)
        logits = jnp.where(jnp.sum(p) > 0, jnp.log(p), uniform)  # all equal: uniform
        new = x[jax.random.categorical(keys[i], logits)]
        return c.at[i].set(new), jnp.minimum(d2, jnp.square(x - new))

    c0 = jnp.zeros((k,), x.dtype).at[0].set(first)
    c, _ = jax.lax.fori_loop(1, k, body, (c0, jnp.square(x - first)))
    return c


def lloyd(x: jax.Array, centroids: jax.Array, iterations: int,
          valid: jax.Array | None = None) -> jax.Array:
    """``iterations`` Lloyd steps of 1-D k-means on the ``valid`` entries of ``x [n]``:
    ``a_i = argmin_j |x_i - c_j|``, then ``c_j = mean{x_i : a_i = j}`` (a centroid without
    members stays put). Returns the centroids ``[k]``."""
    k = centroids.shape[0]
    w = jnp.ones_like(x) if valid is None else valid.astype(x.dtype)

    def step(_, c):
        a = _nearest(x, c)
        sums = jax.ops.segment_sum(x * w, a, k)
        counts = jax.ops.segment_sum(w, a, k)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), c)

    return jax.lax.fori_loop(0, iterations, step, centroids)


def _codebook_1d(x: jax.Array, key: jax.Array, *, k: int, method: str, iterations: int
                 ) -> tuple[jax.Array, jax.Array]:
    valid = x != 0
    if method == "linear":
        c = _linear_init(x, valid, k)
    elif method == "density":
        c = _density_init(x, valid, k)
    else:
        c = _kmeanspp_init(x, valid, k, key)
    c = lloyd(x, c, iterations, valid)
    # At most k distinct nonzero values (an already clustered kernel): they are the
    # codebook, exactly, so re-clustering a clustered model changes nothing.
    s = jnp.sort(jnp.where(valid, x, jnp.inf))
    first = jnp.isfinite(s) & jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]])
    distinct = jnp.sum(first)
    slot = jnp.where(first, jnp.cumsum(first) - 1, k)
    exact = jnp.zeros((k,), x.dtype).at[slot].set(s, mode="drop")
    exact = jnp.where(jnp.arange(k) < distinct, exact, exact[jnp.maximum(distinct - 1, 0)])
    c = jnp.where((distinct > 0) & (distinct <= k), exact, c)
    c = jnp.where(jnp.any(valid), c, 0.0)  # an all-zero vector: every weight is the zero slot
    a = jnp.where(valid, _nearest(x, c), k)
    return jnp.concatenate([c, jnp.zeros((1,), c.dtype)]), a


def _last(x: jax.Array, out_axis: int) -> jax.Array:
    """``x`` with its output axis last (no-op for the Flax layout)."""
    return x if out_axis % x.ndim == x.ndim - 1 else jnp.moveaxis(x, out_axis, -1)


def _back(x: jax.Array, out_axis: int) -> jax.Array:
    return x if out_axis % x.ndim == x.ndim - 1 else jnp.moveaxis(x, -1, out_axis)


@functools.partial(jax.jit, static_argnames=("k", "method", "granularity", "iterations",
                                             "out_axis"))
def _init_codebook(w, key, *, k, method, granularity, iterations, out_axis):
    build = functools.partial(_codebook_1d, k=k, method=method, iterations=iterations)
    if granularity == "layer":
        c, a = build(w.reshape(-1), key)
        return c, a.reshape(w.shape)
    moved = jnp.moveaxis(_last(w, out_axis), -1, 0)
    c, a = jax.vmap(build)(moved.reshape(moved.shape[0], -1),
                           jax.random.split(key, moved.shape[0]))
    return c, _back(jnp.moveaxis(a.reshape(moved.shape), 0, -1), out_axis)


def init_codebook(w: jax.Array, k: int, method: str = "linear", key: jax.Array | None = None,
                  *, granularity: str = "layer", iterations: int = 10, out_axis: int = -1
                  ) -> tuple[jax.Array, jax.Array]:
    """Codebook and assignments of one weight ``w``.

    Initial centroids of the nonzero weights (see the module docstring for the formulas),
    then ``iterations`` Lloyd steps (``lloyd``); each nonzero weight is assigned its nearest
    centroid, each zero the pinned zero centroid ``k``. A weight (or channel) with at most
    ``k`` distinct nonzero values keeps exactly those values as its centroids (sorted; the
    spare slots repeat the largest and get no members).

    Args:
      w: a weight whose output channels are on ``out_axis``.
      k: number of shared values (``>= 2``).
      method: 'linear', 'kmeans++' or 'density'.
      key: PRNG key of 'kmeans++' (default ``PRNGKey(0)``); one split per channel.
      granularity: 'layer' or 'channel' (one codebook per output channel).
      iterations: Lloyd steps after the initialisation.

    Returns:
      ``(centroids, assignments)``: float ``[k + 1]`` ('layer') or ``[C, k + 1]``
      ('channel') with ``centroids[..., k] == 0``, and int32 ``[w.shape]`` in ``[0, k]``.
    """
    s = settings({"num_clusters": k, "init": method, "granularity": granularity,
                  "lloyd_iterations": iterations})
    key = jax.random.PRNGKey(0) if key is None else key
    return _init_codebook(jnp.asarray(w), key, k=s.num_clusters, method=s.init,
                          granularity=s.granularity, iterations=s.lloyd_iterations,
                          out_axis=out_axis)


def clustered_weights(centroids: jax.Array, assignments: jax.Array, out_axis: int = -1
                      ) -> jax.Array:
    """``centroids[assignments]``: per layer ``[m][a]``, per channel ``[C, m]`` with ``a``
    indexing each channel's row along ``out_axis``. Its transpose (the gradient with
    respect to the centroids) sums the gradients of each centroid's members."""
    if centroids.ndim == 1:
        return centroids[assignments]
    a = _last(assignments, out_axis)
    return _back(centroids[jnp.arange(centroids.shape[0]), a], out_axis)


def centroid_gradients(grads: jax.Array, assignments: jax.Array,
                       codebook_shape: Sequence[int], out_axis: int = -1) -> jax.Array:
    """``dL/dc_j = sum_{i: a_i = j} dL/dw_i`` (Han et al. 2016, eq. 3): the vector-Jacobian
    product of ``clustered_weights`` with the weight gradient ``grads``."""
    zeros = jnp.zeros(tuple(codebook_shape), grads.dtype)
    _, vjp = jax.vjp(lambda c: clustered_weights(c, assignments, out_axis), zeros)
    return vjp(grads)[0]


def reassign(latent: jax.Array, centroids: jax.Array, assignments: jax.Array,
             out_axis: int = -1) -> jax.Array:
    """Each weight's nearest nonzero centroid ``argmin_{j < k} |latent - c_j|``; members of
    the zero centroid ``k`` stay there (pruned weights stay pruned)."""
    k = centroids.shape[-1] - 1
    per_channel = centroids.ndim > 1
    x = _last(latent, out_axis) if per_channel else latent
    dist = jnp.abs(x[..., None] - centroids[..., :k])  # per channel: [..., C, k]
    near = jnp.argmin(dist, axis=-1).astype(assignments.dtype)
    near = _back(near, out_axis) if per_channel else near
    return jnp.where(assignments == k, k, near)


def init_clusters(params: Any, *, key: jax.Array | None = None,
                  layer_order: Sequence[str] | None = None,
                  weights: layers.Weights = layers.FLAX, **clustering: Any
                  ) -> tuple[Any, Any]:
    """``(codebooks, assignments)`` of every selected weight, as trees ``{'hidden1':
    {'kernel': c}}`` keyed by layer path. ``key`` defaults to ``PRNGKey(seed)``; layer ``i``
    uses ``fold_in(key, i)``. Works under ``jit``."""
    s = settings(clustering)
    key = jax.random.PRNGKey(s.seed) if key is None else key
    weight = layers.find(params, weights)
    codebooks, assignments = {}, {}
    for i, p in enumerate(select_layers(params, s, layer_order=layer_order, weights=weights)):
        c, a = init_codebook(weight[p], s.num_clusters, s.init, jax.random.fold_in(key, i),
                             granularity=s.granularity, iterations=s.lloyd_iterations,
                             out_axis=weights.out_axis)
        codebooks[(*p.split("/"), "kernel")] = c
        assignments[(*p.split("/"), "kernel")] = a
    return traverse_util.unflatten_dict(codebooks), traverse_util.unflatten_dict(assignments)


_STATE = layers.Weights(name="kernel", min_ndim=0)  # codebook/assignment trees by layer


def _by_layer(tree: Any) -> dict[str, Any]:
    return layers.find(tree, _STATE)


def materialize(params: Any, codebooks: Any, assignments: Any, *,
                weights: layers.Weights = layers.FLAX) -> Any:
    """``params`` with each clustered weight replaced by ``clustered_weights(c, a)``."""
    c, a = _by_layer(codebooks), _by_layer(assignments)
    return layers.map_weights(
        lambda p, w: (clustered_weights(c[p], a[p], weights.out_axis).astype(jnp.result_type(w))
                      if p in c else w), params, weights)


# ----------------------------------------------------------------------------- training


class ClusterState(NamedTuple):
    """State of ``cluster``.

    codebooks: ``{..: {'kernel': [k + 1] or [C, k + 1]}}`` by layer path; the last centroid
      is the pinned 0.
    assignments: int32, shaped like each clustered weight.
    latents: dense weights trained straight-through, for ``reassign_every > 0``; else ``{}``.
    count: updates applied so far.
    inner_state: the wrapped optimizer's state over ``{'params': params with each clustered
      weight replaced by its codebook, 'latents': latents}``.
    """

    codebooks: Any
    assignments: Any
    latents: Any
    count: jax.Array
    inner_state: optax.OptState


def cluster(inner: optax.GradientTransformation, *, key: jax.Array | None = None,
            layer_order: Sequence[str] | None = None, params_key: str | None = None,
            weights: layers.Weights = layers.FLAX, **clustering: Any
            ) -> optax.GradientTransformation:
    """Wraps ``inner`` so that it trains a clustered model.

    ``init(params)`` builds the codebooks (``init_clusters``); ``update(grads, state,
    params)``:

    1. sums the gradient of each clustered weight into its centroids
       (``centroid_gradients``; 0 for the pinned zero centroid) and, with
       ``reassign_every``, passes ``where(a == k, 0, g)`` to the latent weights;
    2. runs ``inner`` on those gradients (every other leaf's gradient as is);
    3. every ``reassign_every`` steps re-assigns the nonzero weights (``reassign``);
    4. returns ``c_new[a_new] - w`` for each clustered weight, so that
       ``optax.apply_updates`` gives the clustered weight (bit-identical members once the
       parameters were snapped with ``materialize``; zeros stay exactly 0).

    Args:
      inner: any optax transformation (the optimizer); it sees codebooks, not weights.
      key: the 'kmeans++' draw; default ``PRNGKey(seed)``.
      layer_order: the layers in call order, for ``keep_first_last``.
      params_key: when the optimizer sees ``{params_key: model params, ...}`` (jaxkd's
        trainer passes ``{'model': ..., 'adapters': ...}``), cluster only that entry.
      weights: which leaves are weights, and their layout (:mod:`jaxkd.layers`).
      **clustering: the fields of :class:`jaxkd.config.Clustering` (``num_clusters``,
        ``init``, ...), checked at once; against the parameters at ``init``.
    """
    s = settings(clustering)
    out_axis = weights.out_axis

    def view(tree: Any) -> Any:
        return tree if params_key is None else tree[params_key]

    def put(tree: Any, sub: Any) -> Any:
        return sub if params_key is None else {**tree, params_key: sub}

    def with_weights(tree: Any, by_layer: dict[str, Any], leaf_of: dict[str, str]) -> Any:
        """``tree`` with the leaves of ``by_layer``'s layers (``leaf_of``: layer -> the
        weight's path in the parameters) replaced; they may change shape."""
        by_leaf = {leaf_of[p]: v for p, v in by_layer.items()}
        return put(tree, layers.map_leaves(lambda path, x: by_leaf.get(path, x), view(tree)))

    def inner_tree(tree: Any, codebooks: Any, latents: Any) -> dict[str, Any]:
        leaf_of = layers.weight_paths(view(tree), weights)
        return {"params": with_weights(tree, _by_layer(codebooks), leaf_of),
                "latents": latents}

    def init(params: Any) -> ClusterState:
        codebooks, assignments = init_clusters(view(params), key=key, layer_order=layer_order,
                                               weights=weights, **s.kwargs())
        latents = {}
        if s.reassign_every:
            weight = layers.find(view(params), weights)
            latents = traverse_util.unflatten_dict({
                (*p.split("/"), "kernel"): jnp.asarray(weight[p])
                for p in _by_layer(assignments)})
        return ClusterState(codebooks=codebooks, assignments=assignments, latents=latents,
                            count=jnp.zeros((), jnp.int32),
                            inner_state=inner.init(inner_tree(params, codebooks, latents)))

    def update(updates: Any, state: ClusterState, params: Any = None
               ) -> tuple[Any, ClusterState]:
        if params is None:
            raise ValueError("sharing.cluster needs the parameters: call "
                             "tx.update(grads, opt_state, params)")
        flat_c, flat_a = _by_layer(state.codebooks), _by_layer(state.assignments)
        flat_l = _by_layer(state.latents)
        leaf_of = layers.weight_paths(view(params), weights)
        weight_grads = layers.find(view(updates), weights)
        centroid_grads, latent_grads = {}, {}
        for p, c in flat_c.items():
            a, g = flat_a[p], weight_grads[p]
            zero = a == c.shape[-1] - 1
            centroid_grads[p] = centroid_gradients(g, a, c.shape, out_axis).at[..., -1].set(0)
            if flat_l:
                latent_grads[p] = jnp.where(zero, 0, g)
        inner_grads = {"params": with_weights(updates, centroid_grads, leaf_of),
                       "latents": _layer_tree(latent_grads)}
        new, inner_state = inner.update(
            inner_grads, state.inner_state, inner_tree(params, state.codebooks, state.latents))
        count = optax.safe_increment(state.count)
        new_leaves = layers.leaves(view(new["params"]))
        new_updates = {p: new_leaves[leaf_of[p]] for p in flat_c}
        latent_updates = _by_layer(new["latents"])
        codebooks, latents = {}, {}
        for p, c in flat_c.items():
            codebooks[p] = (c + new_updates[p].astype(c.dtype)).at[..., -1].set(0)
            if flat_l:
                zero, lat = flat_a[p] == c.shape[-1] - 1, flat_l[p]
                latents[p] = jnp.where(zero, 0, lat + latent_updates[p].astype(lat.dtype))
        assignments = flat_a
        if s.reassign_every:
            assignments = jax.lax.cond(
                count % s.reassign_every == 0,
                lambda: {p: reassign(latents[p], codebooks[p], a, out_axis)
                         for p, a in flat_a.items()},
                lambda: dict(flat_a))
        current = layers.find(view(params), weights)
        steps = {}
        for p, c in codebooks.items():
            w = current[p]
            steps[p] = (clustered_weights(c, assignments[p], out_axis) - w).astype(w.dtype)
            # Keep what optax.apply_updates will compute, w + (c_new - w) with w = c_old
            # (the snapped parameters), so that materialize(params, state) == params exactly.
            old = flat_c[p].astype(w.dtype)
            codebooks[p] = (old + (c.astype(w.dtype) - old)).astype(c.dtype)
        return with_weights(new["params"], steps, leaf_of), ClusterState(
            codebooks=_layer_tree(codebooks), assignments=_layer_tree(assignments),
            latents=_layer_tree(latents) if latents else state.latents,
            count=count, inner_state=inner_state)

    return optax.GradientTransformation(init, update)


def _layer_tree(by_layer: dict[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict({(*p.split("/"), "kernel"): v
                                         for p, v in by_layer.items()})


def find_cluster_state(opt_state: Any) -> ClusterState | None:
    """The (first) ``ClusterState`` inside an optimizer state (e.g. in an ``optax.chain``
    or under ``pruning.masked``), else None."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ClusterState))
             if isinstance(x, ClusterState)]
    return found[0] if found else None


def unique_values(params: Any, *, weights: layers.Weights = layers.FLAX) -> dict[str, int]:
    """``{layer path: number of distinct values of its weight}`` (composition checks: at
    most ``k``, or ``k + 1`` with zeros, per clustered layer)."""
    return {p: int(np.unique(np.asarray(w)).size) for p, w in layers.find(params, weights).items()}


def extract_codebook(kernel: Any, *, granularity: str = "layer"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of a clustered ``kernel`` and each weight's index in them,
    so that ``clustered_weights(codebook, indices) == kernel`` exactly; per channel the
    codebook is ``[C, m]`` (rows padded with their last value)."""
    w = np.asarray(kernel)
    if granularity not in GRANULARITIES:
        raise FieldError("granularity", f"={granularity!r} is not a granularity; allowed: "
                                        f"{', '.join(GRANULARITIES)}")
    if granularity == "layer":
        values, inverse = np.unique(w, return_inverse=True)
        return values, inverse.reshape(w.shape).astype(np.int32)
    rows = [np.unique(w[..., j], return_inverse=True) for j in range(w.shape[-1])]
    m = max(v.size for v, _ in rows)
    codebook = np.stack([np.pad(v, (0, m - v.size), mode="edge") for v, _ in rows])
    indices = np.stack([i.reshape(w.shape[:-1]) for _, i in rows], axis=-1).astype(np.int32)
    return codebook, indices


__all__ = ["CLUSTER_INITS", "ClusterState", "centroid_gradients", "cluster",
           "clustered_weights", "extract_codebook", "find_cluster_state",
           "init_clusters", "init_codebook", "lloyd", "materialize", "reassign",
           "select_layers", "settings", "unique_values"]
