"""Fake quantization for quantization-aware training, with the straight-through estimator (Bengio et al. 2013).

    forward:   fake_quant(x) = dequantize(quantize(x))        backward:   d fake_quant / dx = I

The forward pass sees exactly the values a quantized model would use; the gradient passes through the rounding as
if it were the identity, so trainable weights (or a merged ``W + B @ A``) can be trained against their quantized
selves.
"""
from __future__ import annotations

import functools

import jax

from peftjax.quant.qarray import dequantize, quantize


def fake_quant(x: jax.Array, fmt: str, **kwargs) -> jax.Array:
    """``dequantize(quantize(x, fmt, **kwargs))`` with an identity (straight-through) gradient; keeps x's dtype."""
    return _fake_quant(x, fmt, tuple(sorted(kwargs.items())))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _fake_quant(x, fmt, options):
    return dequantize(quantize(x, fmt, **dict(options)))


@_fake_quant.defjvp
def _straight_through(fmt, options, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return _fake_quant(x, fmt, options), x_dot
