"""jaxkd.export: packed integers on disk, a manifest that catches changed bytes, and an
inference function whose matmuls really are int8 x int8 -> int32."""

import hashlib
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import export, models, quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**fields):
    c = quant.default_quantization_config()
    c.update(fields)
    return c


def random_variables(model, x, seed=0):
    """Variables of ``model`` drawn with numpy (compiling ``model.init`` is slow on 2 cores):
    LeCun-normal kernels, small random biases and non-trivial BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def build(name, kwargs, shape, batch=16, seed=0):
    model = models.get_model(name, num_classes=10, **kwargs)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(batch, *shape)), jnp.float32)
    return model, random_variables(model, x, seed), x


def integer_ops(fn, *args):
    """(primitive, input dtypes, output dtype) of every dot/conv in ``fn``'s jaxpr, nested
    jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
                found.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars),
                              str(eqn.outvars[0].aval.dtype)))
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(getattr(inner, "jaxpr", inner))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("count", [1, 7, 64])
def test_pack_round_trips_and_takes_bits_per_value(bits, count):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    values = np.random.default_rng(count).integers(lo, hi + 1, count).astype(np.int8)
    packed = export.pack(values, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
    np.testing.assert_array_equal(export.unpack(packed, bits, count), values)


def test_pack_layout_is_twos_complement_low_bits_first():
    np.testing.assert_array_equal(export.pack(np.array([1, -1], np.int8), 4), [0xF1])
    np.testing.assert_array_equal(export.pack(np.array([1, -1, -2, 0, 1], np.int8), 2),
                                  [0b00_10_11_01, 0b01])
    with pytest.raises(ValueError, match="do not fit in 4 bits"):
        export.pack(np.array([8], np.int8), 4)


# ----------------------------------------------------------------------------- integer path


@pytest.mark.parametrize("name,kwargs,shape,fields,dot", [
    ("mlp", {"widths": (32, 32)}, (40,), {"weight_bits": 4, "activation_bits": 8}, 3),
    # Convolutions are lowered as im2col + int8 GEMM.
    ("cnn1d", {}, (40,), {"weight_bits": 2, "activation_bits": 4, "method": "lsq"}, 4),
    ("lenet5", {}, (8, 8, 1), {"weight_bits": 4, "activation_bits": 8, "symmetric": False}, 5),
])
def test_integer_path_is_int8_and_matches_the_fake_quant_model(tmp_path, name, kwargs, shape,
                                                                fields, dot):
    model, variables, x = build(name, kwargs, shape)
    c = config(**fields)
    variables = {**variables, "params": quant.init_qat_params(model, variables, x, c)}
    manifest = export.export(str(tmp_path / "a"), name, kwargs, 10, variables, c, None,
                             {"accuracy": 0.5}, input_shape=shape)
    predict, loaded = export.load(str(tmp_path / "a"))
    assert loaded == json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest

    # Every matmul of the loaded model is int8 x int8 -> int32; none is float.
    ops = integer_ops(predict, x)
    assert ops.count(("dot_general", ("int8", "int8"), "int32")) == dot
    assert len(ops) == dot
    hlo = jax.jit(predict).lower(x).as_text()
    assert "xi8>" in hlo and "-> tensor<" in hlo and "xi32>" in hlo

    # QAT quantizes the activations by the same rule (dynamic per tensor, or LSQ's step):
    # the logits agree to float rounding, and differ from the float model.
    fake = jax.jit(quant.qat_apply(model, c))(variables, x)
    logits = predict(x)
    assert logits.shape == (x.shape[0], 10) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fake, rtol=1e-4, atol=1e-5)
    float_logits = model.apply({**variables, "params": quant.strip_steps(variables["params"])}, x)
    assert np.abs(np.asarray(logits) - np.asarray(float_logits)).max() > 1e-3
    layers = manifest["layers"]
    assert any(layer["zero_point"] is not None for layer in layers) == (not c.symmetric)
    assert {layer["activation"]["source"] for layer in layers} == (
        {"lsq"} if c.method == "lsq" else {"dynamic"})


