"""Hugging Face PEFT adapters in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

Every registered method with an ``hf`` hook (:class:`peftjax.peft.hf_format.HFFormat`) is readable and writable:
``load_hf_adapter`` dispatches on the directory's ``peft_type``, ``save_hf_adapter`` on the adapters the model
carries. Module paths are the same names as HF's (``layers.3.self_attn.q_proj``); each method's file says how its
variables map to HF's tensors (mostly transposes: HF keeps torch's (d_out, d_in) layout), so round trips are exact.
``save_hf_model`` writes the merged Llama-layout model instead.
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
from peftjax.models.families import hf_config_dict  # the merged export writes the family's config.json
from peftjax.peft.hf_format import PREFIX, HFTensors, hf_name
from peftjax.peft.multi import adapter_names, single_adapter
from peftjax.peft.registry import hf_formats

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def read_hf_adapter_config(directory: Path) -> dict:
    """adapter_config.json as a dict whose ``peft_type`` a registered method reads (one line otherwise)."""
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
    if kind not in hf_formats():
        raise PeftjaxError(f"HF PEFT type {kind!r} is not supported; supported types: "
                           f"{', '.join(sorted(hf_formats()))}")
    return cfg


def load_hf_adapter(model: nnx.Module, directory) -> nnx.Module:
    """A new model: ``model`` with the HF PEFT adapter in ``directory`` applied (any supported ``peft_type``)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    cfg = read_hf_adapter_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.exists():
        raise PeftjaxError(f"{weights_path} not found")
    try:
        tensors = {k.removeprefix(PREFIX): v for k, v in load_file(str(weights_path)).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for damaged files
        raise PeftjaxError(f"{weights_path} is not a readable safetensors file ({' '.join(str(e).split())[:120]}); "
                           "re-save or re-download the adapter") from None
    source = HFTensors(tensors, weights_path, directory / CONFIG_FILE)
    adapted = hf_formats()[cfg.get("peft_type", "LORA")].read(model, cfg, source)
    source.check_all_used()
    return adapted


def _adapter_payload(model: nnx.Module, hint: str = "") -> tuple[str, dict, dict]:
    """(HF PEFT type, config fields, tensors) of the single adapter of ``model``."""
    written = {kind: out for kind, fmt in hf_formats().items() if (out := fmt.write(model)) is not None}
    if not written:
        raise PeftjaxError(f"the model has no adapters to save; HF PEFT export supports "
                           f"{', '.join(sorted(hf_formats()))}{hint}")
    if len(written) > 1:
        raise PeftjaxError(f"HF PEFT stores one adapter type per directory; this model has {', '.join(written)}")
    (kind, (fields, tensors)), = written.items()
    return kind, fields, tensors


def save_hf_adapter(model: nnx.Module, directory, *, base_model: str = "SmolLM2-135M-Instruct") -> Path:
    """Write ``model``'s adapter as an HF PEFT adapter directory (atomically: all or nothing)."""
    if adapter_names(model):
        raise PeftjaxError("the model has named adapters; save_hf_adapters writes one directory per adapter "
                           "(or save_hf_adapter(single_adapter(model, name), dir) for one)")
    kind, fields, tensors = _adapter_payload(model)
    return _write_adapter(Path(directory), kind, fields, tensors, base_model)


def save_hf_adapters(model: nnx.Module, directory, *, base_model: str = "SmolLM2-135M-Instruct") -> Path:
    """Write each named adapter of a multi-adapter model (``add_adapter``) as its own HF PEFT directory,
    ``directory/<name>``, of its own type (load them in HF PEFT with ``PeftModel.from_pretrained`` /
    ``load_adapter``). Every adapter is converted before anything is written."""
    names = adapter_names(model)
    if not names:
        raise PeftjaxError("the model has no named adapters; save_hf_adapter writes a single adapter")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise PeftjaxError(f"{directory} exists and is not an empty directory; choose a new output directory")
    payloads = {}
    for name in names:
        try:
            payloads[name] = _adapter_payload(single_adapter(model, name))
        except PeftjaxError as e:
            raise PeftjaxError(f"adapter {name!r}: {e}") from None
    for name, (kind, fields, tensors) in payloads.items():
        _write_adapter(directory / name, kind, fields, tensors, base_model)
    return directory


def _write_adapter(directory: Path, kind: str, fields: dict, tensors: dict, base_model: str) -> Path:
    from safetensors.numpy import save_file

    tensors = {hf_name(k): np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    config = {"peft_type": kind, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, **fields,
              "inference_mode": True, "modules_to_save": None}
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
    from peftjax.peft.wrapper import AdapterLinear, AdapterModule, is_detached

    model = nnx.clone(model)  # merge_kernel of some methods records state on the module
    modules = {".".join(map(str, path)): m for path, m in nnx.iter_modules(model) if not is_detached(m)}
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
