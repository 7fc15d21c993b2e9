"""jaxkd.export.safetensors_io: the artifact's tensors as dense safetensors, enough to rebuild
the integer model's logits in numpy, named and typed as documented."""

import hashlib
import json
import os
import zlib

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import traverse_util

from jaxkd import export, quant
from jaxkd.export import safetensors_io
from jaxkd.schema import ConfigError, MissingError
from tests.test_export import build, compressed_mlp, config

WIDTHS = (32, 32)


def mlp_artifact(directory, fields, *, include_float=False, seed=0):
    """An mlp artifact (static activation scales from QAT's observers) and its
    ``model.safetensors`` beside it; returns (model, variables, x, info)."""
    kwargs = {"widths": WIDTHS}
    model, variables, x = build("mlp", kwargs, (40,), batch=37, seed=seed)
    c = config(**fields)
    observers = quant.init_observers(model, variables, x, **c.kwargs())
    export.export(str(directory), "mlp", kwargs, 10, variables, c,
                  quant.observed_ranges(observers), {}, input_shape=(40,))
    out = str(directory.parent / f"{directory.name}.safetensors")
    info = safetensors_io.export_safetensors(str(directory), out, include_float=include_float)
    return model, variables, x, info


def numpy_forward(tensors, layers, x):
    """The integer mlp in numpy, from the file alone (Jacob et al. 2018, eq. 7):
    ``q_x = clip(round(x / s_x) + z_x, q_min, q_max)``, ``acc = (q_x - z_x) (q_w - z_w)`` in
    int32, ``y = s_x s_w acc + b``, ReLU between layers."""
    h = np.asarray(x, np.float32).reshape(len(x), -1)
    names = [f"hidden{i}" for i in range(1, len(WIDTHS) + 1)] + ["head"]
    for name in names:
        p = f"params.{name}."
        act = layers[name]["activation"]
        s_x, z_x = tensors[p + "input_scale"], tensors[p + "input_zero_point"].astype(np.int32)
        q_x = np.clip(np.round(h / s_x) + z_x, act["q_min"], act["q_max"]).astype(np.int32)
        q_w = tensors[p + "weight_int"].astype(np.int32)
        z_w = tensors.get(p + "weight_zero_point", np.zeros((), np.int8)).astype(np.int32)
        acc = (q_x - z_x) @ (q_w - z_w)
        assert acc.dtype == np.int32
        h = acc.astype(np.float32) * (s_x * tensors[p + "weight_scale"]) + tensors[p + "bias"]
        if name != "head":
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("fields", [
    {"weight_bits": 8, "activation_bits": 8},
    # int4 kernels (hidden2; the first and last layers keep 8 bits) with one scale and zero
    # point per tensor.
    {"weight_bits": 4, "activation_bits": 8, "symmetric": False, "per_channel": False},
], ids=["w8a8", "w4a8-asymmetric"])
def test_numpy_rebuilds_the_integer_logits(tmp_path, fields):
    _, _, x, info = mlp_artifact(tmp_path / "a", fields)
    tensors = safetensors.numpy.load_file(info["path"])
    with safetensors.safe_open(info["path"], "np") as f:
        meta = f.metadata()
    logits = numpy_forward(tensors, json.loads(meta["layers"]), np.asarray(x))
    predict, manifest = export.load(str(tmp_path / "a"))
    np.testing.assert_allclose(logits, predict(x), rtol=1e-5, atol=1e-5)
    assert np.abs(logits).max() > 0.1  # not a trivially small output
    # A zero point is stored where the kernel's is not zero (asymmetric weights only).
    zero_points = {e["path"]: f"params.{e['path']}.weight_zero_point" in tensors
                   for e in manifest["layers"]}
    assert zero_points == {e["path"]: e["zero_point"] is not None for e in manifest["layers"]}
    assert any(zero_points.values()) == (not fields.get("symmetric", True))
    if not fields.get("symmetric", True):
        assert -8 <= tensors["params.hidden2.weight_int"].min() < 0
        assert 0 < tensors["params.hidden2.weight_int"].max() <= 7
        assert all(tensors[f"params.{p}.weight_zero_point"].shape == ()
                   for p, stored in zero_points.items() if stored)


