"""Scale-out equality: the same training on a device mesh and on one device, layout by layout.

For each method (LoRA; QLoRA = NF4 blocks of 64 + double quantization) and each mesh layout, the model is built
from the same config, placed by :func:`peftjax.train.placement.place` (the code path of ``peftjax train``) and
trained ``steps`` steps on the same batches. SPMD partitioning changes only the order of floating-point sums, so
the loss trajectory and the trained adapter must equal the single-device run's to float32 rounding; the frozen
tree's per-device bytes are read from its arrays' shardings. Run under 8 (virtual) devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m peftjax.studies.scale --out results.json

``--memory-out memory.json`` also checks ``peftjax memory --mesh``: the per-device estimate of each layout against
XLA's per-device allocation for the compiled sharded step on SmolLM2's shape (:func:`memory_table`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np

from peftjax import sharding
from peftjax.config import from_dict
from peftjax.data import index_batches
from peftjax.quant import QArray
from peftjax.quant.double_quant import DoubleQuantScales
from peftjax.train import build, make_optimizer, make_regularizer
from peftjax.train.placement import place

LAYOUTS = {"DP=8": {"data": 8}, "FSDP=8": {"data": 1, "fsdp": 8}, "TP=2 x DP=4": {"data": 4, "tensor": 2},
           "FSDP=4 x DP=2": {"data": 2, "fsdp": 4}}
METHODS = {"LoRA": None, "QLoRA": {"format": "nf4", "block_size": 64, "double_quant": True}}


def tiny_config(files: list[str], quant: dict | None, steps: int = 5) -> dict:
    """The tiny model cut to one decoder layer (one compilation per layout stays short), LoRA rank 8 on every linear
    layer, batches of 8 blocks of 32 tokens, AdamW at 1e-3. (Adam divides each gradient element by its own running
    magnitude, so an element whose gradient is a near-cancelling sum keeps its relative rounding error in the
    update: parameter differences scale with the learning rate; at 1e-2 they reached 1.1e-5.)"""
    return {"model": {"name": "tiny", "num_layers": 1},
            "peft": {"method": "lora", "rank": 8, "alpha": 16, "targets": "all-linear"},
            "quant": quant, "data": {"dataset": "files", "files": files, "seq_len": 32, "eval_docs": 1,
                                     "max_eval_blocks": 2},
            "train": {"steps": steps, "batch_size": 8, "learning_rate": 1e-3}}


def train_on_mesh(config_dict: dict, mesh) -> dict:
    """Losses of every step, the trained trainable leaves (host arrays) and the frozen tree's bytes."""
    config = from_dict(config_dict)
    tc = config.train
    built = build(config)
    placed = place(built.model, mesh, make_optimizer(tc, config.peft), batch_size=tc.batch_size,
                   regularizer=make_regularizer(config.peft))  # the method's hooks, as a run has them
    trainable, opt_state = placed.trainable, placed.opt_state
    batches = index_batches(len(built.data.train), tc.batch_size, tc.seed)
    losses = []
    for _ in range(tc.steps):
        batch = sharding.put_rows(built.data.train_batch, [next(batches)], placed.batch_sharding)
        trainable, opt_state, metrics = placed.step(trainable, opt_state, placed.frozen, batch, None)
        losses.append(float(metrics["loss"]))
    split, whole = split_bytes(placed.frozen)
    specs = {_key(path): str(x.sharding.spec) for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    moments = [(_key(path), str(x.sharding.spec)) for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]]
    return {"losses": losses, "blocks_aligned": blocks_aligned(placed.frozen), "trainable_specs": specs,
            "optimizer_like_params": _like_params(moments, specs),
            "trainable": [np.asarray(x) for x in jax.tree.leaves(trainable)], "frozen_bytes": split + whole,
            "frozen_bytes_per_device": sharding.per_device_nbytes(placed.frozen), "split_bytes": split,
            "whole_bytes": whole}


