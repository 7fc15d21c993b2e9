"""Three KD train steps on however many devices this process has (for test_train)."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkd import models, objective, teachers, train
from jaxkd.config import hinton_losses, run_config
from jaxkd.data import pipeline


def three_steps(data_dir: str, teacher_dir: str) -> dict[str, np.ndarray]:
    c = run_config("mnist1d", "mlp", widths=(32, 32))
    c.data.data_dir = data_dir
    c.data.transfer_split = "unlabelled"
    c.batch_size = 64
    c.num_steps = 3
    c.distill.teacher.workdir = teacher_dir
    c.distill.losses = hinton_losses(alpha=0.7, temperature=3.0)
    info = pipeline.get_info(c.data)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = models.get_model("mlp", num_classes=info.num_classes, widths=(32, 32))
    teacher = teachers.load(teacher_dir, sharding=replicated)
    _, tx = train.build_optimizer(c, info)
    objective_fn = objective.build_objective(
        objective.parse_terms(c.distill.losses, has_teacher=True), num_steps=c.num_steps)
    state = jax.jit(lambda: train.init_state(model, tx, info.input_shape, c.seed),
                    out_shardings=replicated)()
    step = jax.jit(train.make_train_step(model, tx, objective_fn, [teacher.model]),
                   donate_argnums=(0,), out_shardings=(replicated, replicated))
    batches = pipeline.train_batches(c.data, batch_size=c.batch_size, seed=c.seed)
    for _ in range(3):
        batch = {k: jax.device_put(v, sharded) for k, v in next(batches).items()}
        state, _ = step(state, batch, [teacher.variables])
        # Wait on every step: back-to-back steps over fake CPU devices can abort in an
        # XLA rendezvous on this machine (never needed on real accelerators).
        jax.block_until_ready(state)
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def kd_steps_on_mesh(data_dir: str, teacher_dir: str, mesh: dict, steps: int = 3
                     ) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """``steps`` KD steps of the trainer's own parts (``train.build``: mesh, layouts of
    student and teacher, state shardings) on ``config.mesh = mesh``; returns the student's
    parameters and, for every parameter of student and teacher, ``[total bytes, bytes on
    one device, shards its spec implies]``."""
    from jaxkd import partitioning
    from jaxkd.prefetch import device_batches

    c = run_config("mnist1d", "mlp", widths=(64, 64))
    c.data.data_dir = data_dir
    c.data.transfer_split = "unlabelled"
    c.batch_size, c.num_steps = 64, steps
    c.distill.teacher.workdir = teacher_dir
    c.distill.losses = hinton_losses(alpha=0.7, temperature=3.0)
    c.mesh.update(**mesh)
    s = train.build(train.parse_run(c))
    state = train.fresh_state(s, initialise=True)
    step = train.jitted_train_step(s, state)
    batches = device_batches(pipeline.train_batches(c.data, batch_size=c.batch_size,
                                                    seed=c.seed), s.data_sharding)
    for _ in range(steps):
        state, _ = step(state, next(batches), [t.variables for t in s.teachers])
        jax.block_until_ready(state)
    report = {}
    trees = {"student": state.params, "opt_state": state.opt_state,
             "teacher": s.teachers[0].variables["params"]}
    for name, tree in trees.items():
        for keys, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            spec = x.sharding.spec
            shards = 1
            for axes in spec:
                for a in (axes,) if isinstance(axes, str) else (axes or ()):
                    shards *= s.mesh.shape[a]
            report[f"{name}/{partitioning.path_of(keys)}"] = [
                int(x.nbytes), int(x.addressable_shards[0].data.nbytes), shards]
    flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state.params))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}, report
