"""AdaLoRA against the live Hugging Face PEFT (its SVD layer, orthogonality term and rank allocator over the same
values and gradients), trained from YAML through the CLI down to its final budget, resumed, and its bad options."""
import json
import re
import shutil
import types

import jax
import numpy as np
import optax
import pytest

from peftjax import partition, peft
from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.models import tiny_model
from peftjax.peft.adalora import (AdaLoRA, AdaLoRAConfig, AdaLoRALinear, orth_regularizer, rank_allocator,
                                  triplet_scores, triplets)
from peftjax.peft.api import adapter_modules

# init 2 steps, budget falls over steps 3..8 (re-masked at even steps), final mask at step 9, fixed to step 13
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12, beta1=0.85, beta2=0.8)


def _adapted(randomise, **options):
    model = peft.apply(tiny_model(), AdaLoRAConfig(targets=("q_proj", "v_proj"), alpha=6.0, **options))
    return randomise(model, AdaLoRA, scale=0.3)  # λ off zero too, so every triplet counts from the start


def _hf_twin(layers: dict, config: AdaLoRAConfig):
    """HF PEFT's AdaLoraModel over torch linears shaped like ``layers``, holding the same weights; (model, {our
    layer path: its SVDLinear})."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch, peft) is not installed")
    hf_peft = pytest.importorskip("peft")
    from peft.tuners.adalora import AdaLoraModel

    names = {p: p.replace(".", "_") for p in layers}

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = torch.nn.ModuleDict({names[p]: torch.nn.Linear(m.d_in, m.d_out, bias=False)
                                             for p, m in layers.items()})

        def forward(self, x):
            return types.SimpleNamespace(loss=torch.zeros(()))  # the regulariser alone is added to it

    hf_config = hf_peft.AdaLoraConfig(
        init_r=config.init_r, target_r=config.target_r, tinit=config.tinit, tfinal=config.tfinal,
        deltaT=config.deltaT, beta1=config.beta1, beta2=config.beta2, total_step=config.total_step,
        orth_reg_weight=config.orth_reg_weight, lora_alpha=config.alpha, target_modules=list(names.values()))
    model = AdaLoraModel(Net(), hf_config, "default")
    twins = {p: model.model.mods[names[p]] for p in layers}
    with torch.no_grad():
        for p, m in layers.items():
            hf = twins[p]
            hf.base_layer.weight.copy_(torch.from_numpy(np.asarray(m.base.weight[...]).T.copy()))
            hf.lora_A["default"].copy_(torch.from_numpy(np.asarray(m.adalora_a[...]).T.copy()))
            hf.lora_E["default"].copy_(torch.from_numpy(np.asarray(m.adalora_e[...])[:, None].copy()))
            hf.lora_B["default"].copy_(torch.from_numpy(np.asarray(m.adalora_b[...]).T.copy()))
    return model, twins


def test_layer_forward_and_orthogonality_equal_hf_peft(randomise):
    torch = pytest.importorskip("torch", reason="the interop extra (torch, peft) is not installed")
    config = AdaLoRAConfig(alpha=6.0, orth_reg_weight=0.3, **SCHEDULE)
    model = _adapted(randomise, orth_reg_weight=0.3, **SCHEDULE)
    layers = adapter_modules(model, AdaLoRALinear)
    assert len(layers) == 4
    hf, twins = _hf_twin(layers, config)
    x = np.random.default_rng(0).normal(size=(3, 5, 64)).astype(np.float32)
    for p, layer in layers.items():
        with torch.no_grad():
            expected = twins[p](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
        delta = twins[p].get_delta_weight("default").detach().numpy().T  # merging adds HF's delta weight
        np.testing.assert_allclose(np.asarray(layer.delta_weight()), delta, rtol=1e-5, atol=1e-7)
    expected = float(hf(torch.zeros(1, 64)).loss)  # HF's forward adds orth_reg_weight * mean ||Gram - I||_F
    assert expected > 0.1
    np.testing.assert_allclose(float(orth_regularizer(model, config)), expected, rtol=1e-5)


def test_rank_allocator_equals_hf_peft_over_every_phase(randomise):
    """The same values and gradient sequence through peftjax's allocator (after SGD) and HF's
    ``update_and_allocate`` (after torch SGD): budgets, masks, EMAs, triplet scores and parameters agree at every
    one of 14 steps across the initial, decaying, final-masking and fixed phases."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch, peft) is not installed")
    config = AdaLoRAConfig(alpha=6.0, **SCHEDULE)
    model = _adapted(randomise, **SCHEDULE)
    layers = adapter_modules(model, AdaLoRALinear)
    hf, twins = _hf_twin(layers, config)
    allocator = hf.rankallocator
    hf_opt = torch.optim.SGD([p for n, p in hf.named_parameters() if "lora_" in n], lr=0.05)

    _, params, _ = partition.split(model)
    found = triplets(params)
    assert [f[0] for f in found] == sorted(layers)
    transform = rank_allocator(optax.sgd(0.05), config, config.total_step)
    state = transform.init(params)
    update = jax.jit(transform.update)
    rng = np.random.default_rng(1)
    live, worst = [], {"score": 0.0, "ema": 0.0}
    for t in range(14):
        grads = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32), params)
        g = jax.tree.leaves(grads)
        for (path, ia, ie, ib) in found:
            for name, i, to_hf in (("lora_A", ia, np.transpose), ("lora_E", ie, lambda v: v[:, None]),
                                   ("lora_B", ib, np.transpose)):
                getattr(twins[path], name)["default"].grad = torch.from_numpy(np.ascontiguousarray(to_hf(g[i])))
        hf_opt.step()
        hf.update_and_allocate(t)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)

        assert int(state.budget) == allocator.budget_schedule(t)[0], t
        leaves = jax.tree.leaves(params)
        pattern = hf.peft_config["default"].rank_pattern
        for row, (path, ia, ie, ib) in enumerate(found):
            hf_layer, name = twins[path], f"mods.{path.replace('.', '_')}"
            e_hf = hf_layer.lora_E["default"].detach().numpy()[:, 0]
            np.testing.assert_array_equal(leaves[ie] == 0, e_hf == 0)  # the same triplets masked
            np.testing.assert_allclose(leaves[ie], e_hf, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(leaves[ia], hf_layer.lora_A["default"].detach().numpy().T, atol=1e-6)
            keep = np.asarray(state.keep[row])
            np.testing.assert_array_equal(keep, pattern[f"{name}.lora_E.default"] if pattern else np.ones(4, bool))
            if t < 9:  # HF's importance EMAs and triplet scores (reset at the final mask, t = 9)
                sens, unc = jax.tree.leaves(state.sensitivity), jax.tree.leaves(state.uncertainty)
                for part, i, to_hf in (("lora_A", ia, np.transpose), ("lora_E", ie, lambda v: v[:, None])):
                    for ours, theirs in ((sens[i], allocator.exp_avg_ipt), (unc[i], allocator.exp_avg_unc)):
                        ref = theirs[f"{name}.{part}.default"].numpy()
                        np.testing.assert_allclose(to_hf(np.asarray(ours)), ref, rtol=1e-5, atol=1e-12)
                        worst["ema"] = max(worst["ema"], float(np.max(np.abs(to_hf(np.asarray(ours)) - ref))))
                element = {part: allocator._element_score(f"{name}.{part}.default")
                           for part in ("lora_A", "lora_E", "lora_B")}
                hf_scores = allocator._combine_ipt(element["lora_E"], torch.cat(
                    [element["lora_A"].mean(dim=1, keepdim=True), element["lora_B"].mean(dim=0).view(-1, 1)], dim=1))
                ours = np.asarray(triplet_scores(sens, unc, found)[row])
                np.testing.assert_allclose(ours, hf_scores.numpy(), rtol=1e-5, atol=1e-12)
                worst["score"] = max(worst["score"], float(np.max(np.abs(ours - hf_scores.numpy()))))
            else:
                assert not allocator.exp_avg_ipt and not np.any(np.asarray(jax.tree.leaves(state.sensitivity)[ia]))
        live.append(int(np.asarray(state.keep).sum()))
    # the phases happened: no mask up to t = tinit and at odd t, 10 of 16 live at t = 4, the target 8 from t = 6 on
    assert live == [16, 16, 16, 16, 10, 10] + [8] * 8, live
    print(f"max |difference| vs HF: EMAs {worst['ema']:.2e}, triplet scores {worst['score']:.2e}")


def _yaml(tmp_path, play_files, steps=12, **peft_options):
    options = {"method": "adalora", **SCHEDULE, "total_step": None, **peft_options}
    peft_yaml = ", ".join(f"{k}: {'null' if v is None else v}" for k, v in options.items())
    config = tmp_path / "adalora.yaml"
    config.write_text(f"name: adalora\npeft: {{{peft_yaml}}}\n"
                      f"train: {{steps: {steps}, learning_rate: 0.02, save_every: 4, keep_checkpoints: 3}}\n"
                      f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    return config


def peft_load(run_dir):
    from peftjax.train import load_run

    return load_run(run_dir)[0]


def test_adalora_trains_from_yaml_to_its_final_budget_and_resumes_bitwise(cli, tiny_args, tmp_path, play_files):
    """12 steps (total_step: train.steps) on every linear layer of the tiny model: the loss falls, the run ends
    with exactly target_r x 14 layers nonzero λ entries; resumed from its step-4 checkpoint (mid-decay, EMAs and
    mask in the optimizer state) it ends bitwise where the uninterrupted run does, optimizer state included."""
    config = _yaml(tmp_path, play_files)
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "adalora" and summary["rank"] == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "regularizer" in r]
    assert len(steps) == 12 and steps[-1]["loss"] < steps[0]["loss"]
    assert steps[-1]["regularizer"] < steps[0]["regularizer"]  # P, Q are driven towards orthonormal
    model = peft_load(out)
    layers = adapter_modules(model, AdaLoRALinear)
    assert len(layers) == 14
    live = sum(int(np.count_nonzero(np.asarray(m.adalora_e[...]))) for m in layers.values())
    assert live == 2 * 14
    assert {int(np.count_nonzero(np.asarray(m.adalora_e[...]))) for m in layers.values()} != {2}  # allocated unevenly

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for step in ("8", "12"):
        shutil.rmtree(resumed / "checkpoints" / step)
    (resumed / "summary.json").unlink()
    proc = cli("train", str(config), *tiny_args, "--out", str(resumed), "--resume")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((resumed / "summary.json").read_text())["resumed_from_step"] == 4
    hashes = [json.loads((run / "checkpoints" / "12" / "meta" / "metadata").read_text())["checksum"]
              for run in (out, resumed)]
    assert hashes[0] == hashes[1]  # every trainable and optimizer-state leaf (the allocator's too), bitwise


def test_adalora_merges_like_an_additive_adapter(randomise):
    model = _adapted(randomise, **SCHEDULE)
    ids = random_blocks(2, 9)
    merged, errors = peft.merge(model)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=1e-4)
    assert set(errors.values()) == {0.0}
    unmerged, _ = peft.unmerge(merged)
    np.testing.assert_allclose(np.asarray(unmerged.layers[0].self_attn.q_proj.base.weight[...]),
                               np.asarray(model.layers[0].self_attn.q_proj.base.weight[...]), atol=1e-6)


