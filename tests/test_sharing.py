"""jaxkd.sharing against independent numpy formulas: codebook inits, Lloyd, centroid
gradients, the clustering wrapper, index packing, similarity merging and layer tying."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import bitpack, models, schema, sharing
from jaxkd.config import Clustering

K = 8  # clusters in most tests: small layers, visible structure


def config(**fields):
    """The fields of a clustering config (the defaults of jaxkd.config.Clustering otherwise)."""
    return dict(fields)


@pytest.fixture(scope="module")
def mlp():
    """A (16, 16) MLP on [B, 40], with 30 pruned (zero) weights in hidden1."""
    model = models.get_model("mlp", num_classes=10, widths=(16, 16))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 40))
    params = random_params(model, x, seed=1)
    w = np.array(params["hidden1"]["kernel"])
    w.reshape(-1)[np.random.default_rng(0).choice(w.size, 30, replace=False)] = 0.0
    params = {**params, "hidden1": {**params["hidden1"], "kernel": jnp.asarray(w)}}
    return model, params, x


def random_params(model, x, seed, integers=False):
    """Parameters of ``model`` drawn in numpy (no compile of ``model.init``); small integers
    make every sum below exact in float32, so logits compare exactly."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    if integers:
        return jax.tree.map(
            lambda s: jnp.asarray(rng.integers(-3, 4, size=s.shape), jnp.float32), shapes)
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32), shapes)


def weights_with_zeros(shape=(12, 5), seed=0, zeros=7):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    w.reshape(-1)[rng.choice(w.size, zeros, replace=False)] = 0.0
    return w


def np_vectors(w, granularity):
    """The vectors that share one codebook: the whole kernel, or each output channel."""
    if granularity == "layer":
        return [w.reshape(-1)]
    return [w[..., j].reshape(-1) for j in range(w.shape[-1])]


def np_assign(x, c):
    """Nearest centroid of each nonzero weight; zeros get the zero slot len(c)."""
    a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    return np.where(x != 0, a, len(c))


def np_lloyd(x, c, iterations):
    nz = x[x != 0].astype(np.float64)
    c = c.astype(np.float64).copy()
    for _ in range(iterations):
        a = np.argmin(np.abs(nz[:, None] - c[None, :]), axis=1)
        for j in range(len(c)):
            if np.any(a == j):
                c[j] = nz[a == j].mean()
    return c


def np_segment_sum(g, a, codebook_shape):
    out = np.zeros(codebook_shape, np.float64)
    if len(codebook_shape) == 1:
        np.add.at(out, a.reshape(-1), g.reshape(-1))
    else:
        channel = np.broadcast_to(np.arange(g.shape[-1]), g.shape)
        np.add.at(out, (channel.reshape(-1), a.reshape(-1)), g.reshape(-1))
    return out


def codebook_rows(c, granularity):
    return [np.asarray(c)] if granularity == "layer" else list(np.asarray(c))


# ----------------------------------------------------------------------------- codebooks


@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("method", ["linear", "density"])
def test_linear_and_density_init_match_numpy(method, granularity):
    w = weights_with_zeros()
    c, a = sharing.init_codebook(w, 4, method, granularity=granularity, iterations=0)
    assert c.shape == ((5,) if granularity == "layer" else (5, 5)) and a.shape == w.shape
    a_vectors = np_vectors(np.asarray(a), granularity)
    for x, row, got_a in zip(np_vectors(w, granularity), codebook_rows(c, granularity),
                             a_vectors, strict=True):
        nz = x[x != 0].astype(np.float64)
        if method == "linear":  # Han et al.: evenly spaced over [min, max]
            ref = np.linspace(nz.min(), nz.max(), 4)
        else:  # equal-mass quantiles of the weights' CDF
            ref = np.quantile(nz, (np.arange(4) + 0.5) / 4)
        np.testing.assert_allclose(row[:4], ref, rtol=1e-5, atol=1e-6)
        assert row[4] == 0.0
        np.testing.assert_array_equal(got_a, np_assign(x, row[:4].astype(np.float64)))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_lloyd_iterations_match_numpy_kmeans(granularity):
    w = weights_with_zeros(shape=(30, 3), zeros=10, seed=1)
    c0, _ = sharing.init_codebook(w, 5, "linear", granularity=granularity, iterations=0)
    c, a = sharing.init_codebook(w, 5, "linear", granularity=granularity, iterations=4)
    for x, row0, row, got_a in zip(np_vectors(w, granularity), codebook_rows(c0, granularity),
                                   codebook_rows(c, granularity),
                                   np_vectors(np.asarray(a), granularity), strict=True):
        ref = np_lloyd(x, row0[:5], 4)
        assert not np.allclose(ref, row0[:5])  # the iterations moved the centroids
        np.testing.assert_allclose(row[:5], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_a, np_assign(x, row[:5].astype(np.float64)))


