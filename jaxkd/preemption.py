"""Stopping cleanly on SIGTERM (a preemption notice) or SIGINT (Ctrl-C).

The first signal asks the training loop to stop after the step in flight: it writes a
checkpoint and raises :class:`Preempted`, which the launcher turns into one line and the
exit status ``128 + signal``; relaunching the same command continues from that step. A
second signal exits at once. With several processes, the processes agree at the next
logging step (an all-gather of the flag), so that every one of them saves the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):  # noqa: N818 (it is a request, not an error)
    """Raised once the state at ``step`` is checkpointed after a stop signal."""

    def __init__(self, step: int, signum: int, workdir: str):
        self.step, self.signum, self.workdir = step, signum, workdir
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; the checkpoint is in {workdir}; "
                         "relaunch the same command to continue")


class StopSignal:
    """Context manager that turns the first SIGTERM/SIGINT into a stop request."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum is not None:
            print(f"jaxkd: second {signal.Signals(signum).name}: exiting now", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"jaxkd: {signal.Signals(signum).name} received: stopping after this step "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def requested(self, *, sync: bool) -> int | None:
        """The signal to stop for, or None. ``sync``: agree across processes (collective)."""
        if jax.process_count() == 1 or not sync:
            return self.signum if jax.process_count() == 1 else None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        signums = [int(s) for s in np.ravel(flags) if s]
        return signums[0] if signums else None
