"""IA3: infused adapters by inhibiting and amplifying inner activations (Liu et al. 2022).

Learned vectors rescale the keys, the values and the MLP's intermediate activation:

    k = l_k * (W_k x),   v = l_v * (W_v x),   y = W_down (l_ff * (silu(W_gate x) * W_up x))

implemented, as in Hugging Face PEFT, by wrapping the target linears: an output scale on ``k_proj`` / ``v_proj``
and an input scale on the ``feedforward`` ones (``down_proj``, whose input is the intermediate activation). The
vectors start at one, so the adapted model equals the base, and fold into W exactly: W' = W diag(l) for an output
scale, diag(l) W for an input scale (row-vector layout, W is (d_in, d_out)).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models.llama import Linear
from peftjax.errors import PeftjaxError
from peftjax.peft.hf_format import HFFormat, HFTensors, adapter_modules, check_unmerged, hf_targets, module_names
from peftjax.peft.registry import apply, register_method
from peftjax.variables import IA3
from peftjax.peft.wrapper import AdapterLinear
from peftjax.rules import as_patterns, pattern_matches
from peftjax.surgery import replace_matching


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config:
    targets: str | tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: str | tuple[str, ...] = ("down_proj",)  # targets whose input (not output) is rescaled


class IA3Linear(AdapterLinear):
    """A frozen linear layer whose output (or, for feed-forward layers, input) is rescaled by a learned vector."""

    mergeable = True

    def __init__(self, base: Linear, *, on_input: bool):
        super().__init__(base)
        self.on_input = on_input
        self.ia3 = IA3(jnp.ones((base.d_in if on_input else base.d_out,), jnp.float32))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if self.bypass():
            return self.base(x)
        scale = self.ia3[...].astype(x.dtype)[None, :]
        return self.base(x * scale) if self.on_input else self.base(x) * scale

    def adapt(self, x, y, key=None):
        return self(x) if self.on_input else y * self.ia3[...].astype(y.dtype)[None, :]

    def _factor(self, w_DO):
        l = self.ia3[...].astype(w_DO.dtype)
        return l[:, None] if self.on_input else l[None, :]

    def merge_kernel(self, w_DO):
        return w_DO * self._factor(w_DO)

    def unmerge_kernel(self, w_DO):
        return w_DO / self._factor(w_DO)


def apply_ia3(model: nnx.Module, config: IA3Config) -> None:
    feedforward = as_patterns(config.feedforward)
    replace_matching(model, Linear, config.targets, what="IA3 target", make=lambda path, base, _: IA3Linear(
        base, on_input=any(pattern_matches(p, path) for p in feedforward)))


def read_hf_ia3(model: nnx.Module, cfg: dict, tensors: HFTensors) -> nnx.Module:
    """HF stores l as ``ia3_l``: (d_out, 1) on an output, (1, d_in) on a feed-forward layer's input."""
    feedforward = cfg.get("feedforward_modules") or []
    adapted = apply(model, IA3Config(targets=hf_targets(cfg.get("target_modules"), tensors.config_path),
                                     feedforward=hf_targets(feedforward, tensors.config_path, "feedforward_modules")
                                     if feedforward else ()))
    for path, layer in adapter_modules(adapted, IA3Linear).items():
        shape = (1, layer.d_in) if layer.on_input else (layer.d_out, 1)
        layer.ia3.set_value(tensors.take(f"{path}.ia3_l", shape).reshape(-1))
    return adapted


def write_hf_ia3(model: nnx.Module):
    layers = adapter_modules(model, IA3Linear)
    if not layers:
        return None
    check_unmerged(layers)
    tensors = {f"{p}.ia3_l": np.asarray(m.ia3[...]).reshape((1, -1) if m.on_input else (-1, 1))
               for p, m in layers.items()}
    feedforward = module_names(p for p, m in layers.items() if m.on_input)
    if set(feedforward) & set(module_names(p for p, m in layers.items() if not m.on_input)):
        raise PeftjaxError("HF PEFT names IA3's feed-forward layers by module name; this model scales the input of "
                           "some layers of a name and the output of others")
    return {"target_modules": module_names(layers), "feedforward_modules": feedforward, "fan_in_fan_out": False,
            "init_ia3_weights": True}, tensors


register_method("ia3", IA3Config, apply_ia3, hf=HFFormat("IA3", read_hf_ia3, write_hf_ia3))
