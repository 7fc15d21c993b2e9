"""Tests for mixed precision and rematerialisation of the zoo (jaxkd.models.compute).

Models run eagerly at tiny sizes (op-by-op kernels are shared between models); only the
memory comparison compiles, once per setting.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import config, models, quant
from jaxkd.models import DTYPES, REMAT_POLICIES, CifarResNet, get_model
from jaxkd.schema import ConfigError

CASES = {  # id -> (registry name, kwargs, input shape)
    "mlp": ("mlp", (("widths", (16, 8)),), (4, 40)),
    "cnn1d": ("cnn1d", (), (4, 40)),
    "lenet5_8x8": ("lenet5", (), (4, 8, 8, 1)),
    "lenet5_16x16": ("lenet5", (), (4, 16, 16, 1)),
    "resnet8": ("resnet8", (), (4, 8, 8, 3)),
    "wrn_16_1": ("wrn_16_1", (), (4, 8, 8, 3)),
}
REMAT_CASES = {  # a dropout rate checks that remat replays the same dropout mask
    "resnet8": ("resnet8", (), (4, 8, 8, 3)),
    "wrn_16_1": ("wrn_16_1", (("dropout_rate", 0.3),), (4, 8, 8, 3)),
}
POLICIES = [p for p in REMAT_POLICIES if p]


def assert_trees_equal(a, b, atol: float = 0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def inputs(shape):
    return jax.random.normal(jax.random.key(1), shape)


@functools.cache
def run(name: str, kwargs: tuple, shape: tuple, **extra):
    """Variables, eval ``(logits, features)`` and train-mode batch statistics."""
    model = get_model(name, num_classes=5, **dict(kwargs), **extra)
    x = inputs(shape)
    variables = model.init(jax.random.key(0), x)
    logits, features = model.apply(variables, x, return_features=True)
    _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(2)})
    return variables, logits, features, updates


# --- float32 defaults: exactly the model without the new kwargs -------------------------


@pytest.mark.parametrize("case", CASES)
def test_float32_defaults_change_nothing(case):
    name, kwargs, shape = CASES[case]
    extra = {"remat_policy": ""} if models.takes_remat(name) else {}
    plain = run(name, kwargs, shape)
    explicit = run(name, kwargs, shape, dtype="float32", param_dtype=jnp.float32, **extra)
    assert_trees_equal(plain, explicit)
    variables, logits, features, _ = plain
    assert logits.dtype == jnp.float32 and logits.shape == (shape[0], 5)
    assert {a.dtype for a in jax.tree.leaves((variables, features))} == {jnp.dtype("float32")}


# --- bfloat16 compute, float32 master weights and logits --------------------------------


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_computes_in_bf16_and_keeps_float32_params_and_logits(case):
    name, kwargs, shape = CASES[case]
    variables, logits, _, updates = run(name, kwargs, shape)
    bf_variables, bf_logits, bf_features, bf_updates = run(name, kwargs, shape, dtype="bfloat16")
    # Parameters are initialised in param_dtype from the same keys: the same float32 values.
    assert_trees_equal(variables, bf_variables)
    assert jax.tree.structure(updates) == jax.tree.structure(bf_updates)
    assert {a.dtype for a in jax.tree.leaves(bf_updates)} <= {jnp.dtype("float32")}
    assert bf_logits.dtype == jnp.float32
    assert {f.dtype for f in bf_features.values()} == {jnp.dtype("bfloat16")}
    scale = float(jnp.max(jnp.abs(logits)))
    assert float(jnp.max(jnp.abs(bf_logits - logits))) < 2e-2 * scale


def test_float16_and_bfloat16_master_weights():
    x = inputs((2, 40))
    model = get_model("mlp", num_classes=3, widths=(8,), dtype=jnp.float16,
                      param_dtype="bfloat16")
    variables = model.init(jax.random.key(0), x)
    logits, features = model.apply(variables, x, return_features=True)
    assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype("bfloat16")}
    assert features["embedding"].dtype == jnp.float16 and logits.dtype == jnp.float32


# --- rematerialisation: same parameters, loss and gradients; fewer saved activations ----


@functools.cache
def loss_and_grads(name: str, kwargs: tuple, shape: tuple, policy: str):
    """Variables, loss, batch statistics, gradients and the bytes of the activations that the
    forward pass keeps for the backward pass (the ``[B, ...]`` leaves of ``jax.vjp``'s
    pullback: what remat acts on, whatever a backend's scheduler then does); the gradient's
    jaxpr and the layers that quantization intercepts."""
    model = get_model(name, num_classes=5, remat_policy=policy, **dict(kwargs))
    x = inputs(shape)
    variables = model.init(jax.random.key(0), x)
    dropout = jax.random.key(2, impl="rbg")  # threefry's bits compile slowly on CPU

    def loss(params):
        logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": dropout})
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0]), updates

    value, pullback, updates = jax.vjp(loss, variables["params"], has_aux=True)
    (grads,) = pullback(jnp.ones_like(value))
    residual_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(pullback)
                         if leaf.ndim >= 2 and leaf.shape[0] == x.shape[0])
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(p)[0]))(variables["params"]))
    layers = quant.find_layers(model, variables, x)
    return variables, value, updates, grads, residual_bytes, jaxpr, layers


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", REMAT_CASES)
def test_remat_keeps_params_loss_and_gradients(case, policy):
    name, kwargs, shape = REMAT_CASES[case]
    variables, value, updates, grads, _, jaxpr, layers = loss_and_grads(name, kwargs, shape, "")
    r_variables, r_value, r_updates, r_grads, _, r_jaxpr, r_layers = loss_and_grads(
        name, kwargs, shape, policy)
    assert_trees_equal(variables, r_variables)  # e.g. params/stage1_block0/conv1/kernel
    assert "stage1_block0" in variables["params"]
    assert r_layers == layers  # quantization still intercepts every layer, by the same path
    assert_trees_equal((value, updates, grads), (r_value, r_updates, r_grads), atol=1e-6)
    assert "remat" not in jaxpr and "remat" in r_jaxpr


@pytest.mark.parametrize("case", REMAT_CASES)
def test_full_remat_keeps_only_block_inputs(case):
    off, dots, full = (loss_and_grads(*REMAT_CASES[case], policy)[4]
                       for policy in ("", "dots", "full"))
    assert full < dots < off and full < off / 3


@pytest.mark.skipif(jax.default_backend() == "cpu", reason=(
    "XLA:CPU expands the optimization barriers of jax.checkpoint and CSEs the recomputation "
    "away, so remat does not change its compiled temp memory"))
@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_full_remat_compiled_temp_memory_is_not_larger(name):
    def temp_bytes(policy: str) -> int:
        model = get_model(name, num_classes=10, remat_policy=policy)
        x = jax.ShapeDtypeStruct((32, 16, 16, 3), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)

        def loss(params, batch_stats, x):
            logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                    train=True, mutable=["batch_stats"])
            return jnp.mean(logits ** 2)

        lowered = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"], x)
        compiled = lowered.compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes("full") <= temp_bytes("")


# --- errors and registry helpers --------------------------------------------------------


@pytest.mark.parametrize("field", ["dtype", "param_dtype"])
@pytest.mark.parametrize("name", ["mlp", "resnet8", "wrn"])
def test_bad_dtype_is_one_line_naming_the_field(name, field):
    for bad in ("float64", "bf16", True):
        with pytest.raises(ConfigError) as err:
            get_model(name, num_classes=10, **{field: bad})
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"config.{field}={bad!r}")
        assert message.endswith(", ".join(DTYPES))


def test_bad_remat_policy_is_one_line_naming_the_field():
    for build in (lambda: get_model("wrn_16_1", num_classes=10, remat_policy="dot"),
                  lambda: jax.eval_shape(lambda: CifarResNet(num_classes=2, depth=8,
                                                             remat_policy="dot").init(
                      jax.random.key(0), jnp.zeros((1, 8, 8, 3))))):
        with pytest.raises(ConfigError) as err:
            build()
        message = str(err.value)
        assert "\n" not in message and message.startswith("config.remat='dot'")
        assert all(repr(p) in message for p in REMAT_POLICIES)
    with pytest.raises(ConfigError, match="unknown kwarg.*remat_policy"):
        get_model("mlp", num_classes=10, remat_policy="full")


def test_takes_precision_and_remat(monkeypatch):
    assert all(models.takes_precision(n) for n in models.names())
    assert [n for n in models.names() if models.takes_remat(n)] == [
        n for n in models.names() if n.startswith(("resnet", "wrn", "bert"))]
    monkeypatch.setitem(models.MODELS, "plain", lambda *, num_classes: CifarResNet(num_classes))
    assert not models.takes_precision("plain") and not models.takes_remat("plain")
    with pytest.raises(ConfigError, match="config.model.name='foo'"):
        models.takes_remat("foo")


def test_config_offers_the_models_names():
    assert config.PRECISIONS == DTYPES and config.REMAT_POLICIES == REMAT_POLICIES
