"""jaxkd.export.onnx: the ONNX graph of an artifact runs ONNX's integer operators and computes
the artifact's function, for every model family of the zoo.

Tolerance (see jaxkd/export/onnx.py): both sides multiply the same integers exactly, but a
float computed an ulp apart (XLA:CPU's vectorised division is not always correctly rounded;
BatchNorm's ``1 / sqrt``, pooling sums) can put one activation on the neighbouring integer
of the next layer's grid. So >= 99 % of the examples agree within 1e-5 of the logit scale,
none differs by more than 2 % of it, and the argmax agrees on >= 99.9 %; models without
quantized activations agree within 1e-5 on every example."""

import collections
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest

from jaxkd import export, models, quant
from jaxkd.export.onnx import export_onnx, verify_onnx
from jaxkd.schema import ConfigError
from tests.test_export import random_variables

EXAMPLES = 500


def prune_and_cluster(variables, keep=0.2, clusters=16):
    """Deep Compression by hand: every kernel keeps its largest 20 % of weights, each
    replaced by the mean of its magnitude-quantile cluster (16 shared values)."""

    def compress(path, leaf):
        if str(getattr(path[-1], "key", path[-1])) != "kernel":
            return leaf
        w = np.asarray(leaf, np.float32).copy()
        kept = np.abs(w) >= np.quantile(np.abs(w), 1 - keep)
        edges = np.quantile(w[kept], np.linspace(0, 1, clusters + 1))
        group = np.clip(np.searchsorted(edges, w[kept], side="right") - 1, 0, clusters - 1)
        means = np.array([w[kept][group == g].mean() for g in range(clusters)], np.float32)
        w[kept], w[~kept] = means[group], 0.0
        return jnp.asarray(w)

    return jax.tree_util.tree_map_with_path(compress, variables)


def make_artifact(directory, name, kwargs, shape, fields, *, dynamic=False, compress=False):
    """Exports a random model as an artifact (QAT's observers give the activation ranges,
    none with ``dynamic``); returns ``EXAMPLES`` random inputs."""
    model = models.get_model(name, num_classes=10, **kwargs)
    x = np.random.default_rng(1).normal(size=(EXAMPLES, *shape)).astype(np.float32)
    calibration = jnp.asarray(x[:64])
    variables = random_variables(model, calibration[:2])
    if compress:
        variables = prune_and_cluster(variables)
    settings, ranges = None, None
    if fields is not None:
        settings = quant.settings(fields)
        kw = settings.kwargs()
        variables = {**variables,
                     "params": quant.init_qat_params(model, variables, calibration, **kw)}
        if settings.activation_bits and not dynamic:
            ranges = quant.observed_ranges(quant.init_observers(model, variables, calibration,
                                                                **kw))
    export.export(str(directory), name, kwargs, 10, variables, settings, ranges, {},
                  input_shape=shape)
    return x


def op_counts(graph):
    return collections.Counter(node.op_type for node in graph.node)


def expected_ops(manifest):
    """``(layer kinds, integer op counts, float MatMul/Conv count)`` that the manifest's
    layers call for."""
    kinds = collections.Counter(integer=0, weight_only=0, float=0)
    integer = collections.Counter()
    for layer in manifest["layers"]:
        if layer["kind"] == "embed":  # an integer table: a Gather, not a layer
            continue
        if not layer["activation"]["bits"]:
            kinds["weight_only"] += 1
            continue
        kinds["integer"] += 1
        op = "MatMulInteger" if layer["kind"] == "dense" else "ConvInteger"
        per_channel_zp = layer["zero_point"] is not None and layer["zero_point"]["shape"]
        # A conv's per-channel weight zero point adds one window-sum ConvInteger.
        integer[op] += 2 if op == "ConvInteger" and per_channel_zp else 1
    kinds["float"] = sum(t["path"].endswith("kernel") for t in manifest["float_tensors"])
    return dict(kinds), dict(integer), kinds["weight_only"] + kinds["float"]