def test_kmeans_converges_to_a_lloyd_fixed_point():
    x = weights_with_zeros(shape=(200,), zeros=20, seed=2)
    c, a = sharing.init_codebook(x, 6, "kmeans++", jax.random.PRNGKey(3), iterations=60)
    c, a = np.asarray(c), np.asarray(a)
    for j in range(6):  # every centroid is the mean of its members
        np.testing.assert_allclose(c[j], x[a == j].mean(), rtol=1e-5)
    np.testing.assert_array_equal(a, np_assign(x, c[:6]))


def test_kmeanspp_seeds_with_d_squared_probabilities():
    x = np.array([0.0, 1.0, 2.0, 4.0], np.float32)  # the 0 is pruned: never a seed
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    seeds = jax.vmap(lambda k: sharing.init_codebook(x, 2, "kmeans++", k, iterations=0)[0])(keys)
    seeds = np.asarray(seeds)[:, :2]
    pts = x[1:].astype(np.float64)
    for i, first in enumerate(pts):  # P(first) = 1/3, P(second | first) = d^2 / sum d^2
        d2 = (pts - first) ** 2
        for j, second in enumerate(pts):
            expected = d2[j] / d2.sum() / 3
            freq = np.mean((seeds[:, 0] == first) & (seeds[:, 1] == second))
            assert abs(freq - expected) < 0.03, (i, j, freq, expected)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_centroid_gradient_is_the_segment_sum_of_member_gradients(granularity):
    w = weights_with_zeros(shape=(3, 7, 4), zeros=9)  # a conv1d kernel [k, in, out]
    c, a = sharing.init_codebook(w, 4, "linear", granularity=granularity)
    g = np.random.default_rng(5).normal(size=w.shape).astype(np.float32)
    autodiff = jax.grad(lambda c: jnp.sum(sharing.clustered_weights(c, a) * g))(c)
    ref = np_segment_sum(g, np.asarray(a), c.shape)
    np.testing.assert_allclose(autodiff, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sharing.centroid_gradients(jnp.asarray(g), a, c.shape), ref,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "kmeans++", "density"])
def test_clustering_keeps_zeros_and_has_k_values(mlp, method):
    _, params, _ = mlp
    codebooks, assignments = sharing.init_clusters(params, **config(num_clusters=K, init=method))
    clustered = sharing.materialize(params, codebooks, assignments)
    zero = np.asarray(params["hidden1"]["kernel"]) == 0
    assert zero.sum() == 30
    np.testing.assert_array_equal(np.asarray(clustered["hidden1"]["kernel"]) == 0, zero)
    assert sharing.unique_values(clustered) == {"hidden1": K + 1, "hidden2": K, "head": K}
    np.testing.assert_array_equal(clustered["hidden1"]["bias"], params["hidden1"]["bias"])


# ----------------------------------------------------------------------------- training


def trainer_step(model, x, tx):
    """jaxkd's trainer in miniature: the optimizer sees {'model': params, 'adapters': {}}."""

    def loss(trainable):
        return jnp.mean(jnp.square(model.apply({"params": trainable["model"]}, x)))

    @jax.jit
    def step(trainable, opt_state):
        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, grads

    return step


