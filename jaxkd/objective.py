"""The training objective: a weighted sum of loss terms named in the config.

A run's objective is ``config.distill.losses``: a list of terms, or a ConfigDict mapping a
label to a term (so that ``--config.distill.losses.kd.weight=0.5`` works)::

    {name, weight, kwargs, student_feature, teacher_feature,
     schedule, weight_end, temperature_end, adapter}

``name`` selects a function of :mod:`jaxkd.losses`; the plain label loss is the term
``cross_entropy``. Hinton et al. (2015) distillation with mixing weight alpha is::

    {'kd': dict(name='soft_target_kl', weight=alpha, kwargs=dict(temperature=T)),
     'ce': dict(name='cross_entropy', weight=1 - alpha)}

i.e. ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(labels)``.

* Label terms average over labelled examples (label -1 marks a transfer-set input);
  teacher terms over every example.
* Feature terms compare named features (``student_feature``/``teacher_feature``, see
  :mod:`jaxkd.models`; ``'logits'`` names the logits). ``hint_mse`` passes the student's
  feature through a trainable adapter (FitNets' regressor: a 1x1 convolution, i.e. a dense
  map over the channel axis) that is trained with the student and not part of it.
* ``schedule`` in {constant, linear, cosine} moves ``weight`` to ``weight_end`` and the
  temperature to ``temperature_end`` over the run.
* Several teachers (``config.distill.teachers``) are combined either in probability space
  (``ensemble='probabilities'``: the mixture ``sum_i w_i softmax(t_i / T)`` at each term's
  temperature) or as ``sum_i w_i * loss(teacher_i)`` (``ensemble='sum_losses'``), with
  weights normalised to sum to 1 in both; feature terms always use the weighted sum.
* ``topk_soft_target_kl`` adds the residual bucket by default (kwarg ``residual=True``):
  the teacher's mass outside its top ``k`` (kwarg ``k``, default 8, for a teacher run in
  the step; stored with precomputed logits) against the student's.
* Causal LMs at large vocabularies (:mod:`jaxkd.tasks.causal_lm`): ``token_kd`` (kwargs
  ``divergence`` in {forward_kl, reverse_kl, jsd, tvd}, ``temperature``, ``beta``,
  ``chunk_tokens``) and ``token_cross_entropy`` compare the final hidden states
  (``student_feature``/``teacher_feature``, default ``final_hidden``) through each model's
  LM head (its feature ``lm_head``, the ``[V, D]`` table) in chunks of tokens
  (:mod:`jaxkd.token_kd`): the ``[B, L, V]`` logits are never formed. They average over
  the task's token mask.
* ``token_topk_kd`` compares the student with a causal LM teacher's stored top-k logits
  (``config.distill.teacher_logits`` written by :mod:`jaxkd.sequence_logits`; kwargs
  ``temperature``, ``residual``, ``chunk_tokens``).
* Precomputed logits (``config.distill.teacher_logits``) arrive in the batch as
  ``teacher_topk_logits``/``teacher_topk_indices``; with every class stored they stand for
  the teacher's logits in any logit term, with fewer only ``topk_soft_target_kl`` applies.

:func:`parse_terms` checks the terms before anything is compiled, so a typo fails in one
line naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxkd import losses, schema, token_kd
from jaxkd.config import LossTerm
from jaxkd.schema import ConfigError
from jaxkd.tasks.base import Targets

# kind: which inputs a loss takes.
#   labels        fn(student_logits, labels)              per example, labelled only
#   logits        fn(student_logits, teacher_logits)      per example
#   logits_labels fn(student_logits, teacher_logits, y)   per example, labelled only
#   topk          fn(student_logits, topk_values, topk_indices)
#   features      fn(student_feature, teacher_feature)    per example
#   batch         fn(student_feature, teacher_feature)    scalar over the batch
#   sequence      fn(student_feature, teacher_feature, token_mask [B, L])   per example
#   tokens        fn(student_hidden, teacher_hidden, token_mask, student_head=, teacher_head=)
#                 per token, the heads from each model's 'lm_head' feature
#   token_labels  fn(student_hidden, labels, token_mask, head=)               per token
#   token_topk    fn(student_hidden, topk_logits, topk_ids, residual, token_mask, student_head=)
#                 per token, against stored top-k logits (jaxkd.sequence_logits)
LOSSES: dict[str, tuple[Callable[..., jax.Array], str]] = {
    "cross_entropy": (losses.cross_entropy, "labels"),
    "soft_target_kl": (losses.soft_target_kl, "logits"),
    "reverse_kl": (losses.reverse_kl, "logits"),
    "generalized_jsd": (losses.generalized_jsd, "logits"),
    "total_variation": (losses.total_variation, "logits"),
    "logit_mse": (losses.logit_mse, "logits"),
    "decoupled_kd": (losses.decoupled_kd, "logits_labels"),
    "topk_soft_target_kl": (losses.topk_soft_target_kl, "topk"),
    "hint_mse": (losses.hint_mse, "features"),
    "attention_transfer": (losses.attention_transfer, "features"),
    "rkd_distance": (losses.rkd_distance, "batch"),
    "rkd_angle": (losses.rkd_angle, "batch"),
    "similarity_preserving": (losses.similarity_preserving, "batch"),
    "pkt": (losses.pkt, "batch"),
    "dist_loss": (losses.dist_loss, "batch"),
    "tinybert_hidden_mse": (losses.tinybert_hidden_mse, "sequence"),
    "tinybert_attention_mse": (losses.tinybert_attention_mse, "sequence"),
    "minilm_attention_kl": (losses.minilm_attention_kl, "sequence"),
    "minilm_value_relation_kl": (losses.minilm_value_relation_kl, "sequence"),
    "minilmv2_relation_kl": (losses.minilmv2_relation_kl, "sequence"),
    "token_kd": (token_kd.token_losses, "tokens"),
    "token_cross_entropy": (token_kd.token_cross_entropy, "token_labels"),
    "token_topk_kd": (token_kd.topk_token_losses, "token_topk"),
}
LABEL_KINDS = ("labels", "token_labels")  # terms that need no teacher
TOKEN_KINDS = ("tokens", "token_labels", "token_topk")
ADAPTED = ("hint_mse", "tinybert_hidden_mse")  # an adapter by default
ENSEMBLES = ("probabilities", "sum_losses")


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss term of the objective."""

    label: str
    name: str
    weight: float
    kwargs: dict[str, Any]
    student_feature: str
    teacher_feature: str
    schedule: str = "constant"
    weight_end: float | None = None
    temperature_end: float | None = None
    adapter: bool = False

    @property
    def kind(self) -> str:
        return LOSSES[self.name][1]

    @property
    def needs_teacher(self) -> bool:
        return self.kind not in LABEL_KINDS


