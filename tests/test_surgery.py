"""jaxkd.surgery: the one place that removes units, checked against a numpy forward pass."""

import numpy as np
import pytest

from jaxkd import models, surgery


def mlp_params(rng, widths=(6, 5), inputs=4, classes=3):
    sizes = (inputs, *widths)
    params = {f"hidden{i + 1}": {"kernel": rng.normal(size=(a, b)), "bias": rng.normal(size=b)}
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))}
    params["head"] = {"kernel": rng.normal(size=(widths[-1], classes)),
                      "bias": rng.normal(size=classes)}
    return params


def forward(params, x, dead=None):
    """The MLP in numpy; ``dead[layer]`` are units whose output is forced to 0."""
    h = x
    for i in range(1, len(params)):
        layer = params[f"hidden{i}"]
        h = np.maximum(h @ layer["kernel"] + layer["bias"], 0.0)
        if dead and f"hidden{i}" in dead:
            h[:, dead[f"hidden{i}"]] = 0.0
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def test_successors_know_the_zoo_chains_and_nothing_else():
    rng = np.random.default_rng(0)
    assert surgery.successors(mlp_params(rng)) == {"hidden1": "hidden2", "hidden2": "head"}
    cnn = {"conv1": {"kernel": np.zeros((5, 1, 4))}, "conv2": {"kernel": np.zeros((3, 4, 6))},
           "head": {"kernel": np.zeros((5 * 6, 10))}}
    assert surgery.successors(cnn) == {"conv1": "conv2", "conv2": "head"}
    assert surgery.successors({"stem": {"kernel": np.zeros((3, 3))},
                               "head": {"kernel": np.zeros((3, 2))}}) == {}
    broken = mlp_params(rng)
    broken["head"]["kernel"] = np.zeros((7, 3))  # does not read hidden2's 5 outputs
    assert surgery.successors(broken) == {}


def test_input_rows_of_a_position_major_flatten():
    np.testing.assert_array_equal(surgery.input_rows(np.array([0, 2]), 3, 3), [0, 2])
    np.testing.assert_array_equal(surgery.input_rows(np.array([0, 2]), 3, 9),
                                  [0, 2, 3, 5, 6, 8])


def test_keep_units_computes_the_model_without_the_removed_units():
    rng = np.random.default_rng(1)
    params = mlp_params(rng)
    x = rng.normal(size=(7, 4))
    kept = np.array([0, 2, 3, 5])
    small = surgery.keep_units(params, "hidden1", kept, "hidden2")
    assert small["hidden1"]["kernel"].shape == (4, 4) and small["hidden2"]["kernel"].shape == (4, 5)
    np.testing.assert_allclose(forward(small, x), forward(params, x, {"hidden1": [1, 4]}))
    model = models.get_model("mlp", num_classes=3, widths=(4, 5))
    np.testing.assert_allclose(model.apply({"params": small}, x.astype(np.float32)),
                               forward(small, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kept_in, kept_out", [(None, [1, 2]), ([0, 3], None), ([1], [0, 2])])
def test_slice_variables_takes_inputs_and_outputs_of_every_leaf(kept_in, kept_out):
    rng = np.random.default_rng(2)
    flat = {("params", "conv", "kernel"): rng.normal(size=(3, 4, 3)),
            ("params", "conv", "bias"): rng.normal(size=3),
            ("batch_stats", "conv", "mean"): rng.normal(size=3),
            ("params", "other", "kernel"): rng.normal(size=(2, 2))}
    plan = {("conv",): (None if kept_in is None else np.array(kept_in),
                        None if kept_out is None else np.array(kept_out))}
    out = surgery.slice_variables(flat, plan)
    k = flat[("params", "conv", "kernel")]
    if kept_in is not None:
        k = k[:, kept_in, :]
    if kept_out is not None:
        k = k[..., kept_out]
    np.testing.assert_array_equal(out[("params", "conv", "kernel")], k)
    cols = slice(None) if kept_out is None else kept_out
    np.testing.assert_array_equal(out[("batch_stats", "conv", "mean")],
                                  flat[("batch_stats", "conv", "mean")][cols])
    np.testing.assert_array_equal(out[("params", "other", "kernel")],
                                  flat[("params", "other", "kernel")])
