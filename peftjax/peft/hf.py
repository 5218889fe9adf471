"""Hugging Face PEFT adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

HF PEFT stores LoRA factors per module as ``base_model.model.model.<path>.lora_A.weight`` (r, d_in) and
``...lora_B.weight`` (d_out, r) (DoRA adds ``...lora_magnitude_vector`` (d_out,)); peftjax keeps A as (d_in, r) and
B as (r, d_out), so both directions are transposes and a round trip is exact. Module paths are the same names
(``layers.3.self_attn.q_proj``), and the scaling is the same (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.families import hf_config_dict
from peftjax.peft.lora import LoRAConfig, LoRALinear
from peftjax.peft.registry import apply

PREFIX = "base_model.model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
SUPPORTED = ("LORA",)


def _targets(value) -> str | tuple[str, ...]:
    if value is None:
        raise PeftjaxError("adapter_config.json has no target_modules")
    if isinstance(value, str):
        return value  # "all-linear" or a regex over module paths
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise PeftjaxError(f"adapter_config.json: target_modules must be a string or a list of module names, "
                           f"got {value!r}")
    return tuple(__import__("re").escape(name) for name in value)  # names match as dotted suffixes


def read_hf_adapter_config(directory: Path) -> LoRAConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise PeftjaxError(f"{path} not found: an HF PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise PeftjaxError(f"{path} is not JSON text (not UTF-8)") from None
    except json.JSONDecodeError as e:
        raise PeftjaxError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(cfg, dict):
        raise PeftjaxError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("peft_type", "LORA")
    if kind not in SUPPORTED:
        raise PeftjaxError(f"HF PEFT type {kind!r} is not supported; supported types: {', '.join(SUPPORTED)}")
    if "r" not in cfg:
        raise PeftjaxError(f"{path} has no 'r' (the LoRA rank)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise PeftjaxError(f"{path}: {key} must be a mapping of module patterns to numbers, got {cfg[key]!r}")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]  # HF PEFT accepts one layer index as an int
    elif layers is not None and not isinstance(layers, list):
        raise PeftjaxError(f"{path}: layers_to_transform must be an int or a list of ints, got {layers!r}")
    return LoRAConfig(rank=_number(cfg, "r", int, path), alpha=_number(cfg, "lora_alpha", float, path, HF_ALPHA),
                      targets=_targets(cfg.get("target_modules")), rslora=bool(cfg.get("use_rslora", False)),
                      dora=bool(cfg.get("use_dora", False)),
                      rank_pattern=tuple((k, _number(cfg["rank_pattern"], k, int, path))
                                         for k in (cfg.get("rank_pattern") or {})),
                      alpha_pattern=tuple((k, _number(cfg["alpha_pattern"], k, float, path))
                                          for k in (cfg.get("alpha_pattern") or {})),
                      layers_to_transform=(tuple(_number({"layers_to_transform": v}, "layers_to_transform", int, path)
                                                 for v in layers) if layers is not None else None),
                      dropout=_number(cfg, "lora_dropout", float, path, 0.0))


HF_ALPHA = 8  # HF PEFT's LoraConfig default for lora_alpha (used when adapter_config.json omits it)


def _number(cfg: dict, key: str, kind, path: Path, default=None):
    """``cfg[key]`` as ``kind`` (int or float; ``default`` when absent); one line naming the key otherwise."""
    value = cfg.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int and value != int(value):
        ok = False
    if not ok:
        raise PeftjaxError(f"{path}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)}


def load_hf_adapter(model: nnx.Module, directory) -> nnx.Module:
    """A new model: ``model`` with the HF PEFT LoRA adapter in ``directory`` applied."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = read_hf_adapter_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.exists():
        raise PeftjaxError(f"{weights_path} not found")
    try:
        tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(weights_path)).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        raise PeftjaxError(f"{weights_path} is not a readable safetensors file ({' '.join(str(e).split())[:120]}); "
                           "re-save or re-download the adapter") from None
    adapted = apply(model, config)
    used = set()
    for path, layer in _lora_layers(adapted).items():
        pieces = {"lora_A.weight": (layer.lora_a, True), "lora_B.weight": (layer.lora_b, True)}
        if layer.dora:
            pieces["lora_magnitude_vector"] = (layer.magnitude, False)
        for suffix, (var, transpose) in pieces.items():
            name = f"{path}.{suffix}"
            if name not in tensors:
                raise PeftjaxError(f"{weights_path.name} lacks {PREFIX}{name}; the adapter does not fit this model")
            value = tensors[name].T if transpose else tensors[name]
            if value.shape != var.shape:
                raise PeftjaxError(f"{PREFIX}{name} has shape {tensors[name].shape}, this model needs "
                                   f"{var.shape[::-1] if transpose else var.shape}: an adapter for another base model")
            var.set_value(np.asarray(value, np.float32))
            used.add(name)
    unused = sorted(set(tensors) - used)
    if unused:
        raise PeftjaxError(f"{weights_path.name} has tensors this model has no adapter for, e.g. {PREFIX}{unused[0]}")
    return adapted


