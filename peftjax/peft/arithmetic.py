"""Adapter arithmetic: one LoRA adapter from a weighted combination of several (task arithmetic on adapters).

On one layer, adapters k = 1..K have factors A_k (d_in, r_k), B_k (r_k, d_out), scales s_k; the user gives weights
w_k (negative ones subtract). The combined adapter has scale 1 and, by ``method``:

    cat      A = [w_1 s_1 A_1 | ... | w_K s_K A_K],  B = [B_1; ...; B_K]:  A B = sum_k w_k s_k A_k B_k exactly
             (rank sum_k r_k).
    svd      the top-r singular directions of dW = sum_k w_k s_k A_k B_k (Eckart-Young: the best rank-r
             approximation); A = V_r (orthonormal), B = S_r U_r^T in the (d_in, d_out) layout.
    linear, ties, dare_linear, dare_ties, magnitude_prune: the merge below is applied to the factors, not to their
             product (all r_k equal): A = merge_k(sign(w_k s_k) sqrt|w_k s_k|, A_k), B = merge_k(sqrt|w_k s_k|, B_k).
             A B is then sum_k w_k s_k A_k B_k plus cross terms A_j B_k: cheap, and only an approximation.
    ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the merge applied to the dense dW_k = s_k A_k B_k
             with weights w_k, then the top-r SVD as in ``svd``.

These are Hugging Face PEFT's ``add_weighted_adapter`` combination types with its conventions, so the same adapters
give the same combined adapter. Merges of tensors t_k with weights w_k:

    task arithmetic (Ilharco et al. 2023)   sum_k w_k t_k
    magnitude_prune                        sum_k w_k top_p(t_k); top_p keeps the int(p * size) entries largest in
                                           |t| (p = ``density``) and zeroes the rest
    TIES (Yadav et al. 2023)               t'_k = top_p(t_k); elected sign g = sign(sum_k t'_k) ("total") or
                                           sign(sum_k sign(t'_k)) ("frequency"), 0 counting as +; the result is
                                           sum_k w_k t'_k [sign t'_k = g] / max(1, #{k : sign t'_k = g})
    DARE (Yu et al. 2024)                  t'_k = m_k * t_k / p with m_k ~ Bernoulli(p) elementwise; dare_linear is
                                           task arithmetic on t'_k, dare_ties TIES's sign election and disjoint
                                           mean on t'_k
"""
from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.peft.lora import lora_weight

FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DELTAWISE = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("cat",) + FACTORWISE + DELTAWISE


def merge_kind(method: str) -> str:
    """The tensor merge a combination method applies: task_arithmetic, magnitude_prune, ties, dare_linear or
    dare_ties (``cat`` concatenates instead)."""
    kind = method.removesuffix("_svd")
    return "task_arithmetic" if kind in ("linear", "svd") else kind


def prunes(method: str) -> bool:
    return merge_kind(method) in ("magnitude_prune", "ties", "dare_linear", "dare_ties")


def elects_sign(method: str) -> bool:
    return merge_kind(method) in ("ties", "dare_ties")


def is_dare(method: str) -> bool:
    return merge_kind(method).startswith("dare")


def keep_largest(t: jax.Array, density: float) -> jax.Array:
    """``t`` with all but its int(density * size) largest-magnitude entries set to zero."""
    if density >= 1:
        return t
    k = int(density * t.size)
    _, index = jax.lax.top_k(jnp.abs(t).ravel(), k)
    keep = jnp.zeros(t.size, bool).at[index].set(True).reshape(t.shape)
    return jnp.where(keep, t, jnp.zeros_like(t))


def dare_drop(t: jax.Array, mask: jax.Array, density: float) -> jax.Array:
    """DARE's drop-and-rescale: m * t / p (the identity at p = 1)."""
    if density >= 1:
        return t
    return t * mask.astype(t.dtype) / density


def disjoint_mean(ts_K: jax.Array, weights_K: jax.Array, sign_method: str) -> jax.Array:
    """TIES's elected-sign mean: entries agreeing with the elected sign, weighted, averaged over their count."""
    signs = jnp.sign(ts_K)
    votes = ts_K.sum(axis=0) if sign_method == "total" else signs.sum(axis=0)
    agree = signs == jnp.where(votes >= 0, 1.0, -1.0)[None]
    weighted = ts_K * weights_K.reshape((-1,) + (1,) * (ts_K.ndim - 1))
    return jnp.sum(weighted * agree, axis=0) / jnp.maximum(agree.sum(axis=0), 1).astype(ts_K.dtype)


