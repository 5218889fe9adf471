"""LoRA: closed form, zero-initialised identity, gradients only for the adapter, surgery errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import partition, peft
from peftjax.errors import PeftjaxError
from peftjax.peft import LoRAConfig, LoRALinear
from peftjax.variables import LoRA
from peftjax.train import lm_loss
from peftjax.data import random_blocks
from peftjax.models import Linear, tiny_model


def test_lora_closed_form():
    model = peft.apply(tiny_model(), LoRAConfig(rank=4, alpha=8.0, targets=("q_proj",)))
    layer = model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    key_b, key_x = jax.random.split(jax.random.key(1))
    layer.lora_b.set_value(jax.random.normal(key_b, layer.lora_b.shape))
    x = jax.random.normal(key_x, (5, layer.d_in))
    W, A, B = layer.base.weight[...], layer.lora_a[...], layer.lora_b[...]
    expected = x @ W + (8.0 / 4) * (x @ A @ B)  # y = W x + (alpha/r) B A x, in row-vector form
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_scale():
    model = peft.apply(tiny_model(), LoRAConfig(rank=4, alpha=8.0, rslora=True, targets=("v_proj",)))
    assert model.layers[1].self_attn.v_proj.scale == pytest.approx(8.0 / 2.0)


def test_zero_initialised_adapter_leaves_output_unchanged():
    base = tiny_model()
    ids = random_blocks(2, 9)
    adapted = peft.apply(base, LoRAConfig(rank=8))
    np.testing.assert_array_equal(base(ids), adapted(ids))


def test_apply_returns_new_model_and_leaves_base_alone():
    base = tiny_model()
    adapted = peft.apply(base, LoRAConfig(rank=2))
    assert not isinstance(base.layers[0].mlp.up_proj, LoRALinear)
    assert isinstance(adapted.layers[0].mlp.up_proj, LoRALinear)


def test_all_linear_targets_every_projection():
    model = peft.apply(tiny_model(), LoRAConfig(rank=2))
    _, trainable, _ = partition.split(model)
    paths = {".".join(map(str, p[:-1])) for p, _ in nnx.to_flat_state(trainable)}
    assert len(paths) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)



def test_a_50x50_rank_2_layer_trains_8_percent_of_its_weights():
    """LoRA's parameter cut on a real layer: r (d_in + d_out) = 200 trainable against d_in d_out = 2500 frozen."""
    from peftjax.models import Linear

    layer = Linear(50, 50, rngs=nnx.Rngs(0))
    totals = peft.summary(LoRALinear(layer, rank=2, alpha=4.0, rslora=False, key=jax.random.key(0)),
                          print_fn=lambda _: None)
    assert totals["trainable"] == 200 and totals["base"] == 2500 and totals["percent_cut"] == pytest.approx(92.0)


def test_gradients_only_for_trainable_tree():
    model = peft.apply(tiny_model(), LoRAConfig(rank=4))
    graphdef, trainable, frozen = partition.split(model)
    assert all(isinstance(v, LoRA) for _, v in nnx.to_flat_state(trainable))
    assert not any(isinstance(v, LoRA) for _, v in nnx.to_flat_state(frozen))
    blocks = random_blocks(2, 9)
    grads = jax.grad(lm_loss, argnums=1)(graphdef, trainable, frozen, blocks)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    # B starts at zero, so only dL/dB is non-zero on the first step; A's gradient is exactly zero
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
    assert all(float(jnp.abs(g).max()) > 0 for k, g in flat.items() if k.endswith("lora_b"))
    assert all(float(jnp.abs(g).max()) == 0 for k, g in flat.items() if k.endswith("lora_a"))


def test_rule_matching_nothing_lists_paths():
    with pytest.raises(PeftjaxError, match=r"matches no module; available paths: layers\.0\."):
        peft.apply(tiny_model(), LoRAConfig(targets=("qkv_proj",)))


def test_rank_larger_than_layer_allows():
    with pytest.raises(PeftjaxError, match=r"rank 100 does not fit layers\.0\."):
        peft.apply(tiny_model(), LoRAConfig(rank=100))


def test_unknown_method_lists_registered():
    with pytest.raises(PeftjaxError, match="registered methods: adalora, full, ia3, loha, lokr, lora, oft, prefix, "
                                           "prompt, qalora, selective, vera"):
        peft.get_method("lorax")


