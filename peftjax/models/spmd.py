"""Where a model's activations live on a device mesh while a sharded step is traced.

Parameters carry their own shardings (:mod:`peftjax.sharding`); activations have none until the partitioner infers
them, and GSPMD, left alone, may resolve a conflict between a batch split over ``fsdp`` and a kernel split over
``fsdp`` by gathering the *activations* (every device then computes the whole batch against its slice of the
weights: measured 3.7x the per-device temporaries of data parallelism on SmolLM2's shape, rising with the batch)
instead of gathering each kernel, which is FSDP. Pinning the token rows of every decoder layer's input and output to
the batch's mesh axes, as MaxText and Levanter pin their activations, leaves the partitioner one choice: gather the
weights, keep the activations split by rows.

``with rows_sharding(mesh, axes): ...`` splits token rows over those mesh axes for the code it encloses (the train
step sets it while it is traced); :func:`constrain_rows` applies it, and is the identity outside. The chunked loss
(:mod:`peftjax.train.loss`) reads :func:`row_ways` to give every device chunks of its own rows.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec

_ROWS = contextvars.ContextVar("peftjax_rows_sharding", default=None)


@contextlib.contextmanager
def rows_sharding(mesh, axes):
    """Within the block, token rows are split over ``axes`` of ``mesh`` (a mesh axis name, a tuple of them, or None:
    no constraint): :func:`constrain_rows` pins them there and :func:`row_ways` counts the pieces."""
    token = _ROWS.set(None if mesh is None or axes is None else (mesh, axes))
    try:
        yield
    finally:
        _ROWS.reset(token)


def row_ways() -> int:
    """Into how many pieces the enclosing :func:`rows_sharding` splits token rows (1 outside one)."""
    split = _ROWS.get()
    if split is None:
        return 1
    mesh, axes = split
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def constrain_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """``x`` with its array axis ``axis`` (token rows; (N, D) activations by default) split as the enclosing
    :func:`rows_sharding` says and its other axes whole, or ``x`` unchanged outside one."""
    split = _ROWS.get()
    if split is None:
        return x
    mesh, axes = split
    spec = [None] * x.ndim
    spec[axis] = axes
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


__all__ = ["constrain_rows", "row_ways", "rows_sharding"]
