"""LoHa, the method docs/extending.md adds in one file: its closed form, identity at initialisation, merging, and
training and sweeping it from YAML through the CLI with nothing else in the framework knowing its name."""
import json

import numpy as np
import pytest

from peftjax import peft
from peftjax.data import random_blocks
from peftjax.models import Linear, tiny_model
from peftjax.peft.loha import LoHa, LoHaConfig, LoHaLinear


def _adapted(randomise, **options):
    return randomise(peft.apply(tiny_model(), LoHaConfig(**options)), LoHa, scale=0.3)


def test_loha_closed_form(randomise):
    """y = x W + (alpha / r) x ((A1 B1) * (A2 B2)), computed in float64 from the layer's own factors."""
    model = _adapted(randomise, rank=3, alpha=6.0, targets="v_proj")
    layer = model.layers[1].self_attn.v_proj
    assert isinstance(layer, LoHaLinear)
    x = np.random.default_rng(0).normal(size=(5, layer.d_in)).astype(np.float32)
    f = {name: np.asarray(getattr(layer, name)[...], np.float64) for name in ("hada_a1", "hada_b1", "hada_a2",
                                                                           "hada_b2")}
    w = np.asarray(layer.base.weight[...], np.float64)
    expected = x @ (w + 2.0 * (f["hada_a1"] @ f["hada_b1"]) * (f["hada_a2"] @ f["hada_b2"]))
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_loha_starts_as_the_base_and_its_update_can_exceed_rank_r():
    base = tiny_model()
    model = peft.apply(base, LoHaConfig(rank=2, targets="q_proj"))
    ids = random_blocks(2, 9)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))  # B2 = 0
    layer = model.layers[0].self_attn.q_proj
    layer.hada_b2.set_value(np.random.default_rng(1).normal(size=layer.hada_b2.shape).astype(np.float32))
    # the Hadamard product of two rank-2 matrices: rank up to 4 (what LoHa buys over LoRA at equal parameters)
    assert np.linalg.matrix_rank(np.asarray(layer.delta_weight(), np.float64), tol=1e-6) == 4


def test_loha_merges_and_unmerges(randomise):
    model = _adapted(randomise, rank=2, alpha=4.0)
    ids = random_blocks(2, 9)
    merged, errors = peft.merge(model)
    np.testing.assert_allclose(np.asarray(merged(ids)), np.asarray(model(ids)), atol=1e-4)
    assert set(errors.values()) == {0.0}  # a dense base: merging adds no quantization error
    unmerged, _ = peft.unmerge(merged)
    np.testing.assert_allclose(np.asarray(unmerged.layers[0].mlp.up_proj.base.weight[...]),
                               np.asarray(model.layers[0].mlp.up_proj.base.weight[...]), atol=1e-6)


def _expected_params(rank):
    """2 r (d_in + d_out) per linear layer of the tiny model (its shapes from the model itself)."""
    return sum(2 * rank * (lin.d_in + lin.d_out) for lin in peft.modules_of_type(tiny_model(), Linear).values())


def test_loha_trains_from_yaml(cli, tiny_args, tmp_path, play_files):
    config = tmp_path / "loha.yaml"
    config.write_text("name: loha\npeft: {method: loha, rank: 4, alpha: 8.0}\ntrain: {steps: 3, learning_rate: 0.01}\n"
                      f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "loha" and summary["rank"] == 4
    assert summary["trainable_params"] == _expected_params(4)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_loha_sweeps_its_own_options(cli, tmp_path, play_files):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {name: tiny}\npeft: {method: loha, rank: 2}\n"
                    f"data: {{dataset: files, eval_docs: 1, seq_len: 32, max_eval_blocks: 2, "
                    f"files: [{', '.join(map(str, play_files))}]}}\n"
                    "train: {steps: 2, batch_size: 2, learning_rate: 0.01}\n"
                    "sweep:\n  grid: {peft.alpha: [4.0, 16.0]}\n")
    out = tmp_path / "sweep"
    proc = cli("sweep", str(spec), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(line["status"] == "ok" for line in lines)
    by_alpha = {line["point"]["peft.alpha"]: line["summary"] for line in lines}
    assert sorted(by_alpha) == [4.0, 16.0]
    for summary in by_alpha.values():  # the spec's rank 2 reached every point (the field's default is 8)
        assert summary["method"] == "loha" and summary["trainable_params"] == _expected_params(2)
    # alpha reached the model: the two alphas train to different losses from the same start
    assert by_alpha[4.0]["eval_loss_after"] != by_alpha[16.0]["eval_loss_after"]
    assert by_alpha[4.0]["eval_loss_before"] == by_alpha[16.0]["eval_loss_before"]


@pytest.mark.parametrize("option, message", [
    ("peft.rnak=4", "unknown config key peft.rnak for method 'loha'; did you mean peft.rank?; loha's fields: rank, "
                    "alpha, targets, seed"),
    ("peft.rank=1000", "LoHa rank 1000 does not fit"),
])
def test_loha_bad_options_are_one_line_errors(cli, tiny_args, config, tmp_path, option, message):
    proc = cli("train", str(config), *tiny_args, "--set", "peft.method=loha", "--set", option,
               "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
