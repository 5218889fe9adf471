"""Rotary position embeddings (Su et al. 2021) and the context-extension schemes of Hugging Face checkpoints.

A head of dimension d rotates the pairs (i, i + d/2) ("rotate half" layout) by angle ``pos * f_i``, with the
inverse frequencies f_i = theta^(-2i/d), i < d/2, changed by the checkpoint's scaling type:

- ``default``: f_i as above.
- ``linear`` (position interpolation, Chen et al. 2023): f_i / factor.
- ``dynamic`` (NTK-aware): when the sequence reaches L > L_max positions, theta' = theta * (factor L / L_max -
  (factor - 1))^(d / (d - 2)); below L_max, the default frequencies.
- ``llama3`` (Llama 3.1): wavelengths 2 pi / f_i above L_orig / low_freq_factor are divided by ``factor``, below
  L_orig / high_freq_factor kept, and interpolated between with s = (L_orig / wavelength - low) / (high - low):
  f = (1 - s) f / factor + s f.
- ``yarn`` (Peng et al. 2023): a ramp between interpolated (f / factor) and extrapolated (f) frequencies over the
  dimensions whose rotation counts at L_orig lie between beta_slow and beta_fast, and cos/sin scaled by the
  attention factor 0.1 ln(factor) + 1 (or mscale / mscale_all_dim's ratio).

Each follows transformers' ``modeling_rope_utils`` in float32, so a checkpoint's positions mean the same here.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """A checkpoint's RoPE scaling scheme (module docstring); the base ``theta`` is the model's."""

    type: str = "default"
    factor: float = 1.0
    original_max_position: int | None = None  # L_orig of llama3 / yarn (the model's max_position when absent)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise PeftjaxError(f"RoPE scaling type {self.type!r} is not supported; peftjax implements "
                               f"{', '.join(ROPE_TYPES)}")


def _base_frequencies(head_dim: int, theta) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def _yarn(theta: float, rope: RopeScaling, head_dim: int, max_position: int) -> tuple[np.ndarray, float]:
    factor, d = rope.factor, head_dim
    original = rope.original_max_position or max_position

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        attention = (mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
                     if rope.mscale and rope.mscale_all_dim else mscale(factor))

    def correction_dim(rotations):
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    extrapolate = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv.astype(np.float32), float(attention)


def inverse_frequencies(theta: float, rope: RopeScaling, head_dim: int, max_position: int,
                        seq_len: jax.Array | int | None) -> tuple[jax.Array, float]:
    """(f_i for i < head_dim / 2, the factor cos and sin are scaled by) for a call whose positions end at
    ``seq_len - 1`` (only ``dynamic`` depends on it; it may be traced)."""
    if rope.type == "yarn":
        inv, attention = _yarn(theta, rope, head_dim, max_position)
        return jnp.asarray(inv), attention
    if rope.type == "dynamic":
        d, factor = head_dim, rope.factor
        grown = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(max_position))
        grown_theta = theta * ((factor * grown / max_position) - (factor - 1)) ** (d / (d - 2))
        scaled = _base_frequencies(d, grown_theta)
        return jnp.where(jnp.asarray(seq_len) > max_position, scaled, _base_frequencies(d, theta)), 1.0
    inv = _base_frequencies(head_dim, theta)
    if rope.type == "linear":
        return inv / rope.factor, 1.0
    if rope.type == "llama3":
        original = rope.original_max_position or max_position
        low_wavelength = original / rope.low_freq_factor
        high_wavelength = original / rope.high_freq_factor
        wavelength = 2 * math.pi / inv
        scaled = jnp.where(wavelength > low_wavelength, inv / rope.factor, inv)
        smooth = (original / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelength >= high_wavelength) & (wavelength <= low_wavelength)
        return jnp.where(medium, smoothed, scaled), 1.0
    return inv, 1.0


def rope_cos_sin(positions_BT: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None, *,
                 max_position: int = 2048) -> tuple[jax.Array, jax.Array]:
    """cos and sin (B, T, head_dim) of the rotation at each position; ``dynamic`` scaling reads where the call's
    positions end from ``positions_BT`` (its largest + 1)."""
    scaling = scaling or RopeScaling()
    seq_len = jnp.max(positions_BT) + 1 if scaling.type == "dynamic" else None
    inv_freq, attention = inverse_frequencies(theta, scaling, head_dim, max_position, seq_len)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # (B, T, hd/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B, T, hd)
    if attention == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * attention, jnp.sin(angles) * attention


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :].astype(x_BTNH.dtype), sin_BTH[:, :, None, :].astype(x_BTNH.dtype)
    return x_BTNH * cos + rotated * sin
