"""Cross-entropy through the output head, a chunk of tokens at a time: the (N, V) logits never exist at once.

For final hidden states h (N, D), head weight W (V, D), targets t and per-token weights m,

    loss = sum_n m_n * (logsumexp_v(h_n . W_v) - h_n . W_{t_n})
    dloss/dh_n = m_n * (softmax(h_n W^T) - onehot(t_n)) W            dloss/dW = sum_n m_n (softmax - onehot)^T h_n

A head stored in another dtype than the compute dtype (a bfloat16 base computed in float32) is converted a slice of
8,192 (or another divisor of V) rows at a time, never as a whole.

A 49,152-word vocabulary makes the logits of 4 x 1024 tokens 805 MB in float32, and autodiff keeps them (and their
gradient) for the backward pass. Here a ``lax.scan`` over chunks of ``chunk`` tokens computes each chunk's logits,
its loss and, in the forward pass of a differentiated call, its gradients: what the backward pass keeps is dh (N, D)
and, only when the head itself is trained, dW (V, D). Nothing is computed twice (forward logits 2NDV FLOPs, dh 2NDV,
dW 2NDV only for a trained head), so this costs what the unchunked loss costs, in memory of one chunk's logits.
Whether W is differentiated is read from the call (``symbolic_zeros``), not declared.

With final-logit soft-capping (Gemma 2) the logits are s = c tanh(z / c), and the gradients pass through
ds/dz = 1 - (s / c)^2.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.models.matmul import product_f32
from peftjax.models.spmd import constrain_rows, row_ways


class _Chunking:
    """Token rows (N, ...) as (n_chunks, rows per chunk, ...) and back. On one device chunk i is rows
    [i C, (i + 1) C). When the rows are split W ways over a mesh (:func:`peftjax.models.spmd.row_ways`), chunk i
    takes C / W rows from each device's own N / W rows (the i-th run of them): a step of the loop still covers C
    rows, but every device holds and works on its share of them, whatever the layout of the head. (Consecutive
    global chunks would give each step one device's rows, to be gathered or waited for; chunks of C rows per device
    would make an FSDP step, whose head is split along the width, sum partial logits of W C rows.)"""

    def __init__(self, n: int, chunk: int):
        ways = row_ways()
        self.ways = ways if ways > 1 and n % ways == 0 else 1
        self.n, self.local = n, n // self.ways
        self.chunk = min(max(chunk // self.ways, 1), self.local)
        self.n_chunks = -(-self.local // self.chunk)

    def split(self, x):
        """``x`` (N, ...) zero-padded per device, as (n_chunks, W C', ...)."""
        rest = x.shape[1:]
        x = x.reshape(self.ways, self.local, *rest)
        x = jnp.pad(x, [(0, 0), (0, self.n_chunks * self.chunk - self.local)] + [(0, 0)] * len(rest))
        x = x.reshape(self.ways, self.n_chunks, self.chunk, *rest).swapaxes(0, 1)
        return constrain_rows(x.reshape(self.n_chunks, self.ways * self.chunk, *rest), axis=1)

    def join(self, x):
        """The inverse of :meth:`split` for (n_chunks, W C', ...) results: (N, ...)."""
        rest = x.shape[2:]
        x = x.reshape(self.n_chunks, self.ways, self.chunk, *rest).swapaxes(0, 1)
        return x.reshape(self.ways, self.n_chunks * self.chunk, *rest)[:, :self.local].reshape(self.n, *rest)


def vocab_chunk(vocab: int, target: int = 8192) -> int:
    """The largest divisor of ``vocab`` not above ``target`` (one chunk when only small divisors exist)."""
    best = max((d for d in range(1, min(vocab, target) + 1) if vocab % d == 0), default=vocab)
    return best if best >= 1024 or best == vocab else vocab


def _chunk_terms(h_CD, t_C, m_C, head_slice, nv: int, with_dh: bool, with_dw: bool, softcap: float | None):
    """One token chunk: (summed loss, dh (C, D) or None, [dW slice (vc, D)] or None). ``head_slice(j, dep)`` gives
    vocabulary slice j of the head in h's dtype; ``dep`` is a float32 scalar from the work before it (see _scan)."""
    C = h_CD.shape[0]
    parts, dep = [], h_CD[0, 0].astype(jnp.float32)
    for j in range(nv):
        parts.append(product_f32(h_CD, head_slice(j, dep).T))
        dep = parts[-1][0, 0]
    logits = jnp.stack(parts)  # (nv, C, vc)
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    vc = logits.shape[2]
    lse = jax.nn.logsumexp(logits, axis=(0, 2))
    rows = jnp.arange(C)
    picked = logits[t_C // vc, rows, t_C % vc]
    total = jnp.sum((lse - picked) * m_C)
    if not (with_dh or with_dw):
        return total, None, None
    g = jnp.exp(logits - lse[None, :, None]).at[t_C // vc, rows, t_C % vc].add(-1.0) * m_C[None, :, None]
    if softcap is not None:
        g = g * (1.0 - jnp.square(logits / softcap))
    g = g.astype(h_CD.dtype)
    dh, dw, dep = None, [], total
    for j in range(nv):
        if with_dh:
            d = product_f32(g[j], head_slice(j, dep))
            dh = d if dh is None else dh + d
            dep = dh[0, 0].astype(jnp.float32)
        if with_dw:
            dw.append(jnp.matmul(g[j].T, h_CD, preferred_element_type=jnp.float32))
    dh = None if dh is None else dh.astype(h_CD.dtype)  # summed over the vocabulary slices in float32
    return total, dh, (dw if with_dw else None)


def _scan(h_ND, w_VD, targets_N, weights_N, chunk: int, softcap: float | None, with_dh: bool, with_dw: bool):
    V = w_VD.shape[0]
    chunking = _Chunking(h_ND.shape[0], chunk)
    n_chunks = chunking.n_chunks
    xs = (chunking.split(h_ND), chunking.split(targets_N), chunking.split(weights_N.astype(jnp.float32)))
    dw0 = jnp.zeros(w_VD.shape if with_dw else (0,), jnp.float32)

    if w_VD.dtype == h_ND.dtype:  # the head as it is, one slice; a loop over the token chunks
        def body(carry, x):
            total, dw = carry
            t, dh, dws = _chunk_terms(*x, lambda j, dep: w_VD, 1, with_dh, with_dw, softcap)
            return (total + t, dw + dws[0] if with_dw else dw), dh

        (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), xs)
    else:
        # A head stored in another dtype (bfloat16 under float32 compute) is converted one vocabulary slice at a time.
        # Not in a loop: XLA on CPU widens every bfloat16 array a loop carries to float32, a float32 copy of the head.
        # Unrolled, each slice's start index adds a zero made from the result of the matmul before it (a chain through
        # every chunk and slice), so XLA converts each slice just before its matmul and frees it after, instead of
        # converting them all at the start (a product with zero is not simplified away for floats).
        vc = vocab_chunk(V)

        def head_slice(j, dep):  # the start index carries the zero: slice and conversion fuse into one pass
            start = j * vc + (dep * 0).astype(jnp.int32)
            return jax.lax.dynamic_slice_in_dim(w_VD, start, vc).astype(h_ND.dtype)

        total, dw, dh = jnp.zeros((), jnp.float32), dw0, []
        for i in range(n_chunks):
            x = (xs[0][i] + (total * 0).astype(h_ND.dtype), xs[1][i], xs[2][i])  # chunk i after chunk i - 1
            t, dh_i, dws = _chunk_terms(*x, head_slice, V // vc, with_dh, with_dw, softcap)
            total = total + t
            dh.append(dh_i)
            if with_dw:
                dw = dw + jnp.concatenate(dws)
        dh = jnp.stack(dh) if with_dh else None
    if with_dh:
        dh = chunking.join(dh)
    return total, dh, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h_ND, w_VD, targets_N, weights_N, chunk, softcap):
    return _scan(h_ND, w_VD, targets_N, weights_N, chunk, softcap, False, False)[0]


def _fused_fwd(h_ND, w_VD, targets_N, weights_N, chunk, softcap):
    with_dh, with_dw = h_ND.perturbed, w_VD.perturbed
    total, dh, dw = _scan(h_ND.value, w_VD.value, targets_N.value, weights_N.value, chunk, softcap, with_dh, with_dw)
    return total, (dh, dw.astype(w_VD.value.dtype) if with_dw else None, targets_N.value, weights_N.value)


def _fused_bwd(chunk, softcap, res, g):
    dh, dw, targets_N, weights_N = res
    scaled = lambda d: None if d is None else (g * d.astype(jnp.float32)).astype(d.dtype)  # noqa: E731
    return scaled(dh), scaled(dw), np.zeros(targets_N.shape, jax.dtypes.float0), jnp.zeros_like(weights_N)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def head_cross_entropy(h_ND: jax.Array, w_VD: jax.Array, targets_N: jax.Array, weights_N: jax.Array | None = None,
                       *, chunk: int = 256, softcap: float | None = None) -> jax.Array:
    """sum_n weights_n * CE(h_n W^T, targets_n) in float32, computed ``chunk`` tokens at a time (module docstring).

    ``w_VD`` is the output head (the embedding of a tied model); logits are ``h @ W^T`` in ``h``'s dtype, then
    float32 (then ``softcap`` tanh(z / softcap) when given), as :meth:`peftjax.models.LlamaForCausalLM.logits`
    computes them."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if weights_N is None:
        weights_N = jnp.ones(targets_N.shape, jnp.float32)
    return _fused(h_ND, w_VD, targets_N.astype(jnp.int32), weights_N.astype(jnp.float32),
                  min(chunk, h_ND.shape[0]), softcap)


__all__ = ["head_cross_entropy"]
