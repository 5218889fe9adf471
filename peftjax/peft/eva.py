"""EVA, explained variance adaptation (Paischer et al. 2024): a data-driven LoRA init.

    result = eva_init(base_model, batches, LoRAConfig(init="eva", rank=8))   # result.model, result.ranks

The base model runs on a few batches of the training data; the input x of every LoRA target is reduced, batch by
batch, to its statistics (token count, mean, and the centred scatter matrix sum (x - mean)(x - mean)^T, in float32,
merged across batches by Chan's pairwise update: never the activations themselves). The principal directions of a
layer's inputs (the eigenvectors of the scatter matrix, i.e. the right singular vectors of the centred stacked
inputs, as Hugging Face PEFT's incremental PCA) become the rows of A, and B = 0, so training starts at the base.

Rank redistribution (``eva_rho`` >= 1): each layer may take up to round(rho * r) components, from one pool of
sum(r) ranks (n_layers * r for a uniform rank) awarded to the largest explained-variance ratios (eigenvalue /
trace) over all layers; ties go to the layer the forward calls first (of q / k / v, which read one input, q: as
Hugging Face PEFT, which gives a group's first layer the largest share). Every layer is then built at its own
allotted rank (a layer allotted 0 stays the plain base layer), so training is the ordinary jitted LoRA step and an
HF export carries the ranks as ``rank_pattern``. With ``eva_adjust_scaling`` (HF's default) alpha becomes
alpha * r_new / r, so every layer keeps the scale alpha / r whatever its rank.

Batches are read until the leading components settle: after each batch from the second on, the components that
the current allocation uses are compared with the previous batch's; when each has |cos| >= ``eva_tau`` for every
layer, or after ``eva_batches`` batches, reading stops. These per-batch estimates are cheap (block subspace
iteration warm-started from the previous batch's, then Rayleigh-Ritz); the components and ratios EVA uses come
from one exact float64 eigendecomposition per input at the end. Projections that read the same tensor (q / k / v, gate /
up) share one set of statistics (found while tracing: the same traced input).

The layer inputs are taken by swapping each target for a recording wrapper of its base layer in a clone of the
model (the adapters are not there yet, so this is the base forward whatever the format of its weights: EVA works on
a quantized base alike); one jitted function returns a batch's statistics.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.bert import BertModel
from peftjax.models.llama import Linear
from peftjax.peft.hf_format import adapter_modules
from peftjax.peft.lora import LoRAConfig, LoRALinear
from peftjax.peft.registry import apply
from peftjax.rules import modules_of_type, set_at_path

_TAPE: list | None = None  # (path, input) of each tapped layer, filled while a forward is traced


@contextlib.contextmanager
def _recording():
    global _TAPE
    previous, _TAPE = _TAPE, []
    try:
        yield _TAPE
    finally:
        _TAPE = previous


class _Tap(nnx.Module):
    """A base linear layer that records its input (while :func:`_recording` is on) and computes as the base."""

    def __init__(self, base, path: str):
        self.base = base
        self.path = path

    def __call__(self, x, key=None):
        if _TAPE is not None:
            _TAPE.append((self.path, x))
        return self.base(x, key)


@dataclasses.dataclass
class EvaResult:
    model: nnx.Module  # the LoRA model, each target at its allotted rank (0: left as its base layer)
    ranks: dict[str, int]  # {target path: allotted rank}, in the order the forward calls the targets
    ratios: dict[str, np.ndarray]  # {target path: explained-variance ratios of its first max_components components}
    components: dict[str, np.ndarray]  # {target path: (max_components, d_in) principal directions, rows unit}
    batches: int  # batches read
    tokens: int  # tokens (positions with mask 1) in the statistics
    converged: bool  # every used component reached |cos| >= tau before the batches ran out


def _as_batch(batch) -> tuple[np.ndarray, np.ndarray]:
    """(ids (B, T) int32, mask (B, T) float32) from a token block or a (tokens, mask) pair."""
    ids, mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2:
        raise PeftjaxError(f"EVA batches are (batch, tokens) id blocks, got shape {ids.shape}")
    mask = np.ones(ids.shape, np.float32) if mask is None else np.asarray(mask, np.float32)
    if mask.shape != ids.shape:
        raise PeftjaxError(f"EVA batch mask {mask.shape} does not match its tokens {ids.shape}")
    return ids, mask


_ALIASES: dict = {}  # {graphdef: {target path: path of the first target that read the same traced input}}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_statistics(graphdef, is_encoder: bool, state, ids, mask):
    """{source path: (count, mean, centred scatter)} of one batch; compiled once per tapped model structure (tracing
    records which targets read the same input in ``_ALIASES[graphdef]``)."""
    aliases = _ALIASES.setdefault(graphdef, {})
    model = nnx.merge(graphdef, state)
    with _recording() as tape:
        if is_encoder:
            model(ids, attention_mask=mask)
        else:
            model(ids)  # only the taps' statistics are returned: XLA drops the unused logits
    w = mask.reshape(-1)
    n = jnp.sum(w)
    out, first = {}, []
    for path, x in tape:
        same = next((p for p, seen in first if seen is x), None)  # q/k/v, gate/up: one traced input
        aliases[path] = same or path
        if same is not None:
            continue
        first.append((path, x))
        x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        if x.shape[0] != w.shape[0]:
            raise PeftjaxError(f"EVA: {path} sees {x.shape[0]} positions for {w.shape[0]} tokens")
        mean = (w @ x) / jnp.maximum(n, 1.0)
        xc = (x - mean[None, :]) * w[:, None]
        out[path] = (n, mean, xc.T @ xc)
    return out


@jax.jit
def _merge(a, b):
    """Chan's pairwise merge of (count, mean, centred scatter) statistics."""
    def one(sa, sb):
        na, ma, m2a = sa
        nb, mb, m2b = sb
        n = na + nb
        delta = mb - ma
        frac = jnp.where(n > 0, nb / jnp.maximum(n, 1.0), 0.0)
        return n, ma + delta * frac, m2a + m2b + jnp.outer(delta, delta) * na * frac

    return {k: one(a[k], b[k]) for k in a}


