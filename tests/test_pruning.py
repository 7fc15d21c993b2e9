"""jaxkd.pruning against independent numpy formulas: schedules, scores, masks, the optax
wrapper (zeros stay zero, the schedule is followed, a sparse MLP still learns) and the
physical channel shrink."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import layers as jaxkd_layers
from jaxkd import models, pruning, schema
from jaxkd.config import Pruning
from jaxkd.pruning import patterns


def config(**fields):
    """The fields of a pruning config (the defaults of jaxkd.config.Pruning otherwise)."""
    return dict(fields)


def plan_of(c, params, **kwargs):
    return pruning.make_plan(params, Pruning(**c), **kwargs)


def init_params(model, x, seed):
    """LeCun-normal kernels and small random biases with the model's shapes (numpy draws:
    cheaper on CPU than compiling Flax's initialisers)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]

    def draw(path, leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 100
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache
def mlp(widths=(32, 32), num_classes=10, seed=0, batch=16):
    """(model, params, x); cached, so tests must not mutate the returned trees."""
    model = models.get_model("mlp", num_classes=num_classes, widths=widths)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, 40)), jnp.float32)
    return model, init_params(model, x, seed + 1), x


def np_polynomial(t, s_i, s_f, begin, end, freq):
    """Zhu & Gupta (2017), eq. 1, evaluated at the last mask update at or before ``t``."""
    updates = [u for u in range(begin, end + 1, freq)] + [end]
    t_q = max([u for u in updates if u <= t], default=begin)
    progress = min(max((t_q - begin) / (end - begin), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


def np_removed(scores, k):
    """Indices (flat, row-major) of the k smallest scores, earlier index first among ties."""
    return np.argsort(np.ravel(scores), kind="stable")[:k]


def np_keep(scores, sparsity):
    keep = np.ones(np.size(scores), bool)
    keep[np_removed(scores, int(round(sparsity * np.size(scores))))] = False
    return keep.reshape(np.shape(scores))


# ----------------------------------------------------------------------------- schedules


def test_polynomial_schedule_matches_zhu_gupta_and_updates_every_frequency_steps():
    s_i, s_f, begin, end, freq = 0.1, 0.8, 10, 100, 20  # 90 is no multiple of 20
    steps = [0, 9, 10, 11, 29, 30, 31, 49, 50, 89, 90, 99, 100, 101, 500]
    got = jax.jit(lambda t: pruning.polynomial_sparsity(
        t, initial_sparsity=s_i, final_sparsity=s_f, begin_step=begin, end_step=end,
        frequency=freq))(jnp.array(steps))
    want = [np_polynomial(t, s_i, s_f, begin, end, freq) for t in steps]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[steps.index(31)] == got[steps.index(49)] < got[steps.index(50)]  # held, then up
    assert got[steps.index(100)] == pytest.approx(s_f) and got[steps.index(99)] < s_f

    plan = plan_of(config(sparsity=s_f, initial_sparsity=s_i, begin_step=begin,
                                   end_step=end, frequency=freq), mlp()[1])
    hits = np.flatnonzero(pruning.is_update_step(plan, jnp.arange(200)))
    assert hits.tolist() == [10, 30, 50, 70, 90, 100]
    target = pruning.target_sparsity(plan, jnp.array(steps))["hidden2"]
    masked_before = [w if t >= begin else 0.0 for t, w in zip(steps, want, strict=True)]
    np.testing.assert_allclose(target, masked_before, rtol=1e-6)

    one = config(schedule="one_shot", sparsity=0.6, begin_step=7)
    plan = plan_of(one, mlp()[1])
    np.testing.assert_allclose(pruning.target_sparsity(plan, jnp.arange(10))["hidden2"],
                               [0.0] * 7 + [0.6] * 3, rtol=1e-6)
    assert np.flatnonzero(pruning.is_update_step(plan, jnp.arange(50))).tolist() == [7]


# ----------------------------------------------------------------------------- scores, masks


def test_scores_match_numpy():
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    np.testing.assert_allclose(pruning.magnitude_scores(w), np.abs(w))
    np.testing.assert_allclose(pruning.taylor_scores(w, g), np.abs(w * g), rtol=1e-6)
    np.testing.assert_allclose(pruning.fisher_scores(w, g**2), g**2 * w**2, rtol=1e-6)
    w2, g2 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    snip = pruning.snip_scores({"a": w, "b": w2}, {"a": g, "b": g2})
    total = np.abs(w * g).sum() + np.abs(w2 * g2).sum()
    np.testing.assert_allclose(snip["a"], np.abs(w * g) / total, rtol=1e-5)
    np.testing.assert_allclose(snip["b"], np.abs(w2 * g2) / total, rtol=1e-5)
    r = pruning.random_scores(jax.random.PRNGKey(3), (50, 4))
    assert r.shape == (50, 4) and 0.0 <= float(r.min()) and float(r.max()) < 1.0
    np.testing.assert_array_equal(r, pruning.random_scores(jax.random.PRNGKey(3), (50, 4)))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_unstructured_mask_removes_exactly_the_k_smallest(sparsity):
    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(size=(7, 9)), 1).astype(np.float32)  # many ties
    mask = np.asarray(jax.jit(pruning.unstructured_mask)(scores, sparsity))
    k = int(round(sparsity * scores.size))
    assert (~mask).sum() == k
    np.testing.assert_array_equal(mask, np_keep(scores, sparsity))
    if 0 < k < scores.size:
        assert scores[~mask].max() <= scores[mask].min()
    ties = np.asarray(pruning.unstructured_mask(np.ones((2, 5)), 0.3))
    np.testing.assert_array_equal(ties.ravel(), [False] * 3 + [True] * 7)


def test_global_masks_use_one_threshold_over_all_layers():
    rng = np.random.default_rng(2)
    scores = {"a": 10 * rng.uniform(size=(8, 4)), "b": rng.uniform(size=(16, 2)),
              "c": 3 * rng.uniform(size=(5,))}
    masks = jax.jit(pruning.global_masks)(scores, 0.5)
    flat = np.concatenate([scores[k].ravel() for k in ("a", "b", "c")])
    keep = np_keep(flat, 0.5)
    got = np.concatenate([np.asarray(masks[k]).ravel() for k in ("a", "b", "c")])
    np.testing.assert_array_equal(got, keep)
    threshold = np.sort(flat)[int(round(0.5 * flat.size)) - 1]
    for k in scores:
        np.testing.assert_array_equal(masks[k], scores[k] > threshold)
    assert np.mean(~np.asarray(masks["b"])) > 0.9 > 0.1 > np.mean(~np.asarray(masks["a"]))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
@pytest.mark.parametrize("shape", [(16, 6), (3, 16, 5)])
def test_n_m_mask_keeps_the_n_largest_of_every_m_along_the_input_axis(n, m, shape):
    scores = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    mask = np.asarray(pruning.n_m_mask(scores, n, m, axis=-2))
    want = np.zeros(shape, bool)
    fan_in = shape[-2]
    for idx in np.ndindex(*shape[:-2], shape[-1]):
        lead, out = idx[:-1], idx[-1]
        column = scores[(*lead, slice(None), out)]
        for g in range(fan_in // m):
            group = column[g * m:(g + 1) * m]
            kept = np.argsort(group, kind="stable")[m - n:] + g * m
            want[(*lead, kept, out)] = True
    np.testing.assert_array_equal(mask, want)
    groups = np.moveaxis(mask, -2, -1).reshape(-1, m)
    assert (groups.sum(-1) == n).all()


@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 6)])
def test_channel_mask_removes_whole_outputs_of_lowest_l1_norm(shape):
    w = np.random.default_rng(4).normal(size=shape).astype(np.float32)
    mask = np.asarray(pruning.channel_mask(pruning.magnitude_scores(w), 0.5))
    l1 = np.abs(w).reshape(-1, shape[-1]).sum(0)
    keep = np_keep(l1, 0.5)
    np.testing.assert_array_equal(mask, np.broadcast_to(keep, shape))
    assert (~keep).sum() == round(0.5 * shape[-1])
    assert l1[~keep].max() <= l1[keep].min()


