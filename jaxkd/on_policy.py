"""Distillation on generated text: on-policy GKD and sequence-level KD, inside the step.

**GKD** (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): with probability ``fraction`` (the paper's lambda) a batch's
windows are replaced by the *student's own* continuations: the first ``prompt_tokens`` of
each window are the prompt, the student samples ``new_tokens`` more (temperature
``temperature``; :func:`jaxkd.sampling.generate`, KV cache, under jit), and the
objective's terms (e.g. ``token_kd`` with ``divergence='jsd'``, beta) compare student and
teacher on exactly those sequences, counting only the generated tokens. The other batches
are the data's windows as they are (the supervised part of GKD's mixture). The student
generates with its current weights under ``stop_gradient``: no gradient flows through
the sampling, as in the paper.

**Sequence-level KD** (Kim & Rush 2016): ``policy='teacher'`` makes the *teacher* write the
continuations instead (its mode with ``temperature=0``, Kim & Rush's approximation of the
teacher's sequence distribution), and the student learns from them with whatever terms
the objective has (``token_cross_entropy`` for word-level training on the teacher's text,
``token_kd`` on top).

Every batch must be windows of ``prompt_tokens + new_tokens`` tokens
(``config.data.max_length``, one bucket), so the two kinds of batch have one shape and
the step compiles once; whether a step generates is drawn from the run's key and the
step number (``jax.random.bernoulli``), so a resumed run draws what it would have drawn.
A generated batch is right-padded like the data's: each row is its prompt's real tokens,
then its continuation, then padding, with ``loss_mask`` 1 where the next token was
generated (:class:`jaxkd.tasks.causal_lm.CausalLM` honours ``loss_mask``).

With QAT the student samples with its float weights (the sampler runs the plain model);
its loss on those samples is computed quantized, as every step's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxkd import sampling
from jaxkd.config import OnPolicy
from jaxkd.schema import ConfigError

Batch = dict[str, jax.Array]


def shift_rows(x: jax.Array, shift: jax.Array, fill: int = 0) -> jax.Array:
    """Row ``b`` of ``x`` ``[B, L]`` moved right by ``shift[b]`` (negative: left), the
    vacated places ``fill``."""
    length = x.shape[1]
    source = jnp.arange(length)[None, :] - shift[:, None]
    inside = (source >= 0) & (source < length)
    return jnp.where(inside, jnp.take_along_axis(x, jnp.clip(source, 0, length - 1), 1), fill)


def generated_batch(generate: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array,
                                                                            jax.Array]],
                    batch: Batch, rng: jax.Array, prompt_tokens: int, pad_id: int = 0
                    ) -> Batch:
    """``batch``'s windows with everything after their first ``prompt_tokens`` tokens
    replaced by ``generate(prompts, prompt_mask, rng) -> (tokens, mask) [B, N]`` (module
    docstring), right-padded, with ``loss_mask``."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    p = prompt_tokens
    prompt, prompt_mask = ids[:, :p], mask[:, :p]
    real = prompt_mask.sum(-1)  # right-padded prompts: their first `real` places
    left = shift_rows(prompt, p - real, pad_id)  # the sampler wants them left-padded
    left_mask = shift_rows(prompt_mask, p - real)
    tokens, token_mask = generate(left, left_mask, rng)
    both = jnp.concatenate([left, tokens], 1)
    both_mask = jnp.concatenate([left_mask, token_mask], 1)
    out_ids = shift_rows(both, real - p, pad_id)  # back to right padding
    out_mask = shift_rows(both_mask, real - p)
    generated = shift_rows(jnp.concatenate([jnp.zeros_like(left_mask), token_mask], 1),
                           real - p)
    # position t is trained when token t + 1 was generated
    loss_mask = jnp.pad(generated[:, 1:], ((0, 0), (0, 1)))
    return {**batch, "input_ids": out_ids.astype(ids.dtype),
            "attention_mask": out_mask.astype(mask.dtype),
            "loss_mask": loss_mask.astype(jnp.float32)}


def check(settings: OnPolicy, *, task: str, max_length: int, bucket_lengths: tuple,
          model: Any) -> None:
    """One line naming the field when the run cannot generate as configured."""
    if task != "causal_lm":
        raise ConfigError(f"config.distill.on_policy needs config.data.task='causal_lm', got "
                          f"{task!r}")
    total = settings.prompt_tokens + settings.new_tokens
    if max_length != total or tuple(bucket_lengths) != (max_length,):
        raise ConfigError(f"config.distill.on_policy: every batch must be windows of "
                          f"prompt_tokens + new_tokens = {total} tokens: set "
                          f"config.data.max_length={total} and config.data.bucket_lengths="
                          f"({total},) (got {max_length} and {tuple(bucket_lengths)})")
    if not hasattr(model, "init_cache"):
        raise ConfigError(f"config.distill.on_policy samples with a KV cache; model "
                          f"{type(model).__name__} has none (gemma3 does)")


def make_prepare(settings: OnPolicy, student: Any, teacher: Any | None
                 ) -> Callable[[Any, Any, Batch, jax.Array, jax.Array], Batch]:
    """``prepare(student_variables, teacher_variables, batch, rng, step) -> batch`` for the
    train step: every batch gains ``loss_mask``; with probability ``fraction`` its windows
    are replaced by generated ones (module docstring)."""
    if settings.policy == "teacher" and teacher is None:
        raise ConfigError("config.distill.on_policy.policy='teacher' needs a teacher model "
                          "(config.distill.teacher.workdir)")
    model = student if settings.policy == "student" else teacher

    def prepare(student_variables, teacher_variables, batch, rng, step):
        batch = {**batch, "loss_mask": jnp.ones(batch["input_ids"].shape, jnp.float32)}
        variables = jax.lax.stop_gradient(
            student_variables if settings.policy == "student" else teacher_variables)
        key = jax.random.fold_in(jax.random.fold_in(rng, step), 0x6B6D)  # its own stream
        use, sample_key = jax.random.split(key)

        def generate(prompts, prompt_mask, k):
            return sampling.generate(model, variables, prompts, prompt_mask, k,
                                     max_new_tokens=settings.new_tokens,
                                     temperature=settings.temperature, top_k=settings.top_k,
                                     top_p=settings.top_p)

        return jax.lax.cond(
            jax.random.bernoulli(use, settings.fraction),
            lambda b: generated_batch(generate, b, sample_key, settings.prompt_tokens),
            lambda b: b, batch)

    return prepare
