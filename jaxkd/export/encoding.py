"""How the artifact stores one tensor: six encodings, the smallest chosen by exact bytes.

Every tensor is written in whichever of six encodings takes the fewest bytes
(``encoded_nbytes``; ties go to the simpler: dense before bitmask before csr, raw before
codebook), so pruned kernels (exact zeros) and clustered ones (Han, Mao & Dally, "Deep
Compression", ICLR 2016: at most ``k + 1`` distinct values) are stored compactly. An
encoding is ``POSITIONS+VALUES``:

- positions: ``dense`` (every element), ``bitmask`` (one bit per element, set where the
  element is nonzero, packed little-endian by :func:`jaxkd.bitpack.pack` at 1 bit; only the
  nonzeros are stored) or ``csr`` (the tensor as a ``[prod(shape[:-1]), shape[-1]]``
  matrix: row pointers and column indices, each uint8/16/32, the smallest that holds its
  largest value; only the nonzeros are stored, row-major). A float is "zero" when all its
  bits are (so ``-0.0`` is stored and every tensor round-trips bit for bit).
- values of the stored elements: ``raw`` (integers packed at the kernel's bits by
  :mod:`jaxkd.bitpack`, two's complement; floats as float32) or ``codebook`` (the sorted
  distinct stored values, raw, and each element's index in them packed at
  ``bitpack.index_bits(u)`` bits).

``encode`` returns a tensor's parts (``mask``, ``ptr``, ``col``, ``val``, ``cb``,
``idx``) and its metadata ``{"enc", "shape", ["bits"], ["u"]}``; ``decode`` inverts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxkd import bitpack
from jaxkd.config import WEIGHT_BITS
from jaxkd.schema import ConfigError, FieldError

POSITIONS = ("dense", "bitmask", "csr")
VALUE_CODINGS = ("raw", "codebook")
# Every encoding, simplest first: ties between equal byte counts go to the earlier one.
ENCODINGS = tuple(f"{p}+{v}" for p in POSITIONS for v in VALUE_CODINGS)
PARTS = ("mask", "ptr", "col", "val", "cb", "idx")
INDEX_DTYPES = ("uint8", "uint16", "uint32")


class ArtifactError(ConfigError):
    """An exported directory whose files do not match its manifest."""


def check_bits(bits: Any) -> int:
    """``bits`` if it is a width integer kernels are stored at (8, 4 or 2)."""
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise FieldError("bits", f"={bits!r} is not supported; allowed: "
                                 f"{', '.join(map(str, WEIGHT_BITS))}")
    return int(bits)


def index_dtype(max_value: int) -> np.dtype:
    """The smallest of uint8, uint16, uint32 that holds ``max_value`` (CSR indices)."""
    for name in INDEX_DTYPES:
        if max_value <= np.iinfo(name).max:
            return np.dtype(name)
    raise ValueError(f"{max_value} does not fit in uint32: the tensor is too large for CSR")


def _flat(values: Any, bits: int | None) -> np.ndarray:
    if bits is None:
        return np.asarray(values, np.float32).reshape(-1)
    check_bits(bits)
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"a tensor of {bits}-bit integers must have an integer dtype, "
                         f"got {flat.dtype}")
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < lo or flat.max() > hi):
        raise ValueError(f"values outside [{lo}, {hi}] do not fit in {bits} bits")
    return flat.astype(np.int8)


def _nonzero(flat: np.ndarray, bits: int | None) -> np.ndarray:
    """Where the elements are nonzero; a float is zero only when all its bits are."""
    return (flat.view(np.uint32) if bits is None else flat) != 0


def _grid(shape: Sequence[int]) -> tuple[int, int]:
    """``(rows, columns)`` of the CSR view ``[prod(shape[:-1]), shape[-1]]`` (a scalar is
    ``[1, 1]``)."""
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) else (1, 1)


def _distinct(stored: np.ndarray, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The sorted distinct values of ``stored`` and each element's index in them; floats
    are told apart by their bits (``-0.0 != 0.0``, every NaN kept as it is)."""
    if bits is not None:
        codebook, inverse = np.unique(stored, return_inverse=True)
        return codebook.astype(np.int8), inverse.reshape(-1)
    keys, inverse = np.unique(stored.view(np.uint32), return_inverse=True)
    order = np.lexsort((keys, keys.view(np.float32)))  # by value, then by bits
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return keys[order].view(np.float32), rank[inverse.reshape(-1)]


