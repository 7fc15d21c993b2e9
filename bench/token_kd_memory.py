"""Peak memory of token-level KD at Gemma 3's vocabulary: chunked (jaxkd.token_kd) vs naive.

    python bench/token_kd_memory.py [--docs]

For the gradient of the forward-KL distillation loss with respect to the student's hidden
states and LM head (a 640-wide student and a 640-wide teacher with a tied 262,144 x 640
head, as Gemma 3 270M's), XLA's compiled memory analysis (``temp_size_in_bytes``: every
buffer the step allocates besides its inputs and outputs) of the naive loss, which holds
the ``[B L, V]`` logits, against :func:`jaxkd.token_kd.token_losses` for several chunk
sizes. Compiled only, never run: the naive step does not fit this machine. Then the step
time of both, at a vocabulary that fits (32,768), measured here in one process
(interleaved rounds, ``bench/timing.py``). About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from common import publish
from timing import Ratio, interleaved

from jaxkd import losses, token_kd

VOCAB, WIDTH = 262_144, 640  # Gemma 3 270M
SHAPES = ((1, 512), (8, 512), (8, 2048))  # (sequences, tokens each)
CHUNKS = (256, 1024)


def step(fn, **extra):
    """The gradient of the masked-mean forward KL w.r.t. the student's hidden states and
    head (the teacher's head tied: its embedding table)."""

    def loss(h_s, w_s, h_t, e_t, mask):
        out = fn(h_s, h_t, mask, student_head=token_kd.dense_head(w_s),
                 teacher_head=token_kd.tied_head(e_t), **extra)
        return losses.masked_mean(out.divergence, mask)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def abstract(batch: int, length: int, vocab: int) -> tuple:
    f32 = jnp.float32
    return (jax.ShapeDtypeStruct((batch, length, WIDTH), f32),
            jax.ShapeDtypeStruct((WIDTH, vocab), f32),
            jax.ShapeDtypeStruct((batch, length, WIDTH), f32),
            jax.ShapeDtypeStruct((vocab, WIDTH), f32),
            jax.ShapeDtypeStruct((batch, length), f32))


def peak_bytes(fn, shapes, **extra) -> int:
    return step(fn, **extra).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--docs", action="store_true")
    args = parser.parse_args()
    lines = ["| tokens (sequences x length) | one [B L, V] float32 logits | naive | "
             + " | ".join(f"chunked, {c} tokens" for c in CHUNKS) + " | naive / chunked |",
             "|---|---:|---:|" + "---:|" * len(CHUNKS) + "---:|"]
    for batch, length in SHAPES:
        shapes = abstract(batch, length, VOCAB)
        naive = peak_bytes(token_kd.naive_token_losses, shapes)
        chunked = [peak_bytes(token_kd.token_losses, shapes, chunk_tokens=c) for c in CHUNKS]
        lines.append(f"| {batch * length:,} ({batch} x {length}) | "
                     f"{gib(batch * length * VOCAB * 4)} | {gib(naive)} | "
                     + " | ".join(gib(c) for c in chunked) + f" | {naive / chunked[0]:.0f}x |")
        print(lines[-1], flush=True)

    vocab, batch, length, chunk = 32_768, 2, 512, 256
    rng = np.random.default_rng(0)
    inputs = [jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.05)
              for s in abstract(batch, length, vocab)[:4]] + [jnp.ones((batch, length))]
    fns = {"naive": step(token_kd.naive_token_losses),
           "chunked": step(token_kd.token_losses, chunk_tokens=chunk)}
    a = jax.device_get(fns["naive"](*inputs))
    b = jax.device_get(fns["chunked"](*inputs))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-9)
    times = interleaved({k: functools.partial(f, *inputs) for k, f in fns.items()},
                        rounds=args.rounds, calls=2)
    ratio = Ratio(times["chunked"] / times["naive"])
    lines += ["", "XLA's compiled ``temp_size_in_bytes`` of one gradient step of the forward "
              f"KL (student hidden 640 and head 640 x {VOCAB:,}; teacher hidden 640, tied "
              "head), compiled on this CPU, not run.", "",
              f"Step time at V = {vocab:,}, {batch} x {length} tokens, chunks of {chunk}: "
              f"chunked / naive = {ratio.text(digits=2)} (same gradients within 1e-4; "
              f"median (min-max) of {args.rounds} interleaved rounds)."]
    publish("token_kd_memory", "\n".join(lines), docs=args.docs)


if __name__ == "__main__":
    main()
