"""Sequence classification on the BERT encoder (all-MiniLM-L6-v2) from YAML-shaped configs: every
method that makes sense on an encoder trains its parameters and the classifier head, and evaluation reports
accuracy; the k-fold split and the encoder-only settings behave as documented."""
import jax
import numpy as np
import pytest

from peftjax import partition
from peftjax.config import from_dict
from peftjax.data import fold_records
from peftjax.errors import PeftjaxError
from peftjax.train import build, make_optimizer, make_train_step
from peftjax.train.step import evaluate, make_eval_fn

BASE = {"model": {"name": "all-minilm-l6-v2", "num_layers": 1},
        "data": {"task": "classify", "dataset": "polarity", "seq_len": 16, "folds": 5, "fold": 1,
                 "max_eval_blocks": 40},
        "train": {"steps": 2, "batch_size": 8, "learning_rate": 0.01}}
METHODS = {
    "lora": {"peft": {"method": "lora", "rank": 4, "targets": "all-linear"}},
    "qlora": {"preset": "qlora", "peft": {"method": "lora", "rank": 4, "targets": "all-linear"}},
    "ia3": {"peft": {"method": "ia3", "targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]}},
    "prompt": {"peft": {"method": "prompt", "num_tokens": 4}},
    "full": {"peft": {"method": "full"}},
    "bitfit": {"peft": {"method": "selective", "targets": r".*\.bias"}},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_encoder_method_trains_its_parameters_and_the_head(method):
    config = from_dict({**BASE, **METHODS[method], "peft": {**METHODS[method]["peft"]}})
    built = build(config)
    graphdef, trainable, frozen = partition.split(built.model)
    names = {".".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert any("classifier" in n for n in names) and any("classifier" not in n for n in names)
    optimizer = make_optimizer(config.train)
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer)
    before = jax.tree.map(np.asarray, trainable)
    rows = built.data.train
    for i in range(config.train.steps):
        batch = jax.tree.map(jax.numpy.asarray, rows.batch(np.arange(8 * i, 8 * i + 8)))
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree_util.tree_flatten_with_path(
        jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), trainable, before))[0]
    # every trained leaf moved, but the pooler's: mean pooling never reads it (its gradient is zero)
    assert all(m for p, m in moved if "pooler" not in jax.tree_util.keystr(p)), [
        jax.tree_util.keystr(p) for p, m in moved if not m]
    result = evaluate(make_eval_fn(graphdef), trainable, frozen, built.data.eval, 16)
    assert len(built.data.eval) == 40 and 0.0 <= result["eval_accuracy"] <= 1.0 and np.isfinite(result["eval_loss"])


def test_folds_partition_the_records():
    records = [{"text": str(i), "label": "pos"} for i in range(23)]
    held = [fold_records(records, 5, k)[1] for k in range(5)]
    assert sorted(r["text"] for fold in held for r in fold) == sorted(r["text"] for r in records)
    assert {len(f) for f in held} == {4, 5}
    train, evals = fold_records(records, 5, 2)
    assert not {r["text"] for r in train} & {r["text"] for r in evals}


@pytest.mark.parametrize("edit, message", [
    ({"data": {**BASE["data"], "task": "lm", "dataset": "shakespeare", "folds": 0}}, "is an encoder; it trains"),
    ({"data": {**BASE["data"], "pooling": "max"}}, "data.pooling must be mean, cls or pooler"),
    ({"model": {"name": "tiny"}, "data": {**BASE["data"], "pooling": "cls"}}, "data.pooling is for encoders"),
    ({"data": {**BASE["data"], "fold": 5}}, "0 <= data.fold < data.folds"),
])
def test_encoder_settings_are_one_line_errors(edit, message):
    with pytest.raises(PeftjaxError, match=message):
        build(from_dict({**BASE, **METHODS["lora"], **edit}))
