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

The codes are the exact nearest entries. bitsandbytes' CPU kernel scales by an approximate reciprocal, so where
``(c - offset) / absmax2`` lies within about 4e-4 (relative) of a midpoint between two map entries its code may be
the neighbour of ours. Under ``jit``, XLA on CPU may fuse a product with the addition after it into one
multiply-add (the centring ``c - offset`` when c is computed in the same fusion, and ``dynamic8[code] * absmax2 +
offset``), so double-quantized scales can differ in the last bit between jitted and eager runs and from
bitsandbytes' two roundings; when all scales are equal (c - offset ~ 0) that can even change their 8-bit codes,
though not the scales they decode to.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from peftjax.quant.blockwise import absmax_decode, absmax_encode, from_groups, group_shape, to_groups
from peftjax.quant.formats import get_format

DQ_BLOCK_SIZE = 256
DQ_FORMAT = "dynamic8"


@dataclasses.dataclass(frozen=True, eq=False)
class DoubleQuantScales:
    """Block scales stored double-quantized: ``scales ≈ dynamic8[codes] * absmax[block of 256] + offset``.

    Leaves: ``codes`` uint8 (m,), one per scale; ``absmax`` float32 (ceil(m / 256),); ``offset`` float32 ().
    """

    codes: jax.Array
    absmax: jax.Array
    offset: jax.Array


jax.tree_util.register_dataclass(DoubleQuantScales, data_fields=["codes", "absmax", "offset"], meta_fields=[])


def double_quantize(scales: jax.Array) -> DoubleQuantScales:
    """Double-quantize float32 block scales (m,)."""
    # mean as sum * (1/m), the form XLA gives sum / m under jit; the float32 sum overflows only for scales near
    # the float32 maximum, where summing pre-scaled values cannot
    offset = jnp.sum(scales) * (1 / scales.size)
    offset = jnp.where(jnp.isfinite(offset), offset, jnp.sum(scales * (1 / scales.size)))
    centred_ABC = to_groups(scales - offset, group_shape(scales.shape, DQ_BLOCK_SIZE, None))
    codes_ABC, absmax = absmax_encode(centred_ABC, get_format(DQ_FORMAT))
    return DoubleQuantScales(codes=codes_ABC.reshape(-1)[: scales.size], absmax=absmax, offset=offset)


def dequantize_scales(dq: DoubleQuantScales) -> jax.Array:
    """The float32 block scales (m,) that ``dq`` stands for."""
    groups = group_shape(dq.codes.shape, DQ_BLOCK_SIZE, None)
    centred_ABC = absmax_decode(to_groups(dq.codes, groups), dq.absmax, get_format(DQ_FORMAT))
    return from_groups(centred_ABC, dq.codes.shape) + dq.offset
