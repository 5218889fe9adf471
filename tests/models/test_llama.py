"""The Llama decoder: cache consistency on a tiny model, and parity with transformers on the real SmolLM2."""
import json

import jax
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from peftjax.generate import greedy_generate
from peftjax.models import KVCache
from peftjax.data import random_blocks
from peftjax.models import tiny_model


def test_kv_cache_decoding_matches_full_forward():
    model = tiny_model()
    ids = random_blocks(2, 12)
    full = model(ids)
    cache = KVCache.empty(model.config, 2, 16)
    prefix_logits, cache = model(ids[:, :7], cache=cache)
    steps = [prefix_logits]
    for t in range(7, 12):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
    assert int(cache.length) == 12


def test_forward_is_causal():
    model = tiny_model()
    ids = random_blocks(1, 10)
    changed = ids.at[0, 6].set((ids[0, 6] + 1) % 256)
    a, b = model(ids), model(changed)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert not np.allclose(a[:, 6:], b[:, 6:])


@pytest.fixture(scope="module")
def smollm2():
    from peftjax.models import from_pretrained

    return from_pretrained("smollm2")


@pytest.fixture(scope="module")
def reference(fixture_path):
    return json.loads(fixture_path("smollm2_reference.json").read_text())


@pytest.mark.slow
def test_smollm2_parity_with_transformers(smollm2, reference):
    """Every reference prompt in one jitted forward, right-padded to the longest (causal attention keeps the
    padding out of the real positions)."""
    model, tokenizer = smollm2
    cases = reference["cases"]
    width = max(len(case["ids"]) for case in cases)
    batch = jnp.asarray([case["ids"] + [0] * (width - len(case["ids"])) for case in cases])
    all_logits = nnx.jit(lambda m, ids: m(ids))(model, batch)
    for case, row in zip(cases, all_logits):
        assert tokenizer.encode(case["prompt"]) == case["ids"], case["prompt"]
        logits = row[:len(case["ids"])]
        diff = np.abs(np.asarray(logits[-1]) - np.asarray(case["last_logits"], np.float32)).max()
        assert diff < 1e-4, f"{case['prompt']!r}: last-position logits differ by {diff}"  # README: "to 1e-4"
        logp = jax.nn.log_softmax(logits[:-1], axis=-1)
        mean_logprob = float(jnp.take_along_axis(logp, jnp.asarray(case["ids"][1:])[:, None], axis=1).mean())
        assert abs(mean_logprob - case["mean_logprob"]) < 1e-3


@pytest.mark.slow
def test_smollm2_greedy_continuations(smollm2, reference):
    model, tokenizer = smollm2
    for case in reference["cases"]:
        new = greedy_generate(model, case["ids"], len(case["greedy_ids"]))
        assert new == case["greedy_ids"], case["prompt"]
        assert tokenizer.decode(new) == case["greedy_text"]


@pytest.mark.slow
def test_smollm2_chat_template(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.encode("<|im_start|>") == [tokenizer.bos_id]


def test_hugging_face_directory_round_trip(tmp_path):
    """A Llama-layout config.json + model.safetensors (weights (out, in)) loads into the same model."""
    from flax import nnx
    from safetensors.numpy import save_file

    from peftjax.models import from_pretrained
    from peftjax.models.tokenizer import byte_tokenizer

    model = tiny_model(seed=3)
    c = model.config
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.max_position,
        "tie_word_embeddings": True}))
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = ".".join(map(str, path))
        w = np.asarray(var[...])
        tensors["model." + name] = w if w.ndim == 1 or name == "embed_tokens.weight" else np.ascontiguousarray(w.T)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    byte_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    loaded, tokenizer = from_pretrained(tmp_path)
    ids = random_blocks(1, 6)
    np.testing.assert_array_equal(loaded(ids), model(ids))
    assert tokenizer.decode(tokenizer.encode("To be, or not")) == "To be, or not"


def test_unknown_model_path_is_one_clear_error(tmp_path):
    from peftjax.errors import PeftjaxError
    from peftjax.models import from_pretrained

    with pytest.raises(PeftjaxError, match="not found: give 'smollm2', a .gguf file or a Hugging Face directory"):
        from_pretrained(tmp_path / "nope.gguf")


def test_gqa_attention_matches_jax_reference():
    from peftjax.models.llama import gqa_attention

    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 7, 6, 8))
    k = jax.random.normal(keys[1], (2, 7, 2, 8))
    v = jax.random.normal(keys[2], (2, 7, 2, 8))
    ours = gqa_attention(q, k, v, jnp.tril(jnp.ones((7, 7), bool)))
    np.testing.assert_allclose(ours, jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_fused_attention_path_computes_the_einsum_path(monkeypatch):
    """``model.attention: auto`` routes plain causal attention through ``jax.nn.dot_product_attention`` (cuDNN on
    a GPU). Here, on CPU, the backend check is made to say GPU and the kernel is XLA's: the model's logits and
    gradients must be those of the einsum path, and the cases the kernel does not take (float32 compute, a KV
    cache, ``attention: xla``) must not reach it."""
    from peftjax.errors import PeftjaxError
    from peftjax.models import llama

    calls = []

    def xla_kernel(q, k, v, *, scale=None, implementation=None):
        calls.append((q.dtype, implementation))
        return llama.jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                                                  is_causal=True, implementation="xla")

    model = tiny_model()
    ids = random_blocks(2, 12)
    loss = lambda m: jnp.sum(m(ids, compute_dtype=jnp.bfloat16) ** 2)  # noqa: E731
    plain = model(ids, compute_dtype=jnp.bfloat16)
    plain_grad = nnx.grad(loss)(model)
    monkeypatch.setattr(llama.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(llama, "causal_attention", xla_kernel)
    model(ids)  # float32 compute: the einsum path
    model(ids[:, :3], compute_dtype=jnp.bfloat16, cache=KVCache.empty(model.config, 2, 8, jnp.bfloat16))
    assert calls == []
    fused = model(ids, compute_dtype=jnp.bfloat16)
    assert calls and all(c == (jnp.bfloat16, "cudnn") for c in calls)
    np.testing.assert_allclose(np.asarray(fused, np.float32), np.asarray(plain, np.float32), atol=2e-2)
    fused_grad = nnx.grad(loss)(model)
    for a, b in zip(jax.tree.leaves(fused_grad), jax.tree.leaves(plain_grad)):  # bfloat16 rounding, relatively
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)
    calls.clear()
    model.set_attention("xla")
    model(ids, compute_dtype=jnp.bfloat16)
    assert calls == []
    with pytest.raises(PeftjaxError, match="model.attention must be one of auto, xla, got 'flash'"):
        model.set_attention("flash")