CASES = [
    # id, model, kwargs, input shape, quantization (None: fp32), extra
    ("mlp-w8a8", "mlp", {"widths": (64, 32)}, (40,), {"weight_bits": 8, "activation_bits": 8},
     {}),
    ("mlp-w4a8-first-last-8bit", "mlp", {"widths": (64, 32)}, (40,),
     {"weight_bits": 4, "activation_bits": 8}, {}),
    ("mlp-w8-weight-only", "mlp", {"widths": (64, 32)}, (40,), {"weight_bits": 8}, {}),
    ("mlp-fp32", "mlp", {"widths": (64, 32)}, (40,), None, {}),
    ("mlp-w8a8-per-batch-scale", "mlp", {"widths": (32,)}, (40,),
     {"weight_bits": 8, "activation_bits": 8}, {"dynamic": True}),
    ("cnn1d-w8a8", "cnn1d", {}, (40,), {"weight_bits": 8, "activation_bits": 8}, {}),
    ("cnn1d-w4a4-lsq", "cnn1d", {}, (40,),
     {"weight_bits": 4, "activation_bits": 4, "method": "lsq"}, {}),
    ("lenet5-same-w8a8-zero-points", "lenet5", {}, (8, 8, 1),
     {"weight_bits": 8, "activation_bits": 8, "symmetric": False}, {}),
    ("lenet5-valid-w4-weight-only-zero-points", "lenet5", {"channels": (4, 8),
                                                           "widths": (32,)}, (16, 16),
     {"weight_bits": 4, "symmetric": False, "keep_first_last_8bit": False}, {}),
    ("resnet8-w8a8-batchnorm", "resnet8", {}, (8, 8, 3), {"weight_bits": 8,
                                                          "activation_bits": 8}, {}),
    ("wrn-10-1-w8a8", "wrn", {"depth": 10, "widen_factor": 1}, (8, 8, 3),
     {"weight_bits": 8, "activation_bits": 8}, {}),
    ("mlp-pruned-clustered-w8a8", "mlp", {"widths": (64,)}, (40,),
     {"weight_bits": 8, "activation_bits": 8}, {"compress": True}),
    ("mlp-pruned-clustered-fp32", "mlp", {"widths": (64,)}, (40,), None, {"compress": True}),
]


@pytest.mark.parametrize("name,kwargs,shape,fields,extra",
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_onnx_graph_computes_the_artifact(tmp_path, name, kwargs, shape, fields, extra):
    x = make_artifact(tmp_path / "a", name, kwargs, shape, fields, **extra)
    out = tmp_path / "onnx" / "model.onnx"
    out.parent.mkdir()
    info = export_onnx(str(tmp_path / "a"), str(out))
    manifest = export.read_manifest(str(tmp_path / "a"))
    assert os.listdir(out.parent) == ["model.onnx"] and info["bytes"] == out.stat().st_size
    assert info["input"] == {"name": "input", "shape": ["batch", *shape]}
    assert info["output"] == {"name": "logits", "shape": ["batch", 10]}

    # Quantized layers run ONNX's integer ops on int8 weights; only the others run float
    # MatMul/Conv (none at all when every layer quantizes its input).
    graph = onnx.load(str(out)).graph
    ops = op_counts(graph)
    kinds, integer, other = expected_ops(manifest)
    assert info["layers"] == kinds
    assert {op: ops[op] for op in ("MatMulInteger", "ConvInteger") if ops[op]} == integer
    assert ops["MatMul"] + ops["Conv"] + ops["Gemm"] == other
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node.op_type for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in ("MatMulInteger", "ConvInteger"):
            # u8 x u8 (int8 + 128, zero points + 128): exact in ONNX Runtime on every x86;
            # its u8 x s8 kernels saturate int16 pair sums without VNNI.
            assert initializers[node.input[1]].data_type == onnx.TensorProto.UINT8
            assert initializers[node.input[2]].data_type == onnx.TensorProto.UINT8
            assert producers[node.input[0]] in ("QuantizeLinear", "Clip")
    quantized = kinds["integer"] > 0
    if "compress" in extra:
        encodings = manifest["storage"]["encodings"]
        assert set(encodings) - {"dense+raw"}, encodings  # sparse / codebook tensors

    report = verify_onnx(str(tmp_path / "a"), str(out), x)
    assert report["examples"] == EXAMPLES
    assert report["argmax_agreement"] >= 0.999
    if quantized:
        assert report["matching"] >= 0.99
        assert report["relative_diff"] <= 0.02
    else:
        assert report["matching"] == 1.0 and report["relative_diff"] <= 1e-5


def read_layers(directory):
    """The artifact's layers decoded with the public reader (``export.read_tensor``)."""
    manifest = export.read_manifest(directory)
    contents = {name: pathlib.Path(directory, name).read_bytes() for name in manifest["files"]}
    floats = {t["path"]: export.read_tensor(contents, t) for t in manifest["float_tensors"]}
    return [(layer, export.read_tensor(contents, layer["kernel"]),
             export.read_tensor(contents, layer["scale"]), floats[layer["path"] + "/bias"])
            for layer in manifest["layers"]]


def test_onnx_mlp_equals_the_integer_formula(tmp_path):
    """An independent numpy reference of Jacob et al.'s formula (int64 products, IEEE
    division): ONNX Runtime agrees with it to float rounding on every example."""
    x = make_artifact(tmp_path / "a", "mlp", {"widths": (64, 32)}, (40,),
                      {"weight_bits": 8, "activation_bits": 8})
    export_onnx(str(tmp_path / "a"), str(tmp_path / "m.onnx"))
    h = x
    for layer, q_w, s_w, bias in read_layers(str(tmp_path / "a")):
        act = layer["activation"]
        z_x = act["zero_point"]
        q_x = np.clip(np.round(h / np.float32(act["scale"])) + z_x, act["q_min"], act["q_max"])
        acc = (q_x.astype(np.int64) - z_x) @ q_w.astype(np.int64)
        h = acc.astype(np.float32) * (np.float32(act["scale"]) * s_w) + bias
        if layer["path"] != "head":
            h = np.maximum(h, 0)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(logits, h, rtol=0, atol=1e-6 * np.abs(h).max())


def test_batch_dimension_is_symbolic(tmp_path):
    x = make_artifact(tmp_path / "a", "cnn1d", {}, (40,), {"weight_bits": 8,
                                                           "activation_bits": 8})
    export_onnx(str(tmp_path / "a"), str(tmp_path / "m.onnx"), opset=13)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert model.opset_import[0].version == 13
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [40]
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                           providers=["CPUExecutionProvider"])
    whole = session.run(["logits"], {"input": x[:7]})[0]
    one = session.run(["logits"], {"input": x[:1]})[0]
    assert whole.shape == (7, 10) and one.shape == (1, 10)
    np.testing.assert_array_equal(one, whole[:1])  # static scales: no batch dependence


