"""OFT: its closed form (block-diagonal Cayley-Neumann and exact Cayley rotations of the input), orthogonality,
identity at initialisation, and training from YAML (HF PEFT interop is in test_hf_interop.py, merging in
test_lifecycle.py)."""
import json

import numpy as np
import pytest
import scipy.linalg

from peftjax import peft
from peftjax.cli import main
from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.models import tiny_model
from peftjax.peft.oft import OFT, OFTConfig, OFTLinear


def _skew(u, b):
    q = np.zeros((b, b))
    q[np.triu_indices(b, 1)] = u
    return q - q.T


@pytest.mark.parametrize("neumann", [True, False])
def test_oft_closed_form(randomise, neumann):
    """y = x diag(R_1..R_k) W in float64, R_i = I + 2Q + 2Q^2 + 2Q^3 + Q^4 or (I - Q)(I + Q)^-1."""
    config = OFTConfig(block_size=16, targets="o_proj", use_cayley_neumann=neumann)
    layer = randomise(peft.apply(tiny_model(), config), OFT, scale=0.2).layers[0].self_attn.o_proj
    assert isinstance(layer, OFTLinear) and layer.oft_r.shape == (4, 120)
    eye = np.eye(16)
    blocks = []
    for u in np.asarray(layer.oft_r[...], np.float64):
        q = _skew(u, 16)
        blocks.append(eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q if neumann
                      else (eye - q) @ np.linalg.inv(eye + q))
    r = scipy.linalg.block_diag(*blocks)
    if not neumann:
        np.testing.assert_allclose(r.T @ r, np.eye(64), atol=1e-12)  # the exact transform is a rotation
    x = np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32)
    expected = x @ r @ np.asarray(layer.base.weight[...], np.float64)
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)


def test_oft_starts_as_the_base_and_rejects_a_block_size_that_does_not_divide():
    base = tiny_model()
    ids = random_blocks(2, 9)
    np.testing.assert_array_equal(np.asarray(peft.apply(base, OFTConfig(block_size=8))(ids)), np.asarray(base(ids)))
    with pytest.raises(PeftjaxError, match=r"OFT block_size 48 does not divide layers\.0\.\S+'s input size "
                                           r"(64|128); choose a divisor"):
        peft.apply(base, OFTConfig(block_size=48))


def test_oft_trains_from_yaml(tiny_args, tmp_path, play_files):
    config = tmp_path / "oft.yaml"
    config.write_text("name: oft\npeft: {method: oft, block_size: 8, targets: [q_proj, v_proj]}\n"
                      "train: {steps: 3, learning_rate: 0.01}\n"
                      f"data: {{dataset: files, eval_docs: 1, files: [{', '.join(map(str, play_files))}]}}\n")
    out = tmp_path / "run"
    assert main(["train", str(config), *tiny_args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "oft"
    assert summary["trainable_params"] == 2 * 2 * (64 // 8) * (8 * 7 // 2)  # 2 layers x q, v x 8 blocks x 28
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
