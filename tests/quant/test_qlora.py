"""QLoRA: linear layers quantized by policy (NF4, block 64, packed) under LoRA, trained end to end."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import partition, peft
from peftjax.errors import PeftjaxError
from peftjax.variables import LoRA, Quantized
from peftjax.quant import QArray, dequantize, get_format
from peftjax.quant.policy import QuantizedLinear, QuantRule, quantize_model, quantized_matmul
from peftjax.train import lm_loss, make_optimizer, make_train_step
from peftjax.config import from_dict
from peftjax.data import random_blocks
from peftjax.models import tiny_model


def test_policy_quantizes_linears_only_and_first_rule_wins():
    model = quantize_model(tiny_model(), [QuantRule(targets=("layers\\.0\\..*",), format="int8", block_size=None),
                                          QuantRule(targets="all-linear", format="nf4", block_size=64)])
    first, second = model.layers[0].mlp.up_proj, model.layers[1].mlp.up_proj
    assert isinstance(first, QuantizedLinear) and first.weight.get_value().fmt == "int8"
    assert isinstance(second, QuantizedLinear) and second.weight.get_value().fmt == "nf4"
    assert isinstance(model.embed_tokens.weight, nnx.Param)  # embeddings and norms stay in full precision
    assert isinstance(model.norm.weight, nnx.Param)


def test_nf4_storage_is_packed_two_codes_a_byte():
    base = tiny_model()
    model = quantize_model(base, [QuantRule(format="nf4", block_size=64)])
    q = model.layers[0].mlp.up_proj.weight.get_value()
    assert isinstance(q, QArray) and q.codes.dtype == jnp.uint8
    assert q.codes.size == base.layers[0].mlp.up_proj.weight.size // 2
    assert q.nbytes == q.codes.size + 4 * (q.size // 64)  # 4-bit codes + one float32 absmax per 64 weights
    w = base.layers[0].mlp.up_proj.weight[...].T  # stored (d_out, d_in): blocks along the input dimension
    err = jnp.abs(dequantize(q) - w).reshape(-1, 64).max(axis=1)
    table = np.sort(get_format("nf4").table)
    half_gap = np.diff(table).max() / 2  # nearest-code rounding error is at most half the widest gap (x absmax)
    bound = half_gap * jnp.abs(w).reshape(-1, 64).max(axis=1) * (1 + 1e-6)
    assert bool(jnp.all(err <= bound))


def test_quantized_matmul_gradient_matches_dense_dequantized():
    model = quantize_model(tiny_model(), [QuantRule(format="nf4")])
    q = model.layers[0].self_attn.o_proj.weight.get_value()
    x = jax.random.normal(jax.random.key(0), (3, q.shape[1]))  # q holds W^T, (d_out, d_in)
    g_custom = jax.grad(lambda x: jnp.sum(jnp.sin(quantized_matmul(x, q))))(x)
    g_dense = jax.grad(lambda x: jnp.sum(jnp.sin(x @ dequantize(q).T)))(x)
    np.testing.assert_allclose(g_custom, g_dense, rtol=1e-6, atol=1e-6)


def test_qlora_trains_only_adapters_and_loss_falls():
    model = peft.apply(quantize_model(tiny_model(), [QuantRule(format="nf4")]), peft.LoRAConfig(rank=4))
    graphdef, trainable, frozen = partition.split(model)
    assert all(isinstance(v, LoRA) for _, v in nnx.to_flat_state(trainable))
    assert sum(isinstance(v, Quantized) for _, v in nnx.to_flat_state(frozen)) == 14
    optimizer = make_optimizer(from_dict({"train": {"steps": 30, "learning_rate": 1e-2, "grad_clip": None}}).train)
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer)
    blocks = random_blocks(4, 17, seed=5)
    first = float(lm_loss(graphdef, trainable, frozen, blocks))
    for _ in range(30):
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, blocks)
    assert step._cache_size() == 1
    assert float(metrics["loss"]) < first - 0.5


def test_zero_adapter_on_quantized_base_equals_quantized_model():
    quantized = quantize_model(tiny_model(), [QuantRule(format="nf4")])
    ids = random_blocks(1, 8)
    np.testing.assert_array_equal(quantized(ids), peft.apply(quantized, peft.LoRAConfig(rank=2))(ids))


def test_nan_weights_are_named():
    model = tiny_model()
    model.layers[1].mlp.down_proj.weight.set_value(model.layers[1].mlp.down_proj.weight[...].at[0, 0].set(jnp.nan))
    with pytest.raises(PeftjaxError, match=r"layers\.1\.mlp\.down_proj"):
        quantize_model(model, [QuantRule(format="nf4")])
