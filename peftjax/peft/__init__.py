"""PEFT methods: one file per method plus a registration, applied by ordered regex rules on module paths."""
from peftjax.peft import full, lora  # noqa: F401  (registers the built-in methods)
from peftjax.peft.full import FullConfig
from peftjax.peft.lora import LoRAConfig, LoRALinear, lora_delta
from peftjax.peft.registry import apply, get_method, make_config, register_method, registered_methods

__all__ = ["FullConfig", "LoRAConfig", "LoRALinear", "apply", "get_method", "lora_delta", "make_config",
           "register_method", "registered_methods"]
