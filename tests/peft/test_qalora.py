"""QA-LoRA: its closed form on an asymmetric int4 base, the merge that keeps every integer code (against QLoRA's
requantizing merge of the same update), training from YAML, and its one-line refusals of other bases."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.cli import main
from peftjax.data import random_blocks
from peftjax.models import tiny_model
from peftjax.peft.qalora import QALoRA, QALoRAConfig, QALoRALinear
from peftjax.quant import unpack_bits
from peftjax.quant.policy import QuantizedLinear, QuantRule, quantize_model
from peftjax.rules import path_str

L = 16  # group size = quantization block: the tiny model's 64- and 128-wide inputs pool to 4 and 8 features
INT4 = QuantRule(format="int4", block_size=L, asymmetric=True)


@pytest.fixture(scope="module")
def adapted(randomise):
    """(int4 base, QA-LoRA rank 2 on every linear layer with random A and B); tests clone before they change it."""
    base = quantize_model(tiny_model(), [INT4])
    return base, randomise(peft.apply(base, QALoRAConfig(rank=2, alpha=4.0)), QALoRA, scale=0.1)


def _by_hand(q):
    """(codes, step, zero) of an unpacked (d_out, d_in) QArray in blocks of L, each (d_out, d_in / L[, L])."""
    d_out, d_in = q.shape
    codes = np.asarray(unpack_bits(q.codes, q.bits, q.size), np.float64).reshape(d_out, d_in // L, L)
    return (codes, np.asarray(q.scales, np.float64).reshape(d_out, -1),
            np.asarray(q.zero_points, np.float64).reshape(d_out, -1))


def test_qalora_closed_form(adapted):
    """y = x W + (alpha / r) pool(x) A B, W = step * (code - zero) per block of L inputs, all in numpy float64."""
    _, model = adapted
    layer = model.layers[1].mlp.down_proj  # d_in 128: 8 groups
    assert isinstance(layer, QALoRALinear) and layer.qalora_a.shape == (128 // L, 2)
    codes, step, zero = _by_hand(layer.base.weight.get_value())
    w_DO = ((codes - zero[..., None]) * step[..., None]).reshape(layer.d_out, layer.d_in).T
    x = np.random.default_rng(0).normal(size=(5, layer.d_in)).astype(np.float32)
    pooled = x.astype(np.float64).reshape(5, -1, L).mean(axis=-1)
    a, b = (np.asarray(v[...], np.float64) for v in (layer.qalora_a, layer.qalora_b))
    expected = x @ w_DO + 4.0 / 2 * pooled @ a @ b
    assert np.abs(4.0 / 2 * pooled @ a @ b).max() > 0.05  # the adapter's term is far above the tolerance
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_merge_keeps_the_codes_and_requantizing_lora_does_not(adapted):
    """peft.merge of QA-LoRA keeps every code and step bit for bit and only moves zero points (z - c / step, float);
    the merged model's logits equal the adapted model's within float32 reassociation (one matmul x (W + ΔW)
    instead of x W + pool(x) A B: ~1e-7 on logits of ~1, tolerance 1e-5). The same update as a plain LoRA
    (A' = each row of A repeated L times / L, so s A' B = ΔW exactly) on the same base merges by requantizing,
    which moves codes and costs about half a quantization step per weight."""
    base, model = adapted  # merge, unmerge and apply return new models
    ids = random_blocks(2, 9)
    logits = np.asarray(model(ids))
    merged, report = peft.merge(model)
    layers = {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QALoRALinear)}
    after = {path_str(p): m for p, m in nnx.iter_modules(merged) if isinstance(m, QALoRALinear)}
    assert len(layers) == 14 and set(report) == set(layers)
    for path, layer in layers.items():
        q0, q1 = layer.base.weight.get_value(), after[path].base.weight.get_value()
        np.testing.assert_array_equal(np.asarray(q1.codes), np.asarray(q0.codes))
        np.testing.assert_array_equal(np.asarray(q1.scales), np.asarray(q0.scales))
        assert q1.fmt == "int4" and q1.zero_points.dtype == jnp.float32
        _, step, zero = _by_hand(q0)
        offset = np.asarray(layer.delta_weight(), np.float64).T[:, ::L]  # ΔW is constant within each group
        np.testing.assert_allclose(np.asarray(q1.zero_points).reshape(zero.shape), zero - offset / step,
                                   rtol=1e-6, atol=1e-6)
    merged_gap = float(np.abs(np.asarray(merged(ids)) - logits).max())
    qalora_error = max(report.values())
    assert merged_gap < 1e-5 and qalora_error < 1e-7, (merged_gap, qalora_error)

    lora = peft.apply(base, peft.LoRAConfig(rank=2, alpha=4.0))
    for path, layer in layers.items():
        twin = lora
        for part in path.split("."):
            twin = twin[int(part)] if part.isdigit() else getattr(twin, part)
        twin.lora_a.set_value(jnp.repeat(layer.qalora_a[...], L, axis=0) / L)
        twin.lora_b.set_value(layer.qalora_b[...])
    np.testing.assert_allclose(np.asarray(lora(ids)), logits, atol=1e-5)  # the same function, unmerged
    lora_merged, lora_report = peft.merge(lora)
    lora_gap = float(np.abs(np.asarray(lora_merged(ids)) - logits).max())
    lora_error = max(lora_report.values())
    print(f"QA-LoRA merge: weight error {qalora_error:.2e}, max |logit diff| {merged_gap:.2e}; LoRA merge "
          f"requantized: weight error {lora_error:.2e}, max |logit diff| {lora_gap:.2e}")
    assert lora_error > 1e-3 and lora_gap > 1e-2 and lora_gap > 1000 * merged_gap

    unloaded = peft.merge_and_unload(model)  # the wrappers go; the int4 layers stay QuantizedLinear
    assert all(isinstance(m, QuantizedLinear) for p, m in nnx.iter_modules(unloaded) if path_str(p) in layers)
    np.testing.assert_allclose(np.asarray(unloaded(ids)), logits, atol=1e-5)
    restored, _ = peft.unmerge(merged)
    np.testing.assert_allclose(np.asarray(restored(ids)), logits, atol=1e-5)


def test_qalora_trains_from_yaml(tiny_args, tmp_path, play_files):
    config = tmp_path / "qalora.yaml"
    config.write_text("name: qalora\npeft: {method: qalora, rank: 2, alpha: 4.0}\n"
                      f"quant: {{format: int4, block_size: {L}, asymmetric: true}}\n"
                      "train: {steps: 3, learning_rate: 0.01}\n"
                      f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), *tiny_args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "qalora" and summary["rank"] == 2
    adapted = peft.apply(quantize_model(tiny_model(), [INT4]), QALoRAConfig(rank=2))
    expected = sum(v.size for v in jax.tree.leaves(nnx.state(adapted, QALoRA)))
    # per layer (d_in / L) r + r d_out: 7 projections in each of 2 layers, far fewer than LoRA's d_in r + r d_out
    assert summary["trainable_params"] == expected == 2 * 2 * (2 * (4 + 64) + 2 * (4 + 32) + 2 * (4 + 128)
                                                               + (8 + 64))
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


ADVICE = "quantize the base with `quant: {format: int4, block_size: 32, asymmetric: true}`"


@pytest.mark.parametrize("options, fragments", [
    (("quant.format=int4", f"quant.block_size={L}"),
     ("QA-LoRA needs an asymmetric integer base (its update moves zero points), layers.0.", f"is symmetric int4: "
                                                                                              f"{ADVICE}")),
    (("quant.format=nf4",), ("QA-LoRA needs an asymmetric integer base", f"is nf4: {ADVICE}")),
    (("quant.format=int4", "quant.block_size=32", "quant.asymmetric=true", f"peft.group_size={L}"),
     (f"QA-LoRA group_size {L} must equal the base's quantization block size 32 (layers.0.",
      f"): set peft.group_size: 32 (or null) or quant.block_size: {L}")),
    (("quant.format=int4", "quant.block_size=32", "quant.asymmetric=true", "peft.rank=4"),
     ("QA-LoRA rank 4 does not fit layers.0.", "its pooled input has d_in / group_size = 64 / 32 = 2 features "
                                               "(1 <= rank <= 2); choose a smaller rank or quantization block size")),
    (("quant.format=int4", "quant.block_size=48", "quant.asymmetric=true"),
     ("not a multiple of quant.block_size 48: choose a block size that divides",)),
    (("peft.group_size=0",), ("QA-LoRA group_size must be a positive integer",)),
])
def test_qalora_bad_options_are_one_line_errors(tiny_args, config, tmp_path, capsys, options, fragments):
    sets = [arg for option in options for arg in ("--set", option)]
    status = main(["train", str(config), *tiny_args, "--set", "peft.method=qalora", "--set", "peft.rank=2", *sets,
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and all(fragment in err for fragment in fragments), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_qalora_on_a_dense_base_exits_2_from_the_cli(cli, tiny_args, config, tmp_path):
    proc = cli("train", str(config), *tiny_args, "--set", "peft.method=qalora", "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "QA-LoRA needs a quantized base, and layers.0." in proc.stderr, proc.stderr
    assert f"is not quantized: {ADVICE}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
