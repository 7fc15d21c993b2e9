"""jaxkd.export.stablehlo: one serialized module, run where jaxkd cannot be imported, at two
batch sizes, gives the loaded artifact's logits and keeps its int8 x int8 -> int32 ops."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxkd import export, quant
from jaxkd.export import stablehlo
from jaxkd.schema import FieldError, MissingError
from tests.test_export import build, config, integer_ops

# name: (model, kwargs, one example's shape, quantization fields or None for float32)
CASES = {
    "mlp-w8a8": ("mlp", {"widths": (32, 32)}, (40,), {"weight_bits": 8, "activation_bits": 8}),
    "cnn1d-w4a4-lsq": ("cnn1d", {}, (40,), {"weight_bits": 4, "activation_bits": 4,
                                             "method": "lsq"}),
    "lenet5-fp32": ("lenet5", {}, (8, 8, 1), None),
    "resnet8-w8a8": ("resnet8", {}, (8, 8, 3), {"weight_bits": 8, "activation_bits": 8}),
}
BATCHES = (1, 37)

# Run by `python -I -c`: the module must need jax only. An editable install of jaxkd is on
# sys.path even in isolated mode, so a meta-path finder refuses it by name.
WITHOUT_JAXKD = r"""
import sys

class HideJaxkd:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "jaxkd":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)")
        return None

sys.meta_path.insert(0, HideJaxkd())
try:
    import jaxkd
except ModuleNotFoundError:
    print("jaxkd is not importable")
else:
    sys.exit(f"jaxkd is importable from {jaxkd.__file__}")

import jax
import numpy as np

