"""Distillation losses: small pure functions, arrays in, arrays out.

Notation: ``p_t = softmax(teacher_logits / T)`` and ``p_s = softmax(student_logits / T)``
over the last (class) axis; logits have shape ``[..., C]``.

Per-position losses return UNREDUCED values of shape ``[...]`` (one per example or token);
reduce them with :func:`masked_mean` (e.g. ``mask = labels >= 0`` to skip padding):

=========================  ==========================================  =====================
function                   value per position                          paper
=========================  ==========================================  =====================
``cross_entropy``          ``-sum_c y_c log softmax(z)_c``             (supervised term)
``soft_target_kl``         ``T^2 KL(p_t || p_s)``                      Hinton et al. 2015
``reverse_kl``             ``T^2 KL(p_s || p_t)``                      (GKD, MiniLLM)
``generalized_jsd``        ``T^2 [b KL(p_t||m) + (1-b) KL(p_s||m)]``   Agarwal et al. 2024
``total_variation``        ``1/2 sum_c |p_t - p_s|``                   (GKD)
``logit_mse``              ``mean_c (s - t)^2``                        Ba & Caruana 2014
``decoupled_kd``           ``alpha TCKD + beta NCKD``                  Zhao et al. 2022
``topk_soft_target_kl``    ``T^2 KL`` over the teacher's top-k         (offline teachers)
``hint_mse``               ``mean (F_s - F_t)^2`` per example          Romero et al. 2015
``attention_transfer``     ``mean (a_s - a_t)^2`` per example          Zagoruyko & Komodakis 2017
=========================  ==========================================  =====================

Batch-level (relational) losses take ``[B, ...]`` and return a scalar; an optional
``mask`` of shape ``[B]`` (nonzero = keep) gives the same value as dropping the masked
examples from the batch:

=========================  ==========================================  =====================
``rkd_distance``           Huber between normalised distance matrices  Park et al. 2019
``rkd_angle``              Huber between triplet angle cosines         Park et al. 2019
``similarity_preserving``  ``||G_s - G_t||_F^2 / B^2``                 Tung & Mori 2019
``pkt``                    KL between cosine-kernel conditionals       Passalis & Tefas 2018
``dist_loss``              inter- and intra-class Pearson relations    Huang et al. 2022
=========================  ==========================================  =====================

Sequence (transformer) losses take per-layer tensors of a student and a teacher encoder and
a token mask ``[B, L]`` (nonzero = real token) and return ``[B]``: per example, the mean
over its real tokens (and heads); padded queries and keys never count, whatever they hold:

=============================  ======================================  =====================
``tinybert_hidden_mse``        ``mean_{i,h} (H_s W_h - H_t)^2``        Jiao et al. 2020
``tinybert_attention_mse``     ``mean_{a,i,j} (A_s - A_t)^2``, scores  Jiao et al. 2020
``minilm_attention_kl``        ``mean_{a,i} KL(A_t || A_s)``, probs    Wang et al. 2020
``minilm_value_relation_kl``   ``KL`` of ``softmax(V V^T / sqrt d)``   Wang et al. 2020
``minilmv2_relation_kl``       ``KL`` of relation-head Q-Q/K-K/V-V     Wang et al. 2021
=============================  ======================================  =====================

Token-level Hinton KD on sequence logits ``[B, L, C]`` is :func:`soft_target_kl` reduced
with ``masked_mean(loss, mask)``.

Everything is jit/vmap/grad-safe: log-probabilities come from ``log_softmax``, square
roots and normalisations have finite gradients at zero, and values and gradients stay
finite for logits of magnitude ``1e4`` in float32. Inputs are computed in at least
float32 (bfloat16 logits are upcast). None of the functions applies ``stop_gradient`` to
the teacher: the caller decides what is trained.
"""

from numbers import Integral

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxkd.schema import ConfigError

__all__ = [
    "attention_transfer",
    "cross_entropy",
    "decoupled_kd",
    "dist_loss",
    "generalized_jsd",
    "hint_mse",
    "label_mask",
    "logit_mse",
    "masked_mean",
    "pkt",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "similarity_preserving",
    "soft_target_kl",
    "topk_soft_target_kl",
    "total_variation",
]

Array = jax.Array

# Same eps as torch.nn.functional.normalize: x / max(||x||, eps).
_NORMALIZE_EPS = 1e-12
# Same eps as the official DIST code: pearson = <a, b> / (||a|| ||b|| + eps).
_PEARSON_EPS = 1e-8
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- helpers


def _as_float(x: ArrayLike) -> Array:
    """Casts to an inexact dtype of at least float32 precision."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _static_float(x: ArrayLike) -> float | None:
    """``float(x)`` for concrete scalars, ``None`` for traced values (jit, vmap)."""
    try:
        return float(x)
    except TypeError:  # traced (ConcretizationTypeError) or not a scalar
        return None


def _check_temperature(temperature: ArrayLike) -> None:
    value = _static_float(temperature)
    if value is not None and not value > 0:
        raise ValueError(f"temperature must be > 0, got {value}.")


def _check_same_shape(name: str, student: Array, teacher: Array) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student and teacher shapes differ: {student.shape} vs {teacher.shape}."
        )


def _check_logits(name: str, student: Array, teacher: Array) -> None:
    _check_same_shape(name, student, teacher)
    if student.ndim < 1:
        raise ValueError(f"{name}: logits need a class axis, got shape {student.shape}.")


def _check_features(name: str, student: Array, teacher: Array) -> None:
    _check_same_shape(name, student, teacher)
    if student.ndim < 1:
        raise ValueError(f"{name}: features need a batch axis, got shape {student.shape}.")


def _check_labels(name: str, logits: Array, labels: Array) -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{name}: labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{name}: labels shape {labels.shape} must be the logits shape without the class "
            f"axis, {logits.shape[:-1]}."
        )


def _kl(log_p: Array, log_q: Array) -> Array:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last axis."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _safe_norm(x: Array, axis: int, keepdims: bool = False) -> Array:
    """Euclidean norm whose gradient at ``x = 0`` is 0 instead of NaN."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _l2_normalize(x: Array, axis: int) -> Array:
    """``x / max(||x||, 1e-12)`` (as ``torch.nn.functional.normalize``); zero stays zero."""
    return x / jnp.maximum(_safe_norm(x, axis=axis, keepdims=True), _NORMALIZE_EPS)


