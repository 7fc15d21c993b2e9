"""Sharding a KD step: per-device memory and step time, replicated against FSDP.

    python bench/scale.py [--student 2048,2048] [--teacher 4096,4096] [--batch 256]
                          [--steps 5] [--rounds 3] [--docs]

The jaxkd KD step (``jaxkd.train.make_train_step`` with the layouts of
``jaxkd.partitioning``: weights gathered for the compute, state donated and kept sharded)
of an MLP teacher and an MLP student on 784 inputs, on every mesh of ``MESHES`` over the
devices of this process. On a CPU the script gives itself 8 fake devices
(``--xla_force_host_platform_device_count=8``, set before jax is imported), so memory is
the figure that matters and time only as a ratio (8 "devices" share the same cores).

For each mesh it prints: the bytes one device holds of the student's parameters, its
optimizer state and the teacher's parameters (from the arrays' addressable shards), XLA's
compiled memory analysis of the step per device (arguments, outputs, temporaries), and the
step time relative to the replicated mesh (interleaved rounds, ``bench/timing.py``). Then
bfloat16 against float32 on one mesh. On an accelerator it adds samples/s and, when the
device's peak is known, model FLOPs utilisation from XLA's cost analysis.
With ``--docs`` the table goes to ``docs/tables/scale.md``.
"""

from __future__ import annotations

import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "") and \
        os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import publish  # noqa: E402
from timing import Ratio, seconds_per_call  # noqa: E402

from jaxkd import models, objective, partitioning, train  # noqa: E402
from jaxkd.config import Mesh, hinton_losses  # noqa: E402

MESHES = {"replicated (data=8)": {"data": -1},
          "fsdp=8": {"data": 1, "fsdp": -1},
          "data=2, fsdp=4": {"data": 2, "fsdp": -1},
          "fsdp=4, tensor=2": {"data": 1, "fsdp": 4, "tensor": -1}}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, per chip


