"""jaxkd.gguf_quant: the fake-quantizer equals the gguf package's quantize-then-dequantize
element for element, Q4_0's rounding boundaries included; its gradient is the identity; its
integers are the file's; the integer forward computes llama.cpp's block dot products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from jaxkd import gguf_quant
from jaxkd.export.gguf_export import gguf_tensors
from jaxkd.models.gemma import Gemma3


@pytest.mark.parametrize("qtype", gguf_quant.QTYPES)
def test_equals_llama_cpp_block_quantization(qtype):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(64, 256)), rng.standard_cauchy(size=(16, 256)),
                        np.zeros((1, 256)), np.round(rng.normal(size=(8, 256)) * 4) / 4]
                       ).astype(np.float32)
    # A block whose values sit exactly on Q4_0's rounding boundaries: its largest magnitude
    # -2 gives d = 0.25, and x = (j - 8.5) d gives x / d + 8.5 = j, an integer.
    x[-1, :32] = np.concatenate([[-2.0], (np.arange(31) % 16 + 1 - 8.5) * 0.25])
    qt = getattr(Q, qtype)
    expected = quants.dequantize(quants.quantize(x, qt), qt)
    got = np.asarray(jax.jit(lambda v: gguf_quant.block_quantize_dequantize(v, qtype))(x))
    np.testing.assert_array_equal(got, expected)
    g = jax.grad(lambda v: jnp.sum(gguf_quant.fake_quant(v, qtype) * 3.0))(jnp.asarray(x))
    np.testing.assert_array_equal(g, np.full_like(x, 3.0))


def test_a_gemma_fake_quantized_is_its_gguf_weights():
    model = Gemma3(vocab_size=64, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                   head_dim=32, intermediate_size=64)
    v = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    fq = gguf_quant.fake_quant_gemma(v["params"], "Q4_0")
    for name, value in gguf_tensors(model, v["params"]).items():
        got = gguf_tensors(model, fq)[name]
        if value.ndim == 1:
            np.testing.assert_array_equal(got, value)
        else:
            np.testing.assert_array_equal(
                got, quants.dequantize(quants.quantize(value, Q.Q4_0), Q.Q4_0), err_msg=name)
    with pytest.raises(ValueError, match="rows of 48 values are not whole blocks of 32"):
        gguf_quant.block_quantize_dequantize(jnp.ones((2, 48)), "Q8_0")


def gguf_blocks(raw, qtype):
    """``(q [rows, blocks, 32] centred, d [rows, blocks])`` parsed from the gguf package's
    quantized bytes: Q8_0 blocks are ``f16 d, int8 q[32]``; Q4_0 ``f16 d, uint8 qs[16]``
    with element j in the low nibble of qs[j] and element j + 16 in its high nibble."""
    size = 34 if qtype == "Q8_0" else 18
    blocks = raw.reshape(raw.shape[0], -1, size)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    if qtype == "Q8_0":
        return blocks[..., 2:].view(np.int8).astype(np.float32), d
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], -1).astype(np.float32) - 8
    return q, d


@pytest.mark.parametrize("qtype", gguf_quant.QTYPES)
def test_block_integers_are_those_the_gguf_file_stores(qtype):
    x = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    x[0, :32] = 0.0  # a block of zeros: d = 0
    q, d = jax.jit(lambda v: gguf_quant.block_quantize(v, qtype))(x)
    want_q, want_d = gguf_blocks(quants.quantize(x, getattr(Q, qtype)), qtype)
    np.testing.assert_array_equal(np.asarray(q), want_q)
    np.testing.assert_array_equal(np.asarray(d)[..., 0], want_d)


@pytest.mark.parametrize("qtype", gguf_quant.QTYPES)
def test_integer_matmul_is_the_block_dot_product_of_int8_values(qtype):
    """y_n = sum_b d_w d_x sum_i q_w q_x, against numpy loops over blocks (int64 sums)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = rng.standard_normal((7, 64)).astype(np.float32)
    w_q, w_d = gguf_quant.block_quantize(w, qtype)
    y = np.asarray(jax.jit(lambda a: gguf_quant.integer_matmul(a, w_q, w_d, rows=4))(x))
    w_q, w_d = np.asarray(w_q).astype(np.int64), np.asarray(w_d)[..., 0]
    want = np.zeros((3, 5, 7))
    for t in np.ndindex(3, 5):
        for b in range(2):
            block = x[t][32 * b:32 * (b + 1)]
            amax = np.abs(block).max()
            q_x = np.round(block * np.float32(127 / amax)).astype(np.int64)
            d_x = float(np.float16(amax / 127))
            assert np.abs(q_x).max() == 127
            for n in range(7):
                want[t][n] += w_d[n, b] * d_x * int(np.dot(q_x, w_q[n, b]))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    float_y = x @ (np.asarray(gguf_quant.block_quantize_dequantize(w, qtype)).T)
    np.testing.assert_allclose(y, float_y, atol=0.05 * np.abs(float_y).max())


def test_integer_forward_of_a_gemma_is_close_to_its_float_forward():
    """integer_apply's logits (int8 x int8 block products) against the float forward of
    the same quantized weights: the Q8_0 rounding of the activations only."""
    model = Gemma3(vocab_size=96, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                   head_dim=32, intermediate_size=64)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 96, (2, 12)), jnp.int32)
    v = jax.jit(model.init)(jax.random.PRNGKey(0), ids)
    for qtype in gguf_quant.QTYPES:
        quantized = {"params": gguf_quant.fake_quant_gemma(v["params"], qtype)}
        want = np.asarray(jax.jit(model.apply)(quantized, ids))
        got = np.asarray(jax.jit(gguf_quant.integer_apply(model, qtype))(v, ids))
        assert got.shape == want.shape
        assert not np.array_equal(got, want)
        r = np.corrcoef(got.ravel(), want.ravel())[0, 1]
        top1 = np.mean(got.argmax(-1) == want.argmax(-1))
        assert r > 0.995 and top1 > 0.9, (r, top1)
