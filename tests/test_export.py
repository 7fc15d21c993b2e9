"""jaxkd.export: packed integers on disk, a manifest that catches changed bytes, and an
inference function whose matmuls really are int8 x int8 -> int32."""

import hashlib
import json
import math
import os
import subprocess
import sys
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import bitpack, export, models, quant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(**fields):
    """A checked quantization block (the defaults of jaxkd.config.Quantization otherwise)."""
    return quant.settings(fields)


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


# ----------------------------------------------------------------------------- encodings


def nonzero(flat, bits):
    return (flat.view(np.uint32) if bits is None else flat) != 0


def formula_nbytes(values, bits=None):
    """Bytes of each encoding by the formulas (written out here, not export's code)."""
    v = np.asarray(values, np.float32 if bits is None else np.int8)
    flat = v.reshape(-1)
    n, b = flat.size, 32 if bits is None else bits
    nz = nonzero(flat, bits)
    m = int(nz.sum())
    rows, cols = (math.prod(v.shape[:-1]), v.shape[-1]) if v.ndim else (1, 1)

    def size(max_value):  # the smallest of uint8 / uint16 / uint32
        return 1 if max_value < 2**8 else 2 if max_value < 2**16 else 4

    def distinct(x):  # floats by their bits: -0.0 and 0.0 are two values
        return len(np.unique(x.view(np.uint32) if bits is None else x))

    def index_bits(u):
        return max(1, math.ceil(math.log2(u))) if u > 1 else 1

    max_col = int(max(np.flatnonzero(nz) % cols)) if m else 0
    positions = {"dense": (0, n, distinct(flat)),
                 "bitmask": (math.ceil(n / 8), m, distinct(flat[nz])),
                 "csr": ((rows + 1) * size(m) + m * size(max_col), m, distinct(flat[nz]))}
    out = {}
    for name, (overhead, stored, u) in positions.items():
        out[name + "+raw"] = overhead + math.ceil(stored * b / 8)
        out[name + "+codebook"] = (overhead + math.ceil(u * b / 8)
                                   + math.ceil(stored * index_bits(u) / 8))
    return out


def crafted():
    """(values, bits): zeros (whole rows and columns too), repeats, -0.0, inf, NaN, empty
    and scalar tensors, floats and every integer width."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(6, 9)).astype(np.float32)
    f[rng.random(f.shape) < 0.6] = 0.0
    f[2] = 0.0
    f[:, 4] = 0.0
    f[0, :3] = [-0.0, np.inf, np.nan]
    f[1, :3] = f[3, :3] = [0.5, 0.5, -0.25]
    cases = [(f, None), (f.reshape(2, 3, 9), None), (np.float32(-1.5), None),
             (np.zeros((0, 4), np.float32), None), (np.zeros((3, 0), np.float32), None),
             (np.zeros((5, 7), np.float32), None), (f[0, 3:], None)]
    for bits in (8, 4, 2):
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        q = rng.integers(lo, hi + 1, size=(7, 5, 3)).astype(np.int8)
        q[rng.random(q.shape) < 0.7] = 0
        cases += [(q, bits), (q[0, 0], bits), (np.zeros((4, 6), np.int8), bits)]
    return cases


def same(a, b):
    """Equal bit for bit (NaN payloads and the sign of zero included)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("encoding", export.ENCODINGS)