def setup(widths_s, widths_t, batch, mesh_fields, dtype="float32"):
    """(step, state, batch, teacher variables, mesh, layouts) on ``mesh_fields``."""
    settings = Mesh(**mesh_fields)
    mesh = partitioning.make_mesh(settings)
    layout = partitioning.layout(mesh, settings, "mlp")
    compute = {} if dtype == "float32" else {"dtype": dtype}
    student = models.get_model("mlp", num_classes=10, widths=widths_s, **compute)
    teacher = models.get_model("mlp", num_classes=10, widths=widths_t, **compute)
    tx = optax.adam(1e-3)
    terms = objective.parse_terms(hinton_losses(0.9, 4.0), has_teacher=True)
    objective_fn = objective.build_objective(terms, num_steps=1000)

    def init():
        return train.init_state(student, tx, (784,), 0)

    state = jax.jit(init, out_shardings=train.state_shardings(layout, jax.eval_shape(init)))()
    t_abstract = jax.eval_shape(teacher.init, jax.random.PRNGKey(1), jnp.zeros((1, 784)))
    teacher_vars = jax.jit(lambda: teacher.init(jax.random.PRNGKey(1), jnp.zeros((1, 784))),
                           out_shardings=layout.params(t_abstract))()
    step = jax.jit(train.make_train_step(student, tx, objective_fn, [teacher],
                                         gather=layout.gather,
                                         teacher_gathers=[layout.gather]),
                   donate_argnums=(0,),
                   out_shardings=(train.state_shardings(layout, state), layout.replicated))
    rng = np.random.default_rng(0)
    data = {"image": jax.device_put(rng.normal(size=(batch, 784)).astype(np.float32),
                                    layout.batch),
            "label": jax.device_put(rng.integers(0, 10, batch).astype(np.int32),
                                    layout.batch)}
    return step, state, data, teacher_vars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="2048,2048")
    parser.add_argument("--teacher", default="4096,4096")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    widths_s = tuple(int(w) for w in args.student.split(","))
    widths_t = tuple(int(w) for w in args.teacher.split(","))
    device = jax.devices()[0]
    accelerator = device.platform != "cpu"
    runners, lines = {}, [
        "| mesh | student params / device | optimizer state / device | teacher params / "
        "device | compiled: arguments + outputs + temporaries / device | step time / "
        "replicated |", "|---|---:|---:|---:|---:|---|"]
    mib = 2 ** 20
    rows = {}
    for name, fields in MESHES.items():
        step, state, data, teacher_vars = setup(widths_s, widths_t, args.batch, fields)
        memory = step.lower(state, data, [teacher_vars]).compile().memory_analysis()
        compiled = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                    + memory.temp_size_in_bytes) if memory is not None else float("nan")
        rows[name] = (partitioning.per_device_bytes(state.params) / mib,
                      partitioning.per_device_bytes(state.opt_state) / mib,
                      partitioning.per_device_bytes(teacher_vars) / mib, compiled / mib)
        box = {"s": state}

        def run(box=box, step=step, data=data, teacher_vars=teacher_vars):
            box["s"], m = step(box["s"], data, [teacher_vars])
            jax.block_until_ready(box["s"])  # fake CPU devices: one step at a time
            return m["loss_sum"]

        runners[name] = run
    times = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, run in runners.items():
            times[k].append(seconds_per_call(run, args.steps))
    base = next(iter(MESHES))
    for name, (p, o, t, c) in rows.items():
        ratio = Ratio(np.asarray(times[name]) / np.asarray(times[base])).text(digits=2)
        lines.append(f"| {name} | {p:.1f} MiB | {o:.1f} MiB | {t:.1f} MiB | {c:.1f} MiB | "
                     f"{ratio} |")
        print(lines[-1], flush=True)
    params_s = sum(x.size for x in jax.tree.leaves(jax.eval_shape(
        models.get_model("mlp", num_classes=10, widths=widths_s).init, jax.random.PRNGKey(0),
        jnp.zeros((1, 784)))))
    lines += ["", f"Student MLP 784-{'-'.join(map(str, widths_s))}-10 ({params_s:,} "
              f"parameters), teacher MLP 784-{'-'.join(map(str, widths_t))}-10, Adam, batch "
              f"{args.batch}, {jax.device_count()} {device.platform} devices; step time: "
              f"median of {args.rounds} interleaved rounds of {args.steps} steps (min-max)."]
    # bfloat16 against float32, FSDP over every device.
    precision = {}
    for dtype in ("float32", "bfloat16"):
        step, state, data, teacher_vars = setup(widths_s, widths_t, args.batch,
                                                {"data": 1, "fsdp": -1}, dtype)
        box = {"s": state}

        def run(box=box, step=step, data=data, teacher_vars=teacher_vars):
            box["s"], m = step(box["s"], data, [teacher_vars])
            jax.block_until_ready(box["s"])
            return m["loss_sum"]

        precision[dtype] = (run, step, state, data, teacher_vars)
    t = {k: [] for k in precision}
    for _ in range(args.rounds):
        for k, (run, *_rest) in precision.items():
            t[k].append(seconds_per_call(run, args.steps))
    lines += ["", "| fsdp over every device | step time / float32 | samples/s |"
              + (" model FLOPs utilisation |" if accelerator else ""),
              "|---|---|---:|" + ("---:|" if accelerator else "")]
    for k in precision:
        ratio = Ratio(np.asarray(t[k]) / np.asarray(t["float32"])).text(digits=2)
        row = f"| {k} | {ratio} | {args.batch / np.median(t[k]):,.0f} |"
        if accelerator:
            _, step, state, data, tv = precision[k]
            cost = step.lower(state, data, [tv]).compile().cost_analysis()
            flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
            peak = next((v for n, v in PEAK_FLOPS.items() if n in device.device_kind), None)
            row += (f" {flops / np.median(t[k]) / (peak * jax.device_count()):.1%} |"
                    if peak and flops else " unknown peak |")
        lines.append(row)
        print(row, flush=True)
    publish("scale", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    sys.exit(main())
