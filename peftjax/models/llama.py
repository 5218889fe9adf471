"""A parameterised decoder in Flax NNX: Llama (Touvron et al. 2023; SmolLM2), Mistral, Qwen2 / 2.5, Qwen3 and
Gemma 2 / 3 text models, as their Hugging Face implementations compute them.

    h_0     = E[ids]                                                       (Gemma: * sqrt(D))
    a       = h + o_proj(Attn(RoPE(q_proj(RMSNorm(h))), RoPE(k_proj(.)), v_proj(.)))     grouped-query attention
    h'      = a + down_proj(act(gate_proj(RMSNorm(a))) * up_proj(RMSNorm(a)))          SwiGLU (Gemma: GeGLU)
    logits  = RMSNorm(h_L) @ E^T  (tied)  or  RMSNorm(h_L) @ lm_head^T  (untied)       (Gemma 2: c tanh(z / c))

RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g (Gemma: * (1 + g)). RoPE rotates pairs (i, i + d/2) of each head
(the "rotate half" layout of Hugging Face checkpoints; scaling schemes in :mod:`peftjax.models.rope`).
The families differ by switches of :class:`LlamaConfig`: q/k/v (and o) biases (Qwen2, Llama's
``attention_bias``), per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3), a sliding attention window on some or
all layers (Mistral; Gemma's alternating local / global layers, which in Gemma 3 also use their own RoPE base),
"sandwich" norms around attention and MLP outputs (Gemma 2 / 3), tanh soft-capping of attention scores and of the
final logits (Gemma 2), the softmax scale ``query_pre_attn_scalar^-1/2`` (Gemma).

Every linear layer sees 2-D activations (tokens, features): on CPU, XLA runs those matmuls about twice as fast,
forward and backward, as the same work on (batch, time, features). Weights are stored (d_in, d_out) so that
``y = x @ W``. Module paths follow Hugging Face names (``layers.3.self_attn.q_proj``) so that rules and adapters
written for HF PEFT name the same modules here.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.matmul import matmul
from peftjax.models.rope import RopeScaling, apply_rope, rope_cos_sin
from peftjax.models.spmd import constrain_rows

ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """A decoder's shape and the switches that make it one family or another (module docstring)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_position: int = 2048
    tie_embeddings: bool = True
    model_type: str = "llama"  # the Hugging Face family the switches below reproduce
    rope_scaling: RopeScaling = RopeScaling()
    local_rope_theta: float | None = None  # RoPE base of sliding-window layers (Gemma 3); rope_theta when None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k, before RoPE
    norm_offset: float = 0.0  # RMSNorm scales by (offset + g): 1 in Gemma
    hidden_act: str = "silu"
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norms: bool = False  # norms after attention and MLP too (Gemma 2 / 3)
    query_scale: float | None = None  # softmax scale; head_dim ** -0.5 when None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer; None: every layer full attention

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise PeftjaxError(f"activation {self.hidden_act!r} is not supported; peftjax implements "
                               f"{', '.join(ACTIVATIONS)}")
        if self.layer_types is not None:
            if len(self.layer_types) < self.num_layers or not set(self.layer_types) <= set(LAYER_TYPES):
                raise PeftjaxError(f"layer_types must name {self.num_layers} layers, each one of {LAYER_TYPES}")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise PeftjaxError("sliding_attention layers need a sliding_window size")

    def window(self, layer: int) -> int | None:
        """The sliding attention window of decoder layer ``layer`` (None: full causal attention)."""
        if self.layer_types is None or self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """A small random-weight configuration for unit tests (same code paths as the real model)."""
        base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_eps=1e-5, max_position=256)
        base.update(overrides)
        return cls(**base)


def sub_key(key: jax.Array | None, i: int) -> jax.Array | None:
    """The i-th independent stream of a call's key (None stays None: no randomness)."""
    return None if key is None else jax.random.fold_in(key, i)


def batched(virtual: jax.Array) -> jax.Array:
    """Prompt tuning's virtual tokens as (B or 1, N, D): one prompt for every example, (N, D), gets a batch axis;
    (B, N, D) (named prompts in a mixed-adapter batch: one per example) is kept."""
    return virtual if virtual.ndim == 3 else virtual[None]