# ----------------------------------------------------------------------------- the wrapper


@pytest.mark.parametrize("method", ["taylor", "fisher", "snip"])
def test_gradient_scores_use_the_mean_of_the_accumulated_gradients(method):
    _, params, _ = mlp()
    c = config(method=method, schedule="one_shot", begin_step=3, sparsity=0.6,
               keep_first_last=False)
    tx = pruning.masked(optax.sgd(0.0), **c)
    state = tx.init(params)
    update = jax.jit(tx.update)
    rng = np.random.default_rng(5)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(4)]
    # Per-example gradients of 5 examples per step: the Fisher is the mean of their squares.
    examples = [jax.tree.map(lambda p: rng.normal(size=(5, *p.shape)), params) for _ in range(4)]
    per_example_sq = [jax.tree.map(lambda e: jnp.asarray(np.mean(e**2, 0), jnp.float32), e)
                      for e in examples]
    if method == "fisher":
        with pytest.raises(ValueError, match="needs the per-example squared gradients"):
            tx.update(grads[0], state, params)
    for t, g in enumerate(grads):
        extra = {"per_example_grad_sq": per_example_sq[t]} if method == "fisher" else {}
        updates, state = update(g, state, params, **extra)
        if t < 3:
            assert all(np.asarray(m).all() for m in jax.tree.leaves(state.masks))
    layers = ["head", "hidden1", "hidden2"]
    w = {k: np.asarray(params[k]["kernel"]) for k in layers}
    g_mean = {k: np.mean([np.asarray(g[k]["kernel"]) for g in grads], 0) for k in layers}
    abs_gw = {k: np.mean([np.abs(np.asarray(g[k]["kernel"]) * w[k]) for g in grads], 0)
              for k in layers}
    fisher = {k: np.mean([np.mean(e[k]["kernel"] ** 2, 0) for e in examples], 0)
              for k in layers}
    if method == "snip":  # one global ranking of |w g| / sum |w g|
        raw = {k: np.abs(w[k] * g_mean[k]) for k in layers}
        total = sum(v.sum() for v in raw.values())
        flat = np.concatenate([raw[k].ravel() / total for k in layers])
        keep, start, want = np_keep(flat, 0.6), 0, {}
        for k in layers:
            want[k] = keep[start:start + w[k].size].reshape(w[k].shape)
            start += w[k].size
    else:
        # Taylor: |g w| averaged over steps (no cancellation); Fisher: mean_i g_i^2 times w^2.
        score = {k: abs_gw[k] if method == "taylor" else fisher[k] * w[k] ** 2 for k in layers}
        want = {k: np_keep(score[k], 0.6) for k in layers}
    new_params = optax.apply_updates(params, updates)
    for k in layers:
        np.testing.assert_array_equal(state.masks[k]["kernel"], want[k])
        kernel = np.asarray(new_params[k]["kernel"])
        assert (kernel[~want[k]] == 0).all()
        np.testing.assert_array_equal(kernel[want[k]], w[k][want[k]])  # lr 0: untouched
        assert np.asarray(state.masks[k]["bias"]).all()
    assert int(state.stats_count) == 0 and all(
        float(jnp.abs(v).sum()) == 0 for v in jax.tree.leaves(state.grad_stats))
    assert set(jaxkd_layers.find(state.grad_stats, jaxkd_layers.Weights(min_ndim=0))) == set(layers)


