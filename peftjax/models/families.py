"""Hugging Face ``config.json`` <-> :class:`LlamaConfig`: which switches of the parameterised decoder each family
sets, read exactly as transformers reads them (its defaults where a key is absent), and written back for export.

Families: ``llama`` (Llama 2 / 3.x, SmolLM2), ``mistral``, ``qwen2`` (Qwen2 / 2.5), ``qwen3``, ``gemma2`` and
``gemma3_text`` (Gemma 3's text model); and the ``bert`` encoder (:mod:`peftjax.models.bert`). A key that changes the maths and is not implemented is an error, never
ignored.
"""
from __future__ import annotations

from typing import Any

from peftjax.errors import PeftjaxError
from peftjax.models.bert import BertConfig
from peftjax.models.llama import ACTIVATIONS, LlamaConfig
from peftjax.models.rope import ROPE_TYPES, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
FAMILIES = tuple(ARCHITECTURES)
_GEMMA = ("gemma2", "gemma3_text")
# transformers' defaults, per family, for the keys a config.json may leave out
_DEFAULTS = {
    "llama": dict(tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                  max_position_embeddings=2048),
    "mistral": dict(tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                  max_position_embeddings=32768, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu",
                  max_position_embeddings=32768, sliding_window=4096, max_window_layers=28),
    "gemma2": dict(tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, query_pre_attn_scalar=256,
                   sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(tie_word_embeddings=True, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                        query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6),
}
_SCALING_KEYS = {"factor": "factor", "original_max_position_embeddings": "original_max_position",
                 "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
                 "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor",
                 "mscale": "mscale", "mscale_all_dim": "mscale_all_dim", "truncate": "truncate"}


def _rope(params: dict | None, theta: float, where: str) -> tuple[float, RopeScaling]:
    """(theta, scaling) from a ``rope_parameters`` / ``rope_scaling`` entry (None: default RoPE with ``theta``)."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise PeftjaxError(f"{where}: RoPE scaling type {kind!r} is not supported; peftjax implements "
                           f"{', '.join(ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise PeftjaxError(f"{where}: partial_rotary_factor {params['partial_rotary_factor']} is not supported "
                           "(peftjax rotates the whole head)")
    if kind in ("linear", "dynamic", "llama3") and params.get("factor") is None:
        raise PeftjaxError(f"{where}: RoPE scaling {kind!r} needs a factor")
    values = {ours: params[theirs] for theirs, ours in _SCALING_KEYS.items() if params.get(theirs) is not None}
    return float(params.get("rope_theta", theta)), RopeScaling(type=kind, **values)


def _layer_types(cfg: dict, family: str, n: int) -> tuple[str, ...] | None:
    if family == "mistral":  # transformers' Mistral windows every layer (it reads no layer_types)
        return ("sliding_attention",) * n if cfg.get("sliding_window") else None
    if cfg.get("layer_types"):
        return tuple(cfg["layer_types"])
    if family in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window") or not cfg.get("sliding_window"):
            return None
        return tuple("sliding_attention" if i >= cfg["max_window_layers"] else "full_attention" for i in range(n))
    if family == "gemma2":
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n))
    if family == "gemma3_text":
        pattern = cfg["sliding_window_pattern"]
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n))
    return None


def bert_config(cfg: dict[str, Any], where: str) -> BertConfig:
    """The encoder a BERT ``config.json`` describes (dropout is a training-time setting of HF's, not applied)."""
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise PeftjaxError(f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                           "(absolute positions only)")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise PeftjaxError(f"{where}: BERT as a decoder / with cross-attention is not supported (encoders only)")
    return BertConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                      intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                      num_heads=cfg["num_attention_heads"], max_position=cfg.get("max_position_embeddings", 512),
                      type_vocab_size=cfg.get("type_vocab_size", 2), layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
                      hidden_act=cfg.get("hidden_act", "gelu"))


def config_from_hf(raw: dict[str, Any], where: str = "config.json") -> LlamaConfig | BertConfig:
    """The model a Hugging Face ``config.json`` describes; a family or a setting peftjax does not implement is a
    one-line error naming it."""
    family = raw.get("model_type", "llama")
    if family == "bert":
        return bert_config(raw, where)
    if family == "gemma3" and "text_config" in raw:
        raise PeftjaxError(f"{where}: a multimodal Gemma 3 checkpoint; peftjax loads Gemma 3 text models "
                           "(model_type gemma3_text, Gemma3ForCausalLM)")
    if family not in _DEFAULTS:
        archs = raw.get("architectures") or []
        raise PeftjaxError(f"{where}: model_type {family!r} {archs} is not supported; peftjax loads "
                           f"{', '.join(FAMILIES)} and bert")
    cfg = {**_DEFAULTS[family], **{k: v for k, v in raw.items() if v is not None or k == "sliding_window"}}
    if family in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        cfg["sliding_window"] = None
    for key in ("attention_dropout", "hidden_dropout"):
        if float(cfg.get(key) or 0.0):
            raise PeftjaxError(f"{where}: {key} {cfg[key]} is not supported (peftjax applies no dropout inside "
                               "the base model); set it to 0.0")
    if cfg.get("use_bidirectional_attention"):
        raise PeftjaxError(f"{where}: use_bidirectional_attention is not supported (causal decoders only)")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    if act not in ACTIVATIONS:
        raise PeftjaxError(f"{where}: activation {act!r} is not supported; peftjax implements "
                           f"{', '.join(ACTIVATIONS)}")
    n_heads, n_layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    rope_params = cfg.get("rope_parameters")
    if cfg.get("rope_scaling"):  # the older key wins, as transformers reads it
        scaling = dict(cfg["rope_scaling"])
        scaling.setdefault("rope_type", scaling.pop("type", "default"))
        rope_params = {"rope_theta": (rope_params or {}).get("rope_theta", cfg["rope_theta"]), **scaling}
    local_theta = None
    if family == "gemma3_text":
        nested = rope_params if isinstance(rope_params, dict) and "full_attention" in rope_params else None
        if nested is not None:
            theta, scaling = _rope(nested.get("full_attention"), cfg["rope_theta"], where)
            local_theta, local = _rope(nested.get("sliding_attention"), cfg["rope_local_base_freq"], where)
            if local.type != "default":
                raise PeftjaxError(f"{where}: RoPE scaling on Gemma 3's sliding-window layers is not supported")
        else:
            theta, scaling = _rope(rope_params, cfg["rope_theta"], where)
            local_theta = float(cfg["rope_local_base_freq"])
    else:
        theta, scaling = _rope(rope_params, cfg["rope_theta"], where)
    gemma = family in _GEMMA
    bias = bool(cfg.get("attention_bias", False))
    layer_types = _layer_types(cfg, family, n_layers)
    return LlamaConfig(
        model_type=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=n_layers, num_heads=n_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        rope_theta=theta, rope_scaling=scaling, local_rope_theta=local_theta,
        rms_eps=float(cfg["rms_norm_eps"]), max_position=cfg["max_position_embeddings"],
        tie_embeddings=bool(cfg["tie_word_embeddings"]),
        qkv_bias=True if family == "qwen2" else bias, o_bias=False if family == "qwen2" else bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=family in ("qwen3", "gemma3_text"),
        norm_offset=1.0 if gemma else 0.0, hidden_act=act, embed_scale=gemma, sandwich_norms=gemma,
        query_scale=cfg["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        attn_softcap=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        sliding_window=cfg.get("sliding_window") if layer_types else None, layer_types=layer_types,
    )


_TYPE_KEYS = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor",
                       "mscale", "mscale_all_dim", "truncate")}