def test_every_encoding_round_trips_exactly(encoding):
    for values, bits in crafted():
        parts, meta = export.encode(values, bits=bits, encoding=encoding)
        assert meta["enc"] == encoding and meta.get("bits") == bits
        expected = np.asarray(values, np.float32 if bits is None else np.int8)
        assert same(export.decode(parts, meta), expected), (encoding, values.shape, bits)
        assert sum(p.nbytes for p in parts.values()) == formula_nbytes(values, bits)[encoding]
        # The manifest entry says what it is and where each part lies; bytes suffice.
        assert set(parts) == {"dense+raw": {"val"}, "dense+codebook": {"cb", "idx"},
                              "bitmask+raw": {"mask", "val"},
                              "bitmask+codebook": {"mask", "cb", "idx"},
                              "csr+raw": {"ptr", "col", "val"},
                              "csr+codebook": {"ptr", "col", "cb", "idx"}}[encoding]
        files, entry = {export.INT_FILE: b"", export.FLOAT_FILE: b""}, json.loads(
            json.dumps(meta))
        for name, part in parts.items():
            file = export.FLOAT_FILE if part.dtype == np.float32 else export.INT_FILE
            entry[name] = [len(files[file]), part.nbytes] + (
                [part.dtype.name] if name in ("ptr", "col") else [])
            files[file] += part.astype(part.dtype.newbyteorder("<")).tobytes()
        assert same(export.read_tensor(files, entry), expected)


def test_encoding_layouts():
    # A 3x4 float matrix with nonzeros at (0, 1), (2, 0), (2, 3): the bitmask is bits 1, 8
    # and 11 of the row-major stream, the CSR row pointers [0, 1, 1, 3], columns [1, 0, 3].
    w = np.zeros((3, 4), np.float32)
    w[0, 1], w[2, 0], w[2, 3] = 2.0, -1.0, 2.0
    parts, _ = export.encode(w, encoding="bitmask+raw")
    np.testing.assert_array_equal(parts["mask"], [0b10, 0b1001])
    np.testing.assert_array_equal(parts["val"], [2.0, -1.0, 2.0])
    parts, meta = export.encode(w, encoding="csr+codebook")
    assert parts["ptr"].dtype == parts["col"].dtype == np.uint8
    np.testing.assert_array_equal(parts["ptr"], [0, 1, 1, 3])
    np.testing.assert_array_equal(parts["col"], [1, 0, 3])
    # Codebook [-1, 2], 1-bit indices [1, 0, 1], low bit first.
    assert meta["u"] == 2
    np.testing.assert_array_equal(parts["cb"], [-1.0, 2.0])
    np.testing.assert_array_equal(parts["idx"], [0b101])
    # Integer codebooks are packed at the tensor's bits, like raw values.
    parts, meta = export.encode(np.array([[3, -2, 3, 3]], np.int8), bits=4,
                                encoding="dense+codebook")
    np.testing.assert_array_equal(parts["cb"],
                                  bitpack.pack(np.array([-2, 3], np.int8), 4, signed=True))
    np.testing.assert_array_equal(parts["idx"], [0b1101])
    # Row pointers count up to the number of nonzeros: uint16 past 255.
    big = np.ones((2, 300), np.float32)
    parts, _ = export.encode(big, encoding="csr+raw")
    assert parts["ptr"].dtype == np.uint16 and parts["col"].dtype == np.uint16
    with pytest.raises(ValueError, match="encodings=.*must be one of dense\\+raw"):
        export.check_encodings(["dense+zip"])
    with pytest.raises(ValueError, match="outside \\[-128, 127\\] do not fit in 8 bits"):
        export.encode(np.array([200], np.int32), bits=8)  # not wrapped around to -56


def sparse(shape, density, rng, values=None):
    """A float matrix with exactly ``round(density * size)`` nonzeros, drawn from ``values``
    (else normal)."""
    n = math.prod(shape)
    flat = np.zeros(n, np.float32)
    keep = rng.permutation(n)[:round(density * n)]
    flat[keep] = rng.normal(size=keep.size) if values is None else rng.choice(values, keep.size)
    return flat.reshape(shape)