def test_the_train_step_gives_fisher_the_mean_square_of_per_example_gradients():
    """What ``make_train_step(per_example=m)`` hands to ``tx.update`` against the per-example
    gradients of a 1-hidden-layer softmax MLP written out by hand in numpy."""
    from jaxkd import objective, train
    from jaxkd.config import supervised_losses

    received = {}

    def capture(grads, state, params=None, *, per_example_grad_sq):
        received["sq"] = per_example_grad_sq
        return jax.tree.map(jnp.zeros_like, grads), state

    tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), capture)
    model = models.get_model("mlp", num_classes=3, widths=(5,))
    terms = objective.parse_terms(supervised_losses(), has_teacher=False)
    step = train.make_train_step(model, tx, objective.build_objective(terms, num_steps=10),
                                 per_example=4)  # not jitted: capture sees the values
    state = train.init_state(model, tx, (6,), 0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 6)).astype(np.float32)
    y = rng.integers(0, 3, 7).astype(np.int32)
    step(state, {"image": x, "label": y}, [])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    sq = {"hidden1": 0.0, "head": 0.0}
    for i in range(4):  # only the first 4 examples
        h = np.maximum(x[i] @ p["hidden1"]["kernel"] + p["hidden1"]["bias"], 0)
        z = h @ p["head"]["kernel"] + p["head"]["bias"]
        dz = np.exp(z - z.max()) / np.exp(z - z.max()).sum() - np.eye(3)[y[i]]
        dh = (p["head"]["kernel"] @ dz) * (h > 0)
        sq["head"] = sq["head"] + np.outer(h, dz) ** 2 / 4
        sq["hidden1"] = sq["hidden1"] + np.outer(x[i], dh) ** 2 / 4
    for layer in sq:
        np.testing.assert_allclose(received["sq"]["model"][layer]["kernel"], sq[layer],
                                   rtol=1e-4, atol=1e-7)


