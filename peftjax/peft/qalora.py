"""QA-LoRA: quantization-aware low-rank adaptation (Xu et al. 2023), written against the public API.

The base is quantized group-wise with an asymmetric (min-max) k-bit integer code, one (step s, zero point z) per
group of L consecutive *input* features of each output column (``quant: {format: int4, block_size: L, asymmetric:
true}``: this project stores a weight as torch does, (d_out, d_in), in blocks along the input, so the blocks are
these groups when L divides d_in). The adapter sees the input average-pooled over the same groups:

    y = x W_q + s * pool(x) A B,   pool(x)_g = mean(x_i : i in group g),   A: (d_in / L, r),  B: (r, d_out),
    s = alpha / r

(the paper's ``AvgPool1d(L)``; its 1/L is folded into the learnt A). B starts at zero, so the adapted model starts
as the base; A is Kaiming-uniform with fan-in d_in / L. Dropout (``dropout=p``) acts on the adapter's input, before
pooling, and only when the call is given a key, as LoRA's.

Why: the update is constant within each input group, ΔW[i, o] = (s / L) (A B)[g(i), o], so merging it only shifts
each group's offset: s_g (q - z_g) + c_g = s_g (q - (z_g - c_g / s_g)). The merged model keeps every k-bit code and
every step bit for bit; QLoRA's merge instead has to requantize W + ΔW, which moves codes and adds error.

Merged offsets (the design): a :class:`~peftjax.quant.QArray` stores zero points as uint8, and z - c / s is not an
integer, so the merged array stores them as float32 (the paper's per-group float offset β = -s z' expressed in
the array's own ``(code - zero) * step`` decoding, which works unchanged for float zero points). Codes stay packed
k-bit integers; storage grows by 3 bytes per group (int4, L = 32: 5.25 -> 6 bits per parameter), exactly what a
GPTQ-style kernel with fp16 zeros pays. The wrapper's base is a :class:`QALoRAQuantizedLinear`, a
:class:`~peftjax.quant.policy.QuantizedLinear` whose ``requantized`` (what ``peft.merge`` / ``unmerge`` /
``merge_and_unload`` call after adding the update to the dequantized weight) recognises an update that is constant
per group and moves the zero points instead of requantizing; any other new weight is requantized as usual.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, input_dropout, kaiming_uniform, register_method,
                              replace_matching)
from peftjax.quant import QArray, dequantize
from peftjax.quant.double_quant import dequantize_scales
from peftjax.quant.formats import IntFormat
from peftjax.quant.policy import QuantizedLinear
from peftjax.variables import Quantized

HOW = "quantize the base with `quant: {format: int4, block_size: 32, asymmetric: true}`"


class QALoRA(Adapter):
    """QA-LoRA's trainable factors A (pooled input -> rank) and B."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QALoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    group_size: int | None = None  # L; None: the base's quantization block size (which it must equal)
    targets: str | tuple[str, ...] = "all-linear"
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise PeftjaxError(f"QA-LoRA rank must be >= 1, got {self.rank}")
        if self.group_size is not None and self.group_size < 1:
            raise PeftjaxError(f"QA-LoRA group_size must be a positive integer (or null for the base's quantization "
                               f"block size), got {self.group_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftjaxError(f"QA-LoRA dropout must be in [0, 1), got {self.dropout}")


def group_pool(x: jax.Array, group_size: int) -> jax.Array:
    """The mean of ``x`` over each group of ``group_size`` consecutive features of its last axis."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size).mean(axis=-1)


def qalora_weight(a_GR: jax.Array, b_RO: jax.Array, scale: float, group_size: int) -> jax.Array:
    """ΔW = (s / L) (A B) with each row repeated L times, in the (d_in, d_out) layout: pool(x) s A B = x ΔW."""
    return jnp.repeat((a_GR @ b_RO) * (scale / group_size), group_size, axis=0)


def check_base(base, path: str, group_size: int | None) -> int:
    """The group size L of a base QA-LoRA can adapt (one-line errors saying how to fix any other base)."""
    if not isinstance(base, QuantizedLinear):
        raise PeftjaxError(f"QA-LoRA needs a quantized base, and {path} is not quantized: {HOW}")
    q = base.weight.get_value()
    if not isinstance(q.format, IntFormat) or not q.asymmetric:
        kind = q.fmt if not isinstance(q.format, IntFormat) else f"symmetric {q.fmt}"
        raise PeftjaxError(f"QA-LoRA needs an asymmetric integer base (its update moves zero points), {path} is "
                           f"{kind}: {HOW}")
    if q.axis is not None or q.block_size is None:
        raise PeftjaxError(f"QA-LoRA needs blocks along the input, {path} has one scale per "
                           f"{'channel' if q.axis is not None else 'tensor'}: drop quant.axis and {HOW}")
    if group_size is not None and group_size != q.block_size:
        raise PeftjaxError(f"QA-LoRA group_size {group_size} must equal the base's quantization block size "
                           f"{q.block_size} ({path}): set peft.group_size: {q.block_size} (or null) or "
                           f"quant.block_size: {group_size}")
    if base.d_in % q.block_size:
        raise PeftjaxError(f"QA-LoRA groups are quantization blocks within one output column, but {path} has "
                           f"d_in {base.d_in}, not a multiple of quant.block_size {q.block_size}: choose a block size "
                           "that divides every targeted layer's input size")
    return q.block_size


def shift_zero_points(q: QArray, offset_OG) -> QArray:
    """``q`` with the same codes and steps whose groups each decode ``offset`` higher: z' = z - offset / step (float32
    zero points). ``offset_OG``: (d_out, d_in / L) for a (d_out, d_in) array in blocks of L along the input."""
    step = np.asarray(dequantize_scales(q.scales) if q.double_quant else q.scales, np.float64)
    offset = np.asarray(offset_OG, np.float64).reshape(-1)
    if np.any((step == 0) & (offset != 0)):
        raise PeftjaxError("QA-LoRA cannot move a quantization group whose weights are all zero (its step is 0, so "
                           "no zero point shifts it); requantize that layer or leave it out of peft.targets")
    zero = np.asarray(q.zero_points, np.float64)
    shifted = np.where(step > 0, zero - offset / np.where(step > 0, step, 1.0), zero)
    return dataclasses.replace(q, zero_points=jnp.asarray(shifted, jnp.float32))


def group_offsets(q: QArray, w_DO) -> np.ndarray | None:
    """The (d_out, d_in / L) per-group constant c with w ≈ dequantize(q) + c (to float32 rounding), or None when
    w - dequantize(q) is not constant within each group."""
    d_out, d_in = q.shape
    current = np.asarray(dequantize(q, jnp.float32), np.float64)
    target = np.asarray(w_DO, np.float64).T
    diff = (target - current).reshape(d_out, d_in // q.block_size, q.block_size)
    offset = diff.mean(axis=-1)
    magnitude = np.maximum(np.abs(target), np.abs(current)).reshape(diff.shape).max(axis=-1)
    spread = np.abs(diff - offset[..., None]).max(axis=-1)
    return offset if np.all(spread <= 8 * np.finfo(np.float32).eps * magnitude + 1e-30) else None


class QALoRAQuantizedLinear(QuantizedLinear):
    """A QA-LoRA layer's quantized base: requantizing a weight that differs from its own by a constant per group
    keeps the codes and steps and moves the zero points (see the module docstring); any other weight is quantized
    afresh with the layer's spec."""

    def __init__(self, base: QuantizedLinear):
        self.d_in, self.d_out = base.d_in, base.d_out
        self.format, self.rule = base.format, base.rule
        self.weight = Quantized(base.weight.get_value())
        self.bias = base.bias

    def requantized(self, w_DO: jax.Array):
        q = self.weight.get_value()
        offset = group_offsets(q, w_DO)
        return super().requantized(w_DO) if offset is None else shift_zero_points(q, offset)


class QALoRALinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: QuantizedLinear, *, rank: int, alpha: float, group_size: int, dropout: float,
                 key: jax.Array):
        super().__init__(QALoRAQuantizedLinear(base))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.group_size, self.dropout = group_size, dropout
        groups = base.d_in // group_size
        self.qalora_a = QALoRA(kaiming_uniform(key, (groups, rank), groups))
        self.qalora_b = QALoRA(jnp.zeros((rank, base.d_out), jnp.float32))  # ΔW = 0 at the start

    def delta_weight(self) -> jax.Array:
        return qalora_weight(self.qalora_a[...], self.qalora_b[...], self.scale, self.group_size)

    def adapt(self, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
        pooled = group_pool(input_dropout(x, self.dropout, key), self.group_size)
        return y + (pooled @ self.qalora_a[...].astype(x.dtype)) @ (self.qalora_b[...].astype(x.dtype) * self.scale)


def apply_qalora(model, config: QALoRAConfig) -> None:
    root = jax.random.key(config.seed)

    def make(path, base, _):
        group_size = check_base(base, path, config.group_size)
        groups = base.d_in // group_size
        if config.rank > min(groups, base.d_out):
            raise PeftjaxError(f"QA-LoRA rank {config.rank} does not fit {path}: its pooled input has d_in / "
                               f"group_size = {base.d_in} / {group_size} = {groups} features (1 <= rank <= "
                               f"{min(groups, base.d_out)}); choose a smaller rank or quantization block size")
        key = jax.random.fold_in(root, zlib.crc32(path.encode()))  # each layer's draw depends on its path only
        return QALoRALinear(base, rank=config.rank, alpha=config.alpha, group_size=group_size,
                            dropout=config.dropout, key=key)

    replace_matching(model, Linear, config.targets, make, what="QA-LoRA target")


register_method("qalora", QALoRAConfig, apply_qalora)
