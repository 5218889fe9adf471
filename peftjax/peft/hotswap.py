"""Hot-swapping LoRA adapters into a compiled function: new ranks and alphas without recompiling.

A compiled (jitted) function is specialised to the shapes of its array inputs and to everything static in the model
(its graph: Python attributes such as a LoRA layer's rank and scale). Adapters of other ranks r or scales
s = alpha / r (alpha / sqrt(r) with rsLoRA) would each compile anew. Here every adapter is stored in one shape
instead: A padded with zero columns to (d_in, R) and B with zero rows to (R, d_out), R the declared largest rank, and
the scale an array in the model's state. Zero padding is exact,

    [A 0] [B; 0] = A B,   so   y = W x + s (x [A 0]) [B; 0] = W x + s (x A) B   for every adapter of rank r <= R,

and swapping an adapter in only writes new values into arrays of unchanged shapes: the graph stays the same, and so
does the compiled function (Hugging Face PEFT pads to the largest rank the same way for ``torch.compile``).
Layers that the current adapter does not adapt hold zeros (s = 0), so one prepared model serves adapters with
different target layers too.

    served = prepare_hotswap(model_with_first_adapter, max_rank=16, targets=("q_proj", "v_proj"))
    hotswap(served, model_with_next_adapter)   # in place; jitted functions of ``served`` keep their compilation
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import Linear
from peftjax.peft.hf_format import adapter_modules
from peftjax.peft.lora import LoRAB, LoRALinear, lora_delta, lora_weight
from peftjax.peft.wrapper import AdapterLinear
from peftjax.rules import set_at_path
from peftjax.surgery import check_rank, replace_matching
from peftjax.variables import LoRA


class LoRAScale(nnx.Variable):
    """A LoRA layer's scale s held as a (frozen) array, so a new value does not change the model's graph."""


class HotswapLoRALinear(AdapterLinear):
    """A frozen linear layer plus a LoRA update padded to rank ``max_rank`` with an array scale (for inference)."""

    mergeable = True

    def __init__(self, base: Linear, max_rank: int):
        super().__init__(base)
        self.lora_a = LoRA(jnp.zeros((base.d_in, max_rank), jnp.float32))
        self.lora_b = LoRAB(jnp.zeros((max_rank, base.d_out), jnp.float32))
        self.scale = LoRAScale(jnp.zeros((), jnp.float32))

    @property
    def max_rank(self) -> int:
        return self.lora_a.shape[1]

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if key is not None:
            raise PeftjaxError("a hot-swap model serves adapters (evaluation, generation) and takes no dropout key; "
                               "train each adapter on its own LoRA model, then hotswap it in")
        y = self.base(x)
        if self.bypass():
            return y
        return y + lora_delta(x, self.lora_a[...], self.lora_b[...], self.scale[...])

    def load(self, a_DR, b_RO, scale: float) -> None:
        """Write an adapter of rank r <= max_rank into the padded factors (zeros beyond r)."""
        r = a_DR.shape[1]
        self.lora_a.set_value(jnp.asarray(np.pad(np.asarray(a_DR, np.float32), ((0, 0), (0, self.max_rank - r)))))
        self.lora_b.set_value(jnp.asarray(np.pad(np.asarray(b_RO, np.float32), ((0, self.max_rank - r), (0, 0)))))
        self.scale.set_value(jnp.asarray(scale, jnp.float32))

    def delta_weight(self) -> jax.Array:
        return lora_weight(self.lora_a[...], self.lora_b[...], self.scale[...])


def _lora_layers(model: nnx.Module) -> dict[str, LoRALinear]:
    """The plain LoRA layers of ``model`` (one line for the kinds hot-swapping cannot pad exactly)."""
    layers = adapter_modules(model, LoRALinear)
    for path, layer in layers.items():
        if layer.dora or layer.qat is not None:
            raise PeftjaxError(f"{path} is {'DoRA' if layer.dora else 'quantization-aware LoRA'}; hot-swapping pads "
                               "plain LoRA factors (merge that adapter instead)")
        if layer.merged:
            raise PeftjaxError(f"{path} is merged into its base; unmerge before hot-swapping")
    return layers


def prepare_hotswap(model: nnx.Module, max_rank: int, targets: str | tuple[str, ...] | None = None) -> nnx.Module:
    """A new model whose LoRA layers hold adapters of any rank <= ``max_rank`` (see the module docstring), with the
    adapter of ``model`` loaded. ``targets`` (rules, as in ``LoRAConfig``): further linear layers that later adapters
    adapt; they start at zero."""
    model = nnx.clone(model)
    layers = _lora_layers(model)
    if not layers and targets is None:
        raise PeftjaxError("the model has no LoRA layers; apply a LoRA adapter first or name targets to prepare")
    for path, layer in layers.items():
        if layer.rank > max_rank:
            raise PeftjaxError(f"{path} has rank {layer.rank} > max_rank {max_rank}; declare the largest rank")
        served = HotswapLoRALinear(layer.base, max_rank)
        served.load(layer.lora_a[...], layer.lora_b[...], layer.scale)
        served.disabled = layer.disabled
        set_at_path(model, path, served)
    if targets is not None:
        def make(path, base, _):
            check_rank(max_rank, base, path, what="hot-swap")
            return HotswapLoRALinear(base, max_rank)

        replace_matching(model, Linear, targets, make, what="hot-swap target")
    return model


def hotswap(model: nnx.Module, source: nnx.Module) -> nnx.Module:
    """Load the LoRA adapter of ``source`` (a LoRA model on the same base) into the prepared ``model``, in place.

    Shapes and graph do not change, so functions compiled for ``model`` run the new adapter without recompiling;
    prepared layers that ``source`` does not adapt are zeroed.
    """
    served = adapter_modules(model, HotswapLoRALinear)
    if not served:
        raise PeftjaxError("the model is not prepared for hot-swapping; call prepare_hotswap(model, max_rank) first")
    if any(m.merged for m in served.values()):
        raise PeftjaxError("the prepared model has its adapter merged; unmerge it before swapping another in")
    incoming = _lora_layers(source)
    if not incoming:
        raise PeftjaxError("the source model has no LoRA layers to swap in")
    for path, layer in incoming.items():
        if path not in served:
            raise PeftjaxError(f"the source adapts {path}, which the prepared model does not; prepare it with "
                               "targets covering every layer the adapters use")
        if layer.rank > served[path].max_rank:
            raise PeftjaxError(f"{path} has rank {layer.rank} > the prepared max_rank {served[path].max_rank}")
    for path, target in served.items():
        if path in incoming:
            layer = incoming[path]
            target.load(layer.lora_a[...], layer.lora_b[...], layer.scale)
        else:
            target.load(np.zeros((target.d_in, 0)), np.zeros((0, target.d_out)), 0.0)
    return model