def _wrapped(kind, c):
    if kind == "masked-adam":
        return pruning.masked(optax.adam(1e-2), **c, total_steps=30)
    if kind == "masked-sgd":
        return pruning.masked(optax.sgd(0.1, momentum=0.9), **c, total_steps=30)
    return optax.chain(optax.adam(1e-2), pruning.prune(**c, total_steps=30))


@pytest.mark.parametrize("kind", ["masked-adam", "masked-sgd", "chain-adam"])
def test_pruned_weights_stay_zero_and_sparsity_follows_the_schedule(kind):
    model, params, x = mlp(num_classes=4, batch=64)
    y = jnp.argmax(x[:, :4], -1)
    s_i, s_f, begin, end, freq = 0.1, 0.8, 2, 22, 5
    c = config(sparsity=s_f, initial_sparsity=s_i, begin_step=begin, end_step=end,
               frequency=freq, overrides=({"layers": "head", "sparsity": 0.5},))
    tx = _wrapped(kind, c)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = model.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    previous = None
    for t in range(30):
        params, opt_state = step(params, opt_state)
        masks = pruning.get_masks(opt_state)
        report = pruning.check_sparsity(params, {}, masks=masks)  # masked entries are 0
        for layer, final in (("hidden2", s_f), ("head", 0.5)):
            s_t = np_polynomial(t, min(s_i, final), final, begin, end, freq) if t >= begin else 0
            size = params[layer]["kernel"].size
            assert pruning.sparsity_report(params, masks)[layer] == round(s_t * size) / size
            assert report[layer] >= round(s_t * size) / size
        assert np.asarray(masks["hidden1"]["kernel"]).all()  # keep_first_last
        assert report["hidden1"] == 0.0
        assert all(np.asarray(masks[k]["bias"]).all() for k in ("hidden1", "hidden2", "head"))
        if previous is not None:  # a pruned weight stays pruned
            assert not (np.asarray(masks["hidden2"]["kernel"])
                        & ~np.asarray(previous["hidden2"]["kernel"])).any()
        previous = masks
    assert pruning.sparsity_report(params)["hidden2"] == pytest.approx(0.8, abs=1e-3)


def test_random_pruning_is_seeded_nested_and_exact():
    _, params, _ = mlp()
    c = config(method="random", sparsity=0.7, begin_step=0, end_step=20, frequency=10)
    plan = plan_of(c, params)
    ones = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    m10 = pruning.compute_masks(plan, params, ones, {}, 10)
    m20 = pruning.compute_masks(plan, params, m10, {}, 20)
    h10, h20 = np.asarray(m10["hidden2"]["kernel"]), np.asarray(m20["hidden2"]["kernel"])
    s10 = np_polynomial(10, 0.0, 0.7, 0, 20, 10)
    assert (~h10).sum() == round(s10 * h10.size) and (~h20).sum() == round(0.7 * h20.size)
    assert not (h20 & ~h10).any()
    np.testing.assert_array_equal(
        h10, pruning.compute_masks(plan, params, ones, {}, 10)["hidden2"]["kernel"])
    other = plan_of(config(method="random", sparsity=0.7, begin_step=0, end_step=20,
                                    frequency=10, seed=1), params)
    assert (np.asarray(pruning.compute_masks(other, params, ones, {}, 10)["hidden2"]["kernel"])
            != h10).any()


