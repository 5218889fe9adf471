"""Several named LoRA adapters on one base: choose the active one, combine them, or give each example its own.

    y_i = W x_i + s_a B_a A_a x_i,   a = the active adapter, or adapter_ids[example of row i] in a mixed batch

``add_adapter`` turns LoRA layers into :class:`MultiLoRALinear` (the first adapter is named ``default``) and adds a
new named one; ``set_adapter`` picks the active adapter (``None``: the base alone). ``combine_adapters`` adds an
adapter combining named ones with weights (HF PEFT's ``add_weighted_adapter`` methods: cat, svd, linear, TIES, DARE,
magnitude pruning; the maths is in :mod:`peftjax.peft.arithmetic`). In a mixed batch
(``mixed_adapters(model, names)``) the factors of all adapters are stacked, padded to a common rank with zeros
(exact), and every row of the 2-D activations keeps only its adapter's part: one forward pass for the whole batch.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import Linear
from peftjax.peft.arithmetic import DELTAWISE, METHODS, combine_layer, elects_sign, is_dare, prunes
from peftjax.peft.lora import LoRAB, LoRAConfig, LoRALinear, lora_delta, lora_weight
from peftjax.variables import LoRA
from peftjax.peft.wrapper import AdapterLinear
from peftjax.rules import as_patterns, match_rules, path_str, set_at_path
from peftjax.surgery import check_rank


class LoRAFactors(nnx.Module):
    """One named adapter of a :class:`MultiLoRALinear`: A (d_in, r), B (r, d_out) and the scale s."""

    def __init__(self, a_DR: jax.Array, b_RO: jax.Array, scale: float):
        self.lora_a, self.lora_b, self.scale = LoRA(a_DR), LoRAB(b_RO), scale

    def delta_weight(self) -> jax.Array:
        return lora_weight(self.lora_a[...], self.lora_b[...], self.scale)


class MultiLoRALinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: Linear, adapters: dict[str, LoRAFactors], active: str | None):
        super().__init__(base)
        self.adapters = nnx.Dict(adapters)
        self.active = active
        self.row_adapters = nnx.data(None)  # (B,) adapter index per example in a mixed batch (-1: base)

    def names(self) -> list[str]:
        return list(self.adapters.keys())

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = self.base(x)
        if self.bypass():
            return y
        if self.row_adapters is not None:
            return y + self.mixed_delta(x)
        if self.active is None:
            return y
        f = self.adapters[self.active]
        return y + lora_delta(x, f.lora_a[...], f.lora_b[...], f.scale)

    def mixed_delta(self, x_ND: jax.Array) -> jax.Array:
        factors = [self.adapters[n] for n in self.names()]
        r = max(f.lora_a.shape[1] for f in factors)
        a = jnp.stack([jnp.pad(f.lora_a[...], ((0, 0), (0, r - f.lora_a.shape[1]))) for f in factors], axis=1)
        b = jnp.stack([jnp.pad(f.lora_b[...] * f.scale, ((0, r - f.lora_b.shape[0]), (0, 0))) for f in factors])
        n = len(factors)
        ids_B = self.row_adapters
        ids_N = jnp.repeat(ids_B, x_ND.shape[0] // ids_B.shape[0])  # rows are (example, position) flattened
        xa = (x_ND @ a.reshape(x_ND.shape[1], n * r).astype(x_ND.dtype)).reshape(-1, n, r)
        xa = xa * (ids_N[:, None] == jnp.arange(n)[None, :]).astype(xa.dtype)[:, :, None]
        return xa.reshape(-1, n * r) @ b.reshape(n * r, -1).astype(x_ND.dtype)

    def _active(self) -> LoRAFactors:
        if self.active is None:
            raise PeftjaxError("no adapter is active; set_adapter(model, name) before merging")
        return self.adapters[self.active]

    def merge_kernel(self, w_DO):
        return w_DO + self._active().delta_weight().astype(w_DO.dtype)

    def unmerge_kernel(self, w_DO):
        return w_DO - self._active().delta_weight().astype(w_DO.dtype)


def _multi_layers(model: nnx.Module) -> dict[str, MultiLoRALinear]:
    return {path_str(p): m for p, m in nnx.iter_modules(model) if isinstance(m, MultiLoRALinear)}


def _to_multi(model: nnx.Module) -> None:
    """LoRA layers become named-adapter layers holding them as ``default``; a layer whose options a named adapter
    cannot keep (DoRA, QAT, dropout, LoRA-FA's frozen A) is a one-line error instead of being dropped silently."""
    for p, m in list(nnx.iter_modules(model)):
        if type(m) is not LoRALinear:
            continue
        kept_out = [what for what, has in (("DoRA", m.dora), ("QAT", m.qat is not None),
                                           (f"dropout {m.dropout}", m.dropout > 0),
                                           ("LoRA-FA's frozen A (freeze_a)", not isinstance(m.lora_a, LoRA))) if has]
        if kept_out:
            raise PeftjaxError(f"{path_str(p)} has {kept_out[0]}, which named adapters do not keep; apply plain "
                               "LoRA (dora, qat_format, dropout, freeze_a off) before add_adapter")
        set_at_path(model, path_str(p), MultiLoRALinear(
            m.base, {"default": LoRAFactors(m.lora_a[...], m.lora_b[...], m.scale)}, "default"))


def add_adapter(model: nnx.Module, name: str, config: LoRAConfig) -> nnx.Module:
    """A new model with LoRA adapter ``name`` added to the layers ``config.targets`` names (the others keep theirs).

    Layers without the new adapter act as the base while it is active. Only the default and gaussian inits apply
    (PiSSA / LoftQ / DoRA change the base, which the other adapters share).
    """
    if config.init not in ("default", "gaussian") or config.dora:
        raise PeftjaxError("add_adapter supports LoRA with init 'default' or 'gaussian' and dora=False; PiSSA, "
                           "LoftQ and DoRA change the shared base")
    model = nnx.clone(model)
    _to_multi(model)
    multi = _multi_layers(model)
    if any(name in m.adapters for m in multi.values()):
        raise PeftjaxError(f"adapter {name!r} already exists; choose another name")
    inner = {p + ".base": p for p in multi}
    linears = {inner.get(path_str(p), path_str(p)): m for p, m in nnx.iter_modules(model)
               if p and isinstance(m, Linear) and not isinstance(m, AdapterLinear)}
    matched = match_rules(linears, as_patterns(config.targets), what="LoRA target")
    keys = jax.random.split(jax.random.key(config.seed), max(len(matched), 1))
    for key, path in zip(keys, matched):
        base = linears[path]
        check_rank(config.rank, base, path, what="LoRA")
        fresh = LoRALinear(base, rank=config.rank, alpha=config.alpha, rslora=config.rslora, key=key, init=config.init)
        factors = LoRAFactors(fresh.lora_a[...], fresh.lora_b[...], fresh.scale)
        if path in multi:
            multi[path].adapters[name] = factors
        else:
            set_at_path(model, path, MultiLoRALinear(base, {name: factors}, name))
    for layer in _multi_layers(model).values():
        if layer.active not in layer.adapters:
            layer.active = None
    return model


def adapter_names(model: nnx.Module) -> list[str]:
    names: dict[str, None] = {}
    for layer in _multi_layers(model).values():
        names.update(dict.fromkeys(layer.names()))
    return list(names)


def _check_name(model, name):
    known = adapter_names(model)
    if name not in known:
        raise PeftjaxError(f"unknown adapter {name!r}; the model has: {', '.join(known) or 'none (add_adapter)'}")


def set_adapter(model: nnx.Module, name: str | None) -> nnx.Module:
    """Make ``name`` the active adapter (in place; ``None``: none). Layers without it compute the base."""
    if name is not None:
        _check_name(model, name)
    for layer in _multi_layers(model).values():
        if layer.merged:
            raise PeftjaxError("cannot switch adapters on a merged model; unmerge it first")
        layer.active = name if name is not None and name in layer.adapters else None
    return model


def combine_adapters(model: nnx.Module, names: Sequence[str], weights: Sequence[float], name: str, *,
                     method: str = "svd", rank: int | None = None, density: float | None = None,
                     majority_sign: str = "total", seed: int | None = None,
                     masks: Mapping[tuple[str, str, str], jax.Array] | None = None) -> nnx.Module:
    """A new model with adapter ``name`` (scale 1) combining adapters ``names`` with ``weights`` by ``method``.

    Methods and their maths: :mod:`peftjax.peft.arithmetic` (HF PEFT's ``add_weighted_adapter`` combination types).
    ``rank``: the svd methods' rank (default: the largest rank among ``names``); ``density``: the fraction kept by
    the pruning methods (ties, dare_*, magnitude_prune); ``majority_sign``: "total" or "frequency" (ties, dare_ties);
    DARE's keep-masks come from ``seed`` (default 0) or are given as ``masks[(layer path, adapter, part)]`` with
    part "lora_a" / "lora_b" (factor-wise dare) or "delta" (the *_svd ones), in peftjax's (d_in, d_out) layout.
    """
    _check_combination(method, names, weights, rank, density, majority_sign, seed, masks)
    for k in names:
        _check_name(model, k)
    if name in adapter_names(model):
        raise PeftjaxError(f"adapter {name!r} already exists; choose another name for the combination")
    model = nnx.clone(model)
    layers = _multi_layers(model)
    if rank is None:
        rank = max(layer.adapters[k].lora_a.shape[1] for layer in layers.values() for k in names if k in layer.adapters)
    for path, layer in layers.items():
        parts = [(k, float(w), layer.adapters[k].lora_a[...], layer.adapters[k].lora_b[...], layer.adapters[k].scale)
                 for k, w in zip(names, weights) if k in layer.adapters]
        if parts:
            a, b = combine_layer(path, parts, method, rank=rank, density=density, sign_method=majority_sign,
                                 seed=0 if seed is None else seed, masks=masks)
            layer.adapters[name] = LoRAFactors(a, b, 1.0)
    return model


def _check_combination(method, names, weights, rank, density, majority_sign, seed, masks) -> None:
    """One line for a combination request that cannot run or would ignore one of its settings."""
    if method not in METHODS:
        raise PeftjaxError(f"unknown combination method {method!r}; use one of {', '.join(METHODS)}")
    if isinstance(names, str) or len(names) == 0 or len(names) != len(weights):
        raise PeftjaxError(f"give a list of adapter names and a list of as many weights; got {names!r} and "
                           f"{weights!r}")
    if prunes(method) != (density is not None):
        raise PeftjaxError(f"method {method!r} " + ("prunes: give density, the fraction of entries kept, in (0, 1]"
                                                    if prunes(method) else "does not prune; drop density"))
    if density is not None and not 0 < density <= 1:
        raise PeftjaxError(f"density is the fraction of entries kept and must be in (0, 1], got {density}")
    if rank is not None and method not in DELTAWISE:
        raise PeftjaxError(f"rank applies to the svd methods ({', '.join(DELTAWISE)}), not {method!r}")
    if majority_sign not in ("total", "frequency"):
        raise PeftjaxError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if majority_sign != "total" and not elects_sign(method):
        raise PeftjaxError(f"majority_sign applies to ties, dare_ties and their _svd forms, not {method!r}")
    if (seed is not None or masks is not None) and not is_dare(method):
        raise PeftjaxError(f"seed and masks draw DARE's random drops; method {method!r} has none")
    if seed is not None and masks is not None:
        raise PeftjaxError("give either seed (masks drawn from it) or masks, not both")


@contextlib.contextmanager
def mixed_adapters(model: nnx.Module, names: list[str | None]):
    """Within the block, example i of a batch uses adapter ``names[i]`` (None: the base), in one forward pass."""
    for n in names:
        if n is not None:
            _check_name(model, n)
    layers = _multi_layers(model)
    try:
        for layer in layers.values():
            index = {n: i for i, n in enumerate(layer.names())}
            layer.row_adapters = jnp.asarray([index.get(n, -1) for n in names], jnp.int32)
        yield model
    finally:
        for layer in layers.values():
            layer.row_adapters = None
