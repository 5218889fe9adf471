"""Quantized tensors: the :class:`QArray` pytree, :func:`quantize` and its inverse :func:`dequantize`.

``quantize`` groups the elements (per tensor, in blocks, or per channel: :mod:`peftjax.quant.blockwise`), scales
each group by its absmax (or, for ``asymmetric=True`` integers, by min/max with a zero point), encodes the scaled
values in a format (:mod:`peftjax.quant.formats`), packs the k-bit codes (:mod:`peftjax.quant.pack`) and optionally
double-quantizes the scales (:mod:`peftjax.quant.double_quant`). With ``fmt="nf4"``, ``block_size=64`` and
``double_quant=True`` this is QLoRA's storage (Dettmers et al. 2023), bit for bit as in bitsandbytes.

``dequantize`` reverses it with shifts, masks, a table lookup (or an integer offset) and one multiply per element;
called inside a jitted step, XLA fuses those into one pass that writes the weight for the matmul that consumes it
(on CPU a separate loop before the dot, not inside the dot's operand).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.quant.blockwise import (
    absmax_decode,
    absmax_encode,
    affine_decode,
    affine_encode,
    from_groups,
    group_shape,
    to_groups,
)
from peftjax.quant.double_quant import DQ_BLOCK_SIZE, DoubleQuantScales, dequantize_scales, double_quantize
from peftjax.quant.formats import Format, IntFormat, get_format
from peftjax.quant.pack import pack_bits, unpack_bits


@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
    """A quantized tensor: packed k-bit codes plus per-group scales, as a JAX pytree.

    Invariant: ``x ≈ dequantize(quantize(x, fmt, ...))``, elementwise within ``FORMATS[fmt].max_error * absmax`` of
    the element's group (``step / 2`` for asymmetric integers), plus the error of the scale itself when
    ``double_quant=True``.

    Leaves (arrays: traced, jitted and donated like any parameter):
        codes: uint8 (ceil(n * bits / 8),), the codes of the n logical elements in row-major order, packed
            (padding is never stored).
        scales: float32 (groups,), each group's absmax (symmetric) or step (asymmetric); or
            :class:`~peftjax.quant.double_quant.DoubleQuantScales` when double-quantized.
        zero_points: uint8 (groups,) for asymmetric integers, else None.

    Static metadata (part of the tree structure; a change means a new compilation):
        fmt: format name; block_size: elements per block, None per tensor or per channel; axis: the per-channel
        axis or None; shape, dtype: of the original tensor; padding: zero elements appended to fill the last block.
    """

    codes: jax.Array
    scales: jax.Array | DoubleQuantScales
    zero_points: jax.Array | None
    fmt: str
    block_size: int | None
    axis: int | None
    shape: tuple[int, ...]
    dtype: np.dtype
    padding: int

    @property
    def format(self) -> Format:
        return get_format(self.fmt)

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def size(self) -> int:
        """Number of logical elements (padding excluded)."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Exact storage of all leaves in bytes."""
        return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(self))

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / self.size

    @property
    def double_quant(self) -> bool:
        return isinstance(self.scales, DoubleQuantScales)

    @property
    def asymmetric(self) -> bool:
        return self.zero_points is not None

    @property
    def spec(self) -> dict:
        """The keyword arguments of :func:`quantize` that made this array: ``quantize(w, **q.spec)`` quantizes
        another tensor the same way (after a merge, say)."""
        return {"fmt": self.fmt, "block_size": self.block_size, "axis": self.axis, "double_quant": self.double_quant,
                "asymmetric": self.asymmetric,
                "dq_block_size": self.scales.block_size if self.double_quant else DQ_BLOCK_SIZE}

    @property
    def groups(self) -> tuple[int, int, int]:
        """The (A, B, C) view of :func:`peftjax.quant.blockwise.group_shape`."""
        return group_shape(self.shape, self.block_size, self.axis)

    def __repr__(self) -> str:
        grouping = f"axis={self.axis}" if self.axis is not None else f"block_size={self.block_size}"
        extras = "".join(f", {flag}" for flag in ("double_quant", "asymmetric") if getattr(self, flag))
        return (f"QArray({self.fmt}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, {grouping}{extras}, "
                f"{self.bits_per_param:.3f} bits/param)")


jax.tree_util.register_dataclass(
    QArray,
    data_fields=["codes", "scales", "zero_points"],
    meta_fields=["fmt", "block_size", "axis", "shape", "dtype", "padding"],
)