for module, inputs, outputs in zip(*[iter(sys.argv[1:])] * 3):
    with open(module, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    np.save(outputs, np.asarray(exported.call(np.load(inputs))))
assert not [m for m in sys.modules if m.partition(".")[0] == "jaxkd"]
"""

# An int8 x int8 -> int32 dot or convolution in the module text (written out here, not
# stablehlo's parser).
INT8_OP = re.compile(r"stablehlo\.(?:dot_general|convolution)[^\n]*: "
                     r"\(tensor<[^>]*xi8>, tensor<[^>]*xi8>\) -> tensor<[^>]*xi32>")


def make_artifact(directory, name, kwargs, shape, fields):
    model, variables, x = build(name, kwargs, shape, batch=8)
    c = None
    ranges = None
    if fields is not None:
        c = config(**fields)
        if c.method == "lsq":
            variables = {**variables,
                         "params": quant.init_qat_params(model, variables, x, **c.kwargs())}
        ranges = quant.observed_ranges(quant.init_observers(model, variables, x, **c.kwargs()))
    export.export(directory, name, kwargs, 10, variables, c, ranges, {}, input_shape=shape)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per case: the artifact, ``export_stablehlo``'s metadata, the inputs at each batch
    size and the logits that the deserialized module gave in a process without jaxkd."""
    root = tmp_path_factory.mktemp("stablehlo")
    cases, argv = {}, []
    for case, (name, kwargs, shape, fields) in CASES.items():
        directory = str(root / case)
        make_artifact(directory, name, kwargs, shape, fields)
        meta = stablehlo.export_stablehlo(directory, str(root / f"{case}.stablehlo"))
        rng = np.random.default_rng(len(case))
        inputs = {b: rng.normal(size=(b, *shape)).astype(np.float32) for b in BATCHES}
        for b, x in inputs.items():
            np.save(root / f"{case}-{b}.npy", x)
            argv += [meta["path"], str(root / f"{case}-{b}.npy"), str(root / f"{case}-{b}.out.npy")]
        cases[case] = (directory, meta, inputs)
    result = subprocess.run([sys.executable, "-I", "-c", WITHOUT_JAXKD, *argv],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "jaxkd is not importable" in result.stdout
    return {case: (directory, meta, inputs,
                   {b: np.load(root / f"{case}-{b}.out.npy") for b in BATCHES})
            for case, (directory, meta, inputs) in cases.items()}


@pytest.mark.parametrize("case", CASES)
def test_module_runs_without_jaxkd_at_any_batch_size(exported, case):
    name, _, shape, fields = CASES[case]
    directory, meta, inputs, outputs = exported[case]
    assert meta["input_shape"] == ["b", *shape] and meta["output_shape"] == ["b", 10]
    assert meta["input_dtype"] == meta["output_dtype"] == "float32"
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert meta["bytes"] == os.path.getsize(meta["path"])
    predict, manifest = export.load(directory)
    for b, x in inputs.items():
        assert outputs[b].shape == (b, 10) and outputs[b].dtype == np.float32
        np.testing.assert_allclose(outputs[b], predict(x), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{case}, batch {b}")

    # The integer path survives: every quantized layer's matmul is int8 x int8 -> int32 in
    # the serialized module (once, or once per platform's lowering), and none is float.
    with open(meta["path"], "rb") as f:
        text = jax.export.deserialize(bytearray(f.read())).mlir_module()
    layers = len(manifest["layers"])
    assert meta["integer_ops"] == len(INT8_OP.findall(text))
    assert "tensor<?x" in text  # the batch dimension is symbolic
    if fields is None:
        assert layers == meta["integer_ops"] == 0 and "xi8>" not in text
        assert meta["float_ops"] >= 5  # lenet5: 2 convolutions, 3 dense
    else:
        assert meta["integer_layers"] == layers > 0
        assert meta["integer_ops"] in (layers, layers * len(meta["platforms"]))
        assert meta["float_ops"] == 0


def test_integer_ops_of_one_platform_match_the_jaxpr(exported, tmp_path):
    """Lowered for one platform, each int8 dot of the loaded model's jaxpr is one op."""
    directory, _, inputs, _ = exported["cnn1d-w4a4-lsq"]
    meta = stablehlo.export_stablehlo(directory, str(tmp_path / "cpu.stablehlo"),
                                      platforms=["cpu"])
    predict, _ = export.load(directory)
    ops = integer_ops(predict, inputs[1])
    assert meta["platforms"] == ["cpu"]
    assert meta["integer_ops"] == ops.count(("dot_general", ("int8", "int8"), "int32")) == 4
    assert meta["float_ops"] == 0


def test_bad_arguments_are_named_and_nothing_is_half_written(exported, tmp_path):
    directory = exported["mlp-w8a8"][0]
    out = str(tmp_path / "model.stablehlo")
    with pytest.raises(FieldError, match=r"platforms=\['gpu'\]: each must be one of cpu, "):
        stablehlo.export_stablehlo(directory, out, platforms=["gpu"])
    with pytest.raises(MissingError, match="out_path=.*nowhere.* does not exist"):
        stablehlo.export_stablehlo(directory, str(tmp_path / "nowhere" / "model.stablehlo"))
    with pytest.raises(MissingError, match="manifest.json is missing"):
        stablehlo.export_stablehlo(str(tmp_path / "no-artifact"), out)
    assert os.listdir(tmp_path) == []
    stablehlo.export_stablehlo(directory, out, platforms=["cpu"])
    assert os.listdir(tmp_path) == ["model.stablehlo"]  # no temporary left behind


def test_bert_takes_ids_and_mask_with_symbolic_batch_and_length(tmp_path):
    from tests.test_onnx import BERT, W8A8, make_bert_artifact

    ids, mask = make_bert_artifact(tmp_path / "a", BERT, W8A8, False)
    meta = stablehlo.export_stablehlo(str(tmp_path / "a"), str(tmp_path / "m.stablehlo"))
    assert meta["inputs"] == 2 and meta["input_shape"] == ["b", "l"]
    assert meta["input_dtype"] == "int32" and meta["output_shape"] == ["b", 5]
    assert meta["integer_layers"] == 13 and meta["integer_ops"] >= 13
    with open(tmp_path / "m.stablehlo", "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    predict = export.load(str(tmp_path / "a"))[0]
    for b, length in ((37, 24), (3, 7)):
        x = (ids[:b, :length], mask[:b, :length])
        np.testing.assert_array_equal(np.asarray(exported.call(*x)), np.asarray(predict(*x)))
