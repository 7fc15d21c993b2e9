"""jaxkd.quant against independent numpy formulas: quantizer, STE and LSQ gradients, QAT, PTQ."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd import models, objective, quant, schema, train
from jaxkd.config import Quantization, supervised_losses


def config(**fields):
    """A checked quantization block (the defaults of jaxkd.config.Quantization otherwise)."""
    return quant.settings(fields)


def named(fields):
    """The block as the trainer reads ``config.quantization``: errors name the field."""
    return schema.parse(Quantization, fields, "config.quantization")


def np_scale_zp(lo, hi, bits, symmetric):
    """Scale and zero point, written out from the textbook formulas (Jacob et al. 2018)."""
    if symmetric:
        q_max = 2 ** (bits - 1) - 1
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        return np.where(absmax > 0, absmax / q_max, 1.0), np.zeros_like(lo), -q_max, q_max
    q_min, q_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    scale = np.where(hi > lo, (hi - lo) / (2**bits - 1), 1.0)
    zp = np.clip(np.round(q_min - lo / scale), q_min, q_max)
    return scale, zp, q_min, q_max


def mlp_and_vars(widths=(32, 32), batch=16, seed=0):
    model = models.get_model("mlp", num_classes=10, widths=widths)
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, 40))
    return model, jax.jit(model.init)(jax.random.PRNGKey(seed + 1), x), x


# ----------------------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, -1, 0])
def test_scale_zero_point_and_round_trip_match_numpy(bits, symmetric, axis):
    rng = np.random.default_rng(bits)
    x = (rng.normal(size=(6, 5)) * rng.uniform(0.1, 3, size=(1, 5)) + 0.3).astype(np.float32)
    x[:, 2] = 0.0  # an all-zero channel
    lo, hi = quant.min_max(x, axis=axis)
    reduce = None if axis is None else tuple(a for a in range(2) if a != axis % 2)
    np.testing.assert_array_equal(lo, np.min(x, axis=reduce, keepdims=True))
    np.testing.assert_array_equal(hi, np.max(x, axis=reduce, keepdims=True))
    scale, zp = quant.scale_zero_point(lo, hi, bits=bits, symmetric=symmetric)
    ref_scale, ref_zp, q_min, q_max = np_scale_zp(np.asarray(lo), np.asarray(hi), bits, symmetric)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    np.testing.assert_array_equal(zp, ref_zp)
    assert quant.int_range(bits, symmetric=symmetric) == (q_min, q_max)

    q = np.asarray(quant.quantize(x, scale, zp, bits=bits, symmetric=symmetric))
    ref_q = np.clip(np.round(x / ref_scale) + ref_zp, q_min, q_max)
    np.testing.assert_array_equal(q, ref_q)
    assert q.dtype == np.int8 and q.min() >= q_min and q.max() <= q_max
    x_hat = np.asarray(quant.dequantize(q, scale, zp))
    # Inside the range the round trip is off by at most half a step.
    assert np.all(np.abs(x_hat - x) <= ref_scale / 2 * (1 + 1e-5))
    np.testing.assert_array_equal(x_hat[:, 2], 0.0)  # zero is exact
    fq = quant.fake_quant(x, scale, zp, bits=bits, symmetric=symmetric)
    np.testing.assert_allclose(fq, x_hat, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_straight_through_gradient(symmetric):
    x = jnp.linspace(-3.0, 3.0, 121)
    scale, zp = jnp.float32(0.05), (0 if symmetric else 3)
    q_min, q_max = quant.int_range(4, symmetric=symmetric)
    upstream = jnp.asarray(np.random.default_rng(0).normal(size=x.shape), jnp.float32)

    def loss(x, clip):
        return jnp.sum(quant.fake_quant(x, scale, zp, bits=4, symmetric=symmetric,
                                        clip_gradient=clip) * upstream)

    q = np.round(np.asarray(x) / np.float32(0.05)) + zp
    inside = (q >= q_min) & (q <= q_max)
    assert 0 < inside.sum() < x.size  # both cases occur
    np.testing.assert_array_equal(jax.grad(loss)(x, True), np.where(inside, upstream, 0.0))
    np.testing.assert_array_equal(jax.grad(loss)(x, False), upstream)


def test_lsq_forward_and_gradients_match_the_paper():
    bits, step = 4, 0.2  # 4 bits: Q_N = 8, Q_P = 7
    q_n, q_p = 8, 7
    x = np.linspace(-2.5, 2.5, 51).astype(np.float32)
    g = quant.lsq_grad_scale(x.size, bits)
    assert g == pytest.approx(1 / np.sqrt(x.size * q_p))
    upstream = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)

    def loss(x, s):
        return jnp.sum(quant.lsq_fake_quant(x, s, bits=bits, grad_scale=g) * upstream)

    v = x / step
    np.testing.assert_allclose(quant.lsq_fake_quant(x, step, bits=bits, grad_scale=g),
                               np.round(np.clip(v, -q_n, q_p)) * step, rtol=1e-6, atol=1e-7)
    dx, ds = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.float32(step))
    inside = (v > -q_n) & (v < q_p)
    np.testing.assert_allclose(dx, np.where(inside, upstream, 0.0), rtol=1e-6, atol=0)
    dstep = np.where(v <= -q_n, -q_n, np.where(v >= q_p, q_p, np.round(v) - v))
    np.testing.assert_allclose(ds, g * np.sum(upstream * dstep), rtol=1e-4)
    # A step an optimizer pushed below zero acts by its magnitude, and keeps a gradient.
    np.testing.assert_array_equal(quant.lsq_fake_quant(x, -step, bits=bits, grad_scale=g),
                                  quant.lsq_fake_quant(x, step, bits=bits, grad_scale=g))
    assert jax.grad(loss, argnums=1)(jnp.asarray(x), jnp.float32(-step)) == pytest.approx(-ds)
    w = np.random.default_rng(2).normal(size=(7, 3)).astype(np.float32)
    np.testing.assert_allclose(quant.lsq_init_step(w, bits=4, axis=-1),
                               2 * np.abs(w).mean(0) / np.sqrt(7), rtol=1e-6)
    np.testing.assert_allclose(quant.lsq_init_step(w, bits=8), 2 * np.abs(w).mean() / np.sqrt(127),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("field,value", [("weight_bits", 3), ("weight_bits", 16),
                                         ("weight_bits", 0), ("activation_bits", 6)])
def test_unsupported_bit_width_is_a_one_line_error(field, value):
    with pytest.raises(ValueError) as e:
        named({field: value})
    message = str(e.value)
    assert f"config.quantization.{field}={value}" in message and "\n" not in message
    allowed = "0, 2, 4, 8" if field == "activation_bits" else "2, 4, 8"
    assert allowed in message
    with pytest.raises(ValueError, match="^weight_bits=5 is not supported"):
        quant.scale_zero_point(0.0, 1.0, bits=5)


def test_layer_regex_matching_nothing_names_the_field():
    model, variables, x = mlp_and_vars()
    with pytest.raises(ValueError, match=r"^layers='conv.\*' matches no layer"):
        quant.validate(config(layers="conv.*"), variables["params"])
    apply = quant.qat_apply(model, layers="conv.*")  # fields check at once,
    with pytest.raises(ValueError, match="^layers=") as e:  # layers at call
        apply(variables, x)
    assert "hidden1, hidden2, head" in str(e.value)
    with pytest.raises(ValueError, match="config.quantization has unknown field.s. weight_bit;"):
        named({"weight_bit": 4})
    with pytest.raises(ValueError, match="^method='fancy'"):
        quant.qat_apply(model, method="fancy")
    with pytest.raises(ValueError, match="config.quantization.layers='\\('"):
        named({"layers": "("})
    assert quant.validate(config(layers="hidden.*"), variables["params"]).layers == "hidden.*"


class RawMatmul(nn.Module):
    """A model whose matmul is not a flax Dense/Conv: nothing to intercept."""

    @nn.compact
    def __call__(self, x, *, train=False):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))
        return x @ w


def test_activation_quant_on_a_model_that_cannot_be_intercepted():
    model = RawMatmul()
    x = jnp.ones((2, 5))
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="^activation_bits: model RawMatmul "
                                         "calls no flax.linen Dense or Conv"):
        quant.qat_apply(model, activation_bits=8)(variables, x)


# ----------------------------------------------------------------------------- plan and QAT


def test_plan_orders_layers_and_keeps_first_and_last_at_8_bits():
    model, variables, x = mlp_and_vars(widths=(32, 32, 32))
    p = quant.plan(model, variables, x, config(weight_bits=2, activation_bits=4))
    assert list(p) == ["hidden1", "hidden2", "hidden3", "head"]
    assert [lp.weight_bits for lp in p.values()] == [8, 2, 2, 8]
    assert [lp.activation_bits for lp in p.values()] == [8, 4, 4, 8]
    p = quant.plan(model, variables, x, config(weight_bits=4, keep_first_last_8bit=False))
    assert [lp.weight_bits for lp in p.values()] == [4, 4, 4, 4]
    assert all(lp.activation_bits == 0 for lp in p.values())
    p = quant.plan(model, variables, x, config(weight_bits=4, layers="hidden[23]"))
    assert {k: v.weight_bits for k, v in p.items()} == {"hidden2": 4, "hidden3": 4}
    # The order comes from the call order, not from the (sorted) parameter dict.
    sorted_vars = jax.tree.map(lambda a: a, variables)
    assert list(sorted_vars["params"])[0] == "head"
    assert list(quant.plan(model, sorted_vars, x, config())) == [
        "hidden1", "hidden2", "hidden3", "head"]


def np_fq_channel(w, bits):
    q_max = 2 ** (bits - 1) - 1
    s = np.abs(w).max(0, keepdims=True) / q_max
    return np.clip(np.round(w / s), -q_max, q_max) * s


def np_fq_static(x, lo, hi, bits):
    """Fake-quant on the activation grid of the range [lo, hi]: unsigned [0, 2^b - 1] when
    lo >= 0, else symmetric."""
    if lo >= 0:
        q_max = 2**bits - 1
        s = hi / q_max
        return np.clip(np.round(x / s), 0, q_max) * s
    q_max = 2 ** (bits - 1) - 1
    s = max(abs(lo), abs(hi)) / q_max
    return np.clip(np.round(x / s), -q_max, q_max) * s


def test_qat_forward_uses_static_ranges_on_unsigned_and_signed_grids():
    model, variables, x = mlp_and_vars()
    p = jax.tree.map(np.asarray, variables["params"])
    xn = np.asarray(x)
    bits = {"hidden1": 8, "hidden2": 4, "head": 8}
    inputs, h = {}, xn  # the float model's layer inputs: the observers' initial ranges
    for name in ("hidden1", "hidden2", "head"):
        inputs[name] = h
        h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0) if name != "head" else h

    def np_forward(z, act_bits):
        h = z
        for name in ("hidden1", "hidden2", "head"):
            if act_bits:
                lo, hi = inputs[name].min(), inputs[name].max()
                h = np_fq_static(h, lo, hi, act_bits if name == "hidden2" else 8)
            h = h @ np_fq_channel(p[name]["kernel"], bits[name]) + p[name]["bias"]
            if name != "head":
                h = np.maximum(h, 0)
        return h

    for act_bits in (0, 4):
        fields = {"weight_bits": 4, "activation_bits": act_bits}
        observers = quant.init_observers(model, variables, x, **fields)
        assert bool(observers["hidden2"]["unsigned"]) if act_bits else observers == {}
        assert not bool(observers["hidden1"]["unsigned"]) if act_bits else True
        apply = jax.jit(quant.qat_apply(model, **fields))
        v = {**variables, quant.OBSERVERS: observers}
        out = apply(v, x)
        np.testing.assert_allclose(out, np_forward(xn, act_bits), rtol=1e-4, atol=1e-5)
        assert np.abs(np.asarray(out) - np.asarray(model.apply(variables, x))).max() > 1e-3
        # Static ranges: an example's output does not depend on the rest of its batch.
        alone = np.concatenate([np.asarray(apply(v, x[i:i + 1])) for i in range(4)])
        np.testing.assert_allclose(alone, np.asarray(out)[:4], rtol=1e-5, atol=1e-6)


def test_training_moves_the_observed_ranges_by_their_momentum():
    model, variables, x = mlp_and_vars()
    fields = {"weight_bits": 8, "activation_bits": 8, "range_momentum": 0.25}
    observers = quant.init_observers(model, variables, x, **fields)
    x2 = 3.0 * x[::-1]
    out, updates = jax.jit(lambda v, z: quant.qat_apply(model, **fields)(
        v, z, train=True, mutable=[quant.OBSERVERS]))({**variables, quant.OBSERVERS: observers},
                                                      x2)
    new = updates[quant.OBSERVERS]["hidden1"]  # its input is x2 itself
    lo, hi = float(observers["hidden1"]["lo"]), float(observers["hidden1"]["hi"])
    np.testing.assert_allclose(new["lo"], lo + 0.25 * (float(x2.min()) - lo), rtol=1e-6)
    np.testing.assert_allclose(new["hi"], hi + 0.25 * (float(x2.max()) - hi), rtol=1e-6)
    assert bool(new["unsigned"]) == bool(observers["hidden1"]["unsigned"])
    frozen = quant.qat_apply(model, **fields)({**variables, quant.OBSERVERS: observers}, x2)
    assert np.abs(np.asarray(frozen) - np.asarray(out)).max() > 0  # eval uses the old range


def test_qat_gradient_is_the_float_gradient_at_the_quantized_weights():
    model, variables, x = mlp_and_vars()
    labels = jnp.arange(x.shape[0]) % 10
    c = config(weight_bits=4)
    apply = quant.qat_apply(model, **c.kwargs())

    def loss(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = jax.jit(jax.grad(lambda p: loss(apply({"params": p}, x))))(variables["params"])
    layer_plan = quant.plan(model, variables, x, c)
    w_hat = quant.fake_quant_params(variables["params"], layer_plan, c)
    ref = jax.jit(jax.grad(lambda p: loss(model.apply({"params": p}, x))))(w_hat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref)


class WithQATParams:
    """``model`` whose ``init`` also returns LSQ's steps, for ``train.init_state``."""

    def __init__(self, model, quant_config, sample):
        self.model, self.quant_config, self.sample = model, quant_config, sample

    def init(self, *args, **kwargs):
        variables = self.model.init(*args, **kwargs)
        return {**variables, "params": quant.init_qat_params(self.model, variables, self.sample,
                                                             **self.quant_config.kwargs())}


