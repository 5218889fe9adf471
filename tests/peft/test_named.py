"""Named adapters of every method that adds to a linear layer or prepends a prompt: each named adapter computes what
its own single-adapter model computes (all its options kept), a mixed batch gives every row its adapter's output in
one pass, and what cannot share a base is a one-line error."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.models import tiny_model

# one adapter per method (and LoRA variants whose options the old LoRA-only named adapters dropped)
CONFIGS = {
    "lora": peft.LoRAConfig(rank=4, targets=("q_proj", "v_proj")),
    "dora": peft.LoRAConfig(rank=2, alpha=4.0, dora=True, rslora=True, targets=("v_proj", "down_proj"), seed=1),
    "qat": peft.LoRAConfig(rank=2, qat_format="nf4", targets=("o_proj",), seed=2),
    "fa": peft.LoRAConfig(rank=2, freeze_a=True, dropout=0.2, targets=("q_proj",), seed=3),
    "ia3": peft.IA3Config(),
    "vera": peft.make_config("vera", rank=4, targets=("q_proj", "up_proj")),
    "loha": peft.make_config("loha", rank=2, targets=("k_proj", "v_proj")),
    "lokr": peft.make_config("lokr", rank=2, targets=("gate_proj",)),
    "oft": peft.make_config("oft", block_size=8, targets=("v_proj",)),
}


@pytest.fixture(scope="module")
def singles():
    """{name: that adapter alone on the tiny base, its trainable values perturbed}."""
    out = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        out[name] = peft.apply(tiny_model(), config)
        leaves, treedef = jax.tree.flatten(nnx.state(out[name], peft.Trainable))
        keys = jax.random.split(jax.random.key(i), len(leaves))
        nnx.update(out[name], jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                                           for k, x in zip(keys, leaves)]))
    return out


@pytest.fixture(scope="module")
def named(singles):
    model = singles["lora"]  # adapted once: its adapter becomes "default"
    for name, single in singles.items():
        if name != "lora":
            model = peft.add_adapter(model, name, single)
    return model


def test_each_named_adapter_computes_its_own_model(named, singles):
    ids = random_blocks(3, 7)
    assert sorted(peft.adapter_names(named)) == sorted(["default", *list(CONFIGS)[1:]])
    assert peft.active_adapter(named) == "default"  # adding adapters leaves the active one
    outs = {}
    for name, single in singles.items():
        peft.set_adapter(named, "default" if name == "lora" else name)
        outs[name] = np.asarray(named(ids))
        np.testing.assert_array_equal(outs[name], np.asarray(single(ids)))
        alone = peft.single_adapter(named, peft.active_adapter(named))
        np.testing.assert_array_equal(outs[name], np.asarray(alone(ids)))
    peft.set_adapter(named, None)
    np.testing.assert_array_equal(np.asarray(named(ids)), np.asarray(tiny_model()(ids)))
    # the adapters differ from each other and from the base, so equal outputs are not a shared one
    assert min(float(np.abs(outs[a] - outs[b]).max()) for a in outs for b in outs if a < b) > 1e-3
    # dropout stays an option of its adapter: with a key the LoRA-FA adapter's output changes, the others' do not
    peft.set_adapter(named, "fa")
    assert float(jnp.abs(named(ids, dropout_key=jax.random.key(0)) - outs["fa"]).max()) > 1e-4
    peft.set_adapter(named, "default")


def test_a_mixed_batch_gives_every_row_its_adapters_output(named, singles):
    names = ["dora", None, "ia3", "default", "vera", "loha", "lokr", "oft", "qat"]
    ids = random_blocks(len(names), 6, seed=4)
    with peft.mixed_adapters(named, names):
        mixed = np.asarray(named(ids))
        jitted = np.asarray(jax.jit(lambda i: named(i))(ids))  # a jitted function closing over the model
        passed = np.asarray(nnx.jit(lambda m, i: m(i))(named, ids))  # split and merged: adapters in sorted order
    for i, name in enumerate(names):
        alone = tiny_model() if name is None else singles["lora" if name == "default" else name]
        np.testing.assert_allclose(mixed[i], np.asarray(alone(ids))[i], rtol=1e-5, atol=1e-5, err_msg=str(name))
    np.testing.assert_allclose(jitted, mixed, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(passed, mixed, rtol=1e-5, atol=1e-5)
    assert peft.active_adapter(named) == "default"  # the block leaves the active adapter as it was


def test_merging_folds_the_active_named_adapter_and_export_of_all(named, singles, tmp_path):
    ids = random_blocks(2, 5)
    peft.set_adapter(named, "loha")
    merged, _ = peft.merge(named)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(singles["loha"](ids)), rtol=1e-5, atol=1e-5)
    with pytest.raises(PeftjaxError, match="has named adapters; save_hf_adapters"):
        peft.save_hf_adapter(named, tmp_path / "one")
    out = peft.save_hf_adapters(named, tmp_path / "all")  # one HF PEFT directory per adapter, each of its type
    kinds = {p.name: json.loads((p / "adapter_config.json").read_text())["peft_type"] for p in out.iterdir()}
    assert kinds == {"default": "LORA", "dora": "LORA", "qat": "LORA", "fa": "LORA", "ia3": "IA3", "vera": "VERA",
                     "loha": "LOHA", "lokr": "LOKR", "oft": "OFT"}
    peft.set_adapter(named, "default")


def test_named_prompts_mix_rows_of_one_length(randomise):
    base, ids = tiny_model(), random_blocks(3, 6)
    first = randomise(peft.apply(base, peft.PromptConfig(num_tokens=4, seed=0)), peft.Prompt, scale=0.5)
    second = randomise(peft.apply(base, peft.PromptConfig(num_tokens=4, seed=1)), peft.Prompt, seed=5, scale=0.5)
    model = peft.add_adapter(first, "second", second)
    with peft.mixed_adapters(model, ["second", "default", "second"]):
        mixed = np.asarray(model(ids))
    np.testing.assert_allclose(mixed[[0, 2]], np.asarray(second(ids))[[0, 2]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mixed[1], np.asarray(first(ids))[1], rtol=1e-5, atol=1e-5)
    model = peft.add_adapter(model, "short", peft.PromptConfig(num_tokens=2))
    with pytest.raises(PeftjaxError, match="prompt of one length"):
        with peft.mixed_adapters(model, ["short", "default", None]):
            pass


@pytest.mark.parametrize("adapter, error", [
    (peft.LoRAConfig(rank=2, init="pissa"), "other base weights at layers.0.*PiSSA"),
    (peft.LoRAConfig(rank=2, init="eva"), "EVA initialises from data"),
    (peft.PrefixConfig(num_tokens=2), "method prefix has PrefixKV at .*which named adapters cannot hold"),
    (peft.FullConfig(), "full trains the base weights"),
], ids=["pissa", "eva", "prefix", "full"])
def test_what_cannot_share_the_base_is_one_line(adapter, error):
    model = peft.apply(tiny_model(), peft.LoRAConfig(rank=2, targets="q_proj"))
    with pytest.raises(PeftjaxError, match=error):
        peft.add_adapter(model, "two", adapter)


def test_an_adapter_model_of_another_base_is_refused():
    model = peft.apply(tiny_model(), peft.LoRAConfig(rank=2))
    other = peft.apply(tiny_model(seed=7), peft.LoRAConfig(rank=2))
    with pytest.raises(PeftjaxError, match="other base weights at layers.0"):
        peft.add_adapter(model, "two", other)
    with pytest.raises(PeftjaxError, match="adapter 'default' already exists"):
        peft.add_adapter(model, "default", peft.LoRAConfig(rank=2))
