"""Parameter sharing: weight clustering, similarity merging of neurons, cross-layer tying.

**Weight clustering** (Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks
with Pruning, Trained Quantization and Huffman Coding", ICLR 2016, Sec. 3; TF-MOT's
``cluster_weights``). The weights ``w`` of a selected ``Dense``/``Conv`` kernel share the
``k`` values of a codebook ``c`` (one per layer, or one per output channel)::

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
weights need ``log2(k)`` bits (``pack_indices``).

Training (``cluster``): an optax wrapper, like ``jaxkd.pruning.masked``. The parameters keep
their usual layout (each clustered kernel holds ``c[a]``, so ``model.apply``, evaluation,
QAT and export need nothing new); the state holds the codebooks, the assignments and the
wrapped optimizer's state over the *codebooks* (its trainable leaves are the centroids, not
the kernels). Each ``update`` sums the kernel gradients into centroid gradients, runs the
optimizer on them, and returns ``c_new[a] - w``. With ``reassign_every = n > 0`` it also
keeps a dense latent copy of each kernel, trained with the straight-through gradient
``dL/dw_hat`` (as TF-MOT), and every ``n`` steps re-assigns each nonzero weight to the
centroid nearest its latent value (inside ``jit``, a ``lax.cond``). Wiring in a trainer::

    tx = sharing.cluster(optimizer, config.clustering, params_key="model")
    opt_state = tx.init({"model": params, "adapters": adapters})
    state = sharing.find_cluster_state(opt_state)
    params = sharing.materialize(params, state.codebooks, state.assignments)  # snap once

The snap makes every member of a cluster bit-identical, and the updates keep them so (the
state's codebooks then equal the parameters' values exactly). With ``reassign_every > 0`` a
weight that changes cluster lands on its new centroid only up to float rounding
(``w + (c - w)``): snap again with ``materialize`` before exporting. Without training,
``materialize(params, *init_clusters(params, config.clustering))`` is post-training
clustering. To keep pruning masks while clustering, put pruning outermost
(``pruning.masked(sharing.cluster(adam, ...), ...)``); the zero centroid alone already keeps
every weight that was 0 at ``init`` at 0.

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

**Cross-layer sharing** (Lan et al., "ALBERT: A Lite BERT for Self-supervised Learning of
Language Representations", ICLR 2020): ``tie_params`` keeps one copy per group of
identically shaped layers, ``untie`` rebuilds the full tree for ``model.apply``; training
the tied tree gives the shared copy the sum of its members' gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

INITS = ("linear", "kmeans++", "density")
GRANULARITIES = ("layer", "channel")
METRICS = ("euclidean", "cosine")
MERGE_AT = ("export", "start")
FIRST_LAYERS = ("hidden1", "conv1", "stem_conv")  # the model zoo's first layers
HEAD = "head"


# ----------------------------------------------------------------------------- config


def default_clustering_config() -> ml_collections.ConfigDict:
    """The ``config.clustering`` block, with its defaults (clustering off).

    Fields:
      enabled: cluster this run.
      num_clusters: ``k >= 2`` shared values per layer (or per channel), plus a pinned zero
        centroid for pruned weights; 16 gives 4-bit indices.
      init: initial centroids: 'linear', 'kmeans++' or 'density'.
      granularity: 'layer' (one codebook per kernel) or 'channel' (one per output channel,
        the last kernel axis).
      layers: regex, matched (``re.fullmatch``) against the path of each kernel's layer.
      reassign_every: re-assign weights to their nearest centroid every this many steps
        (from latent dense weights); 0 keeps the assignments made at init (Han et al.).
        The latent kernels are trained by the optimizer too (TF-MOT style): about 1.3x the
        plain step on a dense 784-800-800 MLP (bench/compress_step.py), against <= 1.0x
        with fixed assignments.
      keep_first_last: leave the first layer and the classifier ``head`` unclustered
        (Deep Compression clusters every layer, hence False).
      lloyd_iterations: Lloyd (k-means) steps after the initial centroids; 0 keeps them.
      seed: the draw of 'kmeans++'.
    """
    return ml_collections.ConfigDict({
        "enabled": False,
        "num_clusters": 16,
        "init": "linear",
        "granularity": "layer",
        "layers": ".*",
        "reassign_every": 0,
        "keep_first_last": False,
        "lloyd_iterations": 10,
        "seed": 0,
    })


def _error(field: str, message: str) -> ValueError:
    sep = "" if message.startswith("=") else " "
    return ValueError(f"config.clustering.{field}{sep}{message}")


def _int(value: Any, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise _error(field, f"={value!r} must be an integer >= {minimum}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class ClusteringSettings:
    """A checked ``config.clustering`` block (see ``default_clustering_config``)."""

    num_clusters: int
    init: str
    granularity: str
    layers: str
    reassign_every: int
    keep_first_last: bool
    lloyd_iterations: int
    seed: int


def clustering_settings(config: Mapping[str, Any] | ClusteringSettings | None
                        ) -> ClusteringSettings:
    """Checks the fields of a ``config.clustering`` block that need no model.

    Raises:
      ValueError: in one line naming the field: an unknown field, ``num_clusters < 2``, an
        unknown ``init`` or ``granularity``, a regex that does not compile, a negative
        ``reassign_every`` or ``lloyd_iterations``.
    """
    if isinstance(config, ClusteringSettings):
        return config
    defaults = default_clustering_config()
    config = dict(config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"config.clustering has unknown field(s) {', '.join(unknown)}; "
                         f"fields: {', '.join(defaults)}")
    c = {**defaults.to_dict(), **config}
    init, granularity, pattern = c["init"], c["granularity"], c["layers"]
    if init not in INITS:
        raise _error("init", f"={init!r} is not an init; allowed: {', '.join(INITS)}")
    if granularity not in GRANULARITIES:
        raise _error("granularity", f"={granularity!r} is not a granularity; allowed: "
                                    f"{', '.join(GRANULARITIES)}")
    try:
        re.compile(pattern)
    except (re.error, TypeError) as e:
        raise _error("layers", f"={pattern!r} is not a valid regex: {e}") from None
    return ClusteringSettings(
        num_clusters=_int(c["num_clusters"], "num_clusters", 2), init=init,
        granularity=granularity, layers=pattern,
        reassign_every=_int(c["reassign_every"], "reassign_every", 0),
        keep_first_last=bool(c["keep_first_last"]),
        lloyd_iterations=_int(c["lloyd_iterations"], "lloyd_iterations", 0),
        seed=_int(c["seed"], "seed", 0))


def _path(keys: Sequence[Any]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def kernels(params: Any) -> dict[str, Any]:
    """``{layer path: kernel}`` for every parameter named ``kernel``, in flatten order."""
    flat = traverse_util.flatten_dict(params)
    return {_path(k[:-1]): v for k, v in flat.items() if k[-1] == "kernel"}


def select_layers(params: Any, config: Mapping[str, Any] | ClusteringSettings, *,
                  layer_order: Sequence[str] | None = None) -> list[str]:
    """The layers ``config.clustering`` clusters, checked against the model's ``params``.

    ``keep_first_last`` skips the first layer (``layer_order[0]`` when given, e.g. from
    ``[p for p, _ in jaxkd.quant.find_layers(model, variables, x)]``, else the zoo's
    ``hidden1``/``conv1``/``stem_conv``) and ``head`` (else the last layer).

    Raises:
      ValueError: one line naming the field: a ``layers`` regex matching no layer, nothing
        left after ``keep_first_last``, or ``num_clusters`` above the number of weights of a
        selected layer (per output channel for ``granularity='channel'``).
    """
    s = clustering_settings(config)
    kernel = kernels(params)
    paths = list(kernel)
    selected = [p for p in paths if re.fullmatch(s.layers, p)]
    if not selected:
        raise _error("layers", f"={s.layers!r} matches no layer; layers: "
                               f"{', '.join(paths) or '(none)'}")
    if s.keep_first_last:
        order = list(layer_order) if layer_order else paths
        first = order[0] if layer_order else next((p for p in FIRST_LAYERS if p in paths),
                                                   paths[0])
        edges = {first, HEAD if HEAD in order else order[-1]}
        selected = [p for p in selected if p not in edges]
        if not selected:
            raise _error("keep_first_last", f"=True leaves no layer of "
                                            f"config.clustering.layers={s.layers!r} to cluster")
    too_small = []
    for p in selected:
        shape = np.shape(kernel[p])
        n = math.prod(shape) // (shape[-1] if s.granularity == "channel" else 1)
        if s.num_clusters > n:
            too_small.append(f"{p!r} ({n})")
    if too_small:
        per = " per output channel" if s.granularity == "channel" else ""
        raise _error("num_clusters", f"={s.num_clusters} is larger than the number of weights"
                                     f"{per} of layer(s) {', '.join(too_small)}")
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


@functools.partial(jax.jit, static_argnames=("k", "method", "granularity", "iterations"))
def _init_codebook(w, key, *, k, method, granularity, iterations):
    build = functools.partial(_codebook_1d, k=k, method=method, iterations=iterations)
    if granularity == "layer":
        c, a = build(w.reshape(-1), key)
        return c, a.reshape(w.shape)
    moved = jnp.moveaxis(w, -1, 0)
    c, a = jax.vmap(build)(moved.reshape(moved.shape[0], -1),
                           jax.random.split(key, moved.shape[0]))
    return c, jnp.moveaxis(a.reshape(moved.shape), 0, -1)


def init_codebook(w: jax.Array, k: int, method: str = "linear", key: jax.Array | None = None,
                  *, granularity: str = "layer", iterations: int = 10
                  ) -> tuple[jax.Array, jax.Array]:
    """Codebook and assignments of one kernel ``w``.

    Initial centroids of the nonzero weights (see the module docstring for the formulas),
    then ``iterations`` Lloyd steps (``lloyd``); each nonzero weight is assigned its nearest
    centroid, each zero the pinned zero centroid ``k``. A kernel (or channel) with at most
    ``k`` distinct nonzero values keeps exactly those values as its centroids (sorted; the
    spare slots repeat the largest and get no members).

    Args:
      w: kernel ``[..., C]`` (output channels last).
      k: number of shared values (``>= 2``).
      method: 'linear', 'kmeans++' or 'density'.
      key: PRNG key of 'kmeans++' (default ``PRNGKey(0)``); one split per channel.
      granularity: 'layer' or 'channel' (one codebook per output channel).
      iterations: Lloyd steps after the initialisation.

    Returns:
      ``(centroids, assignments)``: float ``[k + 1]`` ('layer') or ``[C, k + 1]``
      ('channel') with ``centroids[..., k] == 0``, and int32 ``[w.shape]`` in ``[0, k]``.
    """
    if method not in INITS:
        raise _error("init", f"={method!r} is not an init; allowed: {', '.join(INITS)}")
    if granularity not in GRANULARITIES:
        raise _error("granularity", f"={granularity!r} is not a granularity; allowed: "
                                    f"{', '.join(GRANULARITIES)}")
    k = _int(k, "num_clusters", 2)
    key = jax.random.PRNGKey(0) if key is None else key
    return _init_codebook(jnp.asarray(w), key, k=k, method=method, granularity=granularity,
                          iterations=int(iterations))


def clustered_weights(centroids: jax.Array, assignments: jax.Array) -> jax.Array:
    """``centroids[assignments]``: per layer ``[m][a]``, per channel ``[C, m]`` with ``a``
    ``[..., C]`` indexing each channel's row. Its transpose (the gradient with respect to
    the centroids) sums the gradients of each centroid's members."""
    if centroids.ndim == 1:
        return centroids[assignments]
    return centroids[jnp.arange(centroids.shape[0]), assignments]


