"""LoKr: low-rank Kronecker product adaptation (Yeh et al. 2023, LyCORIS), written only against the public API.

    y = W x + ΔW x,   ΔW = s * C1 ⊗ C2,   C1: (m1, o1),  C2: (m2, o2),  d_in = m1 m2,  d_out = o1 o2,  s = alpha / r

in the (d_in, d_out) layout of the base weight (⊗ is the Kronecker product: ΔW[i m2 + j, a o2 + b] =
s C1[i, a] C2[j, b]). Each dimension is split into two factors as close to its square root as possible (or with
``decompose_factor`` as one of them); (m1, o1) <= (m2, o2). C2, the larger factor, is itself low rank, C2 = A2 B2
with A2: (m2, r), B2: (r, o2), when r < max(m2, o2) / 2, and full otherwise; with ``decompose_both`` C1 is low rank by
the same rule. A Kronecker product of an (m1 x o1) and an (m2 x o2) matrix has rank rank(C1) rank(C2), so LoKr
reaches high-rank updates with few parameters. As Hugging Face PEFT initialises it, C1 (or its B1) starts at zero,
so ΔW = 0, and the rest Kaiming-uniform.

The forward never forms ΔW: with x viewed as (N, m1, m2), x ΔW = s * einsum("nij,ia,jb->nab", x, C1, C2).
ΔW folds into W exactly.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, HFFormat, HFTensors, adapter_modules, apply, check_unmerged,
                              hf_number, hf_targets, kaiming_uniform, module_names, refuse_lycoris_options,
                              register_method, replace_matching)


class LoKr(Adapter):
    """LoKr's trainable Kronecker factors."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig:
    rank: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] = "all-linear"
    decompose_both: bool = False  # C1 low rank too (when r < max(m1, o1) / 2)
    decompose_factor: int = -1  # -1: factors near the square root; else one factor of each dimension
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise PeftjaxError(f"LoKr rank must be >= 1, got {self.rank}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise PeftjaxError(f"LoKr decompose_factor must be -1 or a positive integer, got {self.decompose_factor}")


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(p, q) with p q = dim: ``factor`` and dim / factor when it divides dim, else the divisor pair with the
    smallest sum whose smaller member is <= ``factor`` (any, for -1), smaller first (as LyCORIS and HF PEFT)."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    p = min((d for d in range(1, dim + 1) if dim % d == 0 and d <= limit), key=lambda d: d + dim // d)
    return min(p, dim // p), max(p, dim // p)


def kron_apply(x_ND: jax.Array, c1: jax.Array, c2: jax.Array) -> jax.Array:
    """x (C1 ⊗ C2) for row-vector activations, through the (m1, m2) view of each input."""
    n = x_ND.shape[0]
    y = jnp.einsum("nij,ia,jb->nab", x_ND.reshape(n, c1.shape[0], c2.shape[0]), c1.astype(x_ND.dtype),
                   c2.astype(x_ND.dtype))
    return y.reshape(n, c1.shape[1] * c2.shape[1])


class LoKrLinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: Linear, *, rank: int, alpha: float, decompose_both: bool, decompose_factor: int,
                 key: jax.Array):
        super().__init__(base)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.decompose_both, self.decompose_factor = decompose_both, decompose_factor
        m1, m2 = factorization(base.d_in, decompose_factor)
        o1, o2 = factorization(base.d_out, decompose_factor)
        k1, k2, k3 = jax.random.split(key, 3)
        if decompose_both and rank < max(m1, o1) / 2:
            self.w1_a = LoKr(kaiming_uniform(k1, (m1, rank), m1))
            self.w1_b = LoKr(jnp.zeros((rank, o1), jnp.float32))  # ΔW = 0 at the start
        else:
            self.w1 = LoKr(jnp.zeros((m1, o1), jnp.float32))
        if rank < max(m2, o2) / 2:
            self.w2_a = LoKr(kaiming_uniform(k2, (m2, rank), m2))
            self.w2_b = LoKr(kaiming_uniform(k3, (rank, o2), rank))
        else:
            self.w2 = LoKr(kaiming_uniform(k2, (m2, o2), m2))

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """(C1, C2), each full or the product of its low-rank pair."""
        c1 = self.w1[...] if hasattr(self, "w1") else self.w1_a[...] @ self.w1_b[...]
        c2 = self.w2[...] if hasattr(self, "w2") else self.w2_a[...] @ self.w2_b[...]
        return c1, c2

    def delta_weight(self) -> jax.Array:
        c1, c2 = self.factors()
        return jnp.kron(c1, c2) * self.scale

    def adapt(self, x, y, key=None):
        c1, c2 = self.factors()
        return y + kron_apply(x, c1 * self.scale, c2)


def apply_lokr(model, config: LoKrConfig) -> None:
    root = jax.random.key(config.seed)

    def make(path, base, _):
        key = jax.random.fold_in(root, zlib.crc32(path.encode()))  # each layer's draw depends on its path only
        return LoKrLinear(base, rank=config.rank, alpha=config.alpha, decompose_both=config.decompose_both,
                          decompose_factor=config.decompose_factor, key=key)

    replace_matching(model, Linear, config.targets, make, what="LoKr target")


# HF PEFT keeps torch's (d_out, d_in) layout, ΔW^T = s W1 ⊗ W2 with W = w_a w_b: so lokr_w = w^T, lokr_w_a = w_b^T
HF_NAMES = {"lokr_w1": "w1", "lokr_w1_a": "w1_b", "lokr_w1_b": "w1_a", "lokr_w2": "w2", "lokr_w2_a": "w2_b",
            "lokr_w2_b": "w2_a"}


def read_hf_lokr(model, cfg: dict, tensors: HFTensors):
    path = tensors.config_path
    refuse_lycoris_options(cfg, path, "LoKr")
    config = LoKrConfig(rank=hf_number(cfg, "r", int, path, 8), alpha=hf_number(cfg, "alpha", float, path, 8.0),
                        targets=hf_targets(cfg.get("target_modules"), path),
                        decompose_both=bool(cfg.get("decompose_both", False)),
                        decompose_factor=hf_number(cfg, "decompose_factor", int, path, -1))
    adapted = apply(model, config)
    for p, layer in adapter_modules(adapted, LoKrLinear).items():
        for hf, ours in HF_NAMES.items():
            if hasattr(layer, ours):
                var = getattr(layer, ours)
                var.set_value(tensors.take(f"{p}.{hf}", var.shape, transpose=True))
    return adapted


def write_hf_lokr(model):
    layers = adapter_modules(model, LoKrLinear)
    if not layers:
        return None
    check_unmerged(layers)
    if len({(m.rank, m.alpha, m.decompose_both, m.decompose_factor) for m in layers.values()}) > 1:
        raise PeftjaxError("HF PEFT LoKr export here needs one rank, alpha and decomposition for every layer")
    first = next(iter(layers.values()))
    tensors = {f"{p}.{hf}": np.asarray(getattr(m, ours)[...]).T for p, m in layers.items()
               for hf, ours in HF_NAMES.items() if hasattr(m, ours)}
    return {"r": first.rank, "alpha": first.alpha, "target_modules": module_names(layers),
            "decompose_both": first.decompose_both, "decompose_factor": first.decompose_factor, "rank_dropout": 0.0,
            "module_dropout": 0.0, "use_effective_conv2d": False, "init_weights": True}, tensors


register_method("lokr", LoKrConfig, apply_lokr, hf=HFFormat("LOKR", read_hf_lokr, write_hf_lokr))
