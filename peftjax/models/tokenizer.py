"""Byte-level BPE tokenizer built with the ``tokenizers`` library from a GGUF vocabulary (or a tokenizer.json).

SmolLM2's tokenizer splits digits one by one, then applies GPT-2 byte-level pre-tokenization and BPE merges. The
GGUF file stores the byte-level token strings, their merges and types (type 3 = control tokens such as
``<|im_start|>``), and the chat template.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors

from peftjax.errors import PeftjaxError

CONTROL_TOKEN_TYPE = 3


def _backend_from_dir(path: Path) -> HFTokenizer:
    """The ``tokenizers`` backend of a Hugging Face model directory's tokenizer.json."""
    file = path / "tokenizer.json"
    if not file.exists():
        raise PeftjaxError(f"{path} has no tokenizer.json; a Hugging Face model directory needs one")
    return HFTokenizer.from_file(str(file))


class Tokenizer:
    """Text <-> token ids, plus the model's special ids and chat template."""

    def __init__(self, backend: HFTokenizer, *, bos_id: int | None, eos_id: int | None,
                 chat_template: str | None = None):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """Render chat ``messages`` ([{"role": ..., "content": ...}]) with the model's Jinja chat template."""
        if not self.chat_template:
            raise PeftjaxError("this tokenizer has no chat template; use a model that ships one")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages,
                                                          add_generation_prompt=add_generation_prompt)

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> "Tokenizer":
        if fields.get("tokenizer.ggml.model") != "gpt2":
            raise PeftjaxError(f"GGUF tokenizer model {fields.get('tokenizer.ggml.model')!r} is not supported; "
                               "only byte-level BPE ('gpt2') tokenizers are")
        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                         fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, ty in zip(tokens, types) if ty == CONTROL_TOKEN_TYPE])
        return cls(backend, bos_id=fields.get("tokenizer.ggml.bos_token_id"),
                   eos_id=fields.get("tokenizer.ggml.eos_token_id"),
                   chat_template=fields.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        import json

        backend = _backend_from_dir(path)
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}

        def token_id(key):
            tok = cfg.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            return backend.token_to_id(tok) if tok else None

        return cls(backend, bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
                   chat_template=cfg.get("chat_template"))


def byte_tokenizer() -> Tokenizer:
    """A 256-token byte-level tokenizer (no merges) for tiny random-weight test models; id 0 doubles as EOS."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_id=None, eos_id=0)


class EncoderTokenizer(Tokenizer):
    """An encoder's tokenizer (WordPiece for BERT): ``encode`` adds the special tokens as transformers does
    (``[CLS] text [SEP]``, from tokenizer.json's post-processor), and ``batch`` pads to one length with a mask."""

    def __init__(self, backend: HFTokenizer, *, pad_id: int):
        super().__init__(backend, bos_id=None, eos_id=None)
        self.pad_id = pad_id

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=True)]

    def batch(self, texts: list[str], max_len: int):
        """(ids, attention_mask) int32 arrays (len(texts), L), L the longest encoding up to ``max_len``; longer
        texts are truncated keeping their final [SEP]."""
        import numpy as np

        rows = [ids if len(ids) <= max_len else ids[:max_len - 1] + ids[-1:] for ids in self.encode_batch(texts)]
        L = max(map(len, rows))
        ids = np.full((len(rows), L), self.pad_id, np.int32)
        mask = np.zeros((len(rows), L), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask

    @classmethod
    def from_hf_dir(cls, path: Path) -> "EncoderTokenizer":
        backend = _backend_from_dir(path)
        backend.no_padding()
        backend.no_truncation()
        pad = backend.token_to_id("[PAD]")
        return cls(backend, pad_id=0 if pad is None else pad)