def _principal(scatter: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the top-k eigenvectors as rows, sign fixed: largest |entry| positive; explained-variance ratios)."""
    m = np.asarray(scatter, np.float64)
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    order = np.argsort(values)[::-1][:k]
    v = vectors[:, order].T
    values = np.clip(values[order], 0.0, None)
    signs = np.sign(v[np.arange(len(v)), np.argmax(np.abs(v), axis=1)])
    total = np.trace(m)
    return v * signs[:, None], values / total if total > 0 else np.zeros_like(values)


def _ritz(scatter: np.ndarray, start: np.ndarray, iters: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top components as rows, explained-variance ratios, the block to start from next time) by ``iters`` steps of
    block subspace iteration from ``start`` (d, b) and a Rayleigh-Ritz step: the cheap per-batch estimate that the
    convergence test reads (an exact eigendecomposition of a 1536-wide scatter matrix takes seconds)."""
    m = np.asarray(scatter, np.float64)
    q = start
    for _ in range(iters):
        q, _ = np.linalg.qr(m @ q)
    values, vectors = np.linalg.eigh(q.T @ m @ q)
    order = np.argsort(values)[::-1]
    block = q @ vectors[:, order]
    total = np.trace(m)
    return block.T, np.clip(values[order], 0.0, None) / (total if total > 0 else 1.0), block


def _settled(now: np.ndarray, before: np.ndarray, k: int, tau: float) -> bool:
    """The first ``k`` components moved by at most tau: |cos| >= tau between this and the previous estimate."""
    return bool(np.all(np.abs(np.sum(now[:k] * before[:k], axis=1)) >= tau))


