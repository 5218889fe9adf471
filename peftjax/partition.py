"""Partition a model once into pure pytrees: ``graphdef, trainable, frozen = split(model)``.

``trainable`` holds every :class:`~peftjax.variables.Trainable` variable (adapters, or base weights that
full fine-tuning re-typed); ``frozen`` holds everything else, including quantized weights. The train step
differentiates ``trainable`` only and receives ``frozen`` as a plain argument, so no gradient is ever computed or
stored for the frozen base.
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from peftjax.variables import Trainable


def split(model: nnx.Module):
    """(graphdef, trainable, frozen) of ``model``."""
    return nnx.split(model, Trainable, ...)


def merge(graphdef, trainable, frozen) -> nnx.Module:
    return nnx.merge(graphdef, trainable, frozen)


def _is_qarray(x) -> bool:
    from peftjax.quant import QArray

    return isinstance(x, QArray)


def param_count(tree) -> int:
    """Number of logical parameters: a quantized tensor counts as its unpacked element count."""
    leaves = jax.tree.leaves(tree, is_leaf=_is_qarray)
    return sum(x.size if _is_qarray(x) else math.prod(x.shape) for x in leaves)


def tree_nbytes(tree) -> int:
    """Exact storage in bytes (packed codes and scales of quantized tensors, as stored)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def quantized_bits_per_param(tree) -> float | None:
    """Storage bits per parameter of the quantized tensors in ``tree`` (codes and scales); None if it has none."""
    quantized = [x for x in jax.tree.leaves(tree, is_leaf=_is_qarray) if _is_qarray(x)]
    if not quantized:
        return None
    return 8.0 * sum(q.nbytes for q in quantized) / sum(q.size for q in quantized)
