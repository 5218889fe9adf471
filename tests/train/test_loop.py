"""The loop: gradient accumulation, schedules, decay mask, per-group rates, remat, the non-finite guard, eval with
accuracy, SFT and verbalizer runs end to end, load_run."""
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import partition, peft
from peftjax.config import from_dict
from peftjax.data import verbalizer_rows
from peftjax.errors import PeftjaxError
from peftjax.models.tokenizer import byte_tokenizer
from peftjax.peft import LoRAConfig
from peftjax.train import (TaskData, decay_mask, evaluate, load_run, make_eval_fn, make_optimizer, make_schedule,
                           make_train_step, param_groups, run)
from peftjax.data import random_blocks
from peftjax.models import tiny_model


def _lora():
    return partition.split(peft.apply(tiny_model(), LoRAConfig(rank=4)))


def _train(**kw):
    return from_dict({"train": {"steps": 10, "learning_rate": 1e-2, **kw}}).train


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_grad_accumulation_equals_one_big_batch():
    """Micro-batches that count unequal numbers of targets (15 + 16 vs 3 + 0): the accumulated step is the big
    batch's token-weighted mean, which a mean of per-micro-batch means would miss."""
    graphdef, trainable, frozen = _lora()
    opt = make_optimizer(_train())
    tokens = random_blocks(4, 17, seed=1)
    mask = np.ones((4, 16), np.float32)
    mask[0, :1] = 0  # row 0: 15 targets, row 1: 16
    mask[2, 3:] = 0  # row 2: 3 targets
    mask[3] = 0  # row 3: none (padding only)
    big = make_train_step(graphdef, opt)
    acc = make_train_step(graphdef, opt, grad_accum=2)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (the steps donate their inputs)
    batch = {"tokens": tokens, "loss_mask": jnp.asarray(mask)}
    micro = {"tokens": tokens.reshape(2, 2, 17), "loss_mask": jnp.asarray(mask).reshape(2, 2, 16)}
    t1, _, m1 = big(copy(trainable), opt.init(trainable), frozen, batch)
    t2, _, m2 = acc(copy(trainable), opt.init(trainable), frozen, micro)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(_leaves(t1), _leaves(t2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_remat_gives_the_same_step():
    graphdef, trainable, frozen = _lora()
    opt = make_optimizer(_train())
    blocks = random_blocks(2, 17, seed=2)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    t1, _, _ = make_train_step(graphdef, opt)(copy(trainable), opt.init(trainable), frozen, blocks)
    remat = make_train_step(graphdef, opt, remat=True)
    # remat must keep less for the backward pass than the plain step (on XLA CPU, jax.checkpoint alone did not)
    long = random_blocks(8, 129, seed=2)
    temp = lambda step: step.lower(trainable, opt.init(trainable), frozen, long).compile() \
        .memory_analysis().temp_size_in_bytes  # noqa: E731
    assert temp(remat) < 0.8 * temp(make_train_step(graphdef, opt))
    t2, _, _ = remat(copy(trainable), opt.init(trainable), frozen, blocks)
    for a, b in zip(_leaves(t1), _leaves(t2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("layers, scans", [(None, True), ([0, 2], False)])
def test_scanned_layers_give_the_unrolled_step(layers, scans):
    """``scan_layers``: alike layers run as one lax.scan (one layer in the compiled step, not four) and give the
    unrolled step's loss and update, with dropout and remat; layers that differ (LoRA on layers 0 and 2 only) fall
    back to the unrolled loop."""
    model = peft.apply(tiny_model(), LoRAConfig(rank=4, dropout=0.1, layers_to_transform=layers))
    opt = make_optimizer(_train())
    blocks, key = random_blocks(2, 17, seed=2), jax.random.key(5)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    results = {}
    for scan in (False, True):
        model.scan_layers = scan
        graphdef, trainable, frozen = partition.split(model)
        step = make_train_step(graphdef, opt, remat=True)
        hlo = step.lower(trainable, opt.init(trainable), frozen, blocks, key).as_text()
        results[scan] = hlo.count("stablehlo.while"), step(copy(trainable), opt.init(trainable), frozen, blocks, key)
    assert (results[True][0] > results[False][0]) == scans
    (t1, _, m1), (t2, _, m2) = results[False][1], results[True][1]
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(_leaves(t1), _leaves(t2), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_learning_rate_is_an_input_of_the_compiled_step_and_adamw_is_optax_adamw():
    """Two learning rates lower to the same step program (a sweep over them compiles once); the updates equal
    clipping + ``optax.adamw`` with the whole schedule, decay masked to matrices, over 5 steps (to float32
    rounding)."""
    graphdef, trainable, frozen = _lora()
    blocks = random_blocks(2, 17, seed=2)
    texts = []
    for lr in (1e-2, 3e-4):
        opt = make_optimizer(_train(learning_rate=lr, warmup_steps=2))
        texts.append(make_train_step(graphdef, opt).lower(trainable, opt.init(trainable), frozen, blocks).as_text())
    assert texts[0] == texts[1]
    tc = _train(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1)
    ours = make_optimizer(tc)
    ref = optax.chain(optax.clip_by_global_norm(tc.grad_clip),
                      optax.adamw(make_schedule(tc, tc.learning_rate), weight_decay=0.1, mask=decay_mask))
    params = jax.tree.map(lambda x: x + 0.5, trainable)
    states = ours.init(params), ref.init(params)
    for i in range(5):
        grads = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), params)
        (u1, s1), (u2, s2) = ours.update(grads, states[0], params), ref.update(grads, states[1], params)
        states = s1, s2
        for a, b in zip(_leaves(u1), _leaves(u2), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
        params = optax.apply_updates(params, u2)


def test_nonfinite_loss_skips_the_update():
    graphdef, trainable, frozen = _lora()
    opt = make_optimizer(_train())
    opt_state = opt.init(trainable)
    before, before_opt = _leaves(trainable), _leaves(opt_state)
    step = make_train_step(graphdef, opt)
    tokens = random_blocks(2, 17)
    bad = {"tokens": tokens, "loss_mask": jnp.full((2, 16), np.nan, jnp.float32)}
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, bad)
    assert not bool(metrics["finite"])
    for a, b in zip(before + before_opt, _leaves(trainable) + _leaves(opt_state)):
        np.testing.assert_array_equal(a, b)
    good = {"tokens": tokens, "loss_mask": jnp.ones((2, 16), jnp.float32)}
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, good)
    assert bool(metrics["finite"]) and step._cache_size() == 1
    assert any((a != b).any() for a, b in zip(before, _leaves(trainable)))


def test_schedules_warmup_cosine_and_constant():
    s = make_schedule(_train(steps=12, warmup_steps=2, min_lr_ratio=0.1), 1.0)
    assert float(s(0)) == 0.0 and float(s(1)) == pytest.approx(0.5) and float(s(2)) == pytest.approx(1.0)
    assert float(s(12)) == pytest.approx(0.1) and float(s(7)) == pytest.approx(0.55)
    c = make_schedule(_train(steps=12, warmup_steps=2, schedule="constant"), 1.0)
    assert [float(c(i)) for i in (1, 2, 11)] == pytest.approx([0.5, 1.0, 1.0])


def test_weight_decay_skips_vectors_and_groups_come_from_variable_types():
    from peftjax.peft import FullConfig

    _, trainable, _ = partition.split(peft.apply(tiny_model(), FullConfig()))
    flat = jax.tree_util.tree_flatten_with_path(decay_mask(trainable))[0]
    by_path = {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in flat}
    assert by_path["norm/weight/value"] is False
    assert by_path["layers/0/self_attn/q_proj/weight/value"] is True
    assert set(jax.tree.leaves(param_groups(trainable))) == {"tuned"}
    assert set(jax.tree.leaves(param_groups(_lora()[1]))) == {"lora"}


def test_group_learning_rate_applies_to_its_group():
    graphdef, trainable, frozen = _lora()
    blocks = random_blocks(2, 17, seed=4)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    results = []
    for tc in (_train(learning_rate=0.05), _train(learning_rate=1e-4, group_learning_rates={"lora": 0.05})):
        opt = make_optimizer(tc)
        results.append(make_train_step(graphdef, opt)(copy(trainable), opt.init(trainable), frozen, blocks)[0])
    for a, b in zip(_leaves(results[0]), _leaves(results[1])):
        np.testing.assert_allclose(a, b, atol=1e-7)
    with pytest.raises(PeftjaxError, match="unknown group 'lroa'; did you mean lora"):
        from_dict({"train": {"group_learning_rates": {"lroa": 0.1}}})


def test_verbalizer_accuracy_matches_a_direct_computation():
    graphdef, trainable, frozen = _lora()
    tok = byte_tokenizer()
    records = [{"text": t, "label": lab} for t, lab in [("fun", "pos"), ("dull", "neg"), ("ok", "pos")] * 3]
    rows = verbalizer_rows(records, tok, seq_len=16, template="{text} is ", labels=["neg", "pos"],
                           label_words=["bad", "good"])
    got = evaluate(make_eval_fn(graphdef, candidates=rows.candidates), trainable, frozen, rows, batch_size=4)
    model = partition.merge(graphdef, trainable, frozen)
    logits = np.asarray(model(jnp.asarray(rows.tokens[:, :-1])))
    scores = logits[np.arange(len(rows)), rows.label_pos][:, rows.candidates]
    assert got["eval_accuracy"] == pytest.approx(float((scores.argmax(-1) == rows.label).mean()))
    targets = rows.tokens[np.arange(len(rows)), rows.label_pos + 1]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[np.arange(len(rows)), rows.label_pos], targets)
    assert got["eval_loss"] == pytest.approx(float(ce.mean()), rel=1e-5)  # 9 rows, padded last batch counts nothing


def _sft_config(chat_template, tmp_path, **train):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {i} and {i}", "response": f"{2 * i}"}) + "\n"
                            for i in range(12)))
    return from_dict({"name": "sft", "model": {"name": "tiny"}, "peft": {"rank": 4},
                      "data": {"task": "sft", "dataset": "files", "files": [str(path)], "seq_len": 32,
                               "eval_docs": 4, "chat_template": chat_template},
                      "train": {"steps": 6, "batch_size": 2, "learning_rate": 0.01, "eval_every": 3,
                                "save_every": 2, **train}})


