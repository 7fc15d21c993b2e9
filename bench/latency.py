"""Inference latency of the exported integer artifact against the float model, one way.

    python bench/latency.py [--rounds 7] [--calls 50] [--docs]

For each model (MNIST-1D MLP 100-100 and CNN, the Hinton student MLP 784-800-800 and
LeNet-5 on 28x28) and batch size (1, 100, 1000) it times, in this one process on the
default device, with the input already on the device and every function jitted and
compiled first:

- ``fp32``: ``model.apply`` of the float model;
- ``int8``: ``jaxkd.export.load`` of its w8a8 artifact (int8 x int8 -> int32 matmuls);
- ``int4``: the same with 4-bit weights (unpacked at load; the matmuls are still int8).

Rounds are interleaved (fp32, int8, int4, fp32, ...); it prints the median time per call
in ms, the min-max over rounds, and the median ratio artifact / fp32 over rounds with its
min-max, and says when the spread makes a ratio meaningless (``bench/timing.py``). With
``--docs`` the table goes to ``docs/tables/latency.md``. Weights are random (latency
does not depend on their values); activation ranges are calibrated on one batch. About 2
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import publish
from timing import ratio

from jaxkd import export, models, quant

MODELS = {
    "mnist1d mlp 100-100": ("mlp", {"widths": (100, 100)}, (40,)),
    "mnist1d cnn": ("cnn1d", {}, (40,)),
    "mlp 784-800-800": ("mlp", {"widths": (800, 800)}, (784,)),
    "lenet5 28x28": ("lenet5", {}, (28, 28, 1)),
}
BATCHES = (1, 100, 1000)


MIN_SECONDS = 0.05  # per measurement: microsecond calls need thousands of repeats


def per_call(fn, x, calls: int) -> float:
    """Milliseconds per call over at least ``calls`` calls and :data:`MIN_SECONDS`."""
    jax.block_until_ready(fn(x))
    done, start = 0, time.perf_counter()
    while True:
        out = None
        for _ in range(calls):
            out = fn(x)
        jax.block_until_ready(out)
        done += calls
        elapsed = time.perf_counter() - start
        if elapsed >= MIN_SECONDS:
            return elapsed / done * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    lines = ["| model | batch | fp32 ms | int8 ms | int8 / fp32 | int4 ms | int4 / fp32 |",
             "|---|---:|---:|---:|---|---:|---|"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n, (label, (name, kwargs, shape)) in enumerate(MODELS.items()):
            model = models.get_model(name, num_classes=10, **kwargs)
            calib = jnp.asarray(rng.normal(size=(256, *shape)), jnp.float32)
            variables = jax.jit(model.init)(jax.random.PRNGKey(0), calib[:1])
            ranges = quant.calibrate(model, variables, [calib])
            fns = {"fp32": jax.jit(lambda x, v=variables, m=model: m.apply(v, x))}
            for bits in (8, 4):
                directory = os.path.join(tmp, f"{n}-{name}-{bits}")
                export.export(directory, name, kwargs, 10, variables,
                              {"weight_bits": bits, "activation_bits": 8}, ranges, {},
                              input_shape=shape)
                fns[f"int{bits}"] = export.load(directory)[0]
            for batch in BATCHES:
                x = jax.device_put(jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32))
                times = {k: [] for k in fns}
                for r in range(args.rounds + 1):
                    for k, fn in fns.items():
                        t = per_call(fn, x, args.calls)
                        if r:  # round 0 warms up
                            times[k].append(t)
                cells = [f"{np.median(times['fp32']):.3f} ({min(times['fp32']):.3f} - "
                         f"{max(times['fp32']):.3f})"]
                for k in ("int8", "int4"):
                    cells += [f"{np.median(times[k]):.3f}",
                              ratio(times[k], times["fp32"]).text(digits=2)]
                lines.append(f"| {label} | {batch} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    lines += ["", f"Milliseconds per call on {jax.devices()[0].platform}, median (min - max) of "
              f"{args.rounds} interleaved rounds (after a warm-up round) of at least {args.calls} "
              f"calls and {1e3 * MIN_SECONDS:.0f} ms; input on the device, every function "
              "jitted."]
    publish("latency", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
