"""Every method: gradients reach only its parameters, it trains a tiny model to lower loss, on a quantized base too."""
import math

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from peftjax import partition, peft
from peftjax.variables import Trainable
from peftjax.peft.loha import LoHa, LoHaConfig
from peftjax.peft.vera import VeRA, VeRAConfig
from peftjax.data import random_blocks
from peftjax.models import tiny_model
from peftjax.quant.policy import QuantRule, quantize_model

METHODS = {
    "lora": (peft.LoRAConfig(rank=4), peft.LoRA),
    "rslora-gaussian": (peft.LoRAConfig(rank=4, rslora=True, init="gaussian"), peft.LoRA),
    "dora": (peft.LoRAConfig(rank=4, dora=True), peft.LoRA),
    "pissa": (peft.LoRAConfig(rank=4, init="pissa"), peft.LoRA),
    "ia3": (peft.IA3Config(), peft.IA3),
    "prefix": (peft.PrefixConfig(num_tokens=4, reparameterize=True), peft.Prefix),
    "prompt": (peft.PromptConfig(num_tokens=4), peft.Prompt),
    "selective": (peft.SelectiveConfig(), peft.Tuned),
    "vera": (VeRAConfig(rank=8), VeRA),
    "loha": (LoHaConfig(rank=2), LoHa),
}


# LoHa's forward is x @ ΔW with ΔW = (A1 B1) ⊙ (A2 B2) formed densely (as in Hugging Face PEFT), so its backward
# computes x^T dy of ΔW's shape for its own factors: the shape check cannot tell that from a base-weight gradient.
DENSE_DELTA = {"loha"}


def loss_fn(graphdef, trainable, frozen, blocks):
    model = nnx.merge(graphdef, trainable, frozen)
    logits = model(blocks[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, blocks[:, 1:]).mean()


def train(model, blocks, steps=8, lr=1e-2):
    graphdef, trainable, frozen = partition.split(model)
    opt = optax.adam(lr)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn, argnums=1)(graphdef, trainable, frozen, blocks)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    return losses


def _dots(jaxpr):
    """Every dot_general of a jaxpr and its sub-jaxprs (jit, remat, custom_vjp bodies): (output shape, contracted
    size)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            shape = eqn.invars[0].aval.shape
            yield tuple(eqn.outvars[0].aval.shape), math.prod(shape[d] for d in lhs_contract)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dots(inner)


def weight_gradient_products(graphdef, trainable, frozen, blocks, shapes) -> list[tuple]:
    """Products in the gradient computation that have a weight's shape and contract over more positions than any
    adapter rank here (8): the x^T dy of a weight gradient, not an adapter's low-rank product."""
    jaxpr = jax.make_jaxpr(jax.grad(loss_fn, argnums=1))(graphdef, trainable, frozen, blocks).jaxpr
    return [(shape, k) for shape, k in _dots(jaxpr) if shape in shapes and k > 8]


def frozen_weight_gradients(graphdef, trainable, frozen, blocks) -> list[tuple]:
    """Weight-gradient products for a frozen dense weight's shape (one no trainable leaf has)."""
    trained = {tuple(x.shape) for x in jax.tree.leaves(trainable)}
    shapes = {tuple(x.shape) for x in jax.tree.leaves(frozen)
              if x.ndim == 2 and jnp.issubdtype(x.dtype, jnp.floating)} - trained
    return weight_gradient_products(graphdef, trainable, frozen, blocks, shapes)


def test_the_frozen_gradient_check_sees_weight_gradients():
    """Under full fine-tuning the same search finds the MLP weights' gradient products: the check can fail."""
    model = peft.apply(tiny_model(num_layers=1), peft.FullConfig())
    mlp = model.layers[0].mlp
    shapes = {tuple(mlp.up_proj.weight.shape), tuple(mlp.down_proj.weight.shape)}
    found = weight_gradient_products(*partition.split(model), random_blocks(2, 17, seed=1), shapes)
    assert {shape for shape, _ in found} == shapes and {k for _, k in found} == {32}  # 2 x 16 positions


def check_method(name, base):
    config, var_type = METHODS[name]
    model = peft.apply(base, config)
    graphdef, trainable, frozen = partition.split(model)
    flat = nnx.to_flat_state(trainable)
    assert flat and all(isinstance(v, var_type) for _, v in flat)
    assert not any(isinstance(v, Trainable) for _, v in nnx.to_flat_state(frozen))
    blocks = random_blocks(2, 17, seed=1)
    grad_fn = jax.grad(loss_fn, argnums=1)
    assert jax.tree.structure(grad_fn(graphdef, trainable, frozen, blocks)) == jax.tree.structure(trainable)
    if name not in DENSE_DELTA:
        assert not frozen_weight_gradients(graphdef, trainable, frozen, blocks)
    losses = train(model, blocks)
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_only_its_parameters(name):
    check_method(name, tiny_model(num_layers=1))


def test_loftq_quantizes_the_base_and_trains():
    model = peft.apply(tiny_model(num_layers=1), peft.LoRAConfig(rank=4, init="loftq"))
    assert isinstance(model.layers[0].self_attn.q_proj.base.weight, peft.Quantized)
    losses = train(model, random_blocks(2, 17, seed=1))
    assert losses[-1] < losses[0] - 1e-3


def test_lora_dropout_inside_a_jitted_step_uses_the_step_key():
    model = peft.apply(tiny_model(num_layers=1), peft.LoRAConfig(rank=4, dropout=0.3))
    graphdef, trainable, frozen = partition.split(model)
    trainable = jax.tree.map(lambda x: x + 0.1, trainable)
    blocks = random_blocks(2, 9, seed=1)

    @jax.jit
    def loss_with_key(trainable, key):
        model = nnx.merge(graphdef, trainable, frozen)
        logits = model(blocks[:, :-1], dropout_key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, blocks[:, 1:]).mean()

    a, b = loss_with_key(trainable, jax.random.key(0)), loss_with_key(trainable, jax.random.key(1))
    assert float(a) != float(b)
    assert float(a) == float(loss_with_key(trainable, jax.random.key(0)))
    grads = jax.grad(loss_with_key)(trainable, jax.random.key(0))
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_on_quantized_base(name):
    """Every method on an NF4 base: only its parameters get gradients, and it trains."""
    check_method(name, quantize_model(tiny_model(num_layers=1), [QuantRule(format="nf4", block_size=64)]))
