"""Autoregressive decoding with a KV cache: one jitted prefill, then one jitted step per new token.

The model decodes with whatever adapters it carries and has active: LoRA-style wrappers, prefixes (attended to at
every step) and prompt-tuning virtual tokens (prepended once, in the prefill; the cache holds their positions).
Use :func:`peftjax.peft.disable_adapters` around a call to decode with the base model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import KVCache


@nnx.jit
def _prefill(model, ids_BT, cache):
    logits, cache = model(ids_BT, cache=cache)
    return logits[:, -1], cache


@nnx.jit
def _decode_step(model, ids_B1, cache):
    logits, cache = model(ids_B1, cache=cache, prepend_prompt=False)
    return logits[:, -1], cache


def check_generation(model, prompt_len: int, max_new_tokens: int, temperature: float) -> None:
    """One line for a request that cannot be decoded: an empty prompt, a negative length or temperature, or a
    prompt plus new tokens past the model's context."""
    if prompt_len == 0:
        raise PeftjaxError("the prompt is empty; give some text to continue")
    if max_new_tokens < 1:
        raise PeftjaxError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:  # also NaN
        raise PeftjaxError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    total = model.num_virtual_tokens() + prompt_len + max_new_tokens
    if total > model.config.max_position:
        raise PeftjaxError(f"{prompt_len} prompt tokens + {max_new_tokens} new tokens"
                           f"{f' + {model.num_virtual_tokens()} virtual tokens' if model.num_virtual_tokens() else ''}"
                           f" exceed the model's context of {model.config.max_position}; lower --max-new-tokens "
                           "or shorten the prompt")


CACHE_BUCKET = 64


def cache_slots(model, tokens: int) -> int:
    """KV-cache slots for ``tokens`` positions (plus the model's virtual tokens), rounded up to a multiple of
    :data:`CACHE_BUCKET` within the context: requests of similar lengths share one compiled decode step (the slots
    past the filled length are masked out, so the logits do not change)."""
    need = model.num_virtual_tokens() + tokens
    return min(-(-need // CACHE_BUCKET) * CACHE_BUCKET, model.config.max_position)


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, *, eos_id: int | None = None,
                    temperature: float = 0.0, seed: int = 0) -> list[int]:
    """New token ids after ``prompt_ids`` (greedy when temperature is 0, else sampled)."""
    check_generation(model, len(prompt_ids), max_new_tokens, temperature)
    cache = KVCache.empty(model.config, 1, cache_slots(model, len(prompt_ids) + max_new_tokens))
    logits, cache = _prefill(model, jnp.asarray([prompt_ids], jnp.int32), cache)
    key = jax.random.key(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits[0] / temperature))
        else:
            nxt = int(jnp.argmax(logits[0]))
        out.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
        logits, cache = _decode_step(model, jnp.asarray([[nxt]], jnp.int32), cache)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, **kw) -> str:
    ids = greedy_generate(model, tokenizer.encode(prompt), max_new_tokens, eos_id=tokenizer.eos_id, **kw)
    return tokenizer.decode(ids, skip_special_tokens=True)
