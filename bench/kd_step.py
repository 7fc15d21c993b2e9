"""jaxkd's KD train step against a hand-written plain-JAX step of the same Hinton MLPs.

    python bench/kd_step.py [--steps 100] [--rounds 9] [--batch_sizes 128,512] [--docs]

Prints samples/s of (a) a plain-JAX Hinton-KD step (hand-written MLP forward, loss and
optax Adam), (b) jaxkd's ``train_step`` with the same teacher (784-1200-1200-10) and student
(784-800-800-10), (c) jaxkd's student-only step, (d) jaxkd's step on precomputed top-8
teacher logits streamed in the batch and (e) the teacher's forward pass alone; then the
ratios jaxkd/plain (target >= 0.95), precomputed/student-only (target <= 1.05) and the
in-step teacher's cost (KD step - student step) / teacher forward (target <= 1), all
measured in this one process on the default device, the five interleaved in ``--rounds``
rounds: each ratio is the median over rounds with its min-max, judged against its target,
or flagged as too noisy to judge (``bench/timing.py``). With ``--docs`` the table goes to
``docs/tables/kd_step.md``.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import publish
from timing import interleaved, ratio

from jaxkd import models, objective, train
from jaxkd.config import hinton_losses, supervised_losses

T, ALPHA = 20.0, 0.9


def plain_mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.relu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def plain_init(key, sizes):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
                       jnp.zeros(fan_out)))
    return params


def make_plain_step(tx, forward, teacher_forward=None, *, temperature=T, alpha=ALPHA):
    """A jitted plain-JAX Hinton-KD step (donated state): ``forward(params, *inputs)`` is
    the student's logits, ``teacher_forward`` the teacher's (default: ``forward``);
    ``step(params, opt_state, teacher_params, inputs, labels)``."""
    teacher_forward = teacher_forward or forward

    def step(params, opt_state, teacher_params, inputs, y):
        t = jax.lax.stop_gradient(teacher_forward(teacher_params, *inputs))

        def loss_fn(p):
            s = forward(p, *inputs)
            log_ps = jax.nn.log_softmax(s / temperature)
            log_pt = jax.nn.log_softmax(t / temperature)
            kd = temperature**2 * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), -1).mean()
            ce = -jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], -1).mean()
            return alpha * kd + (1 - alpha) * ce

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch_sizes", default="128,512")
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    tx = optax.adam(1e-3)
    rows = ["| batch | plain-JAX KD samples/s | jaxkd KD samples/s | jaxkd / plain | "
            "KD / student-only | precomputed top-8 / student-only | (KD − student) / "
            "teacher forward |", "|---:|---:|---:|---|---:|---|---|"]
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(batch, 784)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
        data = {"image": x, "label": y}

        # (a) plain JAX
        teacher_p = plain_init(jax.random.PRNGKey(1), [784, 1200, 1200, 10])
        box = {"p": plain_init(jax.random.PRNGKey(2), [784, 800, 800, 10])}
        box["o"] = tx.init(box["p"])
        plain_step = make_plain_step(tx, plain_mlp)

        def run_plain(box=box, teacher_p=teacher_p, plain_step=plain_step, x=x, y=y):
            box["p"], box["o"], loss = plain_step(box["p"], box["o"], teacher_p, (x,), y)
            return loss

        # (b) jaxkd KD step and (c) jaxkd student-only step
        student = models.get_model("mlp", num_classes=10, widths=(800, 800))
        teacher = models.get_model("mlp", num_classes=10, widths=(1200, 1200))
        teacher_vars = {"params": teacher.init(jax.random.PRNGKey(1), x[:1])["params"]}

        topk = jax.lax.top_k(plain_mlp(teacher_p, x), 8)
        residual = -jnp.expm1(jax.nn.logsumexp(topk[0] / T, -1)
                              - jax.nn.logsumexp(plain_mlp(teacher_p, x) / T, -1))
        data_topk = {**data, "teacher_topk_logits": topk[0], "teacher_topk_indices": topk[1],
                     "teacher_topk_residual": residual}

        def jaxkd_runner(losses, teacher_model, student=student, teacher_vars=teacher_vars,
                         data=data, has_teacher=None):
            terms = objective.parse_terms(
                losses, has_teacher=has_teacher or teacher_model is not None)
            objective_fn = objective.build_objective(terms, num_steps=args.steps)
            teacher_models = [teacher_model] if teacher_model is not None else []
            step = jax.jit(train.make_train_step(student, tx, objective_fn, teacher_models),
                           donate_argnums=(0,))
            box = {"s": train.init_state(student, tx, (784,), 0)}
            tv = [teacher_vars] if teacher_model is not None else []

            def run(box=box, step=step, tv=tv, data=data):
                box["s"], m = step(box["s"], data, tv)
                return m["loss_sum"]

            return run

        run_kd = jaxkd_runner(hinton_losses(ALPHA, T), teacher)
        run_student = jaxkd_runner(supervised_losses(), None)
        run_topk = jaxkd_runner(
            {"kd": {"name": "topk_soft_target_kl", "weight": ALPHA,
                    "kwargs": {"temperature": T}},
             "ce": {"name": "cross_entropy", "weight": 1 - ALPHA}},
            None, data=data_topk, has_teacher=True)
        teacher_forward = jax.jit(functools.partial(teacher.apply, train=False))

        def run_teacher(teacher_vars=teacher_vars, x=x, teacher_forward=teacher_forward):
            return teacher_forward(teacher_vars, x)

        # Interleave the measurements so that machine noise hits all of them alike.
        times = interleaved({"plain": run_plain, "kd": run_kd, "student": run_student,
                             "topk": run_topk, "teacher": run_teacher},
                            rounds=args.rounds, calls=args.steps)
        sps = {k: batch / np.median(v) for k, v in times.items()}
        teacher_cost = ratio(times["kd"] - times["student"], times["teacher"])
        rows.append(
            f"| {batch} | {sps['plain']:,.0f} | {sps['kd']:,.0f} | "
            f"{ratio(times['plain'], times['kd']).text(target=('>=', 0.95))} | "
            f"{ratio(times['kd'], times['student']).text(digits=2)} | "
            f"{ratio(times['topk'], times['student']).text(target=('<=', 1.05))} | "
            f"{teacher_cost.text(target=('<=', 1.0), digits=2)} |")
        print(rows[-1], flush=True)
    publish("kd_step", "\n".join(rows) + f"\n\nMedian over {args.rounds} interleaved rounds "
            f"of {args.steps} steps (min-max in brackets).", docs=args.docs)

if __name__ == "__main__":
    main()