def after(q, x):
    """``q`` (an array or a pytree such as a quantized tensor) with a data dependency on ``x`` and the same values:
    every float leaf plus ``0 * x[0, ..., 0]``, every integer leaf plus ``(that zero != 0)``.

    Nothing else orders the decoding of a stored weight (bfloat16 -> float32, or a dequantization) after the
    layer's input (or, backwards, its cotangent), and XLA on CPU schedules every such decoding of the step first:
    every layer's float32 weight is then alive at once, as much memory as a float32 model (optimization barriers
    are dropped before scheduling). A product with zero is not simplified away for floats (it is NaN for a
    non-finite input, which the train step's non-finite guard rejects anyway), so each weight is decoded just
    before its matmul and freed after it.
    """
    zero = x.reshape(-1)[0].astype(jnp.float32) * 0.0
    int_zero = (zero != 0).astype(jnp.uint8)  # on integer codes too, or XLA shares their decoding between passes

    def depend(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf + zero.astype(leaf.dtype)
        return leaf + int_zero.astype(leaf.dtype)

    return jax.tree.map(depend, q)


class Linear(nnx.Module):
    """y = x @ W (+ b), W of shape (d_in, d_out), a frozen base weight unless surgery re-types it."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool = False, dtype=jnp.float32):
        self.d_in, self.d_out = d_in, d_out
        init = nnx.initializers.normal(0.02)
        self.weight = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype)) if bias else None

    def kernel(self, dtype, x: jax.Array | None = None) -> jax.Array:
        """The dense weight in ``dtype``; quantized subclasses dequantize here, inside the traced matmul. Given the
        layer's input ``x``, a weight stored in another dtype (a bfloat16 base under float32 compute) is converted
        after ``x`` exists (:func:`after`), just before its matmul."""
        w = self.weight[...]
        if w.dtype == dtype:
            return w
        return (w if x is None else after(w, x)).astype(dtype)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``key``: the call's randomness (adapter dropout); a plain linear layer has none and ignores it."""
        y = matmul(x, self.kernel(x.dtype, x))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)[None, :]
        return y


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x^2) + eps) * (offset + g) over the last axis, computed in float32."""

    def __init__(self, dim: int, *, eps: float, offset: float = 0.0, dtype=jnp.float32):
        self.eps, self.offset = eps, offset
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.weight[...].astype(jnp.float32))[None, :]).astype(x.dtype)


def gqa_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_TS: jax.Array, *,
                  scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """softmax(s(q k^T * scale) + mask) v with grouped-query attention (N query heads share K kv heads); scale is
    d^-1/2 unless given, s(z) = c tanh(z / c) with ``softcap`` c (Gemma 2), else s(z) = z. The mask is (T, S) for
    every example, or (B, T, S).

    The G = N/K query heads of a kv head are stacked along the query axis, so each kv head does one
    (G*T, d) x (d, S) matmul: on CPU this runs forward + backward about twice as fast as
    ``jax.nn.dot_product_attention`` at SmolLM2's shapes (4 x 256 tokens, 9 heads, 3 kv heads).
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    k, v = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)  # (B, K, S, H)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k).astype(jnp.float32) * (H ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    # (G*T, S), or (B, G*T, S) for a per-example mask: row g*T + t is query t of group member g
    mask = jnp.tile(mask_TS, (1,) * (mask_TS.ndim - 2) + (G, 1))
    scores = jnp.where(mask[None, None] if mask.ndim == 2 else mask[:, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v)  # (B, K, G*T, H)
    return out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for incremental decoding; ``length`` positions are filled."""

    keys: list[jax.Array]  # per layer (B, S_max, K, hd)
    values: list[jax.Array]
    length: jax.Array  # int32: a scalar (every example filled alike), or (B,) per example (a batch of prompts of
    # different lengths: each example writes at, and attends up to, its own length)

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32, *,
              per_example: bool = False) -> "KVCache":
        shape = (batch, max_len, config.num_kv_heads, config.head_dim)
        return cls(keys=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
                   values=[jnp.zeros(shape, dtype) for _ in range(config.num_layers)],
                   length=jnp.zeros((batch,) if per_example else (), jnp.int32))


def attention_mask(q_positions_T: jax.Array, num_keys: int, window: int | None) -> jax.Array:
    """(T, S) causal mask of queries at ``q_positions_T`` over keys at positions 0..S-1, within the sliding
    ``window`` when given (a key is seen while ``q - window < k <= q``, as Hugging Face masks it)."""
    k_positions = jnp.arange(num_keys)[None, :]
    mask = k_positions <= q_positions_T[:, None]
    if window is not None:
        mask = mask & (k_positions > q_positions_T[:, None] - window)
    return mask


ATTENTION_IMPLEMENTATIONS = ("auto", "xla")
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)  # what cuDNN's fused attention computes in


def causal_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, *, scale: float | None = None,
                     implementation: str | None = None) -> jax.Array:
    """Plain causal self-attention through ``jax.nn.dot_product_attention`` (grouped-query heads included): with
    ``implementation="cudnn"`` the fused flash-attention kernel of cuDNN, which never holds the (T, S) scores
    (measured in ``experiments/bench_gpu``); ``"xla"`` is the same maths unfused."""
    H = q_BTNH.shape[-1]
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, scale=H ** -0.5 if scale is None else scale,
                                        is_causal=True, implementation=implementation)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, window: int | None = None):
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.window, self.scale, self.softcap = window, c.query_scale, c.attn_softcap
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, rngs=rngs, bias=c.qkv_bias, dtype=dtype)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, rngs=rngs, bias=c.qkv_bias, dtype=dtype)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, rngs=rngs, bias=c.qkv_bias, dtype=dtype)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, rngs=rngs, bias=c.o_bias, dtype=dtype)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, eps=c.rms_eps, offset=c.norm_offset, dtype=dtype)
            self.k_norm = RMSNorm(c.head_dim, eps=c.rms_eps, offset=c.norm_offset, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None
        # Hook for prefix tuning: a module whose call returns (keys, values), each (L, K, hd), that every query
        # attends to before the sequence (used as-is, without RoPE, like Hugging Face's past_key_values prefix),
        # or None while it is disabled; its ``num_tokens`` is L (0 while disabled). As in Hugging Face, the prefix
        # occupies positions 0..L-1, so the sequence's RoPE positions start at L.
        self.prefix = nnx.data(None)
        # "auto": cuDNN's fused attention where it applies (:meth:`fused`), else :func:`gqa_attention`; "xla":
        # always :func:`gqa_attention` (``model.attention`` in a run config; :meth:`LlamaForCausalLM.set_attention`)
        self.implementation = "auto"

    def fused(self, q: jax.Array, cached: bool, prefixed: bool) -> bool:
        """Whether this call runs cuDNN's fused kernel: ``implementation`` "auto" on an NVIDIA GPU, bfloat16 or
        float16 compute, plain causal attention (no KV cache, prefix, sliding window or soft-capping, which the
        einsum path handles)."""
        return (self.implementation == "auto" and not cached and not prefixed and self.window is None
                and self.softcap is None and q.dtype in FUSED_DTYPES and jax.default_backend() == "gpu")

    def _heads(self, proj, norm, x_ND, B, T, heads, key):
        """(B, T, heads, hd) projections, each head RMS-normed when the model has q/k norms."""
        y = proj(x_ND, key)
        if norm is not None:
            y = norm(y.reshape(-1, self.head_dim))
        return y.reshape(B, T, heads, self.head_dim)

    def __call__(self, x_ND, shape_BT, cos, sin, cache_kv=None, cache_length=None, key=None):
        B, T = shape_BT
        q = apply_rope(self._heads(self.q_proj, self.q_norm, x_ND, B, T, self.num_heads, sub_key(key, 0)), cos, sin)
        k = apply_rope(self._heads(self.k_proj, self.k_norm, x_ND, B, T, self.num_kv_heads, sub_key(key, 1)),
                       cos, sin)
        v = self.v_proj(x_ND, sub_key(key, 2)).reshape(B, T, self.num_kv_heads, self.head_dim)
        new_kv = None
        if cache_kv is None:
            mask = attention_mask(jnp.arange(T), T, self.window)
        else:
            ck, cv = cache_kv
            at_B = jnp.broadcast_to(cache_length, (B,))  # each example writes at, and attends up to, its own length
            put = jax.vmap(lambda c, u, at: jax.lax.dynamic_update_slice(c, u.astype(c.dtype), (at, 0, 0)))
            ck, cv = put(ck, k, at_B), put(cv, v, at_B)
            mask = jax.vmap(lambda at: attention_mask(at + jnp.arange(T), ck.shape[1], self.window))(at_B)
            new_kv = (ck, cv)
            k, v = ck.astype(q.dtype), cv.astype(q.dtype)
        prefix = None if self.prefix is None else self.prefix()
        if prefix is not None:
            pk, pv = prefix
            L = pk.shape[0]
            k = jnp.concatenate([jnp.broadcast_to(pk.astype(k.dtype)[None], (B, *pk.shape)), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(pv.astype(v.dtype)[None], (B, *pv.shape)), v], axis=1)
            mask = jnp.concatenate([jnp.ones((*mask.shape[:-1], L), bool), mask], axis=-1)
        if self.fused(q, cache_kv is not None, prefix is not None):
            out = causal_attention(q, k, v, scale=self.scale, implementation="cudnn")
        else:
            out = gqa_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        return self.o_proj(out.reshape(B * T, self.num_heads * self.head_dim), sub_key(key, 3)), new_kv


class MLP(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = config
        self.act = c.hidden_act
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, rngs=rngs, bias=c.mlp_bias, dtype=dtype)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, rngs=rngs, bias=c.mlp_bias, dtype=dtype)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, rngs=rngs, bias=c.mlp_bias, dtype=dtype)

    def __call__(self, x_ND, key=None):
        gated = ACTIVATIONS[self.act](self.gate_proj(x_ND, sub_key(key, 0))) * self.up_proj(x_ND, sub_key(key, 1))
        return self.down_proj(gated, sub_key(key, 2))


class DecoderLayer(nnx.Module):
    """Pre-norm attention and MLP blocks; with ``sandwich_norms`` (Gemma 2 / 3) their outputs are normed too,
    and the Hugging Face names shift: ``post_attention_layernorm`` norms the attention output and
    ``pre_feedforward_layernorm`` / ``post_feedforward_layernorm`` surround the MLP."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, index: int = 0):
        norm = functools.partial(RMSNorm, config.hidden_size, eps=config.rms_eps, offset=config.norm_offset,
                                 dtype=dtype)
        self.local = config.window(index) is not None
        self.input_layernorm = norm()
        self.self_attn = Attention(config, rngs=rngs, dtype=dtype, window=config.window(index))
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, rngs=rngs, dtype=dtype)
        if config.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        else:
            self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None

    def __call__(self, h_ND, shape_BT, cos, sin, cache_kv=None, cache_length=None, key=None):
        """The layer on token rows ``h_ND``, kept split by rows on a mesh (:mod:`peftjax.models.spmd`)."""
        out, new_kv = self._block(constrain_rows(h_ND), shape_BT, cos, sin, cache_kv, cache_length, key)
        return constrain_rows(out), new_kv

    def _block(self, h_ND, shape_BT, cos, sin, cache_kv, cache_length, key):
        attn, new_kv = self.self_attn(self.input_layernorm(h_ND), shape_BT, cos, sin, cache_kv, cache_length,
                                      sub_key(key, 0))
        if self.pre_feedforward_layernorm is None:
            h_ND = h_ND + attn
            return h_ND + self.mlp(self.post_attention_layernorm(h_ND), sub_key(key, 1)), new_kv
        h_ND = h_ND + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(h_ND), sub_key(key, 1))
        return h_ND + self.post_feedforward_layernorm(mlp), new_kv


