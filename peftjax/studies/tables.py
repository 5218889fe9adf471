"""Named table layouts for the reproductions: ``peftjax report DIR --table NAME``.

Each layout turns a sweep's records (``DIR/results.jsonl``) into the table a paper prints, plus its plots:

- ``lora-vs-qlora``: Technique | Epochs | Training time | Memory, with quality and trainable parameters (memory
  three ways: the frozen weights, XLA's allocation for the step, which is what a GPU user sees, and the process's
  peak RSS over training and over loading);
- ``rank``: held-out loss per LoRA rank, one column per target set (the LoRA paper's rank tables);
- ``bits``: per base format, bits per frozen parameter, loss of the quantized base before training and after
  LoRA (the QLoRA paper's comparison of data types);
- ``methods``: trainable parameters, memory, time and quality per PEFT method at equal steps.

Values that differ over seeds are shown as mean ± std.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from peftjax.errors import PeftjaxError
from peftjax.config import label as method_label
from peftjax.studies.report import GIB, MIB, group_key, load_results, markdown_table, without_seed

TABLES: dict[str, Callable] = {}


def table(name: str):
    def register(fn):
        TABLES[name] = fn
        return fn
    return register


def _groups(records: list[dict]) -> list[tuple[dict, list[dict]]]:
    """(point without its seed, the group's summaries) in first-seen order; groups as in the generic report."""
    groups: dict[tuple, tuple[dict, list[dict]]] = {}
    for r in records:
        groups.setdefault(group_key(r["point"]), (without_seed(r["point"]), []))[1].append(r["summary"])
    return list(groups.values())


def _stat(summaries: list[dict], key: str, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    values = np.array([s[key] for s in summaries], dtype=float) / scale
    text = fmt.format(values.mean())
    return text + (" ± " + fmt.format(values.std(ddof=1)) if len(values) > 1 else "")


def _mean(summaries: list[dict], key: str) -> float:
    return float(np.mean([s[key] for s in summaries]))


def _frozen_bits(s: dict) -> float:
    return 8.0 * s["frozen_bytes"] / max(1, s["total_params"] - s["trainable_params"])


def _label(point: dict, summary: dict) -> str:
    return str(point.get("name") or method_label(summary))


def _plot(out: Path, name: str, draw) -> str | None:
    from peftjax.studies.report import pyplot

    plt = pyplot()
    if plt is None:  # matplotlib is optional: the table is written without its plot
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


@table("lora-vs-qlora")
def lora_vs_qlora(records: list[dict], out: Path) -> tuple[str, list[str]]:
    header = ["Technique", "Epochs", "Training time", "Frozen weights", "Step device memory", "Peak RSS (training)",
              "Peak RSS (loading)", "Trainable params", "Eval loss before -> after", "tokens/s"]
    rows = []
    for point, ss in _groups(records):
        s = ss[0]
        steady = "peak_rss_steady_bytes" if all(x.get("peak_rss_steady_bytes") for x in ss) else "peak_rss_bytes"
        rows.append([method_label(s), f"{_mean(ss, 'epochs'):.4f}", _stat(ss, "train_s", "{:.0f}") + " s",
                     f"{s['frozen_bytes'] / MIB:.1f} MiB", _stat(ss, "step_device_bytes", "{:.0f}", MIB) + " MiB",
                     _stat(ss, steady, "{:.2f}", GIB) + " GiB", _stat(ss, "peak_rss_load_bytes", "{:.2f}", GIB) + " GiB",
                     f"{s['trainable_params']:,}",
                     _stat(ss, "eval_loss_before") + " -> " + _stat(ss, "eval_loss_after"),
                     _stat(ss, "tokens_per_s", "{:.0f}")])
    note = ("\n\nStep device memory: XLA's allocation for the compiled train step (frozen base, adapter, optimizer "
            "state, activations, workspace), what a GPU user sees as the device's memory in use. Peak RSS: the whole "
            "process on this CPU (runtime, compiled code, allocator retention, data included), over the training "
            "steps after the first, and over loading (reading, quantizing and adapting the base).")
    return markdown_table(header, rows) + note, []


@table("rank")
def rank_table(records: list[dict], out: Path) -> tuple[str, list[str]]:
    cells: dict[int, dict[str, list[dict]]] = {}
    target_sets = []
    for point, ss in _groups(records):
        if "peft.rank" not in point:
            raise PeftjaxError("the rank table needs a sweep over peft.rank")
        targets = str(point.get("name", "")).split(",")[0] or str(point.get("peft.targets"))
        if targets not in target_sets:
            target_sets.append(targets)
        cells.setdefault(int(point["peft.rank"]), {})[targets] = ss
    header = ["r"] + [f"{t}: eval loss (trainable params)" for t in target_sets]
    base = [s["eval_loss_before"] for by_t in cells.values() for ss in by_t.values() for s in ss]
    rows = []
    for r in sorted(cells):
        row = [str(r)]
        for t in target_sets:
            ss = cells[r].get(t)
            row.append(f"{_stat(ss, 'eval_loss_after')} ({ss[0]['trainable_params']:,})" if ss else "")
        rows.append(row)

    def draw(ax):
        for t in target_sets:
            ranks = [r for r in sorted(cells) if t in cells[r]]
            ax.plot(ranks, [_mean(cells[r][t], "eval_loss_after") for r in ranks], marker="o", label=t)
        ax.axhline(float(np.mean(base)), color="grey", linestyle="--", label="before training")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("held-out loss after training")
        ax.legend()

    text = markdown_table(header, rows) + f"\n\nHeld-out loss before training: {np.mean(base):.3f}."
    return text, [_plot(out, "rank_ablation.png", draw)]


@table("bits")
def bits_table(records: list[dict], out: Path) -> tuple[str, list[str]]:
    header = ["Base", "bits/param (linear layers)", "Frozen weights", "Loss before (quantized, untrained)",
              "Loss after LoRA", "Gap to the unquantized base + LoRA"]
    groups = _groups(records)
    reference = next((ss for point, ss in groups if not point.get("quant.format")), None)
    ref_after = _mean(reference, "eval_loss_after") if reference else None
    rows, points = [], []
    for point, ss in groups:
        s = ss[0]
        before, after = _mean(ss, "eval_loss_before"), _mean(ss, "eval_loss_after")
        bits = s.get("linear_bits_per_param") or _frozen_bits(s)
        gap = f"{after - ref_after:+.3f}" if ref_after is not None else "-"
        rows.append([_label(point, s), f"{bits:.3f}", f"{s['frozen_bytes'] / MIB:.1f} MiB",
                     _stat(ss, "eval_loss_before"), _stat(ss, "eval_loss_after"), gap])
        points.append((_label(point, s), bits, before, after))

    def draw(ax):
        for label, bits, before, after in points:
            ax.annotate("", xy=(bits, after), xytext=(bits, before), arrowprops=dict(arrowstyle="->", color="C0"))
            ax.scatter([bits], [before], color="C3", s=12)
            ax.scatter([bits], [after], color="C0", s=12)
            ax.annotate(label, (bits, before), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per parameter of the linear layers")
        ax.set_ylabel("held-out loss (red: quantized base, blue: + LoRA)")
        ax.set_yscale("log")

    return markdown_table(header, rows), [_plot(out, "loss_vs_bits.png", draw)]


@table("methods")
def methods_table(records: list[dict], out: Path) -> tuple[str, list[str]]:
    header = ["Method", "Trainable params", "Frozen weights", "Trainable + optimizer", "Peak RSS", "Step",
              "tokens/s", "Training time", "Eval loss before -> after"]
    rows, bars = [], []
    for point, ss in _groups(records):
        s = ss[0]
        pct = 100.0 * s["trainable_params"] / s["total_params"]
        rows.append([_label(point, s), f"{s['trainable_params']:,} ({pct:.3g}%)", f"{s['frozen_bytes'] / MIB:.1f} MiB",
                     f"{(s['trainable_bytes'] + s['optimizer_bytes']) / MIB:.1f} MiB",
                     _stat(ss, "peak_rss_bytes", "{:.2f}", GIB) + " GiB", _stat(ss, "median_step_s", "{:.2f}") + " s",
                     _stat(ss, "tokens_per_s", "{:.0f}"), _stat(ss, "train_s", "{:.0f}") + " s",
                     _stat(ss, "eval_loss_before") + " -> " + _stat(ss, "eval_loss_after")])
        bars.append((_label(point, s), _mean(ss, "eval_loss_after"), s["trainable_params"]))

    def draw(ax):
        ax.scatter([b[2] for b in bars], [b[1] for b in bars])
        for label, loss, params in bars:
            ax.annotate(label, (params, loss), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out loss after training")

    return markdown_table(header, rows), [_plot(out, "methods.png", draw)]


def write_table(sweep_dir, name: str) -> tuple[str, list[str]]:
    """``DIR/table.md`` (and plots) in the layout ``name``; returns the markdown and the plot names."""
    if name not in TABLES:
        raise PeftjaxError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    out = Path(sweep_dir)
    text, plots = TABLES[name](load_results(out), out)
    plots = [p for p in plots if p is not None]
    (out / "table.md").write_text(text + "\n" + "".join(f"\n![{p}]({p})\n" for p in plots))
    return text, plots
