"""Adapter lifecycle: merge into / unmerge from the base weights, disable adapters for a block of code.

Merging folds each mergeable adapter (:class:`~peftjax.peft.wrapper.AdapterLinear` with ``mergeable``: LoRA, DoRA,
IA3, ...) into its base weight with ``merge_kernel`` and marks it ``merged`` so the forward is the base alone.
On a quantized base the weight is dequantized, updated and requantized in the same format, which adds error; the
returned report gives, per layer, the largest absolute difference between the requantized and the exact merged
weight. Unmerging a dense merge restores W up to float rounding.
"""
from __future__ import annotations

import contextlib

import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.variables import Quantized
from peftjax.peft.wrapper import AdapterLinear, AdapterModule, is_detached
from peftjax.quant import quantize
from peftjax.rules import path_str


def requantize_like(w, q):
    """``w`` quantized with the whole spec of the QArray ``q`` (format, grouping, double quantization)."""
    return quantize(w, **q.spec)


def _adapters(model: nnx.Module) -> dict[str, AdapterModule]:
    return {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, AdapterModule) and not is_detached(m)}


def _rewrite_base(layer: AdapterLinear, fn) -> float:
    """Replace the base weight W by fn(W); the added quantization error (0 for a dense base)."""
    weight = layer.base.weight
    if isinstance(weight, Quantized):
        exact = fn(layer.base.kernel(jnp.float32))
        layer.base.weight = Quantized(layer.base.requantized(exact))
        return float(jnp.abs(layer.base.kernel(jnp.float32) - exact).max())
    layer.base.weight = nnx.Param(fn(weight[...]))
    return 0.0


def merge(model: nnx.Module) -> tuple[nnx.Module, dict[str, float]]:
    """(new model with every adapter folded into its base, {layer path: added quantization error})."""
    model = nnx.clone(model)
    adapters = _adapters(model)
    if not adapters:
        raise PeftjaxError("the model has no adapters to merge; apply a PEFT method first")
    for path, module in adapters.items():
        if not module.mergeable:
            raise PeftjaxError(f"{type(module).__name__} at {path or 'the model'} cannot be merged into the base "
                               "weights (prefix and prompt tuning add inputs, not weight updates); keep it unmerged")
    report = {}
    for path, layer in adapters.items():
        if layer.merged:
            raise PeftjaxError(f"{path} is already merged; unmerge it first")
        report[path] = _rewrite_base(layer, layer.merge_kernel)
        layer.merged = True
    return model, report


def unmerge(model: nnx.Module) -> tuple[nnx.Module, dict[str, float]]:
    """(new model with every merged adapter taken back out of its base, {layer path: added quantization error})."""
    model = nnx.clone(model)
    report = {}
    for path, layer in _adapters(model).items():
        if getattr(layer, "merged", False):
            report[path] = _rewrite_base(layer, layer.unmerge_kernel)
            layer.merged = False
    if not report:
        raise PeftjaxError("the model has no merged adapters; merge it first")
    return model, report


def merge_and_unload(model: nnx.Module) -> nnx.Module:
    """The base model with every adapter merged in and the wrappers removed (plain or quantized linears)."""
    from peftjax.rules import set_at_path

    merged, _ = merge(model)
    for path, layer in _adapters(merged).items():
        set_at_path(merged, path, layer.base)
    return merged


@contextlib.contextmanager
def disable_adapters(model: nnx.Module):
    """Within the block, ``model`` computes its base model: every adapter is bypassed (merged ones raise)."""
    adapters = _adapters(model)
    for path, module in adapters.items():
        if getattr(module, "merged", False):
            raise PeftjaxError(f"{path} is merged into its base and cannot be disabled; unmerge the model first")
    previous = {path: module.disabled for path, module in adapters.items()}
    try:
        for module in adapters.values():
            module.disabled = True
        yield model
    finally:
        for path, module in adapters.items():
            module.disabled = previous[path]
