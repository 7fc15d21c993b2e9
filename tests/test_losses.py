"""Tests for jaxkd.losses against independent float64 numpy formulas.

The ``ref_*`` functions below are written from the papers' formulas with plain numpy and
loops; they never call jaxkd. Gradients of the (float32) jaxkd losses are compared with
central finite differences of these float64 references. x64 is NOT enabled globally.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses

# ============================================================== float64 numpy references


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return float(np.sum(p * np.log(p / q)))


def np_huber(x):
    x = np.asarray(x, np.float64)
    return np.where(np.abs(x) < 1.0, 0.5 * x**2, np.abs(x) - 0.5)


def np_unit(x, eps=1e-12):
    n = np.sqrt(np.sum(x * x))
    return x / max(n, eps)


def np_softmax_rows(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def per_position(fn, *arrays, extra=()):
    """Applies a 1-D reference to every leading index of ``arrays[0]`` ([..., C])."""
    lead = np.shape(arrays[0])[:-1]
    out = np.zeros(lead)
    for idx in np.ndindex(lead):
        out[idx] = fn(*(np.asarray(a)[idx] for a in arrays), *extra)
    return out


def ref_soft_target_kl(s, t, T):
    return T**2 * np_kl(np_softmax(t / T), np_softmax(s / T))


def ref_reverse_kl(s, t, T):
    return T**2 * np_kl(np_softmax(s / T), np_softmax(t / T))


def ref_gjsd(s, t, beta, T):
    pt, ps = np_softmax(t / T), np_softmax(s / T)
    if beta == 0:
        return T**2 * np_kl(pt, ps)
    if beta == 1:
        return T**2 * np_kl(ps, pt)
    m = beta * pt + (1 - beta) * ps
    return T**2 * (beta * np_kl(pt, m) + (1 - beta) * np_kl(ps, m))


def ref_total_variation(s, t, T):
    return 0.5 * float(np.sum(np.abs(np_softmax(t / T) - np_softmax(s / T))))


def ref_logit_mse(s, t):
    return float(np.mean((s - t) ** 2))


def ref_cross_entropy(z, y, eps):
    y = int(y)
    if y < 0:
        return 0.0
    p = np_softmax(z)
    c = len(z)
    total = 0.0
    for k in range(c):
        target = (1 - eps) * (k == y) + eps / c
        total -= target * np.log(p[k])
    return total


def ref_decoupled_kd(s, t, y, alpha, beta, T):
    y = int(y)
    if y < 0:
        return 0.0
    ps, pt = np_softmax(s / T), np_softmax(t / T)
    bs = np.array([ps[y], np.delete(ps, y).sum()])
    bt = np.array([pt[y], np.delete(pt, y).sum()])
    tckd = T**2 * np_kl(bt, bs)
    nckd = T**2 * np_kl(np_softmax(np.delete(t, y) / T), np_softmax(np.delete(s, y) / T))
    return alpha * tckd + beta * nckd


def ref_topk(s, tk, idx, T):
    return ref_soft_target_kl(s[np.asarray(idx, int)], tk, T)


def ref_hint_mse(s, t):
    return np.array([np.mean((s[b] - t[b]) ** 2) for b in range(s.shape[0])])


def ref_attention_transfer(s, t, p):
    out = []
    for b in range(s.shape[0]):
        a_s = np_unit(np.mean(np.abs(s[b]) ** p, axis=-1).ravel())
        a_t = np_unit(np.mean(np.abs(t[b]) ** p, axis=-1).ravel())
        out.append(np.mean((a_s - a_t) ** 2))
    return np.array(out)


def ref_rkd_distance(s, t):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    n = len(s)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if not pairs:
        return 0.0
    ds = np.array([np.linalg.norm(s[i] - s[j]) for i, j in pairs])
    dt = np.array([np.linalg.norm(t[i] - t[j]) for i, j in pairs])
    return float(np.mean(np_huber(ds / ds.mean() - dt / dt.mean())))


def ref_rkd_angle(s, t):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    n = len(s)
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(n):
                cs = np.dot(np_unit(s[j] - s[i]), np_unit(s[k] - s[i]))
                ct = np.dot(np_unit(t[j] - t[i]), np_unit(t[k] - t[i]))
                total += np_huber(cs - ct)
    return float(total / n**3)


def ref_similarity_preserving(s, t):
    s, t = s.reshape(len(s), -1), t.reshape(len(t), -1)
    n = len(s)
    gs, gt = s @ s.T, t @ t.T
    gs = np.stack([np_unit(row) for row in gs])
    gt = np.stack([np_unit(row) for row in gt])
    return float(np.sum((gs - gt) ** 2) / n**2)


def ref_pkt(s, t, eps):
    def cond(e):
        e = e.reshape(len(e), -1)
        u = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = (u @ u.T + 1) / 2
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = cond(s), cond(t)
    rows = [np.sum(pt[i] * np.log((pt[i] + eps) / (ps[i] + eps))) for i in range(len(pt))]
    return float(np.mean(rows))


def ref_pearson(a, b, eps=1e-8):
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps))


def ref_dist(s, t, beta, gamma, T):
    ps = np.stack([np_softmax(r / T) for r in s])
    pt = np.stack([np_softmax(r / T) for r in t])
    inter = 1 - np.mean([ref_pearson(ps[i], pt[i]) for i in range(ps.shape[0])])
    intra = 1 - np.mean([ref_pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return T**2 * (beta * inter + gamma * intra)


# ============================================================== cases

RNG_SEED = 1234


def f32(x):
    return np.asarray(x, np.float32)


def make_logits(rng, shape):
    return f32(2.0 * rng.normal(size=shape)), f32(2.0 * rng.normal(size=shape))


def make_labelled(rng, shape):
    s, t = make_logits(rng, shape)
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    if labels.size > 1:
        labels.flat[1] = -1  # one unlabelled position
    return s, t, labels


def make_topk(rng, shape, k=3):
    s, t_full = make_logits(rng, shape)
    idx = np.argsort(-t_full, axis=-1)[..., :k].astype(np.int32)
    return s, f32(np.take_along_axis(t_full, idx, -1)), idx


def make_ce(rng, shape):
    z = f32(2.0 * rng.normal(size=shape))
    labels = rng.integers(0, shape[-1], size=shape[:-1]).astype(np.int32)
    if labels.size > 1:
        labels.flat[0] = -1
    return z, labels


def make_pair(rng, shapes):
    s_shape, t_shape = shapes
    return f32(rng.normal(size=s_shape)), f32(rng.normal(size=t_shape))


PER_POSITION_SHAPES = ((7,), (4, 5), (2, 3, 6))


@dataclasses.dataclass(frozen=True)
class Case:
    fn: Callable  # jaxkd call on positional arrays
    ref: Callable  # float64 numpy reference on the same arrays (unreduced)
    make: Callable  # (rng, variant) -> tuple of numpy arrays
    variants: tuple
    diff: tuple  # argnums of the float inputs
    batch: bool = False  # batch-level loss (scalar output, accepts mask=)


CASES = {
    "soft_target_kl": Case(
        lambda s, t: losses.soft_target_kl(s, t, temperature=2.0),
        lambda s, t: per_position(ref_soft_target_kl, s, t, extra=(2.0,)),
        make_logits,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "soft_target_kl_default_T": Case(
        lambda s, t: losses.soft_target_kl(s, t),
        lambda s, t: per_position(ref_soft_target_kl, s, t, extra=(1.0,)),
        make_logits,
        ((2, 3, 6),),
        (0, 1),
    ),
    "reverse_kl": Case(
        lambda s, t: losses.reverse_kl(s, t, temperature=1.5),
        lambda s, t: per_position(ref_reverse_kl, s, t, extra=(1.5,)),
        make_logits,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "generalized_jsd": Case(
        lambda s, t: losses.generalized_jsd(s, t, beta=0.3, temperature=2.0),
        lambda s, t: per_position(ref_gjsd, s, t, extra=(0.3, 2.0)),
        make_logits,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "generalized_jsd_default": Case(
        lambda s, t: losses.generalized_jsd(s, t),
        lambda s, t: per_position(ref_gjsd, s, t, extra=(0.5, 1.0)),
        make_logits,
        ((2, 3, 6),),
        (0, 1),
    ),
    "total_variation": Case(
        lambda s, t: losses.total_variation(s, t, temperature=1.7),
        lambda s, t: per_position(ref_total_variation, s, t, extra=(1.7,)),
        make_logits,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "logit_mse": Case(
        losses.logit_mse,
        lambda s, t: per_position(ref_logit_mse, s, t),
        make_logits,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "cross_entropy": Case(
        lambda z, y: losses.cross_entropy(z, y, label_smoothing=0.1),
        lambda z, y: per_position(ref_cross_entropy, z, y, extra=(0.1,)),
        make_ce,
        PER_POSITION_SHAPES,
        (0,),
    ),
    "decoupled_kd": Case(
        lambda s, t, y: losses.decoupled_kd(s, t, y, alpha=1.3, beta=2.0, temperature=3.0),
        lambda s, t, y: per_position(ref_decoupled_kd, s, t, y, extra=(1.3, 2.0, 3.0)),
        make_labelled,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "decoupled_kd_default": Case(
        lambda s, t, y: losses.decoupled_kd(s, t, y),
        lambda s, t, y: per_position(ref_decoupled_kd, s, t, y, extra=(1.0, 8.0, 4.0)),
        make_labelled,
        ((2, 3, 6),),
        (0, 1),
    ),
    "topk_soft_target_kl": Case(
        lambda s, tk, idx: losses.topk_soft_target_kl(s, tk, idx, temperature=2.0),
        lambda s, tk, idx: per_position(ref_topk, s, tk, idx, extra=(2.0,)),
        make_topk,
        PER_POSITION_SHAPES,
        (0, 1),
    ),
    "hint_mse": Case(
        losses.hint_mse,
        ref_hint_mse,
        lambda rng, shape: make_pair(rng, (shape, shape)),
        ((3, 5), (2, 3, 2, 2)),
        (0, 1),
    ),
    "attention_transfer": Case(
        losses.attention_transfer,
        lambda s, t: ref_attention_transfer(s, t, 2),
        make_pair,
        (((2, 3, 2, 4), (2, 3, 2, 3)), ((3, 2, 2, 2), (3, 2, 2, 5))),
        (0, 1),
    ),
    "attention_transfer_p3": Case(
        lambda s, t: losses.attention_transfer(s, t, p=3),
        lambda s, t: ref_attention_transfer(s, t, 3),
        make_pair,
        (((2, 3, 2, 4), (2, 3, 2, 3)),),
        (0, 1),
    ),
    "rkd_distance": Case(
        losses.rkd_distance,
        ref_rkd_distance,
        make_pair,
        (((5, 4), (5, 3)), ((4, 2, 3), (4, 5))),
        (0, 1),
        batch=True,
    ),
    "rkd_angle": Case(
        losses.rkd_angle,
        ref_rkd_angle,
        make_pair,
        (((5, 3), (5, 4)), ((4, 2, 2), (4, 3))),
        (0, 1),
        batch=True,
    ),
    "similarity_preserving": Case(
        losses.similarity_preserving,
        ref_similarity_preserving,
        make_pair,
        (((5, 6), (5, 3)), ((4, 2, 2, 3), (4, 7))),
        (0, 1),
        batch=True,
    ),
    "pkt": Case(
        losses.pkt,
        lambda s, t: ref_pkt(s, t, 1e-7),
        make_pair,
        (((5, 4), (5, 3)), ((4, 2, 3), (4, 5))),
        (0, 1),
        batch=True,
    ),
    "dist_loss": Case(
        lambda s, t, mask=None: losses.dist_loss(
            s, t, beta=1.5, gamma=0.7, temperature=2.0, mask=mask
        ),
        lambda s, t: ref_dist(s, t, 1.5, 0.7, 2.0),
        lambda rng, shape: make_logits(rng, shape),
        ((6, 5), (4, 3)),
        (0, 1),
        batch=True,
    ),
    "dist_loss_default": Case(
        losses.dist_loss,
        lambda s, t: ref_dist(s, t, 1.0, 1.0, 1.0),
        lambda rng, shape: make_logits(rng, shape),
        ((5, 4),),
        (0, 1),
        batch=True,
    ),
}
BATCH_CASES = [name for name, case in CASES.items() if case.batch]
VALUE_PARAMS = [(name, v) for name, case in CASES.items() for v in case.variants]


def to64(args):
    return [np.asarray(a, np.float64) if np.asarray(a).dtype.kind == "f" else a for a in args]


# XLA compilation dominates the runtime of this file on CPU (eager dispatch compiles every
# primitive too), so the helpers below jit each (function, shapes) once, with cheaper
# LLVM passes (the traced computation is the same; only code generation is cheaper).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _compiled_value(fn):
    return jax.jit(fn, compiler_options=_FAST_COMPILE)


@functools.cache
def _compiled_value_and_grad(fn, argnums):
    def total(*args, **kwargs):
        values = fn(*args, **kwargs)
        return jnp.sum(values), values

    grad_fn = jax.value_and_grad(total, argnums=argnums, has_aux=True)
    return jax.jit(grad_fn, compiler_options=_FAST_COMPILE)


def evaluate(fn, args, argnums=(0, 1), **kwargs):
    """``(fn(*args), grads of sum(fn(*args)) w.r.t. args[argnums])``, from one jitted call."""
    args = [jnp.asarray(a) for a in args]
    (_, values), grads = _compiled_value_and_grad(fn, tuple(argnums))(*args, **kwargs)
    return np.asarray(values), grads


def value(fn, args, **kwargs):
    """``fn(*args)``, jitted."""
    return np.asarray(_compiled_value(fn)(*[jnp.asarray(a) for a in args], **kwargs))


def fd_grad(ref, args, argnum, h=1e-6):
    """Central finite differences of ``sum(ref(*args))`` w.r.t. ``args[argnum]`` (float64)."""
    args = to64(args)
    x = args[argnum]
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        plus = np.sum(ref(*args))
        x[idx] = old - h
        minus = np.sum(ref(*args))
        x[idx] = old
        grad[idx] = (plus - minus) / (2 * h)
    return grad


def assert_grad_close(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=2e-4 * scale)


def assert_all_finite(tree):
    for leaf in jax.tree_util.tree_leaves(tree):
        assert np.all(np.isfinite(np.asarray(leaf))), leaf


# ============================================================== values and gradients


@pytest.mark.parametrize(("name", "variant"), VALUE_PARAMS)
def test_values_match_numpy_reference(name, variant):
    case = CASES[name]
    rng = np.random.default_rng(RNG_SEED)
    args = case.make(rng, variant)
    got = value(case.fn, args)
    want = np.asarray(case.ref(*to64(args)))
    assert got.dtype == np.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_match_finite_differences(name):
    case = CASES[name]
    rng = np.random.default_rng(RNG_SEED + 1)
    args = case.make(rng, case.variants[-1])
    got, grads = evaluate(case.fn, args, case.diff)
    np.testing.assert_allclose(got, case.ref(*to64(args)), rtol=2e-4, atol=2e-5)
    for argnum, grad in zip(case.diff, grads, strict=True):
        assert_grad_close(grad, fd_grad(case.ref, args, argnum))


def test_public_api_signatures():
    expected = {
        "masked_mean": "values, mask=None",
        "label_mask": "labels",
        "cross_entropy": "logits, labels, label_smoothing=0.0",
        "soft_target_kl": "student_logits, teacher_logits, temperature=1.0",
        "reverse_kl": "student_logits, teacher_logits, temperature=1.0",
        "generalized_jsd": "student_logits, teacher_logits, beta=0.5, temperature=1.0",
        "total_variation": "student_logits, teacher_logits, temperature=1.0",
        "logit_mse": "student_logits, teacher_logits",
        "decoupled_kd": (
            "student_logits, teacher_logits, labels, alpha=1.0, beta=8.0, temperature=4.0"
        ),
        "topk_soft_target_kl": (
            "student_logits, teacher_topk_logits, teacher_topk_indices, temperature=1.0, "
            "teacher_residual=None"
        ),
        "hint_mse": "student_features, teacher_features",
        "attention_transfer": "student_features, teacher_features, p=2",
        "rkd_distance": "student_emb, teacher_emb, mask=None",
        "rkd_angle": "student_emb, teacher_emb, mask=None",
        "similarity_preserving": "student_features, teacher_features, mask=None",
        "pkt": "student_emb, teacher_emb, eps=1e-07, mask=None",
        "dist_loss": (
            "student_logits, teacher_logits, beta=1.0, gamma=1.0, temperature=1.0, mask=None"
        ),
    }
    assert sorted(losses.__all__) == sorted(expected)
    for name, params in expected.items():
        sig = inspect.signature(getattr(losses, name))
        got = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in sig.parameters.values()
        )
        assert got == params, name
        assert getattr(losses, name).__doc__, name


# ============================================================== identities


def test_zero_when_student_equals_teacher():
    rng = np.random.default_rng(0)
    z = f32(3.0 * rng.normal(size=(2, 3, 6)))
    labels = rng.integers(0, 6, size=(2, 3)).astype(np.int32)
    idx = np.argsort(-z, -1)[..., :4].astype(np.int32)
    top = np.take_along_axis(z, idx, -1)
    per_position_losses = [
        lambda s, t: losses.soft_target_kl(s, t, temperature=2.0),
        losses.reverse_kl,
        lambda s, t: losses.generalized_jsd(s, t, beta=0.0),
        lambda s, t: losses.generalized_jsd(s, t, beta=0.3),
        lambda s, t: losses.generalized_jsd(s, t, beta=1.0),
        losses.total_variation,
        losses.logit_mse,
        lambda s, t: losses.decoupled_kd(s, t, labels),
        lambda s, t: losses.topk_soft_target_kl(s, top, idx),
    ]
    for fn in per_position_losses:
        loss, grads = evaluate(fn, (z, z))
        assert loss.shape == (2, 3)
        np.testing.assert_allclose(loss, 0.0, atol=2e-5)
        if fn is not losses.total_variation:  # |.| has no gradient at 0, only subgradients
            for grad in grads:  # a smooth minimum: the gradient vanishes too
                np.testing.assert_allclose(grad, 0.0, atol=1e-5)
    f = f32(rng.normal(size=(3, 4, 4, 5)))
    for fn in (losses.hint_mse, losses.attention_transfer):
        np.testing.assert_allclose(value(fn, (f, f)), 0.0, atol=1e-7)
    e = f32(rng.normal(size=(6, 5)))
    for fn in (losses.rkd_distance, losses.rkd_angle, losses.similarity_preserving, losses.pkt):
        np.testing.assert_allclose(value(fn, (e, e)), 0.0, atol=2e-6)
    np.testing.assert_allclose(value(losses.dist_loss, (e, e)), 0.0, atol=1e-5)


def test_eager_mode_without_jit():
    # Everything else in this file runs under jit; make sure plain eager calls work too.
    rng = np.random.default_rng(19)
    s, t = make_logits(rng, (3, 4))
    np.testing.assert_allclose(
        losses.soft_target_kl(s, t, 2.0),
        per_position(ref_soft_target_kl, s, t, extra=(2.0,)),
        rtol=2e-4,
    )
    np.testing.assert_allclose(
        losses.generalized_jsd(s, t, jnp.float32(0.4)),
        per_position(ref_gjsd, s, t, extra=(0.4, 1.0)),
        rtol=2e-4,
    )
    np.testing.assert_allclose(losses.rkd_distance(s, t), ref_rkd_distance(s, t), rtol=2e-4)


def test_relational_losses_ignore_scale_where_the_paper_says_so():
    # Distances are normalised by their mean, angles and cosines are scale-free.
    rng = np.random.default_rng(1)
    s, t = f32(rng.normal(size=(5, 4))), f32(rng.normal(size=(5, 3)))
    for fn in (losses.rkd_distance, losses.rkd_angle, losses.similarity_preserving, losses.pkt):
        np.testing.assert_allclose(value(fn, (7 * s, t)), value(fn, (s, t)), rtol=1e-4, atol=1e-6)
    # ...which the DIST and hint losses are not.
    s, t = make_logits(rng, (5, 4))
    for fn in (losses.dist_loss, losses.hint_mse):
        assert abs(float(np.mean(value(fn, (7 * s, t)) - value(fn, (s, t))))) > 1e-2


def test_generalized_jsd_endpoints_are_forward_and_reverse_kl():
    rng = np.random.default_rng(2)
    s, t = make_logits(rng, (2, 3, 7))
    fwd = losses.soft_target_kl(s, t, temperature=1.5)
    rev = losses.reverse_kl(s, t, temperature=1.5)
    assert not np.allclose(fwd, rev, rtol=1e-2)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, 0.0, 1.5), fwd, rtol=1e-6)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, 1.0, 1.5), rev, rtol=1e-6)
    # Documented limits: JSD_beta / beta -> forward KL, JSD_beta / (1 - beta) -> reverse KL.
    b = 1e-3
    np.testing.assert_allclose(losses.generalized_jsd(s, t, b, 1.5) / b, fwd, rtol=2e-2)
    np.testing.assert_allclose(losses.generalized_jsd(s, t, 1 - b, 1.5) / b, rev, rtol=2e-2)


def test_generalized_jsd_traced_beta_matches_static_beta():
    rng = np.random.default_rng(3)
    s, t = make_logits(rng, (4, 5))

    def jsd(s, t, beta):
        return losses.generalized_jsd(s, t, beta=beta, temperature=2.0)

    for beta in (0.0, 0.25, 1.0):

        def ref(s, t, beta=beta):
            return per_position(ref_gjsd, s, t, extra=(beta, 2.0))

        traced_beta = jnp.float32(beta)
        want = ref(*to64((s, t)))
        got, grads = evaluate(jsd, (s, t, traced_beta), argnums=(0, 1, 2))
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(jsd(s, t, beta), want, rtol=2e-4, atol=2e-5)  # static
        for argnum, grad in enumerate(grads[:2]):
            assert_grad_close(grad, fd_grad(ref, (s, t), argnum))
        assert np.isfinite(grads[2])  # even d/dbeta stays finite at the endpoints
    # beta may also vary per position (vmap over beta).
    betas = [0.0, 0.3, 1.0, 0.7]
    per_row = jax.jit(jax.vmap(jsd))(s, t, jnp.array(betas, jnp.float32))
    for i, beta in enumerate(betas):
        np.testing.assert_allclose(per_row[i], ref_gjsd(s[i], t[i], beta, 2.0), rtol=2e-4)


def test_decoupled_kd_decomposes_soft_target_kl():
    # Zhao et al. 2022, Eq. 4: KD = TCKD + (1 - p_t[target]) NCKD.
    rng = np.random.default_rng(4)
    s, t = make_logits(rng, (3, 4, 6))
    labels = rng.integers(0, 6, size=(3, 4)).astype(np.int32)
    T = 2.5

    def parts(s, t):
        return jnp.stack(
            [
                losses.decoupled_kd(s, t, labels, alpha=1.0, beta=0.0, temperature=T),
                losses.decoupled_kd(s, t, labels, alpha=0.0, beta=1.0, temperature=T),
                losses.decoupled_kd(s, t, labels, alpha=0.5, beta=3.0, temperature=T),
                losses.soft_target_kl(s, t, temperature=T),
            ]
        )

    tckd, nckd, both, kd = value(parts, (s, t))
    p_target = np.take_along_axis(np_softmax_rows(t / T), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(tckd + (1.0 - p_target) * nckd, kd, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(both, 0.5 * tckd + 3.0 * nckd, rtol=1e-5, atol=1e-6)


def test_decoupled_kd_nckd_ignores_the_target_logit():
    rng = np.random.default_rng(5)
    s, t = make_logits(rng, (4, 5))
    labels = np.array([0, 2, 4, 1], np.int32)
    shifted = s.copy()
    # Far beyond the official code's "- 1000 * gt_mask" (1e4 / T = 2500 for the default T).
    shifted[np.arange(4), labels] += 1e4

    def nckd(s, t):
        return losses.decoupled_kd(s, t, labels, alpha=0.0, beta=1.0)

    loss, (grad_s, grad_t) = evaluate(nckd, (s, t))
    np.testing.assert_allclose(evaluate(nckd, (shifted, t))[0], loss, rtol=1e-5)
    for grad in (grad_s, grad_t):
        np.testing.assert_array_equal(np.asarray(grad)[np.arange(4), labels], 0.0)
        assert np.all(np.abs(np.asarray(grad)).sum(-1) > 0)


def test_topk_with_all_classes_equals_soft_target_kl():
    rng = np.random.default_rng(6)
    s, t = make_logits(rng, (2, 3, 8))
    idx = np.stack([rng.permutation(8) for _ in range(6)]).reshape(2, 3, 8).astype(np.int32)
    full, (g_full, _) = evaluate(lambda s, t: losses.soft_target_kl(s, t, 1.7), (s, t))
    topk, (g_topk,) = evaluate(
        lambda s, tk, idx: losses.topk_soft_target_kl(s, tk, idx, 1.7),
        (s, np.take_along_axis(t, idx, -1), idx),
        argnums=(0,),
    )
    np.testing.assert_allclose(topk, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_topk, g_full, rtol=1e-4, atol=1e-6)


def test_topk_residual_bucket_matches_numpy_and_reaches_every_class():
    """k + 1 buckets: the teacher's top-k and its remaining mass r against the student's."""
    rng = np.random.default_rng(5)
    s = rng.normal(size=(4, 9)).astype(np.float32)
    t = 2.0 * rng.normal(size=(4, 9)).astype(np.float32)
    T = 1.5
    idx = np.argsort(-t, 1)[:, :3]
    pt = np.exp(t / T - np.log(np.exp(t / T).sum(1, keepdims=True)))
    ps = np.exp(s / T - np.log(np.exp(s / T).sum(1, keepdims=True)))
    r = 1 - np.take_along_axis(pt, idx, 1).sum(1)
    bt = np.concatenate([np.take_along_axis(pt, idx, 1), r[:, None]], 1)
    bs = np.concatenate([np.take_along_axis(ps, idx, 1),
                         1 - np.take_along_axis(ps, idx, 1).sum(1, keepdims=True)], 1)
    want = T**2 * (bt * np.log(bt / bs)).sum(1)
    tk = np.take_along_axis(t, idx, 1)
    got = losses.topk_soft_target_kl(s, tk, idx.astype(np.int32), T, teacher_residual=r)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda z: losses.topk_soft_target_kl(
        z, tk, idx.astype(np.int32), T, teacher_residual=r).sum())(jnp.asarray(s))
    outside = np.ones_like(s, bool)
    np.put_along_axis(outside, idx, False, 1)
    assert (np.abs(np.asarray(grad))[outside] > 0).all()  # every class is pushed
    full = np.argsort(-t, 1).astype(np.int32)  # k = C: r = 0 and it is soft_target_kl
    np.testing.assert_allclose(
        losses.topk_soft_target_kl(s, np.take_along_axis(t, full, 1), full, T,
                                   teacher_residual=np.zeros(4)),
        losses.soft_target_kl(s, t, T), rtol=1e-5, atol=1e-6)


def test_topk_student_gradient_only_on_teacher_support():
    rng = np.random.default_rng(7)
    s, tk, idx = make_topk(rng, (3, 9), k=4)
    _, (grad, _) = evaluate(losses.topk_soft_target_kl, (s, tk, idx))
    grad = np.asarray(grad)
    outside = np.ones_like(grad, bool)
    np.put_along_axis(outside, idx, False, -1)
    np.testing.assert_array_equal(grad[outside], 0.0)
    assert np.all(np.abs(grad[~outside]) > 0)


# ============================================================== masked_mean, cross_entropy


def test_masked_mean_broadcasts_and_weights():
    rng = np.random.default_rng(8)
    values = f32(rng.normal(size=(2, 3, 4)))
    np.testing.assert_allclose(losses.masked_mean(values), values.mean(), rtol=1e-6)
    for mask in (
        rng.random((2, 3, 4)) > 0.5,
        rng.random((2, 3, 1)) > 0.4,
        rng.random((3, 4)) > 0.5,
        f32(rng.random((2, 1, 4))),  # float weights
    ):
        full = np.broadcast_to(np.asarray(mask, np.float64), values.shape)
        want = np.sum(full * values) / np.sum(full)
        np.testing.assert_allclose(losses.masked_mean(values, mask), want, rtol=1e-5)
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.masked_mean(values, np.ones((4, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        losses.masked_mean(values, np.ones((2, 3, 4, 1)))


def test_masked_mean_all_zero_mask_gives_zero_and_zero_gradient():
    values = jnp.arange(6.0).reshape(2, 3) + 1.0
    mask = jnp.zeros((2, 3))
    assert float(losses.masked_mean(values, mask)) == 0.0
    grad = jax.grad(lambda v: losses.masked_mean(v, mask))(values)
    np.testing.assert_array_equal(grad, 0.0)
    grad = jax.grad(lambda v: losses.masked_mean(v, jnp.array([True, False, True])))(values)
    np.testing.assert_allclose(grad, np.array([[1, 0, 1], [1, 0, 1]]) / 4.0)


def test_masked_mean_ignores_nan_at_masked_positions():
    values = jnp.array([1.0, jnp.nan, 3.0, jnp.inf])
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    assert float(losses.masked_mean(values, mask)) == 2.0
    grad = jax.grad(lambda v: losses.masked_mean(v, mask))(values)
    np.testing.assert_array_equal(grad, [0.5, 0.0, 0.5, 0.0])


def test_cross_entropy_unlabelled_positions_and_label_mask():
    rng = np.random.default_rng(9)
    logits = f32(rng.normal(size=(3, 4, 5)))
    labels = rng.integers(0, 5, size=(3, 4)).astype(np.int32)
    labels[0, 1] = labels[2, 3] = -1
    labels[1, 0] = -7
    for smoothing in (0.0, 0.2):
        ce = value(losses.cross_entropy, (logits, labels, jnp.float32(smoothing)))
        want = per_position(ref_cross_entropy, logits, labels, extra=(smoothing,))
        np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-6)
        assert np.all(ce[labels < 0] == 0.0) and np.all(ce[labels >= 0] > 0)
    mask = losses.label_mask(labels)
    assert mask.dtype == jnp.float32
    np.testing.assert_array_equal(mask, (labels >= 0).astype(np.float32))

    def mean_ce(z, y):
        return losses.masked_mean(losses.cross_entropy(z, y), losses.label_mask(y))

    mean, (grad,) = evaluate(mean_ce, (logits, labels), argnums=(0,))
    labelled = per_position(ref_cross_entropy, logits, labels, extra=(0.0,))[labels >= 0]
    np.testing.assert_allclose(mean, labelled.mean(), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(grad)[labels < 0], 0.0)
    assert np.all(np.abs(np.asarray(grad)[labels >= 0]).sum(-1) > 0)
    # All positions unlabelled: 0, not NaN, with a zero gradient.
    mean, (grad,) = evaluate(mean_ce, (logits, -np.ones((3, 4), np.int32)), argnums=(0,))
    assert float(mean) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_decoupled_kd_unlabelled_positions_give_zero():
    rng = np.random.default_rng(10)
    s, t = make_logits(rng, (2, 5))
    labels = np.array([3, -1], np.int32)
    loss, grads = evaluate(losses.decoupled_kd, (s, t, labels))
    assert loss[0] > 0 and loss[1] == 0.0
    for grad in grads:
        np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
        assert np.all(np.abs(np.asarray(grad)[0]) > 0)


# ============================================================== stability


def extreme(rng, x):
    return f32(np.where(rng.random(np.shape(x)) < 0.5, -1e4, 1e4) + rng.normal(size=np.shape(x)))


@pytest.mark.parametrize("name", list(CASES))
def test_finite_values_and_gradients_at_extreme_inputs(name):
    case = CASES[name]
    rng = np.random.default_rng(11)
    args = list(case.make(rng, case.variants[-1]))
    for i in case.diff:
        args[i] = extreme(rng, args[i])
    assert_all_finite(evaluate(case.fn, args, case.diff))
    # Student == teacher at extreme magnitudes (where shapes allow): still finite.
    if np.shape(args[0]) == np.shape(args[1]) and np.asarray(args[1]).dtype.kind == "f":
        args[1] = args[0]
        assert_all_finite(evaluate(case.fn, args, case.diff))


def test_finite_at_extreme_logits_for_traced_jsd_beta_and_temperatures():
    rng = np.random.default_rng(12)
    s, t = extreme(rng, np.zeros((3, 6))), extreme(rng, np.zeros((3, 6)))

    def jsd(s, t, beta):
        return losses.generalized_jsd(s, t, beta, 0.5)

    for beta in (0.0, 0.5, 1.0):
        assert_all_finite(evaluate(jsd, (s, t, jnp.float32(beta))))
    labels = np.array([0, 5, 2], np.int32)
    for fn in (
        lambda s, t: losses.soft_target_kl(s, t, temperature=0.1),
        lambda s, t: losses.decoupled_kd(s, t, labels, temperature=0.1),
        lambda s, t: losses.dist_loss(s, t, temperature=0.1),
    ):
        assert_all_finite(evaluate(fn, (s, t)))


@pytest.mark.parametrize("name", BATCH_CASES)
def test_identical_embeddings_are_finite(name):
    case = CASES[name]
    rng = np.random.default_rng(13)
    s, t = case.make(rng, case.variants[-1])
    same_s = f32(np.broadcast_to(s[:1], s.shape))
    same_t = f32(np.broadcast_to(t[:1], t.shape))
    for args in ((same_s, same_t), (same_s, t), (s, same_t), (same_s, same_s)):
        assert_all_finite(evaluate(case.fn, args))
    if name not in ("dist_loss", "dist_loss_default"):
        np.testing.assert_allclose(evaluate(case.fn, (same_s, same_s))[0], 0.0, atol=1e-6)


def test_zero_features_are_finite():
    zeros = np.zeros((3, 2, 2, 4), np.float32)
    rng = np.random.default_rng(14)
    other = f32(rng.normal(size=(3, 2, 2, 4)))
    for fn in (
        losses.attention_transfer,
        losses.hint_mse,
        losses.rkd_distance,
        losses.rkd_angle,
        losses.similarity_preserving,
        losses.pkt,
    ):
        for args in ((zeros, other), (other, zeros), (zeros, zeros)):
            assert_all_finite(evaluate(fn, args))


# ============================================================== masks in batch-level losses


@pytest.mark.parametrize("name", BATCH_CASES)
def test_mask_equals_dropping_examples(name):
    case = CASES[name]
    rng = np.random.default_rng(15)
    variant = case.variants[0]
    s_shape, t_shape = variant if isinstance(variant[0], tuple) else (variant, variant)
    big = ((7,) + s_shape[1:], (7,) + t_shape[1:])
    s, t = case.make(rng, big if isinstance(variant[0], tuple) else big[0])
    keep = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    dropped, grads_dropped = evaluate(case.fn, (s[keep], t[keep]))
    np.testing.assert_allclose(dropped, case.ref(*to64((s[keep], t[keep]))), rtol=2e-4, atol=2e-6)
    masked = evaluate(case.fn, (s, t), mask=keep)[0]
    np.testing.assert_allclose(masked, dropped, rtol=1e-5, atol=1e-7)
    # Garbage in dropped examples never reaches the value or the gradient.
    s_bad, t_bad = s.copy(), t.copy()
    s_bad[~keep], t_bad[~keep] = np.nan, np.inf
    masked, grads = evaluate(case.fn, (s_bad, t_bad), mask=keep)
    np.testing.assert_allclose(masked, dropped, rtol=1e-5, atol=1e-7)
    assert_all_finite(grads)
    for grad, want in zip(grads, grads_dropped, strict=True):
        np.testing.assert_array_equal(np.asarray(grad)[~keep], 0.0)
        np.testing.assert_allclose(np.asarray(grad)[keep], want, rtol=1e-4, atol=1e-6)
    # Everything masked: 0, with zero (not NaN) gradients.
    masked, grads = evaluate(case.fn, (s, t), mask=np.zeros_like(keep))
    assert float(masked) == 0.0
    for grad in grads:
        np.testing.assert_array_equal(grad, 0.0)


def test_rkd_distance_single_kept_example_has_no_pairs():
    rng = np.random.default_rng(17)
    s, t = f32(rng.normal(size=(4, 3))), f32(rng.normal(size=(4, 2)))
    assert float(value(losses.rkd_distance, (s, t), mask=np.array([0, 0, 1, 0]))) == 0.0
    assert float(value(losses.rkd_distance, (s, t), mask=np.array([1, 1, 1, 0]))) > 0.0


def test_batch_mask_shape_is_checked():
    e = np.ones((4, 3), np.float32)
    for fn in (losses.rkd_distance, losses.rkd_angle, losses.similarity_preserving, losses.pkt):
        with pytest.raises(ValueError, match="mask"):
            fn(e, e, mask=np.ones((3,)))
    with pytest.raises(ValueError, match="mask"):
        losses.dist_loss(e, e, mask=np.ones((4, 1)))


# ============================================================== jit and vmap


@pytest.mark.parametrize("name", list(CASES))
def test_jit_and_vmap(name):
    case = CASES[name]
    rng = np.random.default_rng(18)
    first = case.make(rng, case.variants[0])
    second = case.make(rng, case.variants[0])
    # Eager calls are covered by the identity tests; here jit of each example vs vmap.
    single = [value(case.fn, first), value(case.fn, second)]
    np.testing.assert_allclose(single[0], case.ref(*to64(first)), rtol=2e-4, atol=2e-5)
    stacked = [np.stack([a, b]) for a, b in zip(first, second, strict=True)]
    batched = np.asarray(jax.jit(jax.vmap(case.fn), compiler_options=_FAST_COMPILE)(*stacked))
    np.testing.assert_allclose(batched, np.stack(single), rtol=1e-5, atol=1e-6)
    if case.batch:
        # A float mask per batch (nonzero = keep).
        mask = np.ones((2, first[0].shape[0]), np.float32)
        mask[0, 1] = mask[1, 0] = 0.0
        vmapped = jax.vmap(lambda s, t, m: case.fn(s, t, mask=m))
        masked = jax.jit(vmapped, compiler_options=_FAST_COMPILE)(*stacked, mask)
        for i in range(2):
            keep = mask[i] != 0
            want = case.ref(*to64((stacked[0][i][keep], stacked[1][i][keep])))
            np.testing.assert_allclose(masked[i], want, rtol=2e-4, atol=2e-6)


# ============================================================== errors in user vocabulary


def test_errors_are_raised_early():
    z = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        losses.soft_target_kl(z, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="temperature"):
        losses.reverse_kl(z, z, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(z, z, beta=1.5)
    with pytest.raises(TypeError, match="integer"):
        losses.cross_entropy(z, np.zeros((2,), np.float32))
    with pytest.raises(ValueError, match="labels shape"):
        losses.decoupled_kd(z, z, np.zeros((5,), np.int32))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(z, np.zeros((2,), np.int32), label_smoothing=2.0)
    with pytest.raises(ValueError, match="same B, H, W"):
        losses.attention_transfer(np.zeros((2, 4, 4, 3)), np.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match="batch size"):
        losses.rkd_distance(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        losses.dist_loss(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="same shape"):
        losses.topk_soft_target_kl(z, np.zeros((2, 3)), np.zeros((2, 2), np.int32))


def test_out_of_range_labels_give_nan_not_a_silent_number():
    z = np.zeros((2, 3), np.float32)
    labels = np.array([1, 3], np.int32)  # 3 is not a class of C = 3
    for loss in (
        value(losses.cross_entropy, (z, labels)),
        value(losses.decoupled_kd, (z, z, labels)),
    ):
        assert np.isfinite(loss[0]) and np.isnan(loss[1])