@pytest.mark.parametrize("name,kwargs,shape,method", [("mlp", {"widths": (32,)}, (40,), "minmax"),
                                                      ("cnn1d", {"channels": 8}, (40,), "lsq")])
def test_qat_train_step_learns_and_trains_lsq_steps(name, kwargs, shape, method):
    model = models.get_model(name, num_classes=4, **kwargs)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(32, *shape)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 4, 32), jnp.int32)}
    c = config(weight_bits=4, activation_bits=8, method=method)
    tx = optax.adam(1e-2)  # Adam moves LSQ's small steps through zero: lsq_step keeps them alive
    state = train.init_state(WithQATParams(model, c, batch["image"]), tx, shape, 0)
    params = state.params
    observers = quant.init_observers(model, {"params": params}, batch["image"], **c.kwargs())
    state = state.replace(collections={quant.OBSERVERS: observers})
    terms = objective.parse_terms(supervised_losses(), has_teacher=False)
    step = jax.jit(train.make_train_step(
        model, tx, objective.build_objective(terms, num_steps=40),
        student_apply=quant.qat_apply(model, **c.kwargs())))
    losses = []
    for _ in range(40):
        state, m = step(state, batch, [])
        losses.append(float(m["loss_sum"]))
    assert losses[-1] < 0.2 * losses[0]  # memorises the 32 random labels
    if method == "lsq":  # the kernel and input steps of every layer are trained
        assert params["conv2"][quant.KERNEL_STEP].shape == (params["conv2"]["kernel"].shape[-1],)
        assert params["conv2"][quant.INPUT_STEP].shape == ()
        for leaf in (quant.KERNEL_STEP, quant.INPUT_STEP):
            assert not np.allclose(state.params["conv2"][leaf], params["conv2"][leaf])
    else:
        assert jax.tree.structure(params) == jax.tree.structure(state.params)
    moved = state.collections[quant.OBSERVERS]  # min/max: the running ranges moved
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(moved),
                                                     jax.tree.leaves(observers), strict=True)]
    assert any(changed) == (method == "minmax")


