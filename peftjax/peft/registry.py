"""The method registry: ``register_method(name, config_cls, apply_fn)`` and ``apply(model, config)``.

A PEFT method is a frozen keyword-only config dataclass, an ``apply_fn(model, config) -> None`` that performs the
surgery in place on a model it is handed (``apply`` clones first, so callers always get a new model), and a name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from peftjax.errors import PeftjaxError


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    apply_fn: Callable[[nnx.Module, object], None]


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, apply_fn: Callable[[nnx.Module, object], None]) -> None:
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class of method {name!r} must be a dataclass")
    _METHODS[name] = Method(name, config_cls, apply_fn)


def registered_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise PeftjaxError(f"unknown PEFT method {name!r}; registered methods: {', '.join(registered_methods())}")
    return _METHODS[name]


def method_for_config(config) -> Method:
    for method in _METHODS.values():
        if type(config) is method.config_cls:
            return method
    raise PeftjaxError(f"{type(config).__name__} is not the config of a registered method "
                       f"({', '.join(registered_methods())})")


def make_config(name: str, **kwargs):
    """The config dataclass of method ``name`` built from keyword arguments (unknown keys are an error)."""
    cls = get_method(name).config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise PeftjaxError(f"method {name!r} has no option {unknown[0]!r}; its options: {', '.join(sorted(fields))}")
    return cls(**kwargs)


def apply(model: nnx.Module, config) -> nnx.Module:
    """A new model with the method of ``config`` applied; ``model`` itself is left untouched.

    The clone shares the (immutable) weight buffers with ``model``, so this costs no weight memory.
    """
    method = method_for_config(config)
    new = nnx.clone(model)
    method.apply_fn(new, config)
    return new