def test_integer_path_of_a_resnet_with_batchnorm(tmp_path):
    model, variables, x = build("resnet8", {}, (8, 8, 3), batch=4)
    c = config(weight_bits=8, activation_bits=8)
    export.export(str(tmp_path / "r"), "resnet8", {}, 10, variables, c, None, {},
                  input_shape=(8, 8, 3))
    predict, manifest = export.load(str(tmp_path / "r"))
    assert {t["collection"] for t in manifest["float_tensors"]} == {"params", "batch_stats"}
    assert len(manifest["layers"]) == 10 and len(integer_ops(predict, x)) == 10
    # Eight layers deep, a float rounding difference can move one activation across a
    # rounding boundary in one implementation and not the other: compare loosely.
    logits = np.asarray(predict(x))
    fake = np.asarray(jax.jit(quant.qat_apply(model, c))(variables, x))
    assert np.abs(logits - fake).max() < 0.02 * np.abs(fake).max()


class Convs(nn.Module):
    """Conv variants: causal, circular, dilated, strided 2-D, grouped (the conv fallback)."""

    @nn.compact
    def __call__(self, x, *, train=False):
        a = nn.Conv(4, (3,), padding="CAUSAL", kernel_dilation=2, name="causal")(x)
        b = nn.Conv(4, (3,), padding="CIRCULAR", strides=2, name="circular")(x)
        c = nn.Conv(4, (2, 3), padding=((1, 0), (2, 1)), strides=(1, 2), name="conv2d")(
            x[..., None, :].repeat(3, -2))
        d = nn.Conv(4, (3,), feature_group_count=2, use_bias=False, name="grouped")(a)
        return jnp.concatenate([a.mean(1), b.mean(1), c.mean((1, 2)), d.mean(1)], -1)


def test_integer_conv_follows_flax_conv_semantics(tmp_path, monkeypatch):
    model = Convs()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 11, 2))
    variables = random_variables(model, x)
    c = config(weight_bits=8, activation_bits=8, keep_first_last_8bit=False)
    monkeypatch.setitem(models.MODELS, "convs", lambda num_classes: Convs())
    export.export(str(tmp_path / "c"), "convs", {}, 16, variables, c, None, {},
                  input_shape=(11, 2))
    predict, _ = export.load(str(tmp_path / "c"))
    np.testing.assert_allclose(predict(x), jax.jit(quant.qat_apply(model, c))(variables, x),
                               rtol=1e-4, atol=1e-5)
    ops = integer_ops(predict, x)
    assert ("conv_general_dilated", ("int8", "int8"), "int32") in ops  # the grouped conv
    assert all(dtypes == ("int8", "int8") and out == "int32" for _, dtypes, out in ops)


