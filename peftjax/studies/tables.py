"""Named table layouts for the reproductions: ``peftjax report DIR --table NAME``.

Each layout turns a sweep's records (``DIR/results.jsonl``) into the table a paper prints, plus its plots:

- ``lora-vs-qlora``: Technique | Epochs | Training time | Memory, with quality and trainable parameters (memory
  three ways: the frozen weights, XLA's allocation for the step, which is what a GPU user sees, and the process's
  peak RSS over training and over loading);
- ``rank``: held-out loss per LoRA rank, one column per target set (the LoRA paper's rank tables);
- ``bits``: per base format, bits per frozen parameter, loss of the quantized base before training and after
  LoRA (the QLoRA paper's comparison of data types);
- ``methods``: trainable parameters, memory, time and quality per PEFT method at equal steps.

Values that differ over seeds are shown as mean ± the half-width of their 95% confidence interval
(:mod:`peftjax.studies.stats`); each table says for its comparisons whether the intervals resolve them.
Accuracy (classification) and forgetting (general-text loss after minus before) get columns when the runs
recorded them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from peftjax.config import label as method_label
from peftjax.errors import PeftjaxError
from peftjax.studies import plots as P
from peftjax.studies.report import (CI_NOTE, GIB, MIB, fill_generated, group_key, load_results, markdown_table,
                                   without_seed)
from peftjax.studies.stats import Interval, difference, interval, paired, paired_text, resolved

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


def _by_seed(records: list[dict]) -> dict[tuple, dict]:
    """{group key (:func:`peftjax.studies.report.group_key`): {seed: summary}}: each group's runs by their
    ``train.seed`` (None where the point names none), the pairs :func:`peftjax.studies.stats.paired` takes."""
    out: dict[tuple, dict] = {}
    for r in records:
        out.setdefault(group_key(r["point"]), {})[r["point"].get("train.seed")] = r["summary"]
    return out


def _paired(seeds_a: dict, seeds_b: dict, metric: str):
    """:func:`peftjax.studies.stats.paired` of ``metric`` between two groups' {seed: summary}."""
    return paired(*({k: v[metric] for k, v in seeds.items() if v.get(metric) is not None}
                    for seeds in (seeds_a, seeds_b)))


def _iv(summaries: list[dict], key: str) -> Interval | None:
    values = [s.get(key) for s in summaries]
    return None if any(v is None for v in values) else interval(values)


