"""Typed run configuration: dataclasses loaded from YAML, dotted ``--set a.b=value`` overrides, validation.

Unknown keys are errors that name the key and suggest the nearest valid one; values are type-checked before any
work starts. ``to_dict(config)`` gives the resolved config that a run directory records.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from peftjax.errors import PeftjaxError


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    name: str = "smollm2"  # "smollm2", a .gguf path, a Hugging Face directory, or "tiny" (random weights)
    num_layers: int | None = None  # keep only the first N decoder layers (CPU-sized experiments); None = all
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False  # activation checkpointing: recompute activations in the backward pass (saves memory)


@dataclasses.dataclass(kw_only=True)
class PeftConfig:
    method: str = "lora"  # a registered method: lora, dora (lora + dora: true), ia3, prefix, prompt, vera, full, ...
    rank: int = 8
    alpha: float = 16.0
    targets: str | list[str] | None = None  # None: the method's default (LoRA: all-linear, IA3: k/v/down, ...)
    rslora: bool = False
    dropout: float = 0.0  # LoRA dropout on the adapter input; its key per step is fold_in(seed, step)
    dora: bool = False  # LoRA: DoRA magnitude vector
    init: str | None = None  # LoRA: default, gaussian, pissa, loftq
    qat_format: str | None = None  # LoRA: train against fake_quant(W + sAB) in this format
    num_tokens: int | None = None  # prefix / prompt length
    reparameterize: bool | None = None  # prefix: MLP reparameterisation during training


# the label words of the shipped polarity task: " negative" / " positive" each start with one SmolLM2 token
POLARITY = {"labels": ["neg", "pos"], "label_words": [" negative", " positive"],
            "template": "Review: {text}\nSentiment:"}


@dataclasses.dataclass(kw_only=True)
class QuantConfig:
    format: str | None = None  # None keeps the base in param_dtype; "nf4" with LoRA is QLoRA
    block_size: int | None = 64
    double_quant: bool = False
    targets: str | list[str] = "all-linear"


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    task: str = "lm"  # "lm" (causal LM on raw text), "sft" (prompt/response or chat), "classify" (verbalizer)
    dataset: str = "shakespeare"  # "shakespeare" or "polarity" (pinned assets), or "files"
    files: list[str] = dataclasses.field(default_factory=list)  # .txt for lm; .json/.jsonl/.csv/.parquet records
    seq_len: int = 256  # block length for lm; the longest row (truncated, right-padded) for sft and classify
    eval_docs: int = 2  # held out for evaluation, chosen by a hash: documents (lm) or records (sft, classify)
    max_eval_blocks: int = 16  # at most this many eval blocks / rows
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"  # a record with this field is a chat: [{role, content}, ...]
    chat_template: str | None = None  # Jinja template overriding the tokenizer's (needed for the byte tokenizer)
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] = dataclasses.field(default_factory=list)  # classify: label values; default for polarity
    label_words: list[str] = dataclasses.field(default_factory=list)  # classify: the word scored for each label
    template: str | None = None  # classify: the prompt, "{text}" filled in; the label word follows it


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 4
    learning_rate: float = 1e-3
    schedule: str = "cosine"  # "cosine" (to min_lr_ratio * learning_rate) or "constant", after linear warmup
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    group_learning_rates: dict[str, float] = dataclasses.field(default_factory=dict)  # {prompt: 0.03, lora: ...}
    weight_decay: float = 0.0  # decoupled (AdamW); never applied to vectors (norm scales, biases, IA3)
    grad_clip: float | None = 1.0
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # evaluate every N steps (0: before and after training only)
    eval_batch_size: int = 8
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2
    max_nonfinite: int = 5  # stop after this many non-finite (skipped) steps in a row


TASKS = ("lm", "sft", "classify")
DATASETS = {"shakespeare": "lm", "polarity": "classify", "files": None}  # built-in data sets and their task


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)


def _type_ok(value: Any, tp) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return isinstance(value, dict) and all(_type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items())
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _coerce_float(value: Any, tp) -> Any:
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; accept it where the key wants a float."""
    if typing.get_origin(tp) is dict and isinstance(value, dict):
        return {k: _coerce_float(v, typing.get_args(tp)[1]) for k, v in value.items()}
    wants_float = tp is float or float in typing.get_args(tp)
    if wants_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise PeftjaxError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(fields)}"
            raise PeftjaxError(f"unknown config key {prefix}{key}{hint}")
        tp = hints[key]
        value = _coerce_float(value, tp)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        if not _type_ok(value, tp):
            raise PeftjaxError(f"config key {prefix}{key} must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PeftjaxError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in text:
        raise PeftjaxError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return key.strip(), raw


def load_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PeftjaxError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise PeftjaxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise PeftjaxError(f"{path} must hold a mapping of config sections")
    return data


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    config = _build(RunConfig, data, "")
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Checks that need more than types; every failure names the key."""
    from peftjax.peft import registered_methods

    checks = [
        (config.peft.method in registered_methods(),
         f"peft.method {config.peft.method!r} is unknown; registered methods: {', '.join(registered_methods())}"),
        (config.peft.rank >= 1, f"peft.rank must be >= 1, got {config.peft.rank}"),
        (0.0 <= config.peft.dropout < 1.0, f"peft.dropout must be in [0, 1), got {config.peft.dropout}"),
        (config.data.seq_len >= 2, f"data.seq_len must be >= 2, got {config.data.seq_len}"),
        (config.train.steps >= 1, f"train.steps must be >= 1, got {config.train.steps}"),
        (config.train.batch_size >= 1, f"train.batch_size must be >= 1, got {config.train.batch_size}"),
        (config.train.learning_rate > 0, f"train.learning_rate must be > 0, got {config.train.learning_rate}"),
        (config.data.task in TASKS, f"data.task must be one of {', '.join(TASKS)}, got {config.data.task!r}"),
        (config.data.dataset in DATASETS,
         f"data.dataset must be one of {', '.join(DATASETS)}, got {config.data.dataset!r}"),
        (config.data.dataset != "files" or config.data.files, "data.files is empty; list files to train on"),
        (config.data.dataset == "files" or DATASETS[config.data.dataset] == config.data.task,
         f"data.dataset {config.data.dataset!r} is a {DATASETS.get(config.data.dataset)!r} task; "
         f"set data.task={DATASETS.get(config.data.dataset)} or data.dataset=files"),
        (config.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {config.train.grad_accum}"),
        (config.train.schedule in ("cosine", "constant"),
         f"train.schedule must be 'cosine' or 'constant', got {config.train.schedule!r}"),
        (config.train.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {config.train.keep_checkpoints}"),
        (config.train.max_nonfinite >= 1, f"train.max_nonfinite must be >= 1, got {config.train.max_nonfinite}"),
        (config.train.eval_every >= 0 and config.train.save_every >= 0,
         "train.eval_every and train.save_every must be >= 0"),
        (config.data.task != "classify" or config.data.dataset == "polarity" or config.data.labels,
         "data.labels is empty; list the label values of the classification task"),
        (config.model.param_dtype in ("float32", "bfloat16"), "model.param_dtype must be float32 or bfloat16"),
        (config.model.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype must be float32 or bfloat16"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftjaxError(message)
    from peftjax.train import trainable_groups

    groups = trainable_groups()
    for name in config.train.group_learning_rates:
        if name not in groups:
            near = difflib.get_close_matches(name, groups, n=1)
            hint = f"; did you mean {near[0]}?" if near else f"; groups: {', '.join(groups)}"
            raise PeftjaxError(f"train.group_learning_rates has unknown group {name!r}{hint}")
    for f in config.data.files:
        if not Path(f).exists():
            raise PeftjaxError(f"data file {f} not found (data.files)")


def to_dict(config: RunConfig) -> dict:
    return dataclasses.asdict(config)
