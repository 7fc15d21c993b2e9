"""Bad input, as a table: each case fails early with one line naming the field or file."""

import json
import os

import jax
import pytest

from jaxkd import chain, train
from jaxkd.config import chain_config, hinton_losses, run_config


def base(data_dir):
    c = run_config("mnist1d", "mlp", widths=(8,))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 16, 200, 4
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 4
    return c


@pytest.fixture(scope="module")
def teachers(data_dir, tmp_path_factory):
    """A trained mnist1d teacher, and one trained on (mock) CIFAR-100."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking

    from tests.conftest import _mock_getitems

    root = tmp_path_factory.mktemp("teachers")
    mnist1d = str(root / "mnist1d")
    train.train_and_evaluate(base(data_dir), mnist1d)
    cifar = run_config("cifar100", "lenet5")
    cifar.batch_size = cifar.eval_batch_size = 8
    cifar.num_steps = cifar.log_every_steps = cifar.eval_every_steps = 1
    cifar.checkpoint_every_steps = 1
    original = mocking._getitems
    mocking._getitems = _mock_getitems
    try:
        with tfds.testing.mock_data(num_examples=8):
            train.train_and_evaluate(cifar, str(root / "cifar100"))
    finally:
        mocking._getitems = original
    other_arch = str(root / "other_arch")
    train.train_and_evaluate(base(data_dir), other_arch)
    path = os.path.join(other_arch, "model.json")
    spec = json.load(open(path))
    spec["kwargs"]["widths"] = [12]  # the checkpoint holds widths (8,)
    json.dump(spec, open(path, "w"))
    empty = root / "empty"
    empty.mkdir()
    return {"mnist1d": mnist1d, "cifar100": str(root / "cifar100"), "other_arch": other_arch,
            "empty": str(empty), "missing": str(root / "missing")}


def set_path(c, path, value):
    *parents, last = path.split(".")
    for p in parents:
        c = c[p]
    c[last] = value


CASES = [
    # (id, {field: value}, expected text in the one-line message)
    ("model", {"model.name": "resnet9000"}, "config.model.name='resnet9000' is not a model"),
    ("model_kwarg", {"model.kwargs.depth": 3}, "unknown kwarg(s) depth"),
    ("dataset", {"data.name": "mnist2d"}, "config.data.name='mnist2d'"),
    ("train_split", {"data.train_split": "validation"}, "config.data.train_split"),
    ("eval_split", {"data.eval_split": "val"}, "config.data.eval_split"),
    ("augment", {"data.augment": "mixup9"}, "config.data.augment"),
    ("optimizer", {"optimizer.name": "lion9"}, "config.optimizer.name='lion9'"),
    ("schedule", {"schedule.name": "exp"}, "config.schedule.name='exp'"),
    ("loss", {"distill.losses.ce.name": "xent"}, "config.distill.losses.ce.name='xent'"),
    ("loss_field", {"distill.losses.ce.wieght": 1.0}, "config.distill.losses.ce has unknown"),
    ("kd_without_teacher", {"distill.losses": hinton_losses(0.5, 2.0)}, "needs a teacher"),
    ("temperature", {"distill.teacher.workdir": "@mnist1d",
                     "distill.losses": hinton_losses(0.5, 0.0)}, "temperature must be > 0"),
    ("zero_weights", {"distill.losses.ce.weight": 0.0}, "every term has weight 0"),
    ("no_steps", {"num_steps": 0, "num_epochs": 0.0}, "give no training step"),
    ("batch_size", {"batch_size": 0}, "config.batch_size=0 must be a positive multiple"),
    ("eval_batch_size", {"eval_batch_size": -8}, "config.eval_batch_size=-8"),
    ("teacher_missing", {"distill.teacher.workdir": "@missing",
                         "distill.losses": hinton_losses(0.5, 2.0)},
     "config.distill.teacher.workdir="),
    ("teacher_not_a_run", {"distill.teacher.workdir": "@empty",
                           "distill.losses": hinton_losses(0.5, 2.0)},
     "the workdir of a jaxkd run"),
    ("teacher_other_arch", {"distill.teacher.workdir": "@other_arch",
                            "distill.losses": hinton_losses(0.5, 2.0)},
     "does not fit the model in its model.json"),
    ("teacher_classes", {"distill.teacher.workdir": "@cifar100",
                         "distill.losses": hinton_losses(0.5, 2.0)},
     "trained on 'cifar100' (inputs (32, 32, 3), 100 classes) but config.data.name="
     "'mnist1d' has inputs (40,) and 10 classes"),
    ("feature_name", {"distill.teacher.workdir": "@mnist1d",
                      "distill.losses.hint": {"name": "hint_mse", "student_feature": "stage3",
                                              "teacher_feature": "embedding"}},
     "student_feature='stage3' is not a feature of the student"),
    ("ensemble", {"distill.teacher.workdir": "@mnist1d", "distill.ensemble": "vote",
                  "distill.losses": hinton_losses(0.5, 2.0)}, "config.distill.ensemble='vote'"),
    ("init_method", {"distill.teacher.workdir": "@mnist1d", "init.method": "clone",
                     "distill.losses": hinton_losses(0.5, 2.0)}, "config.init.method"),
    ("workdir_not_writable", {"@workdir": "file"}, "is not writable"),
]


@pytest.mark.parametrize("case, changes, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(data_dir, teachers, tmp_path, case, changes, expected):
    c = base(data_dir)
    workdir = str(tmp_path / "run")
    for path, value in changes.items():
        if path == "@workdir":
            (tmp_path / "a_file").write_text("")
            workdir = str(tmp_path / "a_file" / "run")
            continue
        if isinstance(value, str) and value.startswith("@"):
            value = teachers[value[1:]]
        if path == "distill.losses.hint":
            c.distill.losses.hint = value
            continue
        if path == "distill.losses.ce.wieght":
            c.distill.losses.ce.wieght = value
            continue
        set_path(c, path, value)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        train.train_and_evaluate(c, workdir)
    message = str(e.value)
    print(f"[{case}] {message}")
    assert expected in message, message
    assert "\n" not in message and len(message) < 600, message
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))  # failed before training


def test_batch_not_divisible_by_the_device_count(data_dir, monkeypatch, tmp_path):
    c = base(data_dir)
    c.batch_size = 100
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ValueError, match=r"config.batch_size=100 must be a positive multiple "
                                         r"of the device count \(8\)"):
        train.train_and_evaluate(c, str(tmp_path))


def test_chain_stage_must_name_an_earlier_stage(data_dir, tmp_path):
    student = base(data_dir)
    student.distill.teacher.workdir = "stage:teacher"
    student.distill.losses = hinton_losses(0.5, 2.0)
    config = chain_config({"student": student, "teacher": base(data_dir)})
    with pytest.raises(ValueError, match=r"config.stages.student.distill.teacher.workdir="
                                         r"'stage:teacher' must name an earlier stage"):
        chain.run_chain(config, str(tmp_path))