def _as_term_list(spec: Any) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(spec, ml_collections.ConfigDict):
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        return [(str(label), term) for label, term in spec.items()]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        return [(str(i), t.to_dict() if isinstance(t, ml_collections.ConfigDict) else t)
                for i, t in enumerate(spec)]
    raise ConfigError("config.distill.losses must be a list of terms {name, weight, kwargs} or "
                      f"a mapping label -> term, got {type(spec).__name__}")


def parse_terms(spec: Any, *, has_teacher: bool) -> list[Term]:
    """Validates ``config.distill.losses`` and returns its terms, in order."""
    terms = []
    for label, raw in _as_term_list(spec):
        where = f"config.distill.losses.{label}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{where} must be a dict {{name, weight, kwargs}}, got {raw!r}")
        raw = {**raw, "schedule": raw.get("schedule") or "constant"}
        term = schema.parse(LossTerm, raw, where)
        name = term.name or label
        if name not in LOSSES:
            raise ConfigError(
                f"{where}.name={name!r} is not a loss; choose one of: {', '.join(sorted(LOSSES))}")
        kind = LOSSES[name][1]
        if kind not in LABEL_KINDS and not has_teacher:
            raise ConfigError(f"{where}.name={name!r} needs a teacher but config.distill has "
                              "none (set distill.teacher.workdir, teachers or teacher_logits)")
        kwargs = dict(term.kwargs or {})
        temperature = kwargs.get("temperature")
        if temperature is not None and not float(temperature) > 0:
            raise ConfigError(f"{where}.kwargs.temperature must be > 0, got {temperature}")
        if term.temperature_end is not None and "temperature" not in kwargs:
            raise ConfigError(f"{where}.temperature_end needs kwargs.temperature to start from")
        default_feature = {"batch": "embedding", "tokens": "final_hidden",
                           "token_labels": "final_hidden",
                           "token_topk": "final_hidden"}.get(kind, "logits")
        if kind == "batch" and name == "dist_loss":
            default_feature = "logits"
        divergence = kwargs.get("divergence")
        if kind == "tokens" and divergence is not None and divergence not in \
                token_kd.DIVERGENCES:
            raise ConfigError(f"{where}.kwargs.divergence={divergence!r} is not a divergence; "
                              f"choose one of: {', '.join(token_kd.DIVERGENCES)}")
        if kind in ("features", "sequence") and not (term.student_feature
                                                     and term.teacher_feature):
            raise ConfigError(f"{where} ({name}) needs student_feature and teacher_feature")
        terms.append(Term(
            label=label, name=name, weight=term.weight, kwargs=kwargs,
            student_feature=term.student_feature or default_feature,
            teacher_feature=term.teacher_feature or default_feature,
            schedule=term.schedule, weight_end=term.weight_end,
            temperature_end=term.temperature_end,
            adapter=name in ADAPTED if term.adapter is None else term.adapter,
        ))
    if not terms:
        raise ConfigError("config.distill.losses is empty: give at least one term")
    if all(t.weight == 0 and not t.weight_end for t in terms):
        raise ConfigError("config.distill.losses: every term has weight 0, nothing would be "
                          "learned")
    return terms


