"""Decoding (KV cache, prefill then steps) uses whichever adapters are active, and none inside disable_adapters."""
import jax.numpy as jnp
import pytest
from flax import nnx

from peftjax import peft
from peftjax.generate import greedy_generate
from peftjax.models import tiny_model


@pytest.mark.parametrize("config", [peft.PromptConfig(num_tokens=3), peft.PrefixConfig(num_tokens=3),
                                    peft.LoRAConfig(rank=2)], ids=["prompt", "prefix", "lora"])
def test_generate_with_active_adapters_matches_full_forward(randomise, config):
    model = peft.apply(tiny_model(), config)
    if isinstance(config, peft.LoRAConfig):
        randomise(model, peft.LoRA)
    prompt = [3, 1, 4, 1, 5]
    new = greedy_generate(model, prompt, 4)
    # one full forward over prompt + new (causal): each new token is the argmax after the tokens before it
    logits = nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray([prompt + new]))
    assert new == [int(t) for t in jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)]
    with peft.disable_adapters(model):
        assert greedy_generate(model, prompt, 4) == greedy_generate(tiny_model(), prompt, 4)
