"""Double quantization of the block scales (QLoRA, Dettmers et al. 2023, §3; bitsandbytes ``compress_statistics``).

Storing one float32 absmax per block of b values costs 32 / b bits per parameter (0.5 at b = 64). QLoRA quantizes
those constants c_1..c_m a second time:

    offset = mean(c)                                    (float32)
    c - offset  ->  8-bit codes in bitsandbytes' signed dynamic map (``dynamic8``), in blocks of 256 values, each
                    block with its own float32 absmax2 (symmetric absmax scaling, see :mod:`peftjax.quant.blockwise`)
    c ≈ dynamic8[code] * absmax2 + offset

for 8 / b + 32 / (256 b) bits per parameter (plus one float32): 0.127 at b = 64, so NF4 costs 4.127 bits per
parameter instead of 4.5. Subtracting the mean first centres the positive scales so that the signed map is used in
full.

The 8-bit codes are chosen the way bitsandbytes' CPU kernel chooses them, so that double-quantized states are
bit-identical to its ``quantize_4bit(..., compress_statistics=True)``: each value is scaled by the reciprocal of its
block's absmax2, clamped to [-1, 1], mapped to one of 65,536 evenly spaced bins,
``floor(((v + 1) * 0.5) * 65535 + 0.5)`` in float32, and a bin's code is the map entry nearest its centre
``-1 + 2 i / 65535``. That is the nearest entry except within half a bin (1.5e-5) of a midpoint between two map
entries, where it can be an entry at most one bin (3e-5) farther (7 of the 4,750 codes in the bitsandbytes fixture
against plain nearest rounding). Decoding is
``dynamic8[code] * absmax2 + offset``. The offset is ``torch.mean``'s float32 result (see :func:`cascade_mean`).
Under ``jit``, XLA on CPU fuses a product with the addition after it into one multiply-add (single rounding) and
turns a division by a constant into a product with its reciprocal. The encoder is written so that neither changes
a code; the decode is exact eagerly and can round once instead of twice under ``jit``, so a decoded scale may
differ from bitsandbytes' in the last bit (dequantized values within 2 ulp in the fixture).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.quant.blockwise import absmax_decode, from_groups, group_shape, power_of_two_rescale, to_groups
from peftjax.quant.formats import get_format

DQ_BLOCK_SIZE = 256
DQ_FORMAT = "dynamic8"
LUT_BINS = 65536


@dataclasses.dataclass(frozen=True, eq=False)
class DoubleQuantScales:
    """Block scales stored double-quantized: ``scales ≈ dynamic8[codes] * absmax[block of 256] + offset``.

    Leaves: ``codes`` uint8 (m,), one per scale; ``absmax`` float32 (ceil(m / block_size),); ``offset`` float32 ().
    Static: ``block_size``, the scales sharing one absmax (bitsandbytes: 256).
    """

    codes: jax.Array
    absmax: jax.Array
    offset: jax.Array
    block_size: int = DQ_BLOCK_SIZE


jax.tree_util.register_dataclass(DoubleQuantScales, data_fields=["codes", "absmax", "offset"],
                                 meta_fields=["block_size"])


def double_quantize(scales: jax.Array, block_size: int = DQ_BLOCK_SIZE) -> DoubleQuantScales:
    """Double-quantize float32 block scales (m,) in blocks of ``block_size`` scales."""
    offset = cascade_mean(scales)
    # the float32 sum overflows only for scales near the float32 maximum, where summing pre-scaled values cannot
    offset = jnp.where(jnp.isfinite(offset), offset, jnp.sum(scales * (1 / scales.size)))
    centred_ABC = to_groups(scales - offset, group_shape(scales.shape, block_size, None))
    codes_ABC, absmax = binned_encode(centred_ABC)
    return DoubleQuantScales(codes=codes_ABC.reshape(-1)[: scales.size], absmax=absmax, offset=offset,
                             block_size=block_size)


def _sequential_sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum along ``axis`` one element after another, from zero (a fixed float32 rounding order)."""
    def add(total, item):
        return total + item, None

    moved = jnp.moveaxis(x, axis, 0)
    zeros = jnp.zeros(moved.shape[1:], x.dtype)
    return jax.lax.scan(add, zeros, moved)[0] if moved.shape[0] else zeros


