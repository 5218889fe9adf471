"""Several named adapters on one base, of any method that adds to a linear layer or prepends a prompt: choose the
active one, combine LoRA ones, or give each example of a batch its own.

    y_i = adapter_a(x_i; W),   a = the active adapter, or names[example of row i] in a mixed batch (None: W x_i)

``add_adapter(model, name, config)`` applies ``config``'s method (LoRA with its variants and options: DoRA, rsLoRA,
dropout, QAT, LoRA-FA; IA3, VeRA, LoHa, LoKr, OFT, QA-LoRA, AdaLoRA; prompt tuning) to the base of ``model`` and
keeps the result as adapter ``name`` beside the ones ``model`` has (a model adapted once holds its adapter as
``default``). Each adapted linear layer becomes a :class:`NamedAdapterLinear`: the shared frozen base plus one layer
of each method per adapter, exactly the layer ``peft.apply`` builds, so each adapter keeps every option and
computes what its own single-adapter model computes. Those layers hold a :class:`DetachedBase` (sizes only) and
the container lends them its base for each call; merges, exports and summaries see the container. Prompts become a
:class:`NamedPrompts`. Methods that change the shared base (PiSSA, OLoRA, LoftQ, full fine-tuning) or add keys to
attention (prefix tuning) are refused with a one-line error.

``set_adapter`` picks the active adapter (``None``: the base alone). In a mixed batch
(``with mixed_adapters(model, names):``) every layer computes the base once and each adapter's output from it
(``AdapterLinear.adapt(x, y)``: for LoRA and the other additive methods a low-rank term, for IA3 a rescaling), and
every row keeps its own adapter's output: one forward pass for the whole batch. Prompts of the rows' adapters must
have one length (rows then differ only in their virtual tokens). ``combine_adapters`` adds an adapter combining
named LoRA adapters (HF PEFT's ``add_weighted_adapter`` methods; the maths is in :mod:`peftjax.peft.arithmetic`).
``single_adapter(model, name)`` is the ordinary one-adapter model of ``name`` (what ``save_hf_adapters`` exports).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import Linear
from peftjax.peft.arithmetic import DELTAWISE, METHODS, combine_layer, elects_sign, is_dare, prunes
from peftjax.peft.hf_format import adapter_modules
from peftjax.peft.lora import LoRAConfig, LoRALinear
from peftjax.peft.prompt import PromptEmbedding
from peftjax.peft.registry import apply, method_for_config
from peftjax.peft.wrapper import AdapterLinear, AdapterModule, DetachedBase
from peftjax.rules import modules_of_type, set_at_path


def _row_ids(rows_B: jax.Array, n_rows: int) -> jax.Array:
    """Each of ``n_rows`` activation rows' adapter index: rows are (example, position) flattened."""
    return jnp.repeat(rows_B, n_rows // rows_B.shape[0])


class NamedAdapterLinear(AdapterLinear):
    """A frozen linear layer shared by named adapters (each a method's own layer on a :class:`DetachedBase`)."""

    mergeable = True

    def __init__(self, base: Linear, adapters: Mapping[str, AdapterLinear], active: str | None):
        super().__init__(base)
        self.adapters = nnx.Dict({name: _detach(layer) for name, layer in adapters.items()})
        self.active = active
        self.row_adapters = nnx.data(None)  # (B,) adapter index per example in a mixed batch (-1: base)

    def names(self) -> list[str]:
        """The adapters' names, sorted: the order a mixed batch's indices refer to (NNX's split and merge, as in
        ``nnx.jit``, rebuild the dict in sorted order, so insertion order would not survive them)."""
        return sorted(self.adapters.keys())

    @contextlib.contextmanager
    def lent(self, name: str) -> Iterator[AdapterLinear]:
        """Adapter ``name`` with this layer's base lent to it for the block. The attribute is set past NNX's
        mutation check on purpose: the loan is undone before anything can observe the shared reference, also
        inside a jitted function that closes over the model."""
        layer = self.adapters[name]
        stub = layer.base
        object.__setattr__(layer, "base", self.base)
        try:
            yield layer
        finally:
            object.__setattr__(layer, "base", stub)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if self.bypass() or (self.active is None and self.row_adapters is None):
            return self.base(x)
        if self.row_adapters is None:
            with self.lent(self.active) as layer:
                return layer(x, key)
        y = self.base(x)
        ids_N = _row_ids(self.row_adapters, x.shape[0])
        out = y
        for i, name in enumerate(self.names()):
            with self.lent(name) as layer:
                out = jnp.where((ids_N == i)[:, None], layer.adapt(x, y, key), out)
        return out

    def adapt(self, x, y, key=None):
        if self.active is None:
            return y
        with self.lent(self.active) as layer:
            return layer.adapt(x, y, key)

    def merge_kernel(self, w_DO):
        """W with the active adapter folded in (W itself where this layer has no active adapter: it computes W)."""
        if self.active is None:
            return w_DO
        with self.lent(self.active) as layer:
            return layer.merge_kernel(w_DO)

    def unmerge_kernel(self, w_DO):
        if self.active is None:
            return w_DO
        with self.lent(self.active) as layer:
            return layer.unmerge_kernel(w_DO)


class NamedPrompts(AdapterModule):
    """Prompt tuning's virtual tokens per named adapter: the active adapter's, or in a mixed batch each example's."""

    def __init__(self, prompts: Mapping[str, PromptEmbedding], active: str | None):
        self.prompts = nnx.Dict(dict(prompts))
        self.active = active
        self.row_adapters = nnx.data(None)  # (B,) index into names() per example, while mixing

    def names(self) -> list[str]:
        return sorted(self.prompts.keys())  # sorted, as NamedAdapterLinear.names

    @property
    def num_tokens(self) -> int:
        if self.disabled:
            return 0
        if self.row_adapters is not None:
            return next(iter(self.prompts.values())).num_tokens  # mixed_adapters checked they are alike
        return 0 if self.active is None else self.prompts[self.active].num_tokens

    def __call__(self) -> jax.Array:
        """(N, D) for the active adapter, (B, N, D) in a mixed batch."""
        if self.row_adapters is None:
            return self.prompts[self.active]()
        return jnp.stack([self.prompts[n]() for n in self.names()])[self.row_adapters]


def _detach(layer: AdapterLinear) -> AdapterLinear:
    if not isinstance(layer.base, DetachedBase):
        layer.base = DetachedBase(layer.base.d_in, layer.base.d_out)
    return layer


def _containers(model: nnx.Module) -> dict[str, NamedAdapterLinear]:
    return adapter_modules(model, NamedAdapterLinear)


def _prompts(model: nnx.Module) -> NamedPrompts | None:
    prompt = getattr(model, "prompt", None)
    return prompt if isinstance(prompt, NamedPrompts) else None


def _holders(model: nnx.Module) -> list[NamedAdapterLinear | NamedPrompts]:
    """Every module of ``model`` that holds named adapters: its containers, then its named prompts."""
    prompts = _prompts(model)
    return [*_containers(model).values(), *([prompts] if prompts is not None else [])]


def _check_can_be_named(model: nnx.Module, what: str) -> None:
    """One line for adapters a named-adapter model cannot hold (they do not act on a linear layer's output)."""
    for path, module in adapter_modules(model, AdapterModule).items():
        if isinstance(module, (AdapterLinear, NamedPrompts, PromptEmbedding)):
            if getattr(module, "merged", False):
                raise PeftjaxError(f"{path} is merged into its base; unmerge it before adding named adapters")
            continue
        raise PeftjaxError(f"{what} has {type(module).__name__} at {path or 'the model'}, which named adapters cannot "
                           "hold (they adapt linear layers or prepend a prompt); use a separate model for it")


def _to_named(model: nnx.Module) -> None:
    """A model adapted once holds its adapter as ``default``, in containers (in place)."""
    _check_can_be_named(model, "the model")
    for path, layer in adapter_modules(model, AdapterLinear).items():
        if not isinstance(layer, NamedAdapterLinear):
            set_at_path(model, path, NamedAdapterLinear(layer.base, {"default": layer}, "default"))
    if isinstance(getattr(model, "prompt", None), PromptEmbedding):
        model.prompt = NamedPrompts({"default": model.prompt}, "default")


def _bare(model: nnx.Module) -> nnx.Module:
    """A clone of ``model`` with its named adapters removed: the shared base."""
    bare = nnx.clone(model)
    for path, layer in _containers(bare).items():
        set_at_path(bare, path, layer.base)
    if _prompts(bare) is not None:
        bare.prompt = None
    return bare


def _weights(module: nnx.Module) -> list:
    return jax.tree.leaves(nnx.state(module))


def active_adapter(model: nnx.Module) -> str | None:
    """The name of the active adapter (None: none is, or the model has no named adapters)."""
    for holder in _holders(model):
        if holder.active is not None:
            return holder.active
    return None


def add_adapter(model: nnx.Module, name: str, adapter) -> nnx.Module:
    """A new model with adapter ``name`` beside the adapters ``model`` has. ``adapter`` is a method's config (applied
    to the base of ``model``, freshly initialised: any registered method that adapts linear layers without changing
    them, or prompt tuning) or a model carrying one adapter on the same base (``peft.apply``'s result, a trained
    run's model, ``load_hf_adapter``'s), whose adapter is taken as it is.

    A model without adapters gets ``name`` active; otherwise the active adapter stays (as HF PEFT's
    ``add_adapter``): ``set_adapter`` switches. Layers without the active adapter compute the base.
    """
    had_adapters = bool(adapter_modules(model, AdapterModule))
    model = nnx.clone(model)
    _to_named(model)
    if name in adapter_names(model):
        raise PeftjaxError(f"adapter {name!r} already exists; choose another name")
    active = active_adapter(model) if had_adapters else name
    bare = _bare(model)
    if isinstance(adapter, nnx.Module):
        if adapter_names(adapter):
            raise PeftjaxError("the adapter model has named adapters itself; pass single_adapter(model, name)")
        adapted, what = nnx.clone(adapter), "the adapter model"
    else:
        adapted, what = _applied(bare, adapter), f"method {method_for_config(adapter).name}"
    _check_can_be_named(adapted, what)
    bases, own, holders = modules_of_type(bare, Linear), modules_of_type(model, Linear), _containers(model)
    for path, layer in adapter_modules(adapted, AdapterLinear).items():
        _check_same_base(path, layer.base, bases.get(path), what)
        holder = holders.get(path)
        if holder is None:
            set_at_path(model, path, NamedAdapterLinear(own[path], {name: layer}, None))
        else:
            holder.adapters[name] = _detach(layer)
    if isinstance(getattr(adapted, "prompt", None), PromptEmbedding):
        if _prompts(model) is None:
            model.prompt = NamedPrompts({}, None)
        model.prompt.prompts[name] = adapted.prompt
    return set_adapter(model, active)


def _applied(bare: nnx.Module, config) -> nnx.Module:
    method = method_for_config(config)
    if method.trains_base:
        raise PeftjaxError(f"{method.name} trains the base weights, which named adapters share; it cannot be a named "
                           "adapter")
    if isinstance(config, LoRAConfig) and config.init == "eva":
        raise PeftjaxError("EVA initialises from data: train with init='eva' in a run, then add the trained model "
                           "(add_adapter(model, name, trained_model))")
    return apply(bare, config)


def _check_same_base(path: str, base: nnx.Module, shared: nnx.Module | None, what: str) -> None:
    """One line unless ``base`` is the layer ``shared`` of the named model's base (the same arrays, or equal ones)."""
    if shared is None:
        raise PeftjaxError(f"{what} adapts {path}, which is not a linear layer of this model's base")
    mine, theirs = _weights(base), _weights(shared)
    if type(base) is not type(shared) or len(mine) != len(theirs) or not all(
            a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(jnp.array_equal(a, b)))
            for a, b in zip(mine, theirs)):
        raise PeftjaxError(f"{what} has other base weights at {path} than this model (PiSSA, OLoRA and LoftQ change "
                           "W; a model of another checkpoint differs); named adapters share one base")


