"""Matmuls of bfloat16 operands that XLA's CPU runtime computes fast.

On CPU, XLA computes a bfloat16 x bfloat16 product with a bfloat16 result more slowly than the float32 product,
but with a float32 result (``preferred_element_type``) about twice as fast as float32 where the processor has
AVX-512 BF16 (measured on an AMD EPYC: 955-1,002 vs 480 GFLOP/s at SmolLM2's MLP shapes, 1,024 rows). Autodiff of
such a product would compute the gradients with a float32 cotangent, at float32 speed, so :func:`matmul` has its
own VJP: both gradients are bfloat16 x bfloat16 -> float32 products too, rounded to the operands' dtype. The result
is the float32-accumulated product rounded once to bfloat16, which is also what a GPU's bfloat16 GEMM returns.
Elsewhere (float32 operands, or a GPU or TPU, whose bfloat16 GEMMs are fast as they are) it is ``x @ w``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def accumulates_in_float32(dtype) -> bool:
    """Whether :func:`matmul` takes its float32-result path for operands of ``dtype`` on this backend."""
    return dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for (..., D) activations and a (D, O) weight of the same dtype, in that dtype (module docstring)."""
    if x.dtype != w.dtype or w.ndim != 2 or not accumulates_in_float32(x.dtype):
        return x @ w
    return _bf16_matmul(x, w)


def product_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` as float32, for code with its own gradients (the loss's output head): on the CPU path with a
    float32 result, elsewhere in the operands' dtype and then widened."""
    if a.dtype == b.dtype and accumulates_in_float32(a.dtype):
        return jnp.matmul(a, b, preferred_element_type=jnp.float32)
    return (a @ b).astype(jnp.float32)


def product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` in the operands' dtype, for code with its own gradients (a quantized base's matmul): on the CPU
    path accumulated with a float32 result and rounded."""
    return product_f32(a, b).astype(a.dtype) if a.dtype == b.dtype and accumulates_in_float32(a.dtype) else a @ b


@jax.custom_vjp
def _bf16_matmul(x, w):
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _fwd(x, w):
    return _bf16_matmul(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    rows = x.reshape(-1, x.shape[-1])
    dw = jnp.matmul(rows.T, g.reshape(-1, g.shape[-1]), preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_bf16_matmul.defvjp(_fwd, _bwd)

__all__ = ["accumulates_in_float32", "matmul", "product", "product_f32"]
