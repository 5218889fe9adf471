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


def test_one_batch_decodes_prompts_of_different_lengths_with_different_adapters(randomise):
    """Batched multi-adapter generation (S-LoRA style): rows of 3, 9, 5 and 4 tokens, each with its own adapter (LoRA,
    DoRA, IA3) or the base, decoded in one batch, equal each row decoded alone with that adapter set."""
    from peftjax.generate import generate_batch

    model = peft.apply(tiny_model(), peft.LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    model = peft.add_adapter(model, "two", peft.LoRAConfig(rank=2, alpha=4.0, targets=("v_proj", "down_proj"),
                                                           dora=True, seed=1))
    model = peft.add_adapter(model, "ia3", peft.IA3Config())
    model = randomise(model, peft.Adapter, scale=0.5)
    prompts = [[3, 1, 4], [2, 7, 1, 8, 2, 8, 1, 8, 2], [5, 9, 2, 6, 5], [6, 2, 6, 4]]
    names = ["two", None, "default", "ia3"]
    batched = generate_batch(model, prompts, 6, adapters=names)
    alone = []
    for prompt, name in zip(prompts, names):
        peft.set_adapter(model, name)
        alone.append(greedy_generate(model, prompt, 6))
    assert batched == alone
    assert len({tuple(a) for a in alone}) > 2  # the adapters change the continuations
    # without adapters: each row as decoded alone; an end-of-sequence token stops its row only
    peft.set_adapter(model, None)
    plain = generate_batch(model, prompts, 6)
    assert plain == [greedy_generate(model, p, 6) for p in prompts]
    eos = plain[1][2]
    stopped = generate_batch(model, prompts, 6, eos_id=eos)
    for row, full in zip(stopped, plain):
        assert row == (full[:full.index(eos) + 1] if eos in full else full)