def test_every_documented_name_dtype_shape_and_metadata(tmp_path):
    fields = {"weight_bits": 4, "activation_bits": 8, "symmetric": False}
    model, variables, _, info = mlp_artifact(tmp_path / "a", fields, include_float=True)
    manifest = export.read_manifest(str(tmp_path / "a"))
    tensors = safetensors.numpy.load_file(info["path"])
    assert {n: {"dtype": t.dtype.name, "shape": list(t.shape)} for n, t in tensors.items()} == (
        info["tensors"])
    # Expected from the model's own variables: every kernel quantized (with asymmetric
    # per-channel weights and static activation scales), biases as they are.
    expected = {}
    for (collection, *path), value in traverse_util.flatten_dict(variables).items():
        name = ".".join([collection, *path])
        if path[-1] != "kernel":
            expected[name] = ("float32", value.shape)
            continue
        layer, channels = ".".join([collection, *path[:-1]]), (value.shape[-1],)
        expected |= {f"{layer}.weight_int": ("int8", value.shape),
                     f"{layer}.weight_scale": ("float32", channels),
                     f"{layer}.weight_zero_point": ("int8", channels),
                     f"{layer}.input_scale": ("float32", ()),
                     f"{layer}.input_zero_point": ("int8", ()),
                     f"float.{name}": ("float32", value.shape)}
    assert {n: (t.dtype.name, t.shape) for n, t in tensors.items()} == expected
    assert len(manifest["layers"]) == 3

    for (collection, *path), value in traverse_util.flatten_dict(variables).items():
        if path[-1] == "kernel":
            p = ".".join([collection, *path[:-1]])
            bits = {"hidden2": 4}.get(path[0], 8)
            q, s, z = (tensors[f"{p}.weight_{k}"] for k in ("int", "scale", "zero_point"))
            assert -2 ** (bits - 1) <= q.min() < 0 <= q.max() <= 2 ** (bits - 1) - 1
            # The dequantized kernel is the float kernel to within half a step.
            w = tensors[f"float.{'.'.join([collection, *path])}"]
            np.testing.assert_allclose(w, s * (q.astype(np.float32) - z), rtol=0, atol=0)
            assert np.all(np.abs(w - np.asarray(value)) <= 0.5 * s + 1e-6)
        else:
            np.testing.assert_array_equal(tensors[".".join([collection, *path])], value)

    with safetensors.safe_open(info["path"], "np") as f:
        meta = f.metadata()
    assert meta == info["metadata"]
    assert meta["format"] == safetensors_io.FORMAT == "jaxkd.safetensors/1"
    assert meta["artifact_format"] == export.FORMAT and meta["model"] == "mlp"
    assert json.loads(meta["model_kwargs"]) == {"widths": list(WIDTHS)}
    assert int(meta["num_classes"]) == 10 and json.loads(meta["input_shape"]) == [40]
    assert json.loads(meta["quantization"])["weight_bits"] == 4
    assert json.loads(meta["include_float"]) is True
    layers = json.loads(meta["layers"])
    assert {p: layer["weight_bits"] for p, layer in layers.items()} == {
        "hidden1": 8, "hidden2": 4, "head": 8}
    assert {p: layer["activation"]["bits"] for p, layer in layers.items()} == {
        "hidden1": 8, "hidden2": 8, "head": 8}
    for p, layer in layers.items():  # the stored grid is the one the manifest runs
        assert tensors[f"params.{p}.input_scale"] == np.float32(layer["activation"]["scale"])
        assert tensors[f"params.{p}.input_zero_point"] == layer["activation"]["zero_point"]
    digest = hashlib.sha256((tmp_path / "a" / "manifest.json").read_bytes()).hexdigest()
    assert meta["manifest_sha256"] == digest
    # Not a BERT-family student: no Hugging Face config is made up.
    assert safetensors_io.huggingface_config(manifest) is None
    assert sorted(os.listdir(tmp_path)) == ["a", "a.safetensors"]


def test_weight_only_and_float_artifacts(tmp_path):
    """No input grid for a layer whose input stays float; a float32 artifact is its
    variables."""
    kwargs = {"widths": (16,)}
    _, variables, _ = build("mlp", kwargs, (40,))
    export.export(str(tmp_path / "w"), "mlp", kwargs, 10, variables, config(weight_bits=8),
                  None, {}, input_shape=(40,))
    info = safetensors_io.export_safetensors(str(tmp_path / "w"), str(tmp_path / "w.st"))
    assert sorted(info["tensors"]) == sorted(
        f"params.{p}.{leaf}" for p in ("hidden1", "head")
        for leaf in ("bias", "weight_int", "weight_scale"))
    export.export(str(tmp_path / "f"), "mlp", kwargs, 10, variables, None, None, {},
                  input_shape=(40,))
    info = safetensors_io.export_safetensors(str(tmp_path / "f"), str(tmp_path / "f.st"),
                                             include_float=True)
    tensors = safetensors.numpy.load_file(str(tmp_path / "f.st"))
    flat = traverse_util.flatten_dict(variables, sep=".")
    assert sorted(tensors) == sorted(flat)
    for name, value in flat.items():
        np.testing.assert_array_equal(tensors[name], value)
    assert info["metadata"]["quantization"] == "null" and info["metadata"]["layers"] == "{}"