def _huber(x: Array) -> Array:
    """Huber with delta = 1 (= smooth L1): ``x^2 / 2`` if ``|x| < 1`` else ``|x| - 1/2``."""
    abs_x = jnp.abs(x)
    return jnp.where(abs_x < 1.0, 0.5 * x * x, abs_x - 0.5)


def _flatten_batch(name: str, student: ArrayLike, teacher: ArrayLike) -> tuple[Array, Array]:
    student, teacher = _as_float(student), _as_float(teacher)
    if student.ndim < 1 or teacher.ndim < 1 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student and teacher need the same batch size on axis 0, got shapes "
            f"{student.shape} and {teacher.shape}."
        )
    batch = student.shape[0]
    return student.reshape(batch, -1), teacher.reshape(batch, -1)


def _keep_mask(name: str, mask: ArrayLike | None, batch: int) -> Array:
    """Boolean ``[B]`` keep-mask (all True when ``mask`` is None)."""
    if mask is None:
        return jnp.ones((batch,), dtype=bool)
    mask = jnp.asarray(mask)
    if mask.shape != (batch,):
        raise ValueError(f"{name}: mask must have shape ({batch},), got {mask.shape}.")
    return mask != 0


def _zero_dropped(x: Array, keep: Array) -> Array:
    """Zeroes dropped rows so that whatever they hold (even NaN) cannot leak in."""
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)


# --------------------------------------------------------------------------- reduction


def masked_mean(values: ArrayLike, mask: ArrayLike | None = None) -> Array:
    """Mean of ``values`` over the positions where ``mask`` is nonzero.

    ``sum(mask * values) / sum(mask)``, with ``mask`` broadcast to ``values.shape``
    (boolean, or float weights; 0 = ignore, e.g. padding tokens or unlabelled examples).
    Values at ignored positions never enter the result (even NaN or inf). An all-zero
    mask gives 0, with a zero (not NaN) gradient.

    Args:
      values: unreduced losses, any shape ``[...]``.
      mask: ``None`` (plain mean) or an array broadcastable to ``values.shape``.

    Returns:
      A scalar.
    """
    values = _as_float(values)
    if mask is None:
        return jnp.mean(values)
    mask = jnp.asarray(mask)
    try:
        broadcasts = jnp.broadcast_shapes(mask.shape, values.shape) == values.shape
    except ValueError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(
            f"masked_mean: mask shape {mask.shape} does not broadcast to values shape "
            f"{values.shape}."
        )
    mask = jnp.broadcast_to(mask, values.shape)
    weights = mask.astype(values.dtype)
    total = jnp.sum(jnp.where(mask != 0, values * weights, 0.0))
    count = jnp.sum(weights)
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def label_mask(labels: ArrayLike) -> Array:
    """``float32(labels >= 0)``: 1 where a position has a label, 0 for "no label" (< 0).

    Args:
      labels: integer class ids ``[...]``; negative means unlabelled or padding.

    Returns:
      A float32 array of shape ``[...]`` for :func:`masked_mean`.
    """
    return (jnp.asarray(labels) >= 0).astype(jnp.float32)


# --------------------------------------------------------------------------- per position


