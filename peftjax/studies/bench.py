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
from peftjax.train import DTYPES, build, make_optimizer, peak_rss_bytes, step_memory
from peftjax.train.placement import place
from peftjax.train.probes import device_peak_bytes, warm_up_compiler


def bench(*, model: str = "smollm2", method: str = "lora", batch: int = 4, seq: int = 256, rank: int = 8,
          targets: str = "all-linear", steps: int = 6, warmup: int = 2, compute_dtype: str = "float32",
          param_dtype: str | None = None, remat: bool = False, seed: int = 0, mesh: dict | None = None) -> dict:
    """One JSON-able record: ``method`` is a preset (``qlora`` = NF4 + double quantization, blocks of 64) or a
    registered method; ``param_dtype`` overrides the preset's storage dtype of the unquantized weights; ``mesh``
    (``{"data": 2, "fsdp": 4}``, :mod:`peftjax.sharding`) runs the step over a device mesh (default: every device
    on ``data``), ``step_device_bytes`` then per device."""
    if steps < 1 or warmup < 0 or batch < 1 or seq < 2:
        raise PeftjaxError(f"bench needs --steps >= 1, --warmup >= 0, --batch >= 1 and --seq >= 2; got {steps}, "
                           f"{warmup}, {batch}, {seq}")
    config = method_run_config(method, model=model, rank=rank, alpha=2.0 * rank, targets=targets)
    config.model.compute_dtype = compute_dtype
    config.model.remat = remat
    if param_dtype is not None:
        config.model.param_dtype = param_dtype
    config.train.steps, config.train.batch_size, config.train.learning_rate = steps + warmup, batch, 1e-4
    warm_up_compiler()  # the compiler's start-up memory is not charged to loading (peftjax.train.probes)
    net = build(config, with_data=False).model
    load_peak = peak_rss_bytes()  # loading (and quantizing on load) is all this process has done so far
    vocab = net.config.vocab_size
    optimizer = make_optimizer(config.train)
    placed = place(net, make_mesh(mesh or {}), optimizer, batch_size=batch, compute_dtype=DTYPES[compute_dtype],
                   remat=remat)
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
        "double_quant": double_quant, "param_dtype": config.model.param_dtype, "remat": remat, "batch": batch,
        "seq": seq, "rank": rank, "targets": targets, "median_step_s": median, "tokens_per_s": batch * seq / median,
        "step_device_bytes": memory["total"], "step_temp_bytes": memory["temp"], "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_load_bytes": load_peak, "device_peak_bytes": device_peak_bytes(),
        "compile_s": compile_s, "trainable_params": partition.param_count(trainable),
        "frozen_bytes": partition.tree_nbytes(frozen), "frozen_bytes_per_device": per_device_nbytes(frozen),
        "mesh": dict(placed.layout.mesh.shape), "loss": float(metrics["loss"]), "steps": steps,
        "step_times_s": times, "backend": jax.default_backend(), "jax_version": jax.__version__,
    }
