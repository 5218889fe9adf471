"""The method registry: ``register_method(name, config_cls, apply_fn, ...)`` and ``apply(model, config)``.

A PEFT method is a frozen keyword-only config dataclass, an ``apply_fn(model, config) -> None`` that performs the
surgery in place on a model it is handed (``apply`` clones first, so callers always get a new model), and a name.
The config dataclass *is* the method's schema: the YAML ``peft:`` section of a run is dispatched on ``method`` to it,
so every field is settable from YAML, ``--set peft.FIELD=...`` and sweeps, with the dataclass's own defaults.

What the rest of the framework needs to know about a method is said here, as hooks of its registration, never as a
test of its name elsewhere:

- ``trains_base``: the method makes base weights trainable (full / selective fine-tuning): gradients and optimizer
  state then scale with the model, and memory estimates count those weights as trained;
- ``describe(config) -> dict``: the method's fields a run summary shows (default: ``rank`` if it has one);
- ``identity(config) -> dict``: what a checkpoint of this method must match to be restored (default: every field);
- ``extra_positions(config) -> (virtual_tokens, prefix_tokens)``: sequence positions the method adds (prompt
  tuning prepends inputs, prefix tuning extra keys), for activation-memory estimates (default: none);
- ``hf``: a :class:`peftjax.peft.hf_format.HFFormat`, how the method reads and writes Hugging Face PEFT adapter
  directories of its ``peft_type`` (default: none, the method has no HF counterpart);
- ``regularizer(model, config) -> scalar``: a term the train step adds to the mean loss of every step (computed
  on the model with the step's trainable values, differentiated with it); the step reports it as
  ``metrics["regularizer"]`` and ``metrics["loss"]`` stays the data loss (default: none);
- ``wrap_optimizer(config, optimizer, run_steps) -> optax.GradientTransformation``: wraps the run's optimizer
  (AdamW after gradient clipping) in a transformation that sees the clipped gradients, the parameters and the
  inner updates and may change those updates after the step (AdaLoRA's rank allocator); its state is part of the
  optimizer state, so checkpoints and resumption carry it; ``run_steps`` is ``train.steps`` (default: none).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.peft.hf_format import HFFormat


def _default_describe(config) -> dict:
    return {"rank": config.rank} if hasattr(config, "rank") else {}


def config_fields(config) -> dict:
    """The config's fields as plain YAML-able values (tuples become lists)."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _no_positions(config) -> tuple[int, int]:
    return 0, 0


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    apply_fn: Callable[[nnx.Module, object], None]
    trains_base: bool = False
    describe: Callable[[object], dict] = _default_describe
    identity: Callable[[object], dict] = config_fields
    extra_positions: Callable[[object], tuple[int, int]] = _no_positions
    hf: HFFormat | None = None
    regularizer: Callable | None = None
    wrap_optimizer: Callable | None = None

    def field_names(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, apply_fn: Callable[[nnx.Module, object], None], *,
                    trains_base: bool = False, describe: Callable | None = None, identity: Callable | None = None,
                    extra_positions: Callable | None = None, hf: HFFormat | None = None,
                    regularizer: Callable | None = None, wrap_optimizer: Callable | None = None) -> None:
    """Register a PEFT method (see the module docstring for the hooks). One config class names one method."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class of method {name!r} must be a dataclass")
    hooks = {k: v for k, v in (("describe", describe), ("identity", identity),
                               ("extra_positions", extra_positions)) if v is not None}
    _METHODS[name] = Method(name, config_cls, apply_fn, trains_base, **hooks, hf=hf, regularizer=regularizer,
                            wrap_optimizer=wrap_optimizer)


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


def hf_formats() -> dict[str, HFFormat]:
    """{HF PEFT type: its format} over the registered methods that have one."""
    return {m.hf.peft_type: m.hf for m in _METHODS.values() if m.hf is not None}


def make_config(name: str, **kwargs):
    """The config dataclass of method ``name`` built from keyword arguments (unknown keys are an error)."""
    method = get_method(name)
    unknown = sorted(set(kwargs) - set(method.field_names()))
    if unknown:
        raise PeftjaxError(f"method {name!r} has no option {unknown[0]!r}; its options: "
                           f"{', '.join(method.field_names())}")
    return method.config_cls(**kwargs)


def apply(model: nnx.Module, config) -> nnx.Module:
    """A new model with the method of ``config`` applied; ``model`` itself is left untouched.

    The clone shares the (immutable) weight buffers with ``model``, so this costs no weight memory.
    """
    method = method_for_config(config)
    new = nnx.clone(model)
    method.apply_fn(new, config)
    return new