def test_what_onnx_cannot_express_is_refused_in_one_line(tmp_path, monkeypatch):
    x = make_artifact(tmp_path / "a", "mlp", {"widths": (16,)}, (40,), {"weight_bits": 8})
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()

    def refused(match, directory=tmp_path / "a", **kw):
        with pytest.raises(ConfigError, match=match) as error:
            export_onnx(str(directory), str(out), **kw)
        assert "\n" not in str(error.value)
        assert os.listdir(out.parent) == []  # nothing written, no temporary file left

    refused(r"opset=12 is not supported", opset=12)
    # A bit width the graph has no integer type for (a manifest edited by hand).
    path = tmp_path / "a" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["weight_bits"] = 16
    path.write_text(json.dumps(manifest))
    refused(r"layer 'hidden1' has weight_bits=16.*cannot express")
    # A model outside the zoo (a registered subclass of a zoo model included).
    model = Custom(num_classes=10, widths=(8,))
    monkeypatch.setitem(models.MODELS, "custom", lambda num_classes: Custom(
        num_classes=num_classes, widths=(8,)))
    export.export(str(tmp_path / "c"), "custom", {}, 10,
                  random_variables(model, jnp.asarray(x[:2])), None, None, {},
                  input_shape=(40,))
    refused(r"model 'custom' \(Custom\) has no ONNX export", directory=tmp_path / "c")


class Custom(models.MLP):
    """An MLP registered under another name: the exporter knows the zoo's classes only."""


# --- BERT ---------------------------------------------------------------------------------

BERT = {"vocab_size": 50, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
        "intermediate_size": 32, "max_position": 32}
W8A8 = {"weight_bits": 8, "activation_bits": 8}
BERT_CASES = [
    # id, extra model kwargs, quantization, per-batch activation scales
    ("fp32-cls", {}, None, False),
    ("fp32-mean", {"pooling": "mean"}, None, False),
    ("fp32-pooler-a-layer-without-heads-and-one-without-ffn",
     {"pooling": "pooler", "layer_heads": (0, 2), "layer_intermediate": (32, 0)}, None, False),
    ("w8a8-cls", {}, W8A8, False),
    ("w8a8-mean-per-batch-scale", {"pooling": "mean"}, W8A8, True),
    ("w4a8-lsq", {}, {"weight_bits": 4, "activation_bits": 8, "method": "lsq"}, False),
    ("w8-weight-only", {}, {"weight_bits": 8}, False),
    ("w8a8-int8-embeddings", {}, {**W8A8, "embedding_bits": 8}, False),
    ("w8-int4-embeddings", {}, {"weight_bits": 8, "embedding_bits": 4}, False),
]


def bert_tokens(n=300, length=24, vocab=50, seed=0):
    """Random token ids with 2 to ``length`` tokens per row, zero-padded, and their mask."""
    rng = np.random.default_rng(seed)
    mask = (np.arange(length)[None] < rng.integers(2, length + 1, size=(n, 1))).astype(np.int32)
    return rng.integers(1, vocab, size=(n, length)).astype(np.int32) * mask, mask