def test_full_fine_tuning_trains_every_parameter():
    base = tiny_model()
    model = peft.apply(base, peft.FullConfig())
    _, trainable, frozen = partition.split(model)
    assert partition.param_count(trainable) == partition.param_count(nnx.state(base))
    assert jax.tree.leaves(frozen) == []


def test_olora_init_equals_hf_peft(tmp_path):
    """init="olora" against the live peft on the same tiny Llama: the same factors (QR of torch's (d_out, d_in)
    weight, A = R_r, B = Q_r), the same residual base weights, and an unchanged model."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch, peft, transformers) is not installed")
    transformers, peft_hf = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from peftjax.peft.hf import save_hf_model

    base = tiny_model(seed=1)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(save_hf_model(base, tmp_path / "base"),
                                                                dtype=torch.float32)
    hf = peft_hf.get_peft_model(hf_base, peft_hf.LoraConfig(r=4, lora_alpha=8, init_lora_weights="olora",
                                                            target_modules=["q_proj", "down_proj"]))
    ours = peft.apply(base, LoRAConfig(rank=4, alpha=8.0, init="olora", targets=("q_proj", "down_proj")))
    hf_layers = dict(hf.named_modules())
    diffs = []
    for path, layer in nnx.iter_modules(ours):
        if isinstance(layer, LoRALinear):
            theirs = hf_layers["base_model.model.model." + ".".join(map(str, path))]
            for mine, hf_value in ((layer.lora_a, theirs.lora_A["default"].weight),
                                   (layer.lora_b, theirs.lora_B["default"].weight),
                                   (layer.base.weight, theirs.base_layer.weight)):
                diffs.append(float(np.abs(np.asarray(mine[...]) - hf_value.detach().numpy().T).max()))
    assert len(diffs) == 12 and max(diffs) < 1e-5, diffs
    ids = random_blocks(2, 9)
    np.testing.assert_allclose(np.asarray(ours(ids)), np.asarray(base(ids)), atol=1e-5)


def test_lora_plus_gives_b_its_own_learning_rate():
    """LoRA+ (B's rate lambda times A's): Adam's first update is linear in the rate, so with
    group_learning_rates {lorab: 16 lr} B moves exactly 16x as far as with lr alone, and A as with lr."""
    from peftjax.config.schema import TrainConfig
    from peftjax.train import make_optimizer

    model = peft.apply(tiny_model(), LoRAConfig(rank=2, targets="q_proj"))
    _, trainable, _ = partition.split(model)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), trainable)

    def first_update(groups):
        tc = TrainConfig(learning_rate=1e-3, schedule="constant", grad_clip=None, group_learning_rates=groups)
        opt = make_optimizer(tc)
        updates, _ = opt.update(grads, opt.init(trainable), trainable)
        layer = updates["layers"][0]["self_attn"]["q_proj"]
        return np.asarray(layer["lora_a"][...]), np.asarray(layer["lora_b"][...])

    a_plain, b_plain = first_update({"lora": 1e-3})
    a_plus, b_plus = first_update({"lorab": 16e-3})
    np.testing.assert_allclose(a_plus, a_plain, rtol=1e-6)
    np.testing.assert_allclose(b_plus, 16 * b_plain, rtol=1e-6)
    assert float(np.abs(b_plain).max()) > 0


def test_lora_fa_freezes_a_and_trains_from_yaml(tiny_args, tmp_path, play_files):
    import json

    from peftjax.cli import main

    model = peft.apply(tiny_model(), LoRAConfig(rank=2, targets="q_proj", freeze_a=True))
    _, trainable, frozen = partition.split(model)
    layer = lambda tree: tree["layers"][0]["self_attn"]["q_proj"]  # noqa: E731
    assert "lora_a" not in layer(trainable) and "lora_a" in layer(frozen) and "lora_b" in layer(trainable)
    config = tmp_path / "fa.yaml"
    config.write_text("name: lora-fa\npeft: {method: lora, rank: 2, freeze_a: true}\n"
                      "train: {steps: 3, learning_rate: 0.01}\n"
                      f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), *tiny_args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    b_only = sum(lin.d_out * 2 for lin in peft.modules_of_type(tiny_model(), Linear).values())  # B: (2, d_out)
    assert summary["trainable_params"] == b_only
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
