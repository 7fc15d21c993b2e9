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

``integer_apply(model, qtype)`` is the integer forward llama.cpp's CPU backend runs on such
a file: each matrix product ``y = W x`` quantizes ``x`` to ``Q8_0`` blocks as its x86 SIMD
code does (``d_x = f16(max|x| / 127)``, ``q_x = round_half_even(x 127 / max|x|)``) and
computes ``y_n = sum_b d_w[n, b] d_x[b] sum_i q_w[n, b, i] q_x[b, i]``, the inner sums of
int8 products in int32 (``ggml_vec_dot_q8_0_q8_0`` / ``ggml_vec_dot_q4_0_q8_0``), the rest
in float32; the embedding rows are looked up dequantized. Attention's own products
(``Q K^T``, ``P V``; float16 in llama.cpp) stay float32 here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
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


def block_quantize(x: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array]:
    """``(q, d)`` of ``x`` ``[..., K]`` (``K`` a multiple of 32) in ``qtype``: the integers
    ``q`` ``[..., K / 32, 32]`` (centred: ``Q4_0``'s ``q - 8``, in [-8, 7]) as float32 and
    the float16-rounded scales ``d`` ``[..., K / 32, 1]`` as float32, ``x_hat = d q``."""
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
    else:
        index = jnp.argmax(jnp.abs(blocks), -1, keepdims=True)
        m = jnp.take_along_axis(blocks, index, -1)
        d = m / -8
        inv = jnp.where(d == 0, 0.0, 1.0 / jnp.where(d == 0, 1.0, d))
        q = jnp.clip(_trunc_exact_product_plus(blocks, inv, 8.5), 0, 15) - 8
    return q, d.astype(jnp.float16).astype(jnp.float32)


def block_quantize_dequantize(x: jax.Array, qtype: str) -> jax.Array:
    """``x`` ``[..., K]`` (``K`` a multiple of 32) through ``qtype`` and back, in float32."""
    q, d = block_quantize(x, qtype)
    return (d * q).reshape(jnp.shape(x))


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


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(q, d)`` of ``x`` ``[..., K]`` in ``Q8_0`` as llama.cpp's x86 code quantizes a
    matrix product's activations (module docstring); shapes as :func:`block_quantize`."""
    x = jnp.asarray(x, jnp.float32)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = jnp.max(jnp.abs(blocks), -1, keepdims=True)
    inv = jnp.where(amax == 0, 0.0, 127.0 / jnp.where(amax == 0, 1.0, amax))
    q = jnp.round(blocks * inv)  # half to even, as _mm256_round_ps(_MM_ROUND_NEAREST)
    return q, (amax / 127).astype(jnp.float16).astype(jnp.float32)


def integer_matmul(x: jax.Array, w_q: jax.Array, w_d: jax.Array, *, rows: int = 8
                   ) -> jax.Array:
    """``y [..., N]`` of activations ``x [..., K]`` and a weight ``(w_q [N, K/32, 32],
    w_d [N, K/32, 1])`` of :func:`block_quantize`: int8 products summed in int32 per block,
    scaled by both blocks' scales (module docstring); ``rows`` activation rows at a time."""
    q_x, d_x = quantize_activations(x)
    lead = q_x.shape[:-2]
    q_x = q_x.reshape(-1, *q_x.shape[-2:]).astype(jnp.int8)
    d_x = d_x.reshape(-1, d_x.shape[-2])
    w_q, w_d = w_q.astype(jnp.int8), w_d[..., 0]

    def one_row(args):  # vmapped over ``rows`` rows at a time by lax.map
        q, d = args
        sums = jnp.einsum("bi,nbi->nb", q, w_q, preferred_element_type=jnp.int32)
        return jnp.einsum("nb,b,nb->n", sums.astype(jnp.float32), d, w_d)

    y = jax.lax.map(one_row, (q_x, d_x), batch_size=rows)
    return y.reshape(*lead, w_q.shape[0])


def integer_apply(model: nn.Module, qtype: str) -> Callable[..., jax.Array]:
    """``fn(variables, *inputs, **kwargs)``: the Gemma 3 ``model``'s ``apply`` with its
    weights on ``qtype``'s grid and every ``Dense`` layer and the tied output head computed
    as llama.cpp's integer kernels do (module docstring)."""

    def integer(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if isinstance(module, nn.Dense) and method == "__call__":
            w_q, w_d = block_quantize(module.variables["params"]["kernel"].T, qtype)
            return integer_matmul(args[0], w_q, w_d)
        if isinstance(module, nn.Embed) and method == "attend":
            w_q, w_d = block_quantize(module.variables["params"]["embedding"], qtype)
            return integer_matmul(args[0], w_q, w_d)
        return next_fun(*args, **kwargs)

    def apply(variables, *inputs, **kwargs):
        quantized = fake_quant_gemma(variables["params"], qtype)
        with nn.intercept_methods(integer):
            return model.apply({**variables, "params": quantized}, *inputs, **kwargs)

    return apply
