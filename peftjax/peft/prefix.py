"""Prefix tuning (Li & Liang 2021): every layer's attention also attends to L trainable key/value vectors.

    Attn(q, [P_k; K], [P_v; V]),   P_k, P_v: (L, kv_heads, head_dim) per layer, seen by every query, without RoPE

As in Hugging Face PEFT (the prefix is its ``past_key_values``), the prefix takes positions 0..L-1: the sequence's
RoPE positions start at L.

With ``reparameterize=True`` the prefixes are produced during training by a small MLP from an (L, d_emb) embedding,
as in the paper, P = W2 tanh(W1 E) (one MLP per layer here: tree-mode NNX has no shared submodules);
:func:`fold_prefix` evaluates it once and keeps only the resulting prefixes for inference. A prefix cannot be
merged into the base weights.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import Attention
from peftjax.peft.hf_format import HFFormat, HFTensors, hf_number
from peftjax.peft.registry import apply, register_method
from peftjax.variables import Prefix
from peftjax.peft.wrapper import AdapterModule
from peftjax.surgery import replace_matching


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixConfig:
    num_tokens: int = 16  # L
    targets: str | tuple[str, ...] = "self_attn"  # attention modules that get a prefix (default: every layer)
    reparameterize: bool = False
    hidden: int = 64  # width of the reparameterisation MLP
    seed: int = 0


class PrefixKV(AdapterModule):
    """The key/value prefix of one attention layer."""

    def __init__(self, num_tokens: int, kv_heads: int, head_dim: int, *, key: jax.Array,
                 reparameterize: bool = False, hidden: int = 64):
        self.shape = (num_tokens, kv_heads, head_dim)
        width = kv_heads * head_dim
        k1, k2, k3 = jax.random.split(key, 3)
        if reparameterize:
            self.embedding = Prefix(jax.random.normal(k1, (num_tokens, width), jnp.float32))
            self.w1 = Prefix(jax.random.normal(k2, (width, hidden), jnp.float32) / jnp.sqrt(width))
            self.w2 = Prefix(jax.random.normal(k3, (hidden, 2 * width), jnp.float32) / jnp.sqrt(hidden))
            self.kv = nnx.data(None)
        else:
            self.kv = Prefix(jax.random.normal(k1, (num_tokens, 2 * width), jnp.float32))

    @property
    def num_tokens(self) -> int:
        """Positions the prefix occupies before the sequence (0 while disabled)."""
        return 0 if self.disabled else self.shape[0]

    def prefix_kv(self) -> jax.Array:
        """(L, 2 * kv_heads * head_dim): keys then values."""
        if self.kv is not None:
            return self.kv[...]
        return jnp.tanh(self.embedding[...] @ self.w1[...]) @ self.w2[...]

    def __call__(self):
        if self.disabled:
            return None
        k, v = jnp.split(self.prefix_kv(), 2, axis=-1)
        return k.reshape(self.shape), v.reshape(self.shape)


def fold_prefix(model: nnx.Module) -> nnx.Module:
    """A new model whose reparameterised prefixes are replaced by the prefixes they compute (for inference)."""
    model = nnx.clone(model)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, PrefixKV) and module.kv is None:
            module.kv = Prefix(module.prefix_kv())
            module.embedding = module.w1 = module.w2 = None
    return model


def apply_prefix(model: nnx.Module, config: PrefixConfig) -> None:
    max_position = model.config.max_position
    if not 1 <= config.num_tokens < max_position:
        raise PeftjaxError(f"prefix num_tokens {config.num_tokens} must be in 1..{max_position - 1} "
                           f"(the context is {max_position} positions)")
    keys = iter(jax.random.split(jax.random.key(config.seed), max(len(model.layers), 1)))

    def attach(path, attn, _):
        attn.prefix = PrefixKV(config.num_tokens, attn.num_kv_heads, attn.head_dim, key=next(keys),
                               reparameterize=config.reparameterize, hidden=config.hidden)
        return attn

    replace_matching(model, Attention, config.targets, attach, what="prefix target")


def read_hf_prefix(model: nnx.Module, cfg: dict, tensors: HFTensors) -> nnx.Module:
    """HF stores every layer's prefix in one ``prompt_embeddings`` (L, layers * 2 * kv_heads * head_dim): per layer
    its keys, then its values (always the computed prefixes: a reparameterised one is saved folded)."""
    path = tensors.config_path
    if hf_number(cfg, "num_transformer_submodules", int, path, 1) != 1:
        raise PeftjaxError(f"{path}: num_transformer_submodules must be 1 (a decoder-only model)")
    layers = hf_number(cfg, "num_layers", int, path)
    if layers != len(model.layers):
        raise PeftjaxError(f"{path}: the prefix is for {layers} layers, this model has {len(model.layers)}")
    adapted = apply(model, PrefixConfig(num_tokens=hf_number(cfg, "num_virtual_tokens", int, path)))
    prefixes = [layer.self_attn.prefix for layer in adapted.layers]
    L, width = prefixes[0].kv.shape
    table = tensors.take("prompt_embeddings", (L, layers * width)).reshape(L, layers, width)
    for i, prefix in enumerate(prefixes):
        prefix.kv.set_value(table[:, i])
    return adapted


def write_hf_prefix(model: nnx.Module):
    prefixes = {p: m for p, m in nnx.iter_modules(model) if isinstance(m, PrefixKV)}
    if not prefixes:
        return None
    layers = getattr(model, "layers", [])
    if len(prefixes) != len(layers) or any(layer.self_attn.prefix is None for layer in layers):
        raise PeftjaxError("HF PEFT prefix tuning gives every layer a prefix; this model has prefixes on "
                           f"{len(prefixes)} of {len(layers)} layers")
    kv = [np.asarray(layer.self_attn.prefix.prefix_kv()) for layer in layers]  # reparameterised ones evaluated
    L, (_, kv_heads, head_dim) = kv[0].shape[0], layers[0].self_attn.prefix.shape
    return {"num_virtual_tokens": L, "token_dim": kv_heads * head_dim, "num_attention_heads": kv_heads,
            "num_layers": len(layers), "num_transformer_submodules": 1, "encoder_hidden_size": kv_heads * head_dim,
            "prefix_projection": False}, {"prompt_embeddings": np.concatenate(kv, axis=1)}


register_method("prefix", PrefixConfig, apply_prefix, extra_positions=lambda c: (0, c.num_tokens),
                hf=HFFormat("PREFIX_TUNING", read_hf_prefix, write_hf_prefix))