def test_the_smallest_encoding_is_chosen():
    rng = np.random.default_rng(1)
    codebook = np.linspace(-1, 1, 16, dtype=np.float32)  # no zero among them
    cases = {  # name: (values, bits, expected winner, its bytes by hand)
        "dense": (sparse((100, 100), 1.0, rng), None, "dense+raw", 4 * 10_000),
        # bitmask 1250 + 4000 values; csr (101 uint16 pointers, 1000 uint8 columns) + 4000
        "90% sparse": (sparse((100, 100), 0.1, rng), None, "csr+raw", 202 + 1000 + 4000),
        "99% sparse": (sparse((100, 100), 0.01, rng), None, "csr+raw", 101 + 100 + 400),
        # half the elements: the bitmask (1250) is cheaper than the columns (5000)
        "50% sparse": (sparse((100, 100), 0.5, rng), None, "bitmask+raw", 1250 + 20_000),
        # 16 float32 values and a 4-bit index per element
        "16 values": (sparse((100, 100), 1.0, rng, codebook), None, "dense+codebook",
                      16 * 4 + 10_000 // 2),
        "16 values, 90% sparse": (sparse((100, 100), 0.1, rng, codebook), None,
                                  "csr+codebook", 202 + 1000 + 64 + 500),
        # every int4 value occurs: a 16-entry codebook only adds its 8 bytes
        "dense int4": (rng.integers(-8, 8, (100, 100)).astype(np.int8), 4, "dense+raw", 5000),
        # int8 with 9 values, none zero: 4-bit indices halve it
        "int8, 9 values": (rng.choice(np.r_[-4:0, 1:6], (100, 100)).astype(np.int8), 8,
                           "dense+codebook", 9 + 5000),
    }
    for name, (values, bits, winner, nbytes) in cases.items():
        formulas = formula_nbytes(values, bits)
        assert formulas[winner] == nbytes == min(formulas.values()), (name, formulas)
        assert export.encoded_nbytes(values, bits=bits) == formulas, name
        assert export.choose_encoding(values, bits=bits) == winner, name
        parts, meta = export.encode(values, bits=bits)
        assert meta["enc"] == winner and sum(p.nbytes for p in parts.values()) == nbytes, name
    assert meta["u"] == 9 and parts["idx"].size == 10_000 // 2
    # Ties go to the simpler: 8 int8 values with one zero are 8 bytes dense, and 8 bytes as
    # a 1-byte bitmask and 7 values; an empty tensor is 0 bytes in every encoding.
    one_zero = np.arange(8, dtype=np.int8)
    assert export.encoded_nbytes(one_zero, bits=8)["bitmask+raw"] == 8
    assert export.choose_encoding(one_zero, bits=8) == "dense+raw"
    assert export.choose_encoding(np.zeros(0, np.float32)) == "dense+raw"
    assert export.choose_encoding(np.zeros(8, np.int8), bits=8) == "bitmask+raw"  # 1 byte
    # Restricted to some encodings, the smallest of those.
    assert export.choose_encoding(cases["90% sparse"][0], allowed=["dense+raw",
                                                                   "bitmask+raw"]) == "bitmask+raw"


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
    variables = {**variables, "params": quant.init_qat_params(model, variables, x, **c.kwargs())}
    observers = quant.init_observers(model, variables, x, **c.kwargs())
    manifest = export.export(str(tmp_path / "a"), name, kwargs, 10, variables, c,
                             quant.observed_ranges(observers), {"accuracy": 0.5},
                             input_shape=shape)
    predict, loaded = export.load(str(tmp_path / "a"))
    assert loaded == json.loads((tmp_path / "a" / "manifest.json").read_text()) == manifest

    # Every matmul of the loaded model is int8 x int8 -> int32; none is float.
    ops = integer_ops(predict, x)
    assert ops.count(("dot_general", ("int8", "int8"), "int32")) == dot
    assert len(ops) == dot
    hlo = jax.jit(predict).lower(x).as_text()
    assert "xi8>" in hlo and "-> tensor<" in hlo and "xi32>" in hlo

    # QAT's eval forward quantizes the activations the same way (the frozen observed range,
    # or LSQ's step, on the same grid): the logits agree to float rounding, and differ
    # from the float model.
    fake = jax.jit(quant.qat_apply(model, **c.kwargs()))(
        {**variables, quant.OBSERVERS: observers}, x)
    logits = predict(x)
    assert logits.shape == (x.shape[0], 10) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fake, rtol=1e-4, atol=1e-5)
    float_logits = model.apply({**variables, "params": quant.strip_steps(variables["params"])}, x)
    assert np.abs(np.asarray(logits) - np.asarray(float_logits)).max() > 1e-3
    layers = manifest["layers"]
    assert any(layer["zero_point"] is not None for layer in layers) == (not c.symmetric)
    assert {layer["activation"]["source"] for layer in layers} == (
        {"lsq"} if c.method == "lsq" else {"static"})
    # The layers after a ReLU read non-negative inputs: the unsigned grid.
    unsigned = {layer["path"]: layer["activation"]["unsigned"] for layer in layers}
    assert not unsigned[layers[0]["path"]] and all(list(unsigned.values())[1:])


