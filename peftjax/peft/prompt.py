"""Prompt tuning (Lester et al. 2021): N trainable virtual-token embeddings are prepended to every input.

    h_0 = [P; E[ids]],   P: (N, d_model)

P starts random (rows scaled like the vocabulary embeddings) or as the embeddings of a text's tokens
(``init_ids``, repeated or cut to N; :meth:`PromptConfig.from_text` tokenizes for you). The virtual positions are
dropped from the outputs, so logits still line up with the input ids. A prompt cannot be merged into the base.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.peft.hf_format import HFFormat, HFTensors, hf_number
from peftjax.peft.registry import apply, register_method
from peftjax.variables import Prompt
from peftjax.peft.wrapper import AdapterModule


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptConfig:
    num_tokens: int = 20  # N
    init_ids: tuple[int, ...] = ()  # token ids whose embeddings initialise P; empty: random
    seed: int = 0

    @classmethod
    def from_text(cls, tokenizer, text: str, **kwargs) -> "PromptConfig":
        return cls(init_ids=tuple(tokenizer.encode(text)), **kwargs)


class PromptEmbedding(AdapterModule):
    def __init__(self, embeddings_ND: jax.Array):
        self.length = embeddings_ND.shape[0]
        self.embeddings = Prompt(embeddings_ND)

    @property
    def num_tokens(self) -> int:
        return 0 if self.disabled else self.length

    def __call__(self) -> jax.Array:
        return self.embeddings[...]


def apply_prompt(model: nnx.Module, config: PromptConfig) -> None:
    max_position = model.config.max_position
    if not 1 <= config.num_tokens < max_position:
        raise PeftjaxError(f"prompt num_tokens {config.num_tokens} must be in 1..{max_position - 1} "
                           f"(the context is {max_position} positions)")
    table = model.embed_tokens.weight[...].astype(jnp.float32)
    if config.init_ids:
        ids = jnp.resize(jnp.asarray(config.init_ids, jnp.int32), (config.num_tokens,))
        if int(ids.max()) >= table.shape[0] or int(ids.min()) < 0:
            raise PeftjaxError(f"prompt init_ids must be token ids in 0..{table.shape[0] - 1}")
        init = table[ids]
    else:
        init = jax.random.normal(jax.random.key(config.seed), (config.num_tokens, table.shape[1])) * table.std()
    model.prompt = PromptEmbedding(init)


def read_hf_prompt(model: nnx.Module, cfg: dict, tensors: HFTensors) -> nnx.Module:
    """HF stores P as ``prompt_embeddings`` (N, d_model); its virtual tokens take positions 0..N-1, as here."""
    path = tensors.config_path
    if hf_number(cfg, "num_transformer_submodules", int, path, 1) != 1:
        raise PeftjaxError(f"{path}: num_transformer_submodules must be 1 (a decoder-only model)")
    adapted = apply(model, PromptConfig(num_tokens=hf_number(cfg, "num_virtual_tokens", int, path)))
    adapted.prompt.embeddings.set_value(tensors.take("prompt_embeddings", adapted.prompt.embeddings.shape))
    return adapted


def write_hf_prompt(model: nnx.Module):
    prompt = getattr(model, "prompt", None)
    if not isinstance(prompt, PromptEmbedding):
        return None
    c = model.config
    return {"num_virtual_tokens": prompt.length, "token_dim": c.hidden_size, "num_transformer_submodules": 1,
            "num_attention_heads": c.num_heads, "num_layers": c.num_layers, "prompt_tuning_init": "RANDOM"}, {
        "prompt_embeddings": np.asarray(prompt.embeddings[...])}


register_method("prompt", PromptConfig, apply_prompt, extra_positions=lambda c: (c.num_tokens, 0),
                hf=HFFormat("PROMPT_TUNING", read_hf_prompt, write_hf_prompt))
