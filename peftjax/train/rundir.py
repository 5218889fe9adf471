"""The run directory: its recorded config, the resume check, the summary (a documented dataclass), ``load_run``.

    run/config.yaml      the resolved config (``peftjax.config.to_dict``)
    run/metrics.jsonl    a line per logged step and per evaluation
    run/summary.json     :class:`RunSummary`
    run/checkpoints/     orbax checkpoints of the trainable tree and optimizer state (:mod:`.checkpoint`)
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import yaml

from peftjax import partition
from peftjax.config import RunConfig, to_dict
from peftjax.errors import PeftjaxError


@dataclasses.dataclass
class RunSummary:
    """What ``summary.json`` holds. Bytes are exact (packed storage for quantized tensors); RSS figures are of this
    process (``None`` where /proc is missing); times are wall-clock seconds on the run's machine."""

    name: str
    task: str  # lm, sft or classify
    method: str  # the registered PEFT method
    preset: str | None  # the preset the config named, if any
    rank: int | None  # the method's rank, where it has one
    quant: str | None  # base format(s): "nf4", "int8+nf4" for several rules, None for an unquantized base
    double_quant: bool | None
    quant_rules: list  # per quantization rule: format, layers, params, storage bits per parameter
    param_dtype: str  # storage dtype of the unquantized base weights
    trainable_params: int
    total_params: int  # quantized tensors count their logical elements
    frozen_bytes: int
    linear_bits_per_param: float | None  # storage bits per parameter of the quantized linear layers
    trainable_bytes: int
    optimizer_bytes: int
    step_device_bytes: int  # XLA's allocation for the compiled train step (arguments + temporaries + outputs)
    step_temp_bytes: int  # of which temporaries (activations, gradients, workspace)
    device_peak_bytes: int | None  # a GPU's / TPU's allocator peak over the run (memory_stats); None on a CPU
    checkpoint_bytes: int
    checkpoint_trainable_bytes: int
    checkpoint_dir: str
    peak_rss_bytes: int  # the training phase, first step's compilation included
    peak_rss_steady_bytes: int | None  # the training steps after the first
    peak_rss_load_bytes: int  # loading, quantizing and adapting the model
    rss_start_bytes: int  # the interpreter, libraries and the XLA compiler's start-up, before any model or data
    rss_train_start_bytes: int  # after loading, with freed memory handed back to the OS
    median_step_s: float | None
    train_s: float  # the step loop of this process, compilation included
    tokens_per_s: float | None  # non-padding target tokens per step (mean over the run) per median step
    padded_tokens_per_s: float | None  # batch x seq_len x grad_accum (padding included) per median step
    compile_s: float | None
    load_s: float
    eval_loss_before: float
    eval_loss_after: float
    eval_ppl_before: float
    eval_ppl_after: float
    eval_accuracy_before: float | None
    eval_accuracy_after: float | None
    train_loss_first: float | None
    train_loss_last: float | None
    nonfinite_skipped: int
    resumed_from_step: int | None
    steps: int
    tokens_seen: int  # non-padding target tokens over all steps
    padded_tokens_seen: int  # steps x batch x seq_len x grad_accum: the capacity, padding included
    epochs: float  # passes over the train rows
    train_blocks: int
    eval_blocks: int
    eval_docs: list
    wall_s: float
    jax_version: str
    backend: str
    frozen_bytes_per_device: int | None = None  # the frozen tree on the device holding most, read from its shardings
    mesh: dict | None = None  # {data, fsdp, tensor} device counts (peftjax.sharding), and processes
    forgetting_set: str | None = None  # the general text of data.forgetting (None: off)
    general_loss_before: float | None = None  # its loss before training (nats per token)
    general_loss_after: float | None = None
    forgetting: float | None = None  # general_loss_after - general_loss_before (> 0: the model forgot)
    provenance: dict | None = None  # peftjax.train.provenance: versions, git, hardware, input sha256s, command

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _config_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(recorded) | set(current)):
        a, b = recorded.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def check_resumable(out: Path, config: RunConfig) -> None:
    """A resumed run must use the config it was started with (``train.steps`` may grow), or it could not
    continue bitwise as the uninterrupted run would."""
    recorded_path = out / "config.yaml"
    if not recorded_path.exists():
        return
    from peftjax.config import from_dict

    recorded = to_dict(from_dict(yaml.safe_load(recorded_path.read_text())))  # normalised: older layouts compare
    diffs = [k for k in _config_differences(recorded, to_dict(config)) if k not in ("train.steps", "name")
             and not k.startswith("mesh.")]  # a checkpoint restores onto any mesh
    if diffs:
        k = diffs[0]
        raise PeftjaxError(f"--resume: {k} is {_lookup(recorded, k)!r} in {recorded_path} but "
                           f"{_lookup(to_dict(config), k)!r} now; resume with the run's own config")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def load_run(run_dir: str | Path, step: int | None = None):
    """(model, tokenizer) of a trained run: the model rebuilt from ``run_dir/config.yaml`` (base, quantization,
    PEFT method) with the trainable parameters of checkpoint ``step`` (default: the latest) restored."""
    from peftjax.config import from_dict
    from peftjax.train.build import EVA_FILE, build_model
    from peftjax.train.checkpoint import Checkpointer

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise PeftjaxError(f"{run_dir} is not a run directory (no config.yaml)")
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model, tokenizer = build_model(config, eva_cache=run_dir / EVA_FILE)
    if config.data.chat_template is not None:
        tokenizer.chat_template = config.data.chat_template
    graphdef, trainable, frozen = partition.split(model)
    ckpt = Checkpointer(run_dir / "checkpoints")
    trainable, _, _ = ckpt.restore(trainable, config=config, step=step)
    ckpt.close()
    return partition.merge(graphdef, trainable, frozen), tokenizer
