"""Tests for jaxkd.student_init: students initialised from the teacher's weights.

Models get random variables drawn in numpy (no ``model.init``, no dataset), BatchNorm
statistics included, so that copying the wrong block or slicing the wrong channel shows.
Kept units are recomputed here from an independent numpy forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxkd import config as config_module
from jaxkd import student_init
from jaxkd.models import get_model
from jaxkd.models.lenet import LeNet5
from jaxkd.models.resnet import CifarResNet
from jaxkd.models.wrn import WideResNet

IMAGE = (8, 8, 3)  # ResNets pool globally: small images keep the tests fast


def random_variables(model, input_shape, seed=0):
    """Variables shaped as ``model.init``'s, drawn in numpy: kernels scaled by 1/sqrt(fan-in),
    BatchNorm variances positive."""
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)))
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        value = rng.normal(size=leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            value /= np.sqrt(np.prod(leaf.shape[:-1]))
        if name == "var":
            value = np.abs(value) + 0.5
        return value

    return jax.tree_util.tree_map_with_path(fill, shapes)


def config(method, **fields):
    return config_module.Init(method=method, **fields)


def run(init, teacher, teacher_vars, student, student_vars, images=None):
    return student_init.init_from_teacher(
        init, teacher_model=teacher, teacher_variables=teacher_vars, student_model=student,
        student_variables=student_vars, calibration_images=images)


def relu(x):
    return np.maximum(x, 0.0)


def dense(params, x):
    return x @ np.asarray(params["kernel"], np.float64) + np.asarray(params["bias"], np.float64)


def mean_abs(activations):
    """Minitron importance: mean |activation| over every axis but the last."""
    activations = np.asarray(activations, np.float64)
    return np.abs(activations).reshape(-1, activations.shape[-1]).mean(0)


def top(activations, k, importance=None):
    """The k units of largest importance (default: mean |activation|), in ascending order."""
    importance = mean_abs(activations) if importance is None else importance
    return np.sort(np.argsort(-importance)[:k])


def conv1d(params, x):
    """Flax's Conv(stride 2, padding 1) in numpy: ``x [B, L, Cin]``, kernel ``[K, Cin, Cout]``."""
    kernel = np.asarray(params["kernel"], np.float64)
    size = kernel.shape[0]
    x = np.pad(x, ((0, 0), (1, 1), (0, 0)))
    length = (x.shape[1] - size) // 2 + 1
    windows = np.stack([x[:, 2 * i:2 * i + size] for i in range(length)], axis=1)
    return np.einsum("blkc,kco->blo", windows, kernel) + np.asarray(params["bias"])


def assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_fits(out, student_vars):
    assert jax.tree.structure(out) == jax.tree.structure(student_vars)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(student_vars), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype


# --- no method -------------------------------------------------------------------------------


def test_default_is_random_init():
    init = config_module.Init()
    assert init.method == "" and tuple(init.keep_layers) == () and init.teacher_workdir == ""
    teacher = get_model("mlp", num_classes=3, widths=(8,))
    student = get_model("mlp", num_classes=3, widths=(4,))
    student_vars = random_variables(student, (5,), seed=1)
    out = run(init, teacher, random_variables(teacher, (5,)), student, student_vars)
    assert_same_tree(out, student_vars)


