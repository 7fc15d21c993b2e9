"""The trainer end to end: it learns, it resumes bit-identically, 8 devices match 1."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxkd import checkpoint, train
from jaxkd.config import hinton_losses, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_run(data_dir, *, model="mlp", steps=30, **model_kwargs):
    c = run_config("mnist1d", model, **model_kwargs)
    c.data.data_dir = str(data_dir)
    c.batch_size = 32
    c.eval_batch_size = 200
    c.num_steps = steps
    c.optimizer.learning_rate = 3e-3
    c.schedule.name = "cosine"
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    return c


def load_weights(workdir):
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    c = small_run(data_dir, model="cnn1d", steps=40)
    train.train_and_evaluate(c, workdir)
    return workdir


def test_digits_model_learns_and_writes_its_outputs(data_dir, tmp_path):
    c = run_config("digits", "mlp", widths=(64,))
    c.data.data_dir = str(data_dir)
    c.batch_size = 64
    c.eval_batch_size = 360
    c.num_steps = 300
    c.log_every_steps = 100
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 1000
    summary = train.train_and_evaluate(c, str(tmp_path))
    # Chance is 10 %; a 64-unit MLP gets well above 90 % on the 360 held-out digits.
    assert summary["accuracy"] > 0.9
    assert summary["eval"]["accuracy"] == summary["accuracy"]
    n_params = 64 * 64 + 64 + 64 * 10 + 10
    assert summary["num_params"] == n_params
    # The weights file holds float32 params: at least 4 bytes each, plus a small npz header.
    assert 4 * n_params < summary["params_bytes"] < 4 * n_params + 4096
    assert summary["train_steps_per_sec"] > 0
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert on_disk["config"]["model"]["kwargs"]["widths"] == [64]
    lines = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in lines if "train/loss" in x] == [100, 200, 300]
    assert lines[0]["train/loss"] > lines[-2]["train/loss"]  # the loss went down
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    assert checkpoint.latest_step(str(tmp_path)) == 300


def test_resumed_run_is_bit_identical(data_dir, teacher_dir, tmp_path):
    """Distillation with dropout: stop at step 20 of 30, resume, compare every bit."""
    c = small_run(data_dir, widths=(32, 32), dropout_rate=0.3)
    c.data.transfer_split = "unlabelled"
    c.data.augment = "jitter"
    c.distill.teacher.workdir = teacher_dir
    c.distill.losses = hinton_losses(alpha=0.7, temperature=3.0)
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.train_and_evaluate(c, straight)
    train.train_and_evaluate(c, resumed)
    # Lose the last checkpoint and the outputs, as if killed after step 20.
    shutil.rmtree(os.path.join(resumed, checkpoint.CHECKPOINT_DIR, "30"))
    os.remove(os.path.join(resumed, checkpoint.WEIGHTS_FILE))
    summary = train.train_and_evaluate(c, resumed)
    assert summary["resumed_from_step"] == 20
    a, b = load_weights(straight), load_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # And the distilled student really moved away from its initialisation.
    assert summary["teacher"]["eval"]["accuracy"] > 0.2


def test_same_config_same_result_and_seed_matters(data_dir, tmp_path):
    c = small_run(data_dir, steps=10)
    a = load_weights_after(c, tmp_path / "a")
    b = load_weights_after(c, tmp_path / "b")
    c.seed = 1
    d = load_weights_after(c, tmp_path / "d")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert any(not np.array_equal(a[k], d[k]) for k in a)


def load_weights_after(c, workdir):
    train.train_and_evaluate(c, str(workdir))
    return load_weights(str(workdir))


EIGHT_DEVICE_SCRIPT = r"""
import sys
import flax.linen as nn
import jax
import numpy as np
sys.path.insert(0, {root!r})
from tests.multidevice import three_steps
params = three_steps({data_dir!r}, {teacher_dir!r})
np.savez({out!r}, **params)
print(jax.device_count())
"""


def test_eight_devices_match_one(data_dir, teacher_dir, tmp_path):
    from tests.multidevice import three_steps

    one = three_steps(str(data_dir), teacher_dir)
    assert jax.device_count() == 1
    out = str(tmp_path / "eight.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    script = EIGHT_DEVICE_SCRIPT.format(root=ROOT, data_dir=str(data_dir),
                                        teacher_dir=teacher_dir, out=out)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "8"
    with np.load(out) as eight:
        assert set(eight.files) == set(one)
        for k in one:
            np.testing.assert_allclose(eight[k], one[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_student_streams_precomputed_topk_logits(data_dir, teacher_dir, tmp_path):
    from jaxkd import teacher_logits

    c = small_run(data_dir, widths=(32,), steps=20)
    c.data.transfer_split = "unlabelled"
    logits_dir = str(tmp_path / "logits")
    teacher_logits.write(teacher_dir, c.data, logits_dir, top_k=3, temperature=2.0)
    c.distill.teacher_logits = logits_dir
    c.distill.losses = {
        "kd": {"name": "topk_soft_target_kl", "weight": 0.9, "kwargs": {"temperature": 3.0}},
        "ce": {"name": "cross_entropy", "weight": 0.1}}
    # The residual mass was stored at T = 2: another temperature is refused.
    with pytest.raises(ValueError, match="stored at temperature 2.0, the term distils at 3.0"):
        train.train_and_evaluate(c, str(tmp_path / "other_t"))
    c.distill.losses.kd.kwargs.temperature = 2.0
    summary = train.train_and_evaluate(c, str(tmp_path / "student"))
    assert summary["num_steps"] == 20 and "teacher" not in summary
    lines = [json.loads(x) for x in open(tmp_path / "student" / "metrics.jsonl")]
    assert all(np.isfinite(x["train/loss_kd"]) and x["train/loss_kd"] > 0
               for x in lines if "train/loss_kd" in x)
    # A full-logit loss cannot use top-3 logits; augmenting is refused unless allowed.
    c.distill.losses = hinton_losses(alpha=0.9, temperature=2.0)
    with pytest.raises(ValueError, match="needs all 10 teacher logits but .* stores the top 3"):
        train.train_and_evaluate(c, str(tmp_path / "full"))
    c.distill.losses = {"kd": {"name": "topk_soft_target_kl", "kwargs": {"temperature": 2.0}}}
    c.data.augment = "jitter"
    with pytest.raises(ValueError, match="allow_augment_with_precomputed"):
        train.train_and_evaluate(c, str(tmp_path / "augmented"))


def test_qat_with_distillation_exports_an_integer_artifact(data_dir, teacher_dir, tmp_path):
    from jaxkd import export

    c = small_run(data_dir, widths=(32, 32), steps=40)
    c.quantization.enabled = True
    c.quantization.weight_bits = 4
    c.quantization.activation_bits = 8
    c.distill.teacher.workdir = teacher_dir
    c.distill.losses = hinton_losses(alpha=0.5, temperature=2.0)
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["method"] == "qat-w4/8a8+kd"  # the first and last layers keep 8 bits
    artifact = os.path.join(tmp_path, "artifact")
    export.verify(artifact)
    assert summary["accuracy"] == summary["artifact_eval"]["accuracy"]
    assert summary["artifact_bytes"] == export.artifact_bytes(artifact)
    # 4-bit hidden layer, 8-bit first and last layers: far smaller than the float weights.
    assert summary["artifact_bytes"] < 0.5 * summary["params_bytes"]
    # The QAT eval forward (frozen ranges) and the loaded integer artifact are one model:
    # they may differ only where float rounding tips an argmax (at most 2 of 1000 here).
    assert abs(summary["accuracy"] - summary["eval"]["accuracy"]) <= 0.002
    with pytest.raises(ValueError, match="config.quantization.weight_bits"):
        c.quantization.weight_bits = 3
        train.train_and_evaluate(c, str(tmp_path / "bad"))


def test_gradual_pruning_with_distillation_keeps_pruned_weights_at_zero(data_dir, teacher_dir,
                                                                        tmp_path):
    c = small_run(data_dir, widths=(32, 32), steps=80)
    c.optimizer.learning_rate = 1e-2
    c.pruning.enabled = True
    c.pruning.method = "taylor"
    c.pruning.sparsity = 0.75
    c.pruning.begin_step, c.pruning.end_step, c.pruning.frequency = 0, 20, 5
    c.distill.teacher.workdir = teacher_dir
    c.distill.losses = hinton_losses(alpha=0.5, temperature=2.0)
    summary = train.train_and_evaluate(c, str(tmp_path))
    # hidden2 is pruned to 75 %; the first layer and the head stay dense (keep_first_last).
    w = load_weights(str(tmp_path))
    hidden2 = w["params/hidden2/kernel"]
    assert (hidden2 == 0).sum() == round(0.75 * hidden2.size)
    assert (w["params/hidden1/kernel"] != 0).all() and (w["params/head/kernel"] != 0).all()
    assert summary["sparsity"]["hidden2"] == pytest.approx(0.75)
    assert summary["accuracy"] > 0.2  # chance is 0.1
    with pytest.raises(ValueError, match="config.pruning.sparsity"):
        c.pruning.sparsity = 1.0
        train.train_and_evaluate(c, str(tmp_path / "bad"))


def test_clustering_needs_trained_weights_and_keeps_k_values_with_reassignment(
        data_dir, teacher_dir, tmp_path):
    c = small_run(data_dir, widths=(32, 32), steps=100)
    c.clustering.update(enabled=True, num_clusters=8, reassign_every=10)
    with pytest.raises(ValueError, match="on a random initialisation would train only 8 values"):
        train.train_and_evaluate(c, str(tmp_path / "random"))
    dense = small_run(data_dir, widths=(32, 32), steps=200)
    dense.optimizer.learning_rate = 1e-2
    dense_summary = train.train_and_evaluate(dense, str(tmp_path / "dense"))
    c.init.method, c.init.teacher_workdir = "copy", str(tmp_path / "dense")
    c.pruning.update(enabled=True, schedule="one_shot", sparsity=0.5)
    with pytest.raises(ValueError, match="prune first, then cluster the pruned model"):
        train.train_and_evaluate(c, str(tmp_path / "both"))
    c.pruning.enabled = False
    summary = train.train_and_evaluate(c, str(tmp_path / "clustered"))
    w = load_weights(str(tmp_path / "clustered"))
    for layer in ("hidden1", "hidden2", "head"):  # re-assignment every 10 steps kept them
        assert len(np.unique(w[f"params/{layer}/kernel"])) <= 8, layer
    assert summary["unique_values"]["hidden2"] <= 8
    # From trained weights 8 shared values per layer lose little (chance is 10 %).
    assert summary["accuracy"] > dense_summary["accuracy"] - 0.1


class TinyNet(nn.Module):
    """A model written outside jaxkd, following the documented contract."""

    num_classes: int
    width: int = 24

    @nn.compact
    def __call__(self, x, *, train=False, return_features=False):
        h = nn.relu(nn.Dense(self.width, name="body")(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(self.num_classes, name="head")(h)
        return (logits, {"embedding": h}) if return_features else logits


def test_a_registered_user_model_trains_exports_and_reloads(data_dir, teacher_dir, tmp_path):
    from jaxkd import export, models

    models.register("test_tiny_net", TinyNet, replace=True)
    c = small_run(data_dir, model="test_tiny_net", steps=150, width=24)
    c.optimizer.learning_rate = 1e-2
    c.distill.teacher.workdir = teacher_dir
    c.distill.losses = hinton_losses(alpha=0.5, temperature=2.0)
    c.quantization.update(enabled=True, weight_bits=8, activation_bits=8)
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["model"] == "test_tiny_net" and summary["num_params"] == 40 * 24 + 24 + 250
    assert summary["accuracy"] > 0.2  # chance is 0.1
    predict, manifest = export.load(str(tmp_path / "artifact"))
    assert manifest["model"]["name"] == "test_tiny_net"
    assert [entry["path"] for entry in manifest["layers"]] == ["body", "head"]  # int8 layers
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    assert np.asarray(predict(x)).shape == (5, 10)
    with pytest.raises(ValueError, match="already registered"):
        models.register("test_tiny_net", lambda num_classes: TinyNet(num_classes))