def test_integer_path_of_a_resnet_with_batchnorm(tmp_path):
    model, variables, x = build("resnet8", {}, (8, 8, 3), batch=4)
    c = config(weight_bits=8, activation_bits=8)
    observers = quant.init_observers(model, variables, x, **c.kwargs())
    export.export(str(tmp_path / "r"), "resnet8", {}, 10, variables, c,
                  quant.observed_ranges(observers), {}, input_shape=(8, 8, 3))
    predict, manifest = export.load(str(tmp_path / "r"))
    assert {t["collection"] for t in manifest["float_tensors"]} == {"params", "batch_stats"}
    assert len(manifest["layers"]) == 10 and len(integer_ops(predict, x)) == 10
    # Eight layers deep, a float rounding difference can move one activation across a
    # rounding boundary in one implementation and not the other: compare loosely.
    logits = np.asarray(predict(x))
    fake = np.asarray(jax.jit(quant.qat_apply(model, **c.kwargs()))(
        {**variables, quant.OBSERVERS: observers}, x))
    assert np.abs(logits - fake).max() < 0.02 * np.abs(fake).max()


class Convs(nn.Module):
    """Conv variants: causal, circular, dilated, strided 2-D, grouped (the conv fallback)."""

    @nn.compact
    def __call__(self, x, *, train=False):
        a = nn.Conv(4, (3,), padding="CAUSAL", kernel_dilation=2, name="causal")(x)
        b = nn.Conv(4, (3,), padding="CIRCULAR", strides=2, name="circular")(x)
        c = nn.Conv(4, (2, 3), padding=((1, 0), (2, 1)), strides=(1, 2), name="conv2d")(
            x[..., None, :].repeat(3, -2))
        d = nn.Conv(4, (3,), feature_group_count=2, padding=((2, 1),), use_bias=False,
                    name="grouped")(nn.relu(a))
        return jnp.concatenate([a.mean(1), b.mean(1), c.mean((1, 2)), d.mean(1)], -1)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_integer_conv_follows_flax_conv_semantics(tmp_path, monkeypatch, nonnegative):
    """Signed inputs, and non-negative ones (the unsigned grid, int8 with zero point -128:
    padding must stand for 0, i.e. be -128) through every padding and the grouped conv."""
    model = Convs()
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 11, 2))
    x = jnp.abs(x) if nonnegative else x
    variables = random_variables(model, x)
    c = config(weight_bits=8, activation_bits=8, keep_first_last_8bit=False)
    observers = quant.init_observers(model, variables, x, **c.kwargs())
    monkeypatch.setitem(models.MODELS, "convs", lambda num_classes: Convs())
    manifest = export.export(str(tmp_path / "c"), "convs", {}, 16, variables, c,
                             quant.observed_ranges(observers), {}, input_shape=(11, 2))
    zero_points = {e["path"]: e["activation"]["zero_point"] for e in manifest["layers"]}
    assert zero_points["grouped"] == -128 and zero_points["causal"] == (-128 if nonnegative
                                                                       else 0)
    predict, _ = export.load(str(tmp_path / "c"))
    fake = jax.jit(quant.qat_apply(model, **c.kwargs()))(
        {**variables, quant.OBSERVERS: observers}, x)
    np.testing.assert_allclose(predict(x), fake, rtol=1e-4, atol=1e-5)
    ops = integer_ops(predict, x)
    assert ("conv_general_dilated", ("int8", "int8"), "int32") in ops  # the grouped conv
    assert all(dtypes == ("int8", "int8") and out == "int32" for _, dtypes, out in ops)


