"""The dataset registry: what jaxkd knows of each dataset before opening it.

A dataset is a tfds dataset (``tfds.builder(name)``: the offline builders of this package,
``mnist1d``, ``digits`` and ``bbc_news``, or any tfds dataset prepared as array_record) plus the
constants of :class:`Dataset`: the normalisation of its raw examples, its evaluation
split, whether its training examples fit in host memory, and the task it serves
(:mod:`jaxkd.tasks`). :func:`register` adds one, so a user's own tfds builder works with
every config::

    from jaxkd.data import datasets
    datasets.register("my_images", datasets.Dataset(mean=(127.5,), std=(64.0,)))

Normalisation is ``(x - mean) / std`` per channel, in the raw units of the examples:

- ``mnist1d``: 0 and 1 (the generator already standardises its signals);
- ``digits``: 4.887 and 6.017 (pixels of the train split, in the raw 0..16 units);
- ``mnist``: 0.1307 and 0.3081 times 255 (the usual MNIST train statistics);
- ``fashion_mnist``: 0.2860 and 0.3530 times 255 (its train statistics);
- ``cifar10`` / ``cifar100``: per-channel train statistics times 255;
- ``imagenet2012``: the usual ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224,
  0.225) times 255;
- ``bbc_news`` (text, :mod:`jaxkd.data.bbc_news`): none; its examples are token ids
  (:mod:`jaxkd.data.text`), so ``mean`` / ``std`` are unused (0 and 1). Its task is
  ``text_classification``.

Nothing heavy is imported: configs read the registry without tfds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxkd.schema import FieldError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Per-dataset constants: normalisation (raw units, per channel) and defaults.

    ``validation_examples``: the validation split (:func:`jaxkd.config.validation`) is the
    last this many examples of ``train``; 0 = the last 10 %. ``validation_split``: a split of
    its own that is the validation split (``train`` stays whole).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    eval_split: str = "test"
    in_memory: bool = True
    task: str = "classification"
    validation_examples: int = 0
    validation_split: str = ""


def _times_255(*values: float) -> tuple[float, ...]:
    return tuple(255.0 * v for v in values)


DATASETS: dict[str, Dataset] = {
    "mnist1d": Dataset(mean=(0.0,), std=(1.0,)),
    "digits": Dataset(mean=(4.887,), std=(6.017,)),
    "mnist": Dataset(mean=_times_255(0.1307), std=_times_255(0.3081),
                     validation_examples=10_000),
    "fashion_mnist": Dataset(mean=_times_255(0.2860), std=_times_255(0.3530),
                             validation_examples=10_000),
    "cifar10": Dataset(mean=_times_255(0.4914, 0.4822, 0.4465),
                       std=_times_255(0.2470, 0.2435, 0.2616)),
    "cifar100": Dataset(mean=_times_255(0.5071, 0.4865, 0.4409),
                        std=_times_255(0.2673, 0.2564, 0.2762)),
    "imagenet2012": Dataset(mean=_times_255(0.485, 0.456, 0.406),
                            std=_times_255(0.229, 0.224, 0.225),
                            eval_split="validation", in_memory=False),
    "bbc_news": Dataset(mean=(0.0,), std=(1.0,), task="text_classification",
                        validation_split="validation"),
}


def task_of(data: Any) -> str:
    """The task a run on ``config.data`` trains: its ``task`` field, else the dataset's."""
    return data.task or get(data.name).task


def register(name: str, dataset: Dataset) -> None:
    """Makes ``config.data.name=name`` known (its tfds builder must be importable)."""
    DATASETS[name] = dataset


def names() -> list[str]:
    return list(DATASETS)


def get(name: str) -> Dataset:
    """The registered dataset ``name``; a :class:`FieldError` of field ``name`` naming the
    known ones otherwise."""
    if name not in DATASETS:
        raise FieldError("name", f"={name!r} is not a known dataset; allowed: "
                                 f"{', '.join(DATASETS)}")
    return DATASETS[name]
