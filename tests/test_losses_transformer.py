"""Tests for the transformer (sequence) losses of jaxkd.losses against float64 numpy.

The ``ref_*`` functions are written from the TinyBERT / MiniLM / MiniLMv2 formulas with
plain numpy: each example is CROPPED to its real tokens (``np.flatnonzero(mask[b])``) and
the formula is applied to what is left, so padding is handled without any mask arithmetic.
They never call jaxkd. Gradients of the (float32) jaxkd losses are compared with central
finite differences of these references. x64 is NOT enabled.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses
from jaxkd.schema import ConfigError

# Three sequences of lengths 5, 3 and 2 (padding at the end, as BERT batches).
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.int32)
B, L = MASK.shape

# ============================================================== float64 numpy references


def np_softmax_rows(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl_rows(p, q):
    """``sum_j p_j log(p_j / q_j)`` per row, with ``0 log 0 = 0``."""
    safe_p = np.where(p > 0, p, 1.0)
    return np.sum(np.where(p > 0, p * np.log(safe_p / q), 0.0), axis=-1)


def real(mask, b):
    return np.flatnonzero(mask[b])


def ref_hidden_mse(s, t, mask):
    """TinyBERT eq. 8: mean over real tokens and hidden units."""
    return np.array([np.mean((s[b, real(mask, b)] - t[b, real(mask, b)]) ** 2)
                     for b in range(len(s))])


def crop_map(a, idx):
    return a[:, idx][:, :, idx]  # [heads, n, n]


def ref_attention_mse(s, t, mask):
    """TinyBERT eq. 7: mean over heads and (real query, real key) pairs of scores."""
    return np.array([np.mean((crop_map(s[b], real(mask, b)) - crop_map(t[b], real(mask, b))) ** 2)
                     for b in range(len(s))])


def ref_attention_kl(s, t, mask):
    """MiniLM eq. 6: KL(A_t || A_s) over real keys, mean over heads and real queries."""
    out = []
    for b in range(len(s)):
        a_s, a_t = crop_map(s[b], real(mask, b)), crop_map(t[b], real(mask, b))
        a_s = a_s / a_s.sum(-1, keepdims=True)  # a distribution over the real keys
        a_t = a_t / a_t.sum(-1, keepdims=True)
        out.append(np.mean(np_kl_rows(a_t, a_s)))
    return np.array(out)


def relation(x):
    """``softmax(X X^T / sqrt(d))`` for ``X`` [n, d]."""
    return np_softmax_rows(x @ x.T / np.sqrt(x.shape[-1]))


def ref_value_relation_kl(s, t, mask):
    """MiniLM eq. 7-8: per head VR = softmax(V V^T / sqrt(d)), KL(VR_t || VR_s)."""
    out = []
    for b in range(len(s)):
        idx = real(mask, b)
        kls = [np_kl_rows(relation(t[b, a][idx]), relation(s[b, a][idx]))
               for a in range(s.shape[1])]
        out.append(np.mean(kls))
    return np.array(out)


def ref_minilmv2(s, t, mask, num_relation_heads):
    """MiniLMv2 eq. 3-5: concatenate all heads, split into relation heads, KL of relations."""
    out = []
    for b in range(len(s)):
        idx = real(mask, b)
        x_s = np.concatenate(list(s[b]), axis=-1)[idx]  # [n, heads * d]
        x_t = np.concatenate(list(t[b]), axis=-1)[idx]
        kls = [np_kl_rows(relation(xt), relation(xs)) for xs, xt in
               zip(np.split(x_s, num_relation_heads, -1), np.split(x_t, num_relation_heads, -1),
                   strict=True)]
        out.append(np.mean(kls))
    return np.array(out)


# ============================================================== cases


def f32(x):
    return np.asarray(x, np.float32)


def pairs_of(mask):
    return (mask[:, None, :, None] != 0) & (mask[:, None, None, :] != 0)


def make_scores(rng, heads=3):
    """Pre-softmax scores with BERT's large negative bias at padded keys."""
    bias = np.where(MASK[:, None, None, :] != 0, 0.0, -1e9)
    return [f32(2.0 * rng.normal(size=(B, heads, L, L)) + bias) for _ in range(2)]


def make_probs(rng, heads=3):
    return [f32(np_softmax_rows(np.asarray(s, np.float64))) for s in make_scores(rng, heads)]


