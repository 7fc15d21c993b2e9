"""The training objective: a weighted sum of loss terms named in the config.

A run's objective is ``config.distill.losses``, a list of terms (or a ConfigDict mapping
a label to a term, so that ``--config.distill.losses.kd.weight=0.5`` works)::

    {name, weight, kwargs, student_feature, teacher_feature}

``name`` selects a function of :mod:`jaxkd.losses`; the plain label loss is the term
``cross_entropy``. Hinton et al. (2015) distillation with mixing weight alpha is::

    [dict(name='soft_target_kl', weight=alpha, kwargs=dict(temperature=T)),
     dict(name='cross_entropy', weight=1 - alpha)]

i.e. ``alpha * T^2 * KL(p_t || p_s) + (1 - alpha) * CE(labels)``.

Every term is reduced over the examples it applies to: label terms over labelled examples
(a label of -1 marks a transfer-set input without a label), teacher terms over every real
example. :func:`build_objective` checks the terms against the losses it knows before
anything is compiled, so a typo fails in one line naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxkd import losses


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How a loss of :mod:`jaxkd.losses` is called: which inputs it takes."""

    fn: Callable[..., jax.Array]
    inputs: str  # 'labels' | 'logits' | 'logits+labels'
    needs_teacher: bool


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(losses.cross_entropy, "labels", needs_teacher=False),
    "soft_target_kl": LossSpec(losses.soft_target_kl, "logits", needs_teacher=True),
    "reverse_kl": LossSpec(losses.reverse_kl, "logits", needs_teacher=True),
    "generalized_jsd": LossSpec(losses.generalized_jsd, "logits", needs_teacher=True),
    "total_variation": LossSpec(losses.total_variation, "logits", needs_teacher=True),
    "logit_mse": LossSpec(losses.logit_mse, "logits", needs_teacher=True),
    "decoupled_kd": LossSpec(losses.decoupled_kd, "logits+labels", needs_teacher=True),
}


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted loss term of the objective."""

    label: str
    name: str
    weight: float
    kwargs: dict[str, Any]


def _as_term_list(spec: Any) -> list[tuple[str, Mapping[str, Any]]]:
    if isinstance(spec, ml_collections.ConfigDict):
        spec = spec.to_dict()
    if isinstance(spec, Mapping):
        return [(str(label), term) for label, term in spec.items()]
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        out = []
        for i, term in enumerate(spec):
            if isinstance(term, ml_collections.ConfigDict):
                term = term.to_dict()
            out.append((str(i), term))
        return out
    raise ValueError(
        "config.distill.losses must be a list of terms {name, weight, kwargs} or a mapping "
        f"label -> term, got {type(spec).__name__}"
    )


def parse_terms(spec: Any, *, has_teacher: bool) -> list[Term]:
    """Validates ``config.distill.losses`` and returns its terms, in order."""
    terms = []
    allowed_fields = {"name", "weight", "kwargs", "student_feature", "teacher_feature"}
    for label, raw in _as_term_list(spec):
        where = f"config.distill.losses.{label}"
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} must be a dict {{name, weight, kwargs}}, got {raw!r}")
        extra = set(raw) - allowed_fields
        if extra:
            raise ValueError(
                f"{where} has unknown field(s) {sorted(extra)}; allowed: {sorted(allowed_fields)}"
            )
        name = raw.get("name", label)
        if name not in LOSSES:
            raise ValueError(
                f"{where}.name={name!r} is not a loss; choose one of: {', '.join(sorted(LOSSES))}"
            )
        if LOSSES[name].needs_teacher and not has_teacher:
            raise ValueError(
                f"{where}.name={name!r} needs a teacher but config.distill.teacher.workdir is empty"
            )
        weight = float(raw.get("weight", 1.0))
        kwargs = dict(raw.get("kwargs") or {})
        temperature = kwargs.get("temperature")
        if temperature is not None and not float(temperature) > 0:
            raise ValueError(f"{where}.kwargs.temperature must be > 0, got {temperature}")
        terms.append(Term(label=label, name=name, weight=weight, kwargs=kwargs))
    if not terms:
        raise ValueError("config.distill.losses is empty: give at least one term")
    if all(t.weight == 0 for t in terms):
        raise ValueError("config.distill.losses: every term has weight 0, nothing would be learned")
    return terms


def build_objective(
    terms: Sequence[Term],
) -> Callable[[jax.Array, jax.Array | None, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]:
    """Returns ``objective(student_logits, teacher_logits, labels) -> (loss, per-term values)``.

    ``labels`` are int32 ``[B]`` with -1 for unlabelled (transfer-set) examples. The loss is
    ``sum_k weight_k * masked_mean(term_k)``; the per-term values are the unweighted means.
    """

    def objective(student_logits, teacher_logits, labels):
        labelled = (labels >= 0).astype(jnp.float32)
        total = jnp.zeros((), jnp.float32)
        values = {}
        for term in terms:
            spec = LOSSES[term.name]
            if spec.inputs == "labels":
                value = losses.masked_mean(spec.fn(student_logits, labels, **term.kwargs), labelled)
            elif spec.inputs == "logits":
                value = losses.masked_mean(spec.fn(student_logits, teacher_logits, **term.kwargs))
            else:  # 'logits+labels': needs the true class, so only labelled examples count.
                safe_labels = jnp.maximum(labels, 0)
                per_example = spec.fn(student_logits, teacher_logits, safe_labels, **term.kwargs)
                value = losses.masked_mean(per_example, labelled)
            values[term.label] = value
            total = total + term.weight * value
        return total, values

    return objective
