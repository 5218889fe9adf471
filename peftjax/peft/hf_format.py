"""How a method maps to a Hugging Face PEFT adapter directory: the ``hf`` hook of its registration.

An HF PEFT adapter is ``adapter_config.json`` (``peft_type`` and the method's options) plus
``adapter_model.safetensors``, whose tensors are named ``base_model.model.model.<module path>.<name>`` (module paths
as peftjax names them, ``layers.3.self_attn.q_proj``) or, for prompt-learning methods, ``prompt_embeddings``.
A method says how its config and its variables map to these with an :class:`HFFormat`:

    read(model, cfg, tensors)  -> the model with the method applied and its variables set from ``tensors``
    write(model)               -> (the method's adapter_config fields, {tensor name: array}), or None when ``model``
                                  carries none of this method's adapters

HF stores a linear layer's matrices in torch's (d_out, d_in) layout; peftjax's are (d_in, d_out), so most mappings
are transposes and round trips are exact. :class:`HFTensors` hands out the file's tensors with a one-line error for
a missing or mis-shaped one, and remembers which were used, so leftovers (an adapter for another model) are refused.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.peft.wrapper import is_detached

PREFIX = "base_model.model.model."


def hf_name(name: str) -> str:
    """The file's name for a tensor: module tensors get :data:`PREFIX`; whole-model ones (``prompt_embeddings``,
    VeRA's shared ``base_model.vera_A``) are named in full."""
    return name if name == "prompt_embeddings" or name.startswith("base_model.") else PREFIX + name


@dataclasses.dataclass(frozen=True)
class HFFormat:
    peft_type: str
    read: Callable[[nnx.Module, dict, "HFTensors"], nnx.Module]
    write: Callable[[nnx.Module], "tuple[dict, dict[str, np.ndarray]] | None"]


class HFTensors:
    """The adapter file's tensors (names without :data:`PREFIX`); ``take`` checks a shape and marks it used."""

    def __init__(self, tensors: dict[str, np.ndarray], source: Path, config_path: Path):
        self.tensors, self.source, self.config_path = tensors, source, config_path
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], *, transpose: bool = False) -> np.ndarray:
        """Tensor ``name`` as a float32 array of peftjax's ``shape`` (HF's is reversed when ``transpose``)."""
        full = hf_name(name)
        if name not in self.tensors:
            raise PeftjaxError(f"{self.source.name} lacks {full}; the adapter does not fit this model")
        value = self.tensors[name].T if transpose else self.tensors[name]
        if value.shape != tuple(shape):
            raise PeftjaxError(f"{full} has shape {self.tensors[name].shape}, this model needs "
                               f"{tuple(shape)[::-1] if transpose else tuple(shape)}: an adapter for another base "
                               "model")
        self.used.add(name)
        return np.asarray(value, np.float32)

    def check_all_used(self) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise PeftjaxError(f"{self.source.name} has tensors this model has no adapter for, e.g. "
                               f"{hf_name(unused[0])}")


def hf_number(cfg: dict, key: str, kind, path: Path, default=None):
    """``cfg[key]`` as ``kind`` (int or float; ``default`` when absent); one line naming the key otherwise."""
    value = cfg.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and kind is int and value != int(value):
        ok = False
    if not ok:
        raise PeftjaxError(f"{path}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def hf_targets(value, path: Path | str = "adapter_config.json", key: str = "target_modules") -> str | tuple[str, ...]:
    """HF's ``target_modules`` as peftjax target rules: a string is a regex over module paths (or "all-linear"),
    a list of names matches those names as dotted suffixes."""
    if value is None:
        raise PeftjaxError(f"{Path(path).name} has no {key}")
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value or not all(isinstance(name, str) for name in value):
        raise PeftjaxError(f"{Path(path).name}: {key} must be a string or a list of module names, got {value!r}")
    return tuple(re.escape(name) for name in value)


def refuse_lycoris_options(cfg: dict, path: Path, method: str) -> None:
    """One line for the HF LyCORIS options (LoHa, LoKr) peftjax does not implement: per-layer rank / alpha
    patterns, rank and module dropout, and the CP form for convolutions."""
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise PeftjaxError(f"{path}: {method} {key} is not supported here; give every layer the same r and alpha")
    for key in ("rank_dropout", "module_dropout"):
        if hf_number(cfg, key, float, path, 0.0):
            raise PeftjaxError(f"{path}: {method} {key} is not supported here; set it to 0 to load the adapter")
    if cfg.get("use_effective_conv2d"):
        raise PeftjaxError(f"{path}: use_effective_conv2d ({method}'s CP form for convolutions) is not supported")


def module_names(paths) -> list[str]:
    """HF ``target_modules`` naming the given module paths: their last components, sorted."""
    return sorted({p.rsplit(".", 1)[-1] for p in paths})


def adapter_modules(model: nnx.Module, kind: type) -> dict[str, nnx.Module]:
    """{dotted path: module} of the modules of type ``kind`` in ``model`` (named adapters held by a container
    are not counted: the container stands for them)."""
    return {".".join(map(str, p)): m for p, m in nnx.iter_modules(model) if isinstance(m, kind) and not is_detached(m)}


def check_unmerged(modules: dict[str, nnx.Module]) -> None:
    if any(getattr(m, "merged", False) for m in modules.values()):
        raise PeftjaxError("the adapters are merged into the base; unmerge before saving them as an adapter")
