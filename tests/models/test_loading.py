"""Checkpoint streaming (peftjax.models.loading): Hugging Face directories written by transformers itself (bfloat16,
sharded), tensors read one at a time, and quantization on load equal to quantizing the loaded model."""
import copy
import json

import numpy as np
import pytest
from flax import nnx

from peftjax.data import random_blocks
from peftjax.errors import PeftjaxError
from peftjax.models import from_pretrained
from peftjax.models.loading import load_into, open_checkpoint
from peftjax.models.llama import LlamaForCausalLM
from peftjax.quant.policy import QuantRule, load_quantized, quantize_model

torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
transformers = pytest.importorskip("transformers")

RULES = [QuantRule(targets=r"self_attn\..*", format="int8", axis=1),
         QuantRule(targets=r"mlp\..*", format="nf4", block_size=64, double_quant=True)]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tiny random Llama saved by transformers three ways: float32, bfloat16, and bfloat16 in several shards."""
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root / "f32")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # .to() converts in place
    bf16.save_pretrained(root / "bf16")
    bf16.save_pretrained(root / "sharded", max_shard_size="60KB")
    for d in ("f32", "bf16", "sharded"):
        transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_backend()).save_pretrained(root / d)
    return root, model, bf16


def _byte_backend():
    from peftjax.models.tokenizer import byte_tokenizer

    return byte_tokenizer().backend


def _torch_tensors(model) -> dict:
    return {k.removeprefix("model."): v.float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def test_bfloat16_and_sharded_checkpoints_load_exactly(hf_dirs):
    import jax.numpy as jnp

    root, _, bf16 = hf_dirs
    assert len(list((root / "sharded").glob("*.safetensors"))) > 1
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    expected = _torch_tensors(bf16)  # what the bfloat16 files hold
    for d in ("bf16", "sharded"):
        model, _ = from_pretrained(root / d, dtype=jnp.bfloat16)
        for path, var in nnx.to_flat_state(nnx.state(model)):
            name = ".".join(map(str, path))
            w = np.asarray(var[...], np.float32)
            assert var[...].dtype == jnp.bfloat16
            np.testing.assert_array_equal(w if w.ndim == 1 or name == "embed_tokens.weight" else w.T, expected[name])


def test_float32_checkpoint_logits_match_transformers(hf_dirs):
    root, torch_model, _ = hf_dirs
    model, _ = from_pretrained(root / "f32")
    ids = random_blocks(2, 9, vocab=256)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(np.asarray(ids))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)


def test_tensors_are_streamed_one_at_a_time(hf_dirs):
    """load_into converts each tensor before it reads the next (it never collects the checkpoint first)."""
    root = hf_dirs[0]
    ckpt = open_checkpoint(root / "f32")
    events = []

    def watched():
        for name, w in ckpt.tensors():
            events.append(("read", name))
            yield name, w

    def convert(name, variable, w):
        events.append(("convert", name))
        return None

    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(ckpt.config, rngs=nnx.Rngs(0)))
    load_into(abstract, watched(), convert)
    names = [n for _, n in events[::2]]
    assert len(names) == len(list(nnx.to_flat_state(nnx.state(abstract))))
    assert events == [(kind, n) for n in names for kind in ("read", "convert")]


@pytest.mark.parametrize("d", ["f32", "sharded"])
def test_quantized_on_load_equals_quantizing_the_loaded_model(hf_dirs, d):
    root = hf_dirs[0]
    streamed, _ = load_quantized(root / d, RULES, num_layers=2)
    dense, _ = from_pretrained(root / d, num_layers=2)
    reference = quantize_model(dense, RULES)
    a, b = nnx.to_flat_state(nnx.state(streamed)), nnx.to_flat_state(nnx.state(reference))
    assert [k for k, _ in a] == [k for k, _ in b]
    import jax

    for (k, va), (_, vb) in zip(a, b):
        for x, y in zip(jax.tree.leaves(va.get_value()), jax.tree.leaves(vb.get_value())):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=".".join(map(str, k)))
    assert streamed.config.num_layers == 2 and len(streamed.layers) == 2


def test_broken_checkpoints_are_one_line_errors(hf_dirs, tmp_path):
    import shutil

    root = hf_dirs[0]
    bad = tmp_path / "bad"
    shutil.copytree(root / "f32", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PeftjaxError, match="truncated"):
        from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(PeftjaxError, match="not a safetensors file"):
        from_pretrained(bad)
    shutil.copy(root / "f32" / "model.safetensors", bad / "model.safetensors")
    cfg = json.loads((root / "f32" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(PeftjaxError, match=r"checkpoint lacks 1 tensors, e.g. \['lm_head.weight'\]"):
        from_pretrained(bad)  # an untied head the checkpoint does not hold
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "su", "factor": 2.0}}))
    with pytest.raises(PeftjaxError, match="RoPE scaling type 'su' is not supported"):
        from_pretrained(bad)
    with pytest.raises(PeftjaxError, match="num_layers must be between 1 and 3"):
        from_pretrained(root / "f32", num_layers=4)