def centroid_gradients(grads: jax.Array, assignments: jax.Array,
                       codebook_shape: Sequence[int]) -> jax.Array:
    """``dL/dc_j = sum_{i: a_i = j} dL/dw_i`` (Han et al. 2016, eq. 3): the vector-Jacobian
    product of ``clustered_weights`` with the kernel gradient ``grads``."""
    zeros = jnp.zeros(tuple(codebook_shape), grads.dtype)
    _, vjp = jax.vjp(lambda c: clustered_weights(c, assignments), zeros)
    return vjp(grads)[0]


def reassign(latent: jax.Array, centroids: jax.Array, assignments: jax.Array) -> jax.Array:
    """Each weight's nearest nonzero centroid ``argmin_{j < k} |latent - c_j|``; members of
    the zero centroid ``k`` stay there (pruned weights stay pruned)."""
    k = centroids.shape[-1] - 1
    dist = jnp.abs(latent[..., None] - centroids[..., :k])  # per channel: [..., C, k]
    near = jnp.argmin(dist, axis=-1).astype(assignments.dtype)
    return jnp.where(assignments == k, k, near)


def init_clusters(params: Any, config: Mapping[str, Any] | ClusteringSettings, *,
                  key: jax.Array | None = None, layer_order: Sequence[str] | None = None
                  ) -> tuple[Any, Any]:
    """``(codebooks, assignments)`` of every selected kernel, as trees mirroring ``params``
    (``{'hidden1': {'kernel': c}}``). ``key`` defaults to ``PRNGKey(config.seed)``; layer
    ``i`` uses ``fold_in(key, i)``. Works under ``jit``."""
    s = clustering_settings(config)
    key = jax.random.PRNGKey(s.seed) if key is None else key
    kernel = kernels(params)
    codebooks, assignments = {}, {}
    for i, p in enumerate(select_layers(params, s, layer_order=layer_order)):
        c, a = init_codebook(kernel[p], s.num_clusters, s.init, jax.random.fold_in(key, i),
                             granularity=s.granularity, iterations=s.lloyd_iterations)
        codebooks[(*p.split("/"), "kernel")] = c
        assignments[(*p.split("/"), "kernel")] = a
    return traverse_util.unflatten_dict(codebooks), traverse_util.unflatten_dict(assignments)