def quantize(x, fmt: str, *, block_size: int | None = 64, axis: int | None = None, double_quant: bool = False,
             asymmetric: bool = False, dq_block_size: int = DQ_BLOCK_SIZE, name: str | None = None) -> QArray:
    """Quantize floating-point ``x`` to the format ``fmt`` (see :data:`peftjax.quant.FORMATS`).

    Groups sharing a scale: blocks of ``block_size`` elements over the flattened row-major array (the default, as
    bitsandbytes); the whole tensor when ``block_size=None``; one group per index of ``axis`` when ``axis`` is given
    (the scale then covers all other axes and ``block_size`` is not used; e.g. ``axis=-1`` on a (d_in, d_out)
    weight gives one scale per output channel). ``double_quant`` quantizes the scales again (QLoRA);
    ``asymmetric`` uses min/max with a zero point (integer formats only); ``dq_block_size`` is the number of scales
    sharing one second-level absmax (256 in bitsandbytes). ``name`` names the tensor in errors.

    Works under ``jax.jit`` with the keyword arguments static. Concrete inputs are checked for NaN and inf.
    """
    label = name or "quantize"
    spec = get_format(fmt, label=label)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise PeftjaxError(f"{label}: can only quantize floating-point tensors, got dtype {x.dtype}; cast it first")
    if x.size == 0:
        raise PeftjaxError(f"{label}: cannot quantize an empty tensor of shape {x.shape}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0):
        raise PeftjaxError(f"{label}: block_size must be a positive integer (or None for one scale per tensor), "
                           f"got {block_size!r}")
    if axis is not None:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.ndim <= axis < x.ndim:
            raise PeftjaxError(f"{label}: axis={axis!r} is out of range for a tensor of shape {x.shape}; "
                               f"use an integer in [{-x.ndim}, {x.ndim})")
        axis, block_size = axis % x.ndim, None
    if double_quant and (isinstance(dq_block_size, bool) or not isinstance(dq_block_size, int) or dq_block_size <= 0):
        raise PeftjaxError(f"{label}: dq_block_size must be a positive integer, got {dq_block_size!r}")
    if asymmetric and not isinstance(spec, IntFormat):
        raise PeftjaxError(f"{label}: asymmetric=True needs an integer format (int2..int8), got {fmt!r}; drop "
                           "asymmetric or pick an int format")
    if not isinstance(x, jax.core.Tracer):
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(x))))
        if bad:
            raise PeftjaxError(f"{label}: weight contains NaN or inf ({bad} of {x.size} values); quantize finite "
                               "values only (fix the checkpoint or clean the tensor first)")
    return _quantize(x, fmt=fmt, block_size=block_size, axis=axis, double_quant=bool(double_quant),
                     asymmetric=bool(asymmetric), dq_block_size=dq_block_size)


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "axis", "double_quant", "asymmetric",
                                             "dq_block_size"))
def _quantize(x, *, fmt, block_size, axis, double_quant, asymmetric, dq_block_size) -> QArray:
    spec = get_format(fmt)
    groups = group_shape(x.shape, block_size, axis)
    x_ABC = to_groups(x.astype(jnp.float32), groups)
    if asymmetric:
        codes_ABC, scales, zero_points = affine_encode(x_ABC, spec.bits)
    else:
        (codes_ABC, scales), zero_points = absmax_encode(x_ABC, spec), None
    return QArray(
        codes=pack_bits(codes_ABC.reshape(-1)[: x.size], spec.bits),
        scales=double_quantize(scales, dq_block_size) if double_quant else scales,
        zero_points=zero_points,
        fmt=fmt, block_size=block_size, axis=axis, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
        padding=math.prod(groups) - x.size,
    )


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """The tensor ``q`` stands for, in its original shape and dtype (or ``dtype``). Works under ``jax.jit``."""
    if not isinstance(q, QArray):
        raise PeftjaxError(f"dequantize expects a QArray (from peftjax.quant.quantize), got {type(q).__name__}")
    try:
        dtype = jnp.dtype(q.dtype if dtype is None else dtype)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise PeftjaxError(f"dequantize: dtype must be a floating-point type such as 'float32' or 'bfloat16'")
    return _dequantize(q, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: QArray, *, dtype) -> jax.Array:
    codes_ABC = to_groups(unpack_bits(q.codes, q.bits, q.size), q.groups)
    scales = dequantize_scales(q.scales) if q.double_quant else q.scales
    if q.asymmetric:
        x_ABC = affine_decode(codes_ABC, scales, q.zero_points)
    else:
        x_ABC = absmax_decode(codes_ABC, scales, q.format)
    return from_groups(x_ABC, q.shape).astype(dtype)