def adapter_names(model: nnx.Module) -> list[str]:
    names: dict[str, None] = {}
    for holder in _holders(model):
        names.update(dict.fromkeys(holder.names()))
    return list(names)


def _check_name(model, name):
    known = adapter_names(model)
    if name not in known:
        raise PeftjaxError(f"unknown adapter {name!r}; the model has: {', '.join(known) or 'none (add_adapter)'}")


def set_adapter(model: nnx.Module, name: str | None) -> nnx.Module:
    """Make ``name`` the active adapter (in place; ``None``: none). Layers without it compute the base."""
    if name is not None:
        _check_name(model, name)
    for holder in _holders(model):
        if getattr(holder, "merged", False):
            raise PeftjaxError("cannot switch adapters on a merged model; unmerge it first")
        holder.active = name if name is not None and name in holder.names() else None
    return model


def single_adapter(model: nnx.Module, name: str) -> nnx.Module:
    """A new model with adapter ``name`` alone, as ``peft.apply`` of its method would have built it (its options,
    its layers; every other adapter removed): for saving, training or serving one adapter."""
    _check_name(model, name)
    model = nnx.clone(model)
    for path, holder in _containers(model).items():
        if holder.merged:
            raise PeftjaxError(f"{path} is merged into its base; unmerge it first")
        if name in holder.adapters:
            layer = holder.adapters[name]
            layer.base = holder.base
            set_at_path(model, path, layer)
        else:
            set_at_path(model, path, holder.base)
    prompts = _prompts(model)
    if prompts is not None:
        model.prompt = prompts.prompts[name] if name in prompts.prompts else None
    return model