def cross_entropy(logits: ArrayLike, labels: ArrayLike, label_smoothing: float = 0.0) -> Array:
    """Softmax cross-entropy with integer labels and optional label smoothing.

    ``-sum_c y_c log softmax(logits)_c`` with ``y = (1 - eps) onehot(label) + eps / C``.
    A label ``< 0`` means "no label" and gives 0 (with zero gradient); reduce with
    ``masked_mean(loss, labels >= 0)`` to average over labelled positions only.
    Labels must be ``< C`` (larger ones give NaN, so the mistake shows).

    Args:
      logits: ``[..., C]``.
      labels: integer ``[...]``.
      label_smoothing: ``eps`` in ``[0, 1]``.

    Returns:
      Unreduced losses ``[...]``.
    """
    logits, labels = _as_float(logits), jnp.asarray(labels)
    _check_labels("cross_entropy", logits, labels)
    smoothing = _static_float(label_smoothing)
    if smoothing is not None and not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {smoothing}.")
    log_p = jax.nn.log_softmax(logits, axis=-1)
    has_label = labels >= 0
    safe_labels = jnp.where(has_label, labels, 0)
    nll = -jnp.take_along_axis(log_p, safe_labels[..., None], axis=-1)[..., 0]
    smooth = -jnp.mean(log_p, axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return jnp.where(has_label, loss, 0.0)


def soft_target_kl(
    student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: float = 1.0
) -> Array:
    """Soft-target distillation loss ``T^2 KL(p_t || p_s)`` (forward KL).

    ``T^2 sum_c p_t,c (log p_t,c - log p_s,c)``; the ``T^2`` keeps gradient magnitudes
    comparable across temperatures. Hinton, Vinyals & Dean 2015, "Distilling the Knowledge
    in a Neural Network".

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    _check_logits("soft_target_kl", student_logits, teacher_logits)
    _check_temperature(temperature)
    log_pt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return temperature**2 * _kl(log_pt, log_ps)


def reverse_kl(
    student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: float = 1.0
) -> Array:
    """Reverse (mode-seeking) KL ``T^2 KL(p_s || p_t)``.

    ``T^2 sum_c p_s,c (log p_s,c - log p_t,c)``; used for on-policy LLM distillation
    (Agarwal et al. 2024, GKD; Gu et al. 2024, MiniLLM).

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    _check_logits("reverse_kl", student_logits, teacher_logits)
    _check_temperature(temperature)
    log_pt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return temperature**2 * _kl(log_ps, log_pt)


def _jsd_interior(log_ps: Array, log_pt: Array, beta: ArrayLike) -> Array:
    # log m = log(beta p_t + (1 - beta) p_s), computed in log space.
    log_m = jnp.logaddexp(log_pt + jnp.log(beta), log_ps + jnp.log1p(-beta))
    return beta * _kl(log_pt, log_m) + (1.0 - beta) * _kl(log_ps, log_m)


def generalized_jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Array:
    """Generalized Jensen-Shannon divergence of GKD.

    ``T^2 [beta KL(p_t || m) + (1 - beta) KL(p_s || m)]`` with
    ``m = beta p_t + (1 - beta) p_s``, for ``0 < beta < 1``. As in the GKD/TRL
    implementation the endpoints are special-cased: ``beta = 0`` gives exactly
    ``T^2 KL(p_t || p_s)`` (:func:`soft_target_kl`) and ``beta = 1`` gives exactly
    ``T^2 KL(p_s || p_t)`` (:func:`reverse_kl`). (The mixture formula itself tends to 0 at
    both ends; the endpoints are the limits of ``JSD / beta`` and ``JSD / (1 - beta)``, so
    the value jumps there.) ``beta`` may be a Python float (branch chosen at trace time)
    or a traced scalar (branch chosen with ``jnp.where``). Agarwal et al. 2024, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes".

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      beta: mixture weight of the teacher, in ``[0, 1]``.
      temperature: ``T > 0``.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    _check_logits("generalized_jsd", student_logits, teacher_logits)
    _check_temperature(temperature)
    log_pt = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_ps = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    static_beta = _static_float(beta)
    if static_beta is not None:
        if not 0.0 <= static_beta <= 1.0:
            raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {static_beta}.")
        if static_beta == 0.0:
            return temperature**2 * _kl(log_pt, log_ps)
        if static_beta == 1.0:
            return temperature**2 * _kl(log_ps, log_pt)
        return temperature**2 * _jsd_interior(log_ps, log_pt, static_beta)
    beta = jnp.asarray(beta, dtype=log_pt.dtype)
    at_zero, at_one = beta == 0.0, beta == 1.0
    # Keep log(beta) and log(1 - beta) finite in the unselected branch (no NaN gradients).
    interior_beta = jnp.where(at_zero | at_one, 0.5, beta)
    value = jnp.where(
        at_zero,
        _kl(log_pt, log_ps),
        jnp.where(at_one, _kl(log_ps, log_pt), _jsd_interior(log_ps, log_pt, interior_beta)),
    )
    return temperature**2 * value


def total_variation(
    student_logits: ArrayLike, teacher_logits: ArrayLike, temperature: float = 1.0
) -> Array:
    """Total variation distance ``1/2 sum_c |p_t,c - p_s,c|`` (in ``[0, 1]``, no ``T^2``).

    One of the divergences compared in GKD (Agarwal et al. 2024).

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.
      temperature: ``T > 0``.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    _check_logits("total_variation", student_logits, teacher_logits)
    _check_temperature(temperature)
    p_t = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    p_s = jax.nn.softmax(student_logits / temperature, axis=-1)
    return 0.5 * jnp.sum(jnp.abs(p_t - p_s), axis=-1)


def logit_mse(student_logits: ArrayLike, teacher_logits: ArrayLike) -> Array:
    """Logit matching ``mean_c (s_c - t_c)^2``.

    Ba & Caruana 2014, "Do Deep Nets Really Need to be Deep?".

    Args:
      student_logits: ``[..., C]``.
      teacher_logits: ``[..., C]``.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    _check_logits("logit_mse", student_logits, teacher_logits)
    return jnp.mean(jnp.square(student_logits - teacher_logits), axis=-1)


def decoupled_kd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    labels: ArrayLike,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Array:
    """Decoupled knowledge distillation ``alpha TCKD + beta NCKD``.

    With ``y`` the label and ``z / T`` the tempered logits:

    * ``TCKD = T^2 KL(b_t || b_s)``, ``b = [p_y, 1 - p_y]`` the binary target/non-target
      distribution (``log(1 - p_y)`` is computed as a log-sum-exp over the other classes);
    * ``NCKD = T^2 KL(p^_t || p^_s)``, ``p^`` the softmax over the non-target classes only.

    The target class is excluded exactly (log-sum-exp restricted to the other classes),
    which is the limit of the official code's ``logits / T - 1000 gt_mask`` and stays exact
    for logits of any magnitude. Then ``T^2 KL(p_t || p_s) = TCKD + (1 - p_t,y) NCKD``.
    A label ``< 0`` ("no label") gives 0; a label ``>= C`` gives NaN (as
    :func:`cross_entropy`). Zhao et al. 2022, "Decoupled Knowledge Distillation".

    Args:
      student_logits: ``[..., C]`` with ``C >= 2``.
      teacher_logits: ``[..., C]``.
      labels: integer ``[...]``, ``< C``.
      alpha: weight of TCKD.
      beta: weight of NCKD.
      temperature: ``T > 0``.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    labels = jnp.asarray(labels)
    _check_logits("decoupled_kd", student_logits, teacher_logits)
    _check_labels("decoupled_kd", student_logits, labels)
    _check_temperature(temperature)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"decoupled_kd needs at least 2 classes, got {num_classes}.")
    is_target = labels[..., None] == jnp.arange(num_classes)
    is_other = ~is_target

    def parts(logits: Array) -> tuple[Array, Array]:
        z = logits / temperature
        lse_all = jax.nn.logsumexp(z, axis=-1)
        lse_other = jax.nn.logsumexp(z, axis=-1, where=is_other)
        z_target = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1)
        log_binary = jnp.stack([z_target - lse_all, lse_other - lse_all], axis=-1)
        log_non_target = jnp.where(is_other, z - lse_other[..., None], 0.0)
        return log_binary, log_non_target

    log_bs, log_qs = parts(student_logits)
    log_bt, log_qt = parts(teacher_logits)
    tckd = _kl(log_bt, log_bs)
    nckd = jnp.sum(jnp.where(is_other, jnp.exp(log_qt) * (log_qt - log_qs), 0.0), axis=-1)
    loss = temperature**2 * (alpha * tckd + beta * nckd)
    loss = jnp.where(labels < num_classes, loss, jnp.nan)
    return jnp.where(labels >= 0, loss, 0.0)


