"""Bit packing: n codes of k bits (k = 1..8) stored in exactly ceil(n k / 8) bytes.

The codes form one most-significant-bit-first stream: element 0 fills the top k bits of byte 0, element 1 the next k
bits, and so on across byte boundaries; the tail of the last byte is zero. For k = 4 this is bitsandbytes' layout
(two codes a byte, the first in the high nibble), for k = 2 four codes a byte, the first in the top two bits.

Both directions work in units of u = gcd(k, 8) bits, so that a code is k/u whole units and a byte 8/u whole units.
Unpacking is one shift-and-mask per unit position of a byte and, for k = 3, 5, 6, 7, an OR of k/u units per code:
vectorised over the data, with Python loops only over the (at most 8) unit positions.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n * bits / 8)``."""
    return -(-n * bits // 8)


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 (ceil(n bits / 8),) holding the low ``bits`` bits of each of the n codes (any shape, row-major)."""
    unit = _unit(bits)
    stream = _split(jnp.ravel(codes).astype(jnp.uint8), bits // unit, unit).reshape(-1)
    stream = jnp.pad(stream, (0, -stream.size % (8 // unit)))
    return _join(stream.reshape(-1, 8 // unit), unit)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """The n codes (uint8, shape (n,)) that :func:`pack_bits` stored in ``packed``."""
    unit = _unit(bits)
    stream = _split(jnp.ravel(packed), 8 // unit, unit).reshape(-1)[: n * (bits // unit)]
    return _join(stream.reshape(n, bits // unit), unit)


def _unit(bits: int) -> int:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise PeftjaxError(f"cannot pack {bits!r}-bit codes; bit packing supports 1..8 bits")
    return math.gcd(bits, 8)


def _split(words: jax.Array, parts: int, unit: int) -> jax.Array:
    """(m,) uint8 -> (m, parts): the ``unit``-bit fields of each word, most significant first."""
    shifts = jnp.asarray(np.arange(parts - 1, -1, -1) * unit, dtype=jnp.uint8)
    return (words[:, None] >> shifts[None, :]) & ((1 << unit) - 1)


def _join(fields: jax.Array, unit: int) -> jax.Array:
    """(m, parts) ``unit``-bit fields, most significant first -> (m,) uint8."""
    word = fields[:, 0]
    for j in range(1, fields.shape[1]):
        word = (word << unit) | fields[:, j]
    return word
