r"""Sentence embeddings: how close a student's are to its teacher's, and what they know.

A sentence encoder (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019) maps a text to one
vector, its ``embedding`` feature (:class:`jaxkd.models.bert.BertEncoder`: the mean of the
last hidden states over the tokens, or the ``[CLS]`` state). A student distilled from one
(Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using Knowledge
Distillation", EMNLP 2020: ``mean_i ||s(x_i) - t(x_i)||^2``, the loss ``hint_mse`` on the
``embedding`` features) is measured two ways:

- **cosine to the teacher**, ``mean_i <s_i, t_i> / (||s_i|| ||t_i||)`` over a split's texts
  (1 = the teacher's directions; it needs the same width);
- **linear-probe accuracy** (Alain & Bengio 2016; Conneau & Kiela, "SentEval", 2018): a
  multinomial logistic regression fitted on the frozen embeddings of the training split,
  accuracy on the eval split. The features are standardised with the training split's mean
  and std, the fit minimises

      L(W, b) = mean_i -log softmax(W^T z_i + b)[y_i] + (l2 / 2) ||W||_F^2

  by L-BFGS (a fixed number of iterations, so it is deterministic), without a bias penalty.

Padding never counts: the embedding is pooled over the attention mask, and the padded rows
of the last eval batch (``mask == 0``) are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

L2 = 1e-3
ITERATIONS = 200


def embed(apply: Callable[..., Any], variables: Any, *splits: Iterable[dict[str, Any]]
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of ``splits`` (text batches of :mod:`jaxkd.data.text`), ``(embeddings [N, H]
    float32, labels [N] int32)`` of its real rows; ``apply`` a BERT's ``model.apply``,
    compiled once for all the splits (once per batch shape)."""

    @jax.jit
    def one(v, ids, mask):
        _, features = apply(v, ids, mask, train=False, return_features=True)
        return features["embedding"].astype(jnp.float32)

    results = []
    for batches in splits:
        out, labels = [], []
        for b in batches:
            keep = np.asarray(b["mask"]) > 0 if "mask" in b else slice(None)
            out.append(np.asarray(one(variables, b["input_ids"], b["attention_mask"]))[keep])
            labels.append(np.asarray(b["label"])[keep])
        results.append((np.concatenate(out), np.concatenate(labels).astype(np.int32)))
    return results


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """``mean_i <a_i, b_i> / (||a_i|| ||b_i||)`` of two ``[N, H]`` embeddings."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine to the teacher needs embeddings of one shape, got {a.shape} "
                         f"and {b.shape} (a student narrower than its teacher has none)")
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1) / norms))


def fit_logistic(x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = L2,
                 iterations: int = ITERATIONS) -> tuple[np.ndarray, np.ndarray]:
    """``(W [H, C], b [C])`` minimising the module docstring's ``L`` on features ``x``
    ``[N, H]`` and labels ``y`` ``[N]`` (``iterations`` steps of L-BFGS from zero)."""
    x = jnp.asarray(x, jnp.float32)
    onehot = jax.nn.one_hot(jnp.asarray(y), num_classes)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        nll = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
        return nll + 0.5 * l2 * jnp.sum(p["w"] ** 2)

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def fit(p):
        def step(carry, _):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = solver.update(grad, state, p, value=value, grad=grad,
                                           value_fn=loss)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(step, (p, solver.init(p)), None, length=iterations)
        return p

    p = fit({"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))})
    return np.asarray(p["w"]), np.asarray(p["b"])


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                 test_y: np.ndarray, *, l2: float = L2, iterations: int = ITERATIONS) -> float:
    """Accuracy on ``test`` of the logistic regression fitted on ``train`` (standardised
    with the training mean and std, module docstring); unlabelled rows (``y < 0``) are
    left out of the fit."""
    labelled = train_y >= 0
    train_x, train_y = train_x[labelled], train_y[labelled]
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    w, b = fit_logistic((train_x - mean) / std, train_y, num_classes, l2=l2,
                        iterations=iterations)
    predicted = np.argmax(((test_x - mean) / std) @ w + b, axis=1)
    return float(np.mean(predicted == test_y))


def report(student: tuple[Callable[..., Any], Any], teacher: tuple[Callable[..., Any], Any] | None,
           train_batches: Callable[[], Iterable[dict[str, Any]]],
           eval_batches: Callable[[], Iterable[dict[str, Any]]]) -> dict[str, float]:
    """The student's ``linear_probe_accuracy`` (fitted on ``train_batches``, measured on
    ``eval_batches``) and, with a teacher (its ``(apply, variables)``), its
    ``cosine_to_teacher`` on the eval texts and the teacher's own probe accuracy."""
    (train_x, train_y), (test_x, test_y) = embed(*student, train_batches(), eval_batches())
    out = {"linear_probe_accuracy": linear_probe(train_x, train_y, test_x, test_y)}
    if teacher is not None:
        (t_train, _), (t_test, _) = embed(*teacher, train_batches(), eval_batches())
        if t_test.shape == test_x.shape:
            out["cosine_to_teacher"] = mean_cosine(test_x, t_test)
        out["teacher_linear_probe_accuracy"] = linear_probe(t_train, train_y, t_test, test_y)
    return out
