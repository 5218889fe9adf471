"""AdaLoRA: adaptive budget allocation for low-rank adaptation (Zhang et al. 2023), written against the public API.

Each adapted linear layer gets an update in SVD form, in the (d_in, d_out) layout of the base weight:

    y = x W + s x P diag(λ) Q,   P: (d_in, r),  λ: (r,),  Q: (r, d_out),   s = alpha / (r + 1e-5),   r = init_r

(Hugging Face PEFT, in torch's layout: ``lora_A`` (r, d_in) = P^T, ``lora_E`` (r, 1) = λ, ``lora_B`` (d_out, r)
= Q^T; its scale divides by ``ranknum``, the layer's initial rank, plus 1e-5: it stays fixed while ranks are
masked.) P and Q start N(0, 0.02^2) and λ at zero, so the adapted model starts as the base.

Training differs from LoRA in two ways, both said through registration hooks (nothing else knows the method):

- ``regularizer``: the loss gains ``orth_reg_weight * mean(||P^T P - I||_F, ||Q Q^T - I||_F)``, the mean over the
  2 n_layers factor matrices of the (unsquared) Frobenius distance of their Gram matrix from the identity;
- ``wrap_optimizer``: after every optimizer step a *rank allocator* (:func:`rank_allocator`, an optax wrapper whose
  state lives in the optimizer state, so checkpoints and resumption carry it) scores every triplet (P[:, i], λ_i,
  Q[i, :]) and zeroes the λ_i of the least important ones, over all layers together, down to a budget.

The allocator at optimizer step t (0-based, HF's ``global_step``), with T = ``total_step`` (the run's
``train.steps`` unless set):

- while t < T - tfinal: per element, sensitivity I = |w g| (w the parameter after the step, g its gradient), its
  EMA Ī <- beta1 Ī + (1 - beta1) I and uncertainty Ū <- beta2 Ū + (1 - beta2) |I - Ī|; element score Ī Ū;
  triplet score S_i = s(λ_i) + mean_j s(P[j, i]) + mean_k s(Q[i, k]);
- budget b(t): init_r n for t <= tinit; target_r n + floor((init_r - target_r) n (1 - (t - tinit) / (T - tfinal -
  tinit))^3) in between (n the number of layers), re-masked when t % deltaT == 0: every triplet whose score is at
  most the (n init_r - b)-th smallest is zeroed (its λ_i only; ties are masked together, as HF's ``kthvalue``);
- t == T - tfinal: masked once more to target_r n, which becomes the final mask; the EMAs are reset;
- t > T - tfinal: the final mask is applied after every step.

Every shape stays fixed (masking zeroes λ entries; no layer is resized), so the whole allocator is one jitted
function of (gradients, state, parameters). With tfinal = 0 the final mask is never reached inside T steps (HF's
schedule too): set tfinal >= 1 for a run that ends at exactly target_r n live triplets.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax.errors import PeftjaxError
from peftjax.models import Linear
from peftjax.peft.api import (Adapter, AdapterLinear, HFFormat, HFTensors, adapter_modules, apply, check_rank,
                              check_unmerged, hf_number, hf_targets, input_dropout, is_variable, module_names,
                              register_method, replace_matching)

RANKNUM_EPS = 1e-5  # HF PEFT's scale is alpha / (ranknum + 1e-5)
INIT_STD = 0.02  # P and Q start N(0, 0.02^2), as HF PEFT's reset_lora_parameters
FACTORS = ("adalora_a", "adalora_e", "adalora_b")  # P, λ, Q


class AdaLoRA(Adapter):
    """AdaLoRA's triplets: the left factor P, the singular values λ and the right factor Q."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig:
    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    targets: str | tuple[str, ...] = "all-linear"
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 (HF PEFT's and the paper's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # None: the run's train.steps
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.init_r < 1:
            raise PeftjaxError(f"AdaLoRA init_r must be >= 1, got {self.init_r}")
        if not 1 <= self.target_r <= self.init_r:
            raise PeftjaxError(f"AdaLoRA target_r must be between 1 and init_r ({self.init_r}), got {self.target_r}: "
                               "the budget only shrinks; lower peft.target_r or raise peft.init_r")
        if self.alpha <= 0:
            raise PeftjaxError(f"AdaLoRA alpha must be > 0, got {self.alpha}")
        for name in ("tinit", "tfinal"):
            if getattr(self, name) < 0:
                raise PeftjaxError(f"AdaLoRA {name} must be >= 0 steps, got {getattr(self, name)}")
        if self.deltaT < 1:
            raise PeftjaxError(f"AdaLoRA deltaT (steps between re-maskings) must be >= 1, got {self.deltaT}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise PeftjaxError(f"AdaLoRA {name} (an EMA factor) must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise PeftjaxError(f"AdaLoRA orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise PeftjaxError(f"AdaLoRA dropout must be in [0, 1), got {self.dropout}")
        if self.total_step is not None:
            if self.total_step < 1:
                raise PeftjaxError(f"AdaLoRA total_step must be >= 1 (or null for train.steps), got {self.total_step}")
            check_schedule(self, self.total_step, "peft.total_step")

    def total_steps(self, run_steps: int) -> int:
        """T: ``total_step``, or the run's number of optimizer steps when unset."""
        return self.total_step if self.total_step is not None else run_steps


def check_schedule(config: AdaLoRAConfig, total: int, what: str = "train.steps") -> None:
    """The one-line error for a schedule with no budgeting phase (HF requires tinit < T - tfinal)."""
    if config.tinit + config.tfinal >= total:
        raise PeftjaxError(f"AdaLoRA's schedule leaves no steps to reduce ranks in: tinit {config.tinit} + tfinal "
                           f"{config.tfinal} must be less than the total steps {total} ({what}); lower peft.tinit / "
                           "peft.tfinal or raise the steps")


def adalora_weight(a_DR, e_R, b_RO, scale) -> jax.Array:
    """ΔW = s P diag(λ) Q in the (d_in, d_out) layout of the base weight."""
    return (a_DR * e_R[None, :]) @ b_RO * scale


class AdaLoRALinear(AdapterLinear):
    mergeable = True

    def __init__(self, base: Linear, *, rank: int, alpha: float, dropout: float, key: jax.Array,
                 config: AdaLoRAConfig | None = None):
        super().__init__(base)
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.config = config  # the schedule, for an HF PEFT export (static: a frozen dataclass)
        self.scale = alpha / (rank + RANKNUM_EPS)
        ka, kb = jax.random.split(key)
        self.adalora_a = AdaLoRA(INIT_STD * jax.random.normal(ka, (base.d_in, rank), jnp.float32))
        self.adalora_e = AdaLoRA(jnp.zeros((rank,), jnp.float32))  # λ = 0: ΔW = 0 at the start
        self.adalora_b = AdaLoRA(INIT_STD * jax.random.normal(kb, (rank, base.d_out), jnp.float32))

    def delta_weight(self) -> jax.Array:
        return adalora_weight(self.adalora_a[...], self.adalora_e[...], self.adalora_b[...], self.scale)

    def adapt(self, x: jax.Array, y: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = input_dropout(x, self.dropout, key) @ self.adalora_a[...].astype(x.dtype)
        e = self.adalora_e[...].astype(x.dtype).reshape((1,) * (h.ndim - 1) + (self.rank,))
        return y + (h * e) @ (self.adalora_b[...].astype(x.dtype) * self.scale)


def apply_adalora(model, config: AdaLoRAConfig) -> None:
    root = jax.random.key(config.seed)

    def make(path, base, _):
        check_rank(config.init_r, base, path, what="AdaLoRA init_r")
        key = jax.random.fold_in(root, zlib.crc32(path.encode()))  # each layer's draw depends on its path only
        return AdaLoRALinear(base, rank=config.init_r, alpha=config.alpha, dropout=config.dropout, key=key,
                             config=config)

    replace_matching(model, Linear, config.targets, make, what="AdaLoRA target")


# ---- the orthogonality regulariser (the ``regularizer`` hook)

def orthogonality(a_DR: jax.Array, b_RO: jax.Array) -> jax.Array:
    """||P^T P - I||_F + ||Q Q^T - I||_F of one layer's factors."""
    eye = jnp.eye(a_DR.shape[1], dtype=a_DR.dtype)
    return jnp.linalg.norm(a_DR.T @ a_DR - eye) + jnp.linalg.norm(b_RO @ b_RO.T - eye)


def orth_regularizer(model, config: AdaLoRAConfig) -> jax.Array:
    """orth_reg_weight times the mean, over every AdaLoRA factor matrix, of its Gram matrix's Frobenius distance
    from the identity (HF PEFT's ``AdaLoraModel.forward`` term)."""
    layers = adapter_modules(model, AdaLoRALinear).values()
    if not layers or config.orth_reg_weight == 0:
        return jnp.zeros((), jnp.float32)
    total = sum(orthogonality(m.adalora_a[...].astype(jnp.float32), m.adalora_b[...].astype(jnp.float32))
                for m in layers)
    return config.orth_reg_weight * total / (2 * len(layers))


# ---- the rank allocator (the ``wrap_optimizer`` hook)

class AllocatorState(NamedTuple):
    """The optimizer's own state plus the allocator's: ``count`` optimizer steps taken (the next step's t), the EMAs
    Ī (``sensitivity``) and Ū (``uncertainty``) shaped like the parameters (scalars for non-AdaLoRA leaves), the
    last mask ``keep`` (n_layers, init_r) in layer-path order, and the budget of the last step."""
    inner: optax.OptState
    count: jax.Array
    sensitivity: optax.Updates
    uncertainty: optax.Updates
    keep: jax.Array
    budget: jax.Array


def triplets(params) -> list[tuple[str, int, int, int]]:
    """(layer path, leaf index of P, of λ, of Q) of every AdaLoRA layer in ``params`` (a trainable state), in
    path order; leaf indices count the array leaves of ``jax.tree.leaves(params)``."""
    found: dict[str, dict[str, int]] = {}
    for i, (path, v) in enumerate(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]):
        name = getattr(path[-1], "key", None)
        if isinstance(v, AdaLoRA) and name in FACTORS:
            layer = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1])
            found.setdefault(layer, {})[name] = i
    return [(layer, f["adalora_a"], f["adalora_e"], f["adalora_b"]) for layer, f in sorted(found.items())
            if len(f) == len(FACTORS)]


def budget_schedule(config: AdaLoRAConfig, total: int, n_layers: int) -> np.ndarray:
    """b(t) for t = 0..total (HF PEFT's ``RankAllocator.budget_schedule``, in its own float64 arithmetic)."""
    init, target = config.init_r * n_layers, config.target_r * n_layers
    span = total - config.tfinal - config.tinit

    def at(t):
        if t <= config.tinit:
            return init
        if t > total - config.tfinal:
            return target
        return int((init - target) * (1 - (t - config.tinit) / span) ** 3 + target)

    return np.array([at(t) for t in range(total + 1)], np.int32)


def triplet_scores(sensitivity_leaves, uncertainty_leaves, found) -> jax.Array:
    """(n_layers, init_r) triplet scores S from the EMAs' leaves."""
    rows = []
    for _, ia, ie, ib in found:
        s = [sensitivity_leaves[i] * uncertainty_leaves[i] for i in (ia, ie, ib)]
        rows.append(s[1] + (s[0].mean(axis=0) + s[2].mean(axis=1)))  # HF's order: λ + (P's mean + Q's mean)
    return jnp.stack(rows)


def keep_mask(scores: jax.Array, budget: jax.Array) -> jax.Array:
    """True for the triplets that survive a budget: those scoring above the (n - budget)-th smallest score."""
    flat = jnp.sort(scores.reshape(-1))
    k = flat.size - budget
    threshold = jnp.where(k > 0, flat[jnp.clip(k - 1, 0, flat.size - 1)], -jnp.inf)
    return ~(scores <= threshold)


def rank_allocator(optimizer: optax.GradientTransformation, config: AdaLoRAConfig,
                   total: int) -> optax.GradientTransformation:
    """``optimizer`` followed by AdaLoRA's rank allocation (see the module docstring), as one transformation that
    sees the gradients, the parameters and ``optimizer``'s updates. ``total``: T, the schedule's total steps."""
    check_schedule(config, total, "peft.total_step" if config.total_step is not None else "train.steps")
    b1, b2 = config.beta1, config.beta2
    last_collect = total - config.tfinal  # EMAs are updated for t < last_collect; the final mask at t == it

    def init(params):
        found = triplets(params)
        adalora = {i for f in found for i in f[1:]}
        leaves, treedef = jax.tree.flatten(params)

        def ema():  # a fresh buffer per leaf (the step donates the state)
            return jax.tree.unflatten(treedef, [jnp.zeros_like(x) if i in adalora else jnp.zeros((), x.dtype)
                                                for i, x in enumerate(leaves)])

        return AllocatorState(optimizer.init(params), jnp.zeros((), jnp.int32), ema(), ema(),
                              jnp.ones((len(found), config.init_r), jnp.bool_),
                              jnp.asarray(config.init_r * len(found), jnp.int32))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("AdaLoRA's rank allocator needs the parameters")
        updates, inner = optimizer.update(grads, state.inner, params)
        found = triplets(params)
        if not found:
            return updates, state._replace(inner=inner, count=state.count + 1)
        t = state.count
        leaves, treedef = jax.tree.flatten(params)
        g, u = jax.tree.leaves(grads), jax.tree.leaves(updates)
        sens, unc = jax.tree.leaves(state.sensitivity), jax.tree.leaves(state.uncertainty)
        collect = t < last_collect
        final = t == last_collect
        for i in sorted({i for f in found for i in f[1:]}):
            ipt = jnp.abs((leaves[i] + u[i]) * g[i])  # |w g| with w after the step, as HF reads p after step()
            s = b1 * sens[i] + (1 - b1) * ipt
            n = b2 * unc[i] + (1 - b2) * jnp.abs(ipt - s)
            sens[i], unc[i] = jnp.where(collect, s, sens[i]), jnp.where(collect, n, unc[i])
        table = jnp.asarray(budget_schedule(config, total, len(found)))
        budget = table[jnp.minimum(t, total)]
        scheduled = (t > config.tinit) & (t % config.deltaT == 0)
        remask = (collect & scheduled) | final
        keep = jnp.where(remask, keep_mask(triplet_scores(sens, unc, found), budget), state.keep)
        masking = remask | (t > last_collect)
        for row, (_, _, ie, _) in enumerate(found):
            # a masked λ_i becomes exactly 0 after apply_updates: w + (-w)
            u[ie] = jnp.where(masking & ~keep[row], -leaves[ie], u[ie])
        sens = [jnp.where(final, jnp.zeros_like(x), x) for x in sens]  # reset once the final mask is set
        unc = [jnp.where(final, jnp.zeros_like(x), x) for x in unc]
        new_state = AllocatorState(inner, t + 1, jax.tree.unflatten(treedef, sens), jax.tree.unflatten(treedef, unc),
                                   keep, budget)
        return jax.tree.unflatten(treedef, u), new_state

    return optax.GradientTransformation(init, update)


def wrap_optimizer(config: AdaLoRAConfig, optimizer: optax.GradientTransformation,
                   run_steps: int) -> optax.GradientTransformation:
    return rank_allocator(optimizer, config, config.total_steps(run_steps))


# ---- Hugging Face PEFT's ADALORA adapters (the ``hf`` hook)
# HF keeps torch's layout: lora_A (r, d_in) = P^T, lora_E (r, 1) = λ, lora_B (d_out, r) = Q^T. An adapter HF saved
# after its allocator ran has a ``rank_pattern`` ({"model.<path>.lora_E": [kept?] * init_r}) and only the kept
# triplets' rows; they are read into their places and the pruned ones left zero (the same ΔW).

HF_OPTIONS = {"init_r": ("init_r", int), "target_r": ("target_r", int), "lora_alpha": ("alpha", float),
              "tinit": ("tinit", int), "tfinal": ("tfinal", int), "deltaT": ("deltaT", int), "beta1": ("beta1", float),
              "beta2": ("beta2", float), "orth_reg_weight": ("orth_reg_weight", float),
              "total_step": ("total_step", int), "lora_dropout": ("dropout", float)}


def read_hf_adalora(model, cfg: dict, tensors: HFTensors):
    path = tensors.config_path
    for key in ("use_dora", "use_rslora", "lora_bias"):
        if cfg.get(key):
            raise PeftjaxError(f"{path}: AdaLoRA with {key} is not supported here")
    defaults = AdaLoRAConfig()
    options = {ours: hf_number(cfg, hf, kind, path, getattr(defaults, ours))
               for hf, (ours, kind) in HF_OPTIONS.items() if cfg.get(hf) is not None or hf != "total_step"}
    config = AdaLoRAConfig(targets=hf_targets(cfg.get("target_modules"), path), **options)
    adapted = apply(model, config)
    pattern = cfg.get("rank_pattern") or {}
    for p, layer in adapter_modules(adapted, AdaLoRALinear).items():
        keep = pattern.get(f"model.{p}.lora_E", [True] * config.init_r)
        if len(keep) != config.init_r:
            raise PeftjaxError(f"{path}: rank_pattern of {p} has {len(keep)} entries for init_r {config.init_r}")
        kept = np.flatnonzero(np.asarray(keep, bool))
        a = np.zeros((layer.d_in, config.init_r), np.float32)
        e = np.zeros((config.init_r,), np.float32)
        b = np.zeros((config.init_r, layer.d_out), np.float32)
        a[:, kept] = tensors.take(f"{p}.lora_A", (layer.d_in, len(kept)), transpose=True)
        e[kept] = tensors.take(f"{p}.lora_E", (len(kept), 1))[:, 0]
        b[kept] = tensors.take(f"{p}.lora_B", (len(kept), layer.d_out), transpose=True)
        layer.adalora_a.set_value(a)
        layer.adalora_e.set_value(e)
        layer.adalora_b.set_value(b)
    return adapted


def write_hf_adalora(model):
    """Every triplet (pruned ones with λ = 0, no ``rank_pattern``); ``total_step``: the config's, or when it followed
    train.steps (which the model does not know) the least HF accepts, tinit + tfinal + 1 (HF's allocator needs it
    to train on; inference ignores it)."""
    layers = adapter_modules(model, AdaLoRALinear)
    if not layers:
        return None
    check_unmerged(layers)
    configs = {m.config for m in layers.values()}
    if len(configs) > 1 or None in configs:
        raise PeftjaxError("HF PEFT AdaLoRA export needs the layers of one AdaLoRA config (peft.apply)")
    config = configs.pop()
    tensors = {}
    for p, m in layers.items():
        tensors[f"{p}.lora_A"] = np.asarray(m.adalora_a[...]).T
        tensors[f"{p}.lora_E"] = np.asarray(m.adalora_e[...])[:, None]
        tensors[f"{p}.lora_B"] = np.asarray(m.adalora_b[...]).T
    fields = {hf: getattr(config, ours) for hf, (ours, _) in HF_OPTIONS.items()}
    if fields["total_step"] is None:
        fields["total_step"] = config.tinit + config.tfinal + 1
    return {**fields, "target_modules": module_names(layers), "rank_pattern": None,
            "init_lora_weights": True}, tensors


def describe(config: AdaLoRAConfig) -> dict:
    return {"rank": config.init_r, "target_r": config.target_r}


register_method("adalora", AdaLoRAConfig, apply_adalora, describe=describe, regularizer=orth_regularizer,
                wrap_optimizer=wrap_optimizer, hf=HFFormat("ADALORA", read_hf_adalora, write_hf_adalora))
