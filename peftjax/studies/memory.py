"""Training-memory estimates from the architecture alone: ``peftjax memory --model NAME --method M``.

Parameter counts and storage come from the real code path run abstractly (``jax.eval_shape``): the model is built,
quantized by the same policy and given the same PEFT method as a training run, without allocating any weight. Two
builds (one and two decoder layers) give the per-layer and fixed parts exactly, so a 70B model costs as much as a
135M one. What the estimate adds on top is arithmetic:

- **weights**: the frozen base; dense tensors at ``--weight-dtype`` bytes per value (bf16 for the classic tables),
  quantized tensors as stored (packed codes, scales, double-quantized scales: ``QArray.nbytes``);
- **adapter**: the trainable parameters (``--trainable-dtype``, float32 by default);
- **gradients**: one per trainable parameter in the trainable dtype;
- **optimizer**: AdamW's two float32 moments per trainable parameter, plus a float32 master copy when full
  fine-tuning trains weights held in a 16-bit dtype (mixed precision: 2 + 2 + 4 + 4 + 4 = 16 bytes per parameter);
- **activations**: what the backward pass keeps per token and decoder layer, in ``--compute-dtype``: each
  RMSNorm's input and output (4 d; 8 d with Gemma's sandwich norms, and q/k norms' 2 (q + kv) in Qwen3 / Gemma 3),
  the rotated q and k and the values (q + 2 kv), the attention scores, their causally masked copy and the
  probabilities (3 x heads x positions; XLA on CPU keeps all three; a sliding window masks scores without
  shortening them), the attention output (q), and the MLP's gate, up, SiLU(gate) and gated product (4 ff); at the
  head, float32 logits, their softmax and its gradient (3 V per token) for one chunk of tokens
  (the loss never holds more) and the gradient of the final hidden states (d per token). With ``remat`` only each
  layer's input (d) is kept, and one layer's worth is recomputed at a time.

Not estimated: the framework's own resident memory (Python, JAX, XLA's compiled code and scratch), which is a
property of the machine, not of the model.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.models.families import config_from_hf
from peftjax.models.llama import LlamaConfig

GIB = 1024 ** 3

_LLAMA2 = dict(model_type="llama", vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)
# Published architectures: the shape keys of their config.json files, read as a checkpoint's config.json is.
PUBLISHED: dict[str, dict] = {
    "smollm2": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    rope_theta=100000.0, max_position_embeddings=8192),
    "llama-65b": dict(_LLAMA2, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, max_position_embeddings=2048),
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, sliding_window=None,
                       max_position_embeddings=32768, rope_theta=1000000.0),
    "llama3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                        tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, rope_theta=1000000.0, use_sliding_window=False),
    "gemma2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                      num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                      sliding_window=4096, max_position_embeddings=8192),
}


def _published(name: str) -> LlamaConfig:
    return config_from_hf(PUBLISHED[name], name)


ARCHITECTURES = [*PUBLISHED, "tiny"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def method_run_config(method: str, *, model: str = "tiny", **peft_options):
    """The run config of a ``--method`` value (a preset or a registered method, :mod:`peftjax.config.presets`),
    with ``peft_options`` applied where the method has such a field (``rank`` means nothing to IA3) and None
    options left at the method's defaults."""
    from peftjax.config import from_dict, get_preset
    from peftjax.peft import get_method

    preset = get_preset(method)
    fields = get_method(preset.config["peft"]["method"]).field_names()
    peft = {k: v for k, v in peft_options.items() if v is not None and k in fields}
    return from_dict({"preset": method, "model": {"name": model}, "peft": peft})


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    model: str
    method: str
    total_params: int
    trainable_params: int
    weights: int  # bytes
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    gathered: int = 0  # FSDP: the linear layers' weights gathered whole for compute (per device)
    mesh: dict | None = None  # {data, fsdp, tensor}: the figures are per device of this mesh

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.gathered


