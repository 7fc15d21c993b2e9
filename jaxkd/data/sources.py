"""Examples addressed by index and read a batch at a time, as numpy arrays.

A *source* has ``len(source)`` and ``source.read(indices) -> (images, labels)`` with
``images`` ``[len(indices), *example_shape]`` in the dataset's own dtype (float32 for
``mnist1d``, uint8 for the image datasets) and ``labels`` int32 ``[len(indices)]``. Three
kinds compose:

- :class:`TfdsSplit`: one split of a prepared tfds dataset through its random-access data
  source (``builder.as_data_source(split)``, array_record files, no TensorFlow). A batch is
  one ``__getitems__`` call; tfds still decodes each record in Python (about 30 us per
  ``mnist1d`` record on one core).
- :class:`InMemory`: arrays held in host memory (:func:`load`), a batch is one fancy index.
- :class:`Concatenated`: sources one after the other, e.g. a labelled split then a
  transfer split whose labels are ``-1`` (the "transfer set" of Hinton et al. 2015,
  "Distilling the Knowledge in a Neural Network").
- :class:`Subset`: some examples of a source (:func:`without_labels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

UNLABELLED = -1


class Source(Protocol):
    """What the pipeline reads training and evaluation examples from."""

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One tfds split read through its data source.

    Attributes:
      data_source: ``builder.as_data_source(split)``: ``len``, ``__getitems__(keys)`` giving
        dicts with ``'image'`` and ``'label'``.
      labelled: ``False`` gives every example ``label = -1`` (a transfer set).
      image_fn: applied to each decoded image before stacking (e.g. resize and crop images
        of varying size); ``None`` keeps them as decoded.
    """

    data_source: Sequence[dict[str, Any]]
    labelled: bool = True
    image_fn: Callable[[np.ndarray], np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.data_source)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        examples = self.data_source.__getitems__([int(i) for i in indices])
        images = [ex["image"] for ex in examples]
        if self.image_fn is not None:
            images = [self.image_fn(image) for image in images]
        if self.labelled:
            labels = np.array([ex["label"] for ex in examples], np.int32)
        else:
            labels = np.full(len(examples), UNLABELLED, np.int32)
        return np.stack(images), labels


@dataclasses.dataclass(frozen=True)
class InMemory:
    """Every example in two host arrays."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.images[indices], self.labels[indices]


def load(source: Source, chunk_size: int = 4096) -> InMemory:
    """Reads all of ``source`` into memory, ``chunk_size`` examples per read."""
    chunks = [source.read(np.arange(start, min(start + chunk_size, len(source))))
              for start in range(0, len(source), chunk_size)]
    return InMemory(np.concatenate([c[0] for c in chunks]),
                    np.concatenate([c[1] for c in chunks]))


@dataclasses.dataclass(frozen=True)
class Subset:
    """The examples ``indices`` of ``source``, in that order."""

    source: Source
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read(self.indices[indices])


def without_labels(source: Source, labels: tuple[int, ...], chunk_size: int = 4096) -> Subset:
    """``source`` without its examples whose label is one of ``labels`` (e.g. Hinton et al.
    2015's transfer set that omits every 3); reads every example once."""
    keep = [start + np.flatnonzero(~np.isin(
        source.read(np.arange(start, min(start + chunk_size, len(source))))[1], labels))
        for start in range(0, len(source), chunk_size)]
    return Subset(source, np.concatenate(keep) if keep else np.zeros(0, np.int64))


@dataclasses.dataclass(frozen=True)
class Concatenated:
    """``parts[0]``'s examples, then ``parts[1]``'s, ...; one index space over all."""

    parts: tuple[Source, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(self.parts) == 1:
            return self.parts[0].read(indices)
        starts = np.cumsum([0] + [len(p) for p in self.parts])
        part_of = np.searchsorted(starts, indices, side="right") - 1
        images = labels = None
        for k, part in enumerate(self.parts):
            rows = np.flatnonzero(part_of == k)
            if not len(rows):
                continue
            part_images, part_labels = part.read(indices[rows] - starts[k])
            if images is None:
                images = np.empty((len(indices),) + part_images.shape[1:], part_images.dtype)
                labels = np.empty(len(indices), np.int32)
            images[rows], labels[rows] = part_images, part_labels
        return images, labels
