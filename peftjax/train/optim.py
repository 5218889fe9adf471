"""The optimizer of a run from ``train:``: global-norm clipping, AdamW with decay on matrices only, warmup + cosine
or constant schedules, and per-group peak learning rates (``optax.partition`` over the trainable variable types)."""
from __future__ import annotations

import functools

import jax
import optax

from peftjax.peft import method_for_config
from peftjax.variables import Trainable, is_variable, trainable_groups


def param_groups(params, named=()):
    """The optimizer group of every trainable leaf: its method's variable type in lower case (``lora``, ``prompt``,
    ``tuned``, ...: the type just below the generic Adapter / Trainable), or the nearest of its types that ``named``
    lists, so a finer type gets a rate of its own only when asked (LoRA's B, type ``lorab``, is in ``lora`` unless
    ``lorab`` has a rate: LoRA+)."""
    def group(v):
        names = [c.__name__.lower() for c in type(v).__mro__ if issubclass(c, Trainable)]
        specific = [n for n in names if n not in ("adapter", "trainable")] or names
        return next((n for n in names if n in named), specific[-1])

    return jax.tree.map(lambda v: jax.tree.map(lambda _: group(v), v), params, is_leaf=is_variable)


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


def make_optimizer(tc, peft_config=None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay masked to matrices) per group: ``train.group_learning_rates`` sets
    a peak rate per trainable variable type (e.g. ``prompt`` vs ``lora``) through ``optax.partition``.

    ``peft_config`` (the run's ``peft`` section): a method with a ``wrap_optimizer`` hook wraps the part after
    clipping (it then sees the clipped gradients, the parameters and AdamW's updates: AdaLoRA's rank allocator).

    AdamW is optax's own chain (Adam's scaling, decoupled decay, the rate) with the rate split in two: the shape
    of the schedule (warmup and cosine, peak 1) and the peak itself, an ``optax.inject_hyperparams`` value held in
    the optimizer state. So the peak is an input of the compiled step, not a constant in it: sweep points that
    differ only in learning rate share one compiled step (through the sweep's compilation cache)."""
    def adamw(peak):
        return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(tc.weight_decay, decay_mask),
                           optax.scale_by_schedule(make_schedule(tc, 1.0)),
                           optax.inject_hyperparams(optax.scale)(step_size=-float(peak)))

    parts = [optax.clip_by_global_norm(tc.grad_clip)] if tc.grad_clip else []
    if tc.group_learning_rates:
        inner = optax.partition({g: adamw(tc.group_learning_rates.get(g, tc.learning_rate))
                                 for g in trainable_groups()},
                                lambda params: param_groups(params, tc.group_learning_rates))
    else:
        inner = adamw(tc.learning_rate)
    method = None if peft_config is None else method_for_config(peft_config)
    if method is not None and method.wrap_optimizer is not None:
        inner = method.wrap_optimizer(peft_config, inner, tc.steps)
    return optax.chain(*parts, inner)


def make_regularizer(peft_config):
    """``model -> scalar``: the run's method's ``regularizer`` hook bound to its config (None when it has none),
    the ``regularizer`` of :func:`peftjax.train.step.make_train_step`."""
    method = method_for_config(peft_config)
    if method.regularizer is None:
        return None
    return functools.partial(method.regularizer, config=peft_config)
