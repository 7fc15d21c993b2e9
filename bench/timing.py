"""Wall-clock timing shared by the bench scripts (never used by tests)."""

import time

import jax


def seconds_per_call(fn, calls: int) -> float:
    """Mean seconds of ``fn()`` over ``calls`` back-to-back calls, after two warm-up calls
    (compilation); waits for the device before stopping the clock."""
    fn()
    fn()
    start = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls
