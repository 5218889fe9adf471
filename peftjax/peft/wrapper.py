"""The common shape of adapter modules, so lifecycle tools (merge, disable, summary) work for every method.

An :class:`AdapterLinear` wraps a frozen base linear layer (dense or quantized) and adds an update. A method that can
fold its update into the base weight implements ``merge_kernel(W) -> W'`` and ``unmerge_kernel(W') -> W`` on the
(d_in, d_out) dense weight (an additive method only ``delta_weight()``: W' = W + ΔW is the default); :mod:`peftjax.peft.merge` does the rest (dequantize, requantize, bookkeeping).
``merged`` and ``disabled`` are plain Python flags: static, so flipping them retraces instead of branching at run
time. Modules that are not linear wrappers (prefix, prompt) subclass :class:`AdapterModule` only.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models.llama import Linear


class AdapterModule(nnx.Module):
    """Anything a PEFT method inserts into a model; ``disabled`` turns its effect off (see ``disable_adapters``)."""

    disabled: bool = False
    mergeable: bool = False


class AdapterLinear(AdapterModule):
    """A frozen ``base`` linear layer plus an update; subclasses define ``__call__`` and, if mergeable, the kernels."""

    merged: bool = False

    def __init__(self, base: Linear):
        self.base = base

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = self.base(x)
        return y if self.bypass() else self.adapt(x, y, key)

    def adapt(self, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The adapted output for input ``x`` given the base's output ``y = base(x)``, so that several adapters on
        one base (named adapters in a mixed batch) share one base matmul. A subclass defines ``adapt`` (and
        inherits ``__call__``) or its own ``__call__``; then this default calls it, computing the base again."""
        if type(self).__call__ is AdapterLinear.__call__:
            raise NotImplementedError(f"{type(self).__name__} defines neither adapt nor __call__")
        return self(x, key)

    @property
    def d_in(self) -> int:
        return self.base.d_in

    @property
    def d_out(self) -> int:
        return self.base.d_out

    def bypass(self) -> bool:
        """True when the forward is the base alone: the update is merged into it or the adapter is disabled."""
        return self.merged or self.disabled

    def delta_weight(self) -> jax.Array:
        """The (d_in, d_out) update of an additive method (W' = W + ΔW): the default kernels below use it."""
        raise NotImplementedError

    def merge_kernel(self, w_DO: jax.Array) -> jax.Array:
        return w_DO + self.delta_weight().astype(w_DO.dtype)

    def unmerge_kernel(self, w_DO: jax.Array) -> jax.Array:
        return w_DO - self.delta_weight().astype(w_DO.dtype)


class DetachedBase(nnx.Module):
    """Stands in for the base of a named adapter held by a container that owns the shared base (see
    :mod:`peftjax.peft.multi`): it knows the base's sizes only, and the container lends the adapter its base for
    the duration of each call."""

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out

    def __call__(self, x, *args):
        raise RuntimeError("a named adapter computes only through its container (peftjax.peft.multi)")


def is_detached(module: nnx.Module) -> bool:
    """True for a named adapter inside its container (its container stands for it in merges, exports, summaries)."""
    return isinstance(getattr(module, "base", None), DetachedBase)


def input_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """An adapter's input dropout: x -> mask * x / (1 - rate) when a key is given and rate > 0, else x."""
    if not rate or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's ``kaiming_uniform_(a=sqrt(5))``, Hugging Face PEFT's factor init."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
