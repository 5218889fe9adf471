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


def test_prompts_of_one_bucket_share_the_compiled_prefill():
    """Prompts of 2..16 tokens are padded to one 16-token prefill: after the first, no length compiles again, and
    each continuation equals the argmax of an unpadded full forward."""
    import jax

    model = tiny_model()
    forward = nnx.jit(lambda m, ids: m(ids))
    greedy_generate(model, [7, 7], 2)
    compiles = []

    def count(event, *args, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    prompts = [[3, 1, 4, 1, 5, 9, 2], list(range(1, 17)), [8, 2]]
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        outs = [greedy_generate(model, prompt, 3) for prompt in prompts]
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    for prompt, new in zip(prompts, outs):
        logits = forward(model, jnp.asarray([prompt + new]))
        assert new == [int(t) for t in jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)]
