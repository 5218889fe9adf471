"""LoKr: its closed form (full and low-rank Kronecker factors), identity at initialisation, the rank of its update,
and training from YAML (HF PEFT interop is in test_hf_interop.py, merging in test_lifecycle.py)."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.cli import main
from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.models import tiny_model
from peftjax.peft.lokr import LoKr, LoKrConfig, LoKrLinear


def _factor(layer, i):
    """C_i in float64 from the layer's own variables (full, or the product of its low-rank pair)."""
    if hasattr(layer, f"w{i}"):
        return np.asarray(getattr(layer, f"w{i}")[...], np.float64)
    return np.asarray(getattr(layer, f"w{i}_a")[...], np.float64) @ np.asarray(getattr(layer, f"w{i}_b")[...],
                                                                               np.float64)


@pytest.mark.parametrize("options, low_rank", [({"rank": 4}, (False, False)),
                                               ({"rank": 2, "decompose_both": True}, (True, True))])
def test_lokr_closed_form(randomise, options, low_rank):
    """y = x W + (alpha / r) x (C1 ⊗ C2) with np.kron in float64; q_proj is 64 x 64, so C1, C2 are 8 x 8."""
    model = randomise(peft.apply(tiny_model(), LoKrConfig(alpha=6.0, targets="q_proj", **options)), LoKr, scale=0.3)
    layer = model.layers[1].self_attn.q_proj
    assert isinstance(layer, LoKrLinear)
    assert (hasattr(layer, "w1_a"), hasattr(layer, "w2_a")) == low_rank
    x = np.random.default_rng(0).normal(size=(5, layer.d_in)).astype(np.float32)
    w = np.asarray(layer.base.weight[...], np.float64)
    expected = x @ (w + 6.0 / options["rank"] * np.kron(_factor(layer, 1), _factor(layer, 2)))
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_lokr_starts_as_the_base_and_its_update_has_rank_product():
    base = tiny_model()
    model = peft.apply(base, LoKrConfig(rank=2, targets="o_proj"))
    ids = random_blocks(2, 9)
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))  # C1 = 0
    layer = model.layers[0].self_attn.o_proj
    layer.w1.set_value(np.random.default_rng(1).normal(size=layer.w1.shape).astype(np.float32))
    # rank(C1 ⊗ C2) = rank(C1) rank(C2) = 8 * 2 from 2 * 8 * 2 + 8 * 8 parameters
    assert np.linalg.matrix_rank(np.asarray(layer.delta_weight(), np.float64), tol=1e-6) == 16


def test_lokr_trains_from_yaml(tiny_args, tmp_path, play_files):
    config = tmp_path / "lokr.yaml"
    config.write_text("name: lokr\npeft: {method: lokr, rank: 2, alpha: 4.0, decompose_both: true}\n"
                      "train: {steps: 3, learning_rate: 0.01}\n"
                      f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), *tiny_args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lokr" and summary["rank"] == 2
    adapted = peft.apply(tiny_model(), LoKrConfig(rank=2, decompose_both=True))
    expected = sum(v.size for v in jax.tree.leaves(nnx.state(adapted, LoKr)))
    assert summary["trainable_params"] == expected
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


def test_lokr_bad_factor_is_one_line():
    with pytest.raises(PeftjaxError, match="decompose_factor must be -1 or a positive integer, got 0"):
        LoKrConfig(decompose_factor=0)
