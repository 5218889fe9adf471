"""The jitted train step over pure pytrees, its injected loss, and evaluation.

    step = make_train_step(graphdef, optimizer, loss_fn=causal_lm_loss)
    trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, dropout_key)   # jax.jit, donated

Only ``trainable`` is differentiated; ``frozen`` (dense or quantized base weights) enters the loss as a constant,
so XLA never computes or stores weight gradients for the base. The loss is an argument: any
``loss_fn(model, batch, *, compute_dtype, dropout_key, remat) -> (summed loss, counted targets)`` trains with the
same step, gradient accumulation and non-finite guard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax import partition
from peftjax.models.spmd import rows_sharding
from peftjax.train.loss import head_cross_entropy

LOSS_CHUNK = 64  # tokens per chunk of the output head's logits on CPU (peftjax.train.loss)
LOSS_LOGITS_BYTES = 512 * 2**20  # a chunk's float32 logits on a GPU or TPU


def loss_chunk(vocab: int, backend: str | None = None) -> int:
    """Tokens per chunk of the output head's logits (:func:`peftjax.train.loss.head_cross_entropy`).

    On CPU :data:`LOSS_CHUNK`: a chunk's logits stay in cache. On a GPU or TPU the largest power of two (at least
    LOSS_CHUNK) whose float32 logits fit in :data:`LOSS_LOGITS_BYTES`: every chunk rereads the whole head and, when
    the head is trained, writes and adds a (V, D) float32 gradient: on Llama-3.2-1B's shape (8 x 1024 tokens,
    V = 128,256, tied head trained) 128 chunks of 64 tokens move about 470 GB per step by that count, 8 chunks of
    1,024 about 30 GB."""
    if (backend or jax.default_backend()) == "cpu":
        return LOSS_CHUNK
    chunk = LOSS_CHUNK
    while 2 * chunk * vocab * 4 <= LOSS_LOGITS_BYTES:
        chunk *= 2
    return chunk


def causal_lm_loss(model, batch, *, compute_dtype=jnp.float32, dropout_key=None, remat: bool = False):
    """(sum of next-token cross-entropies over counted targets, number of counted targets).

    ``batch`` is a (B, T+1) token array (every target counts) or ``{"tokens", "loss_mask"}`` whose (B, T) mask
    selects the targets (response tokens of SFT, the label word of a verbalizer task). A model with its own
    objective (``task_loss``: an encoder with a classifier) is trained on that instead."""
    if hasattr(model, "task_loss"):
        return model.task_loss(batch, compute_dtype=compute_dtype, dropout_key=dropout_key, remat=remat)[:2]
    total, count, _ = _ce(model, batch, compute_dtype=compute_dtype, dropout_key=dropout_key, remat=remat)
    return total, count


def _ce(model, batch, *, compute_dtype, dropout_key=None, remat=False):
    """(summed cross-entropy, counted targets, final hidden states); the head's logits are made
    :func:`loss_chunk` tokens at a time (:func:`peftjax.train.loss.head_cross_entropy`), never all at once."""
    tokens = batch["tokens"] if isinstance(batch, dict) else batch
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    h, _ = model.hidden_states(inputs, compute_dtype=compute_dtype, dropout_key=dropout_key, remat=remat)
    if isinstance(batch, dict):
        mask = batch["loss_mask"].reshape(-1).astype(jnp.float32)
        count = mask.sum()
    else:
        mask, count = None, jnp.asarray(targets.size, jnp.float32)
    total = head_cross_entropy(h, model.head_weight(), targets.reshape(-1), mask,
                               chunk=loss_chunk(model.config.vocab_size),
                               softcap=model.config.final_softcap)
    return total, count, h


def lm_loss(graphdef, trainable, frozen, batch, compute_dtype=jnp.float32):
    """Mean next-token cross-entropy of (B, T+1) token blocks, or of the masked targets of a batch dict."""
    total, count = causal_lm_loss(partition.merge(graphdef, trainable, frozen), batch, compute_dtype=compute_dtype)
    return total / jnp.maximum(count, 1.0)


def make_train_step(graphdef, optimizer, compute_dtype=jnp.float32, *, loss_fn=causal_lm_loss, grad_accum: int = 1,
                    remat: bool = False, shardings=None, regularizer=None):
    """The jitted step; ``trainable`` and ``opt_state`` are donated, ``frozen`` is never differentiated.

    With ``grad_accum > 1`` the batch has a leading micro-batch axis; gradients of the summed loss are
    accumulated in a ``lax.scan`` and divided by the total number of counted targets (token-weighted, as one big
    batch would be). A non-finite loss or gradient norm skips the update (``metrics["finite"]`` is False): the
    parameters and optimizer state come out unchanged. ``remat`` recomputes each decoder layer's activations in
    the backward pass. ``dropout_key`` (optional 5th argument) is the step's randomness, passed down the model's
    call (never stored on it); the loop derives it from (seed, step), so a resumed run draws the same masks.

    ``shardings`` = (trainable, opt_state, frozen, batch, replicated) ``NamedSharding`` trees
    (:mod:`peftjax.sharding`) makes it one SPMD program over their mesh: the arguments come in and the updated
    state goes out with those layouts (the donated buffers are reused in place), the metrics replicated; the step
    is then called with all five arguments (``dropout_key`` None without dropout). The decoder layers' activations
    are pinned to the batch's row split (:mod:`peftjax.models.spmd`), so FSDP gathers weights, not activations.

    ``regularizer`` (``model -> scalar``, a method's ``regularizer`` hook: :func:`peftjax.train.optim.make_regularizer`)
    is added once per step to the mean loss that is differentiated; ``metrics["loss"]`` stays the data loss and
    ``metrics["regularizer"]`` reports the term.
    """
    rows = (None, None)
    if shardings is not None:  # token rows of the activations split like the batch's rows (peftjax.models.spmd)
        batch_s = shardings[3]
        rows = (batch_s.mesh, (tuple(batch_s.spec) + (None,) * 2)[0 if grad_accum == 1 else 1])

    def terms(trainable, frozen, batch, key):
        model = partition.merge(graphdef, trainable, frozen)
        with rows_sharding(*rows):
            return loss_fn(model, batch, compute_dtype=compute_dtype, dropout_key=key, remat=remat)

    def mean_loss(trainable, frozen, batch, key):
        total, count = terms(trainable, frozen, batch, key)
        return total / jnp.maximum(count, 1.0)

    def loss_and_grads(trainable, frozen, batch, key):
        loss, grads = data_loss_and_grads(trainable, frozen, batch, key)
        if regularizer is None:
            return loss, grads, None
        reg, reg_grads = jax.value_and_grad(lambda t: regularizer(partition.merge(graphdef, t, frozen)))(trainable)
        return loss, jax.tree.map(jnp.add, grads, reg_grads), reg

    def data_loss_and_grads(trainable, frozen, batch, key):
        if grad_accum == 1:
            return jax.value_and_grad(mean_loss)(trainable, frozen, batch, key)

        def micro(carry, xs):
            mb, i = xs
            mkey = None if key is None else jax.random.fold_in(key, i)
            (total, count), grads = jax.value_and_grad(
                lambda t: terms(t, frozen, mb, mkey), has_aux=True)(trainable)
            return jax.tree.map(jnp.add, carry, (total, count, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
        (total, count, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(grad_accum)))
        n = jnp.maximum(count, 1.0)
        return total / n, jax.tree.map(lambda g: g / n, grads)

    def step(trainable, opt_state, frozen, batch, dropout_key=None):
        loss, grads, reg = loss_and_grads(trainable, frozen, batch, dropout_key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if reg is not None:
            finite &= jnp.isfinite(reg)

        def update(state):
            params, opt = state
            updates, opt = optimizer.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt

        trainable, opt_state = jax.lax.cond(finite, update, lambda state: state, (trainable, opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        if reg is not None:
            metrics["regularizer"] = reg
        return trainable, opt_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    trainable_s, opt_s, frozen_s, batch_s, replicated = shardings
    return jax.jit(step, donate_argnums=(0, 1), in_shardings=(trainable_s, opt_s, frozen_s, batch_s, replicated),
                   out_shardings=(trainable_s, opt_s, replicated))


def step_memory(compiled) -> dict:
    """XLA's allocation for a compiled step in bytes: ``arguments``, ``temp`` (activations, gradients, workspace),
    ``outputs`` not aliased to a donated argument, and their ``total`` (what the step holds on the device)."""
    analysis = compiled.memory_analysis()
    outputs = analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    return {"arguments": analysis.argument_size_in_bytes, "temp": analysis.temp_size_in_bytes, "outputs": outputs,
            "total": analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + outputs}


def make_eval_fn(graphdef, compute_dtype=jnp.float32, candidates=None):
    """Jitted eval of one batch dict: summed loss and target count, and for classification the number of rows
    whose highest-scoring label word (among ``candidates`` token ids, at ``label_pos``) is the gold label (or, for a
    model with its own ``task_loss``, whose predicted class is)."""
    def fn(trainable, frozen, batch):
        model = partition.merge(graphdef, trainable, frozen)
        if hasattr(model, "task_loss"):
            total, count, correct = model.task_loss(batch, compute_dtype=compute_dtype)
            return {"loss_sum": total, "count": count, "correct": correct}
        total, count, h = _ce(model, batch, compute_dtype=compute_dtype)
        out = {"loss_sum": total, "count": count}
        if candidates is not None:  # scores of the label words at the position before the label
            B, T = batch["loss_mask"].shape
            h_BD = h[jnp.arange(B) * T + batch["label_pos"]]
            scores = model.logits(h_BD)[:, jnp.asarray(candidates)]
            out["correct"] = ((jnp.argmax(scores, -1) == batch["label"]) * batch["weight"]).sum()
        return out

    return jax.jit(fn)


def evaluate(eval_fn, trainable, frozen, rows, batch_size: int, put=None) -> dict:
    """Token-weighted loss, perplexity and (classification) accuracy over every eval row. The last batch is
    padded to the full batch size with rows that count nothing, so one compiled shape serves every batch.
    ``put`` places a host batch on the devices (default: the default device; a run on a mesh replicates it)."""
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
        batch = jax.tree.map(jnp.asarray, batch) if put is None else put(batch)
        out = jax.device_get(eval_fn(trainable, frozen, batch))
        for k, v in out.items():
            sums[k] += float(v)
    loss = sums["loss_sum"] / max(sums["count"], 1.0)
    result = {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0)))}
    if rows.label is not None:
        result["eval_accuracy"] = sums["correct"] / n
    return result


__all__ = ["causal_lm_loss", "evaluate", "lm_loss", "loss_chunk", "make_eval_fn", "make_train_step", "step_memory"]