def _like_params(moments: list[tuple[str, str]], specs: dict[str, str]) -> bool:
    """Whether AdamW's two moments of every parameter (optimizer-state leaves whose path ends in the parameter's)
    have the parameter's PartitionSpec."""
    pairs = [(spec, specs[k]) for path, spec in moments for k in specs if path.endswith("/" + k)]
    return len(pairs) == 2 * len(specs) and all(a == b for a, b in pairs)


def _key(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def split_bytes(frozen) -> tuple[int, int]:
    """(bytes a model-parallel layout splits, bytes every device keeps) of a frozen tree, by kind of leaf alone (not
    by its sharding): 2-D weights and a QArray's codes and per-block scales (or their double-quantized codes) are
    split; 1-D norm scales and the second-level statistics of double quantization are kept whole."""
    split = whole = 0
    for leaf in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, QArray)):
        if isinstance(leaf, QArray):
            per_block = leaf.scales.codes if leaf.double_quant else leaf.scales
            split += leaf.codes.nbytes + per_block.nbytes
            whole += leaf.nbytes - leaf.codes.nbytes - per_block.nbytes
        elif leaf.ndim == 2:
            split += leaf.nbytes
        else:
            whole += leaf.nbytes
    return split, whole


def blocks_aligned(frozen) -> bool:
    """Whether every device holds the scales of exactly the blocks whose codes it holds, in every blockwise QArray:
    its shard of the codes covers elements [a, b) and its shard of the (first-level) scales blocks [a / block,
    b / block)."""
    for q in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, QArray)):
        if not isinstance(q, QArray) or q.block_size is None:
            continue
        scales = q.scales.codes if isinstance(q.scales, DoubleQuantScales) else q.scales
        per_byte = 8 // q.bits
        code_index = q.codes.sharding.addressable_devices_indices_map(q.codes.shape)
        scale_index = scales.sharding.addressable_devices_indices_map(scales.shape)
        for device, (codes_slice,) in code_index.items():
            (scales_slice,) = scale_index[device]
            first, last, _ = codes_slice.indices(q.codes.shape[0])
            block_first, block_last, _ = scales_slice.indices(scales.shape[0])
            if (first * per_byte, last * per_byte) != (block_first * q.block_size, block_last * q.block_size):
                return False
    return True


def equality_table(files: list[str], layouts: dict = LAYOUTS, methods: dict = METHODS, steps: int = 5) -> list[dict]:
    """One row per (layout, method): max |loss diff| and max |parameter diff| against one device, frozen bytes."""
    one = sharding.make_mesh({}, jax.devices()[:1])
    rows = []
    for method, quant in methods.items():
        config = tiny_config(files, quant, steps)
        ref = train_on_mesh(config, one)
        for name, axes in layouts.items():
            got = train_on_mesh({**config, "mesh": axes}, sharding.make_mesh(axes))
            rows.append({
                "layout": name, "mesh": axes, "method": method, "devices": jax.device_count(),
                "platform": jax.default_backend(), "jax_version": jax.__version__,
                "max_loss_diff": max(abs(a - b) for a, b in zip(got["losses"], ref["losses"], strict=True)),
                "max_param_diff": max(float(np.max(np.abs(a - b)))
                                      for a, b in zip(got["trainable"], ref["trainable"], strict=True)),
                "losses": got["losses"], "reference_losses": ref["losses"],
                "frozen_bytes": got["frozen_bytes"], "frozen_bytes_per_device": got["frozen_bytes_per_device"],
                "split_bytes": got["split_bytes"], "whole_bytes": got["whole_bytes"],
                "blocks_aligned": got["blocks_aligned"], "trainable_specs": got["trainable_specs"],
                "optimizer_like_params": got["optimizer_like_params"],
                "model_shards": axes.get("fsdp", 1) * axes.get("tensor", 1)})
    return rows