# --- layer_select ----------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [(0, 2), ()])  # () = every other layer = (0, 2) here
def test_layer_select_mlp(keep):
    teacher = get_model("mlp", num_classes=10, widths=(32, 32, 32))
    student = get_model("mlp", num_classes=10, widths=(32, 32))
    t = random_variables(teacher, (40,), seed=0)
    out = run(config("layer_select", keep_layers=keep), teacher, t, student,
              random_variables(student, (40,), seed=1))
    p, tp = out["params"], t["params"]
    assert_same_tree(p["hidden1"], tp["hidden1"])
    assert_same_tree(p["hidden2"], tp["hidden3"])
    assert_same_tree(p["head"], tp["head"])
    x = np.random.default_rng(2).normal(size=(6, 40))
    expected = dense(tp["head"], relu(dense(tp["hidden3"], relu(dense(tp["hidden1"], x)))))
    np.testing.assert_allclose(student.apply(out, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "teacher_name,student_name,keep,copied",
    [("resnet14", "resnet8", (), {0: 0}),  # () = every other block = (0,)
     ("resnet20", "resnet14", (0, 2), {0: 0, 1: 2})],
)
def test_layer_select_resnet(teacher_name, student_name, keep, copied):
    teacher = get_model(teacher_name, num_classes=10)
    student = get_model(student_name, num_classes=10)
    t = random_variables(teacher, IMAGE, seed=0)
    student_vars = random_variables(student, IMAGE, seed=1)
    out = run(config("layer_select", keep_layers=keep), teacher, t, student, student_vars)
    assert_fits(out, student_vars)
    for collection in ("params", "batch_stats"):
        for name in ("stem_conv", "stem_bn", "head"):
            if name in t[collection]:
                assert_same_tree(out[collection][name], t[collection][name])
        for s in (1, 2, 3):
            for j, b in copied.items():
                assert_same_tree(out[collection][f"stage{s}_block{j}"],
                                 t[collection][f"stage{s}_block{b}"])
    logits = student.apply(out, np.random.default_rng(2).normal(size=(2, *IMAGE)))
    assert logits.shape == (2, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("keep", [(1, 3), ()])  # () = every other layer = (0, 2)
def test_layer_select_bert(keep):
    from jaxkd.models.bert import MASK_BIAS, BertLayer

    kw = {"vocab_size": 30, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32,
          "max_position": 16, "pooling": "pooler"}
    teacher = get_model("bert", num_classes=3, num_layers=4, **kw)
    student = get_model("bert", num_classes=3, num_layers=2, **kw)
    t = random_variables(teacher, (12,), seed=0)
    out = run(config("layer_select", keep_layers=keep), teacher, t, student,
              random_variables(student, (12,), seed=1))
    kept = keep or (0, 2)
    p, tp = out["params"], t["params"]
    for j, k in enumerate(kept):
        assert_same_tree(p[f"layer{j}"], tp[f"layer{k}"])
    for name in ("embeddings", "pooler", "head"):
        assert_same_tree(p[name], tp[name])
    # The student is the teacher's embeddings, then its kept layers, then pooler and head.
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 30, size=(3, 12))
    mask = (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.int32)
    _, features = teacher.apply(t, ids, mask, return_features=True)
    x = features["embeddings"]
    for k in kept:
        layer = BertLayer(16, 2, 8, 32, 1e-12, 0.1, 0.1)
        x, _ = layer.apply({"params": tp[f"layer{k}"]}, x, False, MASK_BIAS * (1.0 - mask))
    pooled = np.tanh(dense(tp["pooler"], np.asarray(x)[:, 0]))
    np.testing.assert_allclose(student.apply(out, ids, mask), dense(tp["head"], pooled),
                               rtol=1e-5, atol=1e-5)


def test_prune_width_bert_drops_the_least_active_heads_and_neurons_exactly():
    """The student equals the teacher with the dropped heads' and FFN neurons' outgoing
    weights zeroed; the kept ones are the most active on the calibration tokens."""
    from jaxkd import quant

    kw = {"vocab_size": 30, "hidden_size": 16, "num_layers": 2, "num_heads": 4,
          "intermediate_size": 24, "max_position": 16}
    teacher = get_model("bert", num_classes=3, **kw)
    student = get_model("bert", num_classes=3, **{**kw, "layer_heads": (2, 3),
                                                  "layer_intermediate": (8, 20)})
    t = random_variables(teacher, (12,), seed=0)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 30, size=(40, 12))
    mask = (np.arange(12)[None] < rng.integers(2, 13, size=(40, 1))).astype(np.int32)
    out = run(config("prune_width", calibration_examples=32), teacher, t, student,
              random_variables(student, (12,), seed=1), images=(ids, mask))
    # Importance recomputed here from the captured layer inputs, over real tokens only.
    captured = quant.capture_inputs(teacher, t, (ids[:32], mask[:32]))
    real = mask[:32].astype(bool)
    zeroed = jax.tree_util.tree_map(np.array, t)
    for i, (heads, units) in enumerate(((2, 8), (3, 20))):
        context = np.abs(np.asarray(captured[f"layer{i}/attention/output"]))[real]
        per_head = context.reshape(len(context), 4, 4).mean(axis=(0, 2))
        kept = np.sort(np.argsort(-per_head, kind="stable")[:heads])
        ffn = np.abs(np.asarray(captured[f"layer{i}/output"]))[real].mean(axis=0)
        kept_units = np.sort(np.argsort(-ffn, kind="stable")[:units])
        layer, t_layer = out["params"][f"layer{i}"], t["params"][f"layer{i}"]
        cols = (kept[:, None] * 4 + np.arange(4)).reshape(-1)
        np.testing.assert_array_equal(layer["attention"]["query"]["kernel"],
                                      t_layer["attention"]["query"]["kernel"][:, cols])
        np.testing.assert_array_equal(layer["output"]["kernel"],
                                      t_layer["output"]["kernel"][kept_units])
        dropped = np.setdiff1d(np.arange(16), cols)
        zeroed["params"][f"layer{i}"]["attention"]["output"]["kernel"][dropped] = 0
        zeroed["params"][f"layer{i}"]["output"]["kernel"][
            np.setdiff1d(np.arange(24), kept_units)] = 0
    np.testing.assert_allclose(student.apply(out, ids, mask), teacher.apply(zeroed, ids, mask),
                               rtol=1e-5, atol=1e-5)