def test_masks_only_shrink_with_exact_counts_when_live_weights_tie_with_pruned_ones():
    _, params, _ = mlp()
    kernel = np.asarray(params["hidden2"]["kernel"]).copy().ravel()
    kernel[:600] = 0.0  # live weights that score 0, like the pruned ones
    kernel[-300:] = 0.0  # pruned earlier
    params = {**params, "hidden2": {**params["hidden2"], "kernel": kernel.reshape(32, 32)}}
    old = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    old["hidden2"]["kernel"] = jnp.asarray(np.arange(1024) < 1024 - 300).reshape(32, 32)
    plan = plan_of(config(schedule="one_shot", sparsity=0.5), params)
    new = np.asarray(pruning.compute_masks(plan, params, old, {}, 0)["hidden2"]["kernel"])
    assert (~new).sum() == 512
    assert not new.ravel()[-300:].any()  # still pruned
    np.testing.assert_array_equal(new.ravel()[:600], np.arange(600) >= 212)


def test_the_inner_optimizer_sees_only_the_gradients_of_live_weights():
    _, params, _ = mlp()
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    c = config(schedule="one_shot", sparsity=0.5, layers="hidden2")
    tx = pruning.masked(inner, **c)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params),
                                        params)
    keep = np.asarray(state.masks["hidden2"]["kernel"])
    live = sum(p.size for p in jax.tree.leaves(params)) - (~keep).sum()
    u = np.asarray(updates["hidden2"]["kernel"])
    np.testing.assert_allclose(u[keep], -1.0 / np.sqrt(live), rtol=1e-5)  # clip: live norm
    np.testing.assert_array_equal(u[~keep], -np.asarray(params["hidden2"]["kernel"])[~keep])


def test_params_key_prunes_only_the_model_entry_of_a_trainer_tree():
    _, params, _ = mlp()
    adapters = {"proj": {"kernel": jnp.ones((32, 16))}}
    trainable = {"model": params, "adapters": adapters}
    c = config(schedule="one_shot", sparsity=0.5, layers="hidden2|head",
               keep_first_last=False)
    tx = pruning.masked(optax.sgd(0.1), **c, params_key="model")
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, trainable),
                                        tx.init(trainable), trainable)
    new = optax.apply_updates(trainable, updates)
    assert set(jaxkd_layers.find(state.masks)) == {"hidden1", "hidden2", "head"}
    assert pruning.sparsity_report(new["model"]) == {"hidden1": 0.0, "hidden2": 0.5,
                                                     "head": 0.5}
    np.testing.assert_allclose(new["adapters"]["proj"]["kernel"], 0.9)


def test_sparse_mlp_learns_a_synthetic_task_at_75_percent_sparsity():
    rng = np.random.default_rng(6)
    teacher = rng.normal(size=(40, 4))
    x_train, x_test = (jnp.asarray(rng.normal(size=(n, 40)), jnp.float32) for n in (2048, 1024))
    y_train, y_test = (jnp.argmax(x @ teacher, -1) for x in (x_train, x_test))
    model, params, _ = mlp(num_classes=4)
    c = config(sparsity=0.75, begin_step=0, end_step=150, frequency=10, keep_first_last=False)
    tx = pruning.masked(optax.adam(1e-2), **c, total_steps=250)

    def accuracy(p):
        return float(jnp.mean(jnp.argmax(model.apply({"params": p}, x_test), -1) == y_test))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                model.apply({"params": p}, x_train), y_train).mean())(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None
        return jax.lax.scan(step, (params, tx.init(params)), length=250)[0]

    untrained = accuracy(params)
    params, opt_state = train(params)
    trained = accuracy(params)
    report = pruning.check_sparsity(params, {"hidden1": 0.75, "hidden2": 0.75, "head": 0.75},
                                    masks=opt_state.masks)
    assert all(v == 0.75 for v in report.values())
    assert untrained < 0.5 < 0.85 < trained, (untrained, trained)


# ----------------------------------------------------------------------------- shrink


def test_shrink_channels_mlp_gives_the_masked_logits_with_fewer_parameters():
    model, params, x = mlp(batch=8)
    c = config(pattern="channels", schedule="one_shot", sparsity=0.5, layers="hidden.*",
               keep_first_last=False, overrides=({"layers": "hidden1", "sparsity": 0.25},))
    tx = pruning.masked(optax.adam(1e-2), **c)
    opt_state = tx.init(params)
    grads, update = jax.tree.map(jnp.ones_like, params), jax.jit(tx.update)
    for _ in range(3):
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    masks = opt_state.masks
    for layer, removed in (("hidden1", 8), ("hidden2", 16)):
        keep = np.asarray(masks[layer]["bias"])
        assert (~keep).sum() == removed
        np.testing.assert_array_equal(masks[layer]["kernel"], np.broadcast_to(keep, (
            params[layer]["kernel"].shape)))
        assert (np.asarray(params[layer]["bias"])[~keep] == 0).all()
    small, widths = pruning.shrink_channels(params, masks)
    assert widths == (24, 16)
    small_model = models.get_model("mlp", num_classes=10, widths=widths)
    np.testing.assert_allclose(small_model.apply({"params": small}, x),
                               model.apply({"params": params}, x), atol=1e-5)
    assert models.count_params(small) == 40 * 24 + 24 + 24 * 16 + 16 + 16 * 10 + 10
    assert models.count_params(small) < models.count_params(params) == 2698

    # Kernel-only masks: a pruned unit's constant relu(bias) is folded into the next bias.
    dense = jax.tree.map(lambda p: p + 0.3, mlp()[1])  # nonzero biases
    kernel_masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), dense)
    for layer in ("hidden1", "hidden2"):
        kernel_masks[layer]["kernel"] = pruning.channel_mask(jnp.abs(dense[layer]["kernel"]), 0.5)
    masked_params = jax.tree.map(lambda p, m: p * m, dense, kernel_masks)
    small, widths = pruning.shrink_channels(dense, kernel_masks)
    assert widths == (16, 16)
    np.testing.assert_allclose(
        models.get_model("mlp", num_classes=10, widths=widths).apply({"params": small}, x),
        model.apply({"params": masked_params}, x), atol=1e-4)


