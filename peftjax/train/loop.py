"""The run loop: ``run(config, out)`` trains per a config and writes the run directory (:mod:`.rundir`).

Every check that can fail on user input runs before anything in ``out`` is written; progress shows loss, tokens/s
and ETA; checkpoints make a killed run resumable bitwise.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import jax
import yaml

from peftjax import partition, sharding
from peftjax.config import RunConfig, to_dict
from peftjax.data import index_batches
from peftjax.errors import PeftjaxError
from peftjax.peft import get_method
from peftjax.quant.policy import rule_bits
from peftjax.peft.eva import save_eva
from peftjax.train.build import DTYPES, EVA_FILE, build
from peftjax.train.checkpoint import Checkpointer, directory_bytes
from peftjax.train.optim import make_optimizer, make_regularizer
from peftjax.train.placement import place
from peftjax.train.probes import (device_peak_bytes, peak_rss_bytes, release_freed_memory, reset_peak_rss, rss_bytes,
                                  warm_up_compiler)
from peftjax.train.provenance import provenance
from peftjax.train.rundir import RunSummary, check_resumable, write_json
from peftjax.train.step import evaluate, make_eval_fn, step_memory


def run(config: RunConfig, out: Path, *, overwrite: bool = False, progress: bool = True,
        resume: bool = False) -> dict:
    """Train per ``config`` and write ``out/{config.yaml, metrics.jsonl, summary.json, checkpoints/}``.

    Every check that can fail on user input (config, model, targets, data, a checkpoint to resume) runs before
    anything in ``out`` is written. With ``resume`` the latest checkpoint in ``out`` is restored (trainable,
    optimizer state, step, data position) and training continues; the result is bitwise that of an uninterrupted
    run. A run that has no checkpoint yet starts from the beginning; a corrupt latest checkpoint is skipped for the
    previous intact one; a finished run is left as it is.

    The run directory is locked (``.NAME.lock`` beside it) while the run lasts: a second process training into it
    is refused. A full disk or a permission error while writing is one line; the checkpoints stay usable.

    On a device mesh (``config.mesh``, :mod:`peftjax.sharding`) of several processes (``jax.distributed``), every
    process trains its part; process 0 alone locks and writes the run directory (config, metrics, summary), and
    the checkpoints are written collectively by orbax.
    """
    out = Path(out)
    if resume and overwrite:
        raise PeftjaxError("--resume and --overwrite contradict each other; choose one")
    if out.exists() and not out.is_dir():
        raise PeftjaxError(f"run directory {out} is a file; choose another --out")
    mc = config.mesh
    sharding.initialize_distributed(mc.coordinator, mc.num_processes, mc.process_id)  # before any device is used
    with lock_run_dir(out) if jax.process_index() == 0 else contextlib.nullcontext():
        try:
            return _run(config, out, overwrite=overwrite, progress=progress, resume=resume)
        except OSError as e:
            if e.errno not in _DISK_ERRNOS:
                raise
            raise PeftjaxError(f"{e.filename or out}: {e.strerror}; the run stopped, its checkpoints stay usable: "
                               "free space or fix the permissions, then --resume") from None


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


LOCK_ENV = "PEFTJAX_RUN_DIR_LOCKED"  # set by a parent (a sweep) that holds the run directory's lock for its child


def lock_path(out: Path) -> Path:
    """The lock of run directory ``out``: a hidden sibling, so --overwrite never deletes a held lock."""
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def lock_run_dir(out: Path, *, what: str = "run directory"):
    """Hold an exclusive ``fcntl`` lock on ``out`` (its hidden sibling ``.NAME.lock``) for the block; a second
    process is refused at once with one line. The kernel drops the lock when its holder dies."""
    out = Path(out)
    if os.environ.get(LOCK_ENV) == str(out.absolute()):
        yield  # the parent process holds it for us
        return
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PeftjaxError(f"cannot write in {path.parent} ({e.strerror or e}); choose a writable --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PeftjaxError(f"{what} {out} is in use by another peftjax process (lock {path}); wait for it "
                               "to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _run(config: RunConfig, out: Path, *, overwrite: bool, progress: bool, resume: bool) -> dict:
    from tqdm import tqdm

    primary = jax.process_index() == 0  # the process that writes the run directory
    if primary and out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise PeftjaxError(f"run directory {out} already exists and is not empty; pass --resume to continue it, "
                           "--overwrite to replace it, or choose --out")
    if resume:
        check_resumable(out, config)
        _check_same_schedule(out, config)
    mc = config.mesh
    mesh = sharding.make_mesh(mc.axes())
    t_start = time.perf_counter()
    warm_up_compiler()
    rss_start = rss_bytes()  # the interpreter, libraries and the compiler's start-up, before any model or data
    built = build(config, eva_cache=out / EVA_FILE if resume else None)
    data, model, eva = built.data, built.model, built.eva
    rule_report = rule_bits(model)
    del built
    n_virtual = model.num_virtual_tokens()
    if n_virtual + config.data.seq_len > model.config.max_position:
        extra = f" + {n_virtual} virtual prompt tokens (peft.num_tokens)" if n_virtual else ""
        raise PeftjaxError(f"data.seq_len {config.data.seq_len}{extra} exceeds the model's context of "
                           f"{model.config.max_position} positions; lower data.seq_len")
    tc = config.train
    compute_dtype = DTYPES[config.model.compute_dtype]
    optimizer = make_optimizer(tc, config.peft)  # with the method's optimizer hook (AdaLoRA's rank allocator)
    placed = place(model, mesh, optimizer, rules=mc.rules, batch_size=tc.batch_size, grad_accum=tc.grad_accum,
                   compute_dtype=compute_dtype, remat=config.model.remat,
                   regularizer=make_regularizer(config.peft))  # the trees on the mesh, the step
    del model
    graphdef, trainable, frozen, opt_state = placed.graphdef, placed.trainable, placed.frozen, placed.opt_state
    step_fn, replicate = placed.step, placed.replicate
    load_s = time.perf_counter() - t_start

    dropout = getattr(config.peft, "dropout", 0.0)
    eval_fn = make_eval_fn(graphdef, compute_dtype, data.eval.candidates)
    general_fn = None if data.forgetting is None else (  # forgetting: the loss on general text (LM blocks)
        eval_fn if data.eval.candidates is None else make_eval_fn(graphdef, compute_dtype))

    ckpt_dir = out / "checkpoints"
    start_step, state = 0, {"nonfinite_total": 0, "eval_before": None, "consecutive": 0, "general_before": None}
    if resume and ckpt_dir.exists():
        ckpt = Checkpointer(ckpt_dir, tc.keep_checkpoints)
        if ckpt.latest_step() is not None:
            trainable, opt_state, meta = ckpt.restore(trainable, opt_state, config=config)  # latest intact one
            trainable, opt_state = placed.restore(trainable, opt_state)
            start_step = meta["step"]
            state.update(nonfinite_total=meta["nonfinite_total"], eval_before=meta["eval_before"],
                         consecutive=meta.get("nonfinite_consecutive", 0))
            state["general_before"] = meta.get("general_before")
            if meta["data_position"] != start_step * tc.grad_accum:
                raise PeftjaxError(f"checkpoint data position {meta['data_position']} does not match step "
                                   f"{start_step} x train.grad_accum {tc.grad_accum}")
        ckpt.close()
    if start_step > tc.steps:
        raise PeftjaxError(f"the checkpoint in {ckpt_dir} is at step {start_step}, past train.steps={tc.steps}")
    if resume and start_step == tc.steps and (out / "summary.json").exists():
        print(f"peftjax: {out} already finished all {tc.steps} steps; nothing to do", file=sys.stderr)
        return json.loads((out / "summary.json").read_text())
    if len(data.train) < tc.batch_size:
        raise PeftjaxError(f"only {len(data.train)} training rows for train.batch_size {tc.batch_size}; "
                           "lower train.batch_size or add data")
    # ---- validation is over: from here on the run directory is written
    try:
        if primary:
            if out.exists() and overwrite:
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
            if eva is not None:  # resumption and load_run rebuild the EVA init from it, without the data pass
                save_eva(out / EVA_FILE, *eva)
    except OSError as e:
        raise PeftjaxError(f"cannot write the run directory {out} ({e.strerror or e}); choose a writable "
                           "--out") from None
    eva = None
    sharding.barrier("run directory written")  # the other processes use it (checkpoints) after process 0 made it
    ckpt = Checkpointer(ckpt_dir, tc.keep_checkpoints)
    if resume:
        ckpt.discard_after(start_step)  # corrupt later checkpoints: this run writes them again
    saved_steps = [start_step] if start_step else []
    metrics_path = out / "metrics.jsonl"
    kept = []
    if start_step and metrics_path.exists():  # drop records the killed run wrote after its last checkpoint
        kept = [r for r in map(_record, metrics_path.read_text().split("\n")[:-1])  # [:-1]: a line cut by a kill
                if r is not None and r["step"] <= start_step]
    if primary:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    # the steps before the checkpoint count in the summary as in an uninterrupted run (step 1 holds compilation)
    prior_losses = [r["loss"] for r in kept if r.get("loss") is not None and not r.get("skipped")]
    prior_times = [r["step_s"] for r in kept if r.get("step_s") is not None and r["step"] > 1]

    peak_rss_load = peak_rss_bytes()
    release_freed_memory()
    rss_train_start = rss_bytes()
    reset_peak_rss()  # peak_rss_bytes below is then the peak of the training phase alone
    if state["eval_before"] is None:
        state["eval_before"] = evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size, put=replicate)

    def general_loss():
        return None if general_fn is None else evaluate(general_fn, trainable, frozen, data.forgetting,
                                                        tc.eval_batch_size, put=replicate)["eval_loss"]

    if data.forgetting is not None and state["general_before"] is None:
        state["general_before"] = general_loss()
    padded_per_step = tc.batch_size * config.data.seq_len * tc.grad_accum  # every target slot, padding included
    row_targets = data.train.real_targets()  # per row: the targets that are real tokens, not padding
    step_times, losses = list(prior_times), list(prior_losses)  # copies: train_s counts what this process adds
    compile_s, consecutive, saved_step = None, state["consecutive"], start_step  # the run's streak
    peak_rss_first = None
    micro = index_batches(len(data.train), tc.batch_size, tc.seed, start=start_step * tc.grad_accum)
    dropout_root = jax.random.key(tc.seed)  # the run's only randomness after init: dropout keys by step
    compiled, memory = None, None

    def save(step):
        return ckpt.save(step, trainable, opt_state, config=config, data_position=step * tc.grad_accum,
                         extra={"nonfinite_total": state["nonfinite_total"], "eval_before": state["eval_before"],
                                "nonfinite_consecutive": consecutive, "general_before": state["general_before"]})

    bar = tqdm(total=tc.steps, initial=start_step, desc=config.name, unit="step",
               disable=not (progress and primary), dynamic_ncols=True)
    with open(metrics_path if primary else os.devnull, "a") as metrics_file:
        def log(record):
            metrics_file.write(json.dumps(json_safe(record)) + "\n")
            metrics_file.flush()

        for step in range(start_step, tc.steps):
            rows = [next(micro) for _ in range(tc.grad_accum)]
            real_tokens = int(sum(row_targets[i].sum() for i in rows))
            batch = sharding.put_rows(data.train_batch, rows, placed.batch_sharding, placed.row_axis)  # own rows
            t0 = time.perf_counter()
            key = replicate(jax.random.fold_in(dropout_root, step)) if dropout else None
            if compiled is None:  # compiled once, explicitly, so XLA's allocation for the step can be read
                compiled = step_fn.lower(trainable, opt_state, frozen, batch, key).compile()
                memory = step_memory(compiled)
            trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, key)
            metrics = jax.device_get(metrics)  # the one host sync of a step
            dt = time.perf_counter() - t0
            if compile_s is None:
                compile_s = dt
                peak_rss_first = peak_rss_bytes()  # evaluation and the step's compilation (in this process)
                release_freed_memory()  # the compiler's freed memory, which glibc would keep resident
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
                      "tokens_per_s": real_tokens / dt, "skipped": not finite}
            if "regularizer" in metrics:  # a method's extra loss term (AdaLoRA's orthogonality)
                record["regularizer"] = float(metrics["regularizer"])
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps or not finite:
                log(record)
            if consecutive >= tc.max_nonfinite:
                bar.close()
                good = _last_good(ckpt, saved_steps, trainable, config, lambda t: evaluate(
                    eval_fn, placed.restore(t)[0], frozen, data.eval, tc.eval_batch_size,
                    put=replicate)["eval_loss"])
                where = f"step {good} in {ckpt_dir}" if good else "none (every saved step already diverged)"
                raise PeftjaxError(f"stopped at step {step + 1}: {consecutive} non-finite losses or gradients in a "
                                   f"row (updates skipped); lower train.learning_rate and start again with "
                                   f"--overwrite. Last good checkpoint: {where}")
            if tc.eval_every and (step + 1) % tc.eval_every == 0 and step + 1 != tc.steps:
                log({"step": step + 1, **evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size,
                                                  put=replicate)})
            if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 != tc.steps and consecutive == 0:
                save(step + 1)
                saved_step = step + 1
                saved_steps.append(saved_step)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{real_tokens / dt:.0f}")
            bar.update(1)
        bar.close()
        if saved_step != tc.steps:
            saved_step = tc.steps
            save(tc.steps)
        ckpt_bytes = directory_bytes(ckpt_dir / str(tc.steps))
        eval_after = evaluate(eval_fn, trainable, frozen, data.eval, tc.eval_batch_size, put=replicate)
        general_after = general_loss()
        log({"step": tc.steps, **eval_after, **({"general_loss": general_after} if general_fn else {})})
    ckpt.close()
    median_step = statistics.median(step_times) if step_times else compile_s
    seen = index_batches(len(data.train), tc.batch_size, tc.seed)  # the rows of every step, as the run drew them
    tokens_seen = sum(int(row_targets[next(seen)].sum()) for _ in range(tc.steps * tc.grad_accum))
    eval_before = state["eval_before"]
    quant, double_quant = config.quant.describe()
    summary = RunSummary(
        name=config.name, task=config.data.task, method=config.method, preset=config.preset,
        rank=get_method(config.method).describe(config.peft).get("rank"), quant=quant, double_quant=double_quant,
        quant_rules=rule_report, param_dtype=config.model.param_dtype,
        trainable_params=partition.param_count(trainable),
        total_params=partition.param_count(trainable) + partition.param_count(frozen),
        frozen_bytes=partition.tree_nbytes(frozen), linear_bits_per_param=partition.quantized_bits_per_param(frozen),
        trainable_bytes=partition.tree_nbytes(trainable), optimizer_bytes=partition.tree_nbytes(opt_state),
        step_device_bytes=memory["total"] if memory else None, step_temp_bytes=memory["temp"] if memory else None,
        checkpoint_bytes=ckpt_bytes,
        checkpoint_trainable_bytes=directory_bytes(ckpt_dir / str(tc.steps) / "trainable"),
        checkpoint_dir=str(ckpt_dir / str(saved_step)),
        peak_rss_bytes=max(peak_rss_bytes(), peak_rss_first or 0),
        peak_rss_steady_bytes=peak_rss_bytes() if peak_rss_first is not None else None,
        peak_rss_load_bytes=peak_rss_load, device_peak_bytes=device_peak_bytes(), rss_start_bytes=rss_start, rss_train_start_bytes=rss_train_start,
        median_step_s=median_step, train_s=(compile_s or 0.0) + sum(step_times[len(prior_times):]),
        tokens_per_s=tokens_seen / tc.steps / median_step if median_step else None,
        padded_tokens_per_s=padded_per_step / median_step if median_step else None, compile_s=compile_s,
        load_s=load_s,
        eval_loss_before=eval_before["eval_loss"], eval_loss_after=eval_after["eval_loss"],
        eval_ppl_before=eval_before["eval_ppl"], eval_ppl_after=eval_after["eval_ppl"],
        eval_accuracy_before=eval_before.get("eval_accuracy"), eval_accuracy_after=eval_after.get("eval_accuracy"),
        train_loss_first=losses[0] if losses else None, train_loss_last=losses[-1] if losses else None,
        nonfinite_skipped=state["nonfinite_total"], resumed_from_step=start_step or None, steps=tc.steps,
        tokens_seen=tokens_seen, padded_tokens_seen=tc.steps * padded_per_step,
        epochs=tc.steps * tc.batch_size * tc.grad_accum / len(data.train),
        train_blocks=data.info["train_blocks"], eval_blocks=data.info["eval_blocks"], eval_docs=data.info["eval_docs"],
        wall_s=time.perf_counter() - t_start, jax_version=jax.__version__, backend=jax.default_backend(),
        frozen_bytes_per_device=sharding.per_device_nbytes(frozen),
        mesh={**dict(mesh.shape), "processes": jax.process_count()},
        forgetting_set=data.info["forgetting_set"], general_loss_before=state["general_before"],
        general_loss_after=general_after,
        forgetting=None if general_after is None else general_after - state["general_before"],
        provenance=provenance(config),
    ).to_json()
    summary = json_safe(summary)
    if primary:
        write_json(out / "summary.json", summary)
    return summary


def _record(line: str) -> dict | None:
    """A metrics.jsonl record, or None for a blank, cut or damaged line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def json_safe(obj):
    """``obj`` with NaN and infinities as None: JSON has no such numbers (``json.dumps`` would write bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def _check_same_schedule(out: Path, config: RunConfig) -> None:
    """A cosine schedule depends on ``train.steps``: a resumed run with more (or fewer) steps would not be the
    run of that length, so it is refused (a constant schedule may grow)."""
    recorded_path = out / "config.yaml"
    if config.train.schedule != "cosine" or not recorded_path.exists():
        return
    try:
        recorded = (yaml.safe_load(recorded_path.read_text()) or {}).get("train", {}).get("steps")
    except (yaml.YAMLError, AttributeError):
        return  # check_resumable reports a damaged config.yaml
    if recorded is not None and recorded != config.train.steps:
        raise PeftjaxError(f"--resume: train.steps is {recorded} in {recorded_path} but {config.train.steps} now; "
                           "the cosine schedule depends on train.steps, so resume with the run's own train.steps "
                           "(or start again with --overwrite)")


def _last_good(ckpt: Checkpointer, saved_steps: list[int], trainable, config, eval_loss) -> int | None:
    """The latest saved step whose parameters still give a finite held-out loss (a checkpoint saved just before a
    divergence can already hold parameters that give inf / NaN)."""
    for s in sorted(saved_steps, reverse=True):
        try:
            restored, _, _ = ckpt.restore(trainable, config=config, step=s)
        except PeftjaxError:  # deleted by keep_checkpoints, or unreadable
            continue
        if math.isfinite(eval_loss(restored)):
            return s
    return None
