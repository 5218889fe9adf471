"""Every supported Hugging Face decoder family against the live transformers: a tiny random-weight model built at
test time, saved in bfloat16 with ``save_pretrained``, loaded by peftjax and by transformers (float32 compute):
logits at every position agree within 1e-4. Sliding windows shorter than the sequence, untied heads, biases,
q/k norms, soft-capping and RoPE scaling are all switched on somewhere, so each switch is exercised."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.errors import PeftjaxError
from peftjax.models import from_pretrained
from peftjax.models.tokenizer import byte_tokenizer

torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
T = 24  # longer than every sliding window below

FAMILIES = {
    "llama-untied-llama3-rope": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                  rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "llama-yarn": ("LlamaConfig", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                            original_max_position_embeddings=16))),
    "llama-linear": ("LlamaConfig", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral": ("MistralConfig", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(sliding_window=8, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                                    attn_logit_softcapping=2.0)),
    "gemma3": ("Gemma3TextConfig", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                                         "sliding_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                                                rope_theta=100000.0),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=1000.0)})),
}


def _save(tmp_path_factory, name):
    cls, extra = FAMILIES[name]
    config = getattr(transformers, cls)(**SHAPE, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # Gemma's norms start at zero and HF's biases too: random values exercise them
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    model.to(torch.bfloat16).save_pretrained(path)
    byte_tokenizer().backend.save(str(path / "tokenizer.json"))  # a model directory comes with its tokenizer
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return {name: _save(tmp_path_factory, name) for name in FAMILIES}


def _reference_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_equal_transformers(saved, name):
    path = saved[name]
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    ids = np.random.default_rng(1).integers(0, SHAPE["vocab_size"], (2, T))
    model, _ = from_pretrained(path)
    ours = np.asarray(model(jnp.asarray(ids)))
    ref = _reference_logits(path, ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 0.1  # the models compute something


def test_rope_frequencies_equal_transformers():
    """Every scaling type's inverse frequencies and attention factor against transformers' own functions, dynamic
    NTK both inside and past the trained context."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from peftjax.models.families import config_from_hf
    from peftjax.models.rope import inverse_frequencies

    cases = [dict(rope_type="linear", factor=4.0), dict(rope_type="dynamic", factor=2.0),
             dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=32),
             dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32),
             dict(rope_type="yarn", factor=8.0, beta_fast=16.0, mscale=0.7, mscale_all_dim=1.0)]
    for params in cases:
        cfg = transformers.LlamaConfig(**SHAPE, rope_parameters=dict(params, rope_theta=10000.0))
        ours = config_from_hf(cfg.to_dict())
        for seq_len in (None, 40, 200):
            ref, ref_attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)
            inv, attention = inverse_frequencies(ours.rope_theta, ours.rope_scaling, ours.head_dim,
                                                 ours.max_position, seq_len or ours.max_position)
            np.testing.assert_allclose(np.asarray(inv), ref.numpy(), rtol=1e-6, err_msg=str(params))
            assert attention == pytest.approx(ref_attention, rel=1e-6)


@pytest.mark.parametrize("edit, message", [
    ({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}, "model_type 'falcon'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "RoPE scaling type 'longrope'"),
    ({"attention_dropout": 0.1}, "attention_dropout 0.1 is not supported"),
    ({"hidden_act": "relu"}, "activation 'relu' is not supported"),
])
def test_unsupported_settings_are_one_line_errors(saved, tmp_path, edit, message):
    import shutil

    path = tmp_path / "m"
    shutil.copytree(saved["qwen3"], path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(PeftjaxError, match=message):
        from_pretrained(path)


@pytest.mark.parametrize("name", ["llama-untied-llama3-rope", "qwen2", "gemma2"])
def test_hf_peft_adapter_imports_and_merged_export_loads_back(saved, tmp_path, name):
    """An HF PEFT LoRA adapter trained on the family (random B) gives HF PEFT's logits in peftjax; the merged export
    (``peftjax export --format hf``) gives them again in transformers."""
    from peft import LoraConfig, get_peft_model

    from peftjax.peft.hf import load_hf_adapter, save_hf_model

    path = saved[name]
    ids = np.random.default_rng(2).integers(0, SHAPE["vocab_size"], (2, T))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                attn_implementation="eager")
    torch.manual_seed(3)
    hf = get_peft_model(hf_base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.05 * torch.randn_like(p))
        ref = hf(torch.as_tensor(ids)).logits.numpy()
    hf.save_pretrained(tmp_path / "adapter")

    model = load_hf_adapter(from_pretrained(path)[0], tmp_path / "adapter")
    ours = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

    merged = save_hf_model(model, tmp_path / "merged")
    np.testing.assert_allclose(_reference_logits(merged, ids), ref, atol=1e-4, rtol=0)


def test_qlora_trains_on_a_gemma2_directory(saved, play_files):
    """The training path on a non-Llama family, from a run config: quantize on load (NF4 + DQ, the rest bfloat16),
    LoRA on every linear layer, Gemma 2's soft-capped loss; three steps with finite, falling losses."""
    from peftjax import partition
    from peftjax.config import from_dict
    from peftjax.train import build, make_optimizer, make_train_step

    config = from_dict({"preset": "qlora", "model": {"name": str(saved["gemma2"])},
                        "peft": {"method": "lora", "rank": 4, "targets": "all-linear"},
                        "data": {"dataset": "files", "files": [str(f) for f in play_files], "eval_docs": 1,
                                 "seq_len": 16},
                        "train": {"steps": 3, "batch_size": 2, "learning_rate": 0.05}})
    built = build(config)
    assert built.model.config.final_softcap == 3.0 and built.model.config.model_type == "gemma2"
    graphdef, trainable, frozen = partition.split(built.model)
    optimizer = make_optimizer(config.train)
    opt_state, step = optimizer.init(trainable), make_train_step(graphdef, optimizer)
    batch = jnp.asarray(built.data.train.tokens[:2])
    losses = []
    for _ in range(3):  # the same batch: the loss must fall
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
