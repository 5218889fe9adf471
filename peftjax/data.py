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
    stream = np.fromiter((t for ids in ids_lists for t in (*ids, eos_id)), dtype=np.int32)
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

    # one batch = every document: packing runs across document boundaries, like the usual group_texts recipe
    ds = ds.map(tokenize_and_pack, batched=True, batch_size=len(ds), remove_columns=ds.column_names,
                keep_in_memory=True)
    return np.asarray(ds.with_format("numpy")["input_ids"], dtype=np.int32).reshape(-1, block)


def lm_data(files: list[Path], tokenizer, *, seq_len: int, eval_docs: int, max_eval_blocks: int) -> LMData:
    for f in files:
        if not Path(f).exists():
            raise PeftjaxError(f"data file {f} not found")
    train_files, eval_files = split_by_document([Path(f) for f in files], eval_docs)
    from peftjax.assets import cache_dir

    cache = cache_dir() / "datasets"
    train = text_documents_to_blocks(train_files, tokenizer, seq_len + 1, cache)
    evals = text_documents_to_blocks(eval_files, tokenizer, seq_len + 1, cache)[:max_eval_blocks]
    if len(train) == 0 or len(evals) == 0:
        raise PeftjaxError(f"not enough text for one block of {seq_len + 1} tokens in the train or eval split; "
                           "lower data.seq_len or add data")
    return LMData(train, evals, [p.name for p in train_files], [p.name for p in eval_files])


def batches(blocks: np.ndarray, batch_size: int, seed: int, start_step: int = 0):
    """Endless batches of (batch_size, block) from a seeded permutation per epoch; deterministic in (seed, step)."""
    n = len(blocks)
    if n < batch_size:
        raise PeftjaxError(f"only {n} training blocks for batch_size {batch_size}; lower train.batch_size")
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        yield blocks[order[i * batch_size:(i + 1) * batch_size]]
        step += 1
