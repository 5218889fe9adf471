"""Post-training quantization of a model's linear layers by policy: ordered regex rules -> format.

Each :class:`QuantRule` names module paths (see :mod:`peftjax.rules`) and a quantization spec; the first matching rule wins and
unmatched modules stay in high precision. Only linear layers are candidates, so embeddings, norms and the tied
output head stay in full precision unless a future rule type says otherwise.

A quantized layer stores its weight as a :class:`~peftjax.quant.QArray` inside a frozen
:class:`~peftjax.variables.Quantized` variable and dequantizes it inside the traced step, just before the matmul
that consumes it (QLoRA's storage/compute split; XLA on CPU fuses the unpacking, lookup and scaling into one loop
that writes the layer's float32 weight, which the dot then reads: it does not fuse the decoding into the dot's
operand). Like bitsandbytes'
4-bit matmul, the backward pass dequantizes the weight again instead of keeping the dense copy alive between
forward and backward: only the packed codes are saved, so activation memory does not grow by a dense base.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models.llama import Linear, after
from peftjax.models.loading import load_into, open_checkpoint
from peftjax.models.matmul import product
from peftjax.errors import PeftjaxError
from peftjax.variables import Quantized
from peftjax.quant import dequantize, fake_quant, quantize
from peftjax.rules import as_patterns, modules_of_type
from peftjax.surgery import replace_matching


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    """One policy rule: which linear layers (ordered regexes on module paths, first matching rule wins), and how to
    store their weights. ``axis`` keeps one scale per index of that axis of the (d_in, d_out) weight (``axis=1``:
    per output channel, as LLM.int8() row-wise absmax) instead of blocks of ``block_size``; ``double_quant``
    quantizes the scales again in blocks of ``dq_block_size`` (QLoRA)."""

    targets: str | tuple[str, ...] = "all-linear"
    format: str = "nf4"
    block_size: int | None = 64
    axis: int | None = None
    asymmetric: bool = False
    double_quant: bool = False
    dq_block_size: int = 256

    def quantize_kwargs(self) -> dict:
        """The keyword arguments of :func:`peftjax.quant.quantize` this rule stands for."""
        return {"fmt": self.format, "block_size": self.block_size, "axis": self.axis,
                "asymmetric": self.asymmetric, "double_quant": self.double_quant,
                "dq_block_size": self.dq_block_size}


def _stored_axis(axis: int | None) -> int | None:
    """``axis`` of the (d_in, d_out) weight, as an axis of its stored (d_out, d_in) transpose."""
    return None if axis is None else 1 - axis % 2


def quantize_kernel(w_DO: jax.Array, fmt: str, *, axis: int | None = None, **kwargs):
    """A linear layer's (d_in, d_out) weight quantized in the (d_out, d_in) layout torch and bitsandbytes store: the
    row-major blocks of ``block_size`` then run along the *input* dimension, so a checkpoint's NF4 base is
    bitsandbytes' base of the same weight (``bnb.nn.Params4bit``). ``axis`` names an axis of the (d_in, d_out) weight
    (``axis=1``: one scale per output channel)."""
    return quantize(jnp.asarray(w_DO).T, fmt, axis=_stored_axis(axis), **kwargs)


def dequantize_kernel(q, dtype=jnp.float32) -> jax.Array:
    """The (d_in, d_out) weight a :func:`quantize_kernel` QArray stands for."""
    return dequantize(q, dtype).T


def fake_quant_kernel(w_DO: jax.Array, fmt: str, *, axis: int | None = None, **kwargs) -> jax.Array:
    """:func:`fake_quant` of a (d_in, d_out) weight with the grouping of :func:`quantize_kernel` (QAT sees the
    quantized model's blocks)."""
    return fake_quant(w_DO.T, fmt, axis=_stored_axis(axis), **kwargs).T


@jax.custom_vjp
def quantized_matmul(x: jax.Array, q) -> jax.Array:
    """x @ W for W stored by :func:`quantize_kernel` (dequantized inside the matmul), differentiable in x; q is a
    constant (the frozen base)."""
    return product(x, dequantize(after(q, x), x.dtype).T)


def _qmm_fwd(x, q):
    return quantized_matmul(x, q), q


def _zero_cotangent(leaf):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)  # integer codes have no tangent space


def _qmm_bwd(q, g):
    return product(g, dequantize(after(q, g), g.dtype)), jax.tree.map(_zero_cotangent, q)


quantized_matmul.defvjp(_qmm_fwd, _qmm_bwd)


