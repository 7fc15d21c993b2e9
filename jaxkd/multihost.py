"""Several processes, one run: who writes, and how the others learn what it found.

Process 0 is the *leader*: it alone writes a run's files besides the checkpoints
(summaries, ``config.json``, ``weights.npz``, the artifact) and alone reads them back, so
a TPU VM without a shared file system works (every process writes its own checkpoint
shards, as Orbax does). What the others need from those files (a stage already finished,
an artifact's accuracy) the leader sends them with :func:`broadcast_json`.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def is_leader() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all arrive (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_json(value: Any) -> Any:
    """The leader's ``value`` (anything ``json`` writes) on every process."""
    if jax.process_count() == 1:
        return value
    data = json.dumps(value, default=_json_default).encode() if is_leader() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
    buffer = np.zeros(size, np.uint8)
    if is_leader():
        buffer[:] = np.frombuffer(data, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
    return json.loads(received.tobytes().decode())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return np.asarray(value).tolist()
    return str(value)