def topk_soft_target_kl(
    student_logits: ArrayLike,
    teacher_topk_logits: ArrayLike,
    teacher_topk_indices: ArrayLike,
    temperature: float = 1.0,
    teacher_residual: ArrayLike | None = None,
) -> Array:
    """Soft-target KL over the teacher's top-k classes (offline distillation).

    Without ``teacher_residual``: ``T^2 KL(softmax(t_k / T) || softmax(s[idx] / T))`` where
    ``s[idx]`` gathers the student logits at the teacher's top-k indices; both
    distributions are renormalised over the k classes (as MaxText's offline
    distillation), so the student's other logits get no gradient.

    With ``teacher_residual`` ``r`` (the teacher's probability mass outside its top-k at
    temperature ``T``, ``[...]``), the KL over ``k + 1`` buckets, the top-k classes and
    "everything else"::

        T^2 [ sum_j p_t,j log(p_t,j / p_s,j) + r log(r / r_s) ]
        p_t,j = (1 - r) softmax(t_k / T)_j,   p_s = softmax(s / T) over all C classes,
        r_s = 1 - sum_j p_s,j

    which pushes the student's mass outside the teacher's top-k down to ``r`` (the
    residual bucket of sparse offline distillation). With ``k = C`` (``r = 0``) both equal
    :func:`soft_target_kl`.

    Args:
      student_logits: ``[..., C]``.
      teacher_topk_logits: ``[..., k]``.
      teacher_topk_indices: integer ``[..., k]``, values in ``[0, C)`` (others give NaN).
      temperature: ``T > 0``.
      teacher_residual: ``[...]`` in ``[0, 1)``, or None.

    Returns:
      Unreduced losses ``[...]``.
    """
    student_logits = _as_float(student_logits)
    teacher_topk_logits = _as_float(teacher_topk_logits)
    indices = jnp.asarray(teacher_topk_indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(
            f"topk_soft_target_kl: teacher_topk_indices must be integers, got {indices.dtype}."
        )
    if indices.shape != teacher_topk_logits.shape:
        raise ValueError(
            "topk_soft_target_kl: teacher_topk_logits and teacher_topk_indices must have the "
            f"same shape, got {teacher_topk_logits.shape} and {indices.shape}."
        )
    if student_logits.ndim < 1 or student_logits.shape[:-1] != indices.shape[:-1]:
        raise ValueError(
            f"topk_soft_target_kl: student_logits {student_logits.shape} and teacher top-k "
            f"{indices.shape} differ in their leading axes."
        )
    gathered = jnp.take_along_axis(student_logits, indices, axis=-1)
    if teacher_residual is None:
        return soft_target_kl(gathered, teacher_topk_logits, temperature)
    _check_temperature(temperature)
    r = jnp.clip(_as_float(teacher_residual), 0.0, 1.0)
    log_ps_all = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    log_ps = jnp.take_along_axis(log_ps_all, indices, axis=-1)
    # log r_s = log(1 - sum_j p_s,j), from the top-k's logsumexp, without cancellation.
    log_in = jax.nn.logsumexp(log_ps, axis=-1)
    log_rs = jnp.log(-jnp.expm1(jnp.minimum(log_in, -1e-7)))
    log_pt = jnp.log1p(-r)[..., None] + jax.nn.log_softmax(teacher_topk_logits / temperature,
                                                           axis=-1)
    top = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    rest = jnp.where(r > 0, r * (jnp.log(jnp.maximum(r, 1e-30)) - log_rs), 0.0)
    return temperature**2 * (top + rest)


def hint_mse(student_features: ArrayLike, teacher_features: ArrayLike) -> Array:
    """FitNets hint loss: mean squared difference over all non-batch axes.

    ``mean_{h,w,c,...} (F_s - F_t)^2`` per example. The student features should already
    have gone through the trainable regressor (an adapter module, not part of the loss).
    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

    Args:
      student_features: ``[B, ...]``.
      teacher_features: ``[B, ...]``, same shape.

    Returns:
      Unreduced losses ``[B]``.
    """
    student_features, teacher_features = _as_float(student_features), _as_float(teacher_features)
    _check_features("hint_mse", student_features, teacher_features)
    axes = tuple(range(1, student_features.ndim))
    return jnp.mean(jnp.square(student_features - teacher_features), axis=axes)


def attention_transfer(
    student_features: ArrayLike, teacher_features: ArrayLike, p: float = 2
) -> Array:
    """Activation-based attention transfer.

    For NHWC features, ``a = mean_c |F|^p`` flattened to ``[B, H*W]`` and L2-normalised per
    example (``a / max(||a||, 1e-12)``); the loss is ``mean_{hw} (a_s - a_t)^2``.
    Student and teacher may have different channel counts. Zagoruyko & Komodakis 2017,
    "Paying More Attention to Attention".

    Args:
      student_features: ``[B, H, W, C_s]``.
      teacher_features: ``[B, H, W, C_t]``.
      p: exponent, ``p >= 1`` (the paper uses 2).

    Returns:
      Unreduced losses ``[B]``.
    """
    student_features, teacher_features = _as_float(student_features), _as_float(teacher_features)
    if (
        student_features.ndim != 4
        or teacher_features.ndim != 4
        or student_features.shape[:3] != teacher_features.shape[:3]
    ):
        raise ValueError(
            "attention_transfer: features must be NHWC with the same B, H, W, got "
            f"{student_features.shape} and {teacher_features.shape}."
        )

    def attention(features: Array) -> Array:
        a = jnp.mean(jnp.abs(features) ** p, axis=-1)
        return _l2_normalize(a.reshape(a.shape[0], -1), axis=-1)

    return jnp.mean(jnp.square(attention(student_features) - attention(teacher_features)), -1)


# --------------------------------------------------------------------------- batch level


def _pairwise_distances(x: Array) -> Array:
    """``[B, B]`` Euclidean distances with a zero (not NaN) gradient at distance 0."""
    return _safe_norm(x[:, None, :] - x[None, :, :], axis=-1)


def rkd_distance(
    student_emb: ArrayLike, teacher_emb: ArrayLike, mask: ArrayLike | None = None
) -> Array:
    """Relational KD, distance-wise loss.

    ``d_ij = ||e_i - e_j|| / mu`` with ``mu`` the mean of ``||e_i - e_j||`` over pairs
    ``i != j``; the loss is ``mean_{i != j} huber(d^s_ij - d^t_ij)`` (delta = 1). Park et
    al. 2019, "Relational Knowledge Distillation". Memory is ``O(B^2 D)``.

    Args:
      student_emb: ``[B, ...]`` (flattened to ``[B, D_s]``).
      teacher_emb: ``[B, ...]`` (flattened to ``[B, D_t]``).
      mask: optional ``[B]``, nonzero = keep; pairs with a dropped example are excluded.

    Returns:
      A scalar (0 when fewer than two examples are kept).
    """
    student, teacher = _flatten_batch("rkd_distance", student_emb, teacher_emb)
    batch = student.shape[0]
    keep = _keep_mask("rkd_distance", mask, batch)
    pairs = keep[:, None] & keep[None, :] & ~jnp.eye(batch, dtype=bool)

    def normalised(emb: Array) -> Array:
        d = _pairwise_distances(_zero_dropped(emb, keep))
        mean = masked_mean(d, pairs)
        return d / jnp.where(mean > 0, mean, 1.0)

    return masked_mean(_huber(normalised(student) - normalised(teacher)), pairs)


def rkd_angle(
    student_emb: ArrayLike, teacher_emb: ArrayLike, mask: ArrayLike | None = None
) -> Array:
    """Relational KD, angle-wise loss.

    ``cos_ijk = <u(e_j - e_i), u(e_k - e_i)>`` with ``u(x) = x / max(||x||, 1e-12)`` (so a
    zero vector gives 0); the loss is ``mean_{i,j,k} huber(cos^s_ijk - cos^t_ijk)``
    (delta = 1) over all ``B^3`` triplets, as the official code. Park et al. 2019,
    "Relational Knowledge Distillation". Memory is ``O(B^2 D + B^3)``.

    Args:
      student_emb: ``[B, ...]`` (flattened to ``[B, D_s]``).
      teacher_emb: ``[B, ...]`` (flattened to ``[B, D_t]``).
      mask: optional ``[B]``, nonzero = keep; triplets with a dropped example are excluded.

    Returns:
      A scalar (0 when no example is kept).
    """
    student, teacher = _flatten_batch("rkd_angle", student_emb, teacher_emb)
    keep = _keep_mask("rkd_angle", mask, student.shape[0])
    triplets = keep[:, None, None] & keep[None, :, None] & keep[None, None, :]

    def angles(emb: Array) -> Array:
        emb = _zero_dropped(emb, keep)
        unit = _l2_normalize(emb[None, :, :] - emb[:, None, :], axis=-1)  # [i, j] = e_j - e_i
        return jnp.einsum("ijd,ikd->ijk", unit, unit, precision=_HIGHEST)

    return masked_mean(_huber(angles(student) - angles(teacher)), triplets)


def similarity_preserving(
    student_features: ArrayLike, teacher_features: ArrayLike, mask: ArrayLike | None = None
) -> Array:
    """Similarity-preserving KD.

    ``G = F F^T`` for ``F`` flattened to ``[B, D]``, each row of ``G`` L2-normalised
    (``G_i / max(||G_i||, 1e-12)``, as the paper and official code); the loss is
    ``||G_s - G_t||_F^2 / B^2``. Tung & Mori 2019, "Similarity-Preserving Knowledge
    Distillation".

    Args:
      student_features: ``[B, ...]``.
      teacher_features: ``[B, ...]``.
      mask: optional ``[B]``, nonzero = keep; ``B`` is then the number of kept examples.

    Returns:
      A scalar (0 when no example is kept).
    """
    student, teacher = _flatten_batch("similarity_preserving", student_features, teacher_features)
    keep = _keep_mask("similarity_preserving", mask, student.shape[0])

    def gram(features: Array) -> Array:
        features = _zero_dropped(features, keep)
        return _l2_normalize(jnp.matmul(features, features.T, precision=_HIGHEST), axis=-1)

    count = jnp.sum(keep).astype(student.dtype)
    sq_err = jnp.sum(jnp.square(gram(student) - gram(teacher)))
    return sq_err / jnp.maximum(count * count, 1.0)


def pkt(
    student_emb: ArrayLike,
    teacher_emb: ArrayLike,
    eps: float = 1e-7,
    mask: ArrayLike | None = None,
) -> Array:
    """Probabilistic knowledge transfer.

    With ``u_i = e_i / (||e_i|| + eps)``, ``K_ij = (<u_i, u_j> + 1) / 2`` (diagonal included)
    and ``P_ij = K_ij / sum_j K_ij``, the loss is
    ``mean_i sum_j P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``, i.e. the mean over rows
    of ``KL(teacher row || student row)`` (the official code averages over all ``B^2``
    entries instead, i.e. divides this by ``B``). Passalis & Tefas 2018, "Learning Deep
    Representations with Probabilistic Knowledge Transfer".

    Args:
      student_emb: ``[B, ...]`` (flattened to ``[B, D_s]``).
      teacher_emb: ``[B, ...]`` (flattened to ``[B, D_t]``).
      eps: stabiliser of the normalisation and the log.
      mask: optional ``[B]``, nonzero = keep; dropped examples leave rows and columns.

    Returns:
      A scalar (0 when no example is kept).
    """
    student, teacher = _flatten_batch("pkt", student_emb, teacher_emb)
    keep = _keep_mask("pkt", mask, student.shape[0])
    pairs = keep[:, None] & keep[None, :]

    def conditionals(emb: Array) -> Array:
        emb = _zero_dropped(emb, keep)
        unit = emb / (_safe_norm(emb, axis=-1, keepdims=True) + eps)
        kernel = (jnp.matmul(unit, unit.T, precision=_HIGHEST) + 1.0) / 2.0
        kernel = jnp.where(pairs, kernel, 0.0)
        row_sum = jnp.sum(kernel, axis=-1, keepdims=True)
        return kernel / jnp.where(row_sum > 0, row_sum, 1.0)

    p_s, p_t = conditionals(student), conditionals(teacher)
    rows = jnp.sum(p_t * (jnp.log(p_t + eps) - jnp.log(p_s + eps)), axis=-1)
    return masked_mean(rows, keep)


def _pearson_centered(a: Array, b: Array, axis: int) -> Array:
    """``<a, b> / (||a|| ||b|| + eps)`` for already-centred ``a``, ``b``."""
    num = jnp.sum(a * b, axis=axis)
    return num / (_safe_norm(a, axis=axis) * _safe_norm(b, axis=axis) + _PEARSON_EPS)


def dist_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 1.0,
    mask: ArrayLike | None = None,
) -> Array:
    """DIST: knowledge distillation from a stronger teacher, by correlation.

    ``T^2 (beta inter + gamma intra)`` with ``inter = 1 - mean_i rho(p_s[i, :], p_t[i, :])``
    (per example, across classes) and ``intra = 1 - mean_c rho(p_s[:, c], p_t[:, c])`` (per
    class, across the batch), ``rho(a, b) = <a - mean a, b - mean b> /
    (||a - mean a|| ||b - mean b|| + 1e-8)`` (as the official code). Huang et al. 2022,
    "Knowledge Distillation from A Stronger Teacher".

    Args:
      student_logits: ``[B, C]``.
      teacher_logits: ``[B, C]``.
      beta: weight of the inter-class relation.
      gamma: weight of the intra-class relation.
      temperature: ``T > 0``.
      mask: optional ``[B]``, nonzero = keep; columns are correlated over kept examples.

    Returns:
      A scalar (0 when no example is kept).
    """
    student_logits, teacher_logits = _as_float(student_logits), _as_float(teacher_logits)
    _check_same_shape("dist_loss", student_logits, teacher_logits)
    if student_logits.ndim != 2:
        raise ValueError(f"dist_loss: logits must be [B, C], got shape {student_logits.shape}.")
    _check_temperature(temperature)
    keep = _keep_mask("dist_loss", mask, student_logits.shape[0])
    keep_col = keep[:, None]
    count = jnp.sum(keep).astype(student_logits.dtype)
    p_s = jax.nn.softmax(_zero_dropped(student_logits, keep) / temperature, axis=-1)
    p_t = jax.nn.softmax(_zero_dropped(teacher_logits, keep) / temperature, axis=-1)

    def center_rows(p: Array) -> Array:
        return p - jnp.mean(p, axis=-1, keepdims=True)

    inter = masked_mean(1.0 - _pearson_centered(center_rows(p_s), center_rows(p_t), -1), keep)

    def center_cols(p: Array) -> Array:
        mean = jnp.sum(jnp.where(keep_col, p, 0.0), axis=0) / jnp.maximum(count, 1.0)
        return jnp.where(keep_col, p - mean, 0.0)

    rho_cols = _pearson_centered(center_cols(p_s), center_cols(p_t), 0)
    intra = jnp.where(count > 0, 1.0 - jnp.mean(rho_cols), 0.0)
    return temperature**2 * (beta * inter + gamma * intra)


