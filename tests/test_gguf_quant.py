"""jaxkd.gguf_quant: the fake-quantizer equals the gguf package's quantize-then-dequantize
element for element, Q4_0's rounding boundaries included; its gradient is the identity."""

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
