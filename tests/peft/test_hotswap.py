"""Hot-swapping: adapters of ranks 4, 8 and 16 with different alphas (and target layers) run through one compiled
evaluation function and the compiled generation steps, and give what each adapter's own unpadded model gives."""
import jax
import numpy as np
import pytest
from flax import nnx

from peftjax import peft
from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.generate import greedy_generate
from peftjax.models import tiny_model

CONFIGS = [peft.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj")),
           peft.LoRAConfig(rank=8, alpha=4.0, targets="all-linear", rslora=True, seed=1),
           peft.LoRAConfig(rank=16, alpha=32.0, targets=("v_proj", "down_proj"), seed=2)]


@pytest.fixture(scope="module")
def sources():
    """The three adapters on one tiny base, B drawn on the host (A keeps its Kaiming init)."""
    base, rng = tiny_model(), np.random.default_rng(0)
    models = [peft.apply(base, c) for c in CONFIGS]
    for model in models:
        for _, layer in nnx.iter_modules(model):
            if isinstance(layer, peft.LoRALinear):
                layer.lora_b.set_value(rng.normal(0, 0.1, layer.lora_b.shape).astype(np.float32))
    return models


def test_swapped_adapters_compile_once_and_match_their_own_models(sources):
    served = peft.prepare_hotswap(sources[0], max_rank=16, targets="all-linear")
    graphdef, _ = nnx.split(served)
    traces = []

    @jax.jit
    def logits(state, ids):
        traces.append(1)
        return nnx.merge(graphdef, state)(ids)

    ids = random_blocks(2, 9)
    diffs = []
    for source in sources:
        peft.hotswap(served, source)
        assert nnx.graphdef(served) == graphdef
        diffs.append(float(np.abs(np.asarray(logits(nnx.state(served), ids)) - np.asarray(source(ids))).max()))
    print(f"max |logit diff| per adapter (ranks 4, 8, 16): {diffs}")
    assert len(traces) == 1 and logits._cache_size() == 1
    assert max(diffs) < 1e-5


def test_generation_after_a_swap_compiles_nothing(sources):
    served = peft.prepare_hotswap(sources[0], max_rank=16, targets="all-linear")
    prompt = [5, 17, 3, 9]
    greedy_generate(served, prompt, 3)  # compiles the prefill and decoding steps once
    compiles = []

    def count(event, *args, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        swapped = []
        for source in sources[1:]:
            peft.hotswap(served, source)
            swapped.append(greedy_generate(served, prompt, 3))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert compiles == []
    assert swapped[-1] == greedy_generate(sources[-1], prompt, 3)  # the rank-16 adapter's own model


def test_swap_errors_name_the_layer(sources):
    served = peft.prepare_hotswap(sources[0], max_rank=8)
    with pytest.raises(PeftjaxError, match=r"layers.0.self_attn.v_proj has rank 16 > the prepared max_rank 8"):
        peft.hotswap(served, peft.apply(tiny_model(), peft.LoRAConfig(rank=16, targets="v_proj")))
    with pytest.raises(PeftjaxError, match="the source adapts layers.0.mlp.down_proj, which the prepared model does "
                                           "not; prepare it with targets"):
        peft.hotswap(served, sources[2])
    with pytest.raises(PeftjaxError, match="has rank 16 > max_rank 8; declare the largest rank"):
        peft.prepare_hotswap(sources[2], max_rank=8)
    with pytest.raises(PeftjaxError, match="not prepared for hot-swapping"):
        peft.hotswap(sources[0], sources[1])