def allocate(ratios: dict[str, np.ndarray], budget: int) -> dict[str, int]:
    """{path: rank}: the ``budget`` largest ratios over all layers (each layer's ratios descending), ties to the
    earlier layer in ``ratios``' order, then to the earlier component."""
    paths = list(ratios)
    values = np.concatenate([ratios[p] for p in paths])
    layer = np.concatenate([np.full(len(ratios[p]), i) for i, p in enumerate(paths)])
    comp = np.concatenate([np.arange(len(ratios[p])) for p in paths])
    chosen = np.lexsort((comp, layer, -values))[:budget]
    counts = np.bincount(layer[chosen], minlength=len(paths))
    return {p: int(counts[i]) for i, p in enumerate(paths)}


def eva_init(model: nnx.Module, batches: Iterable, config: LoRAConfig) -> EvaResult:
    """A new model with LoRA applied by EVA from ``batches`` (token blocks (B, T), or (tokens, mask) pairs whose
    mask is 1 at the positions to count); ``model`` is the base, left untouched (as ``peft.apply``)."""
    if not isinstance(config, LoRAConfig) or config.init != "eva":
        raise PeftjaxError("eva_init takes a LoRAConfig with init='eva'")
    plain = dataclasses.replace(config, init="default")
    adapted = apply(model, plain)  # the targets, their ranks and alphas (rank_pattern, layers_to_transform)
    layers = adapter_modules(adapted, LoRALinear)
    tapped = nnx.clone(model)
    bases = modules_of_type(tapped, Linear)
    for path in layers:
        set_at_path(tapped, path, _Tap(bases[path], path))
    if hasattr(tapped, "scan_layers"):
        tapped.scan_layers = False  # the taps record per layer, outside any scan
    graphdef, state = nnx.split(tapped)
    is_encoder = isinstance(model, BertModel)

    cap = {p: min(m.d_in, m.d_out) for p, m in layers.items()}
    max_comp = {p: min(round(m.rank * config.eva_rho), cap[p]) for p, m in layers.items()}
    budget = sum(m.rank for m in layers.values())
    total, used, ranks, converged = None, 0, dict(max_comp), False
    previous: dict[str, np.ndarray] = {}
    blocks: dict[str, np.ndarray] = {}
    comps: dict[str, np.ndarray] = {}
    ratios: dict[str, np.ndarray] = {}
    for batch in batches:
        if used >= config.eva_batches:
            break
        ids, mask = _as_batch(batch)
        one = _batch_statistics(graphdef, is_encoder, state, jnp.asarray(ids), jnp.asarray(mask))
        aliases = _ALIASES[graphdef]
        total = one if total is None else _merge(total, one)
        used += 1
        if used == 1:
            if set(aliases) != set(layers):
                missing = sorted(set(layers) - set(aliases))
                raise PeftjaxError(f"EVA: the forward never called {', '.join(missing[:3])}; EVA needs every target "
                                   "to run in the model's forward pass")
            layers = {p: layers[p] for p in aliases}  # the order the forward calls them (q, k, v, o, gate, ...)
        need = {}  # components per source: the most any layer reading it may take (HF: the group's maximum)
        for p in layers:
            need[aliases[p]] = max(need.get(aliases[p], 0), max_comp[p])
        max_comp = {p: min(need[aliases[p]], cap[p]) for p in layers}
        if used == config.eva_batches:
            break  # the last batch: no estimate needed, the exact decomposition follows
        for src, k in need.items():  # estimates for the convergence test, warm-started from the last batch's
            d = total[src][2].shape[0]
            start = blocks.get(src)
            if start is None:
                start = np.random.default_rng(0).standard_normal((d, min(2 * k, d)))
            comps[src], ratios[src], blocks[src] = _ritz(total[src][2], start, 4 if src in blocks else 12)
        ranks = allocate({p: ratios[aliases[p]][:max_comp[p]] for p in layers}, budget)
        if previous and all(_settled(comps[src], previous[src], max(ranks[p] for p in layers if aliases[p] == src),
                                     config.eva_tau) for src in need):
            converged = True
            break
        previous = {s: c.copy() for s, c in comps.items()}
    if total is None:
        raise PeftjaxError("EVA got no batches: pass at least one (batch, tokens) block of token ids")
    for src, k in need.items():  # exact: the top eigenvectors of each source's scatter matrix
        comps[src], ratios[src] = _principal(total[src][2], k)
    ranks = allocate({p: ratios[aliases[p]][:max_comp[p]] for p in layers}, budget)
    tokens = int(np.asarray(next(iter(total.values()))[0]))
    if tokens < max(max_comp.values()):
        raise PeftjaxError(f"EVA read only {tokens} tokens for up to {max(max_comp.values())} components per "
                           "layer; give it more data (peft.eva_batches, train.batch_size) or a lower rank / eva_rho")

    new = eva_model(model, config, ranks, {p: comps[aliases[p]][:ranks[p]] for p in layers})
    return EvaResult(model=new, ranks=ranks, ratios={p: ratios[aliases[p]][:max_comp[p]] for p in layers},
                     components={p: comps[aliases[p]][:max_comp[p]] for p in layers}, batches=used, tokens=tokens,
                     converged=converged)