def cascade_mean(x: jax.Array) -> jax.Array:
    """float32 mean of 1-D ``x`` summed in the order of PyTorch's CPU sum kernel, then divided by the size.

    bitsandbytes takes the offset with ``torch.mean``; any other order can differ in the last bit, and that moves
    an 8-bit code where a value sits at a bin edge (3 of the fixture's 4,750). The order: 8-wide vectors, four
    vector accumulators over rows of 32 values, each accumulator a cascade that sums runs of 16 rows, runs of 16
    runs and so on; then the leftover vectors, the four accumulators, the leftover values and the 8 lanes.
    """
    lanes, rows_of = 8, 4
    n = x.size
    n_vectors = n // lanes
    n_rows = n_vectors // rows_of
    vectors = x[: n_vectors * lanes].reshape(n_vectors, lanes)
    level = 1 << max(4, (int(np.ceil(np.log2(n_rows))) if n_rows > 1 else 0) // 4)
    # levels 0..2 flush every `level` items into the next; level 3 keeps everything it is given
    pending = vectors[: n_rows * rows_of].reshape(n_rows, rows_of, lanes)
    partials = []
    for _ in range(3):
        full = pending.shape[0] // level * level
        partials.append(_sequential_sum(pending[full:], 0))
        pending = _sequential_sum(pending[:full].reshape(-1, level, rows_of, lanes), 1)
    partials.append(_sequential_sum(pending, 0))
    accumulators = partials[0]
    for partial in partials[1:]:
        accumulators = accumulators + partial
    first = _sequential_sum(jnp.concatenate([accumulators[:1], vectors[n_rows * rows_of:]]), 0)
    vector = _sequential_sum(jnp.concatenate([first[None], accumulators[1:]]), 0)
    total = _sequential_sum(jnp.concatenate([x[n_vectors * lanes:], vector]), 0)
    # a true division: XLA rewrites division by a constant into a product with its rounded reciprocal
    return total / jax.lax.optimization_barrier(jnp.float32(n))


@functools.cache
def _bin_codes() -> np.ndarray:
    """uint8 (LUT_BINS,): the map entry nearest each bin centre ``-1 + 2 i / (LUT_BINS - 1)`` (float32 maths)."""
    table = get_format(DQ_FORMAT).table.astype(np.float32)
    midpoints = np.float32(0.5) * (table[:-1] + table[1:])
    centres = np.float32(-1) + (np.float32(2) * np.arange(LUT_BINS, dtype=np.float32)) / np.float32(LUT_BINS - 1)
    # a bin takes the entry above every midpoint strictly below its centre
    return np.searchsorted(midpoints, centres, side="left").astype(np.uint8)


def binned_encode(x_ABC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint8 codes (A, B, C), float32 absmax (B,)) of float32 ``x_ABC`` under the binned dynamic map."""
    absmax_B = jnp.max(jnp.abs(x_ABC), axis=(0, 2))
    rescale = power_of_two_rescale(absmax_B)  # 1 unless the scales are extreme
    inverse = jnp.where(absmax_B > 0, 1 / (absmax_B * rescale), 0.0)
    unit = jnp.clip((x_ABC * rescale[None, :, None]) * inverse[None, :, None], -1.0, 1.0)
    position = ((unit + 1) * 0.5) * (LUT_BINS - 1)
    # floor(position + 0.5) with position rounded first: written without an addition after the product, which
    # XLA could fuse into a multiply-add that rounds once
    below = jnp.floor(position)
    bins = (below + (position >= below + 0.5)).astype(jnp.int32)
    return jnp.asarray(_bin_codes())[bins], absmax_B


def dequantize_scales(dq: DoubleQuantScales) -> jax.Array:
    """The float32 block scales (m,) that ``dq`` stands for."""
    groups = group_shape(dq.codes.shape, dq.block_size, None)
    centred_ABC = absmax_decode(to_groups(dq.codes, groups), dq.absmax, get_format(DQ_FORMAT))
    return from_groups(centred_ABC, dq.codes.shape) + dq.offset