def make_bert_artifact(directory, kwargs, fields, dynamic):
    model = models.get_model("bert", num_classes=5, **kwargs)
    ids, mask = bert_tokens()
    variables = random_variables(model, jnp.asarray(ids[:2]))
    settings = ranges = None
    if fields is not None:
        settings = quant.settings(fields)
        sample = (jnp.asarray(ids[:32]), jnp.asarray(mask[:32]))  # both inputs
        variables = {**variables, "params": quant.init_qat_params(model, variables, sample,
                                                                  **settings.kwargs())}
        if settings.activation_bits and not dynamic:
            ranges = quant.observed_ranges(quant.init_observers(model, variables, sample,
                                                                **settings.kwargs()))
    export.export(str(directory), "bert", kwargs, 5, variables, settings, ranges, {},
                  input_shape=(24,))
    return ids, mask


@pytest.mark.parametrize("extra,fields,dynamic", [pytest.param(*c[1:], id=c[0])
                                                  for c in BERT_CASES])
def test_onnx_bert_computes_the_artifact(tmp_path, extra, fields, dynamic):
    kwargs = {**BERT, **extra}
    ids, mask = make_bert_artifact(tmp_path / "a", kwargs, fields, dynamic)
    info = export_onnx(str(tmp_path / "a"), str(tmp_path / "m.onnx"))
    assert info["inputs"] == [{"name": n, "shape": ["batch", "sequence"]}
                              for n in ("input_ids", "attention_mask")]
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64] * 2
    ops = op_counts(graph)
    manifest = export.read_manifest(str(tmp_path / "a"))
    kinds, integer, _ = expected_ops(manifest)
    # Every projection the model calls is a layer: Q, K, V, attention output, FFN in and
    # out per layer (less those of a layer without heads or FFN), pooler, head.
    assert sum(info["layers"].values()) == sum(
        4 * (h > 0) + 2 * (f > 0) for h, f in zip(extra.get("layer_heads", (2, 2)),
                                                  extra.get("layer_intermediate", (32, 32)),
                                                  strict=True)) + 1 + (
        extra.get("pooling") == "pooler")
    if fields is not None:
        assert info["layers"] == kinds
        assert {op: ops[op] for op in ("MatMulInteger",) if ops[op]} == integer
    # Integer tables: the word and position lookups gather int8 rows and their scales.
    tables = 2 if fields and fields.get("embedding_bits") else 0
    assert info["integer_tables"] == tables
    int8_tables = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8
                   and t.name.startswith("embeddings/")]
    assert [list(t.dims) for t in int8_tables] == [[BERT["vocab_size"], BERT["hidden_size"]],
                                                   [BERT["max_position"],
                                                    BERT["hidden_size"]]][:tables]
    assert ops["Gather"] >= 2 * tables + 1
    assert ops["Softmax"] == sum(h > 0 for h in extra.get("layer_heads", (2, 2)))
    assert ops["LayerNormalization"] == 1 + 2 * BERT["num_layers"]
    report = verify_onnx(str(tmp_path / "a"), str(tmp_path / "m.onnx"), (ids, mask))
    assert report["argmax_agreement"] >= 0.999
    assert report["matching"] >= 0.99 and report["relative_diff"] <= 0.02
    if fields is None or not fields.get("activation_bits"):
        assert report["matching"] == 1.0 and report["relative_diff"] <= 1e-5
    # The sequence length is symbolic and padding is ignored: a row alone, cut to its own
    # tokens, gives its logits in the padded batch (static scales; float attention).
    if not dynamic:
        session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"),
                                               providers=["CPUExecutionProvider"])
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64)}
        whole = session.run(["logits"], feed)[0]
        n = int(mask[0].sum())
        one = session.run(["logits"], {k: v[:1, :n] for k, v in feed.items()})[0]
        np.testing.assert_allclose(one, whole[:1], rtol=0, atol=1e-5 * np.abs(whole).max())


def test_onnx_bert_layer_norm_before_opset_17(tmp_path):
    ids, mask = make_bert_artifact(tmp_path / "a", BERT, W8A8, False)
    export_onnx(str(tmp_path / "a"), str(tmp_path / "m.onnx"), opset=13)
    assert "LayerNormalization" not in op_counts(onnx.load(str(tmp_path / "m.onnx")).graph)
    report = verify_onnx(str(tmp_path / "a"), str(tmp_path / "m.onnx"), (ids, mask))
    assert report["argmax_agreement"] >= 0.999 and report["relative_diff"] <= 0.02