def test_shrink_channels_cnn1d_gives_the_masked_logits():
    model = models.get_model("cnn1d", num_classes=10, channels=8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 40)), jnp.float32)
    params = init_params(model, x, 1)
    c = config(pattern="channels", schedule="one_shot", sparsity=0.5, layers="conv.*",
               keep_first_last=False)
    tx = pruning.masked(optax.sgd(0.01), **c)
    opt_state = tx.init(params)
    updates, opt_state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), opt_state,
                                            params)
    params = optax.apply_updates(params, updates)
    small, widths = pruning.shrink_channels(params, opt_state.masks)
    assert widths == (4, 4, 4)
    assert small["head"]["kernel"].shape == (5 * 4, 10)
    small_model = models.get_model("cnn1d", num_classes=10, channels=4)
    np.testing.assert_allclose(small_model.apply({"params": small}, x),
                               model.apply({"params": params}, x), atol=1e-5)
    assert models.count_params(small) < models.count_params(params)

    bad = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    bad["conv1"]["kernel"] = bad["conv1"]["kernel"].at[..., 0].set(False)
    biased = {**params, "conv1": {**params["conv1"], "bias": params["conv1"]["bias"] + 1.0}}
    with pytest.raises(ValueError, match="'conv1'.*nonzero bias") as e:
        pruning.shrink_channels(biased, bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="mlp .* cnn1d"):
        pruning.shrink_channels({"stem_conv": {"kernel": np.ones((3, 3, 3, 4))},
                                 "head": {"kernel": np.ones((4, 2))}}, None)


def test_check_sparsity_names_the_layer_a_later_stage_broke():
    _, params, _ = mlp()
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
    masks["hidden2"]["kernel"] = pruning.unstructured_mask(jnp.abs(params["hidden2"]["kernel"]),
                                                           0.5)
    pruned = jax.tree.map(lambda p, m: p * m, params, masks)
    assert pruning.check_sparsity(pruned, {"hidden2": 0.5}, masks=masks)["hidden2"] == 0.5
    idx = tuple(np.argwhere(~np.asarray(masks["hidden2"]["kernel"]))[0])
    broken = {**pruned, "hidden2": {**pruned["hidden2"],
                                    "kernel": pruned["hidden2"]["kernel"].at[idx].set(0.1)}}
    with pytest.raises(ValueError, match="'hidden2/kernel' has 1 nonzero"):
        pruning.check_sparsity(broken, {}, masks=masks)
    with pytest.raises(ValueError, match="layer 'hidden2' has sparsity 0.4990 < expected"):
        pruning.check_sparsity(broken, {"hidden2": 0.5})
    with pytest.raises(ValueError, match="'hidden9' is no weight"):
        pruning.check_sparsity(broken, {"hidden9": 0.5})