def _uniform(values: dict[str, float]):
    """(the most common value, {path regex: value} for the others), like HF's rank_pattern / alpha_pattern."""
    common = max(set(values.values()), key=list(values.values()).count)
    return common, {__import__("re").escape(p): v for p, v in values.items() if v != common}


def save_hf_adapter(model: nnx.Module, directory, *, base_model: str = "SmolLM2-135M-Instruct") -> Path:
    """Write ``model``'s LoRA / DoRA adapters as an HF PEFT adapter directory (atomically: all or nothing)."""
    from safetensors.numpy import save_file

    layers = _lora_layers(model)
    if not layers:
        raise PeftjaxError("the model has no LoRA/DoRA adapters to save; HF PEFT export supports LoRA and DoRA")
    if any(layer.merged for layer in layers.values()):
        raise PeftjaxError("the adapters are merged into the base; unmerge before saving them as an adapter")
    kinds = {(type(layer), layer.dora) for layer in layers.values()}
    if len(kinds) > 1 or len({layer.rslora for layer in layers.values()}) > 1:
        raise PeftjaxError("HF PEFT stores one adapter type and one scaling rule per adapter; this model mixes them")
    rank, rank_pattern = _uniform({p: layer.rank for p, layer in layers.items()})
    alpha, alpha_pattern = _uniform({p: layer.alpha for p, layer in layers.items()})
    tensors = {}
    for path, layer in layers.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(np.asarray(layer.lora_a[...]).T)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(np.asarray(layer.lora_b[...]).T)
        if layer.dora:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = np.asarray(layer.magnitude[...])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": alpha, "target_modules": sorted({p.rsplit(".", 1)[-1] for p in layers}),
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": next(iter(layers.values())).rslora, "use_dora": next(iter(layers.values())).dora,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None,
    }
    return _write_dir_atomically(Path(directory), {CONFIG_FILE: json.dumps(config, indent=2) + "\n"},
                                 {WEIGHTS_FILE: tensors}, save_file)


def _write_dir_atomically(directory: Path, texts: dict[str, str], tensor_files: dict[str, dict], save_file) -> Path:
    """Fill a temporary sibling directory, then rename it into place: a failure leaves ``directory`` untouched."""
    if directory.exists() and any(directory.iterdir()):
        raise PeftjaxError(f"{directory} exists and is not empty; choose a new output directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text)
        for name, tensors in tensor_files.items():
            save_file(tensors, str(tmp / name))
        if directory.exists():
            directory.rmdir()
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def save_hf_model(model: nnx.Module, directory) -> Path:
    """A Hugging Face model directory of the model's family (``config.json`` + ``model.safetensors``): each adapter
    merged into its base in float32 (a quantized base is dequantized first, never requantized), so the export
    computes what the adapted model computes."""
    from safetensors.numpy import save_file

    from peftjax.models.llama import Linear
    from peftjax.peft.wrapper import AdapterLinear, AdapterModule

    model = nnx.clone(model)  # merge_kernel of some methods records state on the module
    modules = {".".join(map(str, path)): m for path, m in nnx.iter_modules(model)}
    kernels: dict[str, np.ndarray] = {}
    for name, module in modules.items():
        if isinstance(module, AdapterLinear):
            if not module.mergeable:
                raise PeftjaxError(f"{type(module).__name__} at {name} cannot be merged into a weight; "
                                   "export it as an adapter instead")
            w = module.base.kernel(jnp.float32)
            kernels[name] = np.asarray(w if module.merged or module.disabled else module.merge_kernel(w))
        elif isinstance(module, AdapterModule):
            raise PeftjaxError(f"{type(module).__name__} at {name or 'the model'} adds inputs, not weight updates; "
                               "a merged export cannot hold it")
    for name, module in modules.items():
        inside_adapter = any(name.startswith(k + ".") for k in kernels)
        if isinstance(module, Linear) and not inside_adapter:
            kernels[name] = np.asarray(module.kernel(jnp.float32))
    tensors = {f"model.{name}.weight": np.ascontiguousarray(w.T) for name, w in kernels.items()}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path)).replace(".base.", ".")  # an adapted layer's bias belongs to its base
        if name.endswith(("norm.weight", "_proj.bias")) or name == "embed_tokens.weight":
            tensors[f"model.{name}"] = np.asarray(var[...], np.float32)
        elif name == "lm_head.weight":
            tensors[name] = np.asarray(var[...], np.float32)
    config = hf_config_dict(model.config)
    return _write_dir_atomically(Path(directory), {"config.json": json.dumps(config, indent=2) + "\n"},
                                 {"model.safetensors": tensors}, save_file)
