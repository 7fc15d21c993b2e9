"""bench/common.py's Ledger: a long bench's measurements kept across machines, standing for
a run only while its config is the same."""

from __future__ import annotations

import json
import os
import sys

import ml_collections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402  (bench/common.py)


def _config(lr: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"optimizer": {"learning_rate": lr},
                                      "teacher": os.path.expanduser("~/models/x")})


def test_a_recorded_run_is_not_trained_again_until_its_config_changes(tmp_path):
    trained = []

    def train(c):
        trained.append(c.optimizer.learning_rate)
        c.optimizer.learning_rate = -1.0  # a run that edits its config in place
        return {"accuracy": 0.5, "num_params": 7, "num_steps": 3, "history": [1, 2, 3]}

    first = common.Ledger("b", directory=str(tmp_path))
    c = _config(0.1)
    assert first.run("seed0/kd", c, lambda: train(c)) == {
        "accuracy": 0.5, "num_params": 7, "num_steps": 3}
    assert trained == [0.1]

    # Another machine: a new Ledger reads the file; the same config is not trained again,
    # whatever the run did to its own copy of the config.
    second = common.Ledger("b", directory=str(tmp_path))
    assert second.run("seed0/kd", _config(0.1), lambda: train(_config(0.1)))["accuracy"] == 0.5
    assert trained == [0.1] and second.reused == ["seed0/kd"]
    # A changed config, or --fresh, trains again and overwrites the entry.
    second.run("seed0/kd", _config(0.2), lambda: train(_config(0.2)))
    common.Ledger("b", directory=str(tmp_path), fresh=True).run(
        "seed0/kd", _config(0.2), lambda: train(_config(0.2)))
    assert trained == [0.1, 0.2, 0.2]

    entry = json.load(open(tmp_path / "b.json"))["seed0/kd"]
    assert entry["config_sha256"] == common.fingerprint(_config(0.2))
    assert set(entry) == {"config_sha256", "numbers", "commit", "machine", "date"}


def test_the_fingerprint_is_the_same_under_another_home_directory(monkeypatch):
    here = common.fingerprint(_config(0.1))
    monkeypatch.setenv("HOME", "/home/someone-else")
    assert common.fingerprint(_config(0.1)) == here
    assert common.fingerprint(_config(0.3)) != here