def recompute_in_backward(fn):
    """``fn(params, x)`` whose backward pass recomputes ``fn``'s activations from ``(params, x)`` instead of keeping
    them (activation checkpointing, Chen et al. 2016).

    ``jax.checkpoint`` does this with optimization barriers, which XLA on CPU drops before it merges common
    subexpressions: the recomputation is then merged back into the forward pass and nothing is saved (measured: the
    same step memory with and without it). Here the backward pass recomputes from ``x + 0 * cotangent[0]``, a value
    the forward pass never had, so the recomputation stays in the backward pass, one layer at a time.
    """
    @jax.custom_vjp
    def call(params, x):
        return fn(params, x)

    def fwd(params, x):
        return fn(params, x), (params, x)

    def bwd(saved, ct):
        params, x = saved
        return jax.vjp(fn, params, after(x, ct))[1](ct)

    call.defvjp(fwd, bwd)
    return call


def _remat_layer(layer, h_ND, shape_BT, cos, sin, key):
    """``layer(h_ND, ...)`` (no cache) with its activations recomputed in the backward pass."""
    graphdef, state = nnx.split(layer)

    def pure(state, h):
        return nnx.merge(graphdef, state)(h, shape_BT, cos, sin, None, None, key)[0]

    return recompute_in_backward(pure)(state, h_ND)


