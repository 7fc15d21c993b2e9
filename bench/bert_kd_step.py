"""jaxkd's KD train step for a BERT pair against a hand-written plain-JAX step of the same models.

    python bench/bert_kd_step.py [--steps 10] [--rounds 5] [--batch 16] [--length 128] [--docs]

Teacher: all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, FFN 1536, vocabulary
30,522); student: its first 3 layers' shape; random weights (speed does not depend on them),
dropout off in both steps, mean pooling, 5 classes. Both steps compute Hinton KD (T = 4,
alpha = 0.5) + cross-entropy on the same token batch (``--batch`` sequences of ``--length``
tokens, the last quarter of each padded) and update the student with AdamW:

- plain JAX: the BERT forward written out here on the student's and teacher's parameter
  trees (embeddings, post-LN attention with the padding bias, exact GELU FFN, masked mean
  pooling, head), ``jax.value_and_grad`` and ``optax.adamw``, one ``jax.jit`` with donated
  state;
- jaxkd: ``jaxkd.train.make_train_step`` with the text task and the same losses.

Prints tokens/s of both and their ratio (target >= 0.95), median over ``--rounds``
interleaved rounds with its min-max (``bench/timing.py``). With ``--docs`` the table goes to
``docs/tables/bert_kd_step.md``.
"""

import argparse
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import publish
from kd_step import make_plain_step
from timing import interleaved, ratio

from jaxkd import models, objective, tasks, train
from jaxkd.config import hinton_losses

T, ALPHA = 4.0, 0.5
TEACHER = {"vocab_size": 30522, "hidden_size": 384, "num_layers": 6, "num_heads": 12,
           "intermediate_size": 1536, "max_position": 512, "pooling": "mean",
           "dropout_rate": 0.0, "attention_dropout_rate": 0.0}
STUDENT = {**TEACHER, "num_layers": 3}


def layer_norm(p, x, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def plain_bert(params, ids, mask, *, num_layers, heads):
    """Logits of the BERT with parameters ``params`` (jaxkd's tree, HF's layout)."""
    e = params["embeddings"]
    x = (e["word_embeddings"]["embedding"][ids]
         + e["position_embeddings"]["embedding"][None, :ids.shape[1]]
         + e["token_type_embeddings"]["embedding"][0])
    x = layer_norm(e["LayerNorm"], x)
    bias = -10000.0 * (1.0 - mask[:, None, None, :].astype(jnp.float32))
    b, length, hidden = x.shape
    d = hidden // heads
    for i in range(num_layers):
        p = params[f"layer{i}"]
        a = p["attention"]

        def split(name, a=a, x=x):
            return dense(a[name], x).reshape(b, length, heads, d).transpose(0, 2, 1, 3)

        scores = split("query") @ split("key").transpose(0, 1, 3, 2) / math.sqrt(d) + bias
        context = (jax.nn.softmax(scores, -1) @ split("value")).transpose(0, 2, 1, 3)
        x = layer_norm(a["LayerNorm"], x + dense(a["output"], context.reshape(b, length, -1)))
        h = jax.nn.gelu(dense(p["intermediate"], x), approximate=False)
        x = layer_norm(p["LayerNorm"], x + dense(p["output"], h))
    m = mask[..., None].astype(jnp.float32)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return dense(params["head"], pooled)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    b, length = args.batch, args.length
    ids = jnp.asarray(rng.integers(1, TEACHER["vocab_size"], size=(b, length)), jnp.int32)
    mask = jnp.asarray(np.arange(length)[None] < length - length // 4, jnp.int32)
    mask = jnp.broadcast_to(mask, (b, length))
    ids = ids * mask
    labels = jnp.asarray(rng.integers(0, 5, size=b), jnp.int32)
    tx = optax.adamw(1e-4, weight_decay=0.01)

    teacher = models.get_model("bert", num_classes=5, **TEACHER)
    student = models.get_model("bert", num_classes=5, **STUDENT)
    teacher_vars = {"params": teacher.init(jax.random.PRNGKey(1), ids[:1], mask[:1])["params"]}
    task = tasks.TEXT_CLASSIFICATION
    terms = objective.parse_terms(hinton_losses(ALPHA, T), has_teacher=True)
    step = jax.jit(train.make_train_step(student, tx, objective.build_objective(
        terms, num_steps=args.steps), [teacher], task=task), donate_argnums=(0,))
    box = {"s": train.init_state(student, tx, (length,), 0, task=task)}
    data = {"input_ids": ids, "attention_mask": mask, "label": labels}

    def run_jaxkd():
        box["s"], metrics = step(box["s"], data, [teacher_vars])
        return metrics["loss_sum"]

    plain = {"p": jax.tree.map(jnp.copy, box["s"].params)}
    plain["o"] = tx.init(plain["p"])
    plain_step = make_plain_step(
        tx, functools.partial(plain_bert, num_layers=STUDENT["num_layers"], heads=12),
        functools.partial(plain_bert, num_layers=TEACHER["num_layers"], heads=12),
        temperature=T, alpha=ALPHA)

    def run_plain():
        plain["p"], plain["o"], loss = plain_step(plain["p"], plain["o"],
                                                  teacher_vars["params"], (ids, mask), labels)
        return loss

    # The same function: the first step's loss from the same weights and batch.
    first = {"plain": float(run_plain()), "jaxkd": float(run_jaxkd())}
    same = abs(first["plain"] - first["jaxkd"]) <= 1e-4 * abs(first["plain"])
    print(f"first-step loss: plain {first['plain']:.6f}, jaxkd {first['jaxkd']:.6f} "
          f"({'equal' if same else 'DIFFERENT'})", flush=True)
    if not same:
        raise SystemExit("the two steps do not compute the same loss: nothing to compare")
    times = interleaved({"plain": run_plain, "jaxkd": run_jaxkd}, rounds=args.rounds,
                        calls=args.steps)
    tokens = b * length
    tps = {k: tokens / np.median(v) for k, v in times.items()}
    rows = ["| batch x tokens | plain-JAX KD tokens/s | jaxkd KD tokens/s | jaxkd / plain |",
            "|---|---:|---:|---|",
            f"| {b} x {length} | {tps['plain']:,.0f} | {tps['jaxkd']:,.0f} | "
            f"{ratio(times['plain'], times['jaxkd']).text(target=('>=', 0.95))} |"]
    publish("bert_kd_step", "\n".join(rows) + (
        f"\n\nTeacher 6 x 384 (all-MiniLM-L6-v2's shape), student 3 x 384, random weights, "
        f"Hinton KD (T = {T:g}, alpha = {ALPHA}) + CE, AdamW; median over {args.rounds} "
        f"interleaved rounds of {args.steps} steps (min-max in brackets)."), docs=args.docs)


if __name__ == "__main__":
    main()
