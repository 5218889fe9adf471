"""Quantization formats: what a k-bit code means, and the registry of format names.

Every format is applied to *absmax-scaled* values (LLM.int8(), Dettmers et al. 2022; QLoRA, Dettmers et al. 2023).
A group of values x (a block, a channel or the whole tensor, see :mod:`peftjax.quant.blockwise`) is scaled by its
absolute maximum so that ``s = x * (qmax / absmax)`` lies in ``[-qmax, qmax]``; the format turns each ``s`` into an
integer code and back:

    code = encode(s)                x ≈ decode(code) * absmax / qmax

Three families, each a small class:

* :class:`IntFormat` ``int2`` .. ``int8``: uniform integers, ``qmax = 2^(k-1) - 1``, ``encode = round`` (half to even).
  Per tensor, int8 is exactly LLM.int8()'s ``X_q = round(127 / max|X| * X)``. Codes are offset binary,
  ``code = X_q + 2^(k-1)``. Worst-case error: half a step, ``absmax / (2 qmax)``.
* :class:`CodebookFormat`: a table T of 2^k values in [-1, 1] (``qmax = 1``); ``encode`` returns the code of the
  nearest table entry, ``decode(code) = T[code]``. Worst-case error: half the widest gap of T, times absmax.

  - ``nf2`` .. ``nf8``: NormalFloat (QLoRA §3). The 2^(k-1) positive values are standard-normal quantiles of
    2^(k-1) + 1 evenly spaced probabilities from ``offset`` down to 1/2 (the last, 0, dropped); the 2^(k-1) - 1
    negative ones mirror 2^(k-1) probabilities the same way; plus an exact zero; all divided by the largest.
    ``offset = 1 - (1/(2(2^k - 1)) + 1/(2 * 2^k)) / 2`` is the paper's choice, rounded to 7 decimals as
    bitsandbytes does (0.9677083 for k = 4), so that ``nf4`` equals bitsandbytes' NF4 table bit for bit.
  - ``fp4``: bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit) in its own code order, divided by 12.
  - ``dynamic8``: bitsandbytes' signed 8-bit dynamic map (Dettmers 2016, "8-Bit Approximations for Parallelism in
    Deep Learning"), which double quantization uses for the block scales.
* :class:`FloatFormat` ``fp8_e4m3`` (OCP E4M3FN) and ``fp8_e5m2``: ``qmax`` is the largest finite value (448, 57344);
  ``encode`` rounds to nearest even in that type and the code is its bit pattern.

A new format is one instance (for a codebook, one table) plus a :func:`register_format` call.
"""
from __future__ import annotations

import abc
import difflib
import math
import re
import statistics
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError

MIN_BITS, MAX_BITS = 2, 8