def test_adalora_starts_as_the_base():
    base = tiny_model()
    ids = random_blocks(2, 9)
    model = peft.apply(base, AdaLoRAConfig())
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))  # λ = 0


@pytest.mark.parametrize("options, message", [
    ({"target_r": 16}, "target_r must be between 1 and init_r (12), got 16"),
    ({"beta1": 1.0}, "beta1 (an EMA factor) must be in (0, 1)"),
    ({"deltaT": 0}, "deltaT (steps between re-maskings) must be >= 1"),
    ({"orth_reg_weight": -1.0}, "orth_reg_weight must be >= 0"),
    ({"tinit": 6, "tfinal": 6, "total_step": 12}, "tinit 6 + tfinal 6 must be less than the total steps 12"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(PeftjaxError, match=re.escape(message)):
        peft.make_config("adalora", **options)


def test_a_schedule_longer_than_the_run_is_a_one_line_cli_error(cli, tiny_args, tmp_path, play_files):
    """total_step defaults to train.steps, so tinit + tfinal must fit in the run; said before the run directory
    is written."""
    config = _yaml(tmp_path, play_files, steps=4, tinit=2, tfinal=3)
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("peftjax: error: "), proc.stderr
    assert "tinit 2 + tfinal 3 must be less than the total steps 4 (train.steps)" in lines[0]
    assert not out.exists()


def test_hf_peft_adalora_adapters_import_and_export_with_hf_logits(tmp_path):
    """An HF PEFT AdaLoRA adapter (moved off its init, then pruned by a rank pattern as HF saves it after
    allocation) loads here with HF's logits, and a peftjax AdaLoRA model saved here loads in HF with its logits."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch, peft) is not installed")
    transformers = pytest.importorskip("transformers")
    hf_peft = pytest.importorskip("peft")
    from peftjax.peft.hf import load_hf_adapter, save_hf_adapter, save_hf_model

    base_dir = save_hf_model(tiny_model(seed=1), tmp_path / "base")

    def hf_base():
        return transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    def logits(model, ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()

    ids = random_blocks(2, 7)
    hf = hf_peft.get_peft_model(hf_base(), hf_peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, total_step=10, tinit=1, tfinal=2, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    hf.peft_config["default"].rank_pattern = {  # what HF's allocator leaves: 2 of 4 triplets kept in each layer
        f"model.layers.{i}.self_attn.{m}.lora_E.default": [i == 0, True, m == "v_proj", i == 1]
        for i in range(2) for m in ("q_proj", "v_proj")}
    hf.base_model.rankallocator.mask_using_rank_pattern(hf.base_model.model, hf.peft_config["default"].rank_pattern)
    hf.eval().save_pretrained(tmp_path / "from_hf")
    imported = load_hf_adapter(tiny_model(seed=1), tmp_path / "from_hf")
    layer = imported.layers[0].self_attn.q_proj
    assert isinstance(layer, AdaLoRALinear) and layer.config.total_step == 10 and layer.config.tinit == 1
    np.testing.assert_array_equal(np.asarray(layer.adalora_e[...]) != 0, [True, True, False, False])
    import_diff = float(np.abs(np.asarray(imported(ids)) - logits(hf, ids)).max())

    ours = peft.apply(tiny_model(seed=1), AdaLoRAConfig(init_r=4, target_r=2, targets=("k_proj", "down_proj")))
    layers = adapter_modules(ours, AdaLoRALinear)
    rng = np.random.default_rng(2)
    for m in layers.values():
        m.adalora_e.set_value(rng.normal(0, 1.0, m.adalora_e.shape).astype(np.float32))
        m.adalora_a.set_value(rng.normal(0, 0.3, m.adalora_a.shape).astype(np.float32))
    save_hf_adapter(ours, tmp_path / "from_peftjax")
    loaded = hf_peft.PeftModel.from_pretrained(hf_base(), tmp_path / "from_peftjax").eval()
    export_diff = float(np.abs(logits(loaded, ids) - np.asarray(ours(ids))).max())
    change = float(np.abs(np.asarray(ours(ids)) - np.asarray(tiny_model(seed=1)(ids))).max())
    print(f"ADALORA: import {import_diff:.1e}, export {export_diff:.1e} (adapter changes logits by {change:.2f})")
    assert import_diff < 1e-4 and export_diff < 1e-4 and change > 1e-2
