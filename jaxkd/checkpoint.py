"""Orbax checkpoints of the whole training state, and reading a finished run's weights.

A run's ``workdir`` holds ``checkpoints/<step>/`` written by an Orbax ``CheckpointManager``
(asynchronous saves, ``max_to_keep``) and ``config.json``, the resolved config of the run.
The state is one pytree (params, BatchNorm statistics, optimizer state, step, RNG), so a
restored run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


def make_manager(workdir: str, *, max_to_keep: int, asynchronous: bool = True
                 ) -> ocp.CheckpointManager:
    """The run's CheckpointManager over ``workdir/checkpoints``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous, create=True
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
                                 options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False) -> None:
    """Starts an (asynchronous) save of ``state`` at ``step``."""
    manager.save(step, args=ocp.args.StandardSave(state), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores the state saved at ``step`` with the structure/shardings of ``abstract_state``."""
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``state``, as a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config as ``workdir/config.json`` (atomically)."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """Reads a run's resolved config; a one-line error if ``workdir`` holds no run."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
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
    path = os.path.join(workdir, WEIGHTS_FILE)
    if jax.process_index() == 0:
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **flat)
        os.replace(path + ".tmp", path)
        return os.path.getsize(path)
    return sum(v.nbytes for v in flat.values())