def eva_model(model: nnx.Module, config: LoRAConfig, ranks: dict[str, int],
              components: dict[str, np.ndarray]) -> nnx.Module:
    """A new model with LoRA applied as EVA allots it: each target ``path`` at rank ``ranks[path]`` (0: left as its
    base layer) with A = ``components[path]`` ((rank, d_in) rows, the principal directions) and B = 0; alpha scaled by
    rank / r with ``eva_adjust_scaling``. ``model`` is the base, left untouched."""
    new = apply(model, dataclasses.replace(config, init="default"))
    layers = adapter_modules(new, LoRALinear)
    unknown = sorted(set(ranks) - set(layers))
    if unknown:
        raise PeftjaxError(f"EVA ranks name {unknown[0]}, which this config does not adapt")
    key = jax.random.key(config.seed)
    for path, layer in layers.items():
        k = ranks.get(path, 0)
        if k == 0:
            set_at_path(new, path, layer.base)
            continue
        alpha = layer.alpha * k / layer.rank if config.eva_adjust_scaling else layer.alpha
        built = LoRALinear(layer.base, rank=k, alpha=alpha, rslora=config.rslora, key=key, init="default",
                           dropout=config.dropout, qat=layer.qat, variant=layer.variant, freeze_a=config.freeze_a)
        built.lora_a.set_value(jnp.asarray(np.asarray(components[path])[:k].T, jnp.float32))
        set_at_path(new, path, built)
    return new


def save_eva(path, result: EvaResult, fingerprint: str) -> None:
    """Keep an EVA initialisation (ranks and A of every target) in ``path`` (.npz, written atomically), so a run's
    resumption and ``load_run`` rebuild its model without reading data again (:func:`load_eva`)."""
    import json
    import os
    from pathlib import Path

    path = Path(path)
    meta = {"fingerprint": fingerprint, "ranks": result.ranks, "batches": result.batches, "tokens": result.tokens}
    arrays = {f"a{i}": np.asarray(result.components[p][:k], np.float32)
              for i, (p, k) in enumerate(result.ranks.items())}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    os.replace(tmp, path)


def load_eva(path, fingerprint: str) -> tuple[dict[str, int], dict[str, np.ndarray], dict] | None:
    """(ranks, components, meta) kept by :func:`save_eva` for the same ``fingerprint`` (the config and data EVA
    read); None when there is none, or it was made for another configuration."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return None
    with np.load(path) as f:
        meta = json.loads(bytes(f["meta"]).decode())
        if meta.get("fingerprint") != fingerprint:
            return None
        components = {p: f[f"a{i}"] for i, p in enumerate(meta["ranks"])}
    return meta["ranks"], components, meta
