"""The launcher and the teacher-logits command as a new user meets them: help that works,
one line for every mistake (and a traceback for jaxkd's own bugs), chains that never show a
stale stage as a result, logs with every step once, a quiet first run."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from jaxkd import checkpoint, metrics, train
from jaxkd.config import hinton_losses, run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_SMOKE = "--config=" + os.path.join(ROOT, "configs", "mnist1d_teacher.py:smoke")


def command(*args, module=None, cwd=ROOT):
    head = ["-m", module] if module else [os.path.join(ROOT, "launch.py")]
    return subprocess.run([sys.executable, *head, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxkd: error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpshort", "--helpfull"])
def test_help_prints_usage_and_how_to_list_fields(flag):
    for module in (None, "jaxkd.teacher_logits"):
        proc = command(flag, module=module)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("usage: python ")
        assert ("--print_config" if module is None else "--teacher_workdir") in proc.stdout


def test_print_config_lists_every_field_after_overrides():
    proc = command(TEACHER_SMOKE, "--config.optimizer.learning_rate=3e-3", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "learning_rate: 0.003" in proc.stdout and "quantization:" in proc.stdout


@pytest.mark.parametrize("args, expected", [
    # README's own override on the default chain, which has no such top-level field.
    (["--config.optimizer.learning_rate=3e-3"],
     "--config.optimizer.learning_rate: config has no field 'optimizer'; its fields: "
     "stage_order, stages (a stage's field is --config.stages.<stage>.<field>; stages: "
     "teacher, scratch, student)"),
    ([TEACHER_SMOKE, "--config.optimizer.learning_rat=3e-3"],
     "--config.optimizer.learning_rat: config.optimizer has no field 'learning_rat'; did you "
     "mean --config.optimizer.learning_rate? its fields: b1, b2, grad_clip_norm, "
     "learning_rate"),
    ([TEACHER_SMOKE, "--config.optimizer.learning_rate=fast"],
     "--config.optimizer.learning_rate='fast': expects a number"),
    ([TEACHER_SMOKE, "--config.num_steps=2.5"], "--config.num_steps='2.5': expects an integer"),
    ([TEACHER_SMOKE, "--config.optimizer=adam"], "--config.optimizer: is a block, not a value"),
    (["--config=configs/mnist1d_teachr.py"],
     "configs/mnist1d_teachr.py does not exist; did you mean configs/mnist1d_teacher.py"),
    (["--config=configs/mnist1d_teacher"], "give the path of a .py config file"),
    (["--config=configs/mnist1d_teacher.py:modle=mlp"],
     "unknown config arg 'modle' (did you mean 'model'?); this config takes: model=..., smoke"),
    (["--config=configs/mnist1d_teacher.py:smok"], "unknown config arg 'smok'"),
    ([TEACHER_SMOKE, "--config.optimizer.learning_rate=-1"],
     "config.optimizer.learning_rate=-1.0 must be > 0"),
    (["--config=configs/default.py:smoke", "--config.stages.teacher.model.name=lenet5"],
     "config.stages.teacher.model.name='lenet5' cannot take the inputs (40,) of "
     "config.stages.teacher.data.name='mnist1d'"),
    ([TEACHER_SMOKE, "--distributed"], "--distributed: jax.distributed.initialize() failed"),
    ([TEACHER_SMOKE, "--bogus"], "unrecognized arguments: --bogus"),
])
def test_mistakes_are_one_line(tmp_path, args, expected):
    workdir = tmp_path / "run"
    line = one_error_line(command(*args, f"--workdir={workdir}"))
    assert expected in line, line
    assert not workdir.exists()  # a refused run leaves nothing behind


def test_teacher_logits_mistakes_are_one_line(tmp_path):
    line = one_error_line(command("--out", str(tmp_path / "o"), module="jaxkd.teacher_logits"))
    assert "required: --teacher_workdir" in line
    line = one_error_line(command("--out", str(tmp_path / "o"), "--teacher_workdir=/nowhere",
                                  module="jaxkd.teacher_logits"))
    assert "--teacher_workdir='/nowhere' does not exist" in line


def test_jaxkd_bugs_keep_their_traceback(tmp_path):
    config = tmp_path / "buggy.py"
    config.write_text("def get_config(arg=None):\n    return {}['missing']\n")
    proc = command(f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'missing'" in proc.stderr


def test_a_chain_refuses_a_finished_stage_under_a_changed_config(tmp_path):
    chain = ["--config=" + os.path.join(ROOT, "configs", "default.py:smoke"),
             f"--workdir={tmp_path}"]
    assert command(*chain).returncode == 0
    line = one_error_line(command(
        *chain, "--config.stages.student.distill.losses.kd.kwargs.temperature=8"))
    assert (f"stage 'student' finished in '{tmp_path / 'student'}' under another config "
            "(distill.losses.kd.kwargs.temperature: 4.0 -> 8.0)") in line, line
    # A single run never overwrites the chain's summary, and the chain's directory is no
    # teacher: it names its stages.
    line = one_error_line(command(TEACHER_SMOKE, f"--workdir={tmp_path}"))
    assert "holds a run of several stages (teacher, scratch, student)" in line
    student = ["--config=" + os.path.join(ROOT, "configs", "mnist1d_student.py:smoke"),
               f"--workdir={tmp_path / 'other'}"]
    line = one_error_line(command(*student, f"--config.distill.teacher.workdir={tmp_path}"))
    assert "holds a run of several stages (teacher, scratch, student): name one stage's " \
           f"directory, e.g. '{tmp_path / 'student'}'" in line
    # ... and a chain never runs in a single run's directory.
    line = one_error_line(command(*chain[:1], f"--workdir={tmp_path / 'teacher'}"))
    assert "holds a single run" in line


def small_run(data_dir, steps=30):
    c = run_config("mnist1d", "mlp", widths=(16,))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 500, steps
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 5, 10, 10
    return c


def test_an_unfinished_teacher_is_refused(data_dir, tmp_path):
    teacher = str(tmp_path / "teacher")
    train.train_and_evaluate(small_run(data_dir, steps=10), teacher)
    os.remove(os.path.join(teacher, metrics.SUMMARY_FILE))  # as if killed before the end
    c = small_run(data_dir)
    c.distill.teacher.workdir = teacher
    c.distill.losses = hinton_losses(0.5, 2.0)
    with pytest.raises(ValueError, match=r"has not finished \(newest checkpoint at step 10 of "
                                         r"10, no summary.json\)"):
        train.train_and_evaluate(c, str(tmp_path / "student"))


def read_events(directory):
    """``(step, tag)`` of every scalar and ``('start', step)`` of every session start in
    the TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log"):
                out.append(("start", event.step))
            for value in event.summary.value:
                out.append((event.step, value.tag))
    return out