def test_cluster_wrapper_sgd_step_matches_numpy(mlp):
    model, params, x = mlp
    lr = 0.5
    tx = sharing.cluster(optax.sgd(lr), **config(num_clusters=K), params_key="model")
    opt_state = tx.init({"model": params, "adapters": {}})
    state = sharing.find_cluster_state(opt_state)
    params = sharing.materialize(params, state.codebooks, state.assignments)
    step = trainer_step(model, x, tx)
    trainable, opt_state, grads = step({"model": params, "adapters": {}}, opt_state)
    new = sharing.find_cluster_state(opt_state)
    for layer in ("hidden1", "hidden2", "head"):
        c, a = np.asarray(state.codebooks[layer]["kernel"]), np.asarray(
            state.assignments[layer]["kernel"])
        g = np.asarray(grads["model"][layer]["kernel"])
        ref = c - lr * np_segment_sum(g, a, c.shape)
        ref[-1] = 0.0  # the zero centroid never moves
        got = np.asarray(new.codebooks[layer]["kernel"])
        assert np.abs(got - c).max() > 1e-4  # the centroids trained
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(trainable["model"][layer]["kernel"], ref[a], rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(  # unclustered leaves: plain SGD
            trainable["model"][layer]["bias"],
            np.asarray(params[layer]["bias"]) - lr * np.asarray(grads["model"][layer]["bias"]),
            rtol=1e-5, atol=1e-7)
    assert sharing.unique_values(trainable["model"]) == {"hidden1": K + 1, "hidden2": K,
                                                          "head": K}
    assert int(np.sum(np.asarray(trainable["model"]["hidden1"]["kernel"]) == 0)) == 30


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_cluster_wrapper_with_adam_keeps_structure(mlp, granularity):
    model, params, x = mlp
    tx = sharing.cluster(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
                         **config(num_clusters=K, granularity=granularity), params_key="model")
    opt_state = tx.init({"model": params, "adapters": {}})
    state = sharing.find_cluster_state(opt_state)
    trainable = {"model": sharing.materialize(params, state.codebooks, state.assignments),
                 "adapters": {}}
    step = trainer_step(model, x, tx)
    before = np.asarray(trainable["model"]["hidden1"]["kernel"])
    for _ in range(3):
        trainable, opt_state, _ = step(trainable, opt_state)
    kernel = np.asarray(trainable["model"]["hidden1"]["kernel"])
    np.testing.assert_array_equal(kernel == 0, np.asarray(params["hidden1"]["kernel"]) == 0)
    assert np.abs(kernel - before).max() > 1e-3  # it trained
    if granularity == "layer":
        assert sharing.unique_values(trainable["model"]) == {"hidden1": K + 1, "hidden2": K,
                                                              "head": K}
    else:  # each channel keeps its partition (a channel may leave a centroid empty)
        for j in range(kernel.shape[-1]):
            nonzero = kernel[:, j] != 0
            _, parts = np.unique(kernel[nonzero, j], return_inverse=True)
            _, parts0 = np.unique(before[nonzero, j], return_inverse=True)
            assert parts.max() < K
            np.testing.assert_array_equal(parts, parts0)
    new = sharing.find_cluster_state(opt_state)
    np.testing.assert_array_equal(  # parameters and the state's codebooks agree exactly
        sharing.materialize(trainable["model"], new.codebooks, new.assignments)["hidden2"][
            "kernel"], trainable["model"]["hidden2"]["kernel"])


def test_reassignment_uses_the_nearest_centroid_of_the_latent_weights(mlp):
    model, dense, x = mlp
    lr = 0.2  # the centroids move by lr * (sum over ~80 members): weights change clusters
    tx = sharing.cluster(optax.sgd(lr), **config(num_clusters=K, reassign_every=2))
    opt_state = tx.init(dense)
    state = sharing.find_cluster_state(opt_state)
    params = sharing.materialize(dense, state.codebooks, state.assignments)

    def loss(p):
        return jnp.mean(jnp.square(model.apply({"params": p}, x) - 1.0))

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, g

    p1, s1, g1 = step(params, opt_state)  # count 1: no re-assignment yet
    c1 = sharing.find_cluster_state(s1)
    np.testing.assert_array_equal(c1.assignments["hidden2"]["kernel"],
                                  state.assignments["hidden2"]["kernel"])
    p2, s2, g2 = step(p1, s1)  # count 2: re-assign
    c2 = sharing.find_cluster_state(s2)
    for layer in ("hidden1", "hidden2", "head"):
        a0 = np.asarray(state.assignments[layer]["kernel"])
        zero = a0 == K
        latent = np.asarray(dense[layer]["kernel"], np.float64)  # latents start dense
        for g in (g1, g2):  # straight-through SGD on the latent weights; zeros stay 0
            latent = np.where(zero, 0.0, latent - lr * np.asarray(g[layer]["kernel"]))
        np.testing.assert_allclose(c2.latents[layer]["kernel"], latent, rtol=1e-4, atol=1e-5)
        c = np.asarray(c2.codebooks[layer]["kernel"], np.float64)
        ref = np.where(zero, K, np.argmin(np.abs(latent[..., None] - c[:K]), axis=-1))
        got = np.asarray(c2.assignments[layer]["kernel"])
        assert np.mean(got == ref) > 0.99  # rounding may flip a weight on a boundary
        np.testing.assert_array_equal(got == K, zero)
    moved = np.asarray(c2.assignments["hidden2"]["kernel"]) != np.asarray(
        state.assignments["hidden2"]["kernel"])
    assert moved.any()
    # The parameters hold the clustered weights up to float rounding of the moved ones;
    # materialize snaps them exactly (do it before export).
    snapped = sharing.materialize(p2, c2.codebooks, c2.assignments)
    np.testing.assert_allclose(p2["hidden2"]["kernel"], snapped["hidden2"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    assert sharing.unique_values(snapped) == {"hidden1": K + 1, "hidden2": K, "head": K}


def test_keep_first_last_and_layer_order(mlp):
    _, params, _ = mlp
    assert sharing.select_layers(params, Clustering(keep_first_last=True)) == ["hidden2"]
    assert sharing.select_layers(params, Clustering(keep_first_last=False)) == [
        "head", "hidden1", "hidden2"]
    order = ["hidden2", "hidden1", "head"]  # a model that calls hidden2 first
    assert sharing.select_layers(params, Clustering(keep_first_last=True),
                                 layer_order=order) == ["hidden1"]
    codebooks, _ = sharing.init_clusters(params, **config(keep_first_last=True))
    assert set(codebooks) == {"hidden2"}


# ----------------------------------------------------------------------------- export


def test_clustered_kernel_indices_pack_at_log2_k_bits(mlp):
    _, params, _ = mlp
    codebooks, assignments = sharing.init_clusters(params, **config(num_clusters=16))
    a = np.asarray(assignments["hidden2"]["kernel"])  # [16, 16], no zeros: 4 bits
    assert bitpack.index_bits(16) == 4 and bitpack.index_bits(17) == 5
    packed = bitpack.pack(a, bitpack.index_bits(16))
    assert packed.size == 128  # 256 indices * 4 bits
    np.testing.assert_array_equal(bitpack.unpack(packed, 4, a.shape), a)
    a1 = np.asarray(assignments["hidden1"]["kernel"])  # [40, 16] with zeros: 17 values
    assert bitpack.pack(a1, 5).size == 400
    with pytest.raises(ValueError, match="do not fit in 4 unsigned bits"):
        bitpack.pack(a1, 4)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_extract_codebook_inverts_clustered_weights(mlp, granularity):
    _, params, _ = mlp
    codebooks, assignments = sharing.init_clusters(params, **config(num_clusters=K,
                                                                  granularity=granularity))
    kernel = np.asarray(sharing.materialize(params, codebooks, assignments)["hidden1"]["kernel"])
    codebook, indices = sharing.extract_codebook(kernel, granularity=granularity)
    np.testing.assert_array_equal(sharing.clustered_weights(jnp.asarray(codebook),
                                                            jnp.asarray(indices)), kernel)
    if granularity == "layer":
        assert codebook.shape == (K + 1,)
    else:
        assert codebook.shape[0] == 16 and codebook.shape[1] <= K + 1


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("fields, field", [
    ({"num_clusters": 1}, "num_clusters"),
    ({"num_clusters": 2.5}, "num_clusters"),
    ({"num_clusters": 641}, "num_clusters"),  # hidden1 has 640 weights
    ({"num_clusters": 41, "granularity": "channel"}, "num_clusters"),  # 40 per channel
    ({"layers": "conv.*"}, "layers"),
    ({"layers": "("}, "layers"),
    ({"init": "kmeans"}, "init"),
    ({"granularity": "neuron"}, "granularity"),
    ({"reassign_every": -1}, "reassign_every"),
    ({"lloyd_iterations": -2}, "lloyd_iterations"),
    ({"layers": "hidden1|head", "keep_first_last": True}, "keep_first_last"),
    ({"clusters": 4}, ""),
])
def test_bad_clustering_config_is_one_line_naming_the_field(mlp, fields, field):
    _, params, _ = mlp
    with pytest.raises(ValueError) as e, schema.named("config.clustering"):
        tx = sharing.cluster(optax.sgd(0.1), **fields)
        tx.init(params)
    message = str(e.value)
    assert "\n" not in message
    assert f"config.clustering.{field}" in message if field else "unknown field" in message
    if fields.get("num_clusters") == 641:
        assert "'hidden1' (640)" in message and "'head' (160)" in message
    if fields.get("num_clusters") == 41:
        assert "'hidden1' (40)" in message and "per output channel" in message


# ----------------------------------------------------------------------------- merging


def set_neuron(params, layer, dst, src, scale=1):
    k, b = np.array(params[layer]["kernel"]), np.array(params[layer]["bias"])
    k[..., dst], b[dst] = scale * k[..., src], scale * b[src]
    return {**params, layer: {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}}


def test_merging_exact_duplicates_keeps_logits_exactly(mlp):
    model, params, _ = mlp
    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, size=(8, 40)), jnp.float32)
    params = random_params(model, x, 1, integers=True)
    params = set_neuron(set_neuron(params, "hidden1", 5, 2), "hidden1", 9, 2)
    params = set_neuron(params, "hidden2", 3, 7)
    logits = model.apply({"params": params}, x)

    same, width, pairs = sharing.merge_similar_neurons(params, "hidden1", threshold=0.0)
    assert width == 16 and pairs == []  # threshold 0 merges nothing
    np.testing.assert_array_equal(same["hidden2"]["kernel"], params["hidden2"]["kernel"])

    merged, width, pairs = sharing.merge_similar_neurons(params, "hidden1", threshold=0.5)
    assert width == 14 and pairs == [(2, 5), (2, 9)]
    merged, width2, pairs2 = sharing.merge_similar_neurons(merged, "hidden2", threshold=0.5)
    assert width2 == 15 and pairs2 == [(3, 7)]
    assert merged["hidden1"]["kernel"].shape == (40, 14)
    assert merged["hidden2"]["kernel"].shape == (14, 15)
    assert merged["head"]["kernel"].shape == (15, 10)
    small = models.get_model("mlp", num_classes=10, widths=(14, 15))
    np.testing.assert_array_equal(small.apply({"params": merged}, x), logits)

    via_config, widths, all_pairs = sharing.merge_layers(
        params, layers="hidden.*", threshold=0.5)
    assert widths == {"hidden1": 14, "hidden2": 15}
    assert all_pairs == {"hidden1": [(2, 5), (2, 9)], "hidden2": [(3, 7)]}
    np.testing.assert_array_equal(via_config["head"]["kernel"], merged["head"]["kernel"])


def test_merging_near_duplicates_is_close_and_cosine_scales_exactly(mlp):
    model, params, x = mlp
    k = np.array(params["hidden1"]["kernel"])
    k[:, 4] = k[:, 1] + 1e-4  # nearly the same neuron
    b = np.array(params["hidden1"]["bias"])
    b[4] = b[1]
    near = {**params, "hidden1": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}}
    merged, width, pairs = sharing.merge_similar_neurons(near, "hidden1", threshold=0.01)
    assert (width, pairs) == (15, [(1, 4)])
    small = models.get_model("mlp", num_classes=10, widths=(15, 16))
    logits = model.apply({"params": near}, x)
    got = small.apply({"params": merged}, x)
    assert not np.array_equal(got, logits)
    np.testing.assert_allclose(got, logits, atol=1e-3)

    xi = jnp.asarray(np.random.default_rng(2).integers(-2, 3, size=(8, 40)), jnp.float32)
    scaled = set_neuron(random_params(model, xi, 3, integers=True), "hidden2", 6, 0, scale=2)
    logits = model.apply({"params": scaled}, xi)
    none, width, _ = sharing.merge_similar_neurons(scaled, "hidden2", metric="cosine",
                                                   threshold=1.0)
    assert width == 16
    merged, width, pairs = sharing.merge_similar_neurons(scaled, "hidden2", metric="cosine",
                                                         threshold=0.999)
    assert (width, pairs) == (15, [(0, 6)])
    small = models.get_model("mlp", num_classes=10, widths=(16, 15))
    np.testing.assert_array_equal(small.apply({"params": merged}, xi), logits)


