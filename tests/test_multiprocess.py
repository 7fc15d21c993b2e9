"""Two processes joined by jax.distributed over loopback train like one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = [sys.executable, os.path.join(ROOT, "launch.py"),
          "--config=" + os.path.join(ROOT, "configs/mnist1d_teacher.py:model=mlp,smoke"),
          "--config.num_steps=20", "--config.batch_size=32", "--config.eval_batch_size=200",
          "--config.checkpoint_every_steps=10", "--config.data.transfer_split=unlabelled",
          "--config.data.augment=jitter"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """Without a shared file system: each process has a workdir of its own and they share
    only the checkpoints (process 1's is a link to process 0's). Process 1 must never read
    what process 0 wrote (the artifact, weights, summaries): they are not in its workdir."""
    one, two, two_p1 = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "two_p1")
    os.makedirs(os.path.join(two, "checkpoints"))
    os.makedirs(two_p1)
    os.symlink(os.path.join(two, "checkpoints"), os.path.join(two_p1, "checkpoints"))
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(LAUNCH + [f"--workdir={[two, two_p1][i]}",
                                        f"--coordinator_address={address}",
                                        "--num_processes=2", f"--process_id={i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run(LAUNCH + [f"--workdir={one}"], capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["processes"] == 2 and summary["devices"] == 2
    # Only process 0 reports progress and writes summaries; both finish the same run.
    assert "step 20/20" in outs[0][0] and "step 20/20" not in outs[1][0]
    assert sorted(os.listdir(two_p1)) == ["checkpoints"]  # process 1 wrote nothing else
    # ... and finished, with the artifact's figures that process 0 measured.
    assert "(exported artifact loaded from disk: the reported accuracy)" in outs[1][0]
    with np.load(os.path.join(one, "weights.npz")) as a, \
            np.load(os.path.join(two, "weights.npz")) as b:
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert summary["accuracy"] == json.load(open(os.path.join(one, "summary.json")))["accuracy"]


def launch_two(command, workdirs, devices_per_process, extra=()):
    """``command`` as two processes joined over loopback, each with its fake devices."""
    address = f"127.0.0.1:{free_port()}"
    env = dict(os.environ,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    procs = [subprocess.Popen(command + ([f"--workdir={workdirs[i]}"] if workdirs else []) + [
                                         f"--coordinator_address={address}",
                                         "--num_processes=2", f"--process_id={i}", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_fsdp_across_two_processes_matches_one_process_of_eight_devices(tmp_path):
    """The weights split 8 ways over two processes of 4 devices each (fsdp = 8, every
    process holding half of every weight) train like one process with 8 devices."""
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.batch_size=64",
            "--config.eval_batch_size=200", "--config.model.kwargs.widths=(64, 64)"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    os.makedirs(os.path.join(two, "checkpoints"))
    os.makedirs(str(tmp_path / "two_p1"))
    os.symlink(os.path.join(two, "checkpoints"), str(tmp_path / "two_p1" / "checkpoints"))
    launch_two(LAUNCH + mesh, [two, str(tmp_path / "two_p1")], 4)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    single = subprocess.run(LAUNCH + mesh + [f"--workdir={one}"], capture_output=True,
                            text=True, timeout=900, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    assert a["mesh"] == b["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (a["devices"], b["devices"], b["processes"]) == (8, 8, 2)
    # Each device holds an eighth of the sharded kernels, in both.
    assert a["per_device_bytes"] == b["per_device_bytes"]
    with np.load(os.path.join(one, "weights.npz")) as wa, \
            np.load(os.path.join(two, "weights.npz")) as wb:
        for k in wa.files:  # equal up to the order of float sums: the cross-process
            # all-reduce adds in another order than one process does (on an AVX2 CPU one
            # kernel entry of 4,096 ended 2.9e-6 apart, 3.5e-5 relative)
            np.testing.assert_allclose(wa[k], wb[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_every_process_writes_its_share_of_the_teacher_logits(tmp_path):
    """Two processes of 2 devices write the chunks of one manifest (chunk c by process
    c mod 2) that equal one process's."""
    from jaxkd import teacher_logits

    teacher = str(tmp_path / "teacher")
    proc = subprocess.run(LAUNCH + [f"--workdir={teacher}"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    write = [sys.executable, "-m", "jaxkd.teacher_logits", f"--teacher_workdir={teacher}",
             "--top_k=3", "--temperature=2", "--chunk_size=5000", "--batch_size=100",
             "--transfer_split=unlabelled"]
    outs = launch_two(write + [f"--out={tmp_path / 'two'}"], None, 2)
    written = [line for out, _ in outs for line in out.splitlines() if "examples/s" in line]
    assert len(written) == 5  # 24,000 examples in chunks of 5,000
    assert {line.rsplit("(", 1)[1] for line in written} == {"process 0)", "process 1)"}
    single = subprocess.run(write + [f"--out={tmp_path / 'one'}"], capture_output=True,
                            text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = (json.load(open(tmp_path / d / "manifest.json")) for d in ("one", "two"))
    assert a["complete"] and b["complete"] and a["inputs"] == b["inputs"]
    assert [c["file"] for c in a["chunks"]] == [c["file"] for c in b["chunks"]]
    data = teacher_logits.check(str(tmp_path / "two"), checkpoint_data(teacher))
    assert data["count"] == 24_000
    ra, rb = (teacher_logits.StoredLogits(str(tmp_path / d), m, in_memory=True).read(
        np.arange(24_000)) for d, m in (("one", a), ("two", b)))
    np.testing.assert_array_equal(ra["fingerprint"], rb["fingerprint"])
    np.testing.assert_array_equal(ra["indices"], rb["indices"])
    np.testing.assert_allclose(ra["values"].astype(np.float32),
                               rb["values"].astype(np.float32), rtol=1e-3, atol=1e-3)


def checkpoint_data(workdir):
    import ml_collections

    from jaxkd import checkpoint

    data = ml_collections.ConfigDict(checkpoint.read_config(workdir).data.to_dict())
    data.transfer_split, data.augment = "unlabelled", "none"
    return data