def scheduled(start: float, end: float | None, schedule: str, step: jax.Array,
              num_steps: int) -> jax.Array:
    """``start`` moved towards ``end`` over ``num_steps``: optax's linear schedule, or its
    half-cosine decay ``0.5 (1 + cos(pi t / T))`` taking ``start`` to ``end``."""
    if end is None or schedule == "constant":
        return jnp.asarray(start, jnp.float32)
    num_steps = max(num_steps, 1)
    if schedule == "linear":
        return optax.linear_schedule(start, end, transition_steps=num_steps)(step)
    return end + (start - end) * optax.cosine_decay_schedule(1.0, num_steps)(step)


def feature(outputs: tuple[jax.Array, Mapping[str, jax.Array]], name: str) -> jax.Array:
    logits, features = outputs
    return logits if name == "logits" else features[name]


def check_features(terms: Sequence[Term], student_out: Any, teacher_outs: Sequence[Any]) -> None:
    """Feature names must exist and shapes must fit; one line naming the field otherwise.

    ``student_out`` and ``teacher_outs`` are (logits, features) of ShapeDtypeStructs.
    """
    for term in terms:
        if term.kind in TOKEN_KINDS:
            _check_token_term(term, student_out, teacher_outs)
        if term.kind not in ("features", "batch", "sequence"):
            continue
        where = f"config.distill.losses.{term.label}"
        for side, outputs, name in [("student", student_out, term.student_feature)] + [
                ("teacher", t, term.teacher_feature) for t in teacher_outs]:
            available = ["logits", *outputs[1]]
            if name not in available:
                raise ConfigError(f"{where}.{side}_feature={name!r} is not a feature of the "
                                  f"{side}; choose one of: {', '.join(available)}")
        s = feature(student_out, term.student_feature).shape
        for t_out in teacher_outs:
            t = feature(t_out, term.teacher_feature).shape
            if term.name in ADAPTED and s[:-1] != t[:-1]:
                raise ConfigError(f"{where}: student feature {term.student_feature} {s} and "
                                  f"teacher feature {term.teacher_feature} {t} differ in more "
                                  "than the channel axis; pick features of the same resolution")
            if term.name in ADAPTED and not term.adapter and s != t:
                raise ConfigError(f"{where}: shapes {s} and {t} differ; set adapter=True")
            if term.kind == "sequence":  # the loss's own checks, before compiling
                tokens = student_out[1].get("mask")
                if tokens is None:
                    raise ConfigError(f"{where} ({term.name}) needs the student's token mask, a "
                                      "feature 'mask' [B, L]")
                s_in = jax.ShapeDtypeStruct(s[:-1] + t[-1:] if term.adapter else s, jnp.float32)
                try:
                    jax.eval_shape(functools.partial(LOSSES[term.name][0], **term.kwargs), s_in,
                                   jax.ShapeDtypeStruct(t, jnp.float32), tokens)
                except (ConfigError, TypeError) as e:
                    raise ConfigError(f"{where}: {e}") from None
            if term.name == "attention_transfer" and s[:-1] != t[:-1]:
                raise ConfigError(f"{where}: attention maps need the same spatial size, got "
                                  f"student {s} and teacher {t}")