def test_static_calibrated_activation_scales(tmp_path):
    model, variables, x = build("mlp", {"widths": (32,)}, (40,), batch=64)
    ranges = quant.calibrate(model, variables, [x[:32], x[32:]])
    c = config(weight_bits=8, activation_bits=8)
    manifest = export.export(str(tmp_path / "s"), "mlp", {"widths": (32,)}, 10, variables, c,
                             ranges, {}, input_shape=(40,))
    for layer in manifest["layers"]:
        lo, hi = ranges[layer["path"]]
        act = layer["activation"]
        assert act["source"] == "static" and act["unsigned"] == (lo >= 0)
        expected = hi / 255 if lo >= 0 else max(-lo, hi) / 127  # the head reads ReLUs
        assert act["scale"] == pytest.approx(expected, rel=1e-6)
        assert (act["q_min"], act["q_max"], act["zero_point"]) == (
            (-128, 127, -128) if lo >= 0 else (-127, 127, 0))
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


def test_weight_only_quantization_keeps_float_activations(tmp_path):
    """activation_bits=0: integer weights, float activations, what weight-only QAT trains."""
    model, variables, x = build("mlp", {"widths": (32, 32)}, (40,), batch=16)
    c = config(weight_bits=4)
    manifest = export.export(str(tmp_path / "w"), "mlp", {"widths": (32, 32)}, 10, variables,
                             c, {}, {}, input_shape=(40,))
    assert {layer["activation"]["bits"] for layer in manifest["layers"]} == {0}
    assert manifest["quantization"]["activation_bits"] == 0
    predict, _ = export.load(str(tmp_path / "w"))
    fake = jax.jit(quant.qat_apply(model, **c.kwargs()))(variables, x)
    np.testing.assert_allclose(predict(x), fake, rtol=1e-5, atol=1e-6)
    assert all(dtypes == ("float32", "float32") for _, dtypes, _ in integer_ops(predict, x))


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
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                         "codec": "none"}
    # hidden1 and head keep 8 bits (one byte each), hidden2 packs two 4-bit values a byte;
    # dense random weights are stored element by element.
    layers = {layer["path"]: layer for layer in manifest["layers"]}
    assert {p: layer["weight_bits"] for p, layer in layers.items()} == {
        "hidden1": 8, "hidden2": 4, "head": 8}
    assert {layer["kernel"]["enc"] for layer in layers.values()} == {"dense+raw"}
    int_bytes = 40 * 32 + (32 * 32) // 2 + 32 * 10
    assert manifest["files"]["int_weights.bin"]["bytes"] == int_bytes
    # Floats: biases and one scale per output channel; no float copy of any kernel.
    assert manifest["files"]["float_tensors.bin"]["bytes"] == 4 * 2 * (32 + 32 + 10)
    assert {t["path"] for t in manifest["float_tensors"]} == {
        "hidden1/bias", "hidden2/bias", "head/bias"}
    assert manifest["storage"]["encodings"] == {
        "dense+raw": [9, int_bytes + 4 * 2 * (32 + 32 + 10)]}
    offset, nbytes = layers["hidden2"]["kernel"]["val"]
    assert (offset, nbytes) == (1280, 512)
    stored = bitpack.unpack(np.fromfile(d / "int_weights.bin", np.uint8)[offset:offset + nbytes],
                            4, 1024, signed=True).reshape(32, 32)
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
    labels = np.asarray(model.apply(variables, x)).argmax(-1)
    np.testing.assert_array_equal(np.asarray(predict(x)).argmax(-1), labels)


# ----------------------------------------------------------------------------- compact storage


