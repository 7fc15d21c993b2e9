"""Datasets as tfds data sources and the batches the trainer reads from them.

``import jaxkd.data`` registers the offline tfds datasets ``mnist1d`` and ``digits``; the
batches of every dataset come from :mod:`jaxkd.data.pipeline`.
"""

from jaxkd.data.pipeline import (
    DatasetInfo,
    default_data_config,
    eval_batches,
    get_info,
    train_batches,
)

__all__ = ["DatasetInfo", "default_data_config", "eval_batches", "get_info", "train_batches"]
