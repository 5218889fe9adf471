"""The extension API: everything a new PEFT method's file needs, importable without importing the built-in methods
(so a method file and the package that registers it never import each other).

    from peftjax.peft.api import Adapter, AdapterLinear, check_rank, register_method, replace_matching
"""
from peftjax.peft.registry import register_method
from peftjax.peft.wrapper import AdapterLinear, AdapterModule
from peftjax.rules import modules_of_type
from peftjax.surgery import check_rank, replace_matching
from peftjax.variables import Adapter, Trainable

__all__ = ["Adapter", "AdapterLinear", "AdapterModule", "Trainable", "check_rank", "modules_of_type",
           "register_method", "replace_matching"]
