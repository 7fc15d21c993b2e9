"""jaxkd.export.gguf_export: a Gemma 3 written as GGUF (Q8_0, Q4_0, F32) reads back as the
model with llama.cpp's block-quantized weights, its tokenizer copied from the teacher's file."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from jaxkd.export.gguf_export import export_gguf, gguf_tensors
from jaxkd.models import gguf_io, spm
from jaxkd.models.gemma import Gemma3
from jaxkd.schema import ConfigError
from tests.test_spm import write_vocab

V = 96
MODEL = Gemma3(vocab_size=V, hidden_size=64, num_layers=6, num_heads=2, num_kv_heads=1,
               head_dim=32, intermediate_size=64, sliding_window=4,
               layer_intermediate=(64, 32, 64, 64, 32, 64))


def teacher_vocab(path):
    """A GGUF file holding only a tokenizer of V tokens (as the teacher's would)."""
    tokens = ["<pad>", "<eos>", "<bos>", "\n"] + [f"p{i}" for i in range(V - 4 - 26)] + [
        chr(ord("a") + i) for i in range(26)]
    write_vocab(path, tokens, [-float(i) for i in range(V)], [3, 3, 3, 4] + [1] * (V - 4))


@pytest.mark.parametrize("qtype,qt", [("Q8_0", Q.Q8_0), ("Q4_0", Q.Q4_0), ("F32", None)])
def test_a_student_round_trips_through_gguf(tmp_path, qtype, qt):
    variables = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    teacher_vocab(tmp_path / "teacher.gguf")
    info = export_gguf(MODEL, variables, str(tmp_path / "student.gguf"), qtype=qtype,
                       tokenizer_from=str(tmp_path / "teacher.gguf"), lineage={"run": "x"})
    matrices = 1 + 7 * MODEL.num_layers
    assert info["tensor_types"] == ({qtype: matrices, "F32": 1 + 6 * 6} if qt else
                                    {"F32": matrices + 1 + 6 * 6})
    model, loaded, meta = gguf_io.from_gguf(str(tmp_path / "student.gguf"))
    assert model.layer_intermediate == MODEL.layer_intermediate
    # The weights read back are llama.cpp's quantization of ours (the gguf package's).
    expected = gguf_tensors(MODEL, variables["params"])
    got = gguf_tensors(model, loaded["params"])
    for name, value in expected.items():
        if qt is not None and value.ndim == 2:
            value = quants.dequantize(quants.quantize(value, qt), qt)
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(2, 12)))
    logits = model.apply(loaded, ids)
    reference = MODEL.apply(variables, ids)
    error = float(jnp.abs(logits - reference).max() / jnp.abs(reference).max())
    assert error < {"Q8_0": 0.05, "Q4_0": 0.5, "F32": 1e-6}[qtype], error
    # The bytes: Q8_0 34 and Q4_0 18 bytes per 32 weights.
    weights = sum(v.size for v in expected.values() if v.ndim == 2)
    per_block = {"Q8_0": 34, "Q4_0": 18, "F32": 128}[qtype]
    assert weights * per_block / 32 < info["bytes"] < weights * per_block / 32 + 20_000
    # The tokenizer is the teacher's.
    assert spm.from_gguf(str(tmp_path / "student.gguf")).encode("ab\nc") == spm.from_gguf(
        str(tmp_path / "teacher.gguf")).encode("ab\nc")
    assert gguf.GGUFReader(str(tmp_path / "student.gguf")).fields[
        "jaxkd.lineage"].contents() == '{"run": "x"}'


def test_what_gguf_cannot_hold_is_one_line(tmp_path):
    variables = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ConfigError, match="^qtype='Q3_K' is not one of Q8_0, Q4_0, F32$"):
        export_gguf(MODEL, variables, str(tmp_path / "s.gguf"), qtype="Q3_K")
    odd = Gemma3(vocab_size=V, hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1,
                 head_dim=24, intermediate_size=64)
    v = jax.jit(odd.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ConfigError, match="rows of 48 values are not whole blocks of 32"):
        export_gguf(odd, v, str(tmp_path / "s.gguf"))
    assert not list(tmp_path.iterdir())  # nothing half-written