def test_logs_hold_every_step_once_and_are_live(data_dir, tmp_path, capsys):
    c = small_run(data_dir)
    workdir = str(tmp_path)
    train.train_and_evaluate(c, workdir)
    console = capsys.readouterr().out
    assert "nan" not in console and "step 5/30 loss=" in console
    assert "step 10/30 eval accuracy" in console  # eval accuracy during training
    assert "(float model in training), " in console and "the reported accuracy" in console
    # Killed after step 20 (its last checkpoint) while logging step 25: a resume trains
    # 21..30 again and logs them once.
    shutil.rmtree(os.path.join(workdir, checkpoint.CHECKPOINT_DIR, "30"))
    os.remove(os.path.join(workdir, metrics.SUMMARY_FILE))
    with open(os.path.join(workdir, metrics.METRICS_FILE), "a") as f:
        f.write('{"step": 25, "train/lo')  # torn by the kill
    os.makedirs(os.path.join(workdir, checkpoint.CHECKPOINT_DIR,
                             "30.orbax-checkpoint-tmp-123"))
    train.train_and_evaluate(c, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, metrics.METRICS_FILE))]
    assert [r["step"] for r in records if "train/loss" in r] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in records if "eval/accuracy" in r] == [10, 20, 30]
    assert sum(bool(r.get("final")) for r in records) == 1
    assert not [n for n in os.listdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR))
                if "tmp" in n]
    events = read_events(os.path.join(workdir, "tensorboard"))
    # TensorBoard drops the first run's events from the purge step on.
    assert ("start", 21) in events
    assert [s for s, tag in events if tag == "train/loss"] == [5, 10, 15, 20, 25, 30, 25, 30]


def test_a_live_metric_writer_has_flushed_its_events(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path), total_steps=10)
    writer.write(5, "train", {"loss": 1.5})
    assert (5, "train/loss") in read_events(str(tmp_path / "tensorboard"))
    writer.close()


def test_the_first_run_prepares_data_quietly(tmp_path):
    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"),
                           "--config=" + os.path.join(ROOT, "configs", "digits_teacher.py:smoke"),
                           f"--workdir={tmp_path / 'run'}"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert f"jaxkd: preparing digits in {tmp_path / 'tfds'} (once)" in output
    for noise in ("Downloading and preparing", "dataset_info.json", "\x1b[", "\r"):
        assert noise not in output, output[:3000]
    # The artifact is as readable as the run directory (the umask's), not private.
    mode = os.stat(tmp_path / "run").st_mode & 0o777
    assert os.stat(tmp_path / "run" / "artifact").st_mode & 0o777 == mode
