"""Tables that compare runs, from their ``summary.json`` files."""
from __future__ import annotations

from peftjax.config import label as method_label

GIB, MIB = 1024 ** 3, 1024 ** 2


def _mem(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def comparison_table(summaries: list[dict]) -> str:
    """Markdown table: method, trainable params (% of total), frozen weight memory, peak memory, step time,
    tokens/s, eval loss before -> after."""
    header = ("| method | trainable params | frozen weights | peak RSS (training) | median step | tokens/s "
              "| eval loss before -> after |")
    lines = [header, "|" + "---|" * 7]
    for s in summaries:
        pct = 100.0 * s["trainable_params"] / s["total_params"]
        lines.append(
            f"| {method_label(s)} | {s['trainable_params']:,} ({pct:.2f}%) | {_mem(s['frozen_bytes'])} "
            f"| {_mem(s['peak_rss_bytes'])} | {s['median_step_s']:.2f} s | {s['tokens_per_s']:.0f} "
            f"| {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sweep reports
METRICS = [("eval_loss_before", "eval loss before", "{:.3f}"), ("eval_loss_after", "eval loss after", "{:.3f}"),
           ("trainable_params", "trainable params", "{:,.0f}"), ("frozen_bytes", "frozen MiB", None),
           ("peak_rss_bytes", "peak RSS MiB", None), ("tokens_per_s", "tokens/s", "{:.0f}"),
           ("median_step_s", "step s", "{:.2f}")]


def load_results(sweep_dir) -> list[dict]:
    """The latest finished line of every point in ``sweep_dir/results.jsonl`` (failed points are left out)."""
    import json
    from pathlib import Path

    from peftjax.errors import PeftjaxError

    path = Path(sweep_dir) / "results.jsonl"
    if not path.exists():
        raise PeftjaxError(f"{path} not found: run `peftjax sweep SPEC --out {sweep_dir}` first")
    latest = {}
    for record in _records(path):
        if record["status"] in ("ok", "skipped"):
            latest[record["name"]] = record
    if not latest:
        raise PeftjaxError(f"{path} holds no finished point yet")
    return list(latest.values())


def _records(path) -> list[dict]:
    """The lines of a results.jsonl that parse (a line cut by a killed sweep is skipped)."""
    import json

    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "name" in record and "status" in record:
            records.append(record)
    return records


def unfinished(sweep_dir) -> dict[str, str]:
    """{point name: its latest status} of the points in results.jsonl that have not finished (failed,
    interrupted)."""
    from pathlib import Path

    path = Path(sweep_dir) / "results.jsonl"
    latest = {r["name"]: r["status"] for r in _records(path)} if path.exists() else {}
    return {name: status for name, status in latest.items() if status not in ("ok", "skipped")}


def without_seed(point: dict) -> dict:
    """``point`` without ``train.seed``, and without the ``seed=`` part its name carries when the seed is a grid
    key (``peftjax sweep`` appends a named zip row's grid values to its name)."""
    rest = {k: v for k, v in point.items() if k != "train.seed"}
    if "name" in rest:
        rest["name"] = ",".join(p for p in str(rest["name"]).split(",") if not p.startswith("seed="))
    return rest


def group_key(point: dict) -> tuple:
    """Points equal in this key differ only in ``train.seed``."""
    return tuple(sorted((k, str(v)) for k, v in without_seed(point).items()))


def group_results(records: list[dict]) -> list[dict]:
    """Points that differ only in ``train.seed`` become one row with mean and std of every metric."""
    import numpy as np

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(group_key(r["point"]), []).append(r)
    rows = []
    for key, members in groups.items():
        row = {"values": {k: v for k, v in key if k != "name"}, "seeds": len(members),
               "names": [m["name"] for m in members]}
        for metric, _, _ in METRICS:
            vals = np.array([m["summary"][metric] for m in members], dtype=float)
            row[metric] = (float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0)
        rows.append(row)

    def sort_key(row):
        return tuple((0, float(v)) if _is_number(v) else (1, v) for _, v in sorted(row["values"].items()))

    return sorted(rows, key=sort_key)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _cell(metric: str, mean: float, std: float, fmt: str | None, seeds: int) -> str:
    if fmt is None:
        mean, std, fmt = mean / MIB, std / MIB, "{:.1f}"
    text = fmt.format(mean)
    return text + (" ± " + fmt.format(std) if seeds > 1 else "")


def sweep_table(rows: list[dict]) -> tuple[str, list[list[str]]]:
    keys = sorted({k for r in rows for k in r["values"]})
    header = keys + ["seeds"] + [label for _, label, _ in METRICS]
    body = [[r["values"].get(k, "") for k in keys] + [str(r["seeds"])] +
            [_cell(m, *r[m], fmt, r["seeds"]) for m, _, fmt in METRICS] for r in rows]
    return markdown_table(header, body), [header] + body


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


_PLOT_NOTE_SHOWN = False


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None after a one-line note when matplotlib (the ``plots``
    extra) is not installed: tables and reports never need it."""
    import sys

    global _PLOT_NOTE_SHOWN
    try:
        import matplotlib
    except ImportError:
        if not _PLOT_NOTE_SHOWN:
            _PLOT_NOTE_SHOWN = True
            print("peftjax: note: matplotlib is not installed, so no plots were drawn (install the plots extra: "
                  "pip install 'peftjax[plots]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_plots(sweep_dir, records: list[dict], rows: list[dict]) -> list[str]:
    """PNG plots next to the table; returns the file names written (none, with a note, without matplotlib)."""
    import json
    from pathlib import Path

    plt = pyplot()
    if plt is None:
        return []
    out = Path(sweep_dir)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)

    rank_key = "peft.rank"
    if any(rank_key in r["values"] for r in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[str, list] = {}
        for r in rows:
            label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(r["values"].items()) if k != rank_key)
            lines.setdefault(label or "all", []).append((float(r["values"][rank_key]), *r["eval_loss_after"]))
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", label=label,
                        capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("held-out loss after training")
        ax.legend(fontsize=7)
        save(fig, "eval_loss_vs_rank.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        bits = 8.0 * r["frozen_bytes"][0] / max(1, frozen_params(records, r["names"][0]))
        ax.scatter(bits, r["frozen_bytes"][0] / MIB)
        ax.annotate(_short(r["values"]), (bits, r["frozen_bytes"][0] / MIB), fontsize=6)
    ax.set_xlabel("bits per frozen parameter")
    ax.set_ylabel("frozen weight memory (MiB)")
    save(fig, "memory_vs_bits.png")

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    labels = [_short(r["values"]) for r in rows]
    ax.bar(range(len(rows)), [r["tokens_per_s"][0] for r in rows], yerr=[r["tokens_per_s"][1] for r in rows])
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("training tokens/s")
    save(fig, "tokens_per_s.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in sorted(records, key=lambda r: r["name"]):
        metrics = out / rec["name"] / "metrics.jsonl"
        if metrics.exists():
            steps = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            steps = [s for s in steps if s.get("loss") is not None]  # null: a non-finite loss
            ax.plot([s["step"] for s in steps], [s["loss"] for s in steps], label=rec["name"], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)
    save(fig, "loss_curves.png")
    return written


def frozen_params(records: list[dict], name: str) -> int:
    summary = next(r["summary"] for r in records if r["name"] == name)
    return summary["total_params"] - summary["trainable_params"]


def _short(values: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(values.items())) or "base"


def write_sweep_report(sweep_dir) -> tuple[str, list[str]]:
    """``report.md``, ``report.csv`` and PNG plots in ``sweep_dir``; returns the markdown and the plot names."""
    import csv
    from pathlib import Path

    records = load_results(sweep_dir)
    rows = group_results(records)
    table, cells = sweep_table(rows)
    out = Path(sweep_dir)
    with open(out / "report.csv", "w", newline="") as f:
        csv.writer(f).writerows(cells)
    plots = sweep_plots(out, records, rows)
    missing = unfinished(out)
    note = (f"Not finished (left out): {', '.join(f'{n} ({s})' for n, s in sorted(missing.items()))}; run the "
            "sweep again to resume them.\n\n") if missing else ""
    text = (f"# Sweep report: {out.name}\n\n{len(records)} finished runs in {len(rows)} groups "
            f"(mean ± std over seeds where a group has several).\n\n{note}{table}\n\n"
            + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    (out / "report.md").write_text(text)
    return text, plots