def make_tokens(s_shape, t_shape):
    return lambda rng: [f32(rng.normal(size=s_shape)), f32(rng.normal(size=t_shape))]


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable  # jaxkd (student, teacher, mask) -> [B]
    ref: Callable  # float64 numpy (student, teacher, mask) -> [B]
    make: Callable  # rng -> [student, teacher]
    padded: Callable  # mask -> boolean array of the entries that only padding owns


def padded_tokens_blhd(mask):  # [B, heads, L, d]
    return (mask == 0)[:, None, :, None]


def v2(num_relation_heads):
    return functools.partial(losses.minilmv2_relation_kl, num_relation_heads=num_relation_heads)


CASES = {
    "tinybert_hidden_mse": Case(
        losses.tinybert_hidden_mse, ref_hidden_mse, make_tokens((B, L, 6), (B, L, 6)),
        lambda mask: (mask == 0)[:, :, None]),
    "tinybert_attention_mse": Case(
        losses.tinybert_attention_mse, ref_attention_mse, make_scores,
        lambda mask: ~pairs_of(mask)),
    "minilm_attention_kl": Case(
        losses.minilm_attention_kl, ref_attention_kl, make_probs, lambda mask: ~pairs_of(mask)),
    "minilm_value_relation_kl": Case(
        losses.minilm_value_relation_kl, ref_value_relation_kl,
        make_tokens((B, 2, L, 3), (B, 2, L, 5)), padded_tokens_blhd),
    # Student 4 heads x d 8 against teacher 12 heads x d 32: widths 32 and 384.
    "minilmv2_relation_kl": Case(
        v2(4), lambda s, t, m: ref_minilmv2(s, t, m, 4),
        make_tokens((B, 4, L, 8), (B, 12, L, 32)), padded_tokens_blhd),
    "minilmv2_relation_kl_8": Case(
        v2(8), lambda s, t, m: ref_minilmv2(s, t, m, 8),
        make_tokens((B, 4, L, 8), (B, 12, L, 32)), padded_tokens_blhd),
}
FUNCTIONS = {
    "tinybert_hidden_mse": losses.tinybert_hidden_mse,
    "tinybert_attention_mse": losses.tinybert_attention_mse,
    "minilm_attention_kl": losses.minilm_attention_kl,
    "minilm_value_relation_kl": losses.minilm_value_relation_kl,
    "minilmv2_relation_kl": losses.minilmv2_relation_kl,
}

# As tests/test_losses.py: jit once per (function, shapes), with cheap code generation.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _compiled(fn):
    def total(s, t, mask):
        values = fn(s, t, mask)
        return jnp.sum(values), values

    grad_fn = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)
    return jax.jit(grad_fn, compiler_options=_FAST_COMPILE)


def evaluate(fn, s, t, mask=MASK):
    """``(fn(s, t, mask), (d sum / d s, d sum / d t))``, from one jitted call."""
    (_, values), grads = _compiled(fn)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask))
    return np.asarray(values), tuple(np.asarray(g) for g in grads)


def fd_grad(ref, s, t, mask, h=1e-6):
    """Central finite differences of ``sum(ref(s, t, mask))`` w.r.t. ``s``, in float64."""
    s, t = np.array(s, np.float64), np.asarray(t, np.float64)
    grad = np.zeros_like(s)
    for idx in np.ndindex(s.shape):
        old = s[idx]
        s[idx] = old + h
        plus = np.sum(ref(s, t, mask))
        s[idx] = old - h
        minus = np.sum(ref(s, t, mask))
        s[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def assert_finite(*arrays):
    for a in arrays:
        assert np.all(np.isfinite(a)), a


# ============================================================== values and gradients


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_student_gradients_match_numpy(name):
    case = CASES[name]
    s, t = case.make(np.random.default_rng(0))
    got, (grad_s, grad_t) = evaluate(case.fn, s, t)
    want = case.ref(np.float64(s), np.float64(t), MASK)
    assert got.dtype == np.float32 and got.shape == (B,)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert np.all(want > 1e-3)  # nothing trivially zero
    expected = fd_grad(case.ref, s, t, MASK)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(grad_s, expected, rtol=2e-3, atol=2e-4 * scale)
    assert np.any(grad_s != 0)
    assert_finite(grad_t)


@pytest.mark.parametrize("name", list(CASES))
def test_padding_changes_nothing(name):
    """Garbage at padded positions (NaN, inf, huge) changes neither value nor gradient."""
    case = CASES[name]
    rng = np.random.default_rng(1)
    s, t = case.make(rng)
    clean, clean_grads = evaluate(case.fn, s, t)
    for garbage in (np.nan, np.inf, -np.inf, 1e30):
        bad = []
        for x in (s, t):
            x = x.copy()
            x[np.broadcast_to(case.padded(MASK), x.shape)] = garbage
            bad.append(x)
        got, grads = evaluate(case.fn, *bad)
        np.testing.assert_array_equal(got, clean)
        for grad, want, x in zip(grads, clean_grads, (s, t), strict=True):
            pad = np.broadcast_to(case.padded(MASK), x.shape)
            np.testing.assert_array_equal(grad[pad], 0.0)  # no gradient into padding
            np.testing.assert_allclose(grad[~pad], want[~pad], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CASES))
