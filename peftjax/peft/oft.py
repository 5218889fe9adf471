"""OFT: orthogonal fine-tuning (Qiu et al. 2023), in its input-centric form with the Cayley-Neumann
parametrisation (OFTv2, Qiu et al. 2025, as Hugging Face PEFT computes it), written only against the public API.

    y = (x R) W,   R = diag(R_1, ..., R_k) block-diagonal (d_in, d_in), blocks of size b, k = d_in / b

Each block is the Cayley transform of a skew-symmetric Q_i = U - U^T (U strictly upper triangular: b (b - 1) / 2
trainable numbers per block), R_i = (I + Q_i)(I - Q_i)^-1 = I + 2 Q + 2 Q^2 + 2 Q^3 + ..., which is orthogonal: R
rotates the inputs of W (W' = R W in the (d_in, d_out) layout), keeping the angles between W's neurons (the paper's
hyperspherical energy). With ``use_cayley_neumann`` (the default) the series is cut after ``neumann_terms`` terms,
the last one with weight 1 (n = 5: I + 2Q + 2Q^2 + 2Q^3 + Q^4), which needs no inverse; otherwise R_i is computed
exactly as HF PEFT computes it, by solving R_i (I + Q_i) = I - Q_i: R_i = (I - Q_i)(I + Q_i)^-1, the Cayley transform
of -Q_i (= R_i^T, orthogonal too: HF's two branches differ in the sign of Q, and adapters follow their branch).
``block_share`` uses one block for all k.
Q = 0 at the start, so R = I and the adapted model is the base. R folds into W exactly (W' = R W); unmerging
solves R W = W'.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, HFFormat, HFTensors, adapter_modules, apply, check_unmerged,
                              hf_number, hf_targets, module_names, register_method, replace_matching)


class OFT(Adapter):
    """OFT's skew-symmetric generators (upper triangles), one row per block."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFTConfig:
    block_size: int = 32  # b; every target's d_in must be a multiple of it
    targets: str | tuple[str, ...] = "all-linear"
    use_cayley_neumann: bool = True
    neumann_terms: int = 5
    block_share: bool = False

    def __post_init__(self):
        if self.block_size < 2:
            raise PeftjaxError(f"OFT block_size must be >= 2, got {self.block_size}")
        if self.use_cayley_neumann and self.neumann_terms < 1:
            raise PeftjaxError(f"OFT neumann_terms must be >= 1, got {self.neumann_terms}")


def skew_symmetric(u_KE: jax.Array, block_size: int) -> jax.Array:
    """(K, b, b) matrices U - U^T from the row-major strict upper triangles u (K, b (b - 1) / 2)."""
    rows, cols = np.triu_indices(block_size, 1)
    upper = jnp.zeros((u_KE.shape[0], block_size, block_size), u_KE.dtype).at[:, rows, cols].set(u_KE)
    return upper - jnp.swapaxes(upper, 1, 2)


def cayley(q_KBB: jax.Array, neumann_terms: int | None) -> jax.Array:
    """R = (I + Q)(I - Q)^-1 by its Neumann series cut at ``neumann_terms`` (the last term weight 1), or, for None,
    exactly as HF PEFT solves it: R (I + Q) = I - Q."""
    eye = jnp.broadcast_to(jnp.eye(q_KBB.shape[-1], dtype=q_KBB.dtype), q_KBB.shape)
    if neumann_terms is None:
        return jnp.swapaxes(jnp.linalg.solve(jnp.swapaxes(eye + q_KBB, 1, 2), jnp.swapaxes(eye - q_KBB, 1, 2)), 1, 2)
    r, power = eye, eye
    for n in range(1, neumann_terms):
        power = power @ q_KBB
        r = r + (1.0 if n == neumann_terms - 1 else 2.0) * power
    return r


class OFTLinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: Linear, *, block_size: int, neumann_terms: int | None, block_share: bool):
        super().__init__(base)
        self.block_size, self.neumann_terms, self.block_share = block_size, neumann_terms, block_share
        blocks = 1 if block_share else base.d_in // block_size
        self.oft_r = OFT(jnp.zeros((blocks, block_size * (block_size - 1) // 2), jnp.float32))  # R = I

    def rotation_blocks(self) -> jax.Array:
        """(k, b, b): R_1..R_k."""
        r = cayley(skew_symmetric(self.oft_r[...], self.block_size), self.neumann_terms)
        k = self.d_in // self.block_size
        return jnp.broadcast_to(r, (k, *r.shape[1:])) if self.block_share else r

    def rotate(self, x_ND: jax.Array) -> jax.Array:
        """x R, block by block."""
        r = self.rotation_blocks().astype(x_ND.dtype)
        xr = jnp.einsum("nkb,kbc->nkc", x_ND.reshape(x_ND.shape[0], *r.shape[:2]), r)
        return xr.reshape(x_ND.shape)

    def __call__(self, x, key=None):
        if self.bypass():
            return self.base(x)
        return self.base(self.rotate(x))

    def merge_kernel(self, w_DO):
        """R W, block by block."""
        r = self.rotation_blocks().astype(w_DO.dtype)
        return jnp.einsum("kbc,kcd->kbd", r, w_DO.reshape(r.shape[0], self.block_size, -1)).reshape(w_DO.shape)

    def unmerge_kernel(self, w_DO):
        """W from W' = R W by solving each block (the truncated Neumann series is only nearly orthogonal)."""
        r = self.rotation_blocks().astype(w_DO.dtype)
        return jnp.linalg.solve(r, w_DO.reshape(r.shape[0], self.block_size, -1)).reshape(w_DO.shape)


def apply_oft(model, config: OFTConfig) -> None:
    neumann = config.neumann_terms if config.use_cayley_neumann else None

    def make(path, base, _):
        if base.d_in % config.block_size:
            raise PeftjaxError(f"OFT block_size {config.block_size} does not divide {path}'s input size {base.d_in}; "
                               "choose a divisor")
        return OFTLinear(base, block_size=config.block_size, neumann_terms=neumann, block_share=config.block_share)

    replace_matching(model, Linear, config.targets, make, what="OFT target")


def read_hf_oft(model, cfg: dict, tensors: HFTensors):
    """HF stores the upper triangles as ``oft_R.weight`` (blocks, b (b - 1) / 2), in the same order as here."""
    path = tensors.config_path
    for key, why in (("coft", "constrained OFT (coft)"), ("module_dropout", "module_dropout"),
                     ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern")):
        if cfg.get(key):
            raise PeftjaxError(f"{path}: {why} is not supported here; load an adapter without it")
    block_size = hf_number(cfg, "oft_block_size", int, path, 0)
    if not block_size:
        raise PeftjaxError(f"{path}: give oft_block_size (OFT adapters that set r, the number of blocks, instead "
                           "are not supported here)")
    config = OFTConfig(block_size=block_size, targets=hf_targets(cfg.get("target_modules"), path),
                       use_cayley_neumann=bool(cfg.get("use_cayley_neumann", True)),
                       neumann_terms=hf_number(cfg, "num_cayley_neumann_terms", int, path, 5),
                       block_share=bool(cfg.get("block_share", False)))
    adapted = apply(model, config)
    for p, layer in adapter_modules(adapted, OFTLinear).items():
        layer.oft_r.set_value(tensors.take(f"{p}.oft_R.weight", layer.oft_r.shape))
    return adapted


def write_hf_oft(model):
    layers = adapter_modules(model, OFTLinear)
    if not layers:
        return None
    check_unmerged(layers)
    if len({(m.block_size, m.neumann_terms, m.block_share) for m in layers.values()}) > 1:
        raise PeftjaxError("HF PEFT OFT stores one block size and parametrisation per adapter; this model mixes them")
    first = next(iter(layers.values()))
    return {"r": 0, "oft_block_size": first.block_size, "target_modules": module_names(layers),
            "use_cayley_neumann": first.neumann_terms is not None, "num_cayley_neumann_terms":
            first.neumann_terms or 5, "block_share": first.block_share, "coft": False, "eps": 6e-5,
            "module_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "init_weights": True}, {
        f"{p}.oft_R.weight": np.asarray(m.oft_r[...]) for p, m in layers.items()}


register_method("oft", OFTConfig, apply_oft, hf=HFFormat("OFT", read_hf_oft, write_hf_oft))
