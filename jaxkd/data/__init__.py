"""Datasets and the batches the trainer reads from them.

- :mod:`jaxkd.data.datasets`: the registry of dataset constants (light; configs use it);
- :mod:`jaxkd.data.pipeline`: tfds data sources through grain, training and eval batches
  (importing it registers the offline tfds builders ``mnist1d`` and ``digits``);
- :mod:`jaxkd.data.sources`, :mod:`jaxkd.data.augment`: reading and augmenting examples.
"""
