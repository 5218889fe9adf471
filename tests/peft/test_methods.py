"""Closed forms, identity at initialisation and bad input for every method (LoRA basics are in test_peft_lora.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import partition, peft
from peftjax.errors import PeftjaxError
from peftjax.peft.vera import VeRAConfig, VeRALinear
from peftjax.quant.policy import dequantize_kernel, fake_quant_kernel, quantize_kernel
from peftjax.data import random_blocks
from peftjax.models import tiny_model


@pytest.mark.parametrize("config", [peft.LoRAConfig(rank=4, dora=True), peft.LoRAConfig(rank=4, init="gaussian"),
                                    peft.IA3Config(), peft.SelectiveConfig(), VeRAConfig(rank=4)],
                         ids=["dora", "gaussian", "ia3", "selective", "vera"])
def test_identity_initialised_adapters_leave_output_unchanged(config):
    base, ids = tiny_model(), random_blocks(2, 9)
    np.testing.assert_allclose(peft.apply(base, config)(ids), base(ids), rtol=1e-6, atol=1e-6)


def test_dora_closed_form(randomise):
    model = randomise(peft.apply(tiny_model(), peft.LoRAConfig(rank=4, alpha=8.0, dora=True, targets="q_proj")),
                      peft.LoRA)
    layer = model.layers[0].self_attn.q_proj
    x = jax.random.normal(jax.random.key(0), (5, layer.d_in))
    W, A, B, m = layer.base.weight[...], layer.lora_a[...], layer.lora_b[...], layer.magnitude[...]
    V = W + 2.0 * A @ B
    expected = (x @ V) * (m / np.linalg.norm(V, axis=0))[None, :]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lora_dropout_masks_the_adapter_input_only_while_a_key_is_set(randomise):
    model = randomise(peft.apply(tiny_model(), peft.LoRAConfig(rank=4, alpha=8.0, dropout=0.5, targets="q_proj")),
                      peft.LoRA)
    layer = model.layers[0].self_attn.q_proj
    x = jax.random.normal(jax.random.key(0), (5, layer.d_in))
    W, A, B = layer.base.weight[...], layer.lora_a[...], layer.lora_b[...]
    np.testing.assert_allclose(layer(x), x @ W + 2.0 * x @ A @ B, rtol=1e-5, atol=1e-5)  # no key: deterministic
    key = jax.random.key(7)
    keep = jax.random.bernoulli(key, 0.5, x.shape)
    np.testing.assert_allclose(layer(x, key), x @ W + 2.0 * jnp.where(keep, 2 * x, 0) @ A @ B, rtol=1e-5, atol=1e-5)
    assert 0.3 < float(keep.mean()) < 0.7
    with pytest.raises(PeftjaxError, match=r"LoRA dropout must be in \[0, 1\), got 1.0"):
        peft.LoRAConfig(dropout=1.0)


def test_qat_lora_dropout_leaves_the_frozen_base_path_unmasked():
    """With B = 0 the adapter contributes nothing, so dropout must not move the output (it once masked the base)."""
    model = peft.apply(tiny_model(), peft.LoRAConfig(rank=4, dropout=0.5, qat_format="int8", targets="q_proj"))
    layer = model.layers[0].self_attn.q_proj
    x = jax.random.normal(jax.random.key(0), (6, layer.d_in))
    np.testing.assert_array_equal(layer(x, jax.random.key(3)), layer(x))
    layer.lora_b.set_value(jax.random.normal(jax.random.key(1), layer.lora_b.shape))  # the adapter path is masked
    W = fake_quant_kernel(layer.base.weight[...] + layer.delta_weight(), "int8", block_size=64)
    keep = jax.random.bernoulli(jax.random.key(3), 0.5, x.shape)
    delta = lambda z: layer.scale * z @ layer.lora_a[...] @ layer.lora_b[...]  # noqa: E731
    expected = x @ W + delta(jnp.where(keep, 2 * x, 0)) - delta(x)
    np.testing.assert_allclose(layer(x, jax.random.key(3)), expected, rtol=1e-4, atol=1e-5)


def test_qat_composes_with_dora(randomise):
    """QAT + DoRA trains against fake_quant of DoRA's merged weight m * V / ||V||."""
    model = randomise(peft.apply(tiny_model(), peft.LoRAConfig(rank=4, dora=True, qat_format="nf4",
                                                              targets="v_proj")), peft.LoRA)
    layer = model.layers[1].self_attn.v_proj
    x = jax.random.normal(jax.random.key(2), (5, layer.d_in))
    V = layer.base.weight[...] + layer.delta_weight()
    merged = V * (layer.magnitude[...] / jnp.linalg.norm(V, axis=0))[None, :]
    np.testing.assert_allclose(layer(x), x @ fake_quant_kernel(merged, "nf4", block_size=64), rtol=1e-4, atol=1e-5)