# --------------------------------------------------------------------------- sequences
# Transformer distillation: per-layer tensors of a student and a teacher encoder and the
# token mask ``[B, L]`` (nonzero = real token, 0 = padding). Padded query positions never
# count, and neither do padded keys; values there (even -1e9, inf or NaN) never reach the
# value or the gradient. Each loss returns one value per example, ``[B]``: the mean over
# that example's real tokens (and heads), 0 for an example without any.


def _check_rank(name: str, arg: str, x: Array, layout: str) -> None:
    rank = len(layout.split(","))
    if x.ndim != rank:
        raise ConfigError(f"{name}: {arg} must be [{layout}], got shape {x.shape}.")


def _token_mask(name: str, mask: ArrayLike, batch: int, length: int) -> Array:
    """Boolean ``[B, L]`` from a 0/1 (or boolean, or float) token mask."""
    mask = jnp.asarray(mask)
    if mask.shape != (batch, length):
        raise ConfigError(
            f"{name}: mask must be [B, L] = ({batch}, {length}) (1 = token, 0 = padding), "
            f"got shape {mask.shape}."
        )
    return mask != 0


def _key_mask(keep: Array) -> Array:
    """``[B, 1, 1, L]`` keys a query attends to: the real tokens (every key for an example
    without any, so that its rows, which never count, stay finite)."""
    has_token = jnp.any(keep, axis=-1, keepdims=True)
    return (keep | ~has_token)[:, None, None, :]