def test_sft_run_end_to_end_and_load_run(chat_template, tmp_path):
    out = tmp_path / "run"
    summary = run(_sft_config(chat_template, tmp_path, grad_accum=2), out, progress=False)
    assert summary["task"] == "sft" and summary["eval_ppl_after"] == pytest.approx(np.exp(summary["eval_loss_after"]))
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    model, tok = load_run(out)
    assert tok.chat_template == chat_template
    _, restored, _ = partition.split(model)
    meta = json.loads((out / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["step"] == 6 and meta["data_position"] == 12
    assert partition.param_count(restored) == summary["trainable_params"]


def test_nonfinite_run_stops_with_last_good_checkpoint(chat_template, tmp_path, monkeypatch):
    original = TaskData.train_batch
    calls = []

    def poisoned(self, indices):
        batch = original(self, indices)
        calls.append(1)
        if len(calls) > 4:  # steps 5.. see NaN
            batch["loss_mask"] = batch["loss_mask"] * np.nan
        return batch

    monkeypatch.setattr(TaskData, "train_batch", poisoned)
    out = tmp_path / "run"
    with pytest.raises(PeftjaxError, match=r"stopped at step 7: 3 non-finite .* Last good checkpoint: step 4 in"):
        run(_sft_config(chat_template, tmp_path, steps=20, max_nonfinite=3, eval_every=0), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False] * 4 + [True] * 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "4"]
    assert not (out / "summary.json").exists()


def test_resume_with_a_different_config_names_the_key(chat_template, tmp_path):
    config = _sft_config(chat_template, tmp_path, steps=2, save_every=0, eval_every=0)
    run(config, tmp_path / "run", progress=False)
    changed = from_dict({**_as_dict(config), "train": {**_as_dict(config)["train"], "learning_rate": 0.5}})
    with pytest.raises(PeftjaxError, match=r"--resume: train.learning_rate is 0.01 in .* but 0.5 now"):
        run(changed, tmp_path / "run", progress=False, resume=True)
    with pytest.raises(PeftjaxError, match="already exists and is not empty; pass --resume"):
        run(config, tmp_path / "run", progress=False)
    with pytest.raises(PeftjaxError, match="--resume and --overwrite contradict"):
        run(config, tmp_path / "run", progress=False, resume=True, overwrite=True)


def _as_dict(config):
    from peftjax.config import to_dict

    return to_dict(config)


def test_classify_run_reports_accuracy(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("text,label\n" + "".join(f"{w} movie {i},{lab}\n" for i in range(10)
                                             for w, lab in (("fun", "pos"), ("dull", "neg"))))
    config = from_dict({"model": {"name": "tiny"}, "peft": {"rank": 4},
                        "data": {"task": "classify", "dataset": "files", "files": [str(path)], "seq_len": 24,
                                 "eval_docs": 6, "labels": ["neg", "pos"], "label_words": ["bad", "good"],
                                 "template": "{text}: "},
                        "train": {"steps": 3, "batch_size": 4, "learning_rate": 0.01}})
    summary = run(config, tmp_path / "run", progress=False)
    assert summary["eval_blocks"] == 6
    for key in ("eval_accuracy_before", "eval_accuracy_after"):  # a share of the 6 held-out examples, not a mean
        assert summary[key] * 6 == pytest.approx(round(summary[key] * 6)), (key, summary[key])  # of batch means
    text = textwrap.dedent((tmp_path / "run" / "config.yaml").read_text())
    assert "task: classify" in text


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_bfloat16_policy_trains_with_dense_or_quantized_base(quant):
    from peftjax.train import DTYPES, build_model

    config = from_dict({"model": {"name": "tiny", "param_dtype": "bfloat16", "compute_dtype": "bfloat16"},
                        "peft": {"rank": 4}, "quant": {"format": quant}, "train": {"steps": 2}})
    graphdef, trainable, frozen = partition.split(build_model(config)[0])
    dense = [x for x in jax.tree.leaves(frozen) if jnp.issubdtype(x.dtype, jnp.floating) and x.ndim == 2]
    assert dense and all(x.dtype == jnp.bfloat16 for x in dense)  # embeddings (and unquantized weights)
    opt = make_optimizer(config.train)
    step = make_train_step(graphdef, opt, DTYPES[config.model.compute_dtype])
    trainable, _, metrics = step(trainable, opt.init(trainable), frozen, random_blocks(2, 17))
    assert bool(metrics["finite"]) and 4.0 < float(metrics["loss"]) < 7.0  # about ln(256) for random weights


def test_dropout_key_makes_the_step_stochastic_but_reproducible():
    graphdef, trainable, frozen = partition.split(peft.apply(tiny_model(), LoRAConfig(rank=4, dropout=0.5)))
    opt = make_optimizer(_train())
    blocks = random_blocks(2, 17, seed=5)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    for accum, batch in ((1, blocks), (2, blocks.reshape(2, 1, 17))):
        step = make_train_step(graphdef, opt, grad_accum=accum)
        # B starts at zero, so the first loss is dropout-free; the update of B sees the dropped inputs
        keys = (jax.random.key(0), jax.random.key(0), jax.random.key(1)) + ((None,) if accum == 1 else ())
        after = [np.concatenate([x.ravel() for x in _leaves(step(copy(trainable), opt.init(trainable), frozen,
                                                                 batch, key)[0])]) for key in keys]
        np.testing.assert_array_equal(after[0], after[1])
        assert all(not np.array_equal(after[0], other) for other in after[2:])
