"""A BERT encoder in Flax NNX (Devlin et al. 2019), as Hugging Face's ``BertModel`` computes it (all-MiniLM-L6-v2
and other sentence encoders use it).

    h_0 = LN(E_word[ids] + E_pos[0..T-1] + E_type[token_types])                 absolute positions
    a   = LN(h + dense(MHA(query(h), key(h), value(h), padding mask)))            post-LN
    h'  = LN(a + dense_out(GELU(dense_in(a))))

LN(x) = (x - mean) / sqrt(var + eps) * g + b, computed in float32; GELU is the exact (erf) form. Attention is
bidirectional: every position sees every non-padding position (``attention_mask`` 1 for tokens, 0 for padding).
Module paths are Hugging Face's (``encoder.layer.3.attention.self.query``), so target rules and HF PEFT adapters
written for BERT (``query``, ``value``, ``dense``) name the same modules; weights are (d_in, d_out) as in the
decoder. ``pooled`` gives the sentence vectors a classifier reads: the mean of the non-padding states
(sentence-transformers' pooling) or the [CLS] state.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.llama import ACTIVATIONS, Embedding, Linear, batched, sub_key
from peftjax.variables import Head

POOLINGS = ("mean", "cls", "pooler")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooler: bool = True  # HF's BertModel has a tanh pooler on [CLS]; loaded when the checkpoint holds it
    model_type: str = "bert"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise PeftjaxError(f"activation {self.hidden_act!r} is not supported; peftjax implements "
                               f"{', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_heads:
            raise PeftjaxError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def tiny(cls, **overrides) -> "BertConfig":
        base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    max_position=64)
        return cls(**{**base, **overrides})


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...].astype(jnp.float32)[None, :]
                + self.bias[...].astype(jnp.float32)[None, :]).astype(x.dtype)


class BertEmbeddings(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size, rngs=rngs, dtype=dtype)
        self.position_embeddings = Embedding(c.max_position, c.hidden_size, rngs=rngs, dtype=dtype)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size, rngs=rngs, dtype=dtype)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)


class BertSelfAttention(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.query = Linear(c.hidden_size, c.hidden_size, rngs=rngs, bias=True, dtype=dtype)
        self.key = Linear(c.hidden_size, c.hidden_size, rngs=rngs, bias=True, dtype=dtype)
        self.value = Linear(c.hidden_size, c.hidden_size, rngs=rngs, bias=True, dtype=dtype)


class BertDenseLN(nnx.Module):
    """``dense`` then the residual and a LayerNorm: HF's BertSelfOutput and BertOutput."""

    def __init__(self, d_in: int, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.dense = Linear(d_in, c.hidden_size, rngs=rngs, bias=True, dtype=dtype)
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, x_ND, residual_ND, key=None):
        return self.LayerNorm(self.dense(x_ND, key) + residual_ND)


