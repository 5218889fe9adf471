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
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, HFFormat, HFTensors, adapter_modules, apply, check_rank,
                              check_unmerged, hf_number, hf_targets, module_names, modules_of_type, register_method,
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

    def adapt(self, x, y, key=None):
        return y + vera_delta(x, self.vera_A[...], self.vera_B[...], self.vera_d[...], self.vera_b[...])

    def delta_weight(self):
        return ((self.vera_A[...] * self.vera_d[...][None, :]) @ self.vera_B[...]) * self.vera_b[...][None, :]


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


def read_hf_vera(model, cfg: dict, tensors: HFTensors):
    """HF stores the shared projections once (``base_model.vera_A`` (r, max d_in), ``base_model.vera_B``
    (max d_out, r): torch layout, each layer using the leading slice) and per layer lambda_b = b, lambda_d = d."""
    path = tensors.config_path
    if cfg.get("save_projection") is False:
        raise PeftjaxError(f"{path}: the adapter was saved without its random projections (save_projection=false), "
                           "which only torch's generator can redraw; re-save it with save_projection=true")
    if hf_number(cfg, "vera_dropout", float, path, 0.0):
        raise PeftjaxError(f"{path}: vera_dropout is not supported here; set it to 0 to load the adapter")
    adapted = apply(model, VeRAConfig(rank=hf_number(cfg, "r", int, path, 256),
                                      targets=hf_targets(cfg.get("target_modules"), path)))
    layers = adapter_modules(adapted, VeRALinear)
    r = next(iter(layers.values())).vera_d.shape[0]
    a = tensors.take("base_model.vera_A", (max(m.d_in for m in layers.values()), r), transpose=True)
    b = tensors.take("base_model.vera_B", (r, max(m.d_out for m in layers.values())), transpose=True)
    for p, layer in layers.items():
        layer.vera_A.set_value(a[: layer.d_in])
        layer.vera_B.set_value(b[:, : layer.d_out])
        layer.vera_d.set_value(tensors.take(f"{p}.vera_lambda_d", layer.vera_d.shape))
        layer.vera_b.set_value(tensors.take(f"{p}.vera_lambda_b", layer.vera_b.shape))
    return adapted


def write_hf_vera(model):
    layers = adapter_modules(model, VeRALinear)
    if not layers:
        return None
    check_unmerged(layers)
    a = np.asarray(max(layers.values(), key=lambda m: m.d_in).vera_A[...])
    b = np.asarray(max(layers.values(), key=lambda m: m.d_out).vera_B[...])
    if not all(np.array_equal(m.vera_A[...], a[: m.d_in]) and np.array_equal(m.vera_B[...], b[:, : m.d_out])
               for m in layers.values()):
        raise PeftjaxError("HF PEFT VeRA shares one pair of projections; this model's VeRA layers do not")
    tensors = {"base_model.vera_A": a.T, "base_model.vera_B": b.T}
    for p, m in layers.items():
        tensors[f"{p}.vera_lambda_d"] = np.asarray(m.vera_d[...])
        tensors[f"{p}.vera_lambda_b"] = np.asarray(m.vera_b[...])
    return {"r": a.shape[1], "target_modules": module_names(layers), "projection_prng_key": 0,
            "save_projection": True, "vera_dropout": 0.0, "d_initial": 0.1, "fan_in_fan_out": False, "bias": "none",
            "init_weights": True}, tensors


register_method("vera", VeRAConfig, apply_vera, hf=HFFormat("VERA", read_hf_vera, write_hf_vera))
