"""Exports checked by the real Hugging Face stack: transformers loads the merged model, PEFT loads the adapter,
and both give peftjax's logits (torch, peft and transformers come from the `interop` extra)."""
import numpy as np
import pytest

from peftjax.peft import LoRAConfig, apply
from peftjax.peft.hf import save_hf_adapter, save_hf_model
from peftjax.quant.policy import QuantRule, quantize_model
from peftjax.data import random_blocks
from peftjax.models import tiny_model

torch = pytest.importorskip("torch", reason="the interop extra (torch, peft, transformers) is not installed")
transformers = pytest.importorskip("transformers")
peft_hf = pytest.importorskip("peft")


def _adapted(quantized: bool):
    base = tiny_model(seed=1)
    if quantized:
        base = quantize_model(base, [QuantRule(format="nf4")])
    model = apply(base, LoRAConfig(rank=4, alpha=8.0, targets="all-linear"))
    rng = np.random.default_rng(2)
    for path, layer in __import__("flax").nnx.iter_modules(model):
        if hasattr(layer, "lora_b"):
            layer.lora_b.set_value(rng.normal(0, 0.05, layer.lora_b.shape).astype(np.float32))
    return base, model


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize("quantized", [False, True])
def test_transformers_and_peft_reproduce_peftjax(tmp_path, quantized):
    base, model = _adapted(quantized)
    ids = random_blocks(2, 11)
    ours = np.asarray(model(ids))

    merged_dir = save_hf_model(model, tmp_path / "merged")  # adapters merged, NF4 dequantized
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(hf_merged, ids), ours, atol=1e-4, rtol=0)

    base_dir = save_hf_model(base, tmp_path / "base")  # the same base, dequantized
    adapter_dir = save_hf_adapter(model, tmp_path / "adapter")
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    hf_adapted = peft_hf.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    np.testing.assert_allclose(_torch_logits(hf_adapted, ids), ours, atol=1e-4, rtol=0)