class Format(abc.ABC):
    """A k-bit number format for absmax-scaled values: ``x ≈ decode(encode(x * qmax / absmax)) * absmax / qmax``.

    ``max_error`` is the worst case of ``|x - dequantized x| / absmax`` over a group (float rounding aside).
    """

    def __init__(self, name: str, bits: int, qmax: float, max_error: float):
        self.name, self.bits, self.qmax, self.max_error = name, bits, qmax, max_error

    @abc.abstractmethod
    def encode(self, s: jax.Array) -> jax.Array:
        """uint8 codes of scaled values ``s`` in ``[-qmax, qmax]``."""

    @abc.abstractmethod
    def decode(self, codes: jax.Array) -> jax.Array:
        """float32 scaled values of uint8 ``codes``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, bits={self.bits})"


class IntFormat(Format):
    """Symmetric k-bit integers in ``[-(2^(k-1) - 1), 2^(k-1) - 1]``, stored offset binary (``q + 2^(k-1)``)."""

    def __init__(self, bits: int):
        qmax = 2 ** (bits - 1) - 1
        super().__init__(f"int{bits}", bits, float(qmax), 0.5 / qmax)
        self.zero_code = 2 ** (bits - 1)

    def encode(self, s):
        return (jnp.round(s) + self.zero_code).astype(jnp.uint8)

    def decode(self, codes):
        return codes.astype(jnp.float32) - self.zero_code


class CodebookFormat(Format):
    """Nearest entry of a table of 2^k values spanning [-1, 1]; ``decode(code) = table[code]``.

    Encoding compares ``s`` with the midpoints of the table sorted by value (a stable sort). Where the table holds one
    value twice (FP4's +0 and -0, codes 0 and 8) their midpoint splits them by sign: negative values take the first
    code, positive ones the second, as bitsandbytes' CPU quantizer does.
    """

    def __init__(self, name: str, table):
        table = np.asarray(table, dtype=np.float32)
        bits = int(math.log2(table.size))
        if table.size != 2**bits or np.abs(table).max() != 1.0:
            raise PeftjaxError(f"codebook {name!r} has {table.size} entries with max |value| {np.abs(table).max()}; "
                               "a codebook needs 2^k entries (k = 2..8) spanning [-1, 1]")
        order = np.argsort(table, kind="stable")
        sorted_values = table[order].astype(np.float64)
        gaps = np.concatenate([[sorted_values[0] + 1.0], np.diff(sorted_values) / 2, [1.0 - sorted_values[-1]]])
        super().__init__(name, bits, 1.0, float(gaps.max()))
        self.table = table
        # midpoints in float64, rounded once: the float32 constants bitsandbytes compares against
        self.thresholds = ((sorted_values[:-1] + sorted_values[1:]) / 2).astype(np.float32)
        self.code_of_rank = None if np.array_equal(order, np.arange(table.size)) else order.astype(np.uint8)

    def encode(self, s):
        # branchless binary search for rank = #{thresholds < s}: k steps, each adding 2^bit when the threshold just
        # below rank + 2^bit is still smaller than s (rank + 2^bit <= 2^k - 1, so the index stays in range)
        thresholds = jnp.asarray(self.thresholds)
        rank = jnp.zeros(jnp.shape(s), jnp.int32)
        for bit in reversed(range(self.bits)):
            probe = rank + 2**bit
            rank = jnp.where(s > thresholds[probe - 1], probe, rank)
        rank = rank.astype(jnp.uint8)
        return rank if self.code_of_rank is None else jnp.asarray(self.code_of_rank)[rank]

    def decode(self, codes):
        return jnp.asarray(self.table)[codes]


class FloatFormat(Format):
    """An 8-bit float type (``jnp.float8_*``): codes are its bit patterns, ``qmax`` its largest finite value."""

    def __init__(self, name: str, dtype):
        self.dtype = jnp.dtype(dtype)
        qmax = float(jnp.finfo(self.dtype).max)
        values = np.arange(256, dtype=np.uint8).view(self.dtype).astype(np.float64)
        grid = np.unique(values[np.isfinite(values) & (values >= 0)])
        super().__init__(name, 8 * self.dtype.itemsize, qmax, float(np.diff(grid).max() / 2 / qmax))

    def encode(self, s):
        # clip: a product that rounds just past qmax must not become NaN in E4M3FN, which has no infinity
        return jax.lax.bitcast_convert_type(jnp.clip(s, -self.qmax, self.qmax).astype(self.dtype), jnp.uint8)

    def decode(self, codes):
        return jax.lax.bitcast_convert_type(codes, self.dtype).astype(jnp.float32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, bit for bit, so that tables built from it match bitsandbytes.

    torch rounds the step to float32 and computes ``start + i * step`` for the first half of the points and
    ``end - (steps - 1 - i) * step`` for the second, each with a single rounding (a fused multiply-add).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = float(np.float32((end32 - start32) / np.float32(steps - 1)))
    i = np.arange(steps)
    return np.where(i < steps // 2, float(start32) + step * i, float(end32) - step * (steps - 1 - i)).astype(np.float32)


def normal_float_table(bits: int) -> np.ndarray:
    """The NF-k codebook of QLoRA (Dettmers et al. 2023, §3): 2^k normal quantiles with an exact zero, in [-1, 1]."""
    half = 2 ** (bits - 1)
    offset = round(1 - (1 / (2 * (2**bits - 1)) + 1 / (2 * 2**bits)) / 2, 7)
    quantile = statistics.NormalDist().inv_cdf
    positive = [quantile(float(p)) for p in torch_linspace_f32(offset, 0.5, half + 1)[:-1]]
    negative = [-quantile(float(p)) for p in torch_linspace_f32(offset, 0.5, half)[:-1]]
    table = np.sort(np.array(positive + [0.0] + negative, dtype=np.float32))
    return table / table.max()


def dynamic_map_table() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``), sorted.

    For each decimal exponent e = 0..6: the 2^e midpoints of 2^e + 1 evenly spaced points in [0.1, 1], times
    10^(e - 6), with both signs (254 values); plus 0 and 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch_linspace_f32(0.1, 1.0, 2**e + 1)
        scaled = np.float32(10.0 ** (e - 6)) * ((edges[:-1] + edges[1:]) / np.float32(2))
        values += [*scaled, *(-scaled)]
    return np.sort(np.array(values, dtype=np.float32))


# bitsandbytes' FP4 in its code order: bit 3 is the sign; the other three bits encode 0b000 = 0, 0b001 = 0.0625
# (subnormal), 0b010 = 8, 0b011 = 12, 0b100 = 4, 0b101 = 6, 0b110 = 2, 0b111 = 3; normalised by 12. Code 8 is a
# second zero (bitsandbytes writes it as -0 in integer form, i.e. +0.0).
FP4_TABLE = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32) / np.float32(12)

_REGISTRY: dict[str, Format] = {}
FORMATS = MappingProxyType(_REGISTRY)  # name -> Format, read-only view of the registry


def register_format(fmt: Format) -> Format:
    """Add ``fmt`` under ``fmt.name``; its codes must fit 2..8 bits."""
    if fmt.name in _REGISTRY:
        raise PeftjaxError(f"quantization format {fmt.name!r} is already registered; pick another name")
    if not MIN_BITS <= fmt.bits <= MAX_BITS:
        raise PeftjaxError(f"format {fmt.name!r} has {fmt.bits}-bit codes; formats use {MIN_BITS}..{MAX_BITS} bits")
    _REGISTRY[fmt.name] = fmt
    return fmt


def known_formats() -> tuple[str, ...]:
    """Names of the registered formats, sorted."""
    return tuple(sorted(_REGISTRY))


def get_format(name: str, *, label: str = "quantize") -> Format:
    """The registered format called ``name``; ``label`` prefixes the error (the tensor's name)."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    family = re.fullmatch(r"(int|nf)(\d+)", name) if isinstance(name, str) else None
    if family:
        kind, bits = family.groups()
        raise PeftjaxError(f"{label}: format {name!r} asks for {bits} bits; {kind} formats exist for "
                           f"{MIN_BITS}..{MAX_BITS} bits ({kind}{MIN_BITS} ... {kind}{MAX_BITS})")
    close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise PeftjaxError(f"{label}: unknown quantization format {name!r}; {hint}"
                       f"known formats: {', '.join(known_formats())}")


for _bits in range(MIN_BITS, MAX_BITS + 1):
    register_format(IntFormat(_bits))
    register_format(CodebookFormat(f"nf{_bits}", normal_float_table(_bits)))
register_format(CodebookFormat("fp4", FP4_TABLE))
register_format(CodebookFormat("dynamic8", dynamic_map_table()))
register_format(FloatFormat("fp8_e4m3", jnp.float8_e4m3fn))
register_format(FloatFormat("fp8_e5m2", jnp.float8_e5m2))
