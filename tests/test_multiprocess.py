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
