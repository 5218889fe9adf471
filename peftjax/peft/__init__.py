"""PEFT methods: one file per method plus a registration, applied by ordered regex rules on module paths.

Public API for users and for new methods: ``apply(model, config)``, ``register_method(name, config_cls, apply_fn)``,
the trainable variable types in :mod:`peftjax.peft.variables`, the wrapper bases in :mod:`peftjax.peft.wrapper`,
the lifecycle tools (``merge``, ``unmerge``, ``merge_and_unload``, ``disable_adapters``) and ``summary``.
See docs/extending.md for adding a method.
"""
from peftjax.peft import full, ia3, lora, prefix, prompt  # noqa: F401  (registers the built-in methods)
from peftjax.peft.full import FullConfig, SelectiveConfig
from peftjax.peft.ia3 import IA3Config, IA3Linear
from peftjax.peft.lora import DoRALinear, LoRAConfig, LoRALinear, lora_delta, set_dropout_key
from peftjax.peft.merge import disable_adapters, merge, merge_and_unload, requantize_like, unmerge
from peftjax.peft.prefix import PrefixConfig, PrefixKV, fold_prefix
from peftjax.peft.prompt import PromptConfig, PromptEmbedding
from peftjax.peft.registry import apply, get_method, make_config, register_method, registered_methods
from peftjax.peft.summary import count_parameters, summary
from peftjax.peft.variables import IA3, LoRA, Adapter, Prefix, Prompt, Quantized, Trainable, Tuned
from peftjax.peft.wrapper import AdapterLinear, AdapterModule

__all__ = ["IA3", "Adapter", "AdapterLinear", "AdapterModule", "DoRALinear", "FullConfig", "IA3Config", "IA3Linear",
           "LoRA", "LoRAConfig", "LoRALinear", "Prefix", "PrefixConfig", "PrefixKV", "Prompt", "PromptConfig",
           "PromptEmbedding", "Quantized", "SelectiveConfig", "Trainable", "Tuned", "apply", "count_parameters",
           "disable_adapters", "fold_prefix", "get_method", "lora_delta", "make_config", "merge",
           "merge_and_unload", "register_method", "registered_methods", "requantize_like", "set_dropout_key",
           "summary", "unmerge"]
from peftjax.peft.multi import (MultiLoRALinear, adapter_names, add_adapter, combine_adapters,  # noqa: E402
                                mixed_adapters, set_adapter)

__all__ += ["MultiLoRALinear", "adapter_names", "add_adapter", "combine_adapters", "mixed_adapters", "set_adapter"]
from peftjax.peft import vera  # noqa: E402,F401  (registers VeRA, written against the names above only)
from peftjax.peft.hf import load_hf_adapter, save_hf_adapter, save_hf_model  # noqa: E402

__all__ += ["load_hf_adapter", "save_hf_adapter", "save_hf_model"]
