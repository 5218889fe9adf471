"""Bit packing: exact sizes, the MSB-first layout, and unpack(pack(codes)) == codes for every width."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peftjax.errors import PeftjaxError
from peftjax.quant import pack_bits, unpack_bits
from peftjax.quant.pack import packed_size

pack_jit = jax.jit(pack_bits, static_argnums=1)
unpack_jit = jax.jit(unpack_bits, static_argnums=(1, 2))


def reference_pack(codes, bits):
    """Closed form: concatenate the big-endian ``bits``-bit patterns, zero-fill, read whole bytes."""
    stream = "".join(format(int(c), f"0{bits}b") for c in codes)
    stream += "0" * (-len(stream) % 8)
    return np.array([int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)], dtype=np.uint8)


@pytest.mark.parametrize(("bits", "codes", "expected"), [
    (4, [1, 2, 3], [0x12, 0x30]),                            # bitsandbytes: first element in the high nibble
    (2, [3, 0, 1, 2, 1], [0b11000110, 0b01000000]),          # four a byte, first in the top two bits
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0x29, 0xCB, 0xB8]),       # 001 010 011 100 101 110 111 000
    (8, [0, 255, 7], [0, 255, 7]),
])
def test_layout(bits, codes, expected):
    np.testing.assert_array_equal(pack_bits(np.array(codes, np.uint8), bits), expected)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_unpack_inverts_pack(bits, data):
    n = data.draw(st.integers(1, 70), label="n")
    codes = np.array(data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), dtype=np.uint8)
    packed = pack_jit(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (packed_size(n, bits),) == (-(-n * bits // 8),)
    np.testing.assert_array_equal(packed, reference_pack(codes, bits))
    np.testing.assert_array_equal(unpack_jit(packed, bits, n), codes)


def test_every_width_round_trips_all_codes():
    for bits in range(2, 9):
        codes = np.arange(2**bits, dtype=np.uint8)[::-1]
        np.testing.assert_array_equal(unpack_jit(pack_jit(codes, bits), bits, codes.size), codes)


@pytest.mark.parametrize("bits", [0, 9, 4.0])
def test_bad_width(bits):
    with pytest.raises(PeftjaxError, match="1..8 bits"):
        pack_bits(np.zeros(4, np.uint8), bits)
