"""LoRA: low-rank adaptation (Hu et al. 2021), its variants, and QLoRA on a quantized base (Dettmers et al. 2023).

    y = W x + s * B (A x),   A: (d_in, r),  B: (r, d_out),  s = alpha / r   (rsLoRA, Kalajdzievski 2023: alpha/sqrt(r))

Inits (``init``):
    "default"   A Kaiming-uniform (bound 1/sqrt(d_in), as Hugging Face PEFT), B = 0, so the model is unchanged.
    "gaussian"  A ~ N(0, 1/r^2), B = 0.
    "pissa"     (Meng et al. 2024) the top-r SVD of W = U S V^T: A = U_r sqrt(S_r), s B = sqrt(S_r) V_r^T, and W is
                replaced by its residual W - U_r S_r V_r^T (requantized when the base is quantized), so W + s B A = W.
    "olora"     (Büyükakyüz 2024) the QR decomposition of torch's (d_out, d_in) weight W^T = Q R: A = (R_r)^T,
                B = (Q_r)^T (orthonormal rows), and W becomes W - s A B, as Hugging Face PEFT's init="olora".
    "loftq"     (Li et al. 2023) alternate Q = quantize(W - s B A) and (A, B) = top-r SVD of W - Q, so that
                Q + s B A ~ W better than Q alone; the base becomes quantized in ``loftq_format``.
    "eva"       (Paischer et al. 2024) data-driven: A = the top principal directions of each layer's inputs on the first
                ``eva_batches`` training batches, B = 0, ranks redistributed by explained variance (up to ``eva_rho`` r);
                needs data, so it is :func:`peftjax.peft.eva.eva_init`, not ``peft.apply`` (a run config does it itself).
DoRA (Liu et al. 2024, ``dora=True``): a magnitude vector m (init ||W||, per output column) rescales the adapted
weight's columns: y = m * (W + s B A) x / ||W + s B A||, the norm treated as a constant in the backward pass (§4.3).

``rank_pattern`` / ``alpha_pattern`` map module-path regexes (see :mod:`peftjax.rules`, first match wins) to a rank or
alpha for those modules; ``layers_to_transform`` keeps only the decoder layers with those indices.

Variants are strategies (:class:`LoRAVariant`: plain LoRA, :class:`DoRA`) that compose with every init and with
quantization-aware training (``qat_format="nf4"`` etc.): the forward then uses ``fake_quant(merged weight)``, the
quantized merge that deployment will run, with a straight-through gradient, so the adapter learns to survive being
merged into a quantized base (see :func:`peftjax.peft.merge.merge`, which dequantizes, adds and requantizes).
QAT + DoRA fake-quantizes DoRA's merged weight m * V / ||V||.

Optimizer-side variants: B is a variable type of its own (:class:`LoRAB`, a :class:`LoRA`), so LoRA+ (Hayou et al.
2024: B's learning rate lambda times A's, lambda ~ 16) is ``train.group_learning_rates: {lorab: lambda * lr}`` (a rate
for ``lora`` alone applies to both); LoRA-FA (Zhang et al. 2023, ``freeze_a=True``) keeps A at its random init as a
frozen variable (:class:`FrozenLoRAA`), so only B is trained and A needs no gradient or optimizer state.

Dropout (``dropout=p``) acts on the adapter's input only, x -> mask * x / (1 - p), and only when the call is given a
key (``layer(x, key)``; the model folds its ``dropout_key`` into one stream per decoder layer and projection, so
layers that are otherwise alike stay alike, which lets the decoder scan over them);
without a key the forward is deterministic (evaluation, generation).
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.matmul import matmul
from peftjax.models.llama import Linear
from peftjax.peft.hf_format import (HFFormat, HFTensors, adapter_modules, check_unmerged, hf_number, hf_targets,
                                    module_names)
from peftjax.peft.registry import apply, register_method
from peftjax.variables import LoRA, Quantized
from peftjax.peft.wrapper import AdapterLinear, input_dropout
from peftjax.quant import get_format
from peftjax.quant.policy import (QuantizedLinear, QuantRule, dequantize_kernel, fake_quant_kernel,
                                  quantize_kernel)
from peftjax.rules import modules_of_type, pattern_matches
from peftjax.surgery import check_rank, replace_matching


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: str | tuple[str, ...] = "all-linear"
    rslora: bool = False
    dropout: float = 0.0
    dora: bool = False
    init: str = "default"
    rank_pattern: dict | tuple = ()  # {regex: rank} or ((regex, rank), ...): first match wins
    alpha_pattern: dict | tuple = ()
    layers_to_transform: tuple[int, ...] | None = None
    loftq_format: str = "nf4"
    loftq_block_size: int = 64
    loftq_iters: int = 1
    qat_format: str | None = None  # train against fake_quant(W + s A B) in this format (quantization-aware LoRA)
    qat_block_size: int = 64
    freeze_a: bool = False  # LoRA-FA: A stays at its init, only B trains
    seed: int = 0
    # EVA (init="eva", peftjax.peft.eva): HF PEFT's EvaConfig defaults for rho, tau and the scaling adjustment
    eva_rho: float = 2.0  # a layer gets at most rho * rank components; rho = 1: every layer keeps its rank
    eva_tau: float = 0.99  # stop reading batches once each used component's |cos| to its previous estimate >= tau
    eva_batches: int = 8  # at most this many training batches (the run's first ones) feed the statistics
    eva_adjust_scaling: bool = True  # alpha scales with the allotted rank (alpha * r_new / r), as HF PEFT's default

    def __post_init__(self):
        check_lora_config(self)


class LoRAB(LoRA):
    """LoRA's B factor (its own optimizer group ``lorab`` for LoRA+; otherwise trained as ``lora``)."""


