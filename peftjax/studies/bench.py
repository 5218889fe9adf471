"""Training-step benchmark: the same measurement as the Hugging Face PEFT peer script, for side-by-side runs.

Random token ids of shape (batch, seq) (the peer does the same), the real jitted train step of :mod:`peftjax.train`,
compile time measured separately, then ``warmup`` untimed steps and the median of ``steps`` timed steps.
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from peftjax import partition
from peftjax.errors import PeftjaxError
from peftjax.studies.memory import method_run_config
from peftjax.sharding import make_mesh, per_device_nbytes, put
from peftjax.train import DTYPES, build, make_optimizer, make_regularizer, peak_rss_bytes, step_memory
from peftjax.train.placement import place
from peftjax.train.probes import device_peak_bytes, warm_up_compiler


def bench(*, model: str = "smollm2", method: str = "lora", batch: int = 4, seq: int = 256, rank: int = 8,
          targets: str = "all-linear", steps: int = 6, warmup: int = 2, compute_dtype: str = "float32",
          param_dtype: str | None = None, remat: bool = False, seed: int = 0, mesh: dict | None = None,
          attention: str = "auto", scan_layers: bool = False) -> dict:
    """One JSON-able record: ``method`` is a preset (``qlora`` = NF4 + double quantization, blocks of 64) or a
    registered method; ``param_dtype`` overrides the preset's storage dtype of the unquantized weights; ``mesh``
    (``{"data": 2, "fsdp": 4}``, :mod:`peftjax.sharding`) runs the step over a device mesh (default: every device
    on ``data``), ``step_device_bytes`` then per device. ``attention`` and ``scan_layers`` are ``model.attention``
    and ``model.scan_layers``."""
    if steps < 1 or warmup < 0 or batch < 1 or seq < 2:
        raise PeftjaxError(f"bench needs --steps >= 1, --warmup >= 0, --batch >= 1 and --seq >= 2; got {steps}, "
                           f"{warmup}, {batch}, {seq}")
    config = method_run_config(method, model=model, rank=rank, alpha=2.0 * rank, targets=targets)
    config.model.compute_dtype = compute_dtype
    config.model.remat = remat
    config.model.attention, config.model.scan_layers = attention, scan_layers
    if param_dtype is not None:
        config.model.param_dtype = param_dtype
    config.train.steps, config.train.batch_size, config.train.learning_rate = steps + warmup, batch, 1e-4
    warm_up_compiler()  # the compiler's start-up memory is not charged to loading (peftjax.train.probes)
    net = build(config, with_data=False).model
    load_peak = peak_rss_bytes()  # loading (and quantizing on load) is all this process has done so far
    vocab = net.config.vocab_size
    optimizer = make_optimizer(config.train, config.peft)
    placed = place(net, make_mesh(mesh or {}), optimizer, batch_size=batch, compute_dtype=DTYPES[compute_dtype],
                   remat=remat, regularizer=make_regularizer(config.peft))
    del net
    trainable, frozen, opt_state, step = placed.trainable, placed.frozen, placed.opt_state, placed.step
    rng = np.random.default_rng(seed)
    blocks = put(rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32), placed.batch_sharding)

    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, blocks, None).compile()
    compile_s = time.perf_counter() - t0
    memory = step_memory(compiled)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, blocks, None)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    quant, double_quant = config.quant.describe()
    return {
        "peftjax": "bench", "model": model, "method": method, "peft_method": config.method, "quant": quant,
        "double_quant": double_quant, "param_dtype": config.model.param_dtype,
        "compute_dtype": compute_dtype, "remat": remat,
        "attention": attention, "scan_layers": scan_layers, "batch": batch,
        "seq": seq, "rank": rank, "targets": targets, "median_step_s": median, "tokens_per_s": batch * seq / median,
        "step_device_bytes": memory["total"], "step_temp_bytes": memory["temp"], "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_load_bytes": load_peak, "device_peak_bytes": device_peak_bytes(),
        "compile_s": compile_s, "trainable_params": partition.param_count(trainable),
        "frozen_bytes": partition.tree_nbytes(frozen), "frozen_bytes_per_device": per_device_nbytes(frozen),
        "mesh": dict(placed.layout.mesh.shape), "loss": float(metrics["loss"]), "steps": steps,
        "step_times_s": times, "backend": jax.default_backend(), "jax_version": jax.__version__,
    }


# --- FLOPs, roofline and the harness's table (experiments/bench_vs_peer/compare.py) -------------------------------

LORA_METHODS = ("lora", "qlora")  # methods whose step adds LoRA factors and trains no base weight
MATMUL_KINDS = ("forward", "input_grad", "weight_grad")  # x @ W, g @ W^T, x^T @ g


def linear_shapes(arch) -> list[dict]:
    """Every linear weight a token passes through in a decoder (a :class:`~peftjax.models.llama.LlamaConfig`):
    ``{"name", "d_in", "d_out", "count", "adapted", "reads_embedding"}``, ``count`` layers each; ``adapted``: an
    ``all-linear`` LoRA target (every projection; the output head, the embedding of a tied model, is not);
    ``reads_embedding``: q, k and v, whose input in the first layer is the (normed) embedding itself."""
    c, d_attn, d_kv = arch, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    rows = [("q_proj", c.hidden_size, d_attn, True), ("k_proj", c.hidden_size, d_kv, True),
            ("v_proj", c.hidden_size, d_kv, True), ("o_proj", d_attn, c.hidden_size, False),
            ("gate_proj", c.hidden_size, c.intermediate_size, False),
            ("up_proj", c.hidden_size, c.intermediate_size, False),
            ("down_proj", c.intermediate_size, c.hidden_size, False)]
    out = [dict(name=n, d_in=i, d_out=o, count=c.num_layers, adapted=True, reads_embedding=r) for n, i, o, r in rows]
    return out + [dict(name="head", d_in=c.hidden_size, d_out=c.vocab_size, count=1, adapted=False,
                       reads_embedding=False)]


def distinct_shapes(arch) -> list[dict]:
    """The distinct (d_in, d_out) of :func:`linear_shapes`, with their summed ``count`` and joined ``names``."""
    by_shape: dict[tuple[int, int], dict] = {}
    for s in linear_shapes(arch):
        row = by_shape.setdefault((s["d_in"], s["d_out"]), dict(d_in=s["d_in"], d_out=s["d_out"], count=0, names=[]))
        row["count"] += s["count"]
        row["names"].append(s["name"])
    return list(by_shape.values())


def flops_per_token(arch, seq: int, method: str, rank: int = 8, trains_embedding: bool | None = None) -> dict:
    """Matmul FLOPs one training token costs (a multiply-add is 2 FLOPs), by part, and their ``total``.

    N = the linear weights a token is multiplied by (every projection and the output head, here the tied
    embedding). ``forward`` 2N; ``attention`` 12 T d per layer (d = heads x head_dim): scores q k^T and values
    p v are 2 T d each forward, their backward four matmuls of the same size, over the full T x T as XLA computes
    it (the causal mask zeroes half of it but does not skip it); ``input_grad`` g W^T, 2N less the first layer's
    q, k and v when the embedding is frozen (no gradient flows into their input); ``weight_grad`` (``full``
    only) x^T g, 2N, less the head's when the embedding is frozen (``full`` over ``all-linear`` targets);
    ``lora`` (``lora`` / ``qlora``, r = ``rank``, every projection adapted) 2 r (d_in + d_out) forward, as much
    for the factors' gradients and for the input gradient (2 r d_out only in the first layer's q, k and v when
    the embedding is frozen). ``trains_embedding`` defaults to ``method == "full"``. Elementwise work (norms,
    RoPE, softmax, the optimizer, QLoRA's dequantization) and the embedding lookup's gradient (a scatter-add) are
    not counted."""
    if trains_embedding is None:
        trains_embedding = method == "full"
    shapes = linear_shapes(arch)
    n = sum(s["d_in"] * s["d_out"] * s["count"] for s in shapes)
    head = sum(s["d_in"] * s["d_out"] for s in shapes if s["name"] == "head")
    # the first layer's q, k, v read the embeddings: their input gradient is dead when the embedding is frozen
    first = [s for s in shapes if s["reads_embedding"]]
    dead = 0 if trains_embedding else sum(s["d_in"] * s["d_out"] for s in first)
    lora = 0
    if method in LORA_METHODS:
        lora = 6 * rank * sum((s["d_in"] + s["d_out"]) * s["count"] for s in shapes if s["adapted"])
        lora -= 0 if trains_embedding else 2 * rank * sum(s["d_in"] for s in first)
    parts = {"forward": 2 * n, "attention": 12 * seq * arch.num_heads * arch.head_dim * arch.num_layers,
             "input_grad": 2 * (n - dead),
             "weight_grad": 2 * (n - (0 if trains_embedding else head)) if method == "full" else 0, "lora": lora}
    parts["total"] = sum(parts.values())
    parts["linear_params"] = n
    return parts


def roofline_kinds(method: str) -> tuple[str, ...]:
    """The matmuls a step of ``method`` runs at every base weight: the weight gradient only in full fine-tuning."""
    return MATMUL_KINDS if method == "full" else MATMUL_KINDS[:2]


def roofline_flops(matmuls: list[dict], kinds: tuple[str, ...] = MATMUL_KINDS) -> float:
    """FLOP/s of the base weights' matmuls of a step, each timed alone: sum of their FLOPs over sum of their times,
    i.e. each shape and kind weighted by the FLOPs a step spends there. ``matmuls``: rows ``{"tokens", "d_in",
    "d_out", "count", "seconds": {kind: median seconds of one matmul}}``."""
    flops = seconds = 0.0
    for m in matmuls:
        for kind in kinds:
            flops += 2.0 * m["tokens"] * m["d_in"] * m["d_out"] * m["count"]
            seconds += m["seconds"][kind] * m["count"]
    return flops / seconds


def time_matmuls(arch, tokens: int, *, reps: int = 5, warmup: int = 2, seed: int = 0) -> list[dict]:
    """Median seconds of XLA's float32 ``x @ W``, ``g @ W^T`` and ``x^T @ g`` (each jitted alone) at every
    distinct linear shape of ``arch`` with ``tokens`` rows: the rows :func:`roofline_flops` takes."""
    rng = np.random.default_rng(seed)
    ops = {"forward": jax.jit(lambda x, w, g: x @ w), "input_grad": jax.jit(lambda x, w, g: g @ w.T),
           "weight_grad": jax.jit(lambda x, w, g: x.T @ g)}
    rows = []
    for s in distinct_shapes(arch):
        x, w, g = (jax.device_put(rng.standard_normal(shape, dtype=np.float32))
                   for shape in ((tokens, s["d_in"]), (s["d_in"], s["d_out"]), (tokens, s["d_out"])))
        seconds = {}
        for kind, op in ops.items():
            times = []
            for i in range(warmup + reps):
                t0 = time.perf_counter()
                jax.block_until_ready(op(x, w, g))
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            seconds[kind] = statistics.median(times)
        rows.append(dict(s, tokens=tokens, seconds=seconds))
    return rows


def mfu(tokens_per_s: float, flops_token: float, roofline: float) -> float:
    """Achieved FLOP/s (tokens/s x FLOPs per token) as a fraction of the roofline FLOP/s."""
    return tokens_per_s * flops_token / roofline


def best_peer(peer: dict) -> tuple[str, dict]:
    """(dtype, record) of the peer's fastest setting among its measured dtypes (``{dtype: record}``)."""
    return max(peer.items(), key=lambda kv: kv[1]["tokens_per_s"])


def method_roofline(results: dict, method: str) -> float:
    """The roofline FLOP/s of ``method`` in a harness results dict: the faster of its roofline runs."""
    return max(roofline_flops(run, roofline_kinds(method)) for run in results["roofline"]["runs"])


TABLE_COLUMNS = ("method", "GFLOP / token", "peftjax step (s)", "peftjax tokens/s", "peftjax MFU",
                 "HF PEFT float32 tokens/s", "HF PEFT bfloat16 tokens/s", "peftjax / best HF PEFT",
                 "peftjax step device memory", "peftjax peak RSS", "HF PEFT peak RSS (best)", "peftjax compile (s)")


def format_table(results: dict) -> str:
    """The harness's markdown: a line of settings and roofline, then one row per method. MFU is peftjax's
    achieved FLOP/s over the roofline; the ratio is peftjax's tokens/s over the peer's faster dtype's."""
    s, m, v = results["settings"], results["machine"], results["versions"]
    roofs = {method: method_roofline(results, method) for method in results["methods"]}
    by_kinds = {("full" if k == "full" else "LoRA/QLoRA"): x for k, x in roofs.items()}
    roof_text = ", ".join(f"{k} {x / 1e9:.0f}" for k, x in by_kinds.items())
    lines = [f"batch {s['batch']} x seq {s['seq']}, LoRA r={s['rank']} on {s['targets']}, full over "
             f"{s.get('full_targets', s['targets'])}, peftjax float32, {s['steps']} "
             f"timed steps after {s['warmup']} warm-up; {m['cpu']} ({m['cores']} cores, {m['backend']}), "
             f"{results['date']}; jax {v.get('jax')}, torch {v.get('torch')}, peft {v.get('peft')}, transformers "
             f"{v.get('transformers')}, bitsandbytes {v.get('bitsandbytes')}. Roofline (XLA float32 matmuls at the "
             f"model's shapes, {s['batch'] * s['seq']} rows): {roof_text} GFLOP/s.", "",
             "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for method, rec in results["methods"].items():
        ours, peer, flops = rec["peftjax"], rec["peer"], rec["flops_per_token"]["total"]
        dtype, best = best_peer(peer)
        peer_cells = [f"{peer[d]['tokens_per_s']:.0f}" if d in peer else "-" for d in ("float32", "bfloat16")]
        row = [method, f"{flops / 1e9:.3f}", f"{ours['median_step_s']:.2f}", f"{ours['tokens_per_s']:.0f}",
               f"{mfu(ours['tokens_per_s'], flops, roofs[method]):.0%}", *peer_cells,
               f"{ours['tokens_per_s'] / best['tokens_per_s']:.2f}x (vs {dtype})",
               f"{ours['step_device_bytes'] / 2**20:.0f} MiB", f"{ours['peak_rss_bytes'] / 2**30:.2f} GiB",
               f"{best['peak_rss_mb'] / 1024:.2f} GiB", f"{ours['compile_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
