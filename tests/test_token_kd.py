"""jaxkd.token_kd: chunked token-level KD equals the naive loss, in values and gradients,
written out in numpy; its compiled peak memory does not grow with the whole [B L, V]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import losses, token_kd

B, L, V, DS, DT = 2, 13, 50, 8, 12  # 26 tokens: chunks of 4 leave a ragged last one


def setup(seed=0):
    rng = np.random.default_rng(seed)
    hs = rng.normal(size=(B, L, DS)).astype(np.float32)
    ht = rng.normal(size=(B, L, DT)).astype(np.float32)
    ws = rng.normal(size=(DS, V)).astype(np.float32)
    emb = rng.normal(size=(V, DT)).astype(np.float32)  # the teacher's head is tied
    mask = (np.arange(L)[None] < np.array([[L], [7]])).astype(np.float32)
    labels = rng.integers(0, V, size=(B, L))
    return hs, ht, ws, emb, mask, labels


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_divergence(name, zs, zt, T, beta):
    """Per token, written out from the definitions (float64)."""
    ls, lt = np_log_softmax(zs / T), np_log_softmax(zt / T)
    ps, pt = np.exp(ls), np.exp(lt)
    if name == "forward_kl":
        return T**2 * (pt * (lt - ls)).sum(-1)
    if name == "reverse_kl":
        return T**2 * (ps * (ls - lt)).sum(-1)
    if name == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    m = beta * pt + (1 - beta) * ps
    return T**2 * (beta * (pt * (lt - np.log(m))).sum(-1)
                   + (1 - beta) * (ps * (ls - np.log(m))).sum(-1))


@pytest.mark.parametrize("divergence", token_kd.DIVERGENCES)
def test_chunked_values_and_gradients_equal_the_whole_logits(divergence):
    hs, ht, ws, emb, mask, labels = setup()
    T, beta = 2.0, 0.3
    kwargs = dict(divergence=divergence, temperature=T, beta=beta, labels=labels)

    def loss(fn, hs, ws, **extra):
        out = fn(hs, ht, mask, student_head=token_kd.dense_head(ws),
                 teacher_head=token_kd.tied_head(emb), **kwargs, **extra)
        return losses.masked_mean(out.divergence, mask) + losses.masked_mean(
            out.cross_entropy, mask), out

    (chunked, out), grads = jax.value_and_grad(
        lambda h, w: loss(token_kd.token_losses, h, w, chunk_tokens=4), argnums=(0, 1),
        has_aux=True)(hs, ws)
    (naive, ref), ref_grads = jax.value_and_grad(
        lambda h, w: loss(token_kd.naive_token_losses, h, w), argnums=(0, 1),
        has_aux=True)(hs, ws)
    # Values against numpy (float64), padding 0.
    zs, zt = hs.astype(np.float64) @ ws, ht.astype(np.float64) @ emb.T.astype(np.float64)
    expected = np_divergence(divergence, zs, zt, T, beta) * mask
    np.testing.assert_allclose(out.divergence, expected, rtol=2e-5, atol=1e-6)
    ce = -np.take_along_axis(np_log_softmax(zs), labels[..., None], -1)[..., 0] * mask
    np.testing.assert_allclose(out.cross_entropy, ce, rtol=2e-5, atol=1e-6)
    assert np.all(np.asarray(out.divergence)[1, 7:] == 0)
    # The chunked loss is the naive one, with the same gradients.
    np.testing.assert_allclose(chunked, naive, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(grads[0])).sum() > 0 and np.all(np.asarray(grads[0])[1, 7:] == 0)


def test_padding_never_counts_whatever_it_holds():
    hs, ht, ws, emb, mask, _ = setup()
    junk_s, junk_t = hs.copy(), ht.copy()
    junk_s[1, 7:], junk_t[1, 7:] = 1e4, -1e4

    def value(h_s, h_t):
        return losses.masked_mean(token_kd.token_losses(
            h_s, h_t, mask, student_head=token_kd.dense_head(ws),
            teacher_head=token_kd.tied_head(emb), chunk_tokens=5).divergence, mask)

    np.testing.assert_array_equal(value(junk_s, junk_t), value(hs, ht))
    assert np.isfinite(jax.grad(value)(junk_s, junk_t)).all()


def test_peak_memory_is_a_chunk_of_logits_not_all_of_them():
    """XLA's compiled memory analysis of the gradient: the naive loss holds [B L, V]
    logits (and more), the chunked one a few [chunk, V]."""
    n_batch, length, vocab, d, chunk = 4, 256, 8192, 32, 128
    hs = jax.ShapeDtypeStruct((n_batch, length, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, vocab), jnp.float32)
    mask = jax.ShapeDtypeStruct((n_batch, length), jnp.float32)

    def peak(fn, **extra):
        def loss(h, w_s, w_t, m):
            out = fn(h, h, m, student_head=token_kd.dense_head(w_s),
                     teacher_head=token_kd.dense_head(w_t), **extra)
            return losses.masked_mean(out.divergence, m)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hs, w, w, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = n_batch * length * vocab * 4  # 32 MiB
    naive = peak(token_kd.naive_token_losses)
    chunked = peak(token_kd.token_losses, chunk_tokens=chunk)
    assert naive >= 2 * logits_bytes, naive  # at least both models' logits
    assert chunked <= 12 * chunk * vocab * 4, chunked  # a few [chunk, V] float32 arrays
    assert chunked * 4 < naive


def test_bad_arguments_are_one_line():
    hs, ht, ws, emb, mask, _ = setup()
    heads = dict(student_head=token_kd.dense_head(ws), teacher_head=token_kd.tied_head(emb))
    with pytest.raises(ValueError, match="^divergence='kl' is not one of forward_kl, "):
        token_kd.token_losses(hs, ht, mask, divergence="kl", **heads)
    with pytest.raises(ValueError, match=r"^token_losses: hidden states must be \[B, L, D\]"):
        token_kd.token_losses(hs, ht[:, :5], mask, **heads)
    with pytest.raises(ValueError, match="^token_losses: chunk_tokens must be >= 1"):
        token_kd.token_losses(hs, ht, mask, chunk_tokens=0, **heads)


@pytest.mark.parametrize("residual", [True, False])
def test_topk_teacher_chunked_equals_the_whole_logits(residual):
    hs, ht, ws, emb, mask, labels = setup()
    zt = ht @ emb.T
    k, T = 5, 2.0
    ids = np.argsort(-zt, -1)[..., :k]
    top = np.take_along_axis(zt, ids, -1)
    p = np.exp(np_log_softmax(zt / T))
    rest = 1 - np.take_along_axis(p, ids, -1).sum(-1) if residual else None

    def loss(h, w, chunked):
        if chunked:
            out = token_kd.topk_token_losses(h, top, ids, rest, mask,
                                             student_head=token_kd.dense_head(w), labels=labels,
                                             temperature=T, chunk_tokens=4)
            d, ce = out.divergence, out.cross_entropy
        else:
            z = h @ w
            d = losses.topk_soft_target_kl(z, top, ids, T, rest) * mask
            ce = losses.cross_entropy(z, labels) * mask
        return losses.masked_mean(d, mask) + losses.masked_mean(ce, mask), d

    (a, da), ga = jax.value_and_grad(lambda h, w: loss(h, w, True), (0, 1), has_aux=True)(hs, ws)
    (b, db), gb = jax.value_and_grad(lambda h, w: loss(h, w, False), (0, 1), has_aux=True)(hs, ws)
    np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    assert float(a) > 0
