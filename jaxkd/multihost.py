"""Several processes, one run: who writes, and how the others learn what it found.

Process 0 is the *leader*: it alone writes a run's files besides the checkpoints
(summaries, ``config.json``, ``weights.npz``, the artifact) and alone reads them back, so
a TPU VM without a shared file system works (every process writes its own checkpoint
shards, as Orbax does). What the others need from those files (a stage already finished,
an artifact's accuracy) the leader sends them with :func:`broadcast_json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

# jax is imported inside the functions: command lines build their parsers (and print
# --help) without it.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags that join processes into one job."""
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() (cluster found automatically)")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    parser.add_argument("--num_processes", type=int, default=None,
                        help="number of processes")
    parser.add_argument("--process_id", type=int, default=None, help="this process's index")


def initialize(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` when the flags of :func:`add_arguments` ask for it;
    a one-line error and exit status 2 when it fails."""
    if not (args.coordinator_address or args.distributed):
        return
    import jax

    try:
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id)
    except (ValueError, RuntimeError) as e:
        what = "--distributed" if args.distributed else "--coordinator_address"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"jaxkd: error: {what}: jax.distributed.initialize() failed ({first}); on one "
              "machine leave out --distributed, else pass --coordinator_address, "
              "--num_processes and --process_id", file=sys.stderr)
        sys.exit(2)


def is_leader() -> bool:
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """Every process waits here until all arrive (no-op with one process)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_json(value: Any) -> Any:
    """The leader's ``value`` (anything ``json`` writes) on every process."""
    import jax
    from jax.experimental import multihost_utils

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