def stack_layers(layers) -> tuple[nnx.GraphDef, nnx.State] | None:
    """(graphdef, state with every leaf stacked on a new leading layer axis) of ``layers`` when they share one
    structure -- the same adapters, quantization formats, shapes and static settings -- else None (layers that
    differ, such as adapters on some layers only or Gemma 3's local and global layers, run one by one).

    The stacked state is a copy made inside the step: the stored model keeps one module per layer, so module
    paths, target rules and checkpoints do not change with scanning.
    """
    if len(layers) < 2:
        return None
    parts = [nnx.split(layer) for layer in layers]
    graphdef = parts[0][0]
    structure = jax.tree.structure(parts[0][1])
    like = [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(parts[0][1])]
    for g, state in parts[1:]:
        if g != graphdef or jax.tree.structure(state) != structure or like != [
                (jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(state)]:
            return None
    return graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *(state for _, state in parts))


def _scan_layers(graphdef, stacked, h_ND, shape_BT, cos, sin, key, remat):
    """The decoder layers as one ``lax.scan`` over their stacked states; layer i draws dropout from
    ``fold_in(key, i)`` as the unrolled loop does. With ``remat`` the body is ``jax.checkpoint``-ed: the forward
    loop keeps only each layer's input and the backward loop recomputes the rest (two loops, so XLA cannot merge
    the recomputation back into the forward pass as it does in the unrolled step)."""
    def body(h, xs):
        state, i = xs
        return nnx.merge(graphdef, state)(h, shape_BT, cos, sin, None, None, sub_key(key, i))[0], None

    count = jax.tree.leaves(stacked)[0].shape[0]
    body = jax.checkpoint(body, prevent_cse=False) if remat else body
    return jax.lax.scan(body, h_ND, (stacked, jnp.arange(count, dtype=jnp.int32)))[0]