def _lora_parts(path: str, holder: NamedAdapterLinear, names, weights) -> list[tuple]:
    parts = []
    for k, w in zip(names, weights):
        if k not in holder.adapters:
            continue
        layer = holder.adapters[k]
        if type(layer) is not LoRALinear or layer.dora or layer.qat is not None:
            kind = "DoRA" if getattr(layer, "dora", False) else type(layer).__name__
            raise PeftjaxError(f"combine_adapters combines plain LoRA adapters; {k!r} is {kind} at {path}")
        parts.append((k, float(w), layer.lora_a[...], layer.lora_b[...], layer.scale))
    return parts


def combine_adapters(model: nnx.Module, names: Sequence[str], weights: Sequence[float], name: str, *,
                     method: str = "svd", rank: int | None = None, density: float | None = None,
                     majority_sign: str = "total", seed: int | None = None,
                     masks: Mapping[tuple[str, str, str], jax.Array] | None = None) -> nnx.Module:
    """A new model with LoRA adapter ``name`` (scale 1) combining LoRA adapters ``names`` with ``weights``.

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
    layers = {path: (holder, _lora_parts(path, holder, names, weights)) for path, holder in _containers(model).items()}
    if rank is None:
        rank = max(a.shape[1] for _, parts in layers.values() for _, _, a, _, _ in parts)
    for path, (holder, parts) in layers.items():
        if parts:
            a, b = combine_layer(path, parts, method, rank=rank, density=density, sign_method=majority_sign,
                                 seed=0 if seed is None else seed, masks=masks)
            layer = LoRALinear(holder.base, rank=a.shape[1], alpha=float(a.shape[1]), rslora=False,
                               key=jax.random.key(0))  # scale alpha / r = 1: the combination carries it
            layer.lora_a.set_value(a)
            layer.lora_b.set_value(b)
            holder.adapters[name] = _detach(layer)
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
    for n in dict.fromkeys(n for n in names if n is not None):  # each name checked once, not once per example
        _check_name(model, n)
    prompts = _prompts(model)
    if prompts is not None and len(prompts.names()):
        lengths = {n: prompts.prompts[n].length if n in prompts.names() else 0 for n in dict.fromkeys(names)}
        if len(set(lengths.values())) > 1 or 0 in lengths.values():
            raise PeftjaxError("every example of a mixed batch must get a prompt of one length (prompt tuning adds "
                               f"positions); the examples' adapters have {lengths}")
    holders = _holders(model)
    try:
        for holder in holders:
            index = {n: i for i, n in enumerate(holder.names())}
            holder.row_adapters = jnp.asarray([index.get(n, -1) for n in names], jnp.int32)
        yield model
    finally:
        for holder in holders:
            holder.row_adapters = None
