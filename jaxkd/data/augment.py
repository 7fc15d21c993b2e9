"""Random data augmentation of a host batch, vectorised over the batch with numpy.

``config.data.augment`` names one of :data:`AUGMENTATIONS`:

- ``'none'``.
- ``'jitter'``: every example is translated by a random whole number of pixels in
  ``[-jitter_pixels, jitter_pixels]`` along each spatial axis, independently, and the
  uncovered pixels are 0 (Hinton et al. 2015, "Distilling the Knowledge in a Neural
  Network", section 3: MNIST jittered by up to 2 pixels). Spatial axes are the signal's for
  1-D examples ``[L]`` (``mnist1d``) and height and width for images ``[H, W, C]``.
- ``'crop_flip'``: images ``[H, W, C]`` only; pad by 4 zero pixels, crop back a random
  ``H x W`` window (the same as translating by up to 4 pixels with zero fill) and flip
  left-right with probability 1/2 (He et al. 2016, "Deep Residual Learning for Image
  Recognition", section 4.2: the CIFAR-10 recipe).

Apply it to the raw images, before normalisation, so that the fill is the background
(0 = black for MNIST and digits, the signal's baseline for MNIST-1D).

Determinism: :func:`random_augment` draws the randomness for a whole *global* batch from
one generator and keeps the rows it is given, so an example's augmentation depends only on
the generator's seed and the example's row in the global batch, not on how the batch is
split over processes.
"""

from __future__ import annotations

import numpy as np

AUGMENTATIONS = ("none", "jitter", "crop_flip")
CROP_PADDING = 4


def translate(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Moves example ``b`` by ``shifts[b, d]`` pixels along spatial axis ``d``; fills 0.

    Args:
      images: ``[B, *spatial]`` or ``[B, *spatial, C]``.
      shifts: int ``[B, len(spatial)]``; ``out[b, i] = images[b, i - shifts[b]]`` where that
        index is inside the image, else 0.

    Returns:
      An array shaped and typed like ``images``.
    """
    out = images
    for d in range(shifts.shape[1]):
        axis = 1 + d
        size = images.shape[axis]
        limit = int(np.abs(shifts[:, d]).max(initial=0))
        if limit == 0:
            continue
        pad = [(0, 0)] * images.ndim
        pad[axis] = (limit, limit)
        padded = np.pad(out, pad)
        # out[b, i] = padded[b, i - shift + limit] along `axis`.
        index = np.arange(size)[None, :] - shifts[:, d:d + 1] + limit
        index = index.reshape((len(images),) + (1,) * d + (size,)
                              + (1,) * (images.ndim - axis - 1))
        out = np.take_along_axis(padded, index, axis=axis)
    return out


def flip_left_right(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Mirrors ``images[b]`` (``[B, H, W, C]``) along the width where ``flips[b]`` is true."""
    return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def random_augment(kind: str, images: np.ndarray, rng: np.random.Generator, *,
                   offset: int, global_batch_size: int, jitter_pixels: int) -> np.ndarray:
    """Augments rows ``[offset, offset + len(images))`` of a global batch.

    Args:
      kind: one of :data:`AUGMENTATIONS`.
      images: this process's rows, ``[b, *example_shape]``, raw (not normalised).
      rng: the global batch's generator; draws are made for all ``global_batch_size`` rows.
      offset: the first row of ``images`` in the global batch.
      global_batch_size: rows of the global batch.
      jitter_pixels: the largest translation of ``'jitter'``.

    Returns:
      The augmented rows, shaped and typed like ``images``.
    """
    rows = slice(offset, offset + len(images))
    if kind == "none":
        return images
    if kind == "jitter":
        num_spatial = 1 if images.ndim == 2 else images.ndim - 2
        shifts = rng.integers(-jitter_pixels, jitter_pixels + 1,
                              size=(global_batch_size, num_spatial))
        return translate(images, shifts[rows])
    if kind == "crop_flip":
        if images.ndim != 4:
            raise ValueError(f"augment 'crop_flip' needs images [H, W, C], got examples of "
                             f"shape {images.shape[1:]}")
        shifts = rng.integers(-CROP_PADDING, CROP_PADDING + 1, size=(global_batch_size, 2))
        flips = rng.random(global_batch_size) < 0.5
        return flip_left_right(translate(images, shifts[rows]), flips[rows])
    raise ValueError(f"unknown augmentation {kind!r}; allowed: {', '.join(AUGMENTATIONS)}")