def test_bert_gradient_importance_is_the_per_example_gate_derivative():
    """Michel et al.'s |dL/d xi_h| against central differences of each example's loss when
    head h's rows of W_o (or FFN neuron n's row of W_2) are scaled by 1 +- eps."""
    import jax.numpy as jnp

    kw = {"vocab_size": 30, "hidden_size": 16, "num_layers": 2, "num_heads": 4,
          "intermediate_size": 24, "max_position": 16}
    teacher = get_model("bert", num_classes=3, **kw)
    t = random_variables(teacher, (12,), seed=0)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 30, size=(5, 12))
    mask = (np.arange(12)[None] < rng.integers(3, 13, size=(5, 1))).astype(np.int32)
    labels = rng.integers(0, 3, size=5)
    got = student_init.bert_gradient_importance(teacher, t, ids, mask, labels, batch_size=3)

    def losses(variables):
        log_p = jax.nn.log_softmax(teacher.apply(variables, ids, mask))
        return -np.asarray(jnp.take_along_axis(log_p, jnp.asarray(labels)[:, None], -1))[:, 0]

    eps = 1e-2
    for i in range(2):
        for site, path, unit_rows in (
                (f"heads{i}", ("attention", "output"), lambda h: slice(4 * h, 4 * h + 4)),
                (f"ffn{i}", ("output",), lambda n: slice(n, n + 1))):
            for unit in range(len(got[site])):
                scaled = []
                for sign in (1, -1):
                    v = jax.tree_util.tree_map(np.array, t)
                    leaf = v["params"][f"layer{i}"]
                    for key in path:
                        leaf = leaf[key]
                    leaf["kernel"][unit_rows(unit)] *= 1 + sign * eps
                    scaled.append(losses(v))
                expected = np.mean(np.abs((scaled[0] - scaled[1]) / (2 * eps)))
                np.testing.assert_allclose(got[site][unit], expected, rtol=0.05, atol=1e-4,
                                           err_msg=f"{site}[{unit}]")
    # prune_width with it keeps the heads it ranks highest; it needs the labels.
    student = get_model("bert", num_classes=3, **{**kw, "layer_heads": (1, 1)})
    init = config("prune_width", calibration_examples=5, importance="gradient")
    student_vars = random_variables(student, (12,), seed=1)
    with pytest.raises(ValueError, match="needs the calibration examples' labels"):
        run(init, teacher, t, student, student_vars, images=(ids, mask))
    out = student_init.init_from_teacher(
        init, teacher_model=teacher, teacher_variables=t, student_model=student,
        student_variables=student_vars, calibration_images=(ids, mask),
        calibration_labels=labels)
    for i in range(2):
        h = int(np.argmax(got[f"heads{i}"]))
        np.testing.assert_array_equal(
            out["params"][f"layer{i}"]["attention"]["value"]["kernel"],
            t["params"][f"layer{i}"]["attention"]["value"]["kernel"][:, 4 * h:4 * h + 4])
    with pytest.raises(ValueError, match="importance='gradient' ranks BERT heads"):
        mlp_t = get_model("mlp", num_classes=10, widths=(8,))
        mlp_s = get_model("mlp", num_classes=10, widths=(4,))
        run(init, mlp_t, random_variables(mlp_t, (6,)), mlp_s, random_variables(mlp_s, (6,)),
            images=np.zeros((5, 6)))