def test_identical_inputs_give_zero(name):
    case = CASES[name]
    s, _ = case.make(np.random.default_rng(2))
    got, (grad_s, grad_t) = evaluate(case.fn, s, s)
    np.testing.assert_allclose(got, 0.0, atol=1e-6)
    np.testing.assert_allclose(grad_s + grad_t, 0.0, atol=1e-5)  # s - t is what matters
    if "mse" not in name:  # a KL's minimum is smooth: its student gradient vanishes there
        np.testing.assert_allclose(grad_s, 0.0, atol=1e-5)


def test_an_example_without_tokens_gives_zero():
    mask = MASK.copy()
    mask[1] = 0
    for name, case in CASES.items():
        s, t = case.make(np.random.default_rng(3))
        got, grads = evaluate(case.fn, s, t, mask)
        assert got[1] == 0.0 and got[0] > 0, name
        for grad in grads:
            np.testing.assert_array_equal(grad[1], 0.0)


# ============================================================== stability


def extreme(rng, x):
    return f32(np.where(rng.random(x.shape) < 0.5, -1e4, 1e4) + rng.normal(size=x.shape))


@pytest.mark.parametrize("name", list(CASES))
def test_finite_at_extreme_inputs(name):
    case = CASES[name]
    rng = np.random.default_rng(4)
    s, t = case.make(rng)
    if name == "minilm_attention_kl":  # one-hot rows that disagree: probabilities 0 and 1
        eye = np.eye(L, dtype=np.float32)
        s = np.broadcast_to(eye[np.roll(np.arange(L), 1)], s.shape).copy()
        t = np.broadcast_to(eye, t.shape).copy()
    else:
        s, t = extreme(rng, s), extreme(rng, t)
        if name == "tinybert_attention_mse":  # and BERT's padding bias at padded keys
            s[np.broadcast_to(MASK[:, None, None, :] == 0, s.shape)] = -1e9
            t[np.broadcast_to(MASK[:, None, None, :] == 0, t.shape)] = -1e9
    got, grads = evaluate(case.fn, s, t)
    assert_finite(got, *grads)
    assert np.all(got >= 0)  # (relations of huge vectors are one-hot on the diagonal: 0)
    if name != "minilm_attention_kl":  # a huge student against an ordinary teacher
        got, grads = evaluate(case.fn, s, case.make(rng)[1])
        assert_finite(got, *grads)
        assert np.all(got > 1.0)
    if s.shape == t.shape:
        assert_finite(*evaluate(case.fn, s, s)[1])


# ============================================================== identities


def test_minilmv2_with_one_relation_head_per_attention_head_is_minilm_value_relation():
    rng = np.random.default_rng(5)
    s, t = f32(rng.normal(size=(B, 3, L, 4))), f32(rng.normal(size=(B, 3, L, 6)))
    np.testing.assert_allclose(
        losses.minilmv2_relation_kl(s, t, MASK, num_relation_heads=3),
        losses.minilm_value_relation_kl(s, t, MASK), rtol=1e-5, atol=1e-7)


def test_attention_kl_renormalises_over_real_keys():
    """Mass a sloppy softmax leaves on padded keys is ignored (rows renormalised)."""
    rng = np.random.default_rng(6)
    s, t = make_probs(rng)
    leaky_s, leaky_t = s.copy(), t.copy()
    pad_keys = np.broadcast_to(MASK[:, None, None, :] == 0, s.shape)
    leaky_s[pad_keys], leaky_t[pad_keys] = 0.3, 0.1
    np.testing.assert_allclose(
        losses.minilm_attention_kl(leaky_s, leaky_t, MASK),
        losses.minilm_attention_kl(s, t, MASK), rtol=1e-5, atol=1e-7)