# ----------------------------------------------------------------------------- PTQ


def test_calibrate_minmax_and_percentile_match_numpy():
    model, variables, _ = mlp_and_vars()
    p = jax.tree.map(np.asarray, variables["params"])
    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(32, 40)).astype(np.float32) * (i + 1) for i in range(3)]

    def inputs(xb):
        h1 = np.maximum(xb @ p["hidden1"]["kernel"] + p["hidden1"]["bias"], 0)
        h2 = np.maximum(h1 @ p["hidden2"]["kernel"] + p["hidden2"]["bias"], 0)
        return {"hidden1": xb, "hidden2": h1, "head": h2}

    ranges = quant.calibrate(model, variables, batches)
    per_batch = [inputs(b) for b in batches]
    for layer in ("hidden1", "hidden2", "head"):
        lo = min(b[layer].min() for b in per_batch)
        hi = max(b[layer].max() for b in per_batch)
        np.testing.assert_allclose(ranges[layer], (lo, hi), rtol=1e-5, atol=1e-6)
    ranges = quant.calibrate(model, variables, [{"image": b} for b in batches],
                             method="percentile", percentile=99.0)
    for layer in ("hidden1", "hidden2", "head"):
        lo = np.mean([np.percentile(b[layer], 1.0) for b in per_batch])
        hi = np.mean([np.percentile(b[layer], 99.0) for b in per_batch])
        np.testing.assert_allclose(ranges[layer], (lo, hi), rtol=1e-4, atol=1e-5)
    assert ranges["hidden1"][1] < max(b["hidden1"].max() for b in per_batch)
    with pytest.raises(ValueError, match="^calibration='mean'"):
        quant.calibrate(model, variables, batches, method="mean")


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_params_gives_integers_scales_and_zero_points(symmetric):
    model, variables, x = mlp_and_vars()
    c = config(weight_bits=4, symmetric=symmetric)
    with pytest.raises(ValueError, match="keep_first_last_8bit=True needs the layer order"):
        quant.quantize_params(variables["params"], c)
    layer_plan = quant.plan(model, variables, x, c)
    q = quant.quantize_params(variables["params"], c, layer_plan=layer_plan)
    assert {k: v.bits for k, v in q.items()} == {"hidden1": 8, "hidden2": 4, "head": 8}
    for name, qk in q.items():
        w = np.asarray(variables["params"][name]["kernel"])
        scale, zp, q_min, q_max = np_scale_zp(w.min(0), w.max(0), qk.bits, symmetric)
        assert qk.values.dtype == np.int8 and qk.values.shape == w.shape
        np.testing.assert_allclose(qk.scale, scale, rtol=1e-6)
        np.testing.assert_array_equal(qk.zero_point, zp)
        np.testing.assert_array_equal(qk.values, np.clip(np.round(w / scale) + zp, q_min, q_max))
        assert np.all(np.abs(scale * (qk.values - zp) - w) <= scale / 2 * (1 + 1e-5))
    per_tensor = quant.quantize_params(
        variables["params"], config(weight_bits=2, per_channel=False, keep_first_last_8bit=False))
    assert all(qk.scale.shape == () and qk.bits == 2 for qk in per_tensor.values())
    assert all(set(np.unique(qk.values)) <= {-1, 0, 1} for qk in per_tensor.values())