class QuantizedLinear(Linear):
    """A linear layer whose frozen weight is stored quantized (by :func:`quantize_kernel`: the (d_out, d_in) layout,
    blocks along the input dimension, as bitsandbytes) and dequantized on the fly; ``rule`` is the index of the
    policy rule that quantized it (for per-rule reports)."""

    def __init__(self, base: Linear, rule: QuantRule, *, name: str = "weight", rule_index: int = 0):
        self.d_in, self.d_out = base.d_in, base.d_out
        self.format = rule.format
        self.rule = rule_index
        self.weight = Quantized(quantize_kernel(base.weight[...], name=name, **rule.quantize_kwargs()))
        self.bias = base.bias

    def kernel(self, dtype, x: jax.Array | None = None) -> jax.Array:
        return dequantize_kernel(self.weight.get_value(), dtype)  # the layer's own call orders it (quantized_matmul)

    def requantized(self, w_DO: jax.Array):
        """``w_DO`` quantized with this layer's whole spec and layout (after a merge, PiSSA or LoftQ)."""
        return quantize(jnp.asarray(w_DO).T, **self.weight.get_value().spec)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = quantized_matmul(x, self.weight.get_value())
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)[None, :]
        return y


def quantize_model(model: nnx.Module, rules: list[QuantRule]) -> nnx.Module:
    """A new model whose linear layers matched by ``rules`` are quantized (first matching rule wins)."""
    return _replace_linears(model, rules, lambda base, rule, path, i: QuantizedLinear(base, rule, name=path,
                                                                                      rule_index=i),
                            skip=(QuantizedLinear,))  # a QAT-trained FakeQuantLinear is a Linear: it quantizes


def load_quantized(name_or_path, rules: list[QuantRule], dtype=jnp.float32, *, num_layers: int | None = None):
    """``quantize_model(from_pretrained(name_or_path, dtype)[0], rules)`` without the full-precision model: the
    checkpoint is streamed one tensor at a time and each linear weight a rule matches is quantized as it arrives
    (float32 first, so the codes are those of :func:`quantize_model`); the rest is stored in ``dtype``. Peak memory
    is the quantized model plus one tensor, so a base whose 16-bit weights would not fit in memory still loads.
    Returns (model, tokenizer)."""
    ckpt = open_checkpoint(name_or_path).truncated(num_layers)
    abstract = nnx.eval_shape(lambda: quantize_model(ckpt.build(rngs=nnx.Rngs(0), dtype=dtype), rules))

    def convert(name, variable, w_DO):
        if not isinstance(variable, Quantized):
            return None
        q = variable.get_value()
        if tuple(w_DO.shape[::-1]) != tuple(q.shape):
            raise PeftjaxError(f"tensor {name} has shape {tuple(w_DO.shape)}, the model expects {q.shape[::-1]}")
        return quantize(jnp.asarray(np.asarray(w_DO, np.float32).T), name=name, **q.spec)  # checks NaN / inf too

    return load_into(abstract, ckpt.tensors(), convert), ckpt.tokenizer


def _replace_linears(model: nnx.Module, rules: list[QuantRule], make, *, skip: tuple[type, ...]) -> nnx.Module:
    model = nnx.clone(model)
    patterns, owners = [], []
    for i, rule in enumerate(rules):
        for pattern in as_patterns(rule.targets):
            patterns.append(pattern)
            owners.append(i)
    replace_matching(model, Linear, patterns,
                     lambda path, base, k: make(base, rules[owners[k]], path, owners[k]), what="quantization",
                     keep=lambda _, m: not isinstance(m, skip))
    return model


def rule_bits(model_or_state) -> list[dict]:
    """Per rule of the policy that quantized ``model``: layers, parameters and exact storage bits per parameter."""
    found: dict[int, list] = {}
    for _, module in modules_of_type(model_or_state, QuantizedLinear).items():
        found.setdefault(module.rule, []).append(module.weight.get_value())
    return [{"rule": i, "format": qs[0].fmt, "layers": len(qs), "params": sum(q.size for q in qs),
             "bits_per_param": 8.0 * sum(q.nbytes for q in qs) / sum(q.size for q in qs)}
            for i, qs in sorted(found.items())]


class FakeQuantLinear(Linear):
    """Quantization-aware training: the forward pass uses ``fake_quant(W)`` (what the quantized model will see),
    the backward pass the straight-through estimator, so a trainable ``W`` learns to sit well on the grid.

    The module shares its ``weight`` variable with the layer it wraps; after training, :func:`quantize_model`
    quantizes it like any linear layer (``isinstance(FakeQuantLinear(...), Linear)``).
    """

    def __init__(self, base: Linear, rule: QuantRule):
        self.d_in, self.d_out = base.d_in, base.d_out
        self.rule = rule
        self.weight, self.bias = base.weight, base.bias

    def kernel(self, dtype, x: jax.Array | None = None) -> jax.Array:
        kwargs = self.rule.quantize_kwargs()
        w = fake_quant_kernel(self.weight[...].astype(jnp.float32), kwargs.pop("fmt"), **kwargs)
        return w.astype(dtype)


def qat_model(model: nnx.Module, rules: list[QuantRule]) -> nnx.Module:
    """A new model whose matched linear layers train against their fake-quantized weights."""
    return _replace_linears(model, rules, lambda base, rule, path, i: FakeQuantLinear(base, rule),
                            skip=(QuantizedLinear, FakeQuantLinear))
