"""jaxkd.lm_eval: document windows, and perplexity and KL to a teacher against the whole
logits written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxkd import lm_eval
from jaxkd.models.gemma import Gemma3

MODEL = Gemma3(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
               head_dim=8, intermediate_size=32, sliding_window=4, global_every=2)


def encode(text):
    return [1] + [2 + (ord(c) % 38) for c in text]  # <bos> then one token per character


def test_rows_are_windows_of_one_document_each_starting_with_bos():
    ids, mask = lm_eval.token_rows(["abcdefg", "xy", "pqrs"], encode, 4)
    # "abcdefg": <bos> + 7 -> [<bos> abc] [<bos> def] [<bos> g]; "xy": [<bos> xy];
    # "pqrs": [<bos> pqr] [<bos> s]: every character predicted once, after <bos>.
    e = encode
    assert ids.tolist() == [e("abc"), e("def"), e("g") + [0, 0], e("xy") + [0], e("pqr"),
                            e("s") + [0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0],
                             [1, 1, 1, 1], [1, 1, 0, 0]]


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_perplexity_and_kl_equal_the_whole_logits():
    student = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    teacher = jax.tree.map(lambda x: x * 2,
                           jax.jit(MODEL.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4),
                                                                                jnp.int32)))
    ids, mask = lm_eval.token_rows(["the cat sat", "on the mat today", "a"], encode, 6)
    result = lm_eval.evaluate(MODEL, student, ids, mask, teacher=(MODEL, teacher),
                              batch_size=3, chunk_tokens=5)
    ls = np_log_softmax(np.asarray(MODEL.apply(student, ids, mask), np.float64))[:, :-1]
    lt = np_log_softmax(np.asarray(MODEL.apply(teacher, ids, mask), np.float64))[:, :-1]
    targets = (mask[:, 1:] * mask[:, :-1]).astype(bool)
    nll = -np.take_along_axis(ls, ids[:, 1:, None], -1)[..., 0][targets]
    kl = (np.exp(lt) * (lt - ls)).sum(-1)[targets]
    # windows of <bos> + 5 characters: every character is a target once (11 + 16 + 1)
    assert result["tokens"] == targets.sum() == 11 + 16 + 1
    np.testing.assert_allclose(result["cross_entropy"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(result["perplexity"], np.exp(nll.mean()), rtol=1e-5)
    np.testing.assert_allclose(result["kl_to_teacher"], kl.mean(), rtol=1e-4)
    alone = lm_eval.evaluate(MODEL, student, ids, mask, batch_size=len(ids))
    np.testing.assert_allclose(alone["perplexity"], result["perplexity"], rtol=1e-6)
    assert "kl_to_teacher" not in alone
