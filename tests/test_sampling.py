"""jaxkd.sampling: the KV-cached sampler against re-running the whole prefix, padding and
eos, and the top-k / top-p filters against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import sampling
from jaxkd.models.gemma import Gemma3

MODEL = Gemma3(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, intermediate_size=48, sliding_window=3, global_every=2)


@pytest.fixture(scope="module")
def variables():
    v = jax.jit(MODEL.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
    # Larger weights than the init's: sharper distributions, different tokens per position.
    return jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, v)


APPLY = jax.jit(MODEL.apply)


def greedy_by_recomputing(variables, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        logits = APPLY(variables, jnp.asarray([ids]))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt):]


def test_cached_greedy_equals_recomputing_and_padding_changes_nothing(variables):
    prompts = [[5, 9, 13, 2, 7], [11, 3], [60]]
    ids, mask = sampling.left_pad(prompts)
    assert mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    tokens, live = sampling.generate(MODEL, variables, jnp.asarray(ids), jnp.asarray(mask),
                                     jax.random.PRNGKey(1), max_new_tokens=8, temperature=0.0)
    assert tokens.shape == live.shape == (3, 8) and np.all(np.asarray(live) == 1)
    for row, prompt in enumerate(prompts):
        expected = greedy_by_recomputing(variables, prompt, 8)
        assert np.asarray(tokens[row]).tolist() == expected, row
    assert len({tuple(np.asarray(t).tolist()) for t in tokens}) == 3  # not one token repeated


def test_a_row_stops_at_eos(variables):
    ids, mask = sampling.left_pad([[5, 9, 13, 2, 7], [11, 3]])
    free = greedy_by_recomputing(variables, [5, 9, 13, 2, 7], 6)
    eos = free[2]
    tokens, live = sampling.generate(MODEL, variables, jnp.asarray(ids), jnp.asarray(mask),
                                     jax.random.PRNGKey(1), max_new_tokens=6, temperature=0.0,
                                     eos_id=eos, pad_id=0)
    first = free.index(eos)
    assert np.asarray(tokens[0]).tolist() == free[:first + 1] + [0] * (5 - first)
    assert np.asarray(live[0]).tolist() == [1] * (first + 1) + [0] * (5 - first)


def test_filters_and_sampling_follow_the_truncated_distribution():
    logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_k=3)))[0]
    assert kept.tolist() == [False, True, False, True, True]
    # top_p = 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.1 and 0.05 do not.
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.75)))[0]
    assert kept.tolist() == [False, True, False, True, True]
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.1)))[0]
    assert kept.tolist() == [False, True, False, False, False]  # the most likely stays
    n = 20000
    draws = jax.vmap(lambda k: sampling.sample(k, logits, top_k=3)[0])(
        jax.random.split(jax.random.PRNGKey(0), n))
    freq = np.bincount(np.asarray(draws), minlength=5) / n
    expected = np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85
    assert np.all(np.abs(freq - expected) <= 4 * np.sqrt(expected * (1 - expected) / n) + 1e-9)