def _count_distinct(stored: np.ndarray, bits: int | None) -> int:
    if bits is not None:
        return int(np.count_nonzero(np.bincount(stored.astype(np.int16) + 128, minlength=256)))
    # Sort and count the steps: numpy 2.4's np.unique without an inverse takes ~200x as
    # long on a float embedding table (11 s against 0.06 s for 11.7 M values).
    keys = np.sort(stored.view(np.uint32))
    return int(keys.size > 0) + int(np.count_nonzero(keys[1:] != keys[:-1]))


def raw_nbytes(count: int, bits: int | None) -> int:
    """Bytes of ``count`` raw values: ``ceil(count * bits / 8)``, or ``4 count`` (float32)."""
    return 4 * count if bits is None else math.ceil(count * bits / 8)


def encoded_nbytes(values: Any, *, bits: int | None = None) -> dict[str, int]:
    """Bytes of ``values`` in every encoding: ``{"dense+raw": ..., "csr+codebook": ...}``.

    ``bits``: the width of an integer tensor (8, 4 or 2); None for float32. With ``n``
    elements, ``m`` nonzeros, ``b`` bits per raw value (32 for floats), ``u`` distinct
    stored values (of all ``n`` elements for dense, of the ``m`` nonzeros otherwise) and the
    CSR view ``[R, C]``::

        dense     = 0                                      (n elements stored)
        bitmask   = ceil(n / 8)                            (m elements stored)
        csr       = (R + 1) size(ptr) + m size(col)        (m elements stored)
        raw       = ceil(stored b / 8)
        codebook  = ceil(u b / 8) + ceil(stored bitpack.index_bits(u) / 8)

    where ``size(ptr)`` is the bytes of the smallest unsigned dtype holding ``m`` and
    ``size(col)`` that of the largest column index; an encoding's bytes are its positions'
    plus its values'.
    """
    shape = np.shape(values)
    flat = _flat(values, bits)
    nonzero = _nonzero(flat, bits)
    n, m = flat.size, int(nonzero.sum())
    rows, cols = _grid(shape)
    max_col = int((np.flatnonzero(nonzero) % max(cols, 1)).max()) if m else 0
    csr = (rows + 1) * index_dtype(m).itemsize + m * index_dtype(max_col).itemsize
    distinct = _count_distinct(flat, bits)
    distinct_nonzero = distinct - int(m < n)  # zero is one of the distinct values iff m < n
    stored = {"dense": (n, distinct, 0),
              "bitmask": (m, None, math.ceil(n / 8)), "csr": (m, None, csr)}
    sizes = {}
    for position, (count, u, overhead) in stored.items():
        u = distinct_nonzero if u is None else u
        sizes[f"{position}+raw"] = overhead + raw_nbytes(count, bits)
        sizes[f"{position}+codebook"] = (overhead + raw_nbytes(u, bits)
                                         + math.ceil(count * bitpack.index_bits(u) / 8))
    return sizes


def choose_encoding(values: Any, *, bits: int | None = None,
                    allowed: Sequence[str] = ENCODINGS) -> str:
    """The encoding of ``allowed`` with the fewest bytes (``encoded_nbytes``); ties go to
    the one earliest in ``ENCODINGS`` (the simpler)."""
    allowed = check_encodings(allowed)
    sizes = encoded_nbytes(values, bits=bits)
    return min((e for e in ENCODINGS if e in allowed), key=sizes.__getitem__)


def check_encodings(encodings: Sequence[str] | None) -> tuple[str, ...]:
    """``encodings`` (None: all of them) as a tuple, or a ValueError naming the allowed."""
    if encodings is None:
        return ENCODINGS
    encodings = (encodings,) if isinstance(encodings, str) else tuple(encodings)
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown or not encodings:
        raise ValueError(f"encodings={list(encodings)!r}: each must be one of "
                         f"{', '.join(ENCODINGS)} (and at least one given)")
    return encodings


def _raw(stored: np.ndarray, bits: int | None) -> np.ndarray:
    return stored.astype(np.float32) if bits is None else bitpack.pack(stored, bits, signed=True)


def _unraw(data: np.ndarray, count: int, bits: int | None, part: str) -> np.ndarray:
    expected = raw_nbytes(count, bits)
    if data.nbytes != expected:
        raise ArtifactError(f"part {part!r} has {data.nbytes} bytes, expected {expected} "
                            f"for {count} values")
    return np.asarray(data, np.float32) if bits is None else bitpack.unpack(
        data, bits, count, signed=True)