# ----------------------------------------------------------------------------- embedding tables

TINY_BERT = {"vocab_size": 60, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
             "intermediate_size": 32, "max_position": 16}


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_tables_are_integers_per_row_and_the_artifact_is_the_qat_model(tmp_path, bits):
    from jaxkd import export

    model = models.get_model("bert", num_classes=3, **TINY_BERT)
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None] < rng.integers(2, 13, size=(20, 1))).astype(np.int32)
    ids = rng.integers(1, 60, size=(20, 12)).astype(np.int32) * mask
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(ids), jnp.asarray(mask))
    params = jax.device_get(variables["params"])
    # Rows of very different magnitudes: one scale per row keeps each at full resolution.
    word = params["embeddings"]["word_embeddings"]["embedding"]
    word = word * np.logspace(-3, 0, word.shape[0])[:, None].astype(np.float32)
    params["embeddings"]["word_embeddings"]["embedding"] = word
    variables = {"params": params}
    c = config(weight_bits=8, embedding_bits=bits)
    layer_plan = quant.plan(model, variables, (ids, mask), c)
    tables = {p: lp for p, lp in layer_plan.items() if lp.kind == "embed"}
    assert sorted(tables) == [f"embeddings/{n}_embeddings" for n in ("position", "token_type",
                                                                      "word")]
    assert all(lp.weight_bits == bits and lp.activation_bits == 0 for lp in tables.values())
    q = quant.quantize_params(params, c, layer_plan=layer_plan)["embeddings/word_embeddings"]
    q_max = 2 ** (bits - 1) - 1
    scale = np.abs(word).max(1) / q_max  # written out: symmetric, one scale per row
    np.testing.assert_allclose(q.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(q.values, np.clip(np.round(word / scale[:, None]),
                                                    -q_max, q_max))
    assert q.values.dtype == np.int8 and np.abs(q.values).max(1).min() == q_max
    # QAT's forward is the artifact's integer lookup (the same products s_v * q_v; the rest
    # to float rounding: the artifact's forward is jitted, fused differently).
    qat = quant.qat_apply(model, **c.kwargs())(variables, ids, mask)
    manifest = export.export(str(tmp_path / "a"), "bert", TINY_BERT, 3, variables, c, None,
                             {}, input_shape=(12,))
    predict, _ = export.load(str(tmp_path / "a"))
    np.testing.assert_allclose(np.asarray(predict(ids, mask)), np.asarray(qat), rtol=1e-5,
                               atol=1e-6)
    # ... which is the float model with the dequantized tables (numpy), and not the float one.
    dequantized = jax.tree.map(np.copy, params)
    dequantized["embeddings"]["word_embeddings"]["embedding"] = scale[:, None] * q.values
    float_tables = model.apply({"params": quant.fake_quant_params(
        params, {p: lp for p, lp in layer_plan.items() if p not in tables}, c)}, ids, mask)
    reference = model.apply({"params": quant.fake_quant_params(
        dequantized, {p: lp for p, lp in layer_plan.items()
                      if p != "embeddings/word_embeddings"}, c)}, ids, mask)
    np.testing.assert_allclose(np.asarray(qat), np.asarray(reference), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(qat) - np.asarray(float_tables)).max() > 1e-6
    # The tables are stored as integers, not as float32.
    floats = {t["path"] for t in manifest["float_tensors"]}
    assert not any(p.endswith("_embeddings/embedding") for p in floats)
    entry = next(e for e in manifest["layers"] if e["path"] == "embeddings/word_embeddings")
    assert entry["kind"] == "embed" and entry["activation"]["bits"] == 0
    assert entry["scale"]["shape"] == [60]
    # safetensors (and the HF export built on it) carry the table dequantized row by row.
    from jaxkd.export import safetensors_io
    tensors = safetensors_io.dense_tensors(str(tmp_path / "a"), manifest, include_float=True)
    np.testing.assert_array_equal(
        tensors[safetensors_io.FLOAT_PREFIX + "params.embeddings.word_embeddings.embedding"],
        q.scale[:, None] * q.values)


def test_embedding_bits_on_a_model_without_tables_names_the_field():
    model, variables, x = mlp_and_vars()
    with pytest.raises(ValueError, match="^embedding_bits=8 but model MLP looks up no "
                                         "flax.linen.Embed table$"):
        quant.plan(model, variables, x, config(embedding_bits=8))
    with pytest.raises(ValueError, match=r"config.quantization.embedding_bits=2 is not"):
        named({"embedding_bits": 2})
