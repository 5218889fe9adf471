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
from flax import nnx

from peftjax.models.llama import Linear
from peftjax.peft.registry import register_method
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


register_method("ia3", IA3Config, apply_ia3)