class BertAttention(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.self = BertSelfAttention(c, rngs=rngs, dtype=dtype)
        self.output = BertDenseLN(c.hidden_size, c, rngs=rngs, dtype=dtype)


class BertIntermediate(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.dense = Linear(c.hidden_size, c.intermediate_size, rngs=rngs, bias=True, dtype=dtype)


class BertLayer(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.num_heads, self.head_dim, self.act = c.num_heads, c.head_dim, c.hidden_act
        self.attention = BertAttention(c, rngs=rngs, dtype=dtype)
        self.intermediate = BertIntermediate(c, rngs=rngs, dtype=dtype)
        self.output = BertDenseLN(c.intermediate_size, c, rngs=rngs, dtype=dtype)

    def __call__(self, h_ND, shape_BT, keep_BS, key=None):
        B, T = shape_BT
        att = self.attention.self

        def heads(proj, i):
            return proj(h_ND, sub_key(key, i)).reshape(B, T, self.num_heads, self.head_dim)

        q, k, v = heads(att.query, 0), heads(att.key, 1), heads(att.value, 2)
        scores = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * (self.head_dim ** -0.5)
        scores = jnp.where(keep_BS[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(B * T, -1)
        a = self.attention.output(ctx, h_ND, sub_key(key, 3))
        inner = ACTIVATIONS[self.act](self.intermediate.dense(a, sub_key(key, 4)))
        return self.output(inner, a, sub_key(key, 5))


class BertEncoder(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.layer = nnx.List([BertLayer(c, rngs=rngs, dtype=dtype) for _ in range(c.num_layers)])


class BertPooler(nnx.Module):
    def __init__(self, c: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.dense = Linear(c.hidden_size, c.hidden_size, rngs=rngs, bias=True, dtype=dtype)


class ClassifierHead(nnx.Module):
    """logits = pooled @ W + b over ``num_labels`` classes; its variables are :class:`~peftjax.variables.Head`, so
    every PEFT method trains it (as HF PEFT's ``modules_to_save`` does for a classifier) and no target rule for
    linear layers adapts it."""

    def __init__(self, dim: int, num_labels: int, *, key: jax.Array):
        self.weight = Head(0.02 * jax.random.normal(key, (dim, num_labels), jnp.float32))
        self.bias = Head(jnp.zeros((num_labels,), jnp.float32))

    def __call__(self, x_BD: jax.Array) -> jax.Array:
        return (x_BD.astype(jnp.float32) @ self.weight[...] + self.bias[...][None, :]).astype(jnp.float32)


class BertModel(nnx.Module):
    """``model(ids_BT, attention_mask=mask_BT)``: final hidden states (B, T, D) in float32. With a classifier
    attached (:meth:`attach_classifier`) it is a sequence classifier: :meth:`task_loss` is its training objective.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = BertEncoder(config, rngs=rngs, dtype=dtype)
        self.pooler = BertPooler(config, rngs=rngs, dtype=dtype) if config.pooler else None
        # Hook for prompt tuning, as in the decoder: (N, D) virtual-token embeddings prepended to the input.
        self.prompt = nnx.data(None)
        self.classifier = nnx.data(None)
        self.pooling = "mean"

    @property
    def embed_tokens(self) -> Embedding:
        """The word-embedding table (what prompt tuning initialises virtual tokens from, as in the decoder)."""
        return self.embeddings.word_embeddings

    def num_virtual_tokens(self) -> int:
        return 0 if self.prompt is None else self.prompt.num_tokens

    def attach_classifier(self, num_labels: int, *, pooling: str = "mean", seed: int = 0) -> None:
        """Make this encoder a sequence classifier over ``num_labels`` classes read from ``pooling`` sentence
        vectors (:meth:`pooled`); the head starts as HF's does (weights N(0, 0.02^2), zero bias)."""
        if pooling not in POOLINGS:
            raise PeftjaxError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if pooling == "pooler" and self.pooler is None:
            raise PeftjaxError("this encoder has no pooler weights; use pooling 'mean' or 'cls'")
        if num_labels < 2:
            raise PeftjaxError(f"a classifier needs at least 2 labels, got {num_labels}")
        self.pooling = pooling
        self.classifier = ClassifierHead(self.config.hidden_size, num_labels, key=jax.random.key(seed))

    def class_logits(self, ids_BT, attention_mask_BT, *, compute_dtype=jnp.float32, dropout_key=None) -> jax.Array:
        """(B, num_labels) float32 logits of the attached classifier."""
        if self.classifier is None:
            raise PeftjaxError("this encoder has no classifier; call attach_classifier (data.task: classify)")
        hidden = self(ids_BT, attention_mask=attention_mask_BT, compute_dtype=compute_dtype, dropout_key=dropout_key)
        return self.classifier(self.pooled(hidden, attention_mask_BT, self.pooling))

    def task_loss(self, batch: dict, *, compute_dtype=jnp.float32, dropout_key=None, remat: bool = False):
        """(summed cross-entropy of the rows' labels, counted rows, correctly classified rows). ``batch``: token ids
        ``tokens`` (B, T), their attention mask ``loss_mask`` (B, T), ``label`` (B,) and optionally ``weight`` (B,)
        (0 for padding rows). ``remat`` has no effect: an encoder's activations are small."""
        logits = self.class_logits(batch["tokens"], batch["loss_mask"], compute_dtype=compute_dtype,
                                   dropout_key=dropout_key)
        weight = batch.get("weight", jnp.ones(logits.shape[:1], jnp.float32)).astype(jnp.float32)
        label = batch["label"].astype(jnp.int32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), label[:, None], axis=-1)[:, 0]
        correct = ((jnp.argmax(logits, axis=-1) == label) * weight).sum()
        return (nll * weight).sum(), weight.sum(), correct

    def __call__(self, ids_BT: jax.Array, *, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, compute_dtype=jnp.float32,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """Final hidden states (B, T, D) of the real tokens (prompt tuning's virtual tokens are attended to, then
        dropped). ``attention_mask``: 1 for tokens, 0 for padding (all tokens when None)."""
        B, T_in = ids_BT.shape
        n_virtual = self.num_virtual_tokens()
        T = n_virtual + T_in
        c = self.config
        if T > c.max_position:
            raise PeftjaxError(f"{n_virtual} virtual tokens + {T_in} input tokens exceed the encoder's "
                               f"{c.max_position} positions; truncate the input")
        keep = jnp.ones((B, T_in), bool) if attention_mask is None else attention_mask.astype(bool)
        types = jnp.zeros((B, T_in), jnp.int32) if token_type_ids is None else token_type_ids
        emb = self.embeddings
        words = emb.word_embeddings(ids_BT.reshape(-1)).astype(compute_dtype).reshape(B, T_in, -1)
        if n_virtual:  # HF PEFT prepends virtual tokens to the word embeddings, positions and types follow
            virtual = jnp.broadcast_to(batched(self.prompt()).astype(compute_dtype), (B, n_virtual, words.shape[-1]))
            words = jnp.concatenate([virtual, words], axis=1)
            keep = jnp.concatenate([jnp.ones((B, n_virtual), bool), keep], axis=1)
            types = jnp.concatenate([jnp.zeros((B, n_virtual), types.dtype), types], axis=1)
        h = (words + emb.position_embeddings(jnp.arange(T)).astype(compute_dtype)[None]
             + emb.token_type_embeddings(types.reshape(-1)).astype(compute_dtype).reshape(B, T, -1))
        h = emb.LayerNorm(h.reshape(B * T, -1))
        for i, layer in enumerate(self.encoder.layer):
            h = layer(h, (B, T), keep, sub_key(dropout_key, i))
        return h.reshape(B, T, -1)[:, n_virtual:].astype(jnp.float32)

    def pooled(self, hidden_BTD: jax.Array, attention_mask: jax.Array | None, mode: str = "mean") -> jax.Array:
        """(B, D) sentence vectors: ``mean`` of the non-padding states (sentence-transformers), the ``cls`` (first)
        state, or HF's ``pooler`` output tanh(dense(h_cls)) (what BertForSequenceClassification classifies)."""
        if mode == "cls":
            return hidden_BTD[:, 0]
        if mode == "pooler":
            if self.pooler is None:
                raise PeftjaxError("this encoder has no pooler weights; use pooling 'mean' or 'cls'")
            return jnp.tanh(self.pooler.dense(hidden_BTD[:, 0]))
        if mode != "mean":
            raise PeftjaxError(f"pooling must be 'mean', 'cls' or 'pooler', got {mode!r}")
        B, T, _ = hidden_BTD.shape
        m = jnp.ones((B, T), jnp.float32) if attention_mask is None else attention_mask.astype(jnp.float32)
        return jnp.einsum("btd,bt->bd", hidden_BTD, m) / jnp.maximum(m.sum(axis=1), 1e-9)[:, None]
