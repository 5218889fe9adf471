"""PEFT methods: one file per method plus a registration, applied by ordered regex rules on module paths.

Public API for users and for new methods: ``apply(model, config)``, ``register_method(name, config_cls, apply_fn)``,
the trainable variable types (:mod:`peftjax.variables`), the wrapper bases (:mod:`peftjax.peft.wrapper`), the surgery
helpers ``replace_matching`` / ``check_rank`` / ``modules_of_type``, the lifecycle tools (``merge``, ``unmerge``,
``merge_and_unload``, ``disable_adapters``) and ``summary``. See docs/extending.md for adding a method.
"""
from peftjax.peft.registry import (Method, apply, config_fields, get_method, make_config, method_for_config,
                                   register_method, registered_methods)
from peftjax.peft.wrapper import AdapterLinear, AdapterModule
from peftjax.rules import modules_of_type
from peftjax.surgery import check_rank, replace_matching
from peftjax.variables import IA3, LoRA, Adapter, Prefix, Prompt, Quantized, Trainable, Tuned

from peftjax.peft.merge import disable_adapters, merge, merge_and_unload, requantize_like, unmerge  # noqa: E402
from peftjax.peft.summary import count_parameters, summary  # noqa: E402
from peftjax.peft.full import FullConfig, SelectiveConfig  # noqa: E402
from peftjax.peft.ia3 import IA3Config, IA3Linear  # noqa: E402
from peftjax.peft.lora import DoRA, LoRAConfig, LoRALinear, LoRAVariant, lora_delta  # noqa: E402
from peftjax.peft.prefix import PrefixConfig, PrefixKV, fold_prefix  # noqa: E402
from peftjax.peft.prompt import PromptConfig, PromptEmbedding  # noqa: E402
from peftjax.peft.multi import (NamedAdapterLinear, NamedPrompts, active_adapter, adapter_names,  # noqa: E402
                                add_adapter, combine_adapters, mixed_adapters, set_adapter, single_adapter)
from peftjax.peft.hf import load_hf_adapter, save_hf_adapter, save_hf_adapters, save_hf_model  # noqa: E402
from peftjax.peft.hotswap import HotswapLoRALinear, hotswap, prepare_hotswap  # noqa: E402
# methods written against the public names above only (the extension API's worked examples)
from peftjax.peft import vera, loha, lokr, oft, qalora, adalora  # noqa: E402,F401

__all__ = ["Adapter", "AdapterLinear", "AdapterModule", "DoRA", "FullConfig", "HotswapLoRALinear", "IA3", "IA3Config",
           "IA3Linear", "LoRA", "LoRAConfig", "LoRALinear", "LoRAVariant", "Method", "NamedAdapterLinear",
           "NamedPrompts", "Prefix", "PrefixConfig", "PrefixKV", "Prompt", "PromptConfig", "PromptEmbedding",
           "Quantized", "SelectiveConfig", "Trainable", "Tuned", "active_adapter", "adapter_names", "add_adapter",
           "apply", "check_rank", "combine_adapters", "config_fields", "count_parameters", "disable_adapters",
           "fold_prefix", "get_method", "hotswap", "load_hf_adapter", "lora_delta", "make_config", "merge",
           "merge_and_unload", "method_for_config", "mixed_adapters", "modules_of_type", "prepare_hotswap",
           "register_method", "registered_methods", "replace_matching", "requantize_like", "save_hf_adapter",
           "save_hf_adapters", "save_hf_model", "set_adapter", "single_adapter", "summary", "unmerge"]