def prune_and_cluster(kernel, sparsity=0.9, k=16):
    """Magnitude pruning to ``sparsity`` zeros, then the rest sorted into ``k`` equal
    groups, each replaced by its mean (Deep Compression's two first stages, in numpy)."""
    w = np.array(kernel, np.float32)
    keep = np.abs(w) > np.quantile(np.abs(w), sparsity)
    kept = w[keep]
    for group in np.array_split(np.argsort(kept), k):
        kept[group] = kept[group].mean()
    w[keep], w[~keep] = kept, 0.0
    return w


def compressed_mlp(seed=0):
    kwargs = {"widths": (64,)}
    model, variables, x = build("mlp", kwargs, (40,), seed=seed)
    params = {name: {**layer, "kernel": prune_and_cluster(layer["kernel"])}
              for name, layer in variables["params"].items()}
    return model, kwargs, {**variables, "params": params}, x


def bin_bytes(manifest):
    return sum(f["bytes"] for f in manifest["files"].values())


@pytest.mark.parametrize("quantized", [False, True])
def test_pruned_and_clustered_mlp_is_stored_compactly(tmp_path, quantized):
    model, kwargs, variables, x = compressed_mlp()
    params = variables["params"]
    assert {p: (np.count_nonzero(v["kernel"]), len(np.unique(v["kernel"])))
            for p, v in params.items()} == {"hidden1": (256, 17), "head": (64, 17)}
    c = config(weight_bits=8) if quantized else None

    def save(name, **kw):
        d = str(tmp_path / name)
        manifest = export.export(d, "mlp", kwargs, 10, variables, c, None, {},
                                 input_shape=(40,), **kw)
        return d, manifest, export.load(d)[0](x)

    dense_dir, dense, dense_logits = save("dense", encodings=["dense+raw"])
    small_dir, small, logits = save("small")
    np.testing.assert_array_equal(logits, dense_logits)
    if not quantized:
        np.testing.assert_allclose(logits, model.apply(variables, x), rtol=1e-6, atol=1e-6)

    # The tensors written, as the formulas size them: each is stored in its cheapest form.
    kernels = {p: quant.quantize_kernel(v["kernel"], bits=8).values if quantized
               else v["kernel"] for p, v in params.items()}
    tensors = [(kernels[p], 8 if quantized else None) for p in kernels]
    tensors += [(v["bias"], None) for v in params.values()]
    if quantized:
        tensors += [(quant.quantize_kernel(v["kernel"], bits=8).scale, None)
                    for v in params.values()]
    formulas = [formula_nbytes(v, bits) for v, bits in tensors]
    saving = sum(f["dense+raw"] - min(f.values()) for f in formulas)
    assert bin_bytes(dense) - bin_bytes(small) == saving
    assert bin_bytes(dense) == sum(f["dense+raw"] for f in formulas)
    entries = ({e["path"]: e["kernel"] for e in small["layers"]} if quantized else
               {t["path"].split("/")[0]: t for t in small["float_tensors"]
                if t["path"].endswith("kernel")})
    for path, kernel in kernels.items():
        f = formula_nbytes(kernel, 8 if quantized else None)
        assert entries[path]["enc"] == min(f, key=f.get), path
    # The manifest grows by the parts' offsets and the storage summary only.
    dense_total, small_total = export.artifact_bytes(dense_dir), export.artifact_bytes(small_dir)
    assert saving - 200 < dense_total - small_total < saving
    assert small["storage"]["weights"] == 40 * 64 + 64 * 10
    assert small["storage"]["nonzero_weights"] == sum(np.count_nonzero(k)
                                                       for k in kernels.values())
    report = export.storage_report(small)
    assert report["tensor_bytes"] == report["file_bytes"] == bin_bytes(small)
    assert sum(e["tensors"] for e in report["encodings"].values()) == len(tensors)
    assert report["density"] == pytest.approx(320 / 3200, abs=0.01)
    assert export.storage_report(dense)["encodings"] == {
        "dense+raw": {"tensors": len(tensors), "bytes": bin_bytes(dense)}}