def encode(values: Any, *, bits: int | None = None, encoding: str | None = None
           ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(parts, meta)``: ``values`` in ``encoding`` (None: ``choose_encoding``).

    ``parts`` maps part names (``PARTS``) to 1-D arrays (``mask``, ``idx``: uint8 bit
    streams; ``ptr``, ``col``: uint8/16/32; ``val``, ``cb``: float32, or uint8 holding
    ``pack(..., bits)``); their total bytes are ``encoded_nbytes(values)[encoding]``.
    ``meta``: ``{"enc", "shape", ["bits"], ["u"]}``, all ``decode`` needs besides the parts.
    """
    encoding = choose_encoding(values, bits=bits) if encoding is None else encoding
    check_encodings([encoding])
    position, coding = encoding.split("+")
    shape = list(np.shape(values))
    flat = _flat(values, bits)
    parts: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"enc": encoding, "shape": shape}
    if bits is not None:
        meta["bits"] = int(bits)
    nonzero = _nonzero(flat, bits)
    stored = flat if position == "dense" else flat[nonzero]
    if position == "bitmask":  # == bitpack.pack(nonzero, 1)
        parts["mask"] = np.packbits(nonzero, bitorder="little")
    elif position == "csr":
        rows, cols = _grid(shape)
        row, col = np.divmod(np.flatnonzero(nonzero), max(cols, 1))
        ptr = np.zeros(rows + 1, np.int64)
        ptr[1:] = np.cumsum(np.bincount(row, minlength=rows))
        parts["ptr"] = ptr.astype(index_dtype(stored.size))
        parts["col"] = col.astype(index_dtype(int(col.max()) if col.size else 0))
    if coding == "raw":
        parts["val"] = _raw(stored, bits)
    else:
        codebook, indices = _distinct(stored, bits)
        meta["u"] = int(codebook.size)
        parts["cb"] = _raw(codebook, bits)
        parts["idx"] = bitpack.pack(indices, bitpack.index_bits(codebook.size))
    return parts, meta


def decode(parts: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> np.ndarray:
    """Inverse of ``encode``: the dense tensor, int8 (``meta`` has ``bits``) or float32."""
    position, coding = str(meta["enc"]).split("+")
    shape = tuple(meta["shape"])
    bits = meta.get("bits")
    n = math.prod(shape)
    if position == "dense":
        count = n
    elif position == "bitmask":
        if parts["mask"].size != math.ceil(n / 8):
            raise ArtifactError(f"part 'mask' has {parts['mask'].size} bytes, expected "
                                f"{math.ceil(n / 8)} for {n} elements")
        nonzero = np.unpackbits(parts["mask"], count=n, bitorder="little").astype(bool)
        count = int(nonzero.sum())
    else:
        rows, cols = _grid(shape)
        ptr = np.asarray(parts["ptr"], np.int64)
        col = np.asarray(parts["col"], np.int64)
        count = col.size
        if (ptr.size != rows + 1 or ptr[0] != 0 or ptr[-1] != count or np.any(np.diff(ptr) < 0)
                or (count and col.max() >= cols)):
            raise ArtifactError(f"parts 'ptr'/'col' are not a CSR index of a {rows}x{cols} "
                                f"matrix")
    if coding == "raw":
        stored = _unraw(parts["val"], count, bits, "val")
    else:
        u = int(meta["u"])
        codebook = _unraw(parts["cb"], u, bits, "cb")
        if parts["idx"].size != bitpack.nbytes(count, bitpack.index_bits(u)):
            raise ArtifactError(f"part 'idx' has {parts['idx'].size} bytes, expected "
                                f"{bitpack.nbytes(count, bitpack.index_bits(u))}")
        indices = bitpack.unpack(parts["idx"], bitpack.index_bits(u), count)
        if count and indices.max() >= u:
            raise ArtifactError(f"part 'idx' points past the {u} codebook entries")
        stored = codebook[indices]
    if position == "dense":
        return stored.reshape(shape)
    out = np.zeros(n, stored.dtype)
    if position == "bitmask":
        out[nonzero] = stored
    else:
        out[np.repeat(np.arange(rows), np.diff(ptr)) * cols + col] = stored
    return out.reshape(shape)
