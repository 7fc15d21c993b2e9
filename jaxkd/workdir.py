"""A run's directory: writable, and holding checkpoints of this config only.

A relaunch continues a workdir's checkpoints. A relaunch with another config would mix two
experiments in one run, so it is refused with the fields that differ, unless the user
allows it (``--allow_config_change``); fields that change only what is logged or kept
(:data:`RESULT_NEUTRAL_FIELDS`) may change.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from jaxkd import checkpoint, metrics, multihost, schema
from jaxkd.config import Run
from jaxkd.schema import ConfigError

# Fields that change what is logged or kept, or where arrays live and what is recomputed,
# not the result (up to float rounding): may change on relaunch. A run saved on one mesh
# resumes on another (Orbax reshards the checkpoint onto the new layout).
RESULT_NEUTRAL_FIELDS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                         "max_to_keep", "data.data_dir", "eval_batch_size", "mesh.", "remat")


def check(workdir: str, config: ml_collections.ConfigDict, allow_config_change: bool) -> None:
    """The workdir must be writable (it is not created here: a run refused later leaves
    nothing behind), and not hold another config's checkpoints."""
    check_writable(workdir)
    check_kind(workdir, stages=False)
    if allow_config_change or checkpoint.latest_step(workdir) is None:
        return
    changed = changed_fields(workdir, config)
    if changed:
        raise ConfigError(
            f"--workdir={workdir!r} holds checkpoints of a run with another config ({changed}"
            "); use another workdir, or pass --allow_config_change to continue it with the "
            "new config")


def check_writable(workdir: str) -> None:
    """``workdir`` is a writable directory, or could be created as one."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir!r} is not writable (a file, not a directory)")
    if os.path.isdir(workdir):
        try:
            probe = os.path.join(workdir, f".jaxkd-write-test-{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise ConfigError(f"--workdir={workdir!r} is not writable ({e.strerror})") from None
        return
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir!r} is not writable: {parent!r} is not a "
                          "writable directory")


def check_finished(stage_dir: str, config: ml_collections.ConfigDict, *, stage: str,
                   allow_config_change: bool) -> None:
    """A finished stage of a chain or pipeline is reused only under the config it finished
    with (``config``: the stage's, resolved). The leader reads; every process raises."""
    changed = None
    if multihost.is_leader() and not allow_config_change:
        changed = changed_fields(stage_dir, config)
    changed = multihost.broadcast_json(changed)
    if changed:
        raise ConfigError(
            f"stage {stage!r} finished in {stage_dir!r} under another config ({changed}); "
            "use another --workdir, delete that directory to run the stage again, or pass "
            "--allow_config_change to reuse it")


def changed_fields(workdir: str, config: ml_collections.ConfigDict) -> str:
    """The differing fields of ``workdir``'s stored config and ``config``, as text (empty
    when they agree or nothing is stored)."""
    if not os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        return ""
    changed = differences(checkpoint.read_config(workdir), config)
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed[:5])
    return shown + ("; ..." if len(changed) > 5 else "")


def check_kind(workdir: str, *, stages: bool) -> None:
    """A single run and a run of several stages (chain, pipeline) never share a workdir:
    one would overwrite the other's summary."""
    if stages and os.path.exists(os.path.join(workdir, checkpoint.CONFIG_FILE)):
        raise ConfigError(f"--workdir={workdir!r} holds a single run: give this run of "
                          "several stages another workdir")
    path = os.path.join(workdir, metrics.SUMMARY_FILE)
    if not stages and os.path.exists(path) and not os.path.exists(
            os.path.join(workdir, checkpoint.CONFIG_FILE)):
        with open(path) as f:
            names = json.load(f).get("stage_order")
        if names:
            raise ConfigError(f"--workdir={workdir!r} holds a run of several stages "
                              f"({', '.join(names)}): give this run another workdir")


def differences(before: ml_collections.ConfigDict, now: ml_collections.ConfigDict
                ) -> list[tuple[str, Any, Any]]:
    """``(field, before, now)`` of every result-changing field that differs.

    A field that ``before`` lacks and ``now`` holds at its default is no difference: a
    later jaxkd added the field, with a default that keeps what runs did before it.
    """
    a = flatten(ml_collections.ConfigDict(before.to_dict()).to_dict())
    b = flatten(ml_collections.ConfigDict(now.to_dict()).to_dict())
    new_defaults = flatten(schema.defaults(Run).to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not k.startswith(RESULT_NEUTRAL_FIELDS)
            and not (k not in a and k in new_defaults and b.get(k) == new_defaults[k])]


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
