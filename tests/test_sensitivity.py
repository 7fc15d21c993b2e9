"""jaxkd.sensitivity: one layer at a time quantized, checked against a numpy forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import models, sensitivity


def np_mlp(p, x, quantized=None, bits=8):
    h = x
    for name in ("hidden1", "head"):
        w = p[name]["kernel"]
        if name == quantized:
            q_max = 2 ** (bits - 1) - 1
            s = np.abs(w).max(0, keepdims=True) / q_max
            w = np.clip(np.round(w / s), -q_max, q_max) * s
        h = h @ w + p[name]["bias"]
        if name != "head":
            h = np.maximum(h, 0)
    return h


def test_sweep_matches_numpy_and_writes_table_and_plot(tmp_path):
    model = models.get_model("mlp", num_classes=10, widths=(32,))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 40)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    p = jax.tree.map(np.asarray, variables["params"])
    labels = np_mlp(p, x).argmax(-1)  # the float model is exactly right
    mask = np.r_[np.ones(80), np.zeros(16)].astype(np.float32)
    batches = [{"image": jnp.asarray(x[i:i + 48]), "label": jnp.asarray(labels[i:i + 48]),
                "mask": jnp.asarray(mask[i:i + 48])} for i in (0, 48)]
    result = sensitivity.sweep(model, variables, batches, bits=(8, 2))
    assert result["float_accuracy"] == 1.0
    assert [(r["layer"], r["bits"]) for r in result["rows"]] == [
        ("hidden1", 8), ("hidden1", 2), ("head", 8), ("head", 2)]
    for r in result["rows"]:
        pred = np_mlp(p, x, r["layer"], r["bits"]).argmax(-1)
        expected = ((pred == labels) * mask).sum() / mask.sum()
        assert r["accuracy"] == pytest.approx(expected)
        assert r["drop"] == pytest.approx(1.0 - expected)
    drops = {(r["layer"], r["bits"]): r["drop"] for r in result["rows"]}
    assert drops[("hidden1", 2)] > drops[("hidden1", 8)]

    md, png = sensitivity.write(result, str(tmp_path))
    text = open(md).read()
    assert "| layer | int8 | int2 |" in text
    assert f"| head | {100 * drops[('head', 8)]:+.2f} | {100 * drops[('head', 2)]:+.2f} |" in text
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no layer fc9; layers: hidden1, head"):
        sensitivity.sweep(model, variables, batches, layers=["fc9"])
    with pytest.raises(ValueError, match="weight_bits=3"):
        sensitivity.sweep(model, variables, batches, bits=(3,))
