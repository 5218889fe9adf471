"""Live interop with Hugging Face PEFT for every adapter type both sides have: an adapter made and saved by HF PEFT
loads here with HF's logits (import), and a peftjax adapter saved here loads in HF PEFT with peftjax's logits
(export), on a tiny Llama that transformers reads (torch, peft and transformers come from the `interop` extra)."""
import jax
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.data import random_blocks
from peftjax.models import tiny_model
from peftjax.peft.hf import load_hf_adapter, save_hf_adapter, save_hf_model

torch = pytest.importorskip("torch", reason="the interop extra (torch, peft, transformers) is not installed")
transformers = pytest.importorskip("transformers")
peft_hf = pytest.importorskip("peft")

TYPES = {
    "LORA (DoRA, rsLoRA)": lambda: peft_hf.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       use_dora=True, use_rslora=True),
    "IA3": lambda: peft_hf.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"]),
    "VERA": lambda: peft_hf.VeraConfig(r=4, target_modules=["q_proj", "down_proj"]),
    "LOHA": lambda: peft_hf.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "LOKR": lambda: peft_hf.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                       decompose_both=True),
    "OFT": lambda: peft_hf.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "OFT (exact Cayley, shared block)": lambda: peft_hf.OFTConfig(r=0, oft_block_size=16, target_modules=["o_proj"],
                                                                  use_cayley_neumann=False, block_share=True),
    "ADALORA": lambda: peft_hf.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                             target_modules=["q_proj", "v_proj", "down_proj"]),
    "PROMPT_TUNING": lambda: peft_hf.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "PREFIX_TUNING": lambda: peft_hf.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_hf_model(tiny_model(seed=1), tmp_path_factory.mktemp("interop") / "base")


def _hf_base(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def _hf_logits(model, ids):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    return logits[:, -ids.shape[1]:]  # prompt tuning returns its virtual positions too


def _perturb(model, seed):
    """Add noise to every adapter variable (on the host: no compilation), so each direction moves real values."""
    state = nnx.state(model, peft.Adapter)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    nnx.update(model, jax.tree.unflatten(treedef, [np.asarray(x) + rng.normal(0, 0.1, x.shape).astype(np.float32)
                                                   for x in leaves]))
    return model


@pytest.mark.parametrize("kind", list(TYPES))
def test_import_and_export_match_hf_peft_logits(base_dir, tmp_path, kind):
    ids = random_blocks(2, 7)
    hf = peft_hf.get_peft_model(_hf_base(base_dir), TYPES[kind]())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.requires_grad:  # the adapter's own parameters, moved off their (often identity) init
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    hf.eval().save_pretrained(tmp_path / "from_hf")
    imported = load_hf_adapter(tiny_model(seed=1), tmp_path / "from_hf")
    import_diff = float(np.abs(np.asarray(imported(ids)) - _hf_logits(hf, ids)).max())

    ours = _perturb(imported, seed=1)
    save_hf_adapter(ours, tmp_path / "from_peftjax")
    loaded = peft_hf.PeftModel.from_pretrained(_hf_base(base_dir), tmp_path / "from_peftjax").eval()
    export_diff = float(np.abs(_hf_logits(loaded, ids) - np.asarray(ours(ids))).max())
    change = float(np.abs(np.asarray(ours(ids)) - np.asarray(tiny_model(seed=1)(ids))).max())
    print(f"{kind}: import {import_diff:.1e}, export {export_diff:.1e} (adapter changes logits by {change:.2f})")
    assert import_diff < 1e-4 and export_diff < 1e-4
    assert change > 1e-2  # the adapter does something, so equal logits are not the base's


def test_named_adapters_export_one_hf_directory_each(base_dir, tmp_path, randomise):
    """A model with named adapters of several types (LoRA, DoRA of another rank, alpha and targets, IA3, LoHa) is
    one HF PEFT directory per adapter: HF PEFT loads the LoRA ones into one model, the others on their own, and each
    gives the logits of that adapter here."""
    model = peft.apply(tiny_model(seed=1), peft.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    model = peft.add_adapter(model, "two", peft.LoRAConfig(rank=2, alpha=6.0, targets=("v_proj", "down_proj"),
                                                           dora=True, seed=1))
    model = peft.add_adapter(model, "ia3", peft.IA3Config())
    model = peft.add_adapter(model, "loha", peft.make_config("loha", rank=2, targets=("k_proj", "up_proj")))
    model = randomise(model, peft.Adapter)
    out = peft.save_hf_adapters(model, tmp_path / "adapters")
    assert sorted(p.name for p in out.iterdir()) == ["default", "ia3", "loha", "two"]
    hf = peft_hf.PeftModel.from_pretrained(_hf_base(base_dir), out / "default", adapter_name="default")
    hf.load_adapter(out / "two", adapter_name="two")
    ids = random_blocks(2, 7)
    for name in ("default", "two", "ia3", "loha"):
        if name in ("default", "two"):
            hf.set_adapter(name)
            theirs = hf.eval()
        else:
            theirs = peft_hf.PeftModel.from_pretrained(_hf_base(base_dir), out / name).eval()
        peft.set_adapter(model, name)
        diff = float(np.abs(_hf_logits(theirs, ids) - np.asarray(model(ids))).max())
        print(f"named adapter {name}: max |logit diff| {diff:.1e}")
        assert diff < 1e-4
