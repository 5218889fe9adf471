"""Autoregressive decoding with a KV cache: one jitted prefill (the prompt padded to a bucket of
:data:`PROMPT_BUCKET` tokens), then one jitted step per new token.

The model decodes with whatever adapters it carries and has active: LoRA-style wrappers, prefixes (attended to at
every step) and prompt-tuning virtual tokens (prepended once, in the prefill; the cache holds their positions).
Use :func:`peftjax.peft.disable_adapters` around a call to decode with the base model.
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import KVCache
from peftjax.peft import mixed_adapters


@nnx.jit
def _prefill(model, ids_BT, cache, prompt_len_B):
    """The prompts' cache and the logits after each one's last real token: ``ids_BT`` holds the prompts
    right-padded to a bucket, so prompts of similar lengths share one compiled prefill. Causal attention keeps the
    padding out of the real positions, and each example's cache length is set back to its real tokens: its next
    decode step writes its key over its first padded slot before any query can see that slot."""
    start = cache.length
    logits, cache = model(ids_BT, cache=cache)
    cache = KVCache(cache.keys, cache.values, start + prompt_len_B + model.num_virtual_tokens())
    last = jnp.take_along_axis(logits, (prompt_len_B - 1)[:, None, None], axis=1)
    return last[:, 0], cache


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
    return generate_batch(model, [prompt_ids], max_new_tokens, eos_id=eos_id, temperature=temperature, seed=seed)[0]


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, *, adapters: list[str | None] | None = None,
                   eos_id: int | None = None, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """New token ids after each of ``prompts``, decoded together as one batch (greedy when temperature is 0, else
    sampled). Prompts may differ in length: each example keeps its own cache length, positions and mask.

    ``adapters``: the named adapter each example decodes with (None: the base), as in
    :func:`peftjax.peft.mixed_adapters` — one batch serves several adapters in every step (the S-LoRA / Punica
    pattern: each layer computes the base once and every adapter's update, and keeps each row's own). An example stops at
    ``eos_id`` (included); the batch stops when every example has.
    """
    if not prompts:
        raise PeftjaxError("no prompts to generate from; give at least one")
    if adapters is not None and len(adapters) != len(prompts):
        raise PeftjaxError(f"{len(adapters)} adapter names for {len(prompts)} prompts; give one name (or None) per "
                           "prompt")
    lengths = [len(p) for p in prompts]
    for n in lengths:
        check_generation(model, n, max_new_tokens, temperature)
    slots = cache_slots(model, max(lengths) + max_new_tokens)
    width = prefill_length(model, max(lengths), slots)
    ids = jnp.asarray([list(p) + [0] * (width - len(p)) for p in prompts], jnp.int32)
    cache = KVCache.empty(model.config, len(prompts), slots, per_example=True)
    rows = contextlib.nullcontext() if adapters is None else mixed_adapters(model, adapters)
    key = jax.random.key(seed)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    with rows:
        logits, cache = _prefill(model, ids, cache, jnp.asarray(lengths, jnp.int32))
        for _ in range(max_new_tokens):
            if temperature > 0:
                key, sub = jax.random.split(key)
                nxt = jax.random.categorical(sub, logits / temperature, axis=-1)
            else:
                nxt = jnp.argmax(logits, axis=-1)
            for i, token in enumerate(map(int, nxt)):
                if not done[i]:
                    out[i].append(token)
                    done[i] = eos_id is not None and token == eos_id
            if all(done):
                break
            logits, cache = _decode_step(model, nxt[:, None].astype(jnp.int32), cache)
    return out


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 32, **kw) -> str:
    ids = greedy_generate(model, tokenizer.encode(prompt), max_new_tokens, eos_id=tokenizer.eos_id, **kw)
    return tokenizer.decode(ids, skip_special_tokens=True)