def _per_example_mean(values: Array, keep: Array) -> Array:
    """``sum(values) / count`` over the kept entries of all non-batch axes; 0 if none."""
    keep = jnp.broadcast_to(keep, values.shape)
    axes = tuple(range(1, values.ndim))
    total = jnp.sum(jnp.where(keep, values, 0.0), axis=axes)
    count = jnp.sum(keep, axis=axes).astype(values.dtype)
    return total / jnp.maximum(count, 1.0)


def _row_kl(log_p: Array, log_q: Array, keys: Array) -> Array:
    """``KL(p || q)`` over the kept keys of the last axis."""
    return jnp.sum(jnp.where(keys, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)


def _relation_kl(student: Array, teacher: Array, keep: Array) -> Array:
    """``mean_{r, real i} KL(R_t[r, i] || R_s[r, i])`` per example for ``[B, R, L, d]`` inputs
    (``d`` may differ), ``R = softmax_{real j}(X X^T / sqrt(d))``."""
    keys = _key_mask(keep)

    def log_relation(x: Array) -> Array:
        x = jnp.where(keep[:, None, :, None], x, 0.0)
        scores = jnp.einsum("brid,brjd->brij", x, x, precision=_HIGHEST) / x.shape[-1] ** 0.5
        keys_full = jnp.broadcast_to(keys, scores.shape)
        lse = jax.nn.logsumexp(scores, axis=-1, where=keys_full, keepdims=True)
        return jnp.where(keys_full, scores - lse, 0.0)

    rows = _row_kl(log_relation(teacher), log_relation(student), keys)
    return _per_example_mean(rows, keep[:, None, :])


def tinybert_hidden_mse(
    student_hidden: ArrayLike, teacher_hidden: ArrayLike, mask: ArrayLike
) -> Array:
    """TinyBERT hidden-state (and embedding) loss over real tokens.

    ``L_hidn = MSE(H_s W_h, H_t)`` (Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural
    Language Understanding", eq. 8; eq. 9 is the same loss on the embedding outputs): per
    example ``sum_{real i} sum_h (S_ih - T_ih)^2 / (n H)``, ``n`` its number of real
    tokens. ``student_hidden`` is the PROJECTED student ``H_s W_h``: the learned ``W_h``
    ``[H_s, H_t]`` is a trainable adapter (:mod:`jaxkd.objective`, ``adapter=True``; like
    the official code's ``fit_dense`` it also has a bias), not part of the loss.

    Args:
      student_hidden: ``[B, L, H]``, already projected to the teacher's width.
      teacher_hidden: ``[B, L, H]``.
      mask: ``[B, L]``, nonzero = real token.

    Returns:
      Unreduced losses ``[B]``.
    """
    name = "tinybert_hidden_mse"
    student, teacher = _as_float(student_hidden), _as_float(teacher_hidden)
    _check_rank(name, "student_hidden", student, "B, L, H")
    _check_rank(name, "teacher_hidden", teacher, "B, L, H")
    if student.shape != teacher.shape:
        raise ConfigError(
            f"{name}: student_hidden {student.shape} and teacher_hidden {teacher.shape} differ; "
            "project the student to the teacher's width first (adapter=True in the objective)."
        )
    keep = _token_mask(name, mask, *student.shape[:2])[..., None]
    diff = jnp.where(keep, student, 0.0) - jnp.where(keep, teacher, 0.0)
    return _per_example_mean(jnp.square(diff), keep)


def tinybert_attention_mse(
    student_scores: ArrayLike, teacher_scores: ArrayLike, mask: ArrayLike
) -> Array:
    """TinyBERT attention loss: MSE between unnormalised attention scores.

    ``L_attn = 1/h sum_a MSE(A_s,a, A_t,a)`` with ``A = Q K^T / sqrt(d)`` before the softmax
    (Jiao et al. 2020, "TinyBERT", eq. 7): per example
    ``sum_a sum_{real i, real j} (A_s,aij - A_t,aij)^2 / (h n^2)``. Pairs with a padded query
    or key are excluded, so the large negative padding bias (-1e9, -inf) never enters (the
    official code zeroes scores <= -100 instead, which also lets padding count in the mean).

    Args:
      student_scores: ``[B, heads, L, L]``.
      teacher_scores: ``[B, heads, L, L]``, the same number of heads.
      mask: ``[B, L]``, nonzero = real token.

    Returns:
      Unreduced losses ``[B]``.
    """
    name = "tinybert_attention_mse"
    student, teacher = _as_float(student_scores), _as_float(teacher_scores)
    _check_attention_maps(name, "scores", student, teacher)
    keep = _token_mask(name, mask, student.shape[0], student.shape[-1])
    pairs = keep[:, None, :, None] & keep[:, None, None, :]
    diff = jnp.where(pairs, student, 0.0) - jnp.where(pairs, teacher, 0.0)
    return _per_example_mean(jnp.square(diff), pairs)


def _check_attention_maps(name: str, what: str, student: Array, teacher: Array) -> None:
    _check_rank(name, f"student_{what}", student, "B, heads, L, L")
    _check_rank(name, f"teacher_{what}", teacher, "B, heads, L, L")
    if student.shape[1] != teacher.shape[1]:
        raise ConfigError(
            f"{name}: student and teacher need the same number of heads, got "
            f"{student.shape[1]} and {teacher.shape[1]} (student_{what} {student.shape}, "
            f"teacher_{what} {teacher.shape})."
        )
    if student.shape != teacher.shape or student.shape[-1] != student.shape[-2]:
        raise ConfigError(
            f"{name}: student_{what} {student.shape} and teacher_{what} {teacher.shape} must "
            "both be [B, heads, L, L] with the same B and L."
        )


def minilm_attention_kl(
    student_probs: ArrayLike, teacher_probs: ArrayLike, mask: ArrayLike
) -> Array:
    """MiniLM self-attention distribution transfer ``KL(A_t || A_s)``.

    ``L_AT = 1/(h n) sum_a sum_{real i} KL(A_t,ai || A_s,ai)`` per example, ``A`` the
    attention probabilities of the last layer (Wang et al. 2020, "MiniLM: Deep
    Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
    eq. 6). Each row is a distribution over the real keys only: the probabilities are
    renormalised there (``A_ij / sum_{real j} A_ij``, a no-op for a properly masked
    softmax), so whatever sits at padded keys does not count. ``0 log 0 = 0``; a student
    probability that underflowed to 0 where the teacher's is not is floored at the
    smallest normal float (a large but finite loss, no gradient through that entry).

    Args:
      student_probs: ``[B, heads, L, L]``, rows summing to 1.
      teacher_probs: ``[B, heads, L, L]``, the same number of heads.
      mask: ``[B, L]``, nonzero = real token.

    Returns:
      Unreduced losses ``[B]``.
    """
    name = "minilm_attention_kl"
    student, teacher = _as_float(student_probs), _as_float(teacher_probs)
    _check_attention_maps(name, "probs", student, teacher)
    keep = _token_mask(name, mask, student.shape[0], student.shape[-1])
    keys = _key_mask(keep)
    pairs = keep[:, None, :, None] & keys
    tiny = jnp.finfo(student.dtype).tiny

    def renormalised(p: Array) -> tuple[Array, Array]:
        # In log space: a row without mass on real keys keeps finite gradients (no 1/total^2).
        p = jnp.where(pairs, p, 0.0)
        total = jnp.sum(p, axis=-1, keepdims=True)
        log_p = jnp.log(jnp.maximum(p, tiny)) - jnp.log(jnp.maximum(total, tiny))
        return jnp.where(p > 0, jnp.exp(log_p), 0.0), log_p

    p_t, log_pt = renormalised(teacher)
    _, log_ps = renormalised(student)
    rows = jnp.sum(jnp.where(keys, p_t * (log_pt - log_ps), 0.0), axis=-1)
    return _per_example_mean(rows, keep[:, None, :])


def minilm_value_relation_kl(
    student_value: ArrayLike, teacher_value: ArrayLike, mask: ArrayLike
) -> Array:
    """MiniLM value-relation transfer ``KL(VR_t || VR_s)``.

    ``VR = softmax(V V^T / sqrt(d))`` per head over the real keys and
    ``L_VR = 1/(h n) sum_a sum_{real i} KL(VR_t,ai || VR_s,ai)`` per example (Wang et al.
    2020, "MiniLM", eq. 7-8). The head size ``d`` may differ between student and teacher
    (each side is scaled by its own ``sqrt(d)``); the head count may not (see
    :func:`minilmv2_relation_kl` for that).

    Args:
      student_value: ``[B, heads, L, d_s]``.
      teacher_value: ``[B, heads, L, d_t]``, the same number of heads.
      mask: ``[B, L]``, nonzero = real token.

    Returns:
      Unreduced losses ``[B]``.
    """
    name = "minilm_value_relation_kl"
    student, teacher = _as_float(student_value), _as_float(teacher_value)
    _check_rank(name, "student_value", student, "B, heads, L, d")
    _check_rank(name, "teacher_value", teacher, "B, heads, L, d")
    if student.shape[1] != teacher.shape[1]:
        raise ConfigError(
            f"{name}: student and teacher need the same number of heads, got "
            f"{student.shape[1]} and {teacher.shape[1]}; minilmv2_relation_kl relates "
            "different head counts."
        )
    if student.shape[:3] != teacher.shape[:3]:
        raise ConfigError(
            f"{name}: student_value {student.shape} and teacher_value {teacher.shape} must "
            "have the same B, heads and L."
        )
    keep = _token_mask(name, mask, student.shape[0], student.shape[2])
    return _relation_kl(student, teacher, keep)


def minilmv2_relation_kl(
    student_x: ArrayLike, teacher_x: ArrayLike, mask: ArrayLike, *, num_relation_heads: int
) -> Array:
    """MiniLMv2 multi-head self-attention relation transfer (Q-Q, K-K or V-V).

    The queries (or keys, or values) of all attention heads are concatenated to
    ``X = [x_1, ..., x_h]`` ``[B, L, h d]`` and split again into ``A_r`` relation heads
    ``X_r`` of size ``d_r = h d / A_r``; ``R_r = softmax(X_r X_r^T / sqrt(d_r))`` over the
    real keys and ``L = 1/(A_r n) sum_r sum_{real i} KL(R_t,ri || R_s,ri)`` per example
    (Wang et al. 2021, "MiniLMv2: Multi-Head Self-Attention Relation Distillation for
    Compressing Pretrained Transformers", eq. 3-5). Student and teacher use the same
    ``A_r``, so their head counts and head sizes may differ. With ``A_r = h`` on both sides
    this is :func:`minilm_value_relation_kl` (MiniLM's V-V relation).

    Args:
      student_x: ``[B, heads_s, L, d_s]``.
      teacher_x: ``[B, heads_t, L, d_t]``.
      mask: ``[B, L]``, nonzero = real token.
      num_relation_heads: ``A_r``, dividing both ``heads_s d_s`` and ``heads_t d_t``.

    Returns:
      Unreduced losses ``[B]``.
    """
    name = "minilmv2_relation_kl"
    student, teacher = _as_float(student_x), _as_float(teacher_x)
    _check_rank(name, "student_x", student, "B, heads, L, d")
    _check_rank(name, "teacher_x", teacher, "B, heads, L, d")
    if (student.shape[0], student.shape[2]) != (teacher.shape[0], teacher.shape[2]):
        raise ConfigError(
            f"{name}: student_x {student.shape} and teacher_x {teacher.shape} must have the "
            "same B and L."
        )
    if isinstance(num_relation_heads, bool) or not isinstance(num_relation_heads, Integral):
        raise ConfigError(f"{name}: num_relation_heads must be an int, got {num_relation_heads!r}.")
    num_relation_heads = int(num_relation_heads)
    for side, x in (("student", student), ("teacher", teacher)):
        width = x.shape[1] * x.shape[3]
        if num_relation_heads < 1 or width % num_relation_heads:
            raise ConfigError(
                f"{name}: num_relation_heads={num_relation_heads} must divide the {side}'s "
                f"heads * d = {x.shape[1]} * {x.shape[3]} = {width}."
            )
    keep = _token_mask(name, mask, student.shape[0], student.shape[2])

    def relation_heads(x: Array) -> Array:  # [B, h, L, d] -> [B, A_r, L, h d / A_r]
        batch, _, length, _ = x.shape
        x = jnp.transpose(x, (0, 2, 1, 3)).reshape(batch, length, num_relation_heads, -1)
        return jnp.transpose(x, (0, 2, 1, 3))

    return _relation_kl(relation_heads(student), relation_heads(teacher), keep)