def _check_token_term(term: Term, student_out: Any, teacher_outs: Sequence[Any]) -> None:
    """A token term needs a causal LM's ``[B, L, D]`` hidden states and its ``lm_head``."""
    where = f"config.distill.losses.{term.label}"
    sides = [("student", student_out, term.student_feature)]
    if term.kind == "tokens":
        sides += [("teacher", t, term.teacher_feature) for t in teacher_outs]
    for side, outputs, name in sides:
        for needed in (name, "lm_head"):
            if needed not in outputs[1]:
                raise ConfigError(
                    f"{where} ({term.name}) needs the {side}'s feature {needed!r} (a causal LM "
                    f"such as gemma3); the {side} has: {', '.join(outputs[1]) or 'none'}")
        if len(outputs[1][name].shape) != 3:
            raise ConfigError(f"{where}.{side}_feature={name!r} has shape "
                              f"{tuple(outputs[1][name].shape)}; token terms need [B, L, D]")
    if term.kind == "tokens":
        v_s = student_out[1]["lm_head"].shape[0]
        for t_out in teacher_outs:
            if t_out[1]["lm_head"].shape[0] != v_s:
                raise ConfigError(f"{where}: the student's vocabulary ({v_s}) and the teacher's "
                                  f"({t_out[1]['lm_head'].shape[0]}) differ")