def test_pissa_factors_are_top_singular_directions_and_residual_keeps_w():
    base = tiny_model()
    model = peft.apply(base, peft.LoRAConfig(rank=4, alpha=8.0, init="pissa", targets="o_proj"))
    layer, W = model.layers[0].self_attn.o_proj, base.layers[0].self_attn.o_proj.weight[...]
    update = layer.scale * layer.lora_a[...] @ layer.lora_b[...]
    u, s, vt = np.linalg.svd(np.asarray(W), full_matrices=False)
    np.testing.assert_allclose(update, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
    np.testing.assert_allclose(layer.base.weight[...] + update, W, atol=1e-6)


def test_loftq_beats_plain_quantization():
    W = tiny_model().layers[0].mlp.up_proj.weight[...]
    plain = float(jnp.linalg.norm(W - dequantize_kernel(quantize_kernel(W, "nf4", block_size=64), jnp.float32)))
    model = peft.apply(tiny_model(), peft.LoRAConfig(rank=8, init="loftq", loftq_iters=3, targets="up_proj"))
    layer = model.layers[0].mlp.up_proj
    approx = layer.base.kernel(jnp.float32) + layer.delta_weight()
    assert float(jnp.linalg.norm(W - approx)) < 0.8 * plain


def test_loftq_needs_full_precision_base():
    from peftjax.quant.policy import QuantRule, quantize_model

    with pytest.raises(PeftjaxError, match="LoftQ needs the full-precision base"):
        peft.apply(quantize_model(tiny_model(), [QuantRule()]), peft.LoRAConfig(init="loftq"))


def test_rank_and_alpha_patterns_and_layers_to_transform():
    config = peft.LoRAConfig(rank=4, alpha=8.0, rank_pattern={"q_proj": 2}, alpha_pattern=(("v_proj", 1.0),),
                             targets=("q_proj", "v_proj", "k_proj"), layers_to_transform=(1,))
    model = peft.apply(tiny_model(), config)
    assert not isinstance(model.layers[0].self_attn.q_proj, peft.LoRALinear)
    attn = model.layers[1].self_attn
    assert (attn.q_proj.rank, attn.q_proj.scale) == (2, 4.0)
    assert (attn.v_proj.rank, attn.v_proj.scale) == (4, 0.25)
    assert (attn.k_proj.rank, attn.k_proj.scale) == (4, 2.0)


def test_ia3_closed_form(randomise):
    model = randomise(peft.apply(tiny_model(), peft.IA3Config()), peft.IA3)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    x = jax.random.normal(jax.random.key(0), (3, attn.k_proj.d_in))
    np.testing.assert_allclose(attn.k_proj(x), (x @ attn.k_proj.base.weight[...]) * attn.k_proj.ia3[...][None, :],
                               rtol=1e-5, atol=1e-6)
    h = jax.random.normal(jax.random.key(1), (3, mlp.down_proj.d_in))
    np.testing.assert_allclose(mlp.down_proj(h), (h * mlp.down_proj.ia3[...][None, :]) @ mlp.down_proj.base.weight[...],
                               rtol=1e-5, atol=1e-6)
    assert not isinstance(mlp.up_proj, peft.IA3Linear)


def reference_attention(q, k, v, prefix_k, prefix_v):
    """numpy softmax attention of (T, N, H) queries over [prefix; causal sequence] with grouped kv heads."""
    T, N, H = q.shape
    G = N // k.shape[1]
    out = np.zeros_like(q)
    for n in range(N):
        keys = np.concatenate([prefix_k[:, n // G], k[:, n // G]])
        vals = np.concatenate([prefix_v[:, n // G], v[:, n // G]])
        L = prefix_k.shape[0]
        for t in range(T):
            s = keys[: L + t + 1] @ q[t, n] / np.sqrt(H)
            p = np.exp(s - s.max())
            out[t, n] = (p / p.sum()) @ vals[: L + t + 1]
    return out


def test_prefix_closed_form():
    from peftjax.models.llama import apply_rope, rope_cos_sin

    model = peft.apply(tiny_model(), peft.PrefixConfig(num_tokens=3))
    attn, T = model.layers[0].self_attn, 5
    x = jax.random.normal(jax.random.key(0), (T, 64))
    cos, sin = rope_cos_sin(jnp.arange(T)[None], attn.head_dim, 10000.0)
    out, _ = attn(x, (1, T), cos, sin)
    q = apply_rope((x @ attn.q_proj.weight[...]).reshape(1, T, attn.num_heads, -1), cos, sin)[0]
    k = apply_rope((x @ attn.k_proj.weight[...]).reshape(1, T, attn.num_kv_heads, -1), cos, sin)[0]
    v = (x @ attn.v_proj.weight[...]).reshape(T, attn.num_kv_heads, -1)
    pk, pv = attn.prefix()
    ref = reference_attention(*(np.asarray(a) for a in (q, k, v, pk, pv)))
    np.testing.assert_allclose(out, ref.reshape(T, -1) @ attn.o_proj.weight[...], rtol=1e-4, atol=1e-5)


def test_prefix_reparameterisation_folds_away():
    model = peft.apply(tiny_model(), peft.PrefixConfig(num_tokens=3, reparameterize=True, hidden=8))
    prefix = model.layers[1].self_attn.prefix
    np.testing.assert_allclose(prefix.prefix_kv(),
                               jnp.tanh(prefix.embedding[...] @ prefix.w1[...]) @ prefix.w2[...], rtol=1e-6)
    folded = peft.fold_prefix(model)
    ids = random_blocks(2, 7)
    np.testing.assert_allclose(folded(ids), model(ids), rtol=1e-5, atol=1e-5)
    _, trainable, _ = partition.split(folded)
    assert partition.param_count(trainable) == 2 * 3 * 2 * 2 * 16  # layers x L x (k, v) x kv heads x head_dim


def test_prompt_from_text_equals_prepending_the_text():
    base, text, ids = tiny_model(), [5, 17, 42, 99], random_blocks(2, 6)
    model = peft.apply(base, peft.PromptConfig(num_tokens=4, init_ids=tuple(text)))
    full = base(jnp.concatenate([jnp.broadcast_to(jnp.asarray(text), (2, 4)), ids], axis=1))
    np.testing.assert_allclose(model(ids), full[:, 4:], rtol=1e-5, atol=1e-5)
    # repeated to N when the text is shorter
    longer = peft.apply(base, peft.PromptConfig(num_tokens=6, init_ids=(5, 17)))
    np.testing.assert_allclose(longer.prompt.embeddings[...], base.embed_tokens.weight[...][jnp.array([5, 17] * 3)])


def test_selective_trains_only_matching_parameters():
    model = peft.apply(tiny_model(), peft.SelectiveConfig())
    _, trainable, _ = partition.split(model)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    assert paths == ["layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
                     "layers.1.input_layernorm.weight", "layers.1.post_attention_layernorm.weight", "norm.weight"]


def test_selective_all_linear_means_linear_weights_only():
    model = peft.apply(tiny_model(), peft.SelectiveConfig(targets="all-linear"))
    _, trainable, _ = partition.split(model)
    paths = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    assert len(paths) == 2 * 7 and all(p.endswith("_proj.weight") for p in paths)


def test_vera_closed_form(randomise):
    model = randomise(peft.apply(tiny_model(), VeRAConfig(rank=4, targets=("q_proj", "up_proj"))), peft.Adapter)
    q, up = model.layers[0].self_attn.q_proj, model.layers[1].mlp.up_proj
    assert isinstance(q, VeRALinear)
    np.testing.assert_array_equal(q.vera_A[...], up.vera_A[...][: q.d_in])  # shared random projections
    x = jax.random.normal(jax.random.key(0), (3, q.d_in))
    dx = (x @ q.vera_A[...]) * q.vera_d[...][None]
    expected = x @ q.base.weight[...] + (dx @ q.vera_B[...]) * q.vera_b[...][None]
    np.testing.assert_allclose(q(x), expected, rtol=1e-5, atol=1e-6)
    _, trainable, _ = partition.split(model)
    assert partition.param_count(trainable) == 2 * (2 * 4 + 64 + 128)  # per layer: d (r) and b (d_out) x 2 kinds


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [peft.IA3Config(targets="qkv"), VeRAConfig(targets="qkv"),
                                    peft.PrefixConfig(targets="cross_attn"),
                                    peft.SelectiveConfig(targets="bias")], ids=["ia3", "vera", "prefix", "selective"])
def test_rule_matching_nothing_lists_paths(config):
    with pytest.raises(PeftjaxError, match=r"matches no module; available paths: .*layers\.0\."):
        peft.apply(tiny_model(), config)


def test_rank_above_layer_dimensions():
    with pytest.raises(PeftjaxError, match="VeRA rank 65 does not fit"):
        peft.apply(tiny_model(), VeRAConfig(rank=65))
    with pytest.raises(PeftjaxError, match="rank 40 does not fit layers.0.self_attn.k_proj"):
        peft.apply(tiny_model(), peft.LoRAConfig(rank=8, rank_pattern={"k_proj": 40}))


def test_prefix_and_prompt_lengths_that_overflow_the_context():
    with pytest.raises(PeftjaxError, match="prefix num_tokens 256 must be in 1..255"):
        peft.apply(tiny_model(), peft.PrefixConfig(num_tokens=256))
    with pytest.raises(PeftjaxError, match="prompt num_tokens 300 must be in 1..255"):
        peft.apply(tiny_model(), peft.PromptConfig(num_tokens=300))
    model = peft.apply(tiny_model(), peft.PromptConfig(num_tokens=250))
    with pytest.raises(PeftjaxError, match="250 virtual prompt tokens \\+ 10 input tokens exceed the context of 256"):
        model(random_blocks(1, 10))


def test_bad_lora_options():
    with pytest.raises(PeftjaxError, match="unknown LoRA init 'svd'; choose one of default, gaussian, pissa, olora, loftq"):
        peft.apply(tiny_model(), peft.LoRAConfig(init="svd"))
    with pytest.raises(PeftjaxError, match=r"layers_to_transform \[7\] selects no layer; the model has layers 0..1"):
        peft.apply(tiny_model(), peft.LoRAConfig(layers_to_transform=(7,)))
