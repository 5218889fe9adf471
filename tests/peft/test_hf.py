"""HF PEFT adapters in and out: the fixture adapter's logits, exact round trips, merged model export, errors."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from peftjax.errors import PeftjaxError
from peftjax.peft import LoRAConfig, apply, disable_adapters
from peftjax.peft.hf import load_hf_adapter, save_hf_adapter, save_hf_model
from peftjax.data import random_blocks
from peftjax.models import tiny_model


@pytest.mark.slow
def test_fixture_adapter_matches_hf_peft_logits(fixture_path):
    from peftjax.models import from_pretrained

    adapter_dir = fixture_path("peft_lora_adapter")
    expected = json.loads((adapter_dir / "expected.json").read_text())
    model, _ = from_pretrained("smollm2")
    adapted = load_hf_adapter(model, adapter_dir)
    ids = jnp.asarray([expected["ids"]])
    with_adapter = np.asarray(adapted(ids)[0, -1])
    assert np.abs(with_adapter - np.asarray(expected["logits_with_adapter"], np.float32)).max() < 1e-3
    with disable_adapters(adapted):
        without = np.asarray(adapted(ids)[0, -1])
    assert np.abs(without - np.asarray(expected["logits_without_adapter"], np.float32)).max() < 1e-3


def _tiny_adapter_dir(tmp_path):
    """A tiny-model LoRA with the reference adapter's settings (r=4, alpha=8, q/v), saved in PEFT's format."""
    model = apply(tiny_model(), LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    for layer in [model.layers[i].self_attn.q_proj for i in range(2)] + [model.layers[1].self_attn.v_proj]:
        layer.lora_b.set_value(np.random.default_rng(0).normal(0, 0.02, layer.lora_b.shape).astype(np.float32))
    return model, save_hf_adapter(model, tmp_path / "adapter")


def test_round_trip_hf_to_peftjax_to_hf_is_exact(tmp_path):
    model, first = _tiny_adapter_dir(tmp_path)
    loaded = load_hf_adapter(tiny_model(), first)
    ids = random_blocks(1, 7)
    np.testing.assert_array_equal(loaded(ids), model(ids))
    second = save_hf_adapter(loaded, tmp_path / "again")
    a, b = load_file(str(first / "adapter_model.safetensors")), load_file(str(second / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # (r, d_in)
    assert json.loads((second / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]


def test_adapter_for_another_base_names_tensor_and_shapes(tmp_path):
    _, directory = _tiny_adapter_dir(tmp_path)
    with pytest.raises(PeftjaxError, match=r"q_proj\.lora_A\.weight has shape \(4, 64\), this model needs \(4, 32\)"):
        load_hf_adapter(tiny_model(hidden_size=32, head_dim=8), directory)


def test_unsupported_type_and_missing_file(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BOFT"}))
    with pytest.raises(PeftjaxError, match="'BOFT' is not supported; supported types: .*LORA"):
        load_hf_adapter(tiny_model(), tmp_path)
    with pytest.raises(PeftjaxError, match="adapter_config.json not found"):
        load_hf_adapter(tiny_model(), tmp_path / "nothing")


def test_save_refuses_non_empty_output_and_writes_nothing_on_error(tmp_path):
    model, _ = _tiny_adapter_dir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(PeftjaxError, match="exists and is not empty"):
        save_hf_adapter(model, out)
    with pytest.raises(PeftjaxError, match="no adapters to save; HF PEFT export supports .*LORA"):
        save_hf_adapter(tiny_model(), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merged_hf_export_loads_back_with_the_same_logits(tmp_path):
    from peftjax.models import from_pretrained
    from peftjax.models.tokenizer import byte_tokenizer
    from peftjax.quant.policy import QuantRule, quantize_model

    model, _ = _tiny_adapter_dir(tmp_path)
    quantized = apply(quantize_model(tiny_model(), [QuantRule(format="nf4")]), LoRAConfig(rank=2))
    for m in (model, quantized):
        out = save_hf_model(m, tmp_path / f"merged{id(m)}")
        byte_tokenizer().backend.save(str(out / "tokenizer.json"))
        loaded, _ = from_pretrained(out)
        ids = random_blocks(1, 9)
        np.testing.assert_allclose(loaded(ids), m(ids), atol=2e-5, rtol=1e-5)
