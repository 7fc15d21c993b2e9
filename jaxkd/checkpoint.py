"""Orbax checkpoints of the whole training state, and reading a finished run's weights.

A run's ``workdir`` holds ``checkpoints/<step>/`` written by an Orbax ``CheckpointManager``
(asynchronous saves, ``max_to_keep``) and ``config.json``, the resolved config of the run.
The state is one pytree (params, BatchNorm statistics, optimizer state, step, RNG), so a
restored run continues exactly where it stopped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaxkd import files, multihost
from jaxkd.schema import ConfigError, MissingError

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"  # the model's name, kwargs, classes and input shape
SEAL_FILE = "jaxkd_sha256.json"


def make_manager(workdir: str, *, max_to_keep: int, asynchronous: bool = True
                 ) -> ocp.CheckpointManager:
    """The run's CheckpointManager over ``workdir/checkpoints``; the unfinished writes that
    a kill left behind (``*.orbax-checkpoint-tmp*``, never a checkpoint) are removed."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.isdir(directory):  # on every process (file systems need not be shared)
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    multihost.sync("jaxkd_checkpoint_tmp_removed")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Starts an asynchronous save of ``state`` at ``step``, sealing the finished ones first.

    Orbax finalises a checkpoint by an atomic rename, so a kill during the write leaves no
    step that looks complete. Sealing adds a sha256 of every file of each finished step,
    so that a later change to its bytes (truncation, garbage, a lost file) is detected.
    """
    finish(manager)
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def finish(manager: ocp.CheckpointManager) -> None:
    """Waits for the save in flight and seals every finished step."""
    manager.wait_until_finished()
    if multihost.is_leader():
        for step in manager.all_steps():
            step_dir = os.path.join(str(manager.directory), str(step))
            if not os.path.exists(os.path.join(step_dir, SEAL_FILE)):
                files.write_json(os.path.join(step_dir, SEAL_FILE), file_hashes(step_dir))


def file_hashes(step_dir: str) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of a checkpoint step but its seal."""
    hashes = {}
    for root, _, names in os.walk(step_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != SEAL_FILE:
                hashes[rel] = files.sha256(path)
    return hashes


def check_sealed(step_dir: str) -> str | None:
    """What is wrong with a sealed checkpoint's files, or None (also for unsealed ones)."""
    seal = os.path.join(step_dir, SEAL_FILE)
    if not os.path.exists(seal):
        return None
    try:
        with open(seal) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return f"{SEAL_FILE} is unreadable"
    actual = file_hashes(step_dir)
    for rel, digest in sorted(expected.items()):
        if rel not in actual:
            return f"{rel} is missing"
        if actual[rel] != digest:
            return f"{rel} does not match its sha256"
    extra = sorted(set(actual) - set(expected))
    return f"{extra[0]} was added after the checkpoint was written" if extra else None


def quarantine(workdir: str, step: int, reason: str) -> str:
    """Moves an unusable checkpoint to ``workdir/corrupt_checkpoints/`` (never deletes it)."""
    source = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    target = os.path.join(workdir, CORRUPT_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(source, target)
    print(f"jaxkd: the checkpoint at step {step} in {workdir} is unusable ({reason}); "
          f"moved it to {target} and trying the previous one", file=sys.stderr, flush=True)
    return target


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores the state saved at ``step`` with the structure/shardings of ``abstract_state``."""
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(manager: ocp.CheckpointManager, workdir: str, abstract_state: Any
                   ) -> tuple[Any, int]:
    """The newest usable checkpoint as ``(state, step)``, or ``(None, 0)`` if there is none.

    A checkpoint whose files fail their seal or that Orbax cannot read is moved aside with a
    message naming it, and the previous one is tried.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = os.path.join(workdir, CHECKPOINT_DIR, str(step))
        problem = check_sealed(step_dir)
        if problem is None:
            try:
                return restore(manager, step, abstract_state), step
            except Exception as e:  # noqa: BLE001 - any failure to read means unusable
                problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if multihost.is_leader():
            quarantine(workdir, step, problem)
        multihost.sync(f"jaxkd quarantine {step}")
        manager.reload()
    return None, 0


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``state``, as a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config as ``workdir/config.json`` (atomically)."""
    files.write_text(os.path.join(workdir, CONFIG_FILE),
                     config.to_json_best_effort(indent=2, sort_keys=True))


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads a run's resolved config; a one-line error if ``workdir`` holds no run."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise MissingError(
            f"{path} does not exist: is {workdir!r} the workdir of a jaxkd run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def latest_step(workdir: str) -> int | None:
    """The newest complete checkpoint step under ``workdir``, or None."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        return None
    with ocp.CheckpointManager(os.path.abspath(directory)) as manager:
        return manager.latest_step()


WEIGHTS_FILE = "weights.npz"


def save_weights(workdir: str, variables: Any) -> int:
    """Writes the model's variables as an uncompressed ``.npz`` of float arrays keyed by
    parameter path (loads with ``allow_pickle=False``); returns its size in bytes."""
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(variables))
    }
    if multihost.is_leader():
        buffer = io.BytesIO()
        np.savez(buffer, **flat)
        return files.write_bytes(os.path.join(workdir, WEIGHTS_FILE), buffer.getvalue())
    return sum(v.nbytes for v in flat.values())


def restore_variables(workdir: str, step: int, abstract_variables: Any, *, field: str) -> Any:
    """Reads only the model variables (``params``, ``batch_stats``) of a run's checkpoint."""
    manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)))
    try:
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(
            item=abstract_variables,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_variables),
            partial_restore=True))
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{field}={workdir!r}: its checkpoint at step {step} does not fit the "
                         f"model in its model.json ({str(e).splitlines()[0][:200]})") from e
    finally:
        manager.close()
    return restored