def test_token_level_hinton_kd_is_soft_target_kl_with_masked_mean():
    """No masked_soft_target_kl: soft_target_kl on [B, L, C] and masked_mean(., mask) is it."""
    rng = np.random.default_rng(7)
    s, t = f32(2 * rng.normal(size=(B, L, 6))), f32(2 * rng.normal(size=(B, L, 6)))
    temperature = 2.0

    def token_kd(s, t, mask):
        return losses.masked_mean(losses.soft_target_kl(s, t, temperature), mask)

    got = token_kd(s, t, MASK)
    rows = [(b, i) for b in range(B) for i in real(MASK, b)]
    want = np.mean([temperature**2 * np_kl_rows(np_softmax_rows(np.float64(t[r]) / 2),
                                                 np_softmax_rows(np.float64(s[r]) / 2))
                    for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    s_bad = s.copy()
    s_bad[MASK == 0] = np.nan
    np.testing.assert_allclose(token_kd(s_bad, t, MASK), got, rtol=1e-6)


# ============================================================== errors in user vocabulary

Z = np.zeros


ERRORS = [
    (losses.tinybert_hidden_mse, (Z((B, L, 4)), Z((B, L, 8)), MASK),
     "student_hidden (3, 5, 4) and teacher_hidden (3, 5, 8) differ"),
    (losses.tinybert_hidden_mse, (Z((B, L)), Z((B, L)), MASK), "student_hidden must be [B, L, H]"),
    (losses.tinybert_hidden_mse, (Z((B, L, 4)), Z((B, L, 4)), MASK[:, :4]),
     "mask must be [B, L] = (3, 5)"),
    (losses.tinybert_attention_mse, (Z((B, 4, L, L)), Z((B, 12, L, L)), MASK),
     "same number of heads, got 4 and 12"),
    (losses.tinybert_attention_mse, (Z((B, 4, L, L)), Z((B, 4, L, 4)), MASK),
     "must both be [B, heads, L, L]"),
    (losses.tinybert_attention_mse, (Z((B, 4, L, L)), Z((B, 4, L, L)), MASK[:2]),
     "mask must be [B, L]"),
    (losses.minilm_attention_kl, (Z((B, 2, L, L)), Z((B, 3, L, L)), MASK),
     "same number of heads, got 2 and 3"),
    (losses.minilm_attention_kl, (Z((B, L, L)), Z((B, 2, L, L)), MASK),
     "student_probs must be [B, heads, L, L]"),
    (losses.minilm_value_relation_kl, (Z((B, 4, L, 8)), Z((B, 12, L, 32)), MASK),
     "same number of heads, got 4 and 12; minilmv2_relation_kl"),
    (losses.minilm_value_relation_kl, (Z((B, 2, L, 8)), Z((B, 2, 4, 8)), MASK),
     "same B, heads and L"),
    (v2(5), (Z((B, 4, L, 8)), Z((B, 12, L, 32)), MASK),
     "num_relation_heads=5 must divide the student's heads * d = 4 * 8 = 32"),
    (v2(3), (Z((B, 3, L, 8)), Z((B, 4, L, 8)), MASK),
     "num_relation_heads=3 must divide the teacher's heads * d = 4 * 8 = 32"),
    (v2(0), (Z((B, 4, L, 8)), Z((B, 4, L, 8)), MASK), "num_relation_heads=0 must divide"),
    (v2(2.0), (Z((B, 4, L, 8)), Z((B, 4, L, 8)), MASK), "num_relation_heads must be an int"),
    (v2(2), (Z((B, 4, L, 8)), Z((2, 4, L, 8)), MASK), "must have the same B and L"),
    (v2(2), (Z((B, L, 32)), Z((B, 4, L, 8)), MASK), "student_x must be [B, heads, L, d]"),
]


@pytest.mark.parametrize(("fn", "args", "expected"), ERRORS)
def test_bad_shapes_are_one_line_config_errors(fn, args, expected):
    with pytest.raises(ConfigError) as e:
        fn(*args)
    message = str(e.value)
    assert expected in message, message
    assert "\n" not in message
    name = getattr(fn, "func", fn).__name__
    assert message.startswith(f"{name}: "), message


# ============================================================== the objective's registry


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_registered_as_a_loss_name(name):
    from jaxkd import objective

    assert objective.LOSSES[name][0] is FUNCTIONS[name]
    term = {"name": name, "student_feature": "attention_probs1", "teacher_feature": "value3"}
    (parsed,) = objective.parse_terms({"layer": term}, has_teacher=True)
    assert parsed.name == name
