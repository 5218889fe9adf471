"""Typed run configuration: dataclasses loaded from YAML, dotted ``--set a.b=value`` overrides, validation.

The ``peft:`` section is the registered method's own config dataclass (dispatched on ``peft.method``), so a new
method's every option is settable from YAML, ``--set`` and sweeps with no change here; ``quant:`` is an ordered
list of :class:`~peftjax.quant.policy.QuantRule`; ``preset:`` names settings from :mod:`peftjax.config.presets`.
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

from peftjax.config.presets import get_preset
from peftjax.errors import PeftjaxError
from peftjax.models.llama import ATTENTION_IMPLEMENTATIONS
from peftjax.peft import LoRAConfig, config_fields, get_method, method_for_config
from peftjax.quant import get_format
from peftjax.quant.policy import QuantRule
from peftjax.sharding import LOGICAL_RULES, MESH_AXES
from peftjax.variables import trainable_groups


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    name: str = "smollm2"  # "smollm2", a .gguf path, a Hugging Face directory, or "tiny" (random weights)
    num_layers: int | None = None  # keep only the first N decoder layers (CPU-sized experiments); None = all
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False  # activation checkpointing: recompute activations in the backward pass (saves memory)
    # run alike decoder layers as one lax.scan (one layer compiled instead of num_layers; same results)
    scan_layers: bool = False
    # decoder attention: "auto" = cuDNN's fused flash attention on an NVIDIA GPU in bfloat16 / float16 where it
    # applies (plain causal attention), the einsum path otherwise; "xla" = always the einsum path
    attention: str = "auto"


# the label words of the shipped polarity task: " negative" / " positive" each start with one SmolLM2 token
POLARITY = {"labels": ["neg", "pos"], "label_words": [" negative", " positive"],
            "template": "Review: {text}\nSentiment:"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """The base's quantization policy: ordered rules, first match wins; layers no rule matches stay in
    ``model.param_dtype``. YAML: a list of rules, or one rule's fields as a mapping (``quant: {format: nf4}``, so
    that ``--set quant.format=nf4`` and sweeps over ``quant.format`` work); ``format: null`` means no rule."""

    rules: tuple[QuantRule, ...] = ()

    def describe(self) -> tuple[str | None, bool | None]:
        """(format label, double quantization) for summaries: ``nf4``, ``int8+nf4`` for several rules."""
        if not self.rules:
            return None, None
        return "+".join(dict.fromkeys(r.format for r in self.rules)), any(r.double_quant for r in self.rules)


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    task: str = "lm"  # "lm" (causal LM on raw text), "sft" (prompt/response or chat), "classify" (verbalizer)
    dataset: str = "shakespeare"  # "shakespeare" or "polarity" (pinned assets), or "files"
    files: list[str] = dataclasses.field(default_factory=list)  # .txt for lm; .json/.jsonl/.csv/.parquet records
    seq_len: int = 256  # block length for lm; the longest row (truncated, right-padded) for sft and classify
    eval_docs: int = 2  # held out for evaluation, chosen by a hash: documents (lm) or records (sft, classify)
    max_eval_blocks: int = 16  # at most this many eval blocks / rows
    # general text whose loss before and after training measures forgetting (as many blocks as max_eval_blocks):
    # "auto" (shakespeare, or the polarity sentences when training on shakespeare), "shakespeare", "polarity", a
    # .txt file, or "off"
    forgetting: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"  # a record with this field is a chat: [{role, content}, ...]
    chat_template: str | None = None  # Jinja template overriding the tokenizer's (needed for the byte tokenizer)
    text_field: str = "text"
    label_field: str = "label"
    labels: list[str] = dataclasses.field(default_factory=list)  # classify: label values; default for polarity
    label_words: list[str] = dataclasses.field(default_factory=list)  # classify: the word scored for each label
    template: str | None = None  # classify: the prompt, "{text}" filled in; the label word follows it
    pooling: str | None = None  # classify on an encoder: "mean" (default), "cls" or "pooler" vectors feed the head
    folds: int = 0  # k-fold cross-validation over the records (sft, classify): k >= 2 replaces eval_docs' split
    fold: int = 0  # the held-out fold, 0..folds-1


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


@dataclasses.dataclass(kw_only=True)
class MeshConfig:
    """The device mesh of a run (:mod:`peftjax.sharding`): ``data`` x ``fsdp`` x ``tensor`` devices, their product the
    devices used; ``data: null`` (the default) takes every device the other two leave. ``rules`` overrides entries
    of the logical-axis table (``{hidden: fsdp, embedding: [fsdp, tensor], ...}``: a mesh axis, a list of them, or
    null for replicated).
    ``coordinator`` / ``num_processes`` / ``process_id`` start ``jax.distributed`` for a multi-host run (unset: from
    the usual environment variables, or one process)."""

    data: int | None = None
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, str | list[str] | None] = dataclasses.field(default_factory=dict)
    coordinator: str | None = None  # "host:port" of process 0
    num_processes: int | None = None
    process_id: int | None = None

    def axes(self) -> dict[str, int | None]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


TASKS = ("lm", "sft", "classify")
DATASETS = {"shakespeare": "lm", "polarity": "classify", "files": None}  # built-in data sets and their task
FORGETTING = ("auto", "shakespeare", "polarity", "off")  # data.forgetting's named general texts


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """A run. ``peft`` is the registered method's own config dataclass (the YAML ``peft:`` section is dispatched on
    its ``method`` key); ``preset`` names a :mod:`preset <peftjax.config.presets>` whose settings the file's own
    values override."""

    name: str = "run"
    preset: str | None = None
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    peft: Any = dataclasses.field(default_factory=LoRAConfig)
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    @property
    def method(self) -> str:
        """The registered name of the PEFT method."""
        return method_for_config(self.peft).name


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
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return isinstance(value, tuple) and all(_type_ok(v, args[0]) for v in value)
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_type_ok, value, args))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _wants_tuple(tp) -> bool:
    if typing.get_origin(tp) is tuple or tp is tuple:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(map(_wants_tuple, typing.get_args(tp)))


def _coerce(value: Any, tp) -> Any:
    """YAML has no tuples: a list is taken where the key wants a tuple (``targets: [q_proj, v_proj]``)."""
    value = _coerce_float(value, tp)
    if isinstance(value, list) and _wants_tuple(tp):
        inner = next((typing.get_args(t) for t in (tp, *typing.get_args(tp))
                      if typing.get_origin(t) is tuple), ())
        return tuple(_coerce(v, inner[0]) if inner else v for v in value)
    return value


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


def _build(cls, data: dict, prefix: str, *, owner: str | None = None):
    """``cls(**data)`` with every key checked: unknown keys name the nearest valid one (or, for a method's config,
    ``owner``'s fields), values are type-checked and lists become tuples where the field wants one."""
    if not isinstance(data, dict):
        raise PeftjaxError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else ""
            where = f" for method {owner!r}" if owner else ""
            raise PeftjaxError(f"unknown config key {prefix}{key}{where}{hint}; "
                               f"{owner + chr(39) + 's fields' if owner else 'valid keys'}: {', '.join(fields)}")
        tp = hints[key]
        value = _coerce(value, tp)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
            continue
        if not _type_ok(value, tp):
            raise PeftjaxError(f"config key {prefix}{key} must be {_type_name(tp)}, got {value!r}")
        kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def build_method_config(section: dict | None, *, seed: int = 0):
    """The registered method's config dataclass from a ``peft:`` mapping: ``method`` (default ``lora``) picks the
    dataclass, every other key is one of its fields, its own defaults fill the rest. A method config with a
    ``seed`` field and no ``peft.seed`` takes ``train.seed``."""
    section = dict(section or {})
    if not isinstance(section.get("method", "lora"), str):
        raise PeftjaxError(f"peft.method must be a method name, got {section['method']!r}")
    method = get_method(section.pop("method", "lora"))
    if "seed" in method.field_names():
        section.setdefault("seed", seed)
    return _build(method.config_cls, section, "peft.", owner=method.name)


def build_quant_config(section) -> QuantConfig:
    """A :class:`QuantConfig` from the YAML forms: null, a list of rules, ``{rules: [...]}`` or one rule's fields."""
    if section is None or section == {}:
        return QuantConfig()
    if isinstance(section, dict) and "rules" in section:
        if set(section) != {"rules"}:
            extra = sorted(set(section) - {"rules"})[0]
            raise PeftjaxError(f"quant.{extra}: with quant.rules, every setting belongs to a rule")
        section = section["rules"]
    if isinstance(section, dict):
        if section.get("format") is None:  # no format: no quantization (the other keys wait for a --set format)
            return QuantConfig()
        return QuantConfig(rules=(_build(QuantRule, section, "quant."),))
    if not isinstance(section, list):
        raise PeftjaxError(f"quant must be a list of rules or a mapping, got {section!r}")
    return QuantConfig(rules=tuple(_build(QuantRule, rule, f"quant.{i}.") for i, rule in enumerate(section)))


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
    if not path.is_file():
        raise PeftjaxError(f"config file {path} is not a file")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise PeftjaxError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise PeftjaxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:  # an empty file would silently start the full default run
        raise PeftjaxError(f"{path} is empty; write the run's settings (see configs/quickstart.yaml)")
    if not isinstance(data, dict):
        raise PeftjaxError(f"{path} must hold a mapping of config sections")
    return data


def _deep_merge(under: dict, over: dict) -> dict:
    """``over``'s values win; mappings merge key by key."""
    out = dict(under)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    import copy

    data = copy.deepcopy(data)
    if not isinstance(data, dict):
        raise PeftjaxError(f"a run config must be a mapping of sections, got {data!r}")
    for text in overrides:
        key, value = parse_override(text)
        if key == "peft.method" and isinstance(data.get("peft"), dict) and data["peft"].get("method") != value:
            data["peft"] = {}  # another method: the file's fields were the old method's; start from its defaults
        _set_dotted(data, key, value)
    preset = data.get("preset")
    if preset is not None:
        under = get_preset(preset).config
        own = data.get("peft")
        if isinstance(own, dict) and own.get("method", under["peft"]["method"]) != under["peft"]["method"]:
            under = {k: v for k, v in under.items() if k != "peft"}  # the file names another method: its own fields
        data = _deep_merge(under, data)
    sections = {"name", "preset", "model", "peft", "quant", "data", "train", "mesh"}
    unknown = sorted(set(data) - sections)
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), sections, n=1)
        hint = f"; did you mean {near[0]}?" if near else f"; valid keys: {', '.join(sorted(sections))}"
        raise PeftjaxError(f"unknown config key {unknown[0]}{hint}")
    plain = ("name", "preset", "model", "data", "train", "mesh")  # sections whose dataclass is fixed
    config = _build(RunConfig, {k: v for k, v in data.items() if k in plain}, "")
    config.peft = build_method_config(data.get("peft"), seed=config.train.seed)
    config.quant = build_quant_config(data.get("quant"))
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Checks that need more than types; every failure names the key."""
    checks = [
        (config.data.seq_len >= 2, f"data.seq_len must be >= 2, got {config.data.seq_len}"),
        (config.train.steps >= 1, f"train.steps must be >= 1, got {config.train.steps}"),
        (config.train.batch_size >= 1, f"train.batch_size must be >= 1, got {config.train.batch_size}"),
        (config.train.learning_rate > 0, f"train.learning_rate must be > 0, got {config.train.learning_rate}"),
        (config.model.attention in ATTENTION_IMPLEMENTATIONS,
         f"model.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {config.model.attention!r}"),
        (config.data.task in TASKS, f"data.task must be one of {', '.join(TASKS)}, got {config.data.task!r}"),
        (config.data.dataset in DATASETS,
         f"data.dataset must be one of {', '.join(DATASETS)}, got {config.data.dataset!r}"),
        (config.data.dataset != "files" or config.data.files, "data.files is empty; list files to train on"),
        (config.data.forgetting in FORGETTING or str(config.data.forgetting).endswith(".txt"),
         f"data.forgetting must be one of {', '.join(FORGETTING)} or a .txt file, got {config.data.forgetting!r}"),
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
        (config.data.pooling in (None, "mean", "cls", "pooler"),
         f"data.pooling must be mean, cls or pooler, got {config.data.pooling!r}"),
        (config.data.folds == 0 or (config.data.folds >= 2 and 0 <= config.data.fold < config.data.folds),
         f"data.folds must be 0 (a hashed eval_docs split) or >= 2 with 0 <= data.fold < data.folds, got "
         f"folds={config.data.folds} fold={config.data.fold}"),
        (config.data.folds == 0 or config.data.task != "lm",
         "data.folds splits records (sft, classify); an lm task holds out data.eval_docs documents"),
        (config.model.compute_dtype in ("float32", "bfloat16"), "model.compute_dtype must be float32 or bfloat16"),
    ]
    for ok, message in checks:
        if not ok:
            raise PeftjaxError(message)
    groups = trainable_groups()
    for name in config.train.group_learning_rates:
        if name not in groups:
            near = difflib.get_close_matches(name, groups, n=1)
            hint = f"; did you mean {near[0]}?" if near else f"; groups: {', '.join(groups)}"
            raise PeftjaxError(f"train.group_learning_rates has unknown group {name!r}{hint}")
    for f in config.data.files:
        if not Path(f).exists():
            raise PeftjaxError(f"data file {f} not found (data.files)")
        if not Path(f).is_file():
            raise PeftjaxError(f"data file {f} is not a regular file (a directory?); list the files themselves in "
                               "data.files")
    _check_gguf_header(config.model.name)
    alpha = getattr(config.peft, "alpha", None)
    if isinstance(alpha, (int, float)) and alpha == 0:
        raise PeftjaxError("peft.alpha is 0, which scales the adapter's update to zero: nothing would train; "
                           "use a positive alpha (e.g. 2 x peft.rank)")
    for i, rule in enumerate(config.quant.rules):
        get_format(rule.format, label=f"quant rule {i} format")
    _check_mesh(config.mesh)


def _check_mesh(mesh: MeshConfig) -> None:
    """Sizes are positive and the rules name known logical and mesh axes (the device count is checked when the mesh
    is made, :func:`peftjax.sharding.make_mesh`)."""
    for axis, size in mesh.axes().items():
        if size is not None and size < 1:
            raise PeftjaxError(f"mesh.{axis} must be >= 1, got {size}")
    for logical, axis in mesh.rules.items():
        if logical not in LOGICAL_RULES:
            raise PeftjaxError(f"mesh.rules has unknown logical axis {logical!r}; logical axes: "
                               f"{', '.join(LOGICAL_RULES)}")
        names = [axis] if isinstance(axis, str) else axis or []
        if any(a not in MESH_AXES for a in names) or len(set(names)) < len(names):
            raise PeftjaxError(f"mesh.rules.{logical} must be one of {', '.join(MESH_AXES)}, a list of distinct ones, "
                               f"or null, got {axis!r}")
    distributed = (mesh.coordinator, mesh.num_processes, mesh.process_id)
    if any(v is not None for v in distributed) and any(v is None for v in distributed):
        raise PeftjaxError("mesh.coordinator, mesh.num_processes and mesh.process_id go together: set all three "
                           "(or none, to take them from the environment)")


def _check_gguf_header(name: str) -> None:
    """A ``model.name`` that is a .gguf path must start with GGUF's magic and header (24 bytes)."""
    path = Path(name)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise PeftjaxError(f"model file {path} is not a GGUF file (bad magic or truncated header); re-download it "
                           "or point model.name at a .gguf file")


def to_dict(config: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (what a run directory records; ``from_dict`` reads it back)."""
    return {"name": config.name, "preset": config.preset, "model": dataclasses.asdict(config.model),
           "peft": {"method": config.method, **config_fields(config.peft)},
           "quant": [config_fields(rule) for rule in config.quant.rules],
           "data": dataclasses.asdict(config.data), "train": dataclasses.asdict(config.train),
           "mesh": dataclasses.asdict(config.mesh)}
