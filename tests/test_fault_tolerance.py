"""Preemption, kill -9, corrupt checkpoints, non-finite steps and a guarded workdir."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxkd import checkpoint, models, objective, train
from jaxkd.config import run_config, supervised_losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run long enough to be killed while it trains: 1500 steps, a checkpoint every 50.
LAUNCH = [sys.executable, os.path.join(ROOT, "launch.py"),
          "--config=" + os.path.join(ROOT, "configs/mnist1d_teacher.py:model=mlp,smoke"),
          "--config.num_steps=1500", "--config.batch_size=32",
          "--config.checkpoint_every_steps=50", "--config.log_every_steps=50",
          "--config.eval_every_steps=100000", "--config.max_to_keep=2"]


def weights(workdir):
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    subprocess.run(LAUNCH + [f"--workdir={workdir}"], check=True, capture_output=True,
                   timeout=600)
    return workdir


def wait_for_checkpoint(proc, workdir, timeout=300):
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    for _ in range(int(timeout / 0.05)):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        if os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory)):
            return
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


def test_kill_9_at_random_moments_then_resume_is_bit_identical(straight, tmp_path):
    workdir = str(tmp_path)
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(LAUNCH + [f"--workdir={workdir}"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if checkpoint.latest_step(workdir) is None:
            wait_for_checkpoint(proc, workdir)
        time.sleep(rng.uniform(0.0, 1.5))  # mid-step, mid-write or mid-compile
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2
    done = subprocess.run(LAUNCH + [f"--workdir={workdir}"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_weights(straight, workdir)


def test_sigterm_checkpoints_the_current_step_and_relaunch_continues(straight, tmp_path):
    workdir = str(tmp_path)
    proc = subprocess.Popen(LAUNCH + [f"--workdir={workdir}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(proc, workdir)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    line = [x for x in stderr.splitlines() if "stopped by SIGTERM after step" in x]
    assert line, stderr[-2000:]
    stopped_at = int(line[0].split("after step ")[1].split(";")[0])
    assert checkpoint.latest_step(workdir) == stopped_at < 1500
    done = subprocess.run(LAUNCH + [f"--workdir={workdir}"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and f"step {stopped_at}" in done.stdout
    assert_same_weights(straight, workdir)


def small(data_dir, steps=30):
    c = run_config("mnist1d", "mlp", widths=(16,))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 200, steps
    c.log_every_steps = 5
    c.eval_every_steps = 1000
    c.checkpoint_every_steps = 10
    return c


def corrupt_truncate(step_dir):
    path = biggest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def corrupt_garbage(step_dir):
    path = biggest_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x13garbage\x37" * 4)


def corrupt_delete(step_dir):
    os.remove(biggest_file(step_dir))


def biggest_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
             if f != checkpoint.SEAL_FILE]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_garbage, corrupt_delete])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, corrupt,
                                                                   capfd):
    c = small(data_dir)
    straight, damaged = str(tmp_path / "straight"), str(tmp_path / "damaged")
    train.train_and_evaluate(c, straight)
    train.train_and_evaluate(c, damaged)
    shutil.rmtree(os.path.join(damaged, checkpoint.CHECKPOINT_DIR, "30"))
    corrupt(os.path.join(damaged, checkpoint.CHECKPOINT_DIR, "20"))
    summary = train.train_and_evaluate(c, damaged)
    assert summary["resumed_from_step"] == 10
    err = capfd.readouterr().err
    assert "the checkpoint at step 20" in err and "is unusable" in err
    kept = os.listdir(os.path.join(damaged, checkpoint.CORRUPT_DIR))
    assert len(kept) == 1 and kept[0].startswith("20-")  # moved aside, not deleted
    assert_same_weights(straight, damaged)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        data_dir, tmp_path):
    c = small(data_dir)
    c.optimizer.learning_rate = 1e30  # step 1 is finite, then the parameters explode
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1
    with pytest.raises(train.NonFiniteError, match=r"was not finite at step 2 ") as e:
        train.train_and_evaluate(c, str(tmp_path))
    assert "last good checkpoint is step 1" in str(e.value)
    assert checkpoint.latest_step(str(tmp_path)) == 1


def test_nonfinite_step_is_skipped_inside_the_step():
    model = models.get_model("mlp", num_classes=3, widths=(4,))
    tx = train.optim.make_optimizer(run_config("mnist1d", "mlp").optimizer, 0.1)
    terms = objective.parse_terms(supervised_losses(), has_teacher=False)
    step = jax.jit(train.make_train_step(model, tx, objective.build_objective(terms,
                                                                              num_steps=3)))
    state = train.init_state(model, tx, (5,), 0)
    good = {"image": jnp.ones((4, 5)), "label": jnp.array([0, 1, 2, 0])}
    bad = {"image": good["image"].at[0, 0].set(jnp.nan), "label": good["label"]}
    after_bad, _ = step(state, bad, [])
    assert int(after_bad.step) == 1 and int(after_bad.nonfinite_steps) == 1
    assert after_bad.first_nonfinite.tolist() == [0, 1]  # step 0, the loss
    for a, b in zip(jax.tree.leaves(after_bad.params), jax.tree.leaves(state.params),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    after_good, _ = step(after_bad, good, [])
    assert int(after_good.nonfinite_steps) == 1
    assert not np.array_equal(after_good.params["head"]["kernel"], state.params["head"]["kernel"])


def test_skip_nonfinite_steps_lets_a_bounded_number_through(data_dir, tmp_path):
    c = small(data_dir, steps=10)
    c.optimizer.learning_rate = 1e30
    c.skip_nonfinite_steps = 100
    summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["num_steps"] == 10


def test_workdir_of_another_config_is_refused(data_dir, tmp_path):
    c = small(data_dir, steps=10)
    train.train_and_evaluate(c, str(tmp_path))
    c.model.kwargs.widths = (32,)
    c.num_steps = 20
    with pytest.raises(ValueError, match=r"holds checkpoints of a run with another config "
                                         r"\(model.kwargs.widths: \[16\] -> \[32\]; "
                                         r"num_steps: 10 -> 20\)"):
        train.train_and_evaluate(c, str(tmp_path))
    c.model.kwargs.widths = (16,)
    c.log_every_steps = 10  # only changes what is logged: allowed
    summary = train.train_and_evaluate(c, str(tmp_path), allow_config_change=True)
    assert summary["resumed_from_step"] == 10


def test_a_field_added_since_a_run_was_saved_is_no_change_at_its_default():
    """A workdir saved by an older jaxkd lacks the fields added since; they hold their
    defaults (which keep what runs did before), so a relaunch continues it."""
    import ml_collections

    from jaxkd import workdir
    from jaxkd.config import run_config

    now = run_config("mnist1d", "mlp")
    before = ml_collections.ConfigDict(now.to_dict())
    del before.data["drop_labels"]
    assert workdir.differences(before, now) == []
    now.data.drop_labels = (3,)
    assert workdir.differences(before, now) == [("data.drop_labels", None, [3])]
    before.data.in_memory = False  # a field both have: a change, as before
    now.data.drop_labels = ()
    assert workdir.differences(before, now) == [("data.in_memory", False, True)]
