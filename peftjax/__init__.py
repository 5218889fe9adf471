"""peftjax: parameter-efficient fine-tuning of language models in JAX / Flax NNX.

The curated top level (each name loads its subpackage on first use, so ``import peftjax`` stays cheap and the CLI
starts fast):

    from peftjax import from_pretrained, quantize_model, QuantRule, peft, partition, make_train_step

Subpackages, in the order data flows: ``models``, ``quant``, ``peft``, ``partition``, ``data``, ``config``,
``train``, ``studies``; ``peftjax.cli`` is the command line.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "PeftjaxError": "peftjax.errors",
    "LlamaConfig": "peftjax.models", "LlamaForCausalLM": "peftjax.models", "from_pretrained": "peftjax.models",
    "tiny_model": "peftjax.models",
    "QArray": "peftjax.quant", "quantize": "peftjax.quant", "dequantize": "peftjax.quant",
    "QuantRule": "peftjax.quant.policy", "quantize_model": "peftjax.quant.policy",
    "RunConfig": "peftjax.config", "from_dict": "peftjax.config", "get_preset": "peftjax.config",
    "build": "peftjax.train", "make_optimizer": "peftjax.train", "make_train_step": "peftjax.train",
    "run": "peftjax.train", "load_run": "peftjax.train",
}
_SUBPACKAGES = {"assets", "config", "data", "generate", "models", "partition", "peft", "quant", "rules", "studies",
                "surgery", "train", "variables"}

__all__ = sorted([*_EXPORTS, *_SUBPACKAGES])


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"peftjax.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'peftjax' has no attribute {name!r}")


def __dir__():
    return __all__
