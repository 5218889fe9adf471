"""Data tasks: SFT loss mask on response tokens only, verbalizer rows, the polarity asset, record files through
datasets, deterministic and resumable batch order."""
import json

import numpy as np
import pytest

from peftjax.data import (index_batches, load_records, polarity_records, render_chat, sft_rows, split_records,
                          verbalizer_rows)
from peftjax.errors import PeftjaxError
from peftjax.models.tokenizer import byte_tokenizer

@pytest.fixture
def tok(chat_template):
    """The byte tokenizer with a small chat template."""
    tok = byte_tokenizer()
    tok.chat_template = chat_template
    return tok


def _targets(rows, r):
    """The target token ids the loss counts in row r."""
    return rows.tokens[r, 1:][rows.loss_mask[r] > 0].tolist()


def test_sft_mask_covers_exactly_the_response_and_eos(tok):
    rows = sft_rows([{"prompt": "What is 2+2?", "response": "Four."}], tok, seq_len=64)
    assert _targets(rows, 0) == tok.encode("Four.\n") + [tok.eos_id]
    rendered = tok.encode("<user>What is 2+2?\n<assistant>Four.\n") + [tok.eos_id]
    assert rows.tokens[0, : len(rendered)].tolist() == rendered
    assert rows.loss_mask[0].sum() == len(tok.encode("Four.\n")) + 1  # padding and prompt count nothing


def test_chat_mask_covers_every_assistant_turn_only(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Ciao"}]
    ids, flags = render_chat(tok, messages)
    assert tok.decode(ids) == tok.apply_chat_template(messages)
    assert tok.decode([i for i, f in zip(ids, flags) if f]) == "Hello\nCiao\n"
    rows = sft_rows([{"messages": messages}], tok, seq_len=128)
    assert _targets(rows, 0) == tok.encode("Hello\nCiao\n") + [tok.eos_id]


def test_sft_truncation_and_missing_fields_are_clear(tok):
    with pytest.raises(PeftjaxError, match="cut off at data.seq_len=8"):
        sft_rows([{"prompt": "a long prompt here", "response": "yes"}], tok, seq_len=8)
    with pytest.raises(PeftjaxError, match="record has no field 'response'"):
        sft_rows([{"prompt": "p", "answer": "a"}], tok, seq_len=32)


def test_verbalizer_rows_put_the_label_word_after_the_template(tok):
    rows = verbalizer_rows([{"text": "great", "label": "pos"}, {"text": "awful film", "label": "neg"}], tok,
                           seq_len=32, template="Review: {text}\nSentiment: ", labels=["neg", "pos"],
                           label_words=["bad", "good"])  # byte tokens: the first token of a word is its letter
    assert rows.candidates.tolist() == [tok.encode("b")[0], tok.encode("g")[0]]
    assert rows.label.tolist() == [1, 0]
    for r, text in enumerate(["great", "awful film"]):
        prompt = tok.encode(f"Review: {text}\nSentiment: ")
        assert rows.label_pos[r] == len(prompt) - 1
        assert rows.tokens[r, len(prompt)] == rows.candidates[rows.label[r]]
        assert _targets(rows, r) == [rows.candidates[rows.label[r]]]  # the loss counts the label word only
    with pytest.raises(PeftjaxError, match="start with the same token"):
        verbalizer_rows([], tok, seq_len=8, template="{text}", labels=["a", "b"], label_words=["no", "nay"])


def test_polarity_asset_has_200_balanced_labelled_sentences():
    from peftjax.assets import fetch

    records = polarity_records(fetch("gensim-testdata", quiet=True) / "gensim/test/test_data/pang_lee_polarity.cor")
    assert len(records) == 200
    assert sorted({r["label"] for r in records}) == ["neg", "pos"]
    assert sum(r["label"] == "pos" for r in records) == 100
    assert records[0] == {"text": "simplistic , silly and tedious .", "label": "neg"}
    train, held = split_records(records, 40)
    assert len(held) == 40 and len(train) == 160
    assert split_records(records[::-1], 40)[1] == held[::-1]  # chosen by content, not by position


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_record_files_load_through_datasets(tmp_path, suffix):
    import datasets

    records = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(5)]
    path = tmp_path / f"r.{suffix}"
    ds = datasets.Dataset.from_list(records)
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == "csv":
        ds.to_csv(str(path), index=False)
    else:
        ds.to_parquet(str(path))
    assert load_records([path]) == records
    with pytest.raises(PeftjaxError, match="record tasks read"):
        load_records([tmp_path / "x.txt"])


def test_batch_order_is_deterministic_from_the_seed_and_resumable():
    def take(seed, start, n):
        it = index_batches(10, 3, seed, start)
        return [next(it).tolist() for _ in range(n)]

    run = take(0, 0, 8)  # crosses epochs (3 batches per epoch of 10 rows)
    assert run == take(0, 0, 8) and run != take(1, 0, 8)
    assert run[5:] == take(0, 5, 3)  # the data position alone restores the order
    assert all(len(set(b)) == 3 for b in run)
    assert sorted(np.concatenate(run[:3]).tolist()) == sorted(set(np.concatenate(run[:3]).tolist()))
