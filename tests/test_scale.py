"""Models larger than one device: meshes, FSDP and tensor parallelism, gradient
accumulation, mixed precision, resharding restore.

The multi-device tests run in subprocesses with 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and compare with this process's
single device.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxkd import checkpoint, partitioning, train
from jaxkd.config import Mesh, run_config
from jaxkd.schema import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {"8x1x1": {"data": 8, "fsdp": 1, "tensor": 1},
          "2x4x1": {"data": 2, "fsdp": 4, "tensor": 1},
          "2x2x2": {"data": 2, "fsdp": 2, "tensor": 2},
          "1x1x8": {"data": 1, "fsdp": 1, "tensor": 8}}


def eight_devices(script: str, timeout: int = 900) -> str:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def small_run(data_dir, steps=12, **model_kwargs):
    c = run_config("mnist1d", "mlp", **(model_kwargs or {"widths": (64, 64)}))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 200, steps
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 1000, 4
    return c


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    """An MLP teacher whose every width the meshes divide, so that it is sharded too."""
    workdir = str(tmp_path_factory.mktemp("scale_teacher"))
    train.train_and_evaluate(small_run(data_dir, steps=20, widths=(128, 64)), workdir)
    return workdir


# ----------------------------------------------------------------------------- the mesh


def test_mesh_sizes_and_their_one_line_errors():
    assert partitioning.mesh_shape(Mesh(), 8) == (8, 1, 1)
    assert partitioning.mesh_shape(Mesh(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert partitioning.mesh_shape(Mesh(data=1, fsdp=1, tensor=-1), 8) == (1, 1, 8)
    with pytest.raises(ConfigError, match=r"^mesh: data=3 x fsdp=1 x tensor=1 does not "
                                          r"divide the 8 devices$"):
        partitioning.mesh_shape(Mesh(data=3), 8)
    with pytest.raises(ConfigError, match=r"data=2 x fsdp=2 x tensor=1 = 4 devices, but "
                                          r"there are 8 \(set one axis to -1"):
        partitioning.mesh_shape(Mesh(data=2, fsdp=2), 8)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        Mesh(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match=r"logical.embed='fsdpp' is not a mesh axis"):
        Mesh(logical={"embed": "fsdpp"})


def test_the_layout_follows_the_rules_and_replicates_what_does_not_divide():
    # Only the mesh's sizes matter to the specs: an abstract mesh of 16 devices.
    sizes = jax.sharding.AbstractMesh((1, 4, 4), ("data", "fsdp", "tensor"))
    layout = partitioning.Layout(mesh=sizes, settings=Mesh(), rules=partitioning.model_axes.ZOO)
    P = jax.sharding.PartitionSpec
    assert layout.spec("hidden1/kernel", (40, 64)) == P("fsdp", "tensor")
    assert layout.spec("hidden1/bias", (64,)) == P("tensor")
    assert layout.spec("conv1/kernel", (5, 1, 32)) == P(None, None, "tensor")  # 1 in-channel
    assert layout.spec("head/kernel", (64, 10)) == P("fsdp")  # 10 classes over tensor=4: no
    assert layout.uneven == ["conv1/kernel dim 1 (1) over fsdp",
                             "head/kernel dim 1 (10) over tensor"]
    rules = Mesh(rules=({"params": "head/.*", "spec": ["tensor"]},))
    layout = partitioning.Layout(mesh=sizes, settings=rules, rules=partitioning.model_axes.ZOO)
    assert layout.spec("head/kernel", (64, 10)) == P("tensor")
    assert layout.spec("hidden1/kernel", (40, 64)) == P("fsdp", "tensor")
    # Everything shaped like a parameter follows it: Adam's moments, a mask; the rest not.
    params = {"hidden1": {"kernel": jax.ShapeDtypeStruct((40, 64), np.float32)}}
    other = {"mu": params, "masks": {"model": params}, "count": jax.ShapeDtypeStruct((), int),
             "codebook": {"hidden1": {"kernel": jax.ShapeDtypeStruct((16,), np.float32)}}}
    follow = layout.follow(other, {"params": params})
    assert follow["mu"]["hidden1"]["kernel"].spec == P("fsdp", "tensor")
    assert follow["masks"]["model"]["hidden1"]["kernel"].spec == P("fsdp", "tensor")
    assert follow["count"].spec == P() and follow["codebook"]["hidden1"]["kernel"].spec == P()


def test_a_rule_matching_no_parameter_and_a_bad_mesh_are_one_line(data_dir, tmp_path):
    c = small_run(data_dir)
    c.mesh.rules = ({"params": "encoder/.*", "spec": ["fsdp"]},)
    with pytest.raises(ConfigError, match=r"config.mesh.rules\[0\].params='encoder/.\*' "
                                          r"matches no parameter of model 'mlp'"):
        train.train_and_evaluate(c, str(tmp_path / "rule"))
    c = small_run(data_dir)
    c.mesh.fsdp = 3
    with pytest.raises(ConfigError, match=r"config.mesh: data=-1 x fsdp=3 x tensor=1 does "
                                          r"not divide the 1 devices"):
        train.train_and_evaluate(c, str(tmp_path / "mesh"))
    assert not os.path.exists(tmp_path / "rule") and not os.path.exists(tmp_path / "mesh")


EQUALITY_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {root!r})
from tests.multidevice import kd_steps_on_mesh
out = {{}}
for name, mesh in {meshes!r}.items():
    params, report = kd_steps_on_mesh({data_dir!r}, {teacher_dir!r}, mesh)
    np.savez({out!r} + name + ".npz", **params)
    out[name] = report
print(json.dumps(out))
"""