def test_layer_select_wrn():
    teacher = WideResNet(num_classes=10, depth=16, widen_factor=1)
    student = WideResNet(num_classes=10, depth=10, widen_factor=1)
    t = random_variables(teacher, IMAGE, seed=0)
    student_vars = random_variables(student, IMAGE, seed=1)
    out = run(config("layer_select"), teacher, t, student, student_vars)
    assert_fits(out, student_vars)
    for collection in ("params", "batch_stats"):
        for name in ("stage1_block0", "stage2_block0", "stage3_block0", "final_bn"):
            assert_same_tree(out[collection][name], t[collection][name])
    assert np.isfinite(student.apply(out, np.ones((2, *IMAGE)))).all()


# --- prune_width: MLP ------------------------------------------------------------------------


def mlp_prune(teacher_widths, student_widths, n=512):
    teacher = get_model("mlp", num_classes=10, widths=teacher_widths)
    student = get_model("mlp", num_classes=10, widths=student_widths)
    t = random_variables(teacher, (40,), seed=0)
    x = np.random.default_rng(3).normal(size=(n, 40)).astype(np.float32)
    out = run(config("prune_width", calibration_examples=n), teacher, t, student,
              random_variables(student, (40,), seed=1), x)
    tp = t["params"]
    h1 = relu(dense(tp["hidden1"], x.astype(np.float64)))
    h2 = relu(dense(tp["hidden2"], h1))
    _, features = student.apply(out, x, return_features=True)
    return tp, out, x, h1, h2, features, student


def test_prune_width_mlp_keeps_the_most_active_units():
    tp, out, x, h1, h2, features, student = mlp_prune((64, 64), (16, 16))
    k1, k2 = top(h1, 16), top(h2, 16)
    p = out["params"]
    np.testing.assert_array_equal(p["hidden1"]["kernel"], tp["hidden1"]["kernel"][:, k1])
    np.testing.assert_array_equal(p["hidden1"]["bias"], tp["hidden1"]["bias"][k1])
    np.testing.assert_array_equal(p["hidden2"]["kernel"], tp["hidden2"]["kernel"][k1][:, k2])
    np.testing.assert_array_equal(p["hidden2"]["bias"], tp["hidden2"]["bias"][k2])
    np.testing.assert_array_equal(p["head"]["kernel"], tp["head"]["kernel"][k2])
    np.testing.assert_array_equal(p["head"]["bias"], tp["head"]["bias"])
    # The first layer sees the whole input: it computes the teacher's kept units.
    np.testing.assert_allclose(features["hidden1"], h1[:, k1], rtol=1e-5, atol=1e-5)
    # The second misses the 48 dropped inputs: it is the teacher's slice applied to the kept
    # ones, which is not the teacher's kept units.
    expected_h2 = relu(h1[:, k1] @ tp["hidden2"]["kernel"][k1][:, k2] + tp["hidden2"]["bias"][k2])
    np.testing.assert_allclose(features["hidden2"], expected_h2, rtol=1e-5, atol=1e-5)
    assert np.abs(features["hidden2"] - h2[:, k2]).max() > 0.1
    head = {"kernel": tp["head"]["kernel"][k2], "bias": tp["head"]["bias"]}
    np.testing.assert_allclose(student.apply(out, x), dense(head, expected_h2),
                               rtol=1e-5, atol=1e-5)


def test_prune_width_mlp_layer_with_every_input_kept_is_exact():
    tp, out, x, h1, h2, features, _ = mlp_prune((64, 64), (64, 16))
    np.testing.assert_array_equal(out["params"]["hidden1"]["kernel"], tp["hidden1"]["kernel"])
    np.testing.assert_allclose(features["hidden2"], h2[:, top(h2, 16)], rtol=1e-5, atol=1e-5)


def test_prune_width_to_the_full_width_is_the_teacher():
    tp, out, x, h1, h2, features, student = mlp_prune((64, 64), (64, 64), n=64)
    assert_same_tree(out["params"], tp)


