"""Autoregressive decoding with a KV cache: one jitted prefill (the prompt padded to a bucket of
:data:`PROMPT_BUCKET` tokens), then one jitted step per new token.

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
def _prefill(model, ids_BT, cache, prompt_len):
    """The prompt's cache and the logits after its last real token: ``ids_BT`` is the prompt right-padded to a
    bucket, so prompts of similar lengths share one compiled prefill. Causal attention keeps the padding out of
    the real positions, and the cache's length is set back to the real tokens: the next decode step writes its
    key over the first padded slot before any query can see that slot."""
    start = cache.length
    logits, cache = model(ids_BT, cache=cache)
    n_real = prompt_len + model.num_virtual_tokens()
    cache = KVCache(cache.keys, cache.values, start + n_real)
    return jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False), cache


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
PROMPT_BUCKET = 16


def cache_slots(model, tokens: int) -> int:
    """KV-cache slots for ``tokens`` positions (plus the model's virtual tokens), rounded up to a multiple of
    :data:`CACHE_BUCKET` within the context: requests of similar lengths share one compiled decode step (the slots
    past the filled length are masked out, so the logits do not change)."""
    need = model.num_virtual_tokens() + tokens
    return min(-(-need // CACHE_BUCKET) * CACHE_BUCKET, model.config.max_position)


def prefill_length(model, prompt_len: int, slots: int) -> int:
    """The prompt's length padded up to a multiple of :data:`PROMPT_BUCKET`, within the cache's ``slots`` and the
    context (never below the prompt itself)."""
    room = min(slots - model.num_virtual_tokens(),
               model.config.max_position - model.num_virtual_tokens() - model.num_prefix_positions())
    return max(prompt_len, min(-(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET, room))


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, *, eos_id: int | None = None,
                    temperature: float = 0.0, seed: int = 0) -> list[int]:
    """New token ids after ``prompt_ids`` (greedy when temperature is 0, else sampled)."""
    check_generation(model, len(prompt_ids), max_new_tokens, temperature)
    slots = cache_slots(model, len(prompt_ids) + max_new_tokens)
    cache = KVCache.empty(model.config, 1, slots)
    padded = list(prompt_ids) + [0] * (prefill_length(model, len(prompt_ids), slots) - len(prompt_ids))
    logits, cache = _prefill(model, jnp.asarray([padded], jnp.int32), cache,
                             jnp.asarray(len(prompt_ids), jnp.int32))
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