def format_table(rows: list[dict]) -> str:
    """The Markdown table of :func:`equality_table`'s rows."""
    lines = ["| layout | method | max abs loss diff | max abs param diff | frozen bytes | per device | "
             "split / (F T) + whole |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = r["split_bytes"] / r["model_shards"] + r["whole_bytes"]
        lines.append(f"| {r['layout']} | {r['method']} | {r['max_loss_diff']:.1e} | {r['max_param_diff']:.1e} | "
                     f"{r['frozen_bytes']:,} | {r['frozen_bytes_per_device']:,} | {ideal:,.0f} |")
    return "\n".join(lines) + "\n"


# the per-device memory check: SmolLM2's real widths, vocabulary and tied head, cut to its first decoder layers
# (the estimate is per layer plus the embedding), float32 throughout as the measured step
MEMORY_SHAPE = {"model": "smollm2", "num_layers": 2, "batch_size": 16, "seq_len": 128}
MEMORY_METHODS = {"LoRA": "lora", "QLoRA": "qlora"}


def memory_table(layouts: dict = LAYOUTS, methods: dict = MEMORY_METHODS, shape: dict = MEMORY_SHAPE) -> list[dict]:
    """One row per (layout, method): ``peftjax memory --mesh``'s per-device estimate against XLA's per-device
    allocation for the compiled sharded train step (:func:`peftjax.studies.memory.measure_mesh_step`)."""
    from peftjax.studies import memory as M

    options = {k: shape[k] for k in ("batch_size", "seq_len", "num_layers")}
    rows = []
    for method, preset in methods.items():
        for name, axes in layouts.items():
            measured = M.measure_mesh_step(shape["model"], preset, axes, **options)
            e = M.estimate(shape["model"], preset, weight_dtype="float32", compute_dtype="float32", mesh=axes,
                           **options)
            rows.append({"layout": name, "mesh": axes, "method": method, **shape, "devices": jax.device_count(),
                         "platform": jax.default_backend(), "jax_version": jax.__version__,
                         "estimate": {k: getattr(e, k) for k in ("weights", "adapter", "gradients", "optimizer",
                                                                  "activations", "gathered", "total")},
                         "measured": measured})
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """The Markdown table of :func:`memory_table`'s rows (MiB per device)."""
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    lines = ["| layout | method | estimate (MiB / device) | weights | activations | gathered (FSDP) | "
             "XLA: arguments | XLA: temporaries | XLA: total | estimate / XLA |", "|---" * 10 + "|"]
    for r in rows:
        e, m = r["estimate"], r["measured"]
        lines.append(f"| {r['layout']} | {r['method']} | {mib(e['total'])} | {mib(e['weights'])} | "
                     f"{mib(e['activations'])} | {mib(e['gathered'])} | {mib(m['arguments'])} | {mib(m['temp'])} | "
                     f"{mib(m['total'])} | {e['total'] / m['total']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file for the equality rows")
    p.add_argument("--memory-out", help="JSON file for the per-device memory rows (estimate against XLA)")
    p.add_argument("--files", nargs="+", help="text files of the files dataset (default: three written beside --out)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    if args.memory_out:
        rows = memory_table()
        Path(args.memory_out).write_text(json.dumps(rows, indent=1) + "\n")
        print(format_memory_table(rows))
    if args.out:
        out = Path(args.out)
        files = args.files or write_texts(out.parent)
        rows = equality_table(files, steps=args.steps)
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(format_table(rows))


def write_texts(directory: Path) -> list[str]:
    """Three small deterministic documents (one is held out)."""
    directory.mkdir(parents=True, exist_ok=True)
    line = "Enter two lords.\nFIRST LORD. What news, my lord?\nSECOND LORD. The king is dead; long live the king.\n"
    paths = []
    for i in range(3):
        paths.append(directory / f"play{i}.txt")
        paths[-1].write_text(line * (8 + i))
    return [str(p) for p in paths]


if __name__ == "__main__":
    main()
