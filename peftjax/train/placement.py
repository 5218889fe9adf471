"""A model's training state placed on a device mesh: ``place(model, mesh, optimizer, ...)``.

The one place where a run (:func:`peftjax.train.run`) and the benchmark (:mod:`peftjax.studies.bench`) split the
model, lay its trainable and frozen trees out by :class:`peftjax.sharding.Layout`, create the optimizer state in
the layout of its parameters and make the train step one ``jax.jit`` over the mesh with those shardings in and out.
On a one-device mesh every sharding is that device: the single-device run, unchanged.
"""
from __future__ import annotations

import dataclasses
import sys

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from peftjax import partition, sharding
from peftjax.train.step import make_train_step


@dataclasses.dataclass
class Placed:
    graphdef: object
    trainable: object  # global arrays laid out on the mesh
    frozen: object
    opt_state: object
    layout: sharding.Layout
    trainable_shardings: object
    opt_shardings: object
    batch_sharding: NamedSharding  # the rows of a step's batch over data x fsdp
    row_axis: int  # 0, or 1 when micro-batches are stacked on a leading axis (gradient accumulation)
    step: object  # the jitted train step

    def replicate(self, tree):
        """``tree`` copied whole onto every device of the mesh (evaluation batches, dropout keys)."""
        return sharding.put(tree, self.layout.replicated)

    def restore(self, trainable, opt_state=None):
        """Host trees (a restored checkpoint) laid out like the training state."""
        trainable = sharding.put(trainable, self.trainable_shardings)
        return trainable, None if opt_state is None else sharding.put(opt_state, self.opt_shardings)


@dataclasses.dataclass
class Plan:
    """Where a model's trees go on a mesh and the sharded step over them; trees may be abstract (shapes only)."""
    trainable_shardings: object
    frozen_shardings: object
    opt_shardings: object
    batch_sharding: NamedSharding
    row_axis: int
    step: object


def plan(layout: sharding.Layout, graphdef, trainable, frozen, optimizer, *, batch_size: int, grad_accum: int = 1,
         **step_options) -> Plan:
    """The shardings of ``trainable``, ``frozen``, the optimizer state and a batch under ``layout``, and the jitted
    train step with them in and out (``step_options`` as :func:`place`); nothing is placed or allocated, so
    ``jax.eval_shape`` trees give the compiled step of a model too large to build (:mod:`peftjax.studies.memory`)."""
    row_axis = 0 if grad_accum == 1 else 1
    batch_sharding = layout.batch(batch_size, row_axis)
    trainable_s, frozen_s = layout.shardings(trainable), layout.shardings(frozen)
    opt_s = sharding.optimizer_shardings(jax.eval_shape(optimizer.init, trainable), trainable, trainable_s,
                                         layout.replicated)
    step = make_train_step(graphdef, optimizer, grad_accum=grad_accum,
                           shardings=(trainable_s, opt_s, frozen_s, batch_sharding, layout.replicated),
                           **step_options)
    return Plan(trainable_s, frozen_s, opt_s, batch_sharding, row_axis, step)


def place(model: nnx.Module, mesh: Mesh, optimizer, *, rules: dict | None = None, batch_size: int,
          grad_accum: int = 1, **step_options) -> Placed:
    """Split ``model``, place its trees on ``mesh`` and build the sharded train step (``step_options``:
    :func:`~peftjax.train.step.make_train_step`'s ``compute_dtype``, ``grad_accum``, ``remat``, ``loss_fn``).
    A batch size that does not split over ``data`` x ``fsdp`` is split as far as it goes, with a one-line note."""
    layout = sharding.Layout(model, mesh, rules)
    note = layout.batch_note(batch_size)
    if note and jax.process_index() == 0:
        print(note, file=sys.stderr)
    graphdef, trainable, frozen = partition.split(model)
    p = plan(layout, graphdef, trainable, frozen, optimizer, batch_size=batch_size, grad_accum=grad_accum,
             **step_options)
    trainable, frozen = sharding.put(trainable, p.trainable_shardings), sharding.put(frozen, p.frozen_shardings)
    opt_state = jax.jit(optimizer.init, out_shardings=p.opt_shardings)(trainable)
    return Placed(graphdef, trainable, frozen, opt_state, layout, p.trainable_shardings, p.opt_shardings,
                  p.batch_sharding, p.row_axis, p.step)


__all__ = ["Placed", "Plan", "place", "plan"]
