"""Training-step benchmark: the same measurement as the Hugging Face PEFT peer script, for side-by-side runs.

Random token ids of shape (batch, seq) (the peer does the same), the real jitted train step of :mod:`peftjax.train`,
compile time measured separately, then ``warmup`` untimed steps and the median of ``steps`` timed steps.
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import partition
from peftjax.config import from_dict
from peftjax.train import (DTYPES, make_optimizer, make_train_step, peak_rss_bytes, prepare_model)


def bench(*, model: str = "smollm2", method: str = "lora", batch: int = 4, seq: int = 256, rank: int = 8,
          targets: str = "all-linear", steps: int = 6, warmup: int = 2, quant: str | None = None,
          double_quant: bool = False, compute_dtype: str = "float32", seed: int = 0) -> dict:
    if method == "qlora":
        method, quant = "lora", quant or "nf4"
    config = from_dict({
        "model": {"name": model, "compute_dtype": compute_dtype},
        "peft": {"method": method, "rank": rank, "alpha": 2.0 * rank, "targets": targets},
        "quant": {"format": quant, "block_size": 64, "double_quant": double_quant},
        "data": {"seq_len": seq},
        "train": {"steps": steps + warmup, "batch_size": batch, "learning_rate": 1e-4, "seed": seed},
    })
    net, _ = prepare_model(config)
    vocab = net.config.vocab_size
    graphdef, trainable, frozen = partition.split(net)
    del net
    optimizer = make_optimizer(config.train)
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer, DTYPES[compute_dtype])
    rng = np.random.default_rng(seed)
    blocks = jnp.asarray(rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32))

    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, blocks).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, blocks)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "peftjax": "bench", "model": model, "method": "qlora" if (quant and method == "lora") else method,
        "quant": quant, "batch": batch, "seq": seq, "rank": rank, "targets": targets,
        "median_step_s": median, "tokens_per_s": batch * seq / median, "peak_rss_bytes": peak_rss_bytes(),
        "compile_s": compile_s, "trainable_params": partition.param_count(trainable),
        "frozen_bytes": partition.tree_nbytes(frozen), "loss": float(metrics["loss"]), "steps": steps,
        "step_times_s": times, "backend": jax.default_backend(), "jax_version": jax.__version__,
    }
