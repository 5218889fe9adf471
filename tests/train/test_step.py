"""The jitted train step: compiles once, trains only adapters, lowers the loss on a tiny model."""
import jax
import numpy as np
from flax import nnx

from peftjax import partition, peft
from peftjax.config import from_dict
from peftjax.peft import LoRAConfig
from peftjax.train import make_optimizer, make_train_step
from peftjax.data import random_blocks
from peftjax.models import tiny_model


def _setup(steps=30, lr=1e-2):
    model = peft.apply(tiny_model(), LoRAConfig(rank=4))
    graphdef, trainable, frozen = partition.split(model)
    tc = from_dict({"train": {"steps": steps, "learning_rate": lr, "grad_clip": None}}).train
    optimizer = make_optimizer(tc)
    return graphdef, trainable, frozen, optimizer, make_train_step(graphdef, optimizer)


def test_train_step_compiles_once_and_loss_falls():
    graphdef, trainable, frozen, optimizer, step = _setup()
    opt_state = optimizer.init(trainable)
    frozen_before = jax.tree.map(np.asarray, frozen)
    blocks = random_blocks(4, 17, seed=3)  # one fixed batch: the adapter must be able to fit it
    losses = []
    for _ in range(30):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, blocks)
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert losses[-1] < losses[0] - 0.5, losses
    # the frozen base is bitwise untouched
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)


def test_train_step_donates_trainable_and_optimizer_state():
    graphdef, trainable, frozen, optimizer, step = _setup(steps=2)
    opt_state = optimizer.init(trainable)
    old_leaf = jax.tree.leaves(trainable)[0]
    trainable, opt_state, _ = step(trainable, opt_state, frozen, random_blocks(2, 9))
    assert old_leaf.is_deleted()
    assert all(isinstance(v, nnx.Variable) for v in jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable)))
