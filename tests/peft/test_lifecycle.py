"""Merge / unmerge, disabling, named adapters, weighted combinations, mixed batches and the parameter summary."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.errors import PeftjaxError
from peftjax.models.llama import Linear
from peftjax.peft.lokr import LoKrConfig
from peftjax.peft.oft import OFTConfig
from peftjax.peft.vera import VeRAConfig
from peftjax.quant.policy import QuantRule, quantize_model
from peftjax.data import random_blocks
from peftjax.models import tiny_model

MERGEABLE = {"lora": peft.LoRAConfig(rank=4), "dora": peft.LoRAConfig(rank=4, dora=True),
             "ia3": peft.IA3Config(), "vera": VeRAConfig(rank=4), "lokr": LoKrConfig(rank=2, decompose_both=True),
             "oft": OFTConfig(block_size=16)}


def weights(model):
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name", list(MERGEABLE))
def test_merged_forward_equals_unmerged_and_unmerge_restores_w(randomise, name):
    model = randomise(peft.apply(tiny_model(), MERGEABLE[name]), peft.Adapter)
    ids = random_blocks(2, 8)
    merged, report = peft.merge(model)
    assert set(report.values()) == {0.0}
    np.testing.assert_allclose(merged(ids), model(ids), rtol=1e-4, atol=1e-4)
    restored, _ = peft.unmerge(merged)
    before, after = weights(model), weights(restored)
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(restored(ids), model(ids), rtol=1e-4, atol=1e-4)
    unloaded = peft.merge_and_unload(model)
    assert all(type(m) is Linear for p, m in nnx.iter_modules(unloaded) if isinstance(m, Linear))
    np.testing.assert_allclose(unloaded(ids), model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MERGEABLE))
def test_merge_into_quantized_base_requantizes_and_reports_the_error(randomise, name):
    base = quantize_model(tiny_model(), [QuantRule(format="nf4", block_size=64)])
    config = dataclasses.replace(MERGEABLE[name], targets="q_proj")
    model = randomise(peft.apply(base, config), peft.Adapter)
    merged, report = peft.merge(model)
    assert set(report) == {"layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"}
    assert all(0 < err < 0.1 for err in report.values())  # about half an NF4 step of the merged weight
    assert isinstance(merged.layers[0].self_attn.q_proj.base.weight, peft.Quantized)
    ids = random_blocks(2, 8)
    assert float(jnp.abs(merged(ids) - model(ids)).max()) < 0.02


@pytest.mark.parametrize("config", [peft.PrefixConfig(num_tokens=2), peft.PromptConfig(num_tokens=2)],
                         ids=["prefix", "prompt"])
def test_merging_a_method_that_cannot_merge(config):
    with pytest.raises(PeftjaxError, match="cannot be merged into the base weights"):
        peft.merge(peft.apply(tiny_model(), config))


def test_disable_adapters_gives_the_base_and_restores(randomise):
    base, ids = tiny_model(), random_blocks(2, 8)
    model = randomise(peft.apply(base, peft.LoRAConfig(rank=4)), peft.LoRA)
    adapted = model(ids)
    with peft.disable_adapters(model):
        np.testing.assert_array_equal(model(ids), base(ids))
    np.testing.assert_array_equal(model(ids), adapted)


def two_adapters(randomise):
    model = peft.apply(tiny_model(), peft.LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    model = peft.add_adapter(model, "two", peft.LoRAConfig(rank=2, alpha=4.0, targets=("v_proj", "down_proj"),
                                                           seed=1))
    return randomise(model, peft.LoRA)


def test_named_adapters_and_mixed_batch_match_per_example_passes(randomise):
    model, ids = two_adapters(randomise), random_blocks(3, 7)
    assert sorted(peft.adapter_names(model)) == ["default", "two"]
    outs = {}
    for name in ("default", "two", None):
        peft.set_adapter(model, name)
        outs[name] = model(ids)
    np.testing.assert_array_equal(outs[None], tiny_model()(ids))
    assert float(jnp.abs(outs["default"] - outs["two"]).max()) > 1e-3
    names = ["two", None, "default"]
    with peft.mixed_adapters(model, names):
        mixed = model(ids)
    for i, name in enumerate(names):
        np.testing.assert_allclose(mixed[i], outs[name][i], rtol=1e-5, atol=1e-5)
    with pytest.raises(PeftjaxError, match="unknown adapter 'three'; the model has: "):
        peft.set_adapter(model, "three")


def test_weighted_combination_cat_is_exact_and_svd_truncates(randomise):
    model, ids = two_adapters(randomise), random_blocks(2, 7)
    layer = model.layers[0].self_attn.v_proj
    combined = peft.combine_adapters(model, ["default", "two"], [0.5, 2.0], "mix", method="cat")
    delta = combined.layers[0].self_attn.v_proj.adapters["mix"].delta_weight()
    expected = 0.5 * layer.adapters["default"].delta_weight() + 2.0 * layer.adapters["two"].delta_weight()
    np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)
    svd = peft.combine_adapters(model, ["default", "two"], [0.5, 2.0], "mix", method="svd", rank=6)
    assert svd.layers[0].self_attn.v_proj.adapters["mix"].lora_a.shape == (64, 6)
    np.testing.assert_allclose(svd.layers[0].self_attn.v_proj.adapters["mix"].delta_weight(), expected, atol=1e-5)
    low = peft.combine_adapters(model, ["default", "two"], [0.5, 2.0], "mix", method="svd", rank=1)
    assert float(jnp.abs(low.layers[0].self_attn.v_proj.adapters["mix"].delta_weight() - expected).max()) > 1e-4
    peft.set_adapter(combined, "mix")
    peft.set_adapter(svd, "mix")
    np.testing.assert_allclose(combined(ids), svd(ids), rtol=1e-4, atol=1e-4)
    merged, _ = peft.merge(combined)  # merging a multi-adapter model folds in the active adapter
    np.testing.assert_allclose(merged(ids), combined(ids), rtol=1e-4, atol=1e-4)


class Square(nnx.Module):
    def __init__(self):
        self.proj = Linear(50, 50, rngs=nnx.Rngs(0))


def test_summary_of_the_50x50_example():
    lines = []
    totals = peft.summary(peft.apply(Square(), peft.LoRAConfig(rank=2, targets="proj")), print_fn=lines.append)
    assert (totals["trainable"], totals["base"]) == (200, 2500)
    assert totals["percent_cut"] == pytest.approx(92.0)
    assert "92% fewer" in lines[0]


def test_summary_counts_quantized_weights_by_logical_size():
    base = tiny_model()
    dense = peft.summary(peft.apply(base, peft.LoRAConfig(rank=2)), print_fn=lambda s: None)
    quant = peft.summary(peft.apply(quantize_model(base, [QuantRule(format="nf4")]), peft.LoRAConfig(rank=2)),
                         print_fn=lambda s: None)
    assert dense == quant
