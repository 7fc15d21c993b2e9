"""A run's directory: writable, and holding checkpoints of this config only.

A relaunch continues a workdir's checkpoints. A relaunch with another config would mix two
experiments in one run, so it is refused with the fields that differ, unless the user
allows it (``--allow_config_change``); fields that change only what is logged or kept
(:data:`RESULT_NEUTRAL_FIELDS`) may change.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from jaxkd import checkpoint
from jaxkd.schema import ConfigError

# Fields that change what is logged or kept, not the result: may change on relaunch.
RESULT_NEUTRAL_FIELDS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                         "max_to_keep", "data.data_dir", "eval_batch_size")


def check(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool) -> None:
    """The workdir must be writable, and not hold another config's checkpoints."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".jaxkd-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r} is not writable ({e.strerror})") from None
    if allow_config_change or checkpoint.latest_step(workdir) is None:
        return
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        return
    changed = differences(checkpoint.read_config(workdir), config)
    if changed:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:5])
        raise ConfigError(
            f"--workdir={workdir!r} holds checkpoints of a run with another config ({shown}"
            f"{'; ...' if len(changed) > 5 else ''}); use another workdir, or pass "
            "--allow_config_change to continue it with the new config")


def differences(before: ml_collections.ConfigDict, now: ml_collections.ConfigDict
                ) -> list[tuple[str, Any, Any]]:
    """``(field, before, now)`` of every result-changing field that differs."""
    a = flatten(ml_collections.ConfigDict(before.to_dict()).to_dict())
    b = flatten(ml_collections.ConfigDict(now.to_dict()).to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(RESULT_NEUTRAL_FIELDS)]


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a.b': leaf}`` of a nested dict (lists of dicts flattened item by item)."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, tuple | list):
        tree = [flatten(v) if isinstance(v, dict) else v for v in tree]
    return {prefix[:-1]: tree}
