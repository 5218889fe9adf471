"""Training: the builder from a config, the optimizer, the jitted step with an injected loss, evaluation, the run
loop, run directories and checkpoints.

    graphdef, trainable, frozen = split(model)
    step = make_train_step(graphdef, optimizer)           # jax.jit, donated trainable / opt_state
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch)
"""
from peftjax.train.build import DTYPES, Built, TaskData, build, build_model, load_base, load_data
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.loop import run
from peftjax.train.optim import decay_mask, make_optimizer, make_regularizer, make_schedule, param_groups
from peftjax.train.probes import peak_rss_bytes, release_freed_memory, reset_peak_rss, rss_bytes
from peftjax.train.rundir import RunSummary, load_run
from peftjax.train.step import causal_lm_loss, evaluate, lm_loss, make_eval_fn, make_train_step, step_memory

__all__ = ["DTYPES", "Built", "Checkpointer", "RunSummary", "TaskData", "build", "build_model", "causal_lm_loss",
           "decay_mask", "evaluate", "lm_loss", "load_base", "load_data", "load_run", "make_eval_fn",
           "make_optimizer", "make_regularizer", "make_schedule", "make_train_step", "param_groups", "peak_rss_bytes",
           "release_freed_memory", "reset_peak_rss", "rss_bytes", "run", "step_memory"]