def test_kd_steps_on_every_mesh_match_one_device_and_shard_the_bytes(data_dir, teacher_dir,
                                                                     tmp_path):
    from tests.multidevice import kd_steps_on_mesh

    one, _ = kd_steps_on_mesh(str(data_dir), teacher_dir, {})
    out = str(tmp_path / "mesh_")
    reports = json.loads(eight_devices(EQUALITY_SCRIPT.format(
        root=ROOT, meshes=MESHES, data_dir=str(data_dir), teacher_dir=teacher_dir,
        out=out)).splitlines()[-1])
    for name in MESHES:
        with np.load(out + name + ".npz") as got:
            assert set(got.files) == set(one)
            for k in one:
                np.testing.assert_allclose(got[k], one[k], rtol=2e-5, atol=2e-6,
                                           err_msg=f"{name} {k}")
        report = reports[name]
        # Each device holds the total over the shards its spec implies, for student,
        # optimizer state and teacher; FSDP and tensor parallelism really shard them.
        for path, (total, on_device, shards) in report.items():
            assert on_device * shards == total, (name, path)
        sharded = {p for p, (_, _, shards) in report.items() if shards > 1}
        if name != "8x1x1":  # pure data parallelism replicates the weights
            assert "student/hidden1/kernel" in sharded and "teacher/hidden1/kernel" in sharded
            assert any(p.startswith("opt_state/") for p in sharded)
        else:
            assert not sharded
    # FSDP over 4: the 128x64 teacher kernel takes a quarter of its bytes on a device.
    assert reports["2x4x1"]["teacher/hidden2/kernel"][1] == 128 * 64 * 4 // 4


# ----------------------------------------------------------------------------- accumulation


def test_k_accumulated_steps_make_the_update_of_a_k_times_larger_batch(data_dir, tmp_path):
    big = small_run(data_dir, steps=4)
    big.batch_size = 32
    small = small_run(data_dir, steps=16)
    small.batch_size, small.grad_accum_steps = 8, 4
    for c in (big, small):
        c.checkpoint_every_steps = 16
        c.schedule.name = "cosine"  # over the 4 updates in both
    a = train.train_and_evaluate(big, str(tmp_path / "big"))
    b = train.train_and_evaluate(small, str(tmp_path / "small"))
    wa, wb = (dict(np.load(os.path.join(tmp_path, d, checkpoint.WEIGHTS_FILE)))
              for d in ("big", "small"))
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert a["num_steps"] == 4 and b["num_steps"] == 16
    # ... and differ from 16 updates of 8 (the accumulation really happened).
    small.grad_accum_steps = 1
    train.train_and_evaluate(small, str(tmp_path / "plain"))
    wc = dict(np.load(os.path.join(tmp_path, "plain", checkpoint.WEIGHTS_FILE)))
    assert max(np.abs(wc[k] - wa[k]).max() for k in wa) > 1e-3


# ----------------------------------------------------------------------------- restore


RESHARD_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import jax
from jaxkd import configfile, train
c = configfile.load({config!r})
c.mesh.update(**{mesh!r})
s = train.train_and_evaluate(c, {workdir!r})
print(json.dumps({{"devices": jax.device_count(), "resumed": s["resumed_from_step"],
                  "mesh": s["mesh"], "bytes": s["per_device_bytes"]}}))
