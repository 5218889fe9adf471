"""LoHa: low-rank Hadamard product adaptation (Hyeon-Woo et al. 2022, FedPara), written only against the public API.

    y = W x + ΔW x,   ΔW = s * (A1 B1) ⊙ (A2 B2),   A_i: (d_in, r), B_i: (r, d_out),   s = alpha / r

The Hadamard product of two rank-r matrices has rank up to r^2, so LoHa reaches a higher-rank update than LoRA with
the same 2 r (d_in + d_out) parameters. A1, B1, A2 start Kaiming-uniform and B2 at zero (as Hugging Face PEFT
initialises ``hada_w2_b``), so ΔW = 0 and the adapted model starts as the base. ΔW folds into W exactly.

This file is the walkthrough of docs/extending.md: a variable type, the maths, a wrapper, a config, a registration.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, HFFormat, HFTensors, adapter_modules, apply, check_rank,
                              check_unmerged, hf_number, hf_targets, kaiming_uniform, module_names,
                              refuse_lycoris_options, register_method, replace_matching)


class LoHa(Adapter):
    """LoHa's four trainable factors."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] = "all-linear"
    seed: int = 0


def loha_weight(a1_DR, b1_RO, a2_DR, b2_RO, scale: float) -> jax.Array:
    """ΔW = s (A1 B1) ⊙ (A2 B2) in the (d_in, d_out) layout of the base weight."""
    return (a1_DR @ b1_RO) * (a2_DR @ b2_RO) * scale


class LoHaLinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: Linear, *, rank: int, alpha: float, key: jax.Array):
        super().__init__(base)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        k1, k2, k3 = jax.random.split(key, 3)
        self.hada_a1 = LoHa(kaiming_uniform(k1, (base.d_in, rank), base.d_in))
        self.hada_b1 = LoHa(kaiming_uniform(k2, (rank, base.d_out), rank))
        self.hada_a2 = LoHa(kaiming_uniform(k3, (base.d_in, rank), base.d_in))
        self.hada_b2 = LoHa(jnp.zeros((rank, base.d_out), jnp.float32))  # ΔW = 0 at the start

    def delta_weight(self) -> jax.Array:
        return loha_weight(self.hada_a1[...], self.hada_b1[...], self.hada_a2[...], self.hada_b2[...], self.scale)

    def adapt(self, x, y, key=None):
        return y + x @ self.delta_weight().astype(x.dtype)


def apply_loha(model, config: LoHaConfig) -> None:
    root = jax.random.key(config.seed)

    def make(path, base, _):
        check_rank(config.rank, base, path, what="LoHa")
        key = jax.random.fold_in(root, zlib.crc32(path.encode()))  # each layer's draw depends on its path only
        return LoHaLinear(base, rank=config.rank, alpha=config.alpha, key=key)

    replace_matching(model, Linear, config.targets, make, what="LoHa target")


# HF PEFT keeps torch's (d_out, d_in) layout: ΔW^T = s (w1_a w1_b) ⊙ (w2_a w2_b), so w_a = B^T and w_b = A^T
HF_NAMES = {"hada_w1_a": "hada_b1", "hada_w1_b": "hada_a1", "hada_w2_a": "hada_b2", "hada_w2_b": "hada_a2"}


def read_hf_loha(model, cfg: dict, tensors: HFTensors):
    path = tensors.config_path
    refuse_lycoris_options(cfg, path, "LoHa")
    config = LoHaConfig(rank=hf_number(cfg, "r", int, path), alpha=hf_number(cfg, "alpha", float, path, 8.0),
                        targets=hf_targets(cfg.get("target_modules"), path))
    adapted = apply(model, config)
    for p, layer in adapter_modules(adapted, LoHaLinear).items():
        for hf, ours in HF_NAMES.items():
            var = getattr(layer, ours)
            var.set_value(tensors.take(f"{p}.{hf}", var.shape, transpose=True))
    return adapted


def write_hf_loha(model):
    layers = adapter_modules(model, LoHaLinear)
    if not layers:
        return None
    check_unmerged(layers)
    if len({(m.rank, m.alpha) for m in layers.values()}) > 1:
        raise PeftjaxError("HF PEFT LoHa export here needs one rank and alpha for every layer")
    first = next(iter(layers.values()))
    tensors = {f"{p}.{hf}": np.asarray(getattr(m, ours)[...]).T for p, m in layers.items() for hf, ours in
               HF_NAMES.items()}
    return {"r": first.rank, "alpha": first.alpha, "target_modules": module_names(layers), "rank_dropout": 0.0,
            "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True}, tensors


register_method("loha", LoHaConfig, apply_loha, hf=HFFormat("LOHA", read_hf_loha, write_hf_loha))