class FrozenLoRAA(nnx.Variable):
    """LoRA-FA's A: not :class:`peftjax.variables.Trainable`, so it lands in the frozen tree."""


def lora_scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(x_ND: jax.Array, a_DR: jax.Array, b_RO: jax.Array, scale: float) -> jax.Array:
    """s * B (A x) for row-vector activations: (x @ A) @ (s B), never forming the d_in x d_out product.

    The scale goes on the small B, not on the (tokens, d_out) output: on CPU, XLA then keeps the add fused with
    the base matmul, and a LoRA layer's forward + backward runs about 30% faster (measured on SmolLM2 shapes).
    """
    return matmul(matmul(x_ND, a_DR.astype(x_ND.dtype)), b_RO.astype(x_ND.dtype) * scale)


def lora_weight(a_DR: jax.Array, b_RO: jax.Array, scale: float) -> jax.Array:
    """The dense update s A B in the (d_in, d_out) layout of the base weight."""
    return (a_DR @ b_RO) * scale


def column_norm(w_DO: jax.Array) -> jax.Array:
    """||W||_2 of each output column (DoRA's per-output-feature norm)."""
    return jnp.sqrt(jnp.sum(jnp.square(w_DO.astype(jnp.float32)), axis=0))


def svd_factors(w_DO: jax.Array, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """(A, B) with s A B the best rank-r approximation of W (singular values split evenly between the factors)."""
    u, s, vt = jnp.linalg.svd(w_DO.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:rank])
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank] / scale


def loftq_init(w_DO: jax.Array, rank: int, scale: float, fmt: str, block_size: int, iters: int):
    """(Q, A, B) with dequantize(Q) + s A B ~ W, by ``iters`` rounds of quantize-then-SVD (Li et al. 2023, Alg. 1)."""
    a = jnp.zeros((w_DO.shape[0], rank), jnp.float32)
    b = jnp.zeros((rank, w_DO.shape[1]), jnp.float32)
    for _ in range(max(iters, 1)):
        q = quantize_kernel(w_DO - lora_weight(a, b, scale), fmt, block_size=block_size)
        a, b = svd_factors(w_DO - dequantize_kernel(q, jnp.float32), rank, scale)
    return q, a, b


