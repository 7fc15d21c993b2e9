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
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    address = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(LAUNCH + [f"--workdir={two}", f"--coordinator_address={address}",
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
    with np.load(os.path.join(one, "weights.npz")) as a, \
            np.load(os.path.join(two, "weights.npz")) as b:
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert summary["accuracy"] == json.load(open(os.path.join(one, "summary.json")))["accuracy"]
