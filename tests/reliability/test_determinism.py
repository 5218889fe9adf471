"""Determinism: the same config gives bitwise the same losses and checkpoint values; the adapter's initialisation
follows the config's seed."""
import json

from peftjax.config import from_dict
from peftjax.train import run


def _config(files, seed=0):
    return from_dict({"model": {"name": "tiny"}, "peft": {"method": "lora", "rank": 2, "dropout": 0.1},
                      "data": {"dataset": "files", "eval_docs": 1, "seq_len": 32, "max_eval_blocks": 4,
                               "files": [str(f) for f in files]},
                      "train": {"steps": 3, "batch_size": 2, "learning_rate": 0.01, "seed": seed}})


def _hashes(run_dir, step=3):
    """The checksum of every saved trainable and optimizer leaf (recorded in the checkpoint's meta)."""
    return json.loads((run_dir / "checkpoints" / str(step) / "meta" / "metadata").read_text())["checksum"]


def _losses(run_dir):
    return [r.get("loss", r.get("eval_loss")) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text()
                                                             .splitlines())]


def test_same_config_same_bits_and_the_seed_matters(play_files, tmp_path):
    a = run(_config(play_files), tmp_path / "a", progress=False)
    b = run(_config(play_files), tmp_path / "b", progress=False)
    c = run(_config(play_files, seed=1), tmp_path / "c", progress=False)
    for key in ("eval_loss_before", "eval_loss_after", "train_loss_first", "train_loss_last"):
        assert a[key] == b[key], key
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")
    assert _hashes(tmp_path / "a")["trainable"] != _hashes(tmp_path / "c")["trainable"]
    assert a["train_loss_last"] != c["train_loss_last"]


def test_adapter_initialisation_follows_the_config_seed(play_files):
    import jax
    import numpy as np

    from peftjax import partition
    from peftjax.train import build_model

    def init(seed):
        return jax.tree.leaves(partition.split(build_model(_config(play_files, seed=seed))[0])[1])

    same = [np.array_equal(x, y) for x, y in zip(init(0), init(0), strict=True)]
    other = [np.array_equal(x, y) for x, y in zip(init(0), init(1), strict=True)]
    assert all(same) and not all(other)