@pytest.mark.parametrize("quantized", [False, True])
def test_pruned_and_clustered_tensors_decode_like_read_tensor(tmp_path, quantized):
    _, kwargs, variables, _ = compressed_mlp()
    # Symmetric int4: a pruned weight stays the integer 0 (sparse storage of packed int4).
    c = config(weight_bits=4, keep_first_last_8bit=False) if quantized else None
    d = tmp_path / "a"
    manifest = export.export(str(d), "mlp", kwargs, 10, variables, c, None, {},
                             input_shape=(40,), entropy_coding=True)
    entries = [e["kernel"] for e in manifest["layers"]] + manifest["float_tensors"]
    assert {e["enc"] for e in entries} - {"dense+raw"}  # sparse or codebook storage in use
    info = safetensors_io.export_safetensors(str(d), str(tmp_path / "model.safetensors"))
    tensors = safetensors.numpy.load_file(info["path"])
    contents = {}
    for name, entry in manifest["files"].items():
        data = (d / name).read_bytes()
        contents[name] = zlib.decompress(data) if entry["codec"] == "zlib" else data
    expected = {f"{t['collection']}.{t['path'].replace('/', '.')}": export.read_tensor(
        contents, t) for t in manifest["float_tensors"]}
    for layer in manifest["layers"]:
        p = f"params.{layer['path']}"
        expected[f"{p}.weight_int"] = export.read_tensor(contents, layer["kernel"])
        expected[f"{p}.weight_scale"] = export.read_tensor(contents, layer["scale"])
        assert layer["zero_point"] is None
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    # The dense file holds every pruned zero: as many weights as the model has.
    kernels = [v for n, v in tensors.items() if n.endswith(("kernel", "weight_int"))]
    assert sum(k.size for k in kernels) == manifest["storage"]["weights"] == 40 * 64 + 64 * 10


def test_bad_paths_are_named_and_nothing_is_half_written(tmp_path):
    kwargs = {"widths": (16,)}
    _, variables, _ = build("mlp", kwargs, (40,))
    d = tmp_path / "a"
    export.export(str(d), "mlp", kwargs, 10, variables, config(), None, {}, input_shape=(40,))
    with pytest.raises(MissingError, match="out_path=.*nowhere.* does not exist"):
        safetensors_io.export_safetensors(str(d), str(tmp_path / "nowhere" / "m.safetensors"))
    with pytest.raises(MissingError, match="manifest.json is missing"):
        safetensors_io.export_safetensors(str(tmp_path / "b"), str(tmp_path / "m.safetensors"))
    data = bytearray((d / "int_weights.bin").read_bytes())
    data[3] ^= 0x01
    (d / "int_weights.bin").write_bytes(bytes(data))
    with pytest.raises(export.ArtifactError, match="int_weights.bin does not match"):
        safetensors_io.export_safetensors(str(d), str(tmp_path / "m.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["a"]


# --- the HF directory of a BERT ----------------------------------------------------------


@pytest.mark.parametrize("pooling,fields", [("pooler", None), ("mean", {"weight_bits": 8}),
                                            ("cls", {"weight_bits": 8, "activation_bits": 8})])
def test_bert_hf_directory_loads_back_as_the_float_model(tmp_path, pooling, fields):
    """``from_pretrained`` (HF names, ``[out, in]`` weights, classifier as head) and the
    float64 numpy BERT of bench/bert_numpy.py read the directory; both give the artifact's
    float model (its dequantized weights)."""
    import json
    import sys

    from jaxkd.export.hf import export_hf
    from jaxkd.models.pretrained import from_pretrained
    from tests.test_onnx import BERT, make_bert_artifact

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
    import bert_numpy

    kwargs = {**BERT, "pooling": pooling}
    ids, mask = make_bert_artifact(tmp_path / "a", kwargs, fields, False)
    info = export_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert info["architecture"] == config["architectures"][0] == (
        "BertForSequenceClassification" if pooling == "pooler" else "BertModel")
    assert config["jaxkd"]["pooling"] == pooling and config["num_labels"] == 5
    model, variables = from_pretrained(str(tmp_path / "hf"), num_classes=5, pooling=pooling)
    got = np.asarray(model.apply(variables, ids, mask))
    # The artifact's float model: its dequantized kernels, float activations.
    float_model = export.load(str(tmp_path / "a"))[0] if not fields else None
    weights = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
    hidden = bert_numpy.forward(weights, config, ids, mask)["hidden_states"][-1]
    if pooling == "mean":
        pooled = bert_numpy.mean_pool(hidden, mask)
    else:
        pooled = hidden[:, 0]
        if pooling == "pooler":
            pooled = np.tanh(pooled @ weights["bert.pooler.dense.weight"].T.astype(np.float64)
                             + weights["bert.pooler.dense.bias"])
    reference = pooled @ weights["classifier.weight"].T.astype(np.float64) + weights[
        "classifier.bias"]
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5 * np.abs(reference).max())
    if float_model is not None:
        np.testing.assert_allclose(got, np.asarray(float_model(ids, mask)), rtol=0,
                                   atol=1e-5 * np.abs(reference).max())
    if fields and not fields.get("activation_bits"):  # weight-only: the artifact is float
        np.testing.assert_allclose(got, np.asarray(export.load(str(tmp_path / "a"))[0](
            ids, mask)), rtol=0, atol=1e-5 * np.abs(reference).max())


def test_bert_hf_directory_refuses_what_bertconfig_cannot_say(tmp_path):
    from jaxkd.export.hf import export_hf
    from tests.test_onnx import BERT, make_bert_artifact

    make_bert_artifact(tmp_path / "a", {**BERT, "layer_heads": (1, 2)}, None, False)
    with pytest.raises(ConfigError, match=r"layer_heads=\(1, 2\) varies by layer"):
        export_hf(str(tmp_path / "a"), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
