"""Tests for jaxkd.models: shapes, parameter counts against formulas and published numbers,
feature dicts, train/eval behaviour, learning, and the registry's errors.

Big models are only traced (``jax.eval_shape``); small ones are compiled once at a tiny batch.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxkd.models import MODELS, count_params, get_model

B = 2
RESNETS = {  # name -> (depth, stem width, stage widths)
    "resnet8": (8, 16, (16, 32, 64)),
    "resnet14": (14, 16, (16, 32, 64)),
    "resnet20": (20, 16, (16, 32, 64)),
    "resnet32": (32, 16, (16, 32, 64)),
    "resnet44": (44, 16, (16, 32, 64)),
    "resnet56": (56, 16, (16, 32, 64)),
    "resnet110": (110, 16, (16, 32, 64)),
    "resnet8x4": (8, 32, (64, 128, 256)),
    "resnet32x4": (32, 32, (64, 128, 256)),
}
WRNS = {  # name -> (depth, widen factor)
    "wrn": (28, 10),
    "wrn_16_1": (16, 1),
    "wrn_16_2": (16, 2),
    "wrn_40_1": (40, 1),
    "wrn_40_2": (40, 2),
}
# Small configurations for compiled tests, as hashable kwargs.
WIDE_MLP = (("widths", (16, 8)), ("dropout_rate", 0.5))
SMALL_WRN = (("depth", 10), ("widen_factor", 2), ("dropout_rate", 0.3))


# --- independent formulas -------------------------------------------------------------------


def dense(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv(k: int, c_in: int, c_out: int, bias: bool = False) -> int:
    return k * k * c_in * c_out + (c_out if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # scale and bias; running statistics are not parameters


def resnet_param_count(depth: int, stem: int, widths, num_classes: int) -> int:
    n = (depth - 2) // 6
    total = conv(3, 3, stem) + bn(stem)
    c_in = stem
    for s, w in enumerate(widths):
        for b in range(n):
            total += conv(3, c_in, w) + bn(w) + conv(3, w, w) + bn(w)
            if c_in != w or (s > 0 and b == 0):
                total += conv(1, c_in, w) + bn(w)  # option-B projection
            c_in = w
    return total + dense(widths[-1], num_classes)


def wrn_param_count(depth: int, k: int, num_classes: int) -> int:
    n = (depth - 4) // 6
    total = conv(3, 3, 16)
    c_in = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(c_in) + conv(3, c_in, w) + bn(w) + conv(3, w, w)
            if c_in != w:
                total += conv(1, c_in, w)  # projection, no BatchNorm
            c_in = w
    return total + bn(c_in) + dense(c_in, num_classes)


def natural_input(name: str) -> tuple[int, ...]:
    if name in ("mlp", "cnn1d"):
        return (B, 40)
    if name == "lenet5":
        return (B, 28, 28, 1)
    return (B, 32, 32, 3)


def expected_features(name: str) -> dict[str, tuple[int, ...]]:
    if name == "mlp":
        return {"hidden1": (B, 1200), "hidden2": (B, 1200), "embedding": (B, 1200)}
    if name == "cnn1d":
        return {
            "conv1": (B, 19, 25),
            "conv2": (B, 10, 25),
            "conv3": (B, 5, 25),
            "embedding": (B, 125),
        }
    if name == "lenet5":
        return {
            "conv1": (B, 12, 12, 6),
            "conv2": (B, 4, 4, 16),
            "fc1": (B, 120),
            "embedding": (B, 84),
        }
    if name in RESNETS:
        _, stem, widths = RESNETS[name]
    else:
        k = WRNS[name][1]
        stem, widths = 16, (16 * k, 32 * k, 64 * k)
    return {
        "conv1": (B, 32, 32, stem),
        "stage1": (B, 32, 32, widths[0]),
        "stage2": (B, 16, 16, widths[1]),
        "stage3": (B, 8, 8, widths[2]),
        "embedding": (B, widths[2]),
    }


def abstract_variables(model, shape):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


# --- every registry name --------------------------------------------------------------------


def test_registry_has_the_documented_names():
    assert set(MODELS) == {"mlp", "cnn1d", "lenet5", *RESNETS, *WRNS, "bert", "gemma3"}


# token models have their own tests: test_bert.py, test_gemma.py
@pytest.mark.parametrize("name", sorted(n for n in MODELS if n not in ("bert", "gemma3")))
def test_every_model_has_documented_logits_and_features(name):
    num_classes = 7
    model = get_model(name, num_classes=num_classes)
    shape = natural_input(name)
    variables = abstract_variables(model, shape)
    logits, features = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(shape), return_features=True), variables
    )
    assert logits.shape == (B, num_classes) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in features.items()} == expected_features(name)
    assert "head" in variables["params"]
    plain = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
    assert plain.shape == (B, num_classes)


@pytest.mark.parametrize("name", sorted(RESNETS) + sorted(WRNS))
def test_cifar_param_counts_match_formula(name):
    variables = abstract_variables(get_model(name, num_classes=100), (1, 32, 32, 3))
    if name in RESNETS:
        expected = resnet_param_count(*RESNETS[name], num_classes=100)
    else:
        expected = wrn_param_count(*WRNS[name], num_classes=100)
    assert count_params(variables["params"]) == expected
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize(
    "name, num_classes, millions, digits, option_a",
    [
        # He et al. 2016 table 6 (CIFAR-10) count option-A (parameter-free) shortcuts.
        ("resnet20", 10, 0.27, 2, True),
        ("resnet32", 10, 0.46, 2, True),
        ("resnet56", 10, 0.85, 2, True),
        ("resnet110", 10, 1.7, 1, True),
        # Tian et al. 2020 (CRD, CIFAR-100; option B) and Zagoruyko & Komodakis 2016.
        ("resnet8x4", 100, 1.23, 2, False),
        ("resnet32x4", 100, 7.43, 2, False),
        ("wrn_16_2", 100, 0.70, 2, False),
        ("wrn_40_2", 100, 2.26, 2, False),
        ("wrn", 100, 36.5, 1, False),  # WRN-28-10
    ],
)
def test_param_counts_match_published(name, num_classes, millions, digits, option_a):
    variables = abstract_variables(get_model(name, num_classes=num_classes), (1, 32, 32, 3))
    count = count_params(variables["params"])
    if option_a:  # our option-B projections at the two stride-2 stage entrances
        count -= conv(1, 16, 32) + bn(32) + conv(1, 32, 64) + bn(64)
    assert round(count / 1e6, digits) == millions


@pytest.mark.parametrize(
    "name, kwargs, shape, expected",
    [
        ("mlp", dict(widths=(1200, 1200)), (1, 784), 2_395_210),  # Hinton et al. teacher
        ("mlp", dict(widths=[800, 800]), (1, 28, 28, 1), 1_276_810),  # Hinton et al. student
        ("mlp", dict(widths=(100, 100)), (1, 40), dense(40, 100) + dense(100, 100) + 1010),
        ("cnn1d", {}, (1, 40), 5_210),
        ("lenet5", {}, (1, 32, 32, 1), 61_706),  # LeNet-5 on the paper's 32x32 input
        ("lenet5", {}, (1, 28, 28, 1), 156 + 2_416 + dense(256, 120) + 10_164 + 850),
        ("lenet5", dict(padding="SAME"), (1, 8, 8, 1), 156 + 2_416 + dense(64, 120) + 11_014),
    ],
)
def test_small_model_param_counts(name, kwargs, shape, expected):
    variables = abstract_variables(get_model(name, num_classes=10, **kwargs), shape)
    assert count_params(variables["params"]) == expected


# --- compiled runs on tiny inputs -----------------------------------------------------------


def key(seed: int) -> jax.Array:
    # RBG keys: a ResNet's threefry initialiser takes seconds to compile on CPU, RBG's one.
    return jax.random.key(seed, impl="rbg")


@functools.cache
def initialised(name: str, kwargs: tuple, shape: tuple[int, ...]):
    """(model, variables, x) for ``name`` with 5 classes, initialised once per test session."""
    model = get_model(name, num_classes=5, **dict(kwargs))
    x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, size=shape), jnp.float32)
    return model, jax.jit(model.init)(key(0), x), x


@pytest.mark.parametrize(
    "name, kwargs, shape, feature_shapes",
    [
        ("mlp", WIDE_MLP, (B, 40), {"hidden1": (B, 16), "hidden2": (B, 8)}),
        ("cnn1d", (), (B, 40), {"conv3": (B, 5, 25)}),
        ("lenet5", (), (B, 28, 28, 1), {"conv2": (B, 4, 4, 16)}),
        ("lenet5", (), (B, 8, 8, 1), {"conv1": (B, 4, 4, 6), "conv2": (B, 2, 2, 16)}),
        ("resnet8", (), (B, 8, 8, 3), {"conv1": (B, 8, 8, 16), "stage3": (B, 2, 2, 64)}),
        ("wrn", SMALL_WRN, (B, 8, 8, 3), {"conv1": (B, 8, 8, 16), "stage3": (B, 2, 2, 128)}),
    ],
)
def test_embedding_feeds_head_and_calls_are_deterministic(name, kwargs, shape, feature_shapes):
    model, variables, x = initialised(name, kwargs, shape)
    apply = jax.jit(lambda v, x: model.apply(v, x, return_features=True))
    logits, features = apply(variables, x)
    again, _ = apply(variables, x)
    np.testing.assert_array_equal(logits, again)
    assert logits.shape == (B, 5) and logits.dtype == jnp.float32
    assert np.isfinite(logits).all() and float(jnp.std(logits)) > 0
    for key, feature_shape in feature_shapes.items():
        assert features[key].shape == feature_shape
    head = variables["params"]["head"]
    np.testing.assert_allclose(
        features["embedding"] @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5
    )


def test_batchnorm_updates_only_in_train_and_step_jits_with_donation():
    model, variables, x = initialised("resnet8", (), (B, 8, 8, 3))

    def step(v, x):
        train_logits, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
        return train_logits, model.apply(v, x), {"params": v["params"], **updates}

    step = jax.jit(step, donate_argnums=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some backends cannot use every donated buffer
        train_logits, eval_logits, new = step(jax.tree.map(jnp.copy, variables), x)
        again = step(jax.tree.map(jnp.copy, variables), x)
    jax.tree.map(np.testing.assert_array_equal, again, (train_logits, eval_logits, new))
    assert not np.allclose(train_logits, eval_logits)  # batch vs running statistics
    assert jax.tree.structure(new) == jax.tree.structure(variables)
    # momentum 0.9: running mean = 0.9 * 0 + 0.1 * batch mean of the stem convolution.
    stem = jax.lax.conv_general_dilated(
        x,
        variables["params"]["stem_conv"]["kernel"],
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        new["batch_stats"]["stem_bn"]["mean"], 0.1 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(variables["batch_stats"]["stem_bn"]["mean"], 0.0)


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("mlp", WIDE_MLP, (B, 40)),
        ("mlp", (("widths", (16,)), ("input_dropout_rate", 0.2)), (B, 40)),
        ("wrn", SMALL_WRN, (B, 8, 8, 3)),
    ],
)
def test_dropout_only_in_train_mode(name, kwargs, shape):
    model, variables, x = initialised(name, kwargs, shape)

    @jax.jit
    def run(v, x, key):
        train, _ = model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])
        return train, model.apply(v, x)

    train_a, eval_a = run(variables, x, key(2))
    train_b, eval_b = run(variables, x, key(3))
    train_a2, _ = run(variables, x, key(2))
    assert not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(train_a, train_a2)
    np.testing.assert_array_equal(eval_a, eval_b)


def test_mlp_learns_a_nonlinear_problem():
    """4 classes: XOR of the quadrant signs x radius inside/outside a circle, in 2 of 20 dims.

    No linear classifier gets far above chance (0.25) on the XOR part; a 2-layer MLP should.
    """
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, size=(4096, 2))
    labels = 2 * (z[:, 0] * z[:, 1] > 0) + (np.linalg.norm(z, axis=1) > 0.75)
    x = np.concatenate([z, 0.1 * rng.normal(size=(4096, 18))], axis=1).astype(np.float32)
    x_train, y_train, x_test, y_test = x[:2048], labels[:2048], x[2048:], labels[2048:]

    def accuracy_after_training(widths):
        model = get_model("mlp", num_classes=4, widths=widths)
        params = jax.jit(model.init)(key(0), x_train)["params"]
        tx = optax.adam(1e-2)

        def loss_fn(p):
            logits = model.apply({"params": p}, x_train)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()

        @jax.jit
        def train(params):
            def step(carry, _):
                p, s = carry
                grads = jax.grad(loss_fn)(p)
                updates, s = tx.update(grads, s, p)
                return (optax.apply_updates(p, updates), s), None

            (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=300)
            return params

        untrained = model.apply({"params": params}, x_test).argmax(-1)
        trained = model.apply({"params": train(params)}, x_test).argmax(-1)
        return float((untrained == y_test).mean()), float((trained == y_test).mean())

    before, after = accuracy_after_training((64, 64))
    assert before < 0.5
    assert after > 0.9  # 0.95 when written
    _, linear = accuracy_after_training(())
    assert linear < 0.6  # the problem is not linearly separable


# --- registry errors ------------------------------------------------------------------------


def test_unknown_model_name_is_one_line_with_sorted_choices():
    with pytest.raises(ValueError) as err:
        get_model("foo", num_classes=10)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("config.model.name='foo' is not a model; choose one of: ")
    choices = message.split(": ", 1)[1].split(", ")
    assert choices == sorted(MODELS)


def test_unknown_kwarg_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError) as err:
        get_model("mlp", num_classes=10, width=(3,))
    message = str(err.value)
    assert "\n" not in message and "width" in message
    for allowed in ("widths", "dropout_rate", "input_dropout_rate"):
        assert allowed in message
    with pytest.raises(ValueError, match=r"depth.*'resnet20': dtype, param_dtype, remat_policy$"):
        get_model("resnet20", num_classes=10, depth=32)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet20", num_classes=0)


def test_bad_inputs_fail_early_in_words():
    model = get_model("lenet5", num_classes=10, padding="VALID")
    with pytest.raises(ValueError, match="padding='SAME'"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    model = get_model("wrn", num_classes=10, depth=17)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