class Embedding(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, dim), dtype))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, dtype=dtype, index=i)
                                for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_eps, offset=config.norm_offset, dtype=dtype)
        # An untied output head, (V, D) as Hugging Face stores ``lm_head.weight``; not a Linear, so target rules
        # for linear layers (and QLoRA's quantization, as in bitsandbytes) leave it alone.
        self.lm_head = None if config.tie_embeddings else Embedding(config.vocab_size, config.hidden_size,
                                                                     rngs=rngs, dtype=dtype)
        # Hook for prompt tuning: a module whose call returns (N, D) virtual-token embeddings (or (B, N, D), one set
        # per example) prepended to the input; its ``num_tokens`` is N (0 while it is disabled).
        self.prompt = nnx.data(None)
        # Run the decoder layers as one ``lax.scan`` over their stacked states (one layer compiled, not
        # num_layers) when they are alike; :func:`stack_layers` says when, else the layers run one after another.
        self.scan_layers = False

    def set_attention(self, implementation: str) -> None:
        """Every layer's attention implementation: "auto" (cuDNN's fused kernel where it applies) or "xla"."""
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise PeftjaxError(f"model.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got "
                               f"{implementation!r}")
        for layer in self.layers:
            layer.self_attn.implementation = implementation

    def num_virtual_tokens(self) -> int:
        """Positions that prompt tuning prepends to every sequence (0 without it)."""
        return 0 if self.prompt is None else self.prompt.num_tokens

    def num_prefix_positions(self) -> int:
        """Positions that prefix tuning's keys and values occupy before the sequence (0 without it): the largest
        enabled prefix of any layer (Hugging Face gives every layer the same one)."""
        return max((0 if layer.self_attn.prefix is None else layer.self_attn.prefix.num_tokens
                    for layer in self.layers), default=0)

    def hidden_states(self, ids_BT: jax.Array, *, cache: KVCache | None = None, compute_dtype=jnp.float32,
                      prepend_prompt: bool = True, dropout_key: jax.Array | None = None,
                      remat: bool = False) -> tuple[jax.Array, KVCache | None]:
        """Final normed hidden states as (B*T, D), and the updated cache when one is given.

        With prompt tuning the virtual tokens are prepended (once: decode steps pass ``prepend_prompt=False``),
        attended to, and dropped from the returned states, so they line up with ``ids_BT``. ``dropout_key`` is
        the call's randomness (adapter dropout; layer i gets ``fold_in(key, i)``). ``remat`` recomputes each
        decoder layer's activations in the backward pass (:func:`recompute_in_backward`: only the layer inputs
        are kept).
        """
        B, T_in = ids_BT.shape
        n_virtual = self.num_virtual_tokens() if prepend_prompt else 0
        n_prefix = self.num_prefix_positions()
        T = n_virtual + T_in
        if n_prefix + T > self.config.max_position:
            prefix = f"{n_prefix} prefix + " if n_prefix else ""
            raise PeftjaxError(f"{prefix}{n_virtual} virtual prompt tokens + {T_in} input tokens exceed the context "
                               f"of {self.config.max_position}; shorten the input or use fewer virtual tokens")
        start = jnp.zeros((), jnp.int32) if cache is None else cache.length  # first free cache slot
        positions = n_prefix + jnp.broadcast_to(start, (B,))[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        c = self.config
        rope = {False: rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling, max_position=c.max_position)}
        if c.local_rope_theta is not None:  # Gemma 3: sliding-window layers rotate with their own base, unscaled
            rope[True] = rope_cos_sin(positions, c.head_dim, c.local_rope_theta, max_position=c.max_position)
        h = self.embed_tokens(ids_BT.reshape(B * T_in)).astype(compute_dtype)
        if c.embed_scale:
            h = h * jnp.asarray(c.hidden_size ** 0.5, compute_dtype)
        if n_virtual:
            virtual = jnp.broadcast_to(batched(self.prompt()).astype(compute_dtype), (B, n_virtual, h.shape[-1]))
            h = jnp.concatenate([virtual, h.reshape(B, T_in, -1)], axis=1).reshape(B * T, -1)
        stacked = None if cache is not None or not self.scan_layers else stack_layers(self.layers)
        if stacked is not None:
            h = _scan_layers(*stacked, h, (B, T), *rope.get(self.layers[0].local, rope[False]), dropout_key, remat)
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers if stacked is None else ()):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            cos, sin = rope.get(layer.local, rope[False])
            if remat and cache is None:
                h, new_kv = _remat_layer(layer, h, (B, T), cos, sin, sub_key(dropout_key, i)), None
            else:
                h, new_kv = layer(h, (B, T), cos, sin, kv, start, sub_key(dropout_key, i))
            if new_kv is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        new_cache = None if cache is None else KVCache(new_keys, new_values, cache.length + T)
        if n_virtual:
            h = h.reshape(B, T, -1)[:, n_virtual:].reshape(B * T_in, -1)
        return self.norm(h), new_cache

    def head_weight(self) -> jax.Array:
        """The output head as stored, (V, D): the embedding of a tied model."""
        return (self.embed_tokens if self.lm_head is None else self.lm_head).weight[...]

    def logits(self, h_ND: jax.Array) -> jax.Array:
        """h @ W_head^T in ``h``'s dtype, returned in float32 (soft-capped, c tanh(z / c), when the model caps)."""
        z = (h_ND @ self.head_weight().astype(h_ND.dtype).T).astype(jnp.float32)
        cap = self.config.final_softcap
        return z if cap is None else jnp.tanh(z / cap) * cap

    def __call__(self, ids_BT: jax.Array, *, cache: KVCache | None = None, compute_dtype=jnp.float32,
                 prepend_prompt: bool = True, dropout_key: jax.Array | None = None):
        """Logits (B, T, V) in float32 (and the new cache when decoding with one)."""
        B, T = ids_BT.shape
        h, new_cache = self.hidden_states(ids_BT, cache=cache, compute_dtype=compute_dtype,
                                          prepend_prompt=prepend_prompt, dropout_key=dropout_key)
        logits = self.logits(h).reshape(B, T, -1)
        return logits if cache is None else (logits, new_cache)


def tiny_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random-weight :meth:`LlamaConfig.tiny` model (``model.name: tiny`` in a run config): the real model's code
    paths at a size that compiles and trains in seconds, for tests, examples and quick experiments."""
    return LlamaForCausalLM(LlamaConfig.tiny(**overrides), rngs=nnx.Rngs(seed))