def _rope_dict(theta: float, scaling: RopeScaling, max_position: int) -> dict:
    out = {"rope_type": scaling.type, "rope_theta": theta}
    for theirs in _TYPE_KEYS[scaling.type]:
        value = getattr(scaling, _SCALING_KEYS[theirs])
        if theirs == "original_max_position_embeddings" and value is None:
            value = max_position
        if value is not None:
            out[theirs] = value
    return out


def hf_config_dict(c: LlamaConfig) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild ``c`` (the inverse of :func:`config_from_hf`)."""
    family = c.model_type
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_eps, "max_position_embeddings": c.max_position,
        "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32",
        "attention_dropout": 0.0,
    }
    rope = _rope_dict(c.rope_theta, c.rope_scaling, c.max_position)
    if family == "gemma3_text":
        out["rope_parameters"] = {"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": c.local_rope_theta}}
    else:
        out["rope_parameters"] = rope
    if family in _GEMMA:
        out.update(hidden_activation=c.hidden_act, query_pre_attn_scalar=round(c.query_scale ** -2),
                   attention_bias=c.o_bias, final_logit_softcapping=c.final_softcap)
        if family == "gemma2":
            out["attn_logit_softcapping"] = c.attn_softcap
    else:
        out["hidden_act"] = c.hidden_act
    if family in ("llama", "qwen3"):
        out["attention_bias"] = c.o_bias
    if family == "llama":
        out["mlp_bias"] = c.mlp_bias
    if c.layer_types is not None:
        out.update(layer_types=list(c.layer_types[:c.num_layers]), sliding_window=c.sliding_window)
        if family in ("qwen2", "qwen3"):
            out["use_sliding_window"] = True
    elif family in ("mistral", "qwen2", "qwen3"):
        out["sliding_window"] = None
    return out