def test_static_calibrated_activation_scales(tmp_path):
    model, variables, x = build("mlp", {"widths": (32,)}, (40,), batch=64)
    ranges = quant.calibrate(model, variables, [x[:32], x[32:]])
    c = config(weight_bits=8)
    manifest = export.export(str(tmp_path / "s"), "mlp", {"widths": (32,)}, 10, variables, c,
                             ranges, {}, input_shape=(40,))
    for layer in manifest["layers"]:
        lo, hi = ranges[layer["path"]]
        assert layer["activation"]["source"] == "calibrated"
        assert layer["activation"]["scale"] == pytest.approx(max(-lo, hi) / 127, rel=1e-6)
    predict, _ = export.load(str(tmp_path / "s"))
    ref = np.asarray(model.apply(variables, x))
    out = np.asarray(predict(x))
    assert np.abs(out - ref).max() < 0.02 * np.abs(ref).max()
    assert (out.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    # The static scale does not depend on the batch: one row gives the same logits.
    np.testing.assert_allclose(predict(x[:1]), out[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="activation_ranges has no range for layer 'head'"):
        export.export(str(tmp_path / "t"), "mlp", {"widths": (32,)}, 10, variables, c,
                      {"hidden1": ranges["hidden1"]}, {}, input_shape=(40,))
    assert not (tmp_path / "t").exists()


# ----------------------------------------------------------------------------- files


def test_artifact_holds_packed_integers_and_a_complete_manifest(tmp_path):
    kwargs = {"widths": (32, 32)}
    model, variables, x = build("mlp", kwargs, (40,))
    d = tmp_path / "int4"
    manifest = export.export(str(d), "mlp", kwargs, 10, variables, config(weight_bits=4), None,
                             {"accuracy": 0.91}, input_shape=(40,))
    assert sorted(os.listdir(d)) == ["float_tensors.bin", "int_weights.bin", "manifest.json"]
    assert manifest["model"] == {"name": "mlp", "kwargs": {"widths": [32, 32]},
                                 "num_classes": 10, "input_shape": [40]}
    assert manifest["metrics"] == {"accuracy": 0.91}
    assert manifest["jaxkd_version"] and manifest["quantization"]["weight_bits"] == 4
    for name, entry in manifest["files"].items():
        data = (d / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # hidden1 and head keep 8 bits (one byte each), hidden2 packs two 4-bit values a byte.
    bits = {layer["path"]: layer["weight_bits"] for layer in manifest["layers"]}
    assert bits == {"hidden1": 8, "hidden2": 4, "head": 8}
    int_bytes = 40 * 32 + (32 * 32) // 2 + 32 * 10
    assert manifest["files"]["int_weights.bin"]["bytes"] == int_bytes
    # Floats: biases and one scale per output channel; no float copy of any kernel.
    assert manifest["files"]["float_tensors.bin"]["bytes"] == 4 * 2 * (32 + 32 + 10)
    assert {t["path"] for t in manifest["float_tensors"]} == {
        "hidden1/bias", "hidden2/bias", "head/bias"}
    stored = export.unpack(np.fromfile(d / "int_weights.bin", np.uint8)[1280:1280 + 512], 4,
                           1024).reshape(32, 32)
    ref = quant.quantize_kernel(variables["params"]["hidden2"]["kernel"], bits=4)
    np.testing.assert_array_equal(stored, ref.values)

    fp32 = tmp_path / "fp32"
    export.export(str(fp32), "mlp", kwargs, 10, variables, None, None, {}, input_shape=(40,))
    predict, m = export.load(str(fp32))
    assert m["layers"] == [] and m["quantization"] is None
    np.testing.assert_allclose(predict(x), model.apply(variables, x), rtol=1e-6, atol=1e-6)
    assert export.artifact_bytes(str(d)) < 0.4 * export.artifact_bytes(str(fp32))


def test_verify_names_the_changed_or_missing_file(tmp_path):
    kwargs = {"widths": (32,)}
    _, variables, _ = build("mlp", kwargs, (40,))
    d = tmp_path / "a"
    export.export(str(d), "mlp", kwargs, 10, variables, config(), None, {}, input_shape=(40,))
    assert export.verify(str(d))["format"] == export.FORMAT
    data = bytearray((d / "int_weights.bin").read_bytes())
    data[17] ^= 0x01
    (d / "int_weights.bin").write_bytes(bytes(data))
    with pytest.raises(export.ArtifactError, match="int_weights.bin does not match manifest.json"
                       ) as e:
        export.verify(str(d))
    assert "\n" not in str(e.value)
    with pytest.raises(export.ArtifactError, match="int_weights.bin"):
        export.load(str(d))
    cli = [sys.executable, "-m", "jaxkd.export", "verify", str(d)]
    result = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "int_weights.bin" in result.stderr
    data[17] ^= 0x01
    (d / "int_weights.bin").write_bytes(bytes(data))
    result = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "2 files match manifest.json" in result.stdout
    os.remove(d / "float_tensors.bin")
    with pytest.raises(FileNotFoundError, match="float_tensors.bin is missing"):
        export.verify(str(d))


def test_export_never_overwrites_unless_asked(tmp_path):
    kwargs = {"widths": (32,)}
    model, variables, x = build("mlp", kwargs, (40,))
    d = tmp_path / "a"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export.export(str(d), "mlp", kwargs, 10, variables, config(), None, {},
                      input_shape=(40,))
    assert os.listdir(d) == ["notes.txt"] and (d / "notes.txt").read_text() == "keep me"
    assert [p for p in os.listdir(tmp_path) if p != "a"] == []  # no temporary left behind
    export.export(str(d), "mlp", kwargs, 10, variables, config(), None, {}, input_shape=(40,),
                  overwrite=True)
    assert "notes.txt" not in os.listdir(d)
    export.verify(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    export.export(str(empty), "mlp", kwargs, 10, variables, None, None, {}, input_shape=(40,))
    predict, _ = export.load(str(empty))
    result = export.evaluate(predict, [
        {"image": x, "label": np.asarray(model.apply(variables, x)).argmax(-1),
         "mask": np.r_[np.ones(10), np.zeros(6)]},
        {"image": x, "label": np.full(16, -1), "mask": np.zeros(16)}])
    assert result["accuracy"] == 1.0 and result["num_examples"] == 10
