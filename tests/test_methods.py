"""jaxkd.methods: a compression method is a plug-in; the trainer calls its hooks in order.

A method written here, outside jaxkd, plugs into the unchanged trainer with one registry
line: it freezes the classifier (an optimizer hook) and names the run (the label hook).
"""

import os

import numpy as np
import optax
import pytest

from jaxkd import checkpoint, methods, train
from jaxkd.config import parse_run, run_config


class FreezeHead(methods.Method):
    """Trains everything but the ``head`` (its updates are zeroed)."""

    @classmethod
    def enabled(cls, run):
        return True

    def label(self):
        return "frozen-head"

    def optimizer(self, tx, ctx):
        def is_head(tree):
            return {"model": {k: k == "head" for k in tree["model"]},
                    "adapters": {k: False for k in tree["adapters"]}}

        return optax.chain(tx, optax.masked(optax.set_to_zero(), is_head))


def small(data_dir, steps):
    c = run_config("mnist1d", "mlp", widths=(16,))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 500, steps
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
    return c


def weights(workdir):
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_a_method_defined_outside_jaxkd_plugs_into_the_trainer(data_dir, tmp_path, monkeypatch):
    source = str(tmp_path / "source")
    train.train_and_evaluate(small(data_dir, 30), source)
    monkeypatch.setattr(methods, "METHODS", (*methods.METHODS, FreezeHead))
    c = small(data_dir, 20)
    c.init.method, c.init.teacher_workdir = "copy", source
    c.pruning.update(enabled=True, sparsity=0.5, schedule="one_shot", keep_first_last=False)
    summary = train.train_and_evaluate(c, str(tmp_path / "frozen"))
    assert summary["method"] == "magnitude-50%>frozen-head"  # in registry order
    before, after = weights(source), weights(str(tmp_path / "frozen"))
    np.testing.assert_array_equal(after["params/head/bias"], before["params/head/bias"])
    kernel = after["params/head/kernel"]
    # The head's only changes are pruning's zeros (masked: outside the frozen updates).
    np.testing.assert_array_equal(kernel[kernel != 0], before["params/head/kernel"][kernel != 0])
    assert (kernel == 0).mean() == pytest.approx(0.5)
    assert not np.array_equal(after["params/hidden1/bias"], before["params/hidden1/bias"])


def test_labels_follow_the_registry_order():
    c = run_config("mnist1d", "mlp", widths=(8, 8), tie_hidden=True)
    c.quantization.update(enabled=True, weight_bits=4, activation_bits=8)
    c.init.method = "copy"  # clustering starts from trained weights
    c.clustering.update(enabled=True, num_clusters=8)
    c.pruning.update(enabled=True, pattern="n:m", schedule="one_shot", from_zeros=True)
    label = methods.label(methods.enabled(parse_run(c)), distilled=True)
    assert label == "magnitude-2:4>cluster8>tied>qat-w4a8+kd"
    assert methods.label([], distilled=False) == "fp32"