def test_every_encoding_gives_the_same_logits(tmp_path):
    _, kwargs, variables, x = compressed_mlp()
    c = config(weight_bits=4, keep_first_last_8bit=False, symmetric=False)
    outputs = {}
    for encoding in export.ENCODINGS:
        d = str(tmp_path / encoding)
        manifest = export.export(d, "mlp", kwargs, 10, variables, c, None, {},
                                 input_shape=(40,), encodings=[encoding])
        assert {e["enc"] for e in manifest["float_tensors"]} == {encoding}
        assert {e["kernel"]["enc"] for e in manifest["layers"]} == {encoding}
        assert all(e["zero_point"]["enc"] == encoding for e in manifest["layers"])
        outputs[encoding] = np.asarray(export.load(d)[0](x))
    for encoding, logits in outputs.items():
        np.testing.assert_array_equal(logits, outputs["dense+raw"], err_msg=encoding)


def test_entropy_coding_compresses_only_what_shrinks(tmp_path):
    _, kwargs, variables, x = compressed_mlp()

    def save(name, **kw):
        d = tmp_path / name
        manifest = export.export(str(d), "mlp", kwargs, 10, variables, None, None, {},
                                 input_shape=(40,), **kw)
        return d, manifest

    plain_dir, plain = save("plain", encodings=["dense+raw"])
    coded_dir, coded = save("coded", encodings=["dense+raw"], entropy_coding=True)
    # The float file is mostly zeros: zlib shrinks it; the empty int file stays as it is.
    float_entry = coded["files"]["float_tensors.bin"]
    on_disk = (coded_dir / "float_tensors.bin").read_bytes()
    assert float_entry["codec"] == "zlib"
    assert float_entry["bytes"] == len(on_disk) < plain["files"]["float_tensors.bin"]["bytes"]
    assert float_entry["sha256"] == hashlib.sha256(on_disk).hexdigest()
    assert zlib.decompress(on_disk) == (plain_dir / "float_tensors.bin").read_bytes()
    assert float_entry["raw_bytes"] == plain["files"]["float_tensors.bin"]["bytes"]
    assert coded["files"]["int_weights.bin"] == {**plain["files"]["int_weights.bin"],
                                                 "codec": "none"}
    assert export.artifact_bytes(str(coded_dir)) < export.artifact_bytes(str(plain_dir))
    np.testing.assert_array_equal(export.load(str(coded_dir))[0](x),
                                  export.load(str(plain_dir))[0](x))
    # On sparse storage too it never costs bytes.
    sparse_dir, _ = save("sparse")
    both_dir, both = save("both", entropy_coding=True)
    assert bin_bytes(both) <= bin_bytes(export.read_manifest(str(sparse_dir)))
    np.testing.assert_array_equal(export.load(str(both_dir))[0](x),
                                  export.load(str(sparse_dir))[0](x))

    data = bytearray(on_disk)
    data[len(data) // 2] ^= 0x01
    (coded_dir / "float_tensors.bin").write_bytes(bytes(data))
    with pytest.raises(export.ArtifactError,
                       match="float_tensors.bin does not match manifest.json"):
        export.verify(str(coded_dir))
    with pytest.raises(export.ArtifactError, match="float_tensors.bin"):
        export.load(str(coded_dir), check=False)


def test_other_formats_are_refused(tmp_path):
    _, kwargs, variables, _ = compressed_mlp()
    d = tmp_path / "a"
    export.export(str(d), "mlp", kwargs, 10, variables, None, None, {}, input_shape=(40,))
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["format"] == export.FORMAT == "jaxkd.export/2"
    (d / "manifest.json").write_text(json.dumps({**manifest, "format": "jaxkd.export/1"}))
    with pytest.raises(export.ArtifactError, match="format 'jaxkd.export/1', expected "
                                                   "'jaxkd.export/2'"):
        export.load(str(d))
