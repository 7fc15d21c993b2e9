"""Host batches onto the devices ahead of the step that needs them.

:func:`to_global` makes one global ``jax.Array`` per field from this process's rows
(``jax.make_array_from_process_local_data``), sharded like ``sharding`` (the batch axis
over the mesh's data axis). :func:`device_prefetch` does that in a background thread,
``size`` batches ahead, so the transfer overlaps the step in flight; grain computes the
host batches ahead in its own threads (:mod:`jaxkd.data.pipeline`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host-local rows -> one global array per field, sharded over the ``data`` axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_prefetch(batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding,
                    size: int = 2) -> Iterator[dict[str, jax.Array]]:
    """Moves batches to the devices from a background thread, ``size`` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def producer():
        try:
            for batch in batches:
                item = to_global(batch, sharding)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=producer, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