def _get(tree: Any, keys: Sequence[str]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _replace(tree: Any, keys: Sequence[str], value: Any) -> Any:
    """A copy of the nested dict ``tree`` with ``tree[k0][k1]...`` set to ``value``."""
    if not keys:
        return value
    return {**tree, keys[0]: _replace(tree[keys[0]], keys[1:], value)}


def materialize(params: Any, codebooks: Any, assignments: Any) -> Any:
    """``params`` with each clustered kernel replaced by ``clustered_weights(c, a)``."""
    flat_a = traverse_util.flatten_dict(assignments)
    for keys, c in traverse_util.flatten_dict(codebooks).items():
        params = _replace(params, keys, clustered_weights(c, flat_a[keys]).astype(
            jnp.result_type(_get(params, keys))))
    return params


# ----------------------------------------------------------------------------- training


class ClusterState(NamedTuple):
    """State of ``cluster``.

    codebooks: ``{..: {'kernel': [k + 1] or [C, k + 1]}}`` mirroring the parameters; the
      last centroid is the pinned 0.
    assignments: int32, shaped like each clustered kernel.
    latents: dense kernels trained straight-through, for ``reassign_every > 0``; else ``{}``.
    count: updates applied so far.
    inner_state: the wrapped optimizer's state over ``{'params': params with each clustered
      kernel replaced by its codebook, 'latents': latents}``.
    """

    codebooks: Any
    assignments: Any
    latents: Any
    count: jax.Array
    inner_state: optax.OptState


def cluster(inner: optax.GradientTransformation,
            config: Mapping[str, Any] | ClusteringSettings, *, key: jax.Array | None = None,
            layer_order: Sequence[str] | None = None, params_key: str | None = None
            ) -> optax.GradientTransformation:
    """Wraps ``inner`` so that it trains a clustered model (``config`` = ``config.clustering``).

    ``init(params)`` builds the codebooks (``init_clusters``); ``update(grads, state,
    params)``:

    1. sums the gradient of each clustered kernel into its centroids
       (``centroid_gradients``; 0 for the pinned zero centroid) and, with
       ``reassign_every``, passes ``where(a == k, 0, g)`` to the latent kernels;
    2. runs ``inner`` on those gradients (every other leaf's gradient as is);
    3. every ``reassign_every`` steps re-assigns the nonzero weights (``reassign``);
    4. returns ``c_new[a_new] - w`` for each clustered kernel, so that
       ``optax.apply_updates`` gives the clustered kernel (bit-identical members once the
       parameters were snapped with ``materialize``; zeros stay exactly 0).

    Args:
      inner: any optax transformation (the optimizer); it sees codebooks, not kernels.
      config: the ``config.clustering`` block (checked at once; against the parameters at
        ``init``).
      key: the 'kmeans++' draw; default ``PRNGKey(config.seed)``.
      layer_order: the layers in call order, for ``keep_first_last`` (see ``select_layers``).
      params_key: when the optimizer sees ``{params_key: model params, ...}`` (jaxkd's
        trainer passes ``{'model': ..., 'adapters': ...}``), cluster only that entry.
    """
    s = clustering_settings(config)
    scope = () if params_key is None else (params_key,)

    def inner_tree(tree: Any, codebooks: Any, latents: Any) -> dict[str, Any]:
        for keys, c in traverse_util.flatten_dict(codebooks).items():
            tree = _replace(tree, (*scope, *keys), c)
        return {"params": tree, "latents": latents}

    def init(params: Any) -> ClusterState:
        codebooks, assignments = init_clusters(_get(params, scope), s, key=key,
                                               layer_order=layer_order)
        latents = {}
        if s.reassign_every:
            latents = traverse_util.unflatten_dict({
                keys: jnp.asarray(_get(params, (*scope, *keys)))
                for keys in traverse_util.flatten_dict(assignments)})
        return ClusterState(codebooks=codebooks, assignments=assignments, latents=latents,
                            count=jnp.zeros((), jnp.int32),
                            inner_state=inner.init(inner_tree(params, codebooks, latents)))

    def update(updates: Any, state: ClusterState, params: Any = None
               ) -> tuple[Any, ClusterState]:
        if params is None:
            raise ValueError("sharing.cluster needs the parameters: call "
                             "tx.update(grads, opt_state, params)")
        flat_c = traverse_util.flatten_dict(state.codebooks)
        flat_a = traverse_util.flatten_dict(state.assignments)
        flat_l = traverse_util.flatten_dict(state.latents)
        grads, latent_grads = updates, {}
        for keys, c in flat_c.items():
            a, g = flat_a[keys], _get(updates, (*scope, *keys))
            zero = a == c.shape[-1] - 1
            grads = _replace(grads, (*scope, *keys),
                             centroid_gradients(g, a, c.shape).at[..., -1].set(0))
            if flat_l:
                latent_grads[keys] = jnp.where(zero, 0, g)
        inner_grads = {"params": grads,
                       "latents": traverse_util.unflatten_dict(latent_grads)}
        new, inner_state = inner.update(
            inner_grads, state.inner_state, inner_tree(params, state.codebooks, state.latents))
        count = optax.safe_increment(state.count)
        codebooks, latents = {}, {}
        latent_updates = traverse_util.flatten_dict(new["latents"])
        for keys, c in flat_c.items():
            u = _get(new["params"], (*scope, *keys))
            codebooks[keys] = (c + u.astype(c.dtype)).at[..., -1].set(0)
            if flat_l:
                zero, lat = flat_a[keys] == c.shape[-1] - 1, flat_l[keys]
                latents[keys] = jnp.where(zero, 0, lat + latent_updates[keys].astype(lat.dtype))
        assignments = flat_a
        if s.reassign_every:
            assignments = jax.lax.cond(
                count % s.reassign_every == 0,
                lambda: {k: reassign(latents[k], codebooks[k], a) for k, a in flat_a.items()},
                lambda: dict(flat_a))
        out = new["params"]
        for keys, c in codebooks.items():
            w = _get(params, (*scope, *keys))
            out = _replace(out, (*scope, *keys),
                           (clustered_weights(c, assignments[keys]) - w).astype(w.dtype))
            # Keep what optax.apply_updates will compute, w + (c_new - w) with w = c_old
            # (the snapped parameters), so that materialize(params, state) == params exactly.
            old = flat_c[keys].astype(w.dtype)
            codebooks[keys] = (old + (c.astype(w.dtype) - old)).astype(c.dtype)
        return out, ClusterState(
            codebooks=traverse_util.unflatten_dict(codebooks),
            assignments=traverse_util.unflatten_dict(assignments),
            latents=traverse_util.unflatten_dict(latents) if latents else state.latents,
            count=count, inner_state=inner_state)

    return optax.GradientTransformation(init, update)


def find_cluster_state(opt_state: Any) -> ClusterState | None:
    """The (first) ``ClusterState`` inside an optimizer state (e.g. in an ``optax.chain``
    or under ``pruning.masked``), else None."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ClusterState))
             if isinstance(x, ClusterState)]
    return found[0] if found else None


# ----------------------------------------------------------------------------- inspection


def unique_values(params: Any) -> dict[str, int]:
    """``{layer path: number of distinct values of its kernel}`` (composition checks: at
    most ``k``, or ``k + 1`` with zeros, per clustered layer)."""
    return {p: int(np.unique(np.asarray(w)).size) for p, w in kernels(params).items()}


def extract_codebook(kernel: Any, *, granularity: str = "layer"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of a clustered ``kernel`` and each weight's index in them,
    so that ``clustered_weights(codebook, indices) == kernel`` exactly; per channel the
    codebook is ``[C, m]`` (rows padded with their last value)."""
    w = np.asarray(kernel)
    if granularity not in GRANULARITIES:
        raise _error("granularity", f"={granularity!r} is not a granularity; allowed: "
                                    f"{', '.join(GRANULARITIES)}")
    if granularity == "layer":
        values, inverse = np.unique(w, return_inverse=True)
        return values, inverse.reshape(w.shape).astype(np.int32)
    rows = [np.unique(w[..., j], return_inverse=True) for j in range(w.shape[-1])]
    m = max(v.size for v, _ in rows)
    codebook = np.stack([np.pad(v, (0, m - v.size), mode="edge") for v, _ in rows])
    indices = np.stack([i.reshape(w.shape[:-1]) for _, i in rows], axis=-1).astype(np.int32)
    return codebook, indices


def index_bits(num_values: int) -> int:
    """Bits per index for ``num_values`` codebook entries: ``max(1, ceil(log2(n)))``."""
    return max(1, (int(num_values) - 1).bit_length())


def pack_indices(assignments: Any, bits: int) -> np.ndarray:
    """Packs integer indices in ``[0, 2^bits)`` into ``ceil(n * bits / 8)`` bytes (uint8).

    Bit ``b`` of index ``i`` (row-major) is bit ``i * bits + b`` of the stream, and bit
    ``t`` of the stream is bit ``t % 8`` of byte ``t // 8`` (little-endian): with 4 bits
    the first index is the low nibble of byte 0.
    """
    a = np.asarray(assignments).reshape(-1)
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 32:
        raise ValueError(f"bits={bits!r} must be an integer in [1, 32]")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"pack_indices needs integer indices, got {a.dtype}")
    if a.size and (a.min() < 0 or int(a.max()) >= 2**bits):
        raise ValueError(f"indices in [{a.min()}, {a.max()}] do not fit in {bits} bits")
    planes = (a.astype(np.int64)[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_indices(packed: Any, bits: int, shape: Sequence[int]) -> np.ndarray:
    """Inverse of ``pack_indices``: int32 indices of ``shape``."""
    n = math.prod(shape)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size != -(-n * bits // 8):
        raise ValueError(f"{packed.size} bytes do not hold {n} indices of {bits} bits "
                         f"({-(-n * bits // 8)} bytes)")
    planes = np.unpackbits(packed, count=n * bits, bitorder="little").reshape(n, bits)
    return (planes.astype(np.int64) << np.arange(bits)).sum(1).astype(np.int32).reshape(shape)


# ----------------------------------------------------------------------------- merging


def default_merging_config() -> ml_collections.ConfigDict:
    """The ``config.merging`` block (similarity merging, off by default).

    Fields:
      enabled: merge similar neurons after training (the layers shrink).
      layers: regex over the layers that can shrink (``hidden*`` of ``mlp``, ``conv*`` of
        ``cnn1d``-style models; never ``head``).
      metric: 'euclidean' (merge when ``||v_i - v_j|| < threshold``) or 'cosine' (when the
        cosine similarity ``> threshold``) of the incoming weights and bias.
      threshold: >= 0 for 'euclidean' (0 merges nothing); in [-1, 1] for 'cosine' (1
        merges nothing).
      at: 'export' merges the trained model when it is exported (data-free, as in the
        paper); 'start' merges the weights that ``config.init`` copies (``method='copy'``)
        and then trains the smaller model (merge, then fine-tune).
    """
    return ml_collections.ConfigDict({
        "enabled": False,
        "layers": ".*",
        "metric": "euclidean",
        "threshold": 0.0,
        "at": "export",
    })


def _merge_error(field: str, message: str) -> ValueError:
    return ValueError(f"config.merging.{field}{'' if message.startswith('=') else ' '}{message}")


def _next_layer(params: Mapping[str, Any], layer: str) -> str:
    """The layer that reads ``layer``'s outputs: ``<name><i+1>``, else ``head``."""
    m = re.fullmatch(r"(.*?)(\d+)", layer)
    candidate = f"{m.group(1)}{int(m.group(2)) + 1}" if m else None
    return candidate if candidate in params else HEAD


def _outgoing_rows(kernel: np.ndarray, nxt: np.ndarray, layer: str, next_name: str
                   ) -> np.ndarray:
    """The next layer's kernel as ``[..., C, out]`` with axis -2 this layer's channels
    (a conv followed by a flattening ``head`` reads position-major ``[L * C]`` rows)."""
    c = kernel.shape[-1]
    if nxt.ndim == kernel.ndim and nxt.shape[-2] == c:
        return nxt
    if nxt.ndim == 2 and kernel.ndim > 2 and nxt.shape[0] % c == 0:
        return nxt.reshape(nxt.shape[0] // c, c, nxt.shape[1])
    raise _merge_error("layers", f": layer {layer!r} ({c} outputs) cannot shrink: its next "
                                 f"layer {next_name!r} has kernel shape {nxt.shape}")


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
    if metric not in METRICS:
        raise _merge_error("metric", f"={metric!r} is not a metric; allowed: "
                                     f"{', '.join(METRICS)}")
    lo, hi = (0.0, math.inf) if metric == "euclidean" else (-1.0, 1.0)
    number = isinstance(threshold, int | float | np.floating) and not isinstance(threshold, bool)
    if not number or not lo <= threshold <= hi:  # NaN fails the comparison too
        interval = "[0, inf)" if metric == "euclidean" else "[-1, 1]"
        raise _merge_error("threshold", f"={threshold!r} must be in {interval} for metric "
                                        f"{metric!r}")
    params = dict(params)
    if layer == HEAD or layer not in params or "kernel" not in params[layer]:
        shrinkable = [p for p in params if p != HEAD and "kernel" in params[p]]
        raise _merge_error("layers", f": layer {layer!r} cannot shrink; layers that can: "
                                     f"{', '.join(shrinkable) or '(none)'}")
    next_name = _next_layer(params, layer)
    if next_name not in params:
        raise _merge_error("layers", f": layer {layer!r} has no next layer to absorb merged "
                                     "neurons")
    kernel = np.asarray(params[layer]["kernel"])
    bias = params[layer].get("bias")
    c = kernel.shape[-1]
    v = np.moveaxis(kernel, -1, 0).reshape(c, -1).astype(np.float64)
    if bias is not None:
        v = np.concatenate([v, np.asarray(bias, np.float64)[:, None]], axis=1)
    rows = _outgoing_rows(kernel, np.asarray(params[next_name]["kernel"]), layer, next_name)
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
    new_layer = {**params[layer], "kernel": jnp.asarray(kernel[..., keep])}
    if bias is not None:
        new_layer["bias"] = jnp.asarray(np.asarray(bias)[keep])
    nxt = np.asarray(params[next_name]["kernel"])
    merged = out[..., keep, :].astype(nxt.dtype)
    params[layer] = new_layer
    params[next_name] = {**params[next_name],
                         "kernel": jnp.asarray(merged.reshape(-1, nxt.shape[-1]) if
                                               merged.ndim != nxt.ndim else merged)}
    return params, int(keep.size), pairs


def merge_layers(params: Any, config: Mapping[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, int], dict[str, list[tuple[int, int]]]]:
    """``merge_similar_neurons`` on every shrinkable layer matching ``config.merging.layers``
    (input side first): ``(params, {layer: width}, {layer: merged pairs})``."""
    c = {**default_merging_config().to_dict(), **dict(config)}
    if c["at"] not in MERGE_AT:
        raise _merge_error("at", f"={c['at']!r} is not supported; allowed: "
                                 f"{', '.join(MERGE_AT)}")
    unknown = sorted(set(config) - set(default_merging_config()))
    if unknown:
        raise ValueError(f"config.merging has unknown field(s) {', '.join(unknown)}; fields: "
                         f"{', '.join(default_merging_config())}")
    try:
        re.compile(c["layers"])
    except (re.error, TypeError) as e:
        raise _merge_error("layers", f"={c['layers']!r} is not a valid regex: {e}") from None
    candidates = [p for p in params if p != HEAD and "kernel" in params[p]
                  and re.fullmatch(r".*?\d+", p) and re.fullmatch(c["layers"], p)]
    if not candidates:
        raise _merge_error("layers", f"={c['layers']!r} matches no layer that can shrink; "
                                     f"layers: {', '.join(params)}")
    candidates.sort(key=lambda p: (re.fullmatch(r"(.*?)(\d+)", p).group(1),
                                   int(re.fullmatch(r"(.*?)(\d+)", p).group(2))))
    widths, pairs = {}, {}
    for p in candidates:
        params, widths[p], pairs[p] = merge_similar_neurons(
            params, p, metric=c["metric"], threshold=c["threshold"])
    return params, widths, pairs


# ----------------------------------------------------------------------------- tying


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
