"""The extension API: everything a new PEFT method's file needs, importable without importing the built-in methods
(so a method file and the package that registers it never import each other).

    from peftjax.peft.api import Adapter, AdapterLinear, check_rank, register_method, replace_matching

plus, for a method with a Hugging Face PEFT counterpart, the pieces of its ``hf`` hook (:mod:`peftjax.peft.hf_format`).
"""
from peftjax.peft.hf_format import (HFFormat, HFTensors, adapter_modules, check_unmerged, hf_number, hf_targets,
                                    module_names, refuse_lycoris_options)
from peftjax.peft.registry import apply, register_method
from peftjax.peft.wrapper import AdapterLinear, AdapterModule, input_dropout, kaiming_uniform
from peftjax.rules import modules_of_type
from peftjax.surgery import check_rank, replace_matching
from peftjax.variables import Adapter, Trainable, is_variable

__all__ = ["Adapter", "AdapterLinear", "AdapterModule", "HFFormat", "HFTensors", "Trainable", "adapter_modules",
           "apply", "check_rank", "check_unmerged", "hf_number", "hf_targets", "input_dropout", "is_variable",
           "kaiming_uniform", "module_names", "modules_of_type", "refuse_lycoris_options", "register_method", "replace_matching"]
