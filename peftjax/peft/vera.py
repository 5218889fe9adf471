"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024), written only against the public API.

    y = W x + Λ_b B Λ_d A x,   A: (d_in, r), B: (r, d_out) frozen random, shared by all layers;
                               Λ_d = diag(d), d: (r,) init ``d_init``;  Λ_b = diag(b), b: (d_out,) init 0

Every layer uses slices of the same two random matrices (drawn once from ``seed``; stored per layer because NNX
tree mode has no shared arrays), so only d and b train: r + d_out parameters a layer. b = 0 leaves the model
unchanged. The update folds into the base: W' = W + A diag(d) B diag(b) (row-vector layout).

This file is the worked example of docs/extending.md: a variable type, a wrapper, a config, a registration.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, check_rank, modules_of_type, register_method,
                              replace_matching)


class VeRA(Adapter):
    """VeRA's trainable scaling vectors d and b."""


class VeRAProjection(nnx.Variable):
    """VeRA's frozen shared random projections (not Trainable, so never optimised)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeRAConfig:
    rank: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    d_init: float = 0.1
    seed: int = 0


def vera_delta(x_ND, a_DR, b_RO, d_R, b_O):
    """diag(b) B diag(d) A x for row-vector activations."""
    return (((x_ND @ a_DR.astype(x_ND.dtype)) * d_R.astype(x_ND.dtype)[None, :]) @ b_RO.astype(x_ND.dtype)
            ) * b_O.astype(x_ND.dtype)[None, :]


class VeRALinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: Linear, a_DR: jax.Array, b_RO: jax.Array, d_init: float):
        super().__init__(base)
        self.vera_A = VeRAProjection(a_DR[: base.d_in])
        self.vera_B = VeRAProjection(b_RO[:, : base.d_out])
        self.vera_d = VeRA(jnp.full((a_DR.shape[1],), d_init, jnp.float32))
        self.vera_b = VeRA(jnp.zeros((base.d_out,), jnp.float32))

    def __call__(self, x, key=None):
        y = self.base(x)
        if self.bypass():
            return y
        return y + vera_delta(x, self.vera_A[...], self.vera_B[...], self.vera_d[...], self.vera_b[...])

    def delta_weight(self):
        return ((self.vera_A[...] * self.vera_d[...][None, :]) @ self.vera_B[...]) * self.vera_b[...][None, :]

    def merge_kernel(self, w_DO):
        return w_DO + self.delta_weight().astype(w_DO.dtype)

    def unmerge_kernel(self, w_DO):
        return w_DO - self.delta_weight().astype(w_DO.dtype)


def apply_vera(model: nnx.Module, config: VeRAConfig) -> None:
    # the shared projections are as large as the largest layer they serve: every linear layer's sizes bound them
    linears = modules_of_type(model, Linear).values()
    d_in, d_out = max(m.d_in for m in linears), max(m.d_out for m in linears)
    ka, kb = jax.random.split(jax.random.key(config.seed))
    a = jax.random.uniform(ka, (d_in, config.rank), jnp.float32, -1, 1) / math.sqrt(d_in)  # Kaiming-uniform
    b = jax.random.uniform(kb, (config.rank, d_out), jnp.float32, -1, 1) / math.sqrt(config.rank)

    def make(path, base, _):
        check_rank(config.rank, base, path, what="VeRA")
        return VeRALinear(base, a, b, config.d_init)

    replace_matching(model, Linear, config.targets, make, what="VeRA target")


register_method("vera", VeRAConfig, apply_vera)
