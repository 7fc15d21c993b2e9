"""Compression that composes: physically smaller exports (channel pruning, merging),
cross-layer sharing, and prune -> cluster -> quantize pipelines with structure checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import compression, export, models, pruning, sharing, student_init, train
from jaxkd.config import hinton_losses, run_config


def small_run(data_dir, *, model="mlp", steps=60, **model_kwargs):
    c = run_config("mnist1d", model, **model_kwargs)
    c.data.data_dir = str(data_dir)
    c.batch_size = 32
    c.eval_batch_size = 500
    c.num_steps = steps
    c.optimizer.learning_rate = 1e-2
    c.log_every_steps = 20
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    return c


def load_weights(workdir):
    with np.load(os.path.join(workdir, "weights.npz"), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name,kwargs,tied,full", [
    ("mlp", {"widths": (16, 16, 16), "tie_hidden": True}, "hidden2", "hidden3"),
    ("cnn1d", {"channels": 6, "tie_convs": True}, "conv2", "conv3"),
])
def test_tied_layers_are_one_set_of_parameters(name, kwargs, tied, full):
    tied_model = models.get_model(name, num_classes=10, **kwargs)
    untied_model = models.get_model(name, num_classes=10,
                                    **{k: v for k, v in kwargs.items() if not k.startswith("tie")})
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 40))
    v = tied_model.init(jax.random.PRNGKey(1), x)
    full_v = untied_model.init(jax.random.PRNGKey(1), x)
    assert full not in v["params"] and tied in v["params"]
    shape = jax.tree.map(np.shape, full_v["params"][full])
    assert models.count_params(v["params"]) == (
        models.count_params(full_v["params"]) - sum(np.prod(s) for s in jax.tree.leaves(
            shape, is_leaf=lambda t: isinstance(t, tuple))))
    # The tied model is the untied one with the shared copy in both places.
    untied = {**v["params"], full: v["params"][tied]}
    np.testing.assert_allclose(tied_model.apply(v, x),
                               untied_model.apply({"params": untied}, x), rtol=1e-6)
    assert sharing.unique_param_count(untied, [[tied, full]]) == models.count_params(v["params"])


def test_tying_needs_equal_widths():
    with pytest.raises(ValueError, match="tie_hidden=True needs equal widths"):
        models.get_model("mlp", num_classes=10, widths=(16, 8), tie_hidden=True)
    with pytest.raises(ValueError, match="tie_convs=True needs equal channels"):
        models.get_model("cnn1d", num_classes=10, channels=(4, 6, 6), tie_convs=True)
    with pytest.raises(ValueError, match="channels.*3 ints"):
        models.get_model("cnn1d", num_classes=10, channels=(4, 6))


def test_cnn1d_takes_one_width_per_convolution():
    model = models.get_model("cnn1d", num_classes=10, channels=(3, 5, 7))
    v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40)))
    assert [v["params"][f"conv{i}"]["kernel"].shape for i in (1, 2, 3)] == [
        (5, 1, 3), (3, 3, 5), (3, 5, 7)]
    assert v["params"]["head"]["kernel"].shape == (5 * 7, 10)


# ----------------------------------------------------------------------------- pieces


def test_pruning_from_zeros_keeps_an_already_pruned_model_pruned():
    w = jax.random.normal(jax.random.PRNGKey(0), (8, 6))
    w = w.at[:, :3].set(0.0)  # half of the weights are already 0
    params = {"hidden1": {"kernel": jnp.ones((4, 8))}, "hidden2": {"kernel": w},
              "head": {"kernel": jnp.ones((6, 2))}}
    tx = pruning.masked(__import__("optax").sgd(0.1), from_zeros=True, schedule="one_shot",
                        sparsity=0.25, total_steps=10)
    state = tx.init(params)
    masks = pruning.get_masks(state)
    np.testing.assert_array_equal(masks["hidden2"]["kernel"], np.asarray(w) != 0)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    new = __import__("optax").apply_updates(params, updates)
    assert (np.asarray(new["hidden2"]["kernel"])[:, :3] == 0).all()  # zeros stayed
    assert (np.asarray(new["hidden2"]["kernel"])[:, 3:] != 0).all()  # 25 % < 50 %: no more


def test_reclustering_a_clustered_kernel_is_the_identity():
    w = jax.random.normal(jax.random.PRNGKey(3), (40, 30))
    w = w * (jax.random.uniform(jax.random.PRNGKey(4), w.shape) > 0.7)
    for granularity in ("layer", "channel"):
        c, a = sharing.init_codebook(w, 16, granularity=granularity)
        clustered = sharing.clustered_weights(c, a)
        c2, a2 = sharing.init_codebook(clustered, 16, "kmeans++", granularity=granularity)
        np.testing.assert_array_equal(sharing.clustered_weights(c2, a2), clustered)


def test_copy_init_checks_the_model():
    src = {"params": {"hidden1": {"kernel": np.ones((3, 4), np.float32)}}}
    same = {"params": {"hidden1": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}}
    out = student_init.copy_variables(src, same)
    np.testing.assert_array_equal(out["params"]["hidden1"]["kernel"], 1.0)
    other = {"params": {"hidden1": {"kernel": jax.ShapeDtypeStruct((3, 5), jnp.float32)}}}
    with pytest.raises(ValueError, match=r"hidden1/kernel has shape \(3, 4\) in the source "
                                         r"and \(3, 5\) here"):
        student_init.copy_variables(src, other)


# ----------------------------------------------------------------------------- trainer


@pytest.mark.parametrize("model,kwargs", [("mlp", {"widths": (24, 24)}),
                                          ("cnn1d", {"channels": 8})])
def test_structured_pruning_exports_a_physically_smaller_model(data_dir, tmp_path, model,
                                                               kwargs):
    c = small_run(data_dir, model=model, **kwargs)
    c.pruning.update(enabled=True, pattern="channels", sparsity=0.5, schedule="one_shot",
                     keep_first_last=False, layers="hidden.*|conv.*")
    summary = train.train_and_evaluate(c, str(tmp_path))
    widths = summary["artifact_model_kwargs"]["widths" if model == "mlp" else "channels"]
    full = kwargs.get("widths", (kwargs.get("channels"),) * 3)
    assert list(widths) == [w // 2 for w in full]
    _, manifest = export.load(os.path.join(tmp_path, "artifact"))
    assert manifest["model"]["kwargs"] == {**kwargs, ("widths" if model == "mlp" else
                                                       "channels"): list(widths)}
    assert summary["artifact_num_params"] < 0.6 * summary["num_params"]
    # The smaller dense model computes what the masked one did: same accuracy.
    assert summary["artifact_eval"]["accuracy"] == pytest.approx(summary["eval"]["accuracy"],
                                                                 abs=1e-9)


def test_similarity_merging_shrinks_the_exported_layers(data_dir, tmp_path):
    c = small_run(data_dir, widths=(32, 32))
    c.merging.update(enabled=True, metric="cosine", threshold=0.5)
    summary = train.train_and_evaluate(c, str(tmp_path))
    widths = summary["artifact_model_kwargs"]["widths"]
    assert sum(widths) < 64 and summary["method"].startswith("merge-cosine0.5")
    assert summary["artifact_num_params"] < summary["num_params"]
    assert summary["accuracy"] == summary["artifact_eval"]["accuracy"]
    c.model.kwargs.tie_hidden = True
    with pytest.raises(ValueError, match="config.merging.enabled: tied layers"):
        train.train_and_evaluate(c, str(tmp_path / "tied"))


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def dense_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dense"))
    train.train_and_evaluate(small_run(data_dir, widths=(32, 32), steps=150), workdir)
    return workdir


def pipeline_config(data_dir, dense_dir):
    c = small_run(data_dir, widths=(32, 32))
    c.init.method, c.init.teacher_workdir = "copy", dense_dir
    c.distill.teacher.workdir = dense_dir
    c.distill.losses = hinton_losses(alpha=0.5, temperature=2.0)
    c.pruning.update(sparsity=0.8, keep_first_last=False, begin_step=0, end_step=30,
                     frequency=10)
    c.clustering.update(num_clusters=8)
    c.quantization.update(weight_bits=8, per_channel=False)
    c.compression.stages = ("prune", "cluster", "quantize")
    c.compression.num_steps = (60, 30, 30)
    c.compression.learning_rates = (3e-3, 1e-3, 1e-3)
    return c


def test_prune_cluster_quantize_pipeline_keeps_every_structure(data_dir, dense_dir, tmp_path):
    c = pipeline_config(data_dir, dense_dir)
    summary = compression.run_pipeline(c, str(tmp_path))
    assert summary["stage_order"] == ["prune", "cluster", "quantize"]
    w = {s: load_weights(str(tmp_path / s)) for s in summary["stage_order"]}
    for layer in ("hidden1", "hidden2", "head"):
        key = f"params/{layer}/kernel"
        zeros = w["prune"][key] == 0
        assert zeros.mean() == pytest.approx(0.8, abs=0.01)
        for later in ("cluster", "quantize"):
            assert (w[later][key][zeros] == 0).all(), (later, layer)  # zeros stay zero
        for later in ("cluster", "quantize"):
            assert np.unique(w[later][key][w[later][key] != 0]).size <= 8
    ints = summary["structure"]["quantize"]["integers"]
    for layer, q in ints.items():
        assert -128 <= q["min"] and q["max"] <= 127
        assert q["distinct"] <= 8 + 1, layer  # per-tensor scale: clusters stay clusters
    # Each stage makes the artifact smaller; the teacher is the dense model throughout.
    # Clustering shrinks the pruned artifact; int8 then only shrinks the codebooks, so
    # the tensor files shrink a little while the manifest grows (scales, activations).
    # The lineage (lineage.json, which nests every earlier stage's) is not the model's bytes.
    sizes = [summary["compression_stages"][s]["artifact_bytes"] for s in summary["stage_order"]]
    assert sizes[0] > 1.5 * sizes[1]
    payload = [sum(f["bytes"] for f in export.read_manifest(
        str(tmp_path / s / "artifact"))["files"].values()) for s in summary["stage_order"]]
    assert payload[0] > payload[1] > payload[2]
    dense_bytes = export.artifact_bytes(os.path.join(dense_dir, "artifact"))
    assert sizes[-1] < dense_bytes / 3
    assert summary["method"] == "magnitude-80%>cluster8>qat-w8+kd"
    dense_accuracy = train.metrics.read_summary(dense_dir)["accuracy"]
    assert summary["accuracy"] > max(0.2, dense_accuracy - 0.1)  # chance is 0.1
    # Relaunching finds every stage finished and checks them again.
    again = compression.run_pipeline(c, str(tmp_path))
    assert again["accuracy"] == summary["accuracy"]


def test_a_stage_that_revives_pruned_weights_is_stopped():
    layers = {"hidden2": {"shape": [4, 4], "sparsity": 0.5, "distinct_nonzero": 8,
                          "distinct_nonzero_per_channel": 2, "zeros": np.arange(8)}}
    later = {"layers": {"hidden2": {**layers["hidden2"], "zeros": np.arange(6),
                                    "sparsity": 6 / 16}}}
    run = run_config("mnist1d", "mlp", widths=(4, 4))
    run.pruning.update(enabled=True, sparsity=0.5, keep_first_last=False)
    with pytest.raises(compression.StructureError,
                       match="stage 'cluster' broke stage 'prune': layer 'hidden2' has 2 "
                             "nonzero weight"):
        compression.check(later, {"layers": layers}, run, stage="cluster")
    run.clustering.update(enabled=True, num_clusters=4, layers="hidden2")
    with pytest.raises(compression.StructureError,
                       match="broke stage 'cluster': layer 'hidden2' has 8 distinct nonzero "
                             "values > config.clustering.num_clusters=4"):
        compression.check({"layers": layers}, {"layers": layers}, run, stage="quantize")
    ints = {"hidden2": {"bits": 4, "min": -9, "max": 7, "distinct": 3,
                        "distinct_per_channel": 3}}
    run.clustering.num_clusters = 8
    with pytest.raises(compression.StructureError, match=r"spans \[-9, 7\], outside the 4-bit"):
        compression.check({"layers": layers, "integers": ints}, None, run, stage="quantize")


@pytest.mark.parametrize("field,value,message", [
    ("stages", ("prune", "distill"), r"stages\[1\]='distill' is not a stage; allowed: prune"),
    ("stages", ("prune", "prune"), "names a stage twice"),
    ("stages", ("quantize", "prune"), "'quantize' must be the last stage"),
    ("num_steps", (10,), "num_steps has 1 entries; it needs one per stage"),
])
def test_bad_compression_config_is_one_line(field, value, message):
    c = run_config("mnist1d", "mlp")
    c.compression.stages = ("prune", "cluster")
    c.compression[field] = value
    with pytest.raises(ValueError, match=message):
        compression.stages_of(c)


def test_merging_at_start_trains_the_smaller_model(data_dir, dense_dir, tmp_path):
    c = small_run(data_dir, widths=(32, 32), steps=40)
    c.merging.update(enabled=True, metric="cosine", threshold=0.3, at="start")
    with pytest.raises(ValueError, match="config.merging.at='start' merges the weights that "
                                         "config.init copies: set config.init.method='copy'"):
        train.train_and_evaluate(c, str(tmp_path / "no_init"))
    c.init.method, c.init.teacher_workdir = "copy", dense_dir
    summary = train.train_and_evaluate(c, str(tmp_path / "run"))
    dense = load_weights(dense_dir)
    merged, widths, _ = sharing.merge_layers(
        {k.split("/")[1]: {"kernel": dense[f"params/{k.split('/')[1]}/kernel"],
                           "bias": dense[f"params/{k.split('/')[1]}/bias"]}
         for k in dense if k.endswith("/kernel")},
        **{k: v for k, v in c.merging.to_dict().items() if k != "enabled"})
    expected = [widths["hidden1"], widths["hidden2"]]
    assert sum(expected) < 64  # something was merged
    # The model trained (and exported) is the merged one: its kernels have the merged shapes.
    w = load_weights(str(tmp_path / "run"))
    assert [w[f"params/hidden{i}/kernel"].shape[-1] for i in (1, 2)] == expected
    assert list(summary["artifact_model_kwargs"]["widths"]) == expected
    assert summary["method"].startswith("merge-cosine0.3-then-train")
    assert summary["num_params"] == summary["artifact_num_params"] < 40 * 32 + 32 * 32 + 32 * 10
    dense_accuracy = train.metrics.read_summary(dense_dir)["accuracy"]
    assert summary["accuracy"] > dense_accuracy - 0.1