def init_adapters(terms: Sequence[Term], student_out: Any, teacher_outs: Sequence[Any],
                  rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """FitNets regressors: one ``{kernel [C_s, C_t], bias [C_t]}`` per (term, teacher)."""
    adapters = {}
    for term in terms:
        if not term.adapter:
            continue
        c_in = feature(student_out, term.student_feature).shape[-1]
        for i, t_out in enumerate(teacher_outs):
            c_out = feature(t_out, term.teacher_feature).shape[-1]
            rng, key = jax.random.split(rng)
            adapters[f"{term.label}_{i}"] = {
                "kernel": jax.random.normal(key, (c_in, c_out), jnp.float32) / math.sqrt(c_in),
                "bias": jnp.zeros((c_out,), jnp.float32),
            }
    return adapters


def apply_adapter(adapter: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    """A 1x1 convolution (dense over the last, channel axis): ``x @ kernel + bias``."""
    return x @ adapter["kernel"] + adapter["bias"]


def ensemble_logits(teacher_logits: Sequence[jax.Array], weights: Sequence[float],
                    temperature: Any = 1.0) -> jax.Array:
    """Logits of the probability-space ensemble at temperature ``T``:
    ``T log sum_i w_i softmax(t_i / T)`` (weights normalised to sum 1), so that
    ``softmax(logits / T)`` is the mixture of the teachers' softened distributions."""
    w = jnp.asarray(weights, jnp.float32)
    w = w / w.sum()
    log_p = jnp.stack([jax.nn.log_softmax(t / temperature, -1) for t in teacher_logits])
    return temperature * jax.nn.logsumexp(
        log_p + jnp.log(w).reshape(-1, *([1] * (log_p.ndim - 1))), axis=0)


def _float32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


def build_objective(
    terms: Sequence[Term], *, num_steps: int, teacher_weights: Sequence[float] = (1.0,),
    ensemble: str = "sum_losses",
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
    """Returns ``objective(adapters, student_out, teacher_outs, batch, step, targets=None)``.

    ``student_out`` and each of ``teacher_outs`` are ``(logits, features)``; ``batch`` holds
    ``label`` (-1 = unlabelled) and, with precomputed logits, ``teacher_topk_logits`` and
    ``teacher_topk_indices``. Returns ``(sum_k weight_k * mean(term_k), per-term means)``.
    """
    if ensemble not in ENSEMBLES:
        raise ConfigError(f"config.distill.ensemble={ensemble!r} is not an ensemble mode; "
                          f"choose one of: {', '.join(ENSEMBLES)}")
    total_weight = float(sum(teacher_weights))
    teacher_weights = [w / total_weight for w in teacher_weights]  # both modes sum to 1

    def term_value(term, kwargs, adapters, student_out, teacher_out, i, batch, labelled,
                   mask):
        fn, kind = LOSSES[term.name]
        s_logits = student_out[0]
        if kind == "topk":
            use_residual = kwargs.pop("residual", True)
            k = kwargs.pop("k", 8)
            if teacher_out is None:  # precomputed: the residual mass was stored with them
                values, indices = batch["teacher_topk_logits"], batch["teacher_topk_indices"]
                residual = batch.get("teacher_topk_residual")
            else:
                values, indices = jax.lax.top_k(teacher_out[0], k)
                temperature = kwargs.get("temperature", 1.0)
                residual = -jnp.expm1(jax.nn.logsumexp(values / temperature, -1)
                                      - jax.nn.logsumexp(teacher_out[0] / temperature, -1))
            if not use_residual:
                residual = None
            return losses.masked_mean(fn(s_logits, values, indices, teacher_residual=residual,
                                         **kwargs), mask)
        if kind == "tokens":
            if mask is None or mask.ndim != 2:
                raise ConfigError(f"config.distill.losses.{term.label} ({term.name}) needs a "
                                  "task with a token mask [B, L], e.g. causal_lm")
            per_token = fn(feature(student_out, term.student_feature),
                           feature(teacher_out, term.teacher_feature), mask,
                           student_head=token_kd.tied_head(student_out[1]["lm_head"]),
                           teacher_head=token_kd.tied_head(teacher_out[1]["lm_head"]),
                           **kwargs).divergence
            return losses.masked_mean(per_token, mask)
        t_logits = teacher_out[0]
        if kind == "logits":
            return losses.masked_mean(fn(s_logits, t_logits, **kwargs), mask)
        if kind == "logits_labels":
            per_example = fn(s_logits, t_logits, jnp.maximum(batch["label"], 0), **kwargs)
            return losses.masked_mean(per_example, labelled)
        s = feature(student_out, term.student_feature)
        t = feature(teacher_out, term.teacher_feature)
        if term.adapter:
            s = apply_adapter(adapters[f"{term.label}_{i}"], s)
        if kind == "features":
            return losses.masked_mean(fn(s, t, **kwargs), mask)
        if kind == "sequence":  # token mask: a sequence task's [B, L] mask, else the student's
            tokens = mask if mask is not None and mask.ndim == 2 else student_out[1]["mask"]
            return losses.masked_mean(fn(s, t, tokens, **kwargs), jnp.any(tokens != 0, axis=-1))
        if mask is not None:
            kwargs = {**kwargs, "mask": mask}
        return fn(s, t, **kwargs)  # batch-level: already a scalar

    def objective(adapters, student_out, teacher_outs, batch, step, targets=None):
        # Losses, and the softmax of logits inside them, in float32 whatever the models'
        # compute dtype (config.dtype, e.g. bfloat16).
        student_out, teacher_outs = jax.tree.map(_float32, (student_out, list(teacher_outs)))
        if targets is None:  # classification: label -1 marks a transfer-set input
            labels = batch["label"]
            targets = Targets(labels, (labels >= 0).astype(jnp.float32), None)
        labels, labelled, mask = targets
        if not teacher_outs and "teacher_topk_logits" in batch:
            values, indices = batch["teacher_topk_logits"], batch["teacher_topk_indices"]
            if values.shape[-1] == student_out[0].shape[-1]:  # every class stored
                full = jnp.zeros_like(values).at[
                    jnp.arange(values.shape[0])[:, None], indices].set(values)
                teacher_outs = [(full, {})]
        total = jnp.zeros((), jnp.float32)
        values = {}
        for term in terms:
            weight = scheduled(term.weight, term.weight_end, term.schedule, step, num_steps)
            kwargs = dict(term.kwargs)
            if term.temperature_end is not None:
                kwargs["temperature"] = scheduled(kwargs["temperature"], term.temperature_end,
                                                  term.schedule, step, num_steps)
            if term.kind == "labels":
                value = losses.masked_mean(LOSSES[term.name][0](student_out[0], labels, **kwargs),
                                           labelled)
            elif term.kind == "token_topk":  # stored top-k logits (jaxkd.sequence_logits)
                residual = batch["teacher_topk_residual"] if kwargs.pop("residual", True) \
                    else None
                value = losses.masked_mean(LOSSES[term.name][0](
                    feature(student_out, term.student_feature), batch["teacher_topk_logits"],
                    batch["teacher_topk_indices"], residual, labelled,
                    student_head=token_kd.tied_head(student_out[1]["lm_head"]),
                    **kwargs).divergence, labelled)
            elif term.kind == "token_labels":
                value = losses.masked_mean(LOSSES[term.name][0](
                    feature(student_out, term.student_feature), labels, labelled,
                    head=token_kd.tied_head(student_out[1]["lm_head"]), **kwargs), labelled)
            elif term.kind == "topk" and not teacher_outs:
                value = term_value(term, kwargs, adapters, student_out, None, 0, batch, labelled,
                                   mask)
            elif ensemble == "probabilities" and term.kind in ("logits", "logits_labels", "topk") \
                    and len(teacher_outs) > 1:
                mixed = (ensemble_logits([t[0] for t in teacher_outs], teacher_weights,
                                         kwargs.get("temperature", 1.0)), {})
                value = term_value(term, kwargs, adapters, student_out, mixed, 0, batch, labelled,
                                   mask)
            else:
                value = sum(w * term_value(term, dict(kwargs), adapters, student_out, t, i, batch,
                                           labelled, mask)
                            for i, (w, t) in enumerate(zip(teacher_weights, teacher_outs,
                                                           strict=True)))
            values[term.label] = value
            total = total + weight * value
        return total, values

    return objective
