"""Resume = never stopped, for every training mode: a run stopped at step 20 of 30 and
resumed from its checkpoint ends with the same bits as one that ran straight through
(QAT min/max and LSQ with their state, gradual pruning, clustering with re-assignment,
precomputed logits, merging at start; plain and KD runs are in test_train.py)."""

import os
import shutil

import numpy as np
import pytest

from jaxkd import checkpoint, teacher_logits, train
from jaxkd.config import hinton_losses, run_config


def small_run(data_dir, steps=30, **model_kwargs):
    c = run_config("mnist1d", "mlp", **(model_kwargs or {"widths": (32, 32)}))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 500, steps
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 5, 1000, 10
    return c


@pytest.fixture(scope="module")
def dense(data_dir, tmp_path_factory):
    """A trained MLP, the teacher and the weights that copied inits start from."""
    workdir = str(tmp_path_factory.mktemp("dense"))
    c = small_run(data_dir, steps=60)
    c.optimizer.learning_rate = 1e-2
    train.train_and_evaluate(c, workdir)
    return workdir


def qat(c, dense, method):
    c.quantization.update(enabled=True, weight_bits=4, activation_bits=4, method=method)
    return c


def gradual_fisher(c, dense):
    c.pruning.update(enabled=True, method="fisher", sparsity=0.75, frequency=5, end_step=25,
                     fisher_examples=8)
    return c


def reassigning_clusters(c, dense):
    c.init.method, c.init.teacher_workdir = "copy", dense
    c.clustering.update(enabled=True, num_clusters=8, reassign_every=7)
    return c


def merged_at_start(c, dense):
    c.init.method, c.init.teacher_workdir = "copy", dense
    c.merging.update(enabled=True, metric="cosine", threshold=0.2, at="start")
    return c


def precomputed(c, dense):
    c.data.transfer_split = "unlabelled"
    out = os.path.join(os.path.dirname(dense), "top3")
    if not os.path.exists(out):
        teacher_logits.write(dense, c.data, out, top_k=3, temperature=2.0)
    c.distill.teacher_logits = out
    c.distill.losses = {"kd": {"name": "topk_soft_target_kl", "weight": 0.9,
                               "kwargs": {"temperature": 2.0}},
                        "ce": {"name": "cross_entropy", "weight": 0.1}}
    return c


def qat_kd_dropout(c, dense):
    c = qat(c, dense, "minmax")
    c.model.kwargs.dropout_rate = 0.2
    c.distill.teacher.workdir = dense
    c.distill.losses = hinton_losses(alpha=0.5, temperature=2.0)
    return c


MODES = {"qat_minmax": lambda c, d: qat(c, d, "minmax"), "qat_lsq": lambda c, d: qat(c, d, "lsq"),
         "qat_kd_dropout": qat_kd_dropout, "gradual_fisher": gradual_fisher,
         "reassigning_clusters": reassigning_clusters, "merged_at_start": merged_at_start,
         "precomputed_top3": precomputed}


def weights(workdir):
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_resumed_run_is_bit_identical(data_dir, dense, tmp_path, mode):
    c = MODES[mode](small_run(data_dir), dense)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(c, straight)
    train.train_and_evaluate(c, resumed)
    # Lose the last checkpoint and the outputs, as if killed after step 20.
    shutil.rmtree(os.path.join(resumed, checkpoint.CHECKPOINT_DIR, "30"))
    os.remove(os.path.join(resumed, checkpoint.WEIGHTS_FILE))
    summary = train.train_and_evaluate(c, resumed)
    assert summary["resumed_from_step"] == 20
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    if mode.startswith("qat"):  # the observers are part of what must resume
        assert any(k.startswith("quant_ranges/") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