class LoRAVariant:
    """How a LoRA layer turns its factors into an output and a merged weight (a strategy: one object per layer
    kind, stateless; its variables live on the layer). Variants compose with every init and with QAT."""

    name = "lora"

    def setup(self, layer: "LoRALinear") -> None:
        """Add the variant's own variables to a freshly built layer."""

    def adapter_out(self, layer: "LoRALinear", x_ND: jax.Array) -> jax.Array:
        """The adapter path's contribution to the output for input ``x`` (linear in x)."""
        return lora_delta(x_ND, layer.lora_a[...], layer.lora_b[...], layer.scale)

    def output(self, layer: "LoRALinear", y_NO: jax.Array, adapter_x_ND: jax.Array) -> jax.Array:
        """The layer's output given the base's output ``y`` and the adapter's input ``adapter_x`` (x after dropout)."""
        return y_NO + self.adapter_out(layer, adapter_x_ND)

    def merged_weight(self, layer: "LoRALinear", w_DO: jax.Array) -> jax.Array:
        """The dense weight the adapted layer computes with (differentiable in the factors)."""
        return w_DO + layer.delta_weight().astype(w_DO.dtype)

    def merge(self, layer: "LoRALinear", w_DO: jax.Array) -> jax.Array:
        return self.merged_weight(layer, w_DO)

    def unmerge(self, layer: "LoRALinear", w_DO: jax.Array) -> jax.Array:
        return w_DO - layer.delta_weight().astype(w_DO.dtype)


class DoRA(LoRAVariant):
    """DoRA: y = m * ((W + s A B) x) / ||W + s A B||, the column norm a constant in the backward pass (§4.3)."""

    name = "dora"

    def setup(self, layer):
        layer.magnitude = LoRA(column_norm(layer.base.kernel(jnp.float32)))
        layer.merged_norm = nnx.data(None)  # ||W + s A B|| at merge time, which unmerge needs

    def factor(self, layer) -> jax.Array:
        """m / ||W + s A B|| per output column."""
        norm = jax.lax.stop_gradient(column_norm(layer.base.kernel(jnp.float32) + layer.delta_weight()))
        return layer.magnitude[...] / norm

    def adapter_out(self, layer, x_ND):
        return super().adapter_out(layer, x_ND) * self.factor(layer).astype(x_ND.dtype)[None, :]

    def output(self, layer, y_NO, adapter_x_ND):
        bias = layer.base.bias
        y = y_NO if bias is None else y_NO - bias[...].astype(y_NO.dtype)[None, :]
        y = y * self.factor(layer).astype(y.dtype)[None, :] + self.adapter_out(layer, adapter_x_ND)
        return y if bias is None else y + bias[...].astype(y.dtype)[None, :]

    def merged_weight(self, layer, w_DO):
        v = w_DO + layer.delta_weight().astype(w_DO.dtype)
        return v * self.factor(layer).astype(w_DO.dtype)[None, :]

    def merge(self, layer, w_DO):
        v = w_DO + layer.delta_weight().astype(w_DO.dtype)
        norm = column_norm(v)
        layer.merged_norm = nnx.Variable(norm)
        return v * (layer.magnitude[...] / norm).astype(w_DO.dtype)[None, :]

    def unmerge(self, layer, w_DO):
        norm = layer.merged_norm[...]
        layer.merged_norm = None
        v = w_DO * (norm / layer.magnitude[...]).astype(w_DO.dtype)[None, :]
        return v - layer.delta_weight().astype(w_DO.dtype)


VARIANTS = {"lora": LoRAVariant(), "dora": DoRA()}


class LoRALinear(AdapterLinear):
    """A frozen linear layer plus a trainable low-rank update, formed by a :class:`LoRAVariant`.

    With ``qat=(format, block_size)`` the forward uses ``fake_quant(merged weight)`` (straight-through gradient),
    the quantized merge that deployment will run; dropout then still acts on the adapter path only, through the
    correction ``adapter_out(dropped(x)) - adapter_out(x)``, so the frozen base path never sees a mask.
    """

    mergeable = True

    def __init__(self, base: Linear, *, rank: int, alpha: float, rslora: bool, key: jax.Array,
                 init: str = "default", dropout: float = 0.0, qat: tuple[str, int] | None = None,
                 variant: LoRAVariant | str = "lora", freeze_a: bool = False):
        super().__init__(base)
        self.variant = VARIANTS[variant] if isinstance(variant, str) else variant
        self.qat = qat
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.dropout = dropout
        self.scale = lora_scale(rank, alpha, rslora)
        a = INITS["gaussian" if init == "gaussian" else "default"](key, base.d_in, rank)
        self.lora_a = FrozenLoRAA(a) if freeze_a else LoRA(a)
        self.lora_b = LoRAB(jnp.zeros((rank, base.d_out), jnp.float32))
        self.variant.setup(self)

    @property
    def dora(self) -> bool:
        return isinstance(self.variant, DoRA)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``key``: this step's dropout key (None: no dropout, as in evaluation and generation)."""
        if self.bypass():
            return self.base(x)
        if self.qat is None:
            return self.variant.output(self, self.base(x), input_dropout(x, self.dropout, key))
        adapter_x = input_dropout(x, self.dropout, key)
        fmt, block_size = self.qat
        w = fake_quant_kernel(self.variant.merged_weight(self, self.base.kernel(jnp.float32)), fmt,
                              block_size=block_size)
        y = x @ w.astype(x.dtype)
        if adapter_x is not x:
            y = y + self.variant.adapter_out(self, adapter_x) - self.variant.adapter_out(self, x)
        return y if self.base.bias is None else y + self.base.bias[...].astype(x.dtype)[None, :]

    def adapt(self, x, y, key=None):
        if self.qat is not None:  # the fake-quantized merged weight replaces the base matmul
            return self(x, key)
        return self.variant.output(self, y, input_dropout(x, self.dropout, key))

    def delta_weight(self) -> jax.Array:
        return lora_weight(self.lora_a[...], self.lora_b[...], self.scale)

    def merge_kernel(self, w_DO):
        return self.variant.merge(self, w_DO)

    def unmerge_kernel(self, w_DO):
        return self.variant.unmerge(self, w_DO)