# ----------------------------------------------------------------------------- bad input


RESNET_LIKE = {"stem_conv": {"kernel": np.ones((3, 3, 3, 16))},
               "stage1_block0": {"conv1": {"kernel": np.ones((3, 3, 16, 16))},
                                 "bn1": {"scale": np.ones(16)}},
               "head": {"kernel": np.ones((16, 10))}}


@pytest.mark.parametrize("fields,field,params", [
    ({"sparsity": 1.0}, "sparsity", None),
    ({"sparsity": -0.1}, "sparsity", None),
    ({"initial_sparsity": 0.6}, "initial_sparsity", None),
    ({"n": 5}, "n", None),
    ({"n": 0}, "n", None),
    ({"method": "obd"}, "method", None),
    ({"pattern": "blocks"}, "pattern", None),
    ({"schedule": "cubic"}, "schedule", None),
    ({"frequency": 0}, "frequency", None),
    ({"begin_step": 10, "end_step": 5}, "end_step", None),
    ({"begin_step": 10}, "end_step", None),  # end_step=-1: step 9 of total_steps=10
    ({"layers": "conv.*"}, "layers", None),
    ({"layers": "("}, "layers", None),
    ({"layers": "head"}, "layers", None),  # keep_first_last leaves nothing
    ({"overrides": ({"layers": "nope", "sparsity": 0.5},)}, "overrides[0].layers", None),
    ({"overrides": ({"layers": "head", "sparsity": 1.5},)}, "overrides[0].sparsity", None),
    ({"overrides": ({"layers": "head"},)}, "overrides[0]", None),
    ({"pattern": "channels", "keep_first_last": False}, "layers", None),  # head cannot shrink
    ({"pattern": "channels", "overrides": ({"layers": "head", "sparsity": 0.5},)},
     "overrides[0].layers", None),
    ({"pattern": "channels"}, "layers", RESNET_LIKE),
    ({"pattern": "n:m", "schedule": "one_shot", "m": 3}, "m", None),
    ({"pattern": "n:m"}, "schedule", None),
    ({"method": "snip"}, "schedule", None),
    ({"method": "global_magnitude", "pattern": "channels"}, "method", None),
    ({"sparsty": 0.5}, "", None),
])
def test_bad_config_is_a_one_line_error_naming_the_field(fields, field, params):
    with pytest.raises(ValueError) as e:
        settings = schema.parse(Pruning, fields, "config.pruning")
        with schema.named("config.pruning"):
            pruning.make_plan(params or mlp()[1], settings, total_steps=10)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config.pruning.{field}" if field else "config.pruning has")


def test_wrapper_errors_are_one_line_and_name_the_field():
    with pytest.raises(ValueError, match=r"^end_step=-1 .*total_steps$"):
        pruning.masked(optax.adam(1e-3), **config())
    with pytest.raises(ValueError, match=r"^method='taylor' .*masked"):
        pruning.prune(**config(method="taylor"), total_steps=10)
    with pytest.raises(ValueError, match=r"^Pruning has unknown field\(s\) sparsty"):
        pruning.masked(optax.adam(1e-3), sparsty=0.5)
    tx = pruning.masked(optax.adam(1e-3), **config(layers="conv.*"), total_steps=10)
    with pytest.raises(ValueError, match=r"^layers='conv\.\*' matches no"):
        tx.init(mlp()[1])


def test_bisection_threshold_matches_the_sorting_reference():
    """``unstructured_mask`` finds the k-th smallest score by bisection; it must equal the
    two-argsort reference, ties (earlier first), -0/+0 and -inf (already pruned) included."""
    fast, reference = jax.jit(patterns._keep_top_flat), jax.jit(patterns._keep_top)
    rng = np.random.default_rng(0)
    for n in (1, 7, 300):
        for trial in range(60):
            x = (rng.integers(-4, 4, n) if trial % 2 else rng.normal(size=n)).astype(np.float32)
            x[rng.integers(0, n, 3)] = -np.inf
            x[rng.integers(0, n, 2)] = -0.0
            k = jnp.int32(rng.integers(0, n + 1))
            np.testing.assert_array_equal(fast(jnp.asarray(x), k), reference(jnp.asarray(x), k))
