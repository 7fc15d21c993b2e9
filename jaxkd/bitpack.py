"""Integers of ``bits`` bits packed into bytes: one little-endian bit stream.

Element ``i`` of the flattened array occupies bits ``[i * bits, (i + 1) * bits)`` of the
stream, its least significant bit first, and bit ``t`` of the stream is bit ``t % 8`` of
byte ``t // 8``; the tail of the last byte is zero. So with 4 bits element 0 is the low
nibble of byte 0, with 2 bits element 3 is the top two bits of byte 0, and with 8 bits
element ``i`` is byte ``i``. Signed values are stored as their ``bits``-bit two's
complement (``signed=True``). The artifact's integer kernels (int8/int4/int2) and its
codebook indices (any width from 1 to 32 bits) are both written this way.

Widths that divide 8 are packed a byte at a time (fast for large tensors); other widths
go through the bit planes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CHUNK = 1 << 20  # values per bit plane (a multiple of 8: whole bytes for every width)


def value_range(bits: int, *, signed: bool) -> tuple[int, int]:
    """``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]`` unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def _check(bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int | np.integer) or not 1 <= bits <= 32:
        raise ValueError(f"bits={bits!r} must be an integer in [1, 32]")
    return int(bits)


def index_bits(num_values: int) -> int:
    """Bits per index into ``num_values`` entries (a codebook): ``max(1, ceil(log2(n)))``."""
    return max(1, (int(num_values) - 1).bit_length())


def nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` packed values: ``ceil(count * bits / 8)``."""
    return math.ceil(count * _check(bits) / 8)


def pack(values: Any, bits: int, *, signed: bool = False) -> np.ndarray:
    """``values`` (integers inside :func:`value_range`) as ``nbytes(n, bits)`` uint8."""
    bits = _check(bits)
    flat = np.asarray(values).reshape(-1)
    if not np.issubdtype(flat.dtype, np.integer):
        raise ValueError(f"pack needs integers, got {flat.dtype}")
    lo, hi = value_range(bits, signed=signed)
    if flat.size and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(f"values in [{flat.min()}, {flat.max()}] do not fit in {bits} "
                         f"{'signed' if signed else 'unsigned'} bits [{lo}, {hi}]")
    field = flat.astype(np.int64) & ((1 << bits) - 1)
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = np.zeros(-(-flat.size // per_byte) * per_byte, np.uint8)
        padded[:flat.size] = field
        groups = padded.reshape(-1, per_byte)
        out = np.zeros(groups.shape[0], np.uint8)
        for j in range(per_byte):
            out |= groups[:, j] << np.uint8(bits * j)
        return out
    # Other widths go through a [values, bits] bit plane, CHUNK values (whole bytes) at a
    # time so that a large table never holds the plane of all its values at once.
    return np.concatenate([
        np.packbits(((field[i:i + CHUNK, None] >> np.arange(bits)) & 1).astype(np.uint8)
                    .reshape(-1), bitorder="little")
        for i in range(0, flat.size, CHUNK)] or [np.zeros(0, np.uint8)])


def unpack(packed: Any, bits: int, count: int | Sequence[int], *, signed: bool = False
           ) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` values (or an array of shape
    ``count``), int8 when ``signed`` and ``bits <= 8``, else int32."""
    bits = _check(bits)
    shape = (count,) if isinstance(count, int | np.integer) else tuple(count)
    n = math.prod(shape)
    packed = np.asarray(packed, np.uint8).reshape(-1)
    if packed.size < nbytes(n, bits):
        raise ValueError(f"{packed.size} bytes do not hold {n} values of {bits} bits "
                         f"({nbytes(n, bits)} bytes)")
    if 8 % bits == 0:
        per_byte = 8 // bits
        fields = np.stack([(packed >> np.uint8(bits * j)) & ((1 << bits) - 1)
                           for j in range(per_byte)], -1).reshape(-1)[:n].astype(np.int64)
    else:
        fields = np.zeros(n, np.int64)
        for i in range(0, n, CHUNK):  # CHUNK values are CHUNK * bits / 8 whole bytes
            m = min(CHUNK, n - i)
            planes = np.unpackbits(packed[i * bits // 8:], count=m * bits,
                                   bitorder="little").reshape(m, bits)
            fields[i:i + m] = (planes.astype(np.int64) << np.arange(bits)).sum(1)
    if signed:
        sign = 1 << (bits - 1)
        fields = (fields ^ sign) - sign
    dtype = np.int8 if signed and bits <= 8 else np.int32
    return fields.astype(dtype).reshape(shape)