class ConvNet(nn.Module):
    """cnn1d's layout (conv1..3 stride 2, position-major flatten, head) with per-layer
    channels, which a merged network needs."""

    channels: tuple[int, int, int]

    @nn.compact
    def __call__(self, x):
        x = x[..., None]
        for i, (c, k) in enumerate(zip(self.channels, (5, 3, 3), strict=True), start=1):
            x = nn.relu(nn.Conv(c, (k,), strides=(2,), padding=[(1, 1)], name=f"conv{i}")(x))
        return nn.Dense(10, name="head")(x.reshape(x.shape[0], -1))


def test_merging_cnn1d_channels_keeps_logits_exactly():
    x = jnp.asarray(np.random.default_rng(0).integers(-2, 3, size=(4, 40)), jnp.float32)
    big = ConvNet((6, 6, 6))
    params = random_params(big, x, 4, integers=True)
    params = set_neuron(set_neuron(params, "conv1", 4, 0), "conv3", 5, 2)
    logits = big.apply({"params": params}, x)
    merged, widths, pairs = sharing.merge_layers(params, layers="conv.*", threshold=0.5)
    assert widths == {"conv1": 5, "conv2": 6, "conv3": 5}
    assert pairs == {"conv1": [(0, 4)], "conv2": [], "conv3": [(2, 5)]}
    assert merged["head"]["kernel"].shape == (5 * 5, 10)
    np.testing.assert_array_equal(ConvNet((5, 6, 5)).apply({"params": merged}, x), logits)


