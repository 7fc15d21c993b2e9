"""llama.cpp's block quantization (Q8_0, Q4_0) as a differentiable fake-quantizer.

So that a model trained quantization-aware is exactly the model its GGUF file holds, the
forward pass here computes, element for element, what the ``gguf`` package's
``quants.quantize`` then ``quants.dequantize`` give (llama.cpp's reference quantizers,
``ggml-quants.c``): each row is cut into blocks of 32 values ``x``, and

- ``Q8_0``: ``d = max|x| / 127``, ``q = round(x / d)`` (half away from zero, by the
  reciprocal ``1 / d``), ``x_hat = f16(d) q``;
- ``Q4_0``: ``m`` the value of largest magnitude (its sign kept), ``d = m / -8``,
  ``q = clip(trunc(x / d + 8.5), 0, 15)``, ``x_hat = f16(d) (q - 8)``;

``d`` is stored as float16 (``f16``), so ``x_hat`` uses the rounded scale while ``q`` used
the float32 one, as llama.cpp does. The gradient is the straight-through estimator
(Bengio et al. 2013): the identity, the scales taken as constants.

``fake_quant_gemma(params, qtype)`` applies it to every matrix a GGUF export quantizes
(:mod:`jaxkd.export.gguf_export`: attention, FFN, the embedding table), leaving the norms.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

BLOCK = 32
QTYPES = ("Q8_0", "Q4_0")


def _round_away(x: jax.Array) -> jax.Array:
    """``sign(x) floor(|x| + 0.5)``: ggml's ``roundf``."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _two_product(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(p, e)`` with ``p = fl(a b)`` and ``p + e = a b`` exactly (Dekker 1971, float32
    split by ``2^12 + 1``)."""

    def split(x):
        c = x * 4097.0
        hi = c - (c - x)
        return hi, x - hi

    p = a * b
    a_hi, a_lo = split(a)
    b_hi, b_lo = split(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def _trunc_exact_product_plus(a: jax.Array, b: jax.Array, c: float) -> jax.Array:
    """``trunc(a b + c)`` of the exact product, for ``0 < a b + c < 17`` (Q4_0's range):
    the number of integers ``k`` in 1..16 with ``a b >= k - c``, each comparison decided on
    the exact ``p + e`` (gguf computes ``a b + c`` in float64, where the product of two
    float32 values is exact)."""
    p, e = _two_product(a, b)
    k = jnp.arange(1, 17, dtype=jnp.float32) - c  # the thresholds, exact in float32
    above = ((p[..., None] - k) + e[..., None]) >= 0  # p - k is exact near the threshold
    return jnp.sum(above, -1).astype(jnp.float32)


def block_quantize_dequantize(x: jax.Array, qtype: str) -> jax.Array:
    """``x`` ``[..., K]`` (``K`` a multiple of 32) through ``qtype`` and back, in float32."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype={qtype!r} is not one of {', '.join(QTYPES)}")
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"rows of {x.shape[-1]} values are not whole blocks of {BLOCK}")
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    if qtype == "Q8_0":
        d = jnp.max(jnp.abs(blocks), -1, keepdims=True) / 127
        inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
        q = _round_away(blocks * inv)
        out = d.astype(jnp.float16).astype(jnp.float32) * q
    else:
        index = jnp.argmax(jnp.abs(blocks), -1, keepdims=True)
        m = jnp.take_along_axis(blocks, index, -1)
        d = m / -8
        inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
        q = jnp.clip(_trunc_exact_product_plus(blocks, inv, 8.5), 0, 15)
        out = d.astype(jnp.float16).astype(jnp.float32) * (q - 8)
    return out.reshape(x.shape)


def fake_quant(x: jax.Array, qtype: str) -> jax.Array:
    """:func:`block_quantize_dequantize` forward, identity gradient (STE)."""
    x = jnp.asarray(x, jnp.float32)
    return x + jax.lax.stop_gradient(block_quantize_dequantize(x, qtype) - x)


def fake_quant_gemma(params: Any, qtype: str) -> Any:
    """A Gemma 3's ``params`` with every matrix GGUF quantizes fake-quantized by rows of its
    ``[out, in]`` GGUF layout (a Flax ``[in, out]`` kernel's columns; the embedding
    table's rows); norms unchanged."""
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for key, value in flat.items():
        if key[-1] == "kernel":  # [in, out]: GGUF rows are its columns
            value = fake_quant(jnp.asarray(value).T, qtype).T
        elif key[-1] == "embedding":
            value = fake_quant(value, qtype)
        out[key] = value
    return traverse_util.unflatten_dict(out)
