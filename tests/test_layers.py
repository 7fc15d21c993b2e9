"""jaxkd.layers: weights found by a rule and a layout, in Linen trees, Flax NNX states and
PyTorch-style ``{'weight': [out, in]}`` trees; pruning and clustering act on all three."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxkd import layers, pruning, sharing


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


def torch_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"fc1": {"weight": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
                    "bias": jnp.zeros(16)},
            "fc2": {"weight": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
                    "bias": jnp.zeros(8)},
            "head": {"weight": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32),
                     "bias": jnp.zeros(3)}}


def test_find_and_edge_layers_follow_one_rule():
    state = nnx.state(NnxMLP(nnx.Rngs(0)), nnx.Param)
    found = layers.find(state)
    assert list(found) == ["fc1", "fc2", "head"] and found["fc1"].shape == (12, 16)
    assert layers.weight_paths(state)["fc2"] == "fc2/kernel"
    assert set(layers.find(torch_tree(), layers.TORCH)) == {"fc1", "fc2", "head"}
    assert layers.find(torch_tree()) == {}  # no 'kernel' leaves
    # First by call order when it is known, else the zoo's names, else the tree's first.
    assert layers.edge_layers(["head", "hidden1", "hidden2"]) == ("hidden1", "head")
    assert layers.edge_layers(["a", "b", "c"]) == ("a", "c")
    assert layers.edge_layers(["b", "a", "c"], order=["c", "a", "b"]) == ("c", "b")
    assert layers.edge_layers([]) == ()


def test_magnitude_pruning_of_an_nnx_state():
    model = NnxMLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    tx = pruning.masked(optax.sgd(0.1), sparsity=0.5, schedule="one_shot",
                        layer_order=["fc1", "fc2", "head"])
    opt_state = tx.init(state)
    grads = jax.tree.map(jnp.ones_like, state)
    updates, opt_state = tx.update(grads, opt_state, state)
    new = optax.apply_updates(state, updates)
    w = np.asarray(layers.find(new)["fc2"])
    old = np.abs(np.asarray(layers.find(state)["fc2"]))
    assert (w == 0).sum() == w.size // 2  # the first and last layers stay dense
    assert old[w == 0].max() <= old[w != 0].min()  # the smallest magnitudes went
    assert (np.asarray(layers.find(new)["fc1"]) != 0).all()
    nnx.update(model, new)  # the state still fits its model
    assert model(jnp.ones((2, 12))).shape == (2, 3)


def test_pruning_a_torch_tree_uses_its_layout():
    tree = torch_tree()
    tx = pruning.masked(optax.sgd(0.0), pattern="channels", sparsity=0.5, schedule="one_shot",
                        keep_first_last=False, layers="fc.*", weights=layers.TORCH)
    opt_state = tx.init(tree)
    updates, opt_state = tx.update(jax.tree.map(jnp.zeros_like, tree), opt_state, tree)
    new = optax.apply_updates(tree, updates)
    w = np.asarray(new["fc1"]["weight"])  # [out=16, in=12]: whole rows are output channels
    dead = np.flatnonzero(~w.any(axis=1))
    assert len(dead) == 8 and (np.asarray(new["fc1"]["bias"])[dead] == 0).all()
    norms = np.abs(np.asarray(tree["fc1"]["weight"])).sum(axis=1)
    assert set(dead) == set(np.argsort(norms, kind="stable")[:8])
    nm = pruning.masked(optax.sgd(0.0), pattern="n:m", n=2, m=4, schedule="one_shot",
                        keep_first_last=False, weights=layers.TORCH)
    state = nm.init(tree)
    updates, _ = nm.update(jax.tree.map(jnp.zeros_like, tree), state, tree)
    kept = np.asarray(optax.apply_updates(tree, updates)["fc2"]["weight"]) != 0
    assert (kept.reshape(8, 4, 4).sum(-1) == 2).all()  # 2 of every 4 along the input axis


def test_clustering_a_torch_tree_per_output_channel():
    tree = torch_tree(1)
    tx = sharing.cluster(optax.sgd(0.01), num_clusters=4, granularity="channel",
                         weights=layers.TORCH)
    opt_state = tx.init(tree)
    clusters = sharing.find_cluster_state(opt_state)
    snapped = sharing.materialize(tree, clusters.codebooks, clusters.assignments,
                                  weights=layers.TORCH)
    grads = jax.tree.map(jnp.ones_like, snapped)
    updates, _ = tx.update(grads, opt_state, snapped)
    new = optax.apply_updates(snapped, updates)
    for name in ("fc1", "fc2", "head"):
        w = np.asarray(new[name]["weight"])
        assert max(len(np.unique(row)) for row in w) <= 4, name  # per output channel (a row)
        before = np.asarray(snapped[name]["weight"])
        # Every member of a cluster moved by the same step: lr * (members of its centroid).
        same = before[:, :, None] == before[:, None, :]
        moved = w[:, :, None] - w[:, None, :]
        assert np.allclose(moved[same], 0.0)