# --- prune_width: cnn1d ----------------------------------------------------------------------


def test_prune_width_cnn1d():
    teacher = get_model("cnn1d", num_classes=10, channels=25)
    student = get_model("cnn1d", num_classes=10, channels=12)
    t = random_variables(teacher, (40,), seed=0)
    x = np.random.default_rng(4).normal(size=(256, 40)).astype(np.float32)
    out = run(config("prune_width", calibration_examples=256), teacher, t, student,
              random_variables(student, (40,), seed=1), x)
    tp, p = t["params"], out["params"]
    c1 = relu(conv1d(tp["conv1"], x[..., None].astype(np.float64)))
    c2 = relu(conv1d(tp["conv2"], c1))
    c3 = relu(conv1d(tp["conv3"], c2))
    k1, k2, k3 = top(c1, 12), top(c2, 12), top(c3, 12)
    _, features = student.apply(out, x[:32], return_features=True)
    np.testing.assert_allclose(features["conv1"], c1[:32, :, k1], rtol=1e-5, atol=1e-5)
    sliced = {"kernel": tp["conv2"]["kernel"][:, k1][:, :, k2], "bias": tp["conv2"]["bias"][k2]}
    np.testing.assert_array_equal(p["conv2"]["kernel"], sliced["kernel"])
    np.testing.assert_allclose(features["conv2"], relu(conv1d(sliced, c1[:32, :, k1])),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p["conv3"]["kernel"], tp["conv3"]["kernel"][:, k2][:, :, k3])
    positions = c3.shape[1]  # the head reads the position-major flattened [L, C] map
    np.testing.assert_array_equal(
        p["head"]["kernel"].reshape(positions, 12, 10),
        tp["head"]["kernel"].reshape(positions, 25, 10)[:, k3])


# --- prune_width: CIFAR ResNets --------------------------------------------------------------


def kept_channels(student_leaf, teacher_leaf):
    """Which teacher channels a student BatchNorm vector holds (random values are distinct)."""
    teacher_leaf = np.asarray(teacher_leaf)
    return np.array([int(np.flatnonzero(teacher_leaf == v)[0]) for v in np.asarray(student_leaf)])


@pytest.mark.parametrize("depth,stem,widths,student_stem,student_widths", [
    (8, 8, (16, 16, 16), 4, (8, 8, 8)),  # stage 1 projects: the stem has its own channels
    (14, 16, (16, 32, 64), 8, (8, 16, 32)),  # the stem writes into the stage-1 stream
])
def test_prune_width_resnet(depth, stem, widths, student_stem, student_widths):
    teacher = CifarResNet(num_classes=10, depth=depth, widths=widths, stem_width=stem)
    student = CifarResNet(num_classes=10, depth=depth, widths=student_widths,
                          stem_width=student_stem)
    t = random_variables(teacher, IMAGE, seed=0)
    student_vars = random_variables(student, IMAGE, seed=1)
    x = np.random.default_rng(5).normal(size=(64, *IMAGE)).astype(np.float32)
    out = run(config("prune_width", calibration_examples=64), teacher, t, student,
              student_vars, x)
    assert_fits(out, student_vars)
    tp, p = t["params"], out["params"]
    (_, t_features), state = teacher.apply(t, x, return_features=True,
                                           capture_intermediates=True, mutable=["intermediates"])
    captured = state["intermediates"]
    blocks = (depth - 2) // 6
    _, s_features = student.apply(out, x, return_features=True)
    stem_kept = kept_channels(p["stem_bn"]["scale"], tp["stem_bn"]["scale"])
    np.testing.assert_allclose(s_features["conv1"], np.asarray(t_features["conv1"])[..., stem_kept],
                               rtol=1e-5, atol=1e-5)
    if stem != widths[0]:
        np.testing.assert_array_equal(stem_kept, top(np.asarray(t_features["conv1"]), student_stem))
    kept_in = stem_kept
    for s in (1, 2, 3):
        stream = kept_channels(p[f"stage{s}_block0"]["bn2"]["scale"],
                               tp[f"stage{s}_block0"]["bn2"]["scale"])
        # The stream ranks by the mean importance over the stage's block outputs (and the
        # stem's output when the stem writes into it).
        sites = [mean_abs(captured[f"stage{s}_block{b}"]["__call__"][0]) for b in range(blocks)]
        if s == 1 and stem == widths[0]:
            np.testing.assert_array_equal(stream, stem_kept)
            sites.append(mean_abs(t_features["conv1"]))
        np.testing.assert_array_equal(
            stream, top(None, len(stream), importance=np.mean(sites, axis=0)))
        for b in range(blocks):
            block, t_block = p[f"stage{s}_block{b}"], tp[f"stage{s}_block{b}"]
            inner = kept_channels(block["bn1"]["scale"], t_block["bn1"]["scale"])
            bn1 = captured[f"stage{s}_block{b}"]["bn1"]["__call__"][0]
            np.testing.assert_array_equal(inner, top(relu(np.asarray(bn1)), len(inner)))
            np.testing.assert_array_equal(
                block["conv1"]["kernel"], t_block["conv1"]["kernel"][:, :, kept_in][..., inner])
            np.testing.assert_array_equal(
                block["conv2"]["kernel"], t_block["conv2"]["kernel"][:, :, inner][..., stream])
            np.testing.assert_array_equal(block["bn2"]["scale"], t_block["bn2"]["scale"][stream])
            stats, t_stats = out["batch_stats"][f"stage{s}_block{b}"], t["batch_stats"][
                f"stage{s}_block{b}"]
            np.testing.assert_array_equal(stats["bn2"]["var"], t_stats["bn2"]["var"][stream])
            np.testing.assert_array_equal(stats["bn1"]["mean"], t_stats["bn1"]["mean"][inner])
            if "shortcut_conv" in t_block:
                np.testing.assert_array_equal(
                    block["shortcut_conv"]["kernel"],
                    t_block["shortcut_conv"]["kernel"][:, :, kept_in][..., stream])
            kept_in = stream
    np.testing.assert_array_equal(p["head"]["kernel"], tp["head"]["kernel"][kept_in])
    assert np.isfinite(s_features["embedding"]).all()