def architecture(name: str) -> tuple[LlamaConfig, bool]:
    """(the decoder, whether its head is tied) of a published name, ``tiny``, or a Hugging Face ``config.json`` (or
    the model directory holding one) of a supported family."""
    if name == "tiny":
        arch = LlamaConfig.tiny()
    elif name in PUBLISHED:
        arch = _published(name)
    else:
        path = Path(name)
        path = path / "config.json" if path.is_dir() else path
        if path.suffix != ".json" or not path.is_file():
            raise PeftjaxError(f"unknown model {name!r} for the memory estimate; give one of "
                               f"{', '.join(ARCHITECTURES)}, or a Hugging Face config.json (or its directory)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PeftjaxError(f"{path} is not valid JSON ({e})") from None
        try:
            arch = config_from_hf(raw, str(path))
        except KeyError as e:
            raise PeftjaxError(f"{path} lacks {e.args[0]!r}, which the estimate needs") from None
    return arch, arch.tie_embeddings


def abstract_mesh(axes: dict[str, int | None]):
    """A ``data`` x ``fsdp`` x ``tensor`` mesh of sizes only (``data`` unset: 1), for layouts without devices."""
    from jax.sharding import AbstractMesh

    from peftjax.sharding import MESH_AXES

    return AbstractMesh(tuple(axes.get(a) or 1 for a in MESH_AXES), MESH_AXES)


@dataclasses.dataclass
class _Build:
    graphdef: object
    trainable: object  # ShapeDtypeStruct trees
    frozen: object
    layout: object  # peftjax.sharding.Layout on the mesh, or None


def _abstract_build(arch: LlamaConfig, num_layers: int, config, mesh=None, tied: bool = True) -> _Build:
    """A ``num_layers``-layer build, quantized and adapted, as shapes only (``jax.eval_shape``), with its
    :class:`~peftjax.sharding.Layout` on ``mesh`` (an abstract or a real mesh) when one is given; ``tied=False``
    keeps an untied architecture's output head (the estimate adds it by arithmetic)."""
    from peftjax import partition, sharding
    from peftjax.models.llama import LlamaForCausalLM
    from peftjax.quant.policy import quantize_model
    from peftjax.train import build_model

    box = {}

    def build():
        arch_n = dataclasses.replace(arch, num_layers=num_layers, tie_embeddings=tied or arch.tie_embeddings)
        model = LlamaForCausalLM(arch_n, rngs=nnx.Rngs(0))
        if config.quant.rules:
            model = quantize_model(model, list(config.quant.rules))
        model = build_model(config, (model, None))[0]
        box["layout"] = None if mesh is None else sharding.Layout(model, mesh, dict(config.mesh.rules))
        box["graphdef"], trainable, frozen = partition.split(model)
        return trainable, frozen

    trainable, frozen = jax.eval_shape(build)
    return _Build(box["graphdef"], trainable, frozen, box["layout"])


def _storage(tree, dense_bytes: int, layout=None) -> tuple[int, int, int]:
    """(parameter count, bytes per device, bytes FSDP gathers) of an abstract state: dense float leaves at
    ``dense_bytes`` per value, quantized tensors as stored; per device of ``layout``'s mesh when given (each array's
    shard), and the linear layers' weights split over ``fsdp`` counted again F - 1 times: XLA gathers them whole for
    their matmuls, every layer's at once in the compiled step (measured on the virtual mesh)."""
    from peftjax import sharding
    from peftjax.partition import _is_qarray

    is_leaf = _is_qarray
    shardings = None if layout is None else jax.tree.leaves(layout.shardings(tree), is_leaf=is_leaf)
    fsdp = 1 if layout is None else layout.mesh.shape["fsdp"]
    count = nbytes = gathered = 0
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]):
        arrays = jax.tree.leaves(leaf) if _is_qarray(leaf) else [leaf]
        where = [None] * len(arrays) if shardings is None else jax.tree.leaves(shardings[i])
        count += leaf.size if _is_qarray(leaf) else math.prod(leaf.shape)
        linear = sharding.in_linear_layer(path)
        for x, s in zip(arrays, where):
            width = x.dtype.itemsize if _is_qarray(leaf) else dense_bytes
            here = math.prod(x.shape if s is None else s.shard_shape(x.shape)) * width
            nbytes += here
            if linear and s is not None and any("fsdp" in sharding.mesh_axes(e) for e in s.spec):
                gathered += here * (fsdp - 1)
    return count, nbytes, gathered


