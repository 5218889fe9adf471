"""Post-training quantization report: what each storage format costs and how much it hurts, before any training.

For each format spec (``nf4``, ``nf4-dq`` = NF4 with double-quantized scales, ``int8``, ``fp4``, ...) the model's
linear layers are quantized by :func:`peftjax.quant.policy.quantize_model` and we report

- bits per parameter and total bytes of the quantized layers (exact ``nbytes`` of the packed storage),
- the relative weight error ``||W - deq(Q(W))||_F / ||W||_F``, averaged over layers,
- the held-out next-token loss of the quantized model on the evaluation blocks (no training).
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import partition
from peftjax.errors import PeftjaxError
from peftjax.models.llama import Linear
from peftjax.quant import known_formats
from peftjax.quant.policy import QuantizedLinear, QuantRule, quantize_model
from peftjax.rules import modules_of_type


def parse_format_spec(text: str, block_size: int | None) -> QuantRule:
    """``"nf4"`` -> NF4 blockwise; a ``-dq`` suffix adds double quantization of the scales."""
    fmt, dq = (text[:-3], True) if text.endswith("-dq") else (text, False)
    if fmt not in known_formats():
        raise PeftjaxError(f"unknown quantization format {text!r}; known formats: {', '.join(known_formats())} "
                           "(add -dq for double quantization)")
    return QuantRule(format=fmt, block_size=block_size, double_quant=dq)


@dataclasses.dataclass
class LayerError:
    path: str
    params: int
    nbytes: int
    rel_error: float


def layer_errors(model, quantized) -> list[LayerError]:
    dense = modules_of_type(model, Linear)
    rows = []
    for path, layer in modules_of_type(quantized, QuantizedLinear).items():
        q = layer.weight.get_value()
        w = dense[path].weight[...].astype(jnp.float32)
        err = float(jnp.linalg.norm(layer.kernel(jnp.float32) - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30))
        rows.append(LayerError(path, q.size, q.nbytes, err))
    return rows


def eval_loss(model, blocks: np.ndarray, batch_size: int) -> float:
    """Held-out next-token loss of ``model`` on (n, T + 1) token ``blocks`` (every target counts)."""
    from peftjax.data import RecordData
    from peftjax.train import evaluate, make_eval_fn

    graphdef, trainable, frozen = partition.split(model)
    rows = RecordData(blocks, np.ones((len(blocks), blocks.shape[1] - 1), np.float32))
    return evaluate(make_eval_fn(graphdef), trainable, frozen, rows, batch_size)["eval_loss"]


def quant_report(model, eval_blocks: np.ndarray, specs: list[tuple[str, QuantRule]], *,
                 batch_size: int = 8) -> tuple[list[dict], dict[str, list[LayerError]]]:
    """One summary row per format (plus the float baseline first) and the per-layer errors of each format."""
    dense_layers = modules_of_type(model, Linear)
    dense_bytes = sum(m.weight[...].nbytes for m in dense_layers.values())
    dense_params = sum(m.weight[...].size for m in dense_layers.values())
    rows = [{"format": str(jnp.dtype(next(iter(dense_layers.values())).weight[...].dtype)),
             "bits_per_param": 8.0 * dense_bytes / dense_params, "linear_bytes": dense_bytes,
             "mean_rel_error": 0.0, "eval_loss": eval_loss(model, eval_blocks, batch_size), "quantize_s": 0.0}]
    per_layer = {}
    for name, spec in specs:
        t0 = time.perf_counter()
        quantized = quantize_model(model, [spec])
        jax.block_until_ready(jax.tree.leaves(partition.split(quantized)[2]))
        seconds = time.perf_counter() - t0
        errors = layer_errors(model, quantized)
        nbytes = sum(e.nbytes for e in errors)
        rows.append({"format": name, "bits_per_param": 8.0 * nbytes / sum(e.params for e in errors),
                     "linear_bytes": nbytes, "mean_rel_error": float(np.mean([e.rel_error for e in errors])),
                     "eval_loss": eval_loss(quantized, eval_blocks, batch_size), "quantize_s": seconds})
        per_layer[name] = errors
    return rows, per_layer


def format_table(rows: list[dict]) -> str:
    lines = ["| format | bits/param | linear-layer bytes | mean rel. weight error | held-out loss | quantize (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['bits_per_param']:.3f} | {r['linear_bytes'] / 2**20:.1f} MiB "
                     f"| {r['mean_rel_error']:.4f} | {r['eval_loss']:.4f} | {r['quantize_s']:.2f} |")
    return "\n".join(lines)


def format_layer_table(per_layer: dict[str, list[LayerError]]) -> str:
    names = list(per_layer)
    paths = [e.path for e in per_layer[names[0]]]
    lines = ["| layer | params | " + " | ".join(f"{n} rel. error" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for i, path in enumerate(paths):
        errs = " | ".join(f"{per_layer[n][i].rel_error:.4f}" for n in names)
        lines.append(f"| {path} | {per_layer[names[0]][i].params:,} | {errs} |")
    return "\n".join(lines)
