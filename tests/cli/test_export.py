"""`peftjax generate` and `peftjax export` on a tiny trained run."""
import json

import numpy as np
import yaml

from peftjax.config import from_dict
from peftjax.models import from_pretrained
from peftjax.peft.hf import load_hf_adapter
from peftjax.train import load_base, load_run
from peftjax.data import random_blocks


def _trained_run(cli, tiny_args, tmp_path, config):
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


def test_generate_and_both_exports(cli, tiny_args, tmp_path, config):
    run = _trained_run(cli, tiny_args, tmp_path, config)
    gen = cli("generate", str(run), "Enter", "--max-new-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip()

    model, _ = load_run(run)
    ids = random_blocks(1, 8)

    proc = cli("export", str(run), "--format", "hf-peft", str(tmp_path / "adapter"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base, _ = load_base(from_dict(yaml.safe_load((run / "config.yaml").read_text())))
    np.testing.assert_allclose(load_hf_adapter(base, tmp_path / "adapter")(ids), model(ids), atol=1e-6)

    proc = cli("export", str(run), "--format", "hf", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    merged, _ = from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(merged(ids), model(ids), atol=2e-5, rtol=1e-5)

    again = cli("export", str(run), "--format", "hf", str(tmp_path / "merged"))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