# --- errors ----------------------------------------------------------------------------------


def mlp(widths):
    return get_model("mlp", num_classes=10, widths=widths)


def cnn(channels):
    return get_model("cnn1d", num_classes=10, channels=channels)


CALIBRATION = np.zeros((8, 40), np.float32)
ERRORS = {  # id -> (config fields, teacher, student, calibration images, message)
    "unknown method": ({"method": "distil"}, mlp((8,)), mlp((8,)), None,
                       r"config\.init\.method='distil' is not an init method"),
    "keep out of range": ({"method": "layer_select", "keep_layers": (0, 3)}, mlp((8, 8, 8)),
                          mlp((8, 8)), None, r"config\.init\.keep_layers=\(0, 3\) is out of range"),
    "keep wrong count": ({"method": "layer_select", "keep_layers": (0,)}, mlp((8, 8, 8)),
                         mlp((8, 8)), None, r"keep_layers=\(0,\) keeps 1 .* student has 2"),
    "default keep wrong count": ({"method": "layer_select"}, mlp((8, 8, 8, 8)), mlp((8, 8, 8)),
                                 None, r"config\.init\.keep_layers=\(\) \(every other"),
    "keep not from 0": ({"method": "layer_select", "keep_layers": (1, 2)}, mlp((8, 8, 8)),
                        mlp((8, 8)), None,
                        r"keep_layers=\(1, 2\) must start with 0: the first hidden layer"),
    "keep not increasing": ({"method": "layer_select", "keep_layers": (0, 2, 1)},
                            mlp((8, 8, 8)), mlp((8, 8, 8)), None, r"strictly increasing"),
    "keep not integers": ({"method": "layer_select", "keep_layers": "0,x"}, mlp((8, 8)),
                          mlp((8,)), None, r"keep_layers='0,x' must be integers"),
    "widths do not chain": ({"method": "layer_select", "keep_layers": (0, 2)}, mlp((8, 16, 8)),
                            mlp((8, 8)), None,
                            r"keep_layers=\(0, 2\): the student's params/hidden2/kernel is"),
    "resnet keep out of range": ({"method": "layer_select", "keep_layers": (0, 3)},
                                 get_model("resnet20", num_classes=10),
                                 get_model("resnet14", num_classes=10), None,
                                 r"keep_layers=\(0, 3\) is out of range.* 3 blocks per stage"),
    "resnet widths differ": ({"method": "layer_select", "keep_layers": (0,)},
                             CifarResNet(num_classes=10, depth=14),
                             CifarResNet(num_classes=10, depth=8, widths=(16, 32, 32)), None,
                             r"keep_layers=\(0,\): the student's \w+/stage3_block0/.* is"),
    "family mismatch": ({"method": "prune_width"}, cnn(25), mlp((8,)), CALIBRATION,
                        r"config\.init\.method='prune_width' needs a student of the teacher's "
                        r"family, but the teacher is cnn1d and the student mlp"),
    "family mismatch layer_select": ({"method": "layer_select"},
                                     get_model("resnet20", num_classes=10), mlp((8,)), None,
                                     r"needs a student of the teacher's family"),
    "unsupported family": ({"method": "layer_select"}, cnn(25), cnn(25), None,
                           r"config\.init\.method='layer_select' supports mlp, CIFAR ResNet, "
                           r"WRN, bert models, but the teacher is cnn1d"),
    "lenet unsupported": ({"method": "prune_width"}, get_model("lenet5", num_classes=10),
                          get_model("lenet5", num_classes=10), CALIBRATION,
                          r"method='prune_width' supports .* teacher is lenet5"),
    "student wider": ({"method": "prune_width", "calibration_examples": 8}, mlp((8, 8)),
                      mlp((4, 16)), CALIBRATION,
                      r"method='prune_width' only narrows.* hidden2 has 16 units and the "
                      r"teacher's 8"),
    "cnn1d wider": ({"method": "prune_width", "calibration_examples": 8}, cnn(12), cnn(25),
                    CALIBRATION, r"only narrows.* conv1 has 25"),
    "prune depth": ({"method": "prune_width", "calibration_examples": 8}, mlp((8, 8)),
                    mlp((4,)), CALIBRATION, r"method='prune_width' keeps the teacher's depth"),
    "prune keep_layers": ({"method": "prune_width", "keep_layers": (0,)}, mlp((8,)), mlp((4,)),
                          CALIBRATION, r"config\.init\.keep_layers=\(0,\) is only for "
                          r"layer_select"),
    "missing calibration": ({"method": "prune_width"}, mlp((8,)), mlp((4,)), None,
                            r"none were given \(config\.init\.calibration_examples=512\)"),
    "too few calibration": ({"method": "prune_width", "calibration_examples": 9}, mlp((8,)),
                            mlp((4,)), CALIBRATION,
                            r"config\.init\.calibration_examples=9 but only 8"),
    "bad calibration_examples": ({"method": "prune_width", "calibration_examples": 0},
                                 mlp((8,)), mlp((4,)), CALIBRATION,
                                 r"config\.init\.calibration_examples=0 must be a positive"),
    "prune kernel size": ({"method": "prune_width", "calibration_examples": 8}, cnn(25),
                          get_model("cnn1d", num_classes=10, channels=12, kernel_size=3),
                          CALIBRATION, r"method='prune_width': the student's params/conv1/kernel"
                          r" is \(3, 1, 12\) but the teacher's weights for it are \(5, 1, 12\)"),
    "resnet projection mismatch": ({"method": "prune_width", "calibration_examples": 8},
                                   get_model("resnet8x4", num_classes=10),
                                   get_model("resnet8", num_classes=10),
                                   np.zeros((8, *IMAGE), np.float32),
                                   r"method='prune_width' keeps the teacher's block structure"),
}


@pytest.mark.parametrize("case", list(ERRORS), ids=list(ERRORS))
def test_errors_name_the_config_field(case):
    fields, teacher, student, images, message = ERRORS[case]
    shape = {CifarResNet: IMAGE, LeNet5: (28, 28, 1)}.get(type(teacher), (40,))
    if isinstance(teacher, LeNet5):
        images = np.zeros((8, *shape), np.float32)
    init = ml_collections.ConfigDict({**config_module.Init().to_dict(), **fields})
    with pytest.raises(ValueError, match=message) as error:
        run(init, teacher, random_variables(teacher, shape),
            student, random_variables(student, shape), images)
    assert "\n" not in str(error.value)
