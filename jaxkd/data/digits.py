"""scikit-learn's 8x8 handwritten digits as an offline tfds dataset, registered as ``digits``.

The UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak 1998) as
bundled with scikit-learn (``sklearn.datasets.load_digits``): 1797 images of 8x8 pixels,
each pixel a count of 0..16 on-pixels in a 4x4 block of the original 32x32 bitmap.
Nothing is downloaded.

Split (fixed): ``order = np.random.default_rng(0).permutation(1797)``; ``train`` is
``order[:1437]`` and ``test`` is ``order[1437:]`` (360 images, 20 %), stored in that order.

Features: ``image`` uint8 ``(8, 8, 1)`` with values 0..16, ``label`` ``ClassLabel(10)``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_EXAMPLES = 1797
NUM_TEST = 360
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of each split, in their stored order."""
    order = np.random.default_rng(SPLIT_SEED).permutation(NUM_EXAMPLES)
    return {"train": order[:NUM_EXAMPLES - NUM_TEST], "test": order[NUM_EXAMPLES - NUM_TEST:]}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's ``load_digits`` (8x8, 0..16), 1437 train / 360 test; see the module."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Nothing to download. Saying so also spares tfds 4.9.10 looking for a checksums file
    # next to this module: that look-up imports `importlib_resources`, which tfds declares
    # as a dependency only for Python < 3.9.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the documented order
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
            citation="@misc{alpaydin1998digits, title={Optical Recognition of Handwritten "
                     "Digits}, author={Alpaydin, E. and Kaynak, C.}, year={1998}, "
                     "howpublished={UCI Machine Learning Repository}}",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # bundled with scikit-learn
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = digits.images.astype(np.uint8)[..., None]
        return {split: self._generate_examples(images[idx], digits.target[idx])
                for split, idx in split_indices().items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        for i in range(len(images)):
            yield i, {"image": images[i], "label": int(labels[i])}