def kaiming_a(key, d_in: int, rank: int) -> jax.Array:
    """Kaiming-uniform A (bound 1/sqrt(d_in)), as Hugging Face PEFT."""
    bound = 1.0 / math.sqrt(d_in)
    return jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound)


def gaussian_a(key, d_in: int, rank: int) -> jax.Array:
    return jax.random.normal(key, (d_in, rank), jnp.float32) / rank


def pissa_init(layer: LoRALinear, config: "LoRAConfig") -> None:
    """PiSSA: factors from the top-r SVD of W, the base replaced by the residual (requantized if quantized)."""
    a, b = svd_factors(layer.base.kernel(jnp.float32), layer.rank, layer.scale)
    _keep_residual(layer, a, b)


def qr_factors(w_DO: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's (A, B): with torch's (d_out, d_in) weight W^T = Q R, A = (R_r)^T (its first r rows) and B = (Q_r)^T
    (its first r columns), so that A B = (Q_r R_r)^T."""
    q, r = jnp.linalg.qr(w_DO.T.astype(jnp.float32))
    return r[:rank].T, q[:, :rank].T


def olora_init(layer: LoRALinear, config: "LoRAConfig") -> None:
    """OLoRA: factors from the QR decomposition of W (orthonormal B), the base replaced by W - s A B."""
    a, b = qr_factors(layer.base.kernel(jnp.float32), layer.rank)
    _keep_residual(layer, a, b)


def _keep_residual(layer: LoRALinear, a: jax.Array, b: jax.Array) -> None:
    """Set the factors and replace the base by W - s A B (requantized if quantized), so the model is unchanged."""
    base = layer.base
    residual = base.kernel(jnp.float32) - lora_weight(a, b, layer.scale)
    if isinstance(base.weight, Quantized):
        base.weight = Quantized(base.requantized(residual))
    else:
        base.weight = nnx.Param(residual.astype(base.weight[...].dtype))
    layer.lora_a.set_value(a)
    layer.lora_b.set_value(b)


def loftq_layer_init(layer: LoRALinear, config: "LoRAConfig") -> None:
    """LoftQ: the base becomes quantize(W - s A B) with (A, B) fitted to what quantization loses."""
    base = layer.base
    if isinstance(base.weight, Quantized):
        raise PeftjaxError("LoftQ needs the full-precision base: apply LoRA(init='loftq') before quantizing, "
                           "it quantizes the base itself (loftq_format)")
    q, a, b = loftq_init(base.kernel(jnp.float32), layer.rank, layer.scale, config.loftq_format,
                         config.loftq_block_size, config.loftq_iters)
    quantized = QuantizedLinear(base, QuantRule(format=config.loftq_format, block_size=config.loftq_block_size))
    quantized.weight = Quantized(q)
    layer.base = quantized
    layer.lora_a.set_value(a)
    layer.lora_b.set_value(b)


# A's random draw per init name; inits that derive the factors from W also rewrite the layer after it is built
INITS = {"default": kaiming_a, "gaussian": gaussian_a, "pissa": kaiming_a, "olora": kaiming_a, "loftq": kaiming_a,
         "eva": kaiming_a}  # EVA's A comes from data: peftjax.peft.eva.eva_init
FROM_WEIGHTS = {"pissa": pissa_init, "olora": olora_init, "loftq": loftq_layer_init}


def pattern_value(path: str, pattern: dict | tuple, default):
    for regex, value in (pattern.items() if isinstance(pattern, dict) else pattern):
        if pattern_matches(regex, path):
            return value
    return default


def layer_index(path: str) -> int | None:
    m = re.match(r"(?:.*\.)?layers\.(\d+)\.", path)
    return int(m.group(1)) if m else None


def check_lora_config(config: "LoRAConfig") -> None:
    if not 0.0 <= config.dropout < 1.0:
        raise PeftjaxError(f"LoRA dropout must be in [0, 1), got {config.dropout}")
    if config.init not in INITS:
        raise PeftjaxError(f"unknown LoRA init {config.init!r}; choose one of {', '.join(INITS)}")
    if config.rank < 1:
        raise PeftjaxError(f"LoRA rank must be >= 1, got {config.rank}")
    if config.qat_format is not None:
        get_format(config.qat_format)  # unknown formats fail here, listing the known ones
    if config.layers_to_transform is not None and not isinstance(config.layers_to_transform, (tuple, list)):
        raise PeftjaxError(f"layers_to_transform must be a list of layer indices, got {config.layers_to_transform!r}")
    if config.eva_rho < 1.0:
        raise PeftjaxError(f"LoRA eva_rho must be >= 1 (1: no rank redistribution), got {config.eva_rho}")
    if not 0.0 <= config.eva_tau <= 1.0:
        raise PeftjaxError(f"LoRA eva_tau must be in [0, 1], got {config.eva_tau}")
    if config.eva_batches < 1:
        raise PeftjaxError(f"LoRA eva_batches must be >= 1, got {config.eva_batches}")


def apply_lora(model: nnx.Module, config: LoRAConfig) -> None:
    check_lora_config(config)
    if config.init == "eva":
        raise PeftjaxError("LoRA init='eva' needs data: use peftjax.peft.eva.eva_init(model, batches, config) "
                           "(a run config with peft.init: eva does this with its first training batches)")
    keep = None
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        n_layers = len(getattr(model, "layers", []))
        if not wanted & set(range(n_layers)):
            raise PeftjaxError(f"layers_to_transform {sorted(wanted)} selects no layer; the model has layers "
                               f"0..{n_layers - 1}")
        keep = lambda path, _: layer_index(path) in wanted  # noqa: E731
    linears = modules_of_type(model, Linear)
    count = len(linears)
    keys = iter(jax.random.split(jax.random.key(config.seed), max(count, 1)))
    qat = None if config.qat_format is None else (config.qat_format, config.qat_block_size)
    made = []

    def make(path, base, _):
        rank = pattern_value(path, config.rank_pattern, config.rank)
        alpha = pattern_value(path, config.alpha_pattern, config.alpha)
        check_rank(rank, base, path, what="LoRA")
        layer = LoRALinear(base, rank=rank, alpha=alpha, rslora=config.rslora, key=next(keys), init=config.init,
                           dropout=config.dropout, qat=qat, variant="dora" if config.dora else "lora",
                           freeze_a=config.freeze_a)
        if config.init in FROM_WEIGHTS:
            FROM_WEIGHTS[config.init](layer, config)
        made.append(layer)
        return layer

    replace_matching(model, Linear, config.targets, make, what="LoRA target", keep=keep)


HF_ALPHA = 8  # HF PEFT's LoraConfig default for lora_alpha (used when adapter_config.json omits it)


def lora_config_from_hf(cfg: dict, path: Path) -> LoRAConfig:
    """The LoRAConfig of an HF PEFT LoRA adapter_config.json (rsLoRA, DoRA, patterns, layers_to_transform)."""
    if "r" not in cfg:
        raise PeftjaxError(f"{path} has no 'r' (the LoRA rank)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise PeftjaxError(f"{path}: {key} must be a mapping of module patterns to numbers, got {cfg[key]!r}")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]  # HF PEFT accepts one layer index as an int
    elif layers is not None and not isinstance(layers, list):
        raise PeftjaxError(f"{path}: layers_to_transform must be an int or a list of ints, got {layers!r}")
    return LoRAConfig(rank=hf_number(cfg, "r", int, path), alpha=hf_number(cfg, "lora_alpha", float, path, HF_ALPHA),
                      targets=hf_targets(cfg.get("target_modules"), path), rslora=bool(cfg.get("use_rslora", False)),
                      dora=bool(cfg.get("use_dora", False)),
                      rank_pattern=tuple((k, hf_number(cfg["rank_pattern"], k, int, path))
                                         for k in (cfg.get("rank_pattern") or {})),
                      alpha_pattern=tuple((k, hf_number(cfg["alpha_pattern"], k, float, path))
                                          for k in (cfg.get("alpha_pattern") or {})),
                      layers_to_transform=(tuple(hf_number({"layers_to_transform": v}, "layers_to_transform", int,
                                                           path) for v in layers) if layers is not None else None),
                      dropout=hf_number(cfg, "lora_dropout", float, path, 0.0))


def read_hf_lora(model: nnx.Module, cfg: dict, tensors: HFTensors) -> nnx.Module:
    """HF stores A as lora_A.weight (r, d_in), B as lora_B.weight (d_out, r), DoRA's m as lora_magnitude_vector."""
    adapted = apply(model, lora_config_from_hf(cfg, tensors.config_path))
    for path, layer in adapter_modules(adapted, LoRALinear).items():
        layer.lora_a.set_value(tensors.take(f"{path}.lora_A.weight", layer.lora_a.shape, transpose=True))
        layer.lora_b.set_value(tensors.take(f"{path}.lora_B.weight", layer.lora_b.shape, transpose=True))
        if layer.dora:
            layer.magnitude.set_value(tensors.take(f"{path}.lora_magnitude_vector", layer.magnitude.shape))
    return adapted


def _uniform(values: dict[str, float]):
    """(the most common value, {path regex: value} for the others), like HF's rank_pattern / alpha_pattern."""
    common = max(set(values.values()), key=list(values.values()).count)
    return common, {re.escape(p): v for p, v in values.items() if v != common}


def write_hf_lora(model: nnx.Module):
    layers = adapter_modules(model, LoRALinear)
    if not layers:
        return None
    check_unmerged(layers)
    if len({layer.dora for layer in layers.values()}) > 1 or len({layer.rslora for layer in layers.values()}) > 1:
        raise PeftjaxError("HF PEFT stores one adapter type and one scaling rule per adapter; this model mixes them")
    first = next(iter(layers.values()))
    fields, tensors = hf_lora_payload({p: (m.lora_a[...], m.lora_b[...], m.rank, m.alpha,
                                           m.magnitude[...] if m.dora else None) for p, m in layers.items()},
                                      rslora=first.rslora, dora=first.dora)
    plain = [p for p in modules_of_type(model, Linear) if not p.endswith(".base")]  # linear layers left as they are
    if set(module_names(plain)) & set(fields["target_modules"]):  # (EVA's rank 0, layers_to_transform): a short
        fields["target_modules"] = sorted(layers)  # name would adapt them too, so each adapted layer is named in full
    return fields, tensors


def hf_lora_payload(layers: dict, *, rslora: bool, dora: bool):
    """(adapter_config fields, tensors) of HF PEFT LoRA from {path: (A, B, rank, alpha, DoRA magnitude or None)}."""
    rank, rank_pattern = _uniform({p: v[2] for p, v in layers.items()})
    alpha, alpha_pattern = _uniform({p: v[3] for p, v in layers.items()})
    tensors = {}
    for path, (a, b, _, _, magnitude) in layers.items():
        tensors[f"{path}.lora_A.weight"] = np.asarray(a).T
        tensors[f"{path}.lora_B.weight"] = np.asarray(b).T
        if magnitude is not None:
            tensors[f"{path}.lora_magnitude_vector"] = np.asarray(magnitude)
    return {"r": rank, "lora_alpha": alpha, "target_modules": module_names(layers), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "use_rslora": rslora, "use_dora": dora, "lora_dropout": 0.0,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "layers_to_transform": None}, tensors


register_method("lora", LoRAConfig, apply_lora, hf=HFFormat("LORA", read_hf_lora, write_hf_lora))
