"""jaxkd.bitpack against the layout written out bit by bit: a little-endian bit stream."""

import numpy as np
import pytest

from jaxkd import bitpack


def reference_pack(values, bits):
    """The stream by hand: bit b of value i is bit i * bits + b; bit t is bit t % 8 of
    byte t // 8."""
    out = bytearray(-(-len(values) * bits // 8))
    for i, v in enumerate(values):
        v &= (1 << bits) - 1
        for b in range(bits):
            if v >> b & 1:
                t = i * bits + b
                out[t // 8] |= 1 << (t % 8)
    return np.frombuffer(bytes(out), np.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 12, 16])
@pytest.mark.parametrize("count", [1, 7, 64])
@pytest.mark.parametrize("signed", [False, True])
def test_pack_round_trips_and_matches_the_bit_stream(bits, count, signed):
    lo, hi = bitpack.value_range(bits, signed=signed)
    values = np.random.default_rng(bits * count).integers(lo, hi + 1, count)
    packed = bitpack.pack(values, bits, signed=signed)
    assert packed.dtype == np.uint8 and packed.size == bitpack.nbytes(count, bits)
    np.testing.assert_array_equal(packed, reference_pack(values.tolist(), bits))
    back = bitpack.unpack(packed, bits, count, signed=signed)
    np.testing.assert_array_equal(back, values)
    assert back.dtype == (np.int8 if signed and bits <= 8 else np.int32)


def test_layout_is_twos_complement_low_bits_first():
    np.testing.assert_array_equal(bitpack.pack(np.array([1, -1], np.int8), 4, signed=True),
                                  [0xF1])
    np.testing.assert_array_equal(
        bitpack.pack(np.array([1, -1, -2, 0, 1], np.int8), 2, signed=True),
        [0b00_10_11_01, 0b01])
    np.testing.assert_array_equal(bitpack.pack(np.array([1, 2, 15, 0]), 4), [0x21, 0x0F])
    np.testing.assert_array_equal(bitpack.pack(np.array([1, 2]), 3), [0b010001])
    np.testing.assert_array_equal(bitpack.unpack(bitpack.pack(np.arange(12), 4), 4, (3, 4)),
                                  np.arange(12).reshape(3, 4))


def test_out_of_range_values_and_short_buffers_are_refused():
    with pytest.raises(ValueError, match="do not fit in 4 signed bits"):
        bitpack.pack(np.array([8], np.int8), 4, signed=True)
    with pytest.raises(ValueError, match="do not fit in 4 unsigned bits"):
        bitpack.pack(np.array([16]), 4)
    with pytest.raises(ValueError, match="needs integers"):
        bitpack.pack(np.array([1.0]), 4)
    with pytest.raises(ValueError, match="bits=0 must be an integer in"):
        bitpack.pack(np.array([0]), 0)
    with pytest.raises(ValueError, match="bytes do not hold"):
        bitpack.unpack(np.zeros(1, np.uint8), 4, 3)
    assert [bitpack.index_bits(u) for u in (1, 2, 3, 16, 17)] == [1, 1, 2, 4, 5]


@pytest.mark.parametrize("bits", [3, 5, 19])
def test_widths_that_straddle_bytes_pack_in_chunks_as_one_bit_stream(bits, monkeypatch):
    """Values of widths that do not divide 8 are packed CHUNK at a time (so a 168 M-entry
    table never holds a [values, bits] int64 plane); the stream is the whole array's, bit
    ``b`` of value ``i`` at stream bit ``i * bits + b``, and unpacks in chunks too."""
    values = np.random.default_rng(bits).integers(0, 1 << bits, 1001)
    monkeypatch.setattr(bitpack, "CHUNK", 16)
    packed = bitpack.pack(values, bits)
    stream = np.unpackbits(packed, bitorder="little")
    want = ((values[:, None] >> np.arange(bits)) & 1).reshape(-1)
    np.testing.assert_array_equal(stream[:want.size], want)
    assert packed.size == bitpack.nbytes(values.size, bits)
    np.testing.assert_array_equal(bitpack.unpack(packed, bits, values.size), values)
