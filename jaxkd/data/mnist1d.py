"""MNIST-1D as an offline tfds dataset, registered as ``mnist1d``.

Greydanus, "Scaling *down* deep learning", arXiv:2011.14439 (2020);
https://github.com/greydanus/mnist1d.

Every example is generated on this machine by the ``mnist1d`` package's ``make_dataset``;
nothing is downloaded. Splits of the default config (``mnist1d`` = ``mnist1d/default``):

- ``train`` 4000 and ``test`` 1000: the paper's setting, regenerated with the package's
  defaults (``num_samples=5000``, ``train_split=0.8``, ``seed=42``). Rows are stored in
  the generator's order, so ``train`` is ``make_dataset(get_dataset_args())['x']`` row for
  row (cast to float32), ``test`` is its ``x_test``.
- ``unlabelled`` 20,000: more inputs from the same generator with another seed (1), the
  transfer set for distillation (Hinton et al. 2015). The generator's labels are stored
  (handy for analysis) but the training pipeline gives these examples ``label = -1``.

``mnist1d/large`` generates ten times the labelled data (40,000 / 10,000) and 50,000
unlabelled inputs, with the same seeds.

Features: ``image`` float32 ``(40,)``, the package's signal as is: ``make_dataset``
standardises every generated set over all its values (mean 0, std 1), so the labelled set
and the unlabelled set are each standardised by their own statistics. ``label``:
``ClassLabel(10)``.

Building takes about 8 s for the default config (about 30 s for ``large``) on 2 CPU cores
and leaves the caller's global ``random`` / ``np.random`` states as they were (the
generator seeds them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.schema import ConfigError

SIGNAL_LENGTH = 40


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
    """How many examples to generate, and with which seeds.

    Attributes:
      num_samples: labelled examples, split into ``train`` and ``test``.
      train_fraction: the first ``int(num_samples * train_fraction)`` go to ``train``.
      seed: seed of the labelled set (42 is the package's and the paper's).
      num_unlabelled: size of the ``unlabelled`` split.
      unlabelled_seed: seed of the ``unlabelled`` split; must differ from ``seed``.
    """

    num_samples: int = 5000
    train_fraction: float = 0.8
    seed: int = 42
    num_unlabelled: int = 20_000
    unlabelled_seed: int = 1


@contextlib.contextmanager
def _global_rng_restored() -> Iterator[None]:
    """``make_dataset`` seeds the global RNGs; give the caller its own states back."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_samples`` MNIST-1D signals and labels from the package's generator.

    Returns ``x`` float32 ``[num_samples, 40]`` (standardised over the whole set, as
    ``make_dataset`` does) and ``y`` int64 ``[num_samples]``, in the generator's order.
    """
    from mnist1d.data import get_dataset_args, make_dataset  # slow import (matplotlib)

    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, 1.0
    with _global_rng_restored():
        data = make_dataset(args)
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D (Greydanus 2020), generated offline; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "train/test as in the paper, plus an unlabelled split."}
    BUILDER_CONFIGS = [
        Mnist1dConfig(name="default", description="The paper's 4000/1000 split, "
                      "plus 20,000 unlabelled inputs."),
        Mnist1dConfig(name="large", num_samples=50_000, num_unlabelled=50_000,
                      description="40,000/10,000 labelled, plus 50,000 unlabelled inputs."),
    ]
    DEFAULT_CONFIG_NAME = "default"
    # Nothing to download. Saying so also spares tfds 4.9.10 looking for a checksums file
    # next to this module: that look-up imports `importlib_resources`, which tfds declares
    # as a dependency only for Python < 3.9.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(SIGNAL_LENGTH,), dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the generator's order (see the docstring)
            homepage="https://github.com/greydanus/mnist1d",
            citation="@article{greydanus2020scaling, title={Scaling down deep learning}, "
                     "author={Greydanus, Sam}, journal={arXiv:2011.14439}, year={2020}}",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        if config.unlabelled_seed == config.seed:
            raise ConfigError(f"mnist1d/{config.name}: unlabelled_seed must differ from seed")
        x, y = generate(config.num_samples, config.seed)
        n_train = int(config.num_samples * config.train_fraction)
        x_unl, y_unl = generate(config.num_unlabelled, config.unlabelled_seed)
        return {
            "train": self._generate_examples(x[:n_train], y[:n_train]),
            "test": self._generate_examples(x[n_train:], y[n_train:]),
            "unlabelled": self._generate_examples(x_unl, y_unl),
        }

    def _generate_examples(self, x: np.ndarray, y: np.ndarray):
        for i in range(len(x)):
            yield i, {"image": x[i], "label": int(y[i])}
