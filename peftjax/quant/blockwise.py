"""Scale groups and the scaling maths shared by every format (and by double quantization of the scales).

A tensor of n elements is viewed as a 3-D array ``x_ABC`` whose middle axis indexes the groups that share a scale:

    per-tensor   block_size=None, axis=None   (1, 1, n)
    blockwise    block_size=b                 (1, ceil(n / b), b)   blocks over the flattened row-major array, the
                                                                    last one zero-padded (bitsandbytes' layout)
    per-channel  axis=a                       (prod(shape[:a]), shape[a], prod(shape[a+1:]))   one scale per index
                                                                    of axis a, computed over all the other axes

The view keeps row-major element order, so codes are always stored in the tensor's own element order.

Symmetric absmax scaling (LLM.int8(), Dettmers et al. 2022; QLoRA, Dettmers et al. 2023), for any format:

    absmax_B = max |x_ABC| over A, C      code = encode(x * (qmax / absmax_B))      x ≈ decode(code) * absmax_B / qmax

``x * (qmax / absmax)`` is the exact product bitsandbytes (qmax = 1) and LLM.int8() (qmax = 127) compute. A group of
zeros has absmax 0 and quantizes to the format's zero. Groups with an absmax beyond 2^±64 are first multiplied by a
power of two (exact), so that the reciprocal stays a normal float even at the float32 extremes.

Asymmetric (zero-point, min/max) scaling for k-bit integers: the range is widened to contain 0 so that 0 stays exact,

    lo_B = min(min x, 0)    hi_B = max(max x, 0)    step_B = (hi - lo) / (2^k - 1)    z_B = round(-lo / step)
    code = clip(round(x / step) + z, 0, 2^k - 1)                                       x ≈ (code - z) * step

with error at most step / 2 (hi - lo is formed as hi/2 - lo/2 so that ±3e38 inputs cannot overflow).

Bit-reproducibility under ``jit``: XLA on CPU rewrites a division by a constant as a multiplication by its reciprocal
and fuses a multiplication feeding an addition into one FMA. The functions here divide by constants only in that form
and add only exact products (halvings), so their eager and jitted results are bit-identical.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from peftjax.quant.formats import Format


def group_shape(shape: tuple[int, ...], block_size: int | None, axis: int | None) -> tuple[int, int, int]:
    """The (A, B, C) view of a tensor of ``shape``: B groups, each A x C elements (see the module docstring)."""
    n = math.prod(shape)
    if axis is not None:
        return math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    if block_size is None:
        return 1, 1, n
    return 1, -(-n // block_size), block_size


def to_groups(x: jax.Array, groups: tuple[int, int, int]) -> jax.Array:
    """Row-major elements of ``x`` as the (A, B, C) view, zero-padded at the end to fill the last block."""
    flat = jnp.ravel(x)
    padding = math.prod(groups) - flat.size
    return (jnp.pad(flat, (0, padding)) if padding else flat).reshape(groups)


def from_groups(x_ABC: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`to_groups`: drop the padding, restore ``shape``."""
    return x_ABC.reshape(-1)[: math.prod(shape)].reshape(shape)


def absmax_encode(x_ABC: jax.Array, fmt: Format) -> tuple[jax.Array, jax.Array]:
    """(uint8 codes (A, B, C), float32 absmax (B,)) of float32 ``x_ABC``."""
    absmax_B = jnp.max(jnp.abs(x_ABC), axis=(0, 2))
    rescale = power_of_two_rescale(absmax_B)[None, :, None]
    absmax = absmax_B[None, :, None]
    s = (x_ABC * rescale) * (fmt.qmax / (absmax * rescale))
    return fmt.encode(jnp.where(absmax > 0, jnp.clip(s, -fmt.qmax, fmt.qmax), 0.0)), absmax_B


def absmax_decode(codes_ABC: jax.Array, absmax_B: jax.Array, fmt: Format) -> jax.Array:
    """float32 values of ``codes_ABC`` scaled back by their group's absmax."""
    # for a tiny absmax, absmax / qmax would be subnormal (flushed to zero on CPU): scale up, decode, scale back
    rescale_B = power_of_two_rescale(absmax_B)
    step_B = (absmax_B * rescale_B) * (1 / fmt.qmax)
    return (fmt.decode(codes_ABC) * step_B[None, :, None]) * (1 / rescale_B)[None, :, None]


def affine_encode(x_ABC: jax.Array, bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(uint8 codes (A, B, C), float32 step (B,), uint8 zero point (B,)) of float32 ``x_ABC``."""
    levels = 2**bits - 1
    lo_B = jnp.minimum(jnp.min(x_ABC, axis=(0, 2)), 0.0)
    hi_B = jnp.maximum(jnp.max(x_ABC, axis=(0, 2)), 0.0)
    step_B = (hi_B * 0.5 - lo_B * 0.5) * (2 / levels)
    rescale_B = power_of_two_rescale(step_B)
    inverse_B = jnp.where(step_B > 0, 1 / (step_B * rescale_B), 0.0)
    zero_B = jnp.clip(jnp.round(-lo_B * rescale_B * inverse_B), 0, levels)
    scaled = jnp.round((x_ABC * rescale_B[None, :, None]) * inverse_B[None, :, None])
    codes = jnp.clip(scaled + zero_B[None, :, None], 0, levels)
    return codes.astype(jnp.uint8), step_B, zero_B.astype(jnp.uint8)


def affine_decode(codes_ABC: jax.Array, step_B: jax.Array, zero_B: jax.Array) -> jax.Array:
    """float32 values ``(code - zero) * step`` of ``codes_ABC``."""
    centred = codes_ABC.astype(jnp.float32) - zero_B.astype(jnp.float32)[None, :, None]
    # the rounded zero point can put the top grid point up to step / 2 past the largest input: past the float32
    # maximum for inputs near ±3.4e38, where it saturates instead of becoming inf
    largest = float(jnp.finfo(jnp.float32).max)
    return jnp.clip(centred * step_B[None, :, None], -largest, largest)


def power_of_two_rescale(scale_B: jax.Array) -> jax.Array:
    """A power of two per group that brings ``scale_B`` into [2^-64, 2^64] (1 for ordinary scales).

    Multiplying values and scale by it is exact, and keeps the scale's reciprocal a normal float: XLA on CPU flushes
    subnormals to zero, so 1 / 3e38 would be 0 and 1 / 1e-40 inf.
    """
    magnitude_B = jnp.abs(scale_B)  # a double-quantized scale of ~0 can decode slightly negative
    return jnp.where(magnitude_B > 2.0**64, 2.0**-64, jnp.where(magnitude_B < 2.0**-64, 2.0**64, 1.0))