@functools.partial(jax.jit, static_argnames=("kind", "density", "sign_method"))  # one compile per kind and shapes
def merge_tensors(kind: str, ts: Sequence[jax.Array], weights: Sequence[float], *, density: float | None = None,
                  sign_method: str = "total", masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """One tensor from tensors ``ts`` and ``weights`` by merge ``kind`` (see the module docstring)."""
    w_K = jnp.asarray(weights, jnp.float32)
    if kind in ("magnitude_prune", "ties"):
        ts = [keep_largest(t, density) for t in ts]
    elif kind in ("dare_linear", "dare_ties"):
        ts = [dare_drop(t, m, density) for t, m in zip(ts, masks)]
    ts_K = jnp.stack(ts)
    if kind in ("ties", "dare_ties"):
        return disjoint_mean(ts_K, w_K, sign_method)
    return jnp.tensordot(w_K, ts_K, axes=1)


@functools.partial(jax.jit, static_argnames="rank")
def svd_truncate(dw_DO: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """(A, B) with A B the best rank-r approximation of dW: A = V_r (d_in, r) orthonormal, B = S_r U_r^T, i.e. the
    singular values on B, as HF PEFT stores them (its lora_B = U S, lora_A = V^T on the (d_out, d_in) weight)."""
    u, s, vt = jnp.linalg.svd(dw_DO.T.astype(jnp.float32), full_matrices=False)  # the (d_out, d_in) weight
    return vt[:rank].T, (u[:, :rank] * s[:rank][None, :]).T


def dare_mask(seed: int, path: str, adapter: str, part: str, shape: tuple[int, ...], density: float) -> np.ndarray:
    """DARE's keep-mask for one tensor: Bernoulli(density), drawn from the seed and the tensor's name only."""
    stream = zlib.crc32(f"{path}:{adapter}:{part}".encode())
    return np.random.default_rng([seed, stream]).random(shape) < density


_lora_weight = jax.jit(lora_weight)


def combine_layer(path: str, parts: Sequence[tuple[str, float, jax.Array, jax.Array, float]], method: str, *,
                  rank: int | None, density: float | None, sign_method: str, seed: int,
                  masks: Mapping[tuple[str, str, str], jax.Array] | None) -> tuple[jax.Array, jax.Array]:
    """(A, B) of the combined adapter (scale 1) on layer ``path`` from ``parts`` = (name, weight, A, B, scale)."""

    def mask_list(part: str, shapes) -> list[jax.Array] | None:
        if not is_dare(method):
            return None
        found = []
        for (name, *_), shape in zip(parts, shapes):
            if masks is None:
                found.append(dare_mask(seed, path, name, part, shape, density))
                continue
            if (path, name, part) not in masks:
                raise PeftjaxError(f"masks has no entry {(path, name, part)!r}; give one keep-mask per layer, "
                                   f"adapter and part ({'lora_a, lora_b' if part != 'delta' else 'delta'})")
            mask = jnp.asarray(masks[(path, name, part)])
            if mask.shape != shape:
                raise PeftjaxError(f"mask {(path, name, part)!r} has shape {mask.shape}, the tensor {shape}")
            found.append(mask)
        return found

    kind = merge_kind(method)
    if method == "cat":
        a = jnp.concatenate([a * (w * s) for _, w, a, _, s in parts], axis=1)
        return a, jnp.concatenate([b for *_, b, _ in parts], axis=0)
    if method in FACTORWISE:
        ranks = {a.shape[1] for _, _, a, _, _ in parts}
        if len(ranks) > 1:
            raise PeftjaxError(f"method {method!r} combines the factors and needs adapters of one rank; {path} has "
                               f"ranks {sorted(ranks)} (use 'cat' or 'svd' for different ranks)")
        signed = [(1.0 if w * s >= 0 else -1.0) * abs(w * s) ** 0.5 for _, w, _, _, s in parts]
        a = merge_tensors(kind, [a for _, _, a, _, _ in parts], signed, density=density, sign_method=sign_method,
                          masks=mask_list("lora_a", [p[2].shape for p in parts]))
        b = merge_tensors(kind, [b for _, _, _, b, _ in parts], [abs(x) for x in signed], density=density,
                          sign_method=sign_method, masks=mask_list("lora_b", [p[3].shape for p in parts]))
        return a, b
    deltas = [_lora_weight(a, b, s) for _, _, a, b, s in parts]
    dw = merge_tensors(kind, deltas, [w for _, w, *_ in parts], density=density, sign_method=sign_method,
                       masks=mask_list("delta", [d.shape for d in deltas]))
    r = rank or max(a.shape[1] for _, _, a, _, _ in parts)
    if r > min(dw.shape):
        raise PeftjaxError(f"rank {r} is larger than {path} allows (min(d_in, d_out) = {min(dw.shape)})")
    return svd_truncate(dw, r)
