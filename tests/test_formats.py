"""Every run's model in the other formats, beside its artifact: written, checked, refused."""

import json
import os

import numpy as np
import onnxruntime
import pytest

from jaxkd import export, train
from jaxkd.config import run_config
from jaxkd.schema import ConfigError


def small(data_dir, model="mlp", **kwargs):
    c = run_config("mnist1d", model, **kwargs)
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 500, 30
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 30
    return c


def test_a_quantized_run_writes_every_format_and_onnx_agrees_on_the_eval_split(data_dir,
                                                                              tmp_path):
    c = small(data_dir, "cnn1d")
    c.quantization.update(enabled=True, weight_bits=8, activation_bits=8)
    summary = train.train_and_evaluate(c, str(tmp_path))
    index = json.load(open(tmp_path / "formats" / "formats.json"))
    assert set(index["formats"]) == {"stablehlo", "onnx", "safetensors"}
    assert summary["formats"] == index["formats"]
    from jaxkd.export.lineage import manifest_sha256

    assert index["artifact_manifest_sha256"] == manifest_sha256(str(tmp_path / "artifact"))
    for entry in index["formats"].values():
        path = tmp_path / "formats" / entry["file"]
        assert os.path.getsize(path) == entry["bytes"]
    check = index["formats"]["onnx"]["check"]
    assert check["examples"] == 1000 and check["argmax_agreement"] >= 0.999
    # ONNX Runtime's accuracy on the test split is the artifact's (argmaxes agree).
    from jaxkd.data import pipeline

    batches = list(pipeline.eval_batches(c.data, split="test", batch_size=500))
    x = np.concatenate([b["image"] for b in batches])
    y = np.concatenate([b["label"] for b in batches])
    session = onnxruntime.InferenceSession(str(tmp_path / "formats" / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": x})[0]
    assert abs(float(np.mean(logits.argmax(1) == y)) - summary["accuracy"]) <= 0.001
    # ... and its graph is the integer one.
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "formats" / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "ConvInteger", "MatMulInteger"} <= ops and "Conv" not in ops
    assert export.verify(str(tmp_path / "artifact"))  # the artifact itself is untouched


def test_formats_asked_for_must_work_and_none_writes_none(data_dir, tmp_path):
    from jaxkd.export import formats

    class NotInTheZoo:
        pass

    with pytest.raises(ConfigError, match=r"config.export.formats: onnx cannot express model "
                                          r"NotInTheZoo; its zoo: mlp"):
        formats.check(("onnx",), NotInTheZoo())
    formats.check(("stablehlo", "safetensors"), NotInTheZoo())  # these take any model
    c = small(data_dir)
    c.export.formats = ("none", "onnx")
    with pytest.raises(ConfigError, match=r"config.export.formats=\['none', 'onnx'\]: 'none' "
                                          "goes alone"):
        train.train_and_evaluate(c, str(tmp_path / "bad"))
    c.export.formats = ("none",)
    summary = train.train_and_evaluate(c, str(tmp_path / "none"))
    assert summary["formats"] == {} and not os.path.exists(tmp_path / "none" / "formats")
    c.export.formats = ("safetensors",)
    summary = train.train_and_evaluate(c, str(tmp_path / "one"))
    assert set(summary["formats"]) == {"safetensors"}
