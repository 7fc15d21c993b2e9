"""jaxkd.minitron: Block Influence and FFN importance, the pattern-keeping layer choice
against brute force, and a pruned student that computes what the teacher computes when
the cut parts did nothing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxkd import minitron
from jaxkd.models.gemma import Gemma3
from jaxkd.schema import ConfigError

TEACHER = Gemma3(vocab_size=50, hidden_size=16, num_layers=9, num_heads=2, num_kv_heads=1,
                 head_dim=8, intermediate_size=24, sliding_window=3, global_every=3)


@pytest.fixture(scope="module")
def variables():
    v = jax.jit(TEACHER.init)(jax.random.PRNGKey(0), jnp.zeros((1, 6), jnp.int32))
    return jax.tree.map(lambda x: x * 3 if x.ndim == 2 else x, v)


def batches(n=2):
    rng = np.random.default_rng(0)
    for _ in range(n):
        ids = rng.integers(0, 50, size=(3, 10))
        mask = (np.arange(10)[None] < np.array([[10], [6], [8]])).astype(np.int32)
        yield ids, mask


def edit(variables, changes):
    flat = traverse_util.flatten_dict(jax.device_get(variables["params"]))
    for key, fn in changes.items():
        flat[key] = fn(np.array(flat[key]))
    return {"params": traverse_util.unflatten_dict(flat)}


def test_block_influence_is_one_minus_the_token_cosine(variables):
    imp = minitron.importance(TEACHER, variables, batches())
    cos, count = np.zeros(9), 0
    for ids, mask in batches():
        f = TEACHER.apply(variables, jnp.asarray(ids), jnp.asarray(mask), return_logits=False)
        xs = [np.asarray(f["embeddings"])] + [np.asarray(f[f"hidden{i}"]) for i in range(1, 10)]
        for i in range(9):
            a, b = xs[i][mask == 1], xs[i + 1][mask == 1]
            cos[i] += np.sum((a * b).sum(-1) / np.linalg.norm(a, axis=-1)
                             / np.linalg.norm(b, axis=-1))
        count += mask.sum()
    np.testing.assert_allclose(imp["blocks"], 1 - cos / count, rtol=1e-4, atol=1e-6)
    # A block whose branches are switched off (post-norm scales 0) has influence 0.
    off = edit(variables, {("layer4", n, "scale"): np.zeros_like
                           for n in ("post_attention_norm", "post_ffw_norm")})
    assert abs(minitron.importance(TEACHER, off, batches())["blocks"][4]) < 1e-6
    # FFN importance: a dead neuron (zero gate column) scores 0; doubling a neuron's up
    # column doubles its score and no other.
    assert [f.shape for f in imp["ffn"]] == [(24,)] * 9
    changed = edit(variables, {("layer2", "ffn_gate", "kernel"):
                               lambda k: np.where(np.arange(24) == 5, 0.0, k),
                               ("layer2", "ffn_up", "kernel"):
                               lambda k: k * np.where(np.arange(24) == 7, 2.0, 1.0)})
    ffn = minitron.importance(TEACHER, changed, batches())["ffn"][2]
    assert ffn[5] == 0 and ffn[7] == pytest.approx(2 * imp["ffn"][2][7], rel=1e-5)
    others = np.setdiff1d(np.arange(24), [5, 7])
    np.testing.assert_allclose(ffn[others], imp["ffn"][2][others], rtol=1e-5)


@pytest.mark.parametrize("every", [3, 6])
def test_layer_choice_is_the_best_pattern_keeping_subset(every):
    rng = np.random.default_rng(every)
    influence = rng.random(12)
    for keep in range(1, 13):
        valid = [c for c in itertools.combinations(range(12), keep)
                 if all(minitron.is_global(j, every) == minitron.is_global(t, every)
                        for j, t in enumerate(c))]
        if not valid:
            with pytest.raises(ConfigError, match="cannot follow Gemma 3's pattern"):
                minitron.select_layers(influence, keep, every)
            continue
        best = max(valid, key=lambda c: influence[list(c)].sum())
        chosen = minitron.select_layers(influence, keep, every)
        assert influence[chosen].sum() == pytest.approx(influence[list(best)].sum()), keep
        assert tuple(chosen) in valid


def test_the_pruned_student_computes_the_teacher_when_the_cut_did_nothing(variables):
    ids, mask = next(batches())
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    # Layers 3-5 off and FFN neurons 0-7 of every layer dead: the 6-layer, 16-neuron student.
    changes = {(f"layer{i}", n, "scale"): np.zeros_like for i in (3, 4, 5)
               for n in ("post_attention_norm", "post_ffw_norm")}
    changes.update({(f"layer{i}", "ffn_gate", "kernel"):
                    (lambda k: np.where(np.arange(24) < 8, 0.0, k)) for i in range(9)})
    teacher = edit(variables, changes)
    imp = minitron.importance(TEACHER, teacher, batches())
    layers = minitron.select_layers(imp["blocks"], 6, TEACHER.global_every)
    assert layers == [0, 1, 2, 6, 7, 8]
    student, sv = minitron.prune(TEACHER, teacher, layers, imp["ffn"], 16)
    assert (student.num_layers, student.intermediate_size) == (6, 16)
    assert sv["params"]["layer3"]["ffn_gate"]["kernel"].shape == (16, 16)
    np.testing.assert_allclose(student.apply(sv, ids, mask), TEACHER.apply(teacher, ids, mask),
                               rtol=1e-5, atol=1e-5)
    # All layers, all neurons: the teacher itself.
    same, v = minitron.prune(TEACHER, variables, list(range(9)))
    np.testing.assert_array_equal(same.apply(v, ids, mask), TEACHER.apply(variables, ids, mask))
    with pytest.raises(ConfigError, match=r"teacher layer 2 \(global\) would run as local "):
        minitron.prune(TEACHER, variables, [0, 2, 5])