@pytest.mark.parametrize("kwargs, field", [
    ({"layer": "head", "threshold": 0.1}, "layers"),
    ({"layer": "hidden7", "threshold": 0.1}, "layers"),
    ({"layer": "hidden1", "metric": "l1", "threshold": 0.1}, "metric"),
    ({"layer": "hidden1", "threshold": -1.0}, "threshold"),
    ({"layer": "hidden1", "metric": "cosine", "threshold": 1.5}, "threshold"),
    ({"layer": "hidden1", "threshold": float("nan")}, "threshold"),
])
def test_bad_merging_input_is_one_line_naming_the_field(mlp, kwargs, field):
    _, params, _ = mlp
    with pytest.raises(ValueError) as e, schema.named("config.merging"):
        sharing.merge_similar_neurons(params, **kwargs)
    assert "\n" not in str(e.value) and f"config.merging.{field}" in str(e.value)


# ----------------------------------------------------------------------------- tying


def test_tied_layers_share_one_copy_and_sum_gradients():
    model = models.get_model("mlp", num_classes=10, widths=(16, 16, 16))
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 40))
    params = random_params(model, x, 1)
    groups = [["hidden2", "hidden3"]]
    tied = sharing.tie_params(params, groups)
    assert set(tied) == {"hidden1", "hidden2", "head"}
    full = sharing.untie(tied, groups)
    np.testing.assert_array_equal(full["hidden3"]["kernel"], params["hidden2"]["kernel"])
    np.testing.assert_array_equal(full["hidden3"]["bias"], params["hidden2"]["bias"])
    total = models.count_params(params)
    assert sharing.unique_param_count(params) == total
    assert sharing.unique_param_count(params, groups) == total - (16 * 16 + 16)

    def loss(p):
        return jnp.sum(jnp.square(model.apply({"params": p}, x)))

    g_tied = jax.grad(lambda t: loss(sharing.untie(t, groups)))(tied)
    g_full = jax.grad(loss)(full)
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(
            g_tied["hidden2"][leaf],
            np.asarray(g_full["hidden2"][leaf]) + np.asarray(g_full["hidden3"][leaf]),
            rtol=1e-5, atol=1e-6)

    for bad, match in [([["hidden1", "hidden2"]], "same shapes"),
                       ([["hidden2", "hidden9"]], "not in the parameters"),
                       ([["hidden2"]], "at least 2"),
                       ([["hidden2", "hidden3"], ["hidden3", "hidden1"]], "more than one")]:
        with pytest.raises(ValueError, match=match) as e:
            sharing.tie_params(params, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="already present"):
        sharing.untie(params, groups)