def _stat(summaries: list[dict], key: str, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    iv = _iv(summaries, key)
    return "-" if iv is None else iv.format(fmt, scale)


def _frozen_bits(s: dict) -> float:
    return 8.0 * s["frozen_bytes"] / max(1, s["total_params"] - s["trainable_params"])


def _label(point: dict, summary: dict) -> str:
    return str(point.get("name") or method_label(summary))


def _optional(groups, header: list[str], rows: list[list[str]]) -> None:
    """Accuracy and forgetting columns, appended where any group recorded them."""
    for key, title, fmt in (("eval_accuracy_after", "Accuracy after", "{:.3f}"),
                            ("forgetting", "Forgetting (general loss after - before)", "{:+.3f}")):
        if any(_iv(ss, key) is not None for _, ss in groups):
            header.append(title)
            for row, (_, ss) in zip(rows, groups):
                row.append(_stat(ss, key, fmt))


def _versus(groups, reference: list[dict] | None, key: str = "eval_loss_after") -> list[str]:
    """Each group's difference in ``key`` to ``reference`` and whether the intervals resolve it."""
    if reference is None:
        return ["-" for _ in groups]
    ref = _iv(reference, key)
    return ["reference" if ss is reference else difference(_iv(ss, key), ref) for _, ss in groups]


def _note(groups) -> str:
    return P.seed_note(len(ss) for _, ss in groups)


def _counts(groups) -> str:
    return "/".join(map(str, sorted({len(ss) for _, ss in groups})))


def _plot(out: Path, name: str, make) -> str | None:
    plt = P.pyplot()
    if plt is None:  # matplotlib is optional: the table is written without its plot
        return None
    return P.save(plt, make(plt), out / name)


@table("lora-vs-qlora")
def lora_vs_qlora(records: list[dict], out: Path) -> tuple[str, list[str]]:
    groups = _groups(records)
    header = ["Technique", "Epochs", "Training time", "Frozen weights", "Step device memory",
              "Peak RSS (training)", "Peak RSS (loading)", "Trainable params", "Eval loss before -> after",
              "After vs the first row", "tokens/s", "Seeds"]
    rows = []
    versus = _versus(groups, groups[0][1])
    for (point, ss), vs in zip(groups, versus):
        s = ss[0]
        steady = "peak_rss_steady_bytes" if all(x.get("peak_rss_steady_bytes") for x in ss) else "peak_rss_bytes"
        rows.append([method_label(s), f"{_iv(ss, 'epochs').mean:.4f}", _stat(ss, "train_s", "{:.0f}") + " s",
                     f"{s['frozen_bytes'] / MIB:.1f} MiB", _stat(ss, "step_device_bytes", "{:.0f}", MIB) + " MiB",
                     _stat(ss, steady, "{:.2f}", GIB) + " GiB",
                     _stat(ss, "peak_rss_load_bytes", "{:.2f}", GIB) + " GiB", f"{s['trainable_params']:,}",
                     _stat(ss, "eval_loss_before") + " -> " + _stat(ss, "eval_loss_after"), vs,
                     _stat(ss, "tokens_per_s", "{:.0f}"), str(len(ss))])
    _optional(groups, header, rows)
    note = ("\n\nStep device memory: XLA's allocation for the compiled train step (frozen base, adapter, optimizer "
            "state, activations, workspace), what a GPU user sees as the device's memory in use. Peak RSS: the whole "
            "process on this CPU (runtime, compiled code, allocator retention, data included), over the training "
            f"steps after the first, and over loading (reading, quantizing and adapting the base). Values: {CI_NOTE}.")
    return markdown_table(header, rows) + note, []


@table("rank")
def rank_table(records: list[dict], out: Path) -> tuple[str, list[str]]:
    cells: dict[int, dict[str, list[dict]]] = {}
    keys: dict[tuple[int, str], tuple] = {}  # (r, targets) -> the group's key
    target_sets = []
    groups = _groups(records)
    for point, ss in groups:
        if "peft.rank" not in point:
            raise PeftjaxError("the rank table needs a sweep over peft.rank")
        targets = str(point.get("name", "")).split(",")[0] or str(point.get("peft.targets"))
        if targets not in target_sets:
            target_sets.append(targets)
        cells.setdefault(int(point["peft.rank"]), {})[targets] = ss
        keys[int(point["peft.rank"]), targets] = group_key(point)
    seeds = _by_seed(records)

    def pair(r_a: int, t_a: str, r_b: int, t_b: str) -> str:
        return paired_text(_paired(seeds[keys[r_a, t_a]], seeds[keys[r_b, t_b]], "eval_loss_after"))

    header = ["r"] + [f"{t}: eval loss (trainable params)" for t in target_sets]
    rows = []
    for r in sorted(cells):
        row = [str(r)]
        for t in target_sets:
            ss = cells[r].get(t)
            row.append(f"{_stat(ss, 'eval_loss_after')} ({ss[0]['trainable_params']:,})" if ss else "")
        rows.append(row)
    before = interval([s["eval_loss_before"] for _, ss in groups for s in ss])
    lines = [f"Held-out loss before training: {before.mean:.3f}. Seeds per cell: {_counts(groups)}; {CI_NOTE}."]
    for t in target_sets:
        ivs = {r: _iv(cells[r][t], "eval_loss_after") for r in sorted(cells) if t in cells[r]}
        best = min(ivs, key=lambda r: ivs[r].mean)
        ties = [str(r) for r in ivs if r != best and not resolved(ivs[r], ivs[best])]
        lines.append(f"- {t}: lowest loss at r={best}; not resolved from it: "
                     + (f"r={', '.join(ties)}" if ties else "none") + ".")
    lines.append("\nPaired differences (the two cells' losses seed by seed, whose runs share data order and "
                 "initialisation; mean ± 95% CI half-width; resolved when the interval excludes 0):")
    ranks = {t: [r for r in sorted(cells) if t in cells[r]] for t in target_sets}
    for t in target_sets:
        if len(ranks[t]) > 1:
            lo, hi = ranks[t][0], ranks[t][-1]
            lines.append(f"- {t}: r={hi} - r={lo}: {pair(hi, t, lo, t)}")
    a = target_sets[0]
    for b in target_sets[1:]:  # each later column against the first: its lowest rank vs the first's highest
        lines.append(f"- {b} at r={ranks[b][0]} - {a} at r={ranks[a][-1]}: {pair(ranks[b][0], b, ranks[a][-1], a)}")
        common = [r for r in ranks[a] if r in ranks[b]]  # and the two at the highest rank both ran
        if common:
            lines.append(f"- {b} - {a} at r={common[-1]}: {pair(common[-1], b, common[-1], a)}")

    def make(plt):
        fig, ax = P.new_figure(plt, f"{out.name}: held-out loss vs LoRA rank\n({_note(groups)})",
                               "LoRA rank r (log scale)", "held-out loss after training (nats/token)")
        for i, t in enumerate(target_sets):
            ivs = [_iv(cells[r][t], "eval_loss_after") for r in ranks[t]]
            dodge = 2 ** (0.06 * (i - (len(target_sets) - 1) / 2))  # side by side: error bars do not overlap
            ax.errorbar([r * dodge for r in ranks[t]], [v.mean for v in ivs], yerr=[v.half or 0.0 for v in ivs],
                        capsize=3, label=t, **P.style(i))
        ax.axhline(before.mean, color="grey", linestyle="--", label="before training")
        ax.set_xscale("log", base=2)
        P.outside_legend(ax, "configuration")
        return fig

    return markdown_table(header, rows) + "\n\n" + "\n".join(lines), [_plot(out, "rank_ablation.png", make)]


@table("bits")
def bits_table(records: list[dict], out: Path) -> tuple[str, list[str]]:
    header = ["Base", "Seeds", "bits/param (linear layers)", "Frozen weights", "Loss before (quantized, untrained)",
              "Loss after LoRA", "Gap to the unquantized base + LoRA"]
    groups = _groups(records)
    reference = next((ss for point, ss in groups if not point.get("quant.format")), None)
    rows, points = [], []
    for (point, ss), gap in zip(groups, _versus(groups, reference)):
        s = ss[0]
        bits = s.get("linear_bits_per_param") or _frozen_bits(s)
        rows.append([_label(point, s), str(len(ss)), f"{bits:.3f}", f"{s['frozen_bytes'] / MIB:.1f} MiB",
                     _stat(ss, "eval_loss_before"), _stat(ss, "eval_loss_after"), gap])
        points.append((f"{_label(point, s)} ({bits:.2f} bits)", bits, _iv(ss, "eval_loss_before"),
                       _iv(ss, "eval_loss_after")))
    _optional(groups, header, rows)
    points.sort(key=lambda p: -p[1])

    def make(plt):
        fig, ax = P.new_figure(plt, f"{out.name}: held-out loss per base format "
                               f"({_note(groups)})", "held-out loss (nats/token)", "",
                               height=max(3.0, 0.4 * len(points) + 1.5))
        ys = range(len(points))
        for what, k, marker, color in (("quantized base, before training", 2, "o", "C3"),
                                       ("after LoRA", 3, "s", "C0")):
            ax.errorbar([p[k].mean for p in points], ys, xerr=[p[k].half or 0.0 for p in points], linestyle="none",
                        marker=marker, color=color, capsize=3, label=what)
        ax.set_yticks(list(ys), [p[0] for p in points], fontsize=8)
        ax.invert_yaxis()
        P.outside_legend(ax)
        return fig

    return (markdown_table(header, rows) + f"\n\nValues: {CI_NOTE}."), [_plot(out, "loss_vs_bits.png", make)]


@table("methods")
def methods_table(records: list[dict], out: Path) -> tuple[str, list[str]]:
    header = ["Method", "Seeds", "Trainable params", "Frozen weights", "Trainable + optimizer", "Peak RSS", "Step",
              "tokens/s", "Training time", "Eval loss before -> after", "After vs the best"]
    groups = _groups(records)
    best_point, best = min(groups, key=lambda g: _iv(g[1], "eval_loss_after").mean)
    rows, points = [], []
    for (point, ss), vs in zip(groups, _versus(groups, best)):
        s = ss[0]
        pct = 100.0 * s["trainable_params"] / s["total_params"]
        rows.append([_label(point, s), str(len(ss)), f"{s['trainable_params']:,} ({pct:.3g}%)",
                     f"{s['frozen_bytes'] / MIB:.1f} MiB",
                     f"{(s['trainable_bytes'] + s['optimizer_bytes']) / MIB:.1f} MiB",
                     _stat(ss, "peak_rss_bytes", "{:.2f}", GIB) + " GiB", _stat(ss, "median_step_s", "{:.2f}") + " s",
                     _stat(ss, "tokens_per_s", "{:.0f}"), _stat(ss, "train_s", "{:.0f}") + " s",
                     _stat(ss, "eval_loss_before") + " -> " + _stat(ss, "eval_loss_after"),
                     "best" if vs == "reference" else vs])
        points.append(P.Point(_label(point, s), interval([s["trainable_params"]]), _iv(ss, "eval_loss_after")))
    _optional(groups, header, rows)

    def make(plt):
        return P.scatter(plt, points, title=f"{out.name}: held-out loss vs trainable parameters "
                         f"({_note(groups)})", xlabel="trainable parameters (log scale)",
                         ylabel="held-out loss after training (nats/token)", xlog=True)

    text = markdown_table(header, rows) + f"\n\nValues: {CI_NOTE}."
    paired_lines = _paired_against(records, groups, group_key(best_point), ("eval_loss_after", "eval loss after"),
                                   ("forgetting", "forgetting"))
    return text + paired_lines, [_plot(out, "methods.png", make)]


def _paired_against(records: list[dict], groups, reference: tuple, *metrics: tuple[str, str]) -> str:
    """Lines of each of ``groups``' rows' paired difference to the ``reference`` group (its group key) in each
    metric, seed by seed over the seeds both ran (:func:`peftjax.studies.stats.paired`); empty when no row shares
    two seeds with it."""
    seeds = _by_seed(records)
    labels = {group_key(point): _label(point, ss[0]) for point, ss in groups}
    lines = []
    for key, runs in seeds.items():
        if key == reference:
            continue
        parts = [f"{title} {paired_text(iv)}" for metric, title in metrics
                 if (iv := _paired(runs, seeds[reference], metric)) is not None]
        if parts:
            lines.append(f"- {labels[key]}: " + "; ".join(parts))
    if not lines:
        return ""
    head = (f"\n\nPaired against the best row ({labels[reference]}), seed by seed over the seeds both ran (runs of "
            "one seed share data order; mean ± 95% CI half-width; resolved when the interval excludes 0):\n")
    return head + "\n".join(lines)


def write_table(sweep_dir, name: str) -> tuple[str, list[str]]:
    """``DIR/table.md`` (and plots) in the layout ``name``; returns the markdown and the plot names."""
    if name not in TABLES:
        raise PeftjaxError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    out = Path(sweep_dir)
    text, plots = TABLES[name](load_results(out), out)
    plots = [p for p in plots if p is not None]
    (out / "table.md").write_text(text + "\n" + "".join(f"\n![{p}]({p})\n" for p in plots))
    fill_generated(out / "README.md", "table.md", text)  # a recorded study's README shows the same table
    return text, plots