"""


def test_a_run_saved_on_8_devices_with_fsdp_8_resumes_on_4_and_on_1(data_dir, tmp_path):
    config = tmp_path / "config.py"
    config.write_text(
        "from jaxkd.config import run_config\n"
        "def get_config(arg=None):\n"
        f"    c = run_config('mnist1d', 'mlp', widths=(64, 64))\n"
        f"    c.data.data_dir = {str(data_dir)!r}\n"
        "    c.batch_size, c.eval_batch_size, c.num_steps = 32, 200, 12\n"
        "    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 4, 1000, 4\n"
        "    return c\n")
    straight = str(tmp_path / "straight")

    def launch(workdir, devices, mesh):
        script = RESHARD_SCRIPT.format(root=ROOT, config=str(config), mesh=mesh,
                                       workdir=workdir)
        if devices == 8:
            return json.loads(eight_devices(script).splitlines()[-1])
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=900, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    saved = launch(straight, 8, {"data": 1, "fsdp": 8})
    assert saved["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    full = dict(np.load(os.path.join(straight, checkpoint.WEIGHTS_FILE)))
    for devices, mesh in ((4, {"data": 1, "fsdp": 4}), (1, {})):
        resumed = str(tmp_path / f"resumed_on_{devices}")
        shutil.copytree(straight, resumed)
        # Lose the last checkpoint and the outputs, as if stopped after step 8.
        shutil.rmtree(os.path.join(resumed, checkpoint.CHECKPOINT_DIR, "12"))
        os.remove(os.path.join(resumed, checkpoint.WEIGHTS_FILE))
        out = launch(resumed, devices, mesh)
        assert (out["devices"], out["resumed"]) == (devices, 8)
        got = dict(np.load(os.path.join(resumed, checkpoint.WEIGHTS_FILE)))
        for k in full:
            np.testing.assert_allclose(got[k], full[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{devices} {k}")
    # Sharded 8 ways the parameters take about an eighth of their bytes on a device (the
    # 10-class head and the 40-input kernel's dims that 8 does not divide stay whole).
    total = (40 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10) * 4
    assert saved["bytes"]["params"] < total / 3


# ----------------------------------------------------------------------------- precision


def test_bfloat16_learns_within_a_point_of_float32(data_dir, tmp_path):
    accuracy = {}
    for dtype in ("float32", "bfloat16"):
        c = run_config("digits", "lenet5")
        c.data.data_dir = str(data_dir)
        c.batch_size, c.eval_batch_size, c.num_steps = 64, 360, 400
        c.optimizer.learning_rate = 3e-3
        c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 400
        c.dtype = dtype
        summary = train.train_and_evaluate(c, str(tmp_path / dtype))
        accuracy[dtype] = summary["accuracy"]
        assert summary["dtype"] == dtype
        weights = np.load(os.path.join(tmp_path, dtype, checkpoint.WEIGHTS_FILE))
        assert {weights[k].dtype for k in weights.files} == {np.dtype(np.float32)}  # master
    assert accuracy["float32"] > 0.95
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) <= 0.01, accuracy
    # The bf16 run and the f32 run are different computations (the flag is not ignored).
    with np.load(os.path.join(tmp_path, "float32", checkpoint.WEIGHTS_FILE)) as a, \
            np.load(os.path.join(tmp_path, "bfloat16", checkpoint.WEIGHTS_FILE)) as b:
        assert max(np.abs(a[k] - b[k]).max() for k in a.files) > 1e-4


def test_precision_and_remat_mistakes_are_one_line(data_dir, tmp_path):
    c = small_run(data_dir)
    c.remat = "full"
    with pytest.raises(ConfigError, match=r"config.remat='full': model 'mlp' has no blocks to "
                                          r"rematerialise; the models that take it: bert, "):
        train.train_and_evaluate(c, str(tmp_path / "remat"))
    c = run_config("mnist1d", "resnet8")
    c.remat, c.quantization.enabled = "full", True
    with pytest.raises(ConfigError, match=r"config.remat='full' with "
                                          r"config.quantization.enabled"):
        train.train_and_evaluate(c, str(tmp_path / "remat_qat"))
    c = small_run(data_dir)
    c.dtype = "bfloat16"
    c.quantization.enabled = True
    with pytest.raises(ConfigError, match=r"config.dtype='bfloat16' with "
                                          r"config.quantization.enabled"):
        train.train_and_evaluate(c, str(tmp_path / "qat"))
    c = small_run(data_dir)
    c.dtype = "float64"
    with pytest.raises(ConfigError, match=r"config.dtype='float64' is not a precision"):
        train.train_and_evaluate(c, str(tmp_path / "f64"))
