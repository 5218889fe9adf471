"""Adapter arithmetic against the live Hugging Face PEFT: the same adapters (factors set identically on a tiny Llama
saved for transformers) combined by every ``add_weighted_adapter`` method give the same adapter and logits."""
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.models import tiny_model
from peftjax.peft.arithmetic import DELTAWISE, FACTORWISE, prunes
from peftjax.peft.hf import save_hf_model

torch = pytest.importorskip("torch", reason="the interop extra (torch, peft, transformers) is not installed")
transformers = pytest.importorskip("transformers")
peft_hf = pytest.importorskip("peft")

HF_PREFIX = "base_model.model.model."
# name: (rank, alpha, targets); "three" has another rank, so only cat and the svd methods take it
ADAPTERS = {"default": (4, 8.0, ("q_proj", "v_proj")), "two": (4, 16.0, ("v_proj", "down_proj")),
            "three": (6, 6.0, ("q_proj",))}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(peftjax model, HF PEFT model) carrying the same three adapters, factors drawn once and set on both sides."""
    base = tiny_model(seed=1)
    directory = save_hf_model(base, tmp_path_factory.mktemp("arith") / "base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours = base
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        config = peft_hf.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets))
        if i == 0:
            hf = peft_hf.get_peft_model(hf, config, adapter_name=name)
            ours = peft.apply(ours, peft.LoRAConfig(rank=r, alpha=alpha, targets=targets))
        else:
            hf.add_adapter(name, config)
            ours = peft.add_adapter(ours, name, peft.LoRAConfig(rank=r, alpha=alpha, targets=targets))
    rng = np.random.default_rng(0)
    layers = dict(nnx.iter_modules(ours))
    for path, module in hf.named_modules():
        if not hasattr(module, "lora_A") or not path.startswith(HF_PREFIX):
            continue
        ours_layer = layers[tuple(int(p) if p.isdigit() else p for p in path.removeprefix(HF_PREFIX).split("."))]
        for name in module.lora_A:
            a = rng.normal(0, 0.3, ours_layer.adapters[name].lora_a.shape).astype(np.float32)
            b = rng.normal(0, 0.3, ours_layer.adapters[name].lora_b.shape).astype(np.float32)
            ours_layer.adapters[name].lora_a.set_value(a)
            ours_layer.adapters[name].lora_b.set_value(b)
            module.lora_A[name].weight.data = torch.tensor(a.T.copy())
            module.lora_B[name].weight.data = torch.tensor(b.T.copy())
    return ours, hf


def _hf_deltas(hf, name):
    return {path.removeprefix(HF_PREFIX): module.get_delta_weight(name).detach().numpy().T
            for path, module in hf.named_modules()
            if path.startswith(HF_PREFIX) and hasattr(module, "lora_A") and name in module.lora_A}


def _recorded_masks(hf, calls, names, method):
    """HF's Bernoulli draws, in its order (layers as named_modules lists them; A then B, or the dense delta;
    adapters in the order given), keyed for peftjax and transposed to its (d_in, d_out) layout."""
    masks, calls = {}, iter(calls)
    parts = ("delta",) if method in DELTAWISE else ("lora_a", "lora_b")
    for path, module in hf.named_modules():
        if path.startswith(HF_PREFIX) and hasattr(module, "lora_A") and any(n in module.lora_A for n in names):
            for part in parts:
                for n in names:
                    if n in module.lora_A:
                        masks[(path.removeprefix(HF_PREFIX), n, part)] = next(calls).numpy().T.astype(bool)
    assert next(calls, None) is None
    return masks


# the other _svd forms compose the same merges (checked factor-wise here) with the same truncation
CASES = ([(m, ("default", "two"), (0.7, -1.3)) for m in FACTORWISE]
         + [(m, ("default", "two", "three"), (0.7, -1.3, 0.5)) for m in ("cat", "svd", "dare_ties_svd")])


@pytest.mark.parametrize("method,names,weights", CASES, ids=[c[0] for c in CASES])
def test_combination_equals_hf_peft_add_weighted_adapter(pair, monkeypatch, method, names, weights):
    ours, hf = pair
    new = f"mix_{method}"
    kw = {"density": 0.5} if prunes(method) else {}
    calls = []
    torch.manual_seed(0)
    draw = torch.bernoulli
    monkeypatch.setattr(torch, "bernoulli", lambda p: calls.append(draw(p)) or calls[-1])
    hf.add_weighted_adapter(list(names), list(weights), new, combination_type=method,
                            **kw, **({"majority_sign_method": "frequency"} if method == "dare_ties_svd" else {}))
    if method.startswith("dare"):
        kw["masks"] = _recorded_masks(hf, calls, names, method)
    if method == "dare_ties_svd":
        kw["majority_sign"] = "frequency"
    combined = peft.combine_adapters(ours, names, weights, new, method=method, **kw)

    expected = _hf_deltas(hf, new)
    layers = {p: m for p, m in nnx.iter_modules(combined) if isinstance(m, peft.NamedAdapterLinear)}
    got = {".".join(map(str, p)): np.asarray(m.adapters[new].delta_weight()) for p, m in layers.items()
           if new in m.adapters}
    assert sorted(got) == sorted(expected) and len(got) == 6  # q_proj, v_proj, down_proj of 2 layers
    # float32 rounding relative to the update's size; a truncated SVD's error scales with the largest singular value
    # (and with 1 / the gap at the cut: the DARE-pruned deltas have the smallest one here)
    delta_diff = max(float(np.abs(got[k] - expected[k]).max()) for k in got)
    scale = max(float(np.linalg.norm(v, 2) if method in DELTAWISE else np.abs(v).max()) for v in expected.values())
    assert delta_diff <= (2e-6 if method in DELTAWISE else 3e-7) * scale, (delta_diff, scale)

    ids = random_blocks(2, 9)
    peft.set_adapter(combined, new)
    hf.set_adapter(new)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    logit_diff = float(np.abs(np.asarray(combined(ids)) - theirs).max())
    print(f"{method}: max |dW diff| {delta_diff:.2e} (scale {scale:.2f}), max |logit diff| {logit_diff:.2e}")
    assert logit_diff < 1e-5


def test_factorwise_methods_need_one_rank_and_pruning_needs_density(pair):
    ours, _ = pair
    with pytest.raises(PeftjaxError, match=r"needs adapters of one rank; layers.0.self_attn.q_proj has ranks \[4, 6\]"):
        peft.combine_adapters(ours, ["default", "three"], [1.0, 1.0], "x", method="linear")
    with pytest.raises(PeftjaxError, match="prunes: give density"):
        peft.combine_adapters(ours, ["default", "two"], [1.0, 1.0], "x", method="ties")
    with pytest.raises(PeftjaxError, match="'svd' does not prune; drop density"):
        peft.combine_adapters(ours, ["default", "two"], [1.0, 1.0], "x", method="svd", density=0.5)
    with pytest.raises(PeftjaxError, match="method 'cat' has none"):
        peft.combine_adapters(ours, ["default", "two"], [1.0, 1.0], "x", method="cat", seed=3)
    with pytest.raises(PeftjaxError, match="unknown combination method 'mean'; use one of cat, linear"):
        peft.combine_adapters(ours, ["default", "two"], [1.0, 1.0], "x", method="mean")
    with pytest.raises(PeftjaxError, match="adapter 'two' already exists"):
        peft.combine_adapters(ours, ["default"], [1.0], "two", method="cat")
