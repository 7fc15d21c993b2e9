"""Tasks: what a batch holds, which positions count, and what is measured.

A task is the part of training that depends on what is learned, not on how: the trainer,
the objective and the export call these methods and nothing else about the data::

    model_inputs(batch)       -> the positional inputs of ``model.apply`` (after variables)
    example_inputs(shape, n)  -> zeros of ``n`` examples, for ``model.init`` and tracing
    targets(batch)            -> Targets(labels, labelled, mask)
    train_metrics(logits, t)  -> (sum, count) pairs logged during training
    eval_metrics(logits, b)   -> (sum, count) pairs of an evaluation batch

``Targets.labels`` are what label terms (the term ``cross_entropy``) learn from,
``labelled`` marks the positions that have a label (``[B, ...]``, e.g. 0 for transfer-set
inputs or padding tokens) and ``mask`` the positions teacher terms average over (``None``:
every position, else ``[B, ...]``). A dataset names its task
(:attr:`jaxkd.data.datasets.Dataset.task`); :func:`register` adds one.
"""

from __future__ import annotations

from jaxkd.schema import FieldError
from jaxkd.tasks.base import Targets, Task
from jaxkd.tasks.causal_lm import CausalLM
from jaxkd.tasks.classification import Classification
from jaxkd.tasks.text import SentenceEmbedding, TextClassification

CLASSIFICATION = Classification()
TEXT_CLASSIFICATION = TextClassification()
CAUSAL_LM = CausalLM()
SENTENCE_EMBEDDING = SentenceEmbedding()
TASKS: dict[str, Task] = {"classification": CLASSIFICATION,
                          "text_classification": TEXT_CLASSIFICATION,
                          "sentence_embedding": SENTENCE_EMBEDDING,
                          "causal_lm": CAUSAL_LM}


def register(name: str, task: Task) -> None:
    """Makes datasets whose ``task`` is ``name`` train with ``task``."""
    TASKS[name] = task


def get(name: str) -> Task:
    if name not in TASKS:
        raise FieldError("task", f"={name!r} is not a task; allowed: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["CAUSAL_LM", "CLASSIFICATION", "SENTENCE_EMBEDDING", "TASKS", "TEXT_CLASSIFICATION",
           "CausalLM", "Classification", "SentenceEmbedding", "Targets", "Task",
           "TextClassification", "get", "register"]