def activation_bytes(arch: LlamaConfig, *, batch_size: int, seq_len: int, compute_bytes: int, remat: bool = False,
                     virtual_tokens: int = 0, prefix_tokens: int = 0, tensor: int = 1, loss_rows: int | None = None,
                     vocab_split: int = 1) -> int:
    """Bytes the backward pass keeps for one batch of ``batch_size`` rows (see the module docstring for the terms).
    Prompt tuning's virtual tokens are extra positions; prefix tuning's are extra keys every position attends to.

    On a mesh, per device: ``batch_size`` is the device's rows; ``tensor`` (T) divides the projections' outputs
    (q, k, v, the MLP's) whose width it divides, as their kernels are split, and the attention scores when it
    divides the query and key-value heads (else the partitioner keeps them whole); the loss computes ``loss_rows``
    rows x ``V / vocab_split`` logits per loop step (default: one device's chunk of
    :func:`~peftjax.train.step.loss_chunk` rows over the whole vocabulary)."""
    from peftjax.train.step import loss_chunk

    d, ff, kv = arch.hidden_size, arch.intermediate_size, arch.num_kv_heads * arch.head_dim
    q = arch.num_heads * arch.head_dim
    positions = seq_len + virtual_tokens
    split = lambda n: tensor if n % tensor == 0 else 1  # noqa: E731  (a width the layout splits T ways)
    heads_split = tensor if arch.num_heads % tensor == 0 and arch.num_kv_heads % tensor == 0 else 1
    # each norm's input and output (4 norms with Gemma's sandwich norms; q/k norms per head), rotated q, k, the
    # values and the attention output, the MLP, attention's scores over every position (a sliding window masks
    # scores, it does not shorten them)
    norms = (4 if arch.sandwich_norms else 2) * 2 * d + (2 * (q + kv) if arch.qk_norm else 0) / heads_split
    scores = 3 * arch.num_heads * (positions + prefix_tokens) / heads_split
    attention = 2 * q / split(q) + 2 * kv / split(kv) + scores
    per_token_layer = norms + attention + 4 * ff / split(ff)
    tokens = batch_size * positions
    rows = min(tokens, loss_chunk(arch.vocab_size)) if loss_rows is None else loss_rows
    # the head's float32 logits, their softmax and its gradient, one chunk of tokens at a time (peftjax.train.loss),
    # and the gradient of the final hidden states that the loss keeps for the backward pass
    head = rows * 3 * (arch.vocab_size // vocab_split) * 4 + tokens * d * compute_bytes
    if remat:
        layers = tokens * (arch.num_layers * d + per_token_layer) * compute_bytes
    else:
        layers = tokens * arch.num_layers * per_token_layer * compute_bytes
    return int(layers + head)


def _mesh_split(arch: LlamaConfig, layout, batch_size: int, positions: int) -> dict:
    """Per-device activation arguments of :func:`activation_bytes` on ``layout``'s mesh: the device's rows (the
    batch split over ``data`` x ``fsdp`` as far as it divides, :meth:`~peftjax.sharding.Layout.batch`), the
    tensor-parallel width, and the loss's logits per loop step: each device takes loss_chunk / W of its rows
    (:mod:`peftjax.train.loss`), the rows of devices that hold different slices of the vocabulary are gathered."""
    from peftjax.sharding import EMBEDDING_AXES, mesh_axes
    from peftjax.train.step import loss_chunk

    sizes = layout.mesh.shape
    ways = lambda axes: math.prod(sizes[a] for a in axes)  # noqa: E731
    row_axes = mesh_axes(layout.batch(batch_size).spec[0])
    vocab_axes = mesh_axes(layout.logical_spec((arch.vocab_size, arch.hidden_size),
                                               EMBEDDING_AXES["embed_tokens"])[0])
    rows = batch_size // ways(row_axes)
    per_step = min(max(loss_chunk(arch.vocab_size) // ways(row_axes), 1), rows * positions)
    return {"batch_size": rows, "tensor": sizes["tensor"], "vocab_split": ways(vocab_axes),
            "loss_rows": per_step * ways(set(row_axes) & set(vocab_axes))}


def estimate(model: str, method: str, *, rank: int = 8, targets: str | None = None, batch_size: int = 1,
             seq_len: int = 512, weight_dtype: str = "bfloat16", trainable_dtype: str = "float32",
             compute_dtype: str = "bfloat16", remat: bool = False, num_tokens: int | None = None,
             num_layers: int | None = None, mesh: dict[str, int | None] | None = None) -> MemoryEstimate:
    """Memory of training ``model`` with ``method`` (a preset such as ``qlora``, or a registered method);
    ``num_layers``: its first decoder layers only (as ``model.num_layers`` builds it). With ``mesh``
    (``{"data": D, "fsdp": F, "tensor": T}``) every figure is per device of that mesh, laid out by
    :class:`peftjax.sharding.Layout` as a run lays it out: each array's shard, the device's rows of the batch, and
    under FSDP the linear layers' weights gathered for compute."""
    from peftjax.peft import get_method

    arch, tied = architecture(model)
    if num_layers is not None:
        if not 1 <= num_layers <= arch.num_layers:
            raise PeftjaxError(f"num_layers must be between 1 and {arch.num_layers}, got {num_layers}")
        arch = dataclasses.replace(arch, num_layers=num_layers)
    label = method
    for name, size in (("weight_dtype", weight_dtype), ("trainable_dtype", trainable_dtype),
                       ("compute_dtype", compute_dtype)):
        if size not in DTYPE_BYTES:
            raise PeftjaxError(f"--{name.replace('_', '-')} must be one of {', '.join(DTYPE_BYTES)}, got {size!r}")
    if batch_size < 1 or seq_len < 1:
        raise PeftjaxError(f"--batch-size and --seq-len must be >= 1, got {batch_size} and {seq_len}")
    config = method_run_config(method, rank=rank, targets=targets, num_tokens=num_tokens)
    registration = get_method(config.method)
    layout_mesh = None if mesh is None else abstract_mesh(mesh)
    builds = [_abstract_build(arch, n, config, layout_mesh) for n in (1, 2)]
    trainable_bytes, weight_bytes = DTYPE_BYTES[trainable_dtype], DTYPE_BYTES[weight_dtype]
    (t1, tb1, tg1), (t2, tb2, tg2) = (_storage(b.trainable, trainable_bytes, b.layout) for b in builds)
    (f1, fb1, fg1), (f2, fb2, fg2) = (_storage(b.frozen, weight_bytes, b.layout) for b in builds)
    layers = arch.num_layers

    def extrapolate(one, two):
        return one + (layers - 1) * (two - one)

    trainable, adapter = extrapolate(t1, t2), extrapolate(tb1, tb2)
    frozen, weights = extrapolate(f1, f2), extrapolate(fb1, fb2)
    gathered = extrapolate(tg1 + fg1, tg2 + fg2)
    layout = builds[0].layout
    virtual, prefix = registration.extra_positions(config.peft)
    split = {} if layout is None else _mesh_split(arch, layout, batch_size, seq_len + virtual)
    vocab_split = split.get("vocab_split", 1)
    if not tied:  # a separate output head (V x d), kept dense and split like the embedding; full FT trains it
        head = arch.vocab_size * arch.hidden_size
        if registration.trains_base:
            trainable, adapter = trainable + head, adapter + head // vocab_split * trainable_bytes
        else:
            frozen, weights = frozen + head, weights + head // vocab_split * weight_bytes
    here = adapter // trainable_bytes  # trainable parameters this device holds (all of them on one device)
    if registration.trains_base:
        # full fine-tuning holds the weights in the weight dtype (bf16 in the classic tables) ...
        weights, adapter = weights + here * weight_bytes, 0
        gradients = here * weight_bytes
        master = here * 4 if weight_bytes < 4 else 0  # ... and a float32 master copy for the update
        optimizer = here * 8 + master
    else:
        gradients = here * trainable_bytes
        optimizer = here * 8
    acts = activation_bytes(arch, **{"batch_size": batch_size, **split}, seq_len=seq_len,
                            compute_bytes=DTYPE_BYTES[compute_dtype], remat=remat, virtual_tokens=virtual,
                            prefix_tokens=prefix)
    return MemoryEstimate(model=model, method=label, total_params=trainable + frozen, trainable_params=trainable,
                          weights=weights, adapter=adapter, gradients=gradients, optimizer=optimizer,
                          activations=acts, gathered=gathered, mesh=None if mesh is None else dict(layout.mesh.shape))


def bf16_weight_table(models: list[str]) -> str:
    """The classic table: bf16 weight memory, GiB of the exact parameter count, and its whole-GB form."""
    lines = ["| model | parameters | bf16 weights | classic table |", "|---|---|---|---|"]
    for name in models:
        n = estimate(name, "full").total_params  # full fine-tuning adds no parameters
        lines.append(f"| {name} | {n:,} | {2 * n / GIB:.2f} GiB | {math.floor(2 * n / GIB)} GB |")
    return "\n".join(lines)


def methods_table(models: list[str], *, batch_size: int, seq_len: int, rank: int = 8) -> str:
    """Total training memory per model for full fine-tuning (AdamW, mixed precision), LoRA and QLoRA, and QLoRA
    with activation checkpointing (the QLoRA paper's setting)."""
    lines = [f"| model | full FT (AdamW) | LoRA r={rank} | QLoRA r={rank} (NF4+DQ) | QLoRA r={rank} + checkpointing |",
             "|---|---|---|---|---|"]
    for name in models:
        cells = [f"{estimate(name, m, rank=rank, batch_size=batch_size, seq_len=seq_len, remat=remat).total / GIB:.1f}"
                 " GiB" for m, remat in (("full", False), ("lora", False), ("qlora", False), ("qlora", True))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def human(nbytes: float) -> str:
    return f"{nbytes / GIB:.3f} GiB" if nbytes >= GIB / 4 else f"{nbytes / 2**20:.1f} MiB"


def breakdown_table(e: MemoryEstimate) -> str:
    rows = [("weights (frozen base)", e.weights), ("adapter (trainable)", e.adapter), ("gradients", e.gradients),
            ("optimizer state", e.optimizer), ("activations", e.activations)]
    if e.mesh is not None:
        rows.append(("weights gathered for compute (FSDP)", e.gathered))
    rows.append(("total" if e.mesh is None else "total per device", e.total))
    where = "" if e.mesh is None else (", per device of the mesh " + " x ".join(f"{a}={n}" for a, n in e.mesh.items()))
    lines = [f"{e.model}, {e.method}: {e.total_params:,} parameters, {e.trainable_params:,} trainable "
             f"({100 * e.trainable_params / e.total_params:.3g}%){where}", "", "| part | memory |", "|---|---|"]
    lines += [f"| {name} | {human(nbytes)} |" for name, nbytes in rows]
    return "\n".join(lines)


def measure_step(model: str, method: str, *, rank: int = 8, targets: str | None = None, batch_size: int = 1,
                 seq_len: int = 512, remat: bool = False) -> dict:
    """XLA's allocation for the real compiled train step (the analogue of a GPU's peak allocated memory).

    Builds the model named ``model`` (``smollm2`` or ``tiny``: weights are needed) with ``method`` exactly as a
    float32 training run does, compiles one train step and returns :func:`peftjax.train.step_memory`: ``arguments``
    (frozen base, trainable, optimizer state, batch), ``temp`` (activations, gradients, workspace), ``outputs`` not
    aliased to an argument, and ``total``.
    """
    return measure_steps(model, method, rank=rank, targets=targets, batch_sizes=(batch_size,), seq_len=seq_len,
                         remat=remat)[batch_size]


def measure_steps(model: str, method: str, *, rank: int = 8, targets: str | None = None,
                  batch_sizes=(1,), seq_len: int = 512, remat: bool = False,
                  num_layers: int | None = None) -> dict[int, dict]:
    """:func:`measure_step` at each of ``batch_sizes`` from one build of the model (its first ``num_layers``
    decoder layers when given): {batch size: allocation}."""
    import jax.numpy as jnp

    from peftjax import partition
    from peftjax.train import build, make_optimizer, make_regularizer, make_train_step, step_memory

    config = method_run_config(method, model=model, rank=rank, targets=targets)
    config.model.remat = remat
    config.model.num_layers = num_layers
    trained = build(config, with_data=False).model
    graphdef, trainable, frozen = partition.split(trained)
    optimizer = make_optimizer(config.train, config.peft)
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer, jnp.float32, remat=remat, regularizer=make_regularizer(config.peft))
    return {b: step_memory(step.lower(trainable, opt_state, frozen, jnp.zeros((b, seq_len + 1), jnp.int32),
                                      None).compile())
            for b in batch_sizes}


def measure_mesh_step(model: str, method: str, mesh: dict[str, int | None], *, rank: int = 8,
                      targets: str | None = None, batch_size: int = 1, seq_len: int = 512, remat: bool = False,
                      num_layers: int | None = None) -> dict:
    """XLA's allocation per device for the compiled sharded train step of ``model`` (any architecture
    :func:`architecture` knows: shapes only, no weights are read or allocated) with ``method`` on a mesh of this
    process's devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` makes N virtual CPU devices): the
    step :func:`peftjax.train.placement.plan` builds for a run, float32 throughout, lowered from abstract
    arguments. Returns :func:`peftjax.train.step_memory` of one device's program."""
    import jax.numpy as jnp

    from peftjax.sharding import make_mesh
    from peftjax.train import make_optimizer, make_regularizer, step_memory
    from peftjax.train.placement import plan

    arch, _ = architecture(model)
    config = method_run_config(method, rank=rank, targets=targets)
    from peftjax.sharding import MESH_AXES

    mesh = {a: mesh.get(a) or 1 for a in MESH_AXES}
    devices = math.prod(mesh.values())
    if len(jax.devices()) < devices:
        raise PeftjaxError(f"measuring a mesh of {devices} devices needs {devices} devices, this process has "
                           f"{len(jax.devices())}; on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count="
                           f"{devices}")
    b = _abstract_build(arch, num_layers or arch.num_layers, config,
                        make_mesh(mesh, jax.devices()[:devices]), tied=False)
    optimizer = make_optimizer(config.train, config.peft)
    p = plan(b.layout, b.graphdef, b.trainable, b.frozen, optimizer, batch_size=batch_size, remat=remat,
             regularizer=make_regularizer(config.peft))
    opt_state = jax.eval_shape(optimizer.init, b.trainable)
    batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)
    return step_memory(p.step.lower(b.trainable, opt_state, b.frozen, batch, None).compile())


CLASSIC = ["llama2-70b", "llama2-13b", "llama2-7b", "mistral-7b"]
MODERN = ["llama3.1-8b", "qwen2.5-7b", "gemma2-9b"]  # models researchers fine-tune today
