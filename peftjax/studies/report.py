"""Tables that compare runs, from their ``summary.json`` files."""
from __future__ import annotations

from peftjax.config import label as method_label
from peftjax.studies.stats import difference, interval

GIB, MIB = 1024 ** 3, 1024 ** 2


def comparison_table(summaries: list[dict]) -> str:
    """Markdown table, one row per method (its runs over seeds as mean ± 95% CI): trainable params (% of total),
    frozen weight memory, peak memory, step time, tokens/s, eval loss before -> after."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(method_label(s), []).append(s)
    header = ("| method | seeds | trainable params | frozen weights | peak RSS (training) | median step | tokens/s "
              "| eval loss before -> after |")
    lines = [header, "|" + "---|" * 8]

    def iv(ss, key):
        return interval([s[key] for s in ss])

    for label, ss in groups.items():
        s = ss[0]
        pct = 100.0 * s["trainable_params"] / s["total_params"]
        lines.append(
            f"| {label} | {len(ss)} | {s['trainable_params']:,} ({pct:.2f}%) | {s['frozen_bytes'] / MIB:.1f} MiB "
            f"| {iv(ss, 'peak_rss_bytes').format('{:.2f}', GIB)} GiB | {iv(ss, 'median_step_s').format('{:.2f}')} s "
            f"| {iv(ss, 'tokens_per_s').format('{:.0f}')} | {iv(ss, 'eval_loss_before').format()} -> "
            f"{iv(ss, 'eval_loss_after').format()} |")
    return "\n".join(lines) + f"\n\nValues: {CI_NOTE}."


# ------------------------------------------------------------------------------------------- sweep reports
CI_NOTE = ("mean ± half-width of the 95% confidence interval, Student t over a group's seeds; a group of one seed "
           "shows its value alone; a difference is resolved when the two intervals are disjoint")
METRICS = [("eval_loss_before", "eval loss before", "{:.3f}"), ("eval_loss_after", "eval loss after", "{:.3f}"),
           ("eval_accuracy_after", "accuracy after", "{:.3f}"),
           ("forgetting", "forgetting (general loss after - before)", "{:+.3f}"),
           ("trainable_params", "trainable params", "{:,.0f}"), ("frozen_bytes", "frozen MiB", None),
           ("step_device_bytes", "step device MiB", None), ("peak_rss_bytes", "peak RSS MiB", None),
           ("train_s", "training s", "{:.0f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
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
    """Points that differ only in ``train.seed`` become one row: every metric as an :class:`Interval` (mean and
    95% confidence half-width over the seeds); a metric some member lacks (older summaries) is left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(group_key(r["point"]), []).append(r)
    rows = []
    for key, members in groups.items():
        values = {k: v for k, v in key if k != "name"}
        name = dict(key).get("name")
        row = {"values": values, "label": name or _short(values), "named": bool(name), "seeds": len(members),
               "names": [m["name"] for m in members]}
        for metric, _, _ in METRICS:
            vals = [m["summary"].get(metric) for m in members]
            if all(v is not None for v in vals):
                row[metric] = interval(vals)
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


def _cell(row: dict, metric: str, fmt: str | None) -> str:
    if metric not in row:
        return ""
    return row[metric].format("{:.1f}", MIB) if fmt is None else row[metric].format(fmt)


def _versus_best(rows: list[dict], metric: str = "eval_loss_after") -> list[str]:
    """Per row: ``best`` for the lowest mean of ``metric``, else its difference to the best and whether the
    intervals resolve it."""
    have = [r for r in rows if metric in r]
    if not have:
        return ["" for _ in rows]
    best = min(have, key=lambda r: r[metric].mean)
    return ["" if metric not in r else "best" if r is best else difference(r[metric], best[metric]) for r in rows]


def sweep_table(rows: list[dict]) -> tuple[str, list[list[str]]]:
    keys = sorted({k for r in rows for k in r["values"]})
    named = any(r["named"] for r in rows)  # a zip's names head the rows
    metrics = [(m, label, fmt) for m, label, fmt in METRICS if any(m in r for r in rows)]
    header = ["name"] * named + keys + ["seeds"] + [label for _, label, _ in metrics] + ["eval loss after vs best"]
    body = [[r["label"]] * named + [r["values"].get(k, "") for k in keys] + [str(r["seeds"])]
            + [_cell(r, m, fmt) for m, _, fmt in metrics] + [versus] for r, versus in zip(rows, _versus_best(rows))]
    return markdown_table(header, body), [header] + body


def generated_markers(key: str) -> tuple[str, str]:
    return f"<!-- generated: {key} (written by code from this folder's raw results; do not edit) -->", \
        f"<!-- end generated: {key} -->"


def fill_generated(readme, key: str, text: str) -> bool:
    """Write ``text`` between the ``key`` markers of ``readme`` (:func:`generated_markers`), so a README's table is
    always its generator's output; False when ``readme`` has no such region (nothing is written)."""
    from pathlib import Path

    readme = Path(readme)
    if not readme.exists():
        return False
    begin, end = generated_markers(key)
    doc = readme.read_text()
    if begin not in doc or end not in doc:
        return False
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text.strip()}\n{end}{tail}")
    return True


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def sweep_plots(sweep_dir, records: list[dict], rows: list[dict]) -> list[str]:
    """PNG plots next to the table (:mod:`peftjax.studies.plots`); returns the file names written (none, with a
    note, without matplotlib): held-out loss against step device memory and against training time with the Pareto
    front, against forgetting where the runs measured it (learning vs forgetting), against the rank when the sweep
    varies it, tokens/s, and the training loss curves."""
    import json
    from pathlib import Path

    from peftjax.studies import plots as P

    plt = P.pyplot()
    if plt is None:
        return []
    out = Path(sweep_dir)
    study = out.name
    written = []
    n = f"\n({P.seed_note(r['seeds'] for r in rows)})"
    quality = "eval_loss_after"
    for cost, unit, name, title, what in (
            ("step_device_bytes", MIB, "quality_vs_memory.png", "step device memory", "step device memory (MiB)"),
            ("train_s", 1.0, "quality_vs_time.png", "training time", "training time (s)"),
            ("forgetting", 1.0, "learning_vs_forgetting.png", "forgetting",
             "forgetting: general-text loss after - before training (nats/token)")):
        have = [r for r in rows if cost in r and quality in r]
        if have:
            points = [P.Point(r["label"], r[cost].scaled(1 / unit), r[quality]) for r in have]
            fig = P.scatter(plt, points, title=f"{study}: held-out task loss vs {title}{n}", xlabel=what,
                            ylabel="held-out task loss after training (nats/token)")
            written.append(P.save(plt, fig, out / name))

    rank_key = "peft.rank"
    if any(rank_key in r["values"] for r in rows):
        fig, ax = P.new_figure(plt, f"{study}: held-out loss vs LoRA rank{n}", "LoRA rank r (log scale)",
                               "held-out loss after training (nats/token)")
        lines: dict[str, list] = {}
        for r in rows:
            if rank_key in r["values"]:
                label = _short({k: v for k, v in r["values"].items() if k != rank_key}, "all")
                lines.setdefault(label, []).append((float(r["values"][rank_key]), r[quality]))
        for i, (label, pts) in enumerate(sorted(lines.items())):
            pts.sort(key=lambda p: p[0])
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=[p[1].half or 0.0 for p in pts],
                        capsize=3, label=label, **P.style(i))
        ax.set_xscale("log", base=2)
        P.outside_legend(ax)
        written.append(P.save(plt, fig, out / "eval_loss_vs_rank.png"))

    have = [r for r in rows if "tokens_per_s" in r]
    if have:
        fig, ax = P.new_figure(plt, f"{study}: training throughput{n}", "non-padding tokens per second", "",
                               height=max(2.5, 0.35 * len(have) + 1.2))
        ax.barh(range(len(have)), [r["tokens_per_s"].mean for r in have],
                xerr=[r["tokens_per_s"].half or 0.0 for r in have], capsize=3, color="C0")
        ax.set_yticks(range(len(have)), [r["label"] for r in have], fontsize=7)
        ax.invert_yaxis()
        written.append(P.save(plt, fig, out / "tokens_per_s.png"))

    curves = []
    for r in rows:  # the mean training loss per logged step over the group's seeds
        by_step: dict[int, list[float]] = {}
        for name in r["names"]:
            metrics = out / name / "metrics.jsonl"
            if metrics.exists():
                for line in metrics.read_text().splitlines():
                    rec = json.loads(line) if line.strip() else {}
                    if rec.get("loss") is not None:  # null: a non-finite loss; eval lines have none
                        by_step.setdefault(rec["step"], []).append(rec["loss"])
        if by_step:
            curves.append((r["label"], sorted((k, sum(v) / len(v)) for k, v in by_step.items())))
    if curves:
        fig, ax = P.new_figure(plt, f"{study}: training loss (mean over seeds)", "optimizer step",
                               "training loss (nats/token)")
        for i, (label, pts) in enumerate(curves):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1, label=label, color=P.style(i)["color"],
                    linestyle=("-", "--", ":", "-.")[(i // 10) % 4])
        P.outside_legend(ax)
        written.append(P.save(plt, fig, out / "loss_curves.png"))
    return written


def _short(values: dict, empty: str = "base") -> str:
    return ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(values.items())) or empty


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
            f"({CI_NOTE}).\n\n{note}{table}\n\n"
            + "\n".join(f"![{p}]({p})" for p in plots) + "\n\n" + provenance_section(records))
    (out / "report.md").write_text(text)
    return text, plots


def provenance_section(records: list[dict]) -> str:
    """Markdown: where the runs ran and on what (every distinct value over the runs' ``summary.provenance``:
    git commit and dirty flag, hardware, backend, package versions, input sha256s) and one run's command."""
    provs = [r["summary"].get("provenance") for r in records]
    lines = ["## Provenance", ""]
    if not any(provs):
        return "\n".join(lines + ["Not recorded: these runs predate provenance in run summaries.", ""])
    have = [p for p in provs if p]
    if len(have) < len(provs):
        lines.append(f"Recorded by {len(have)} of {len(provs)} runs.")

    def distinct(values) -> str:
        return ", ".join(dict.fromkeys(str(v) for v in values))

    git = [f"{g['commit'][:12]}{' (dirty)' if g['dirty'] else ''}" if g else "not a git checkout"
           for g in (p.get("git") for p in have)]
    lines += [f"- git: {distinct(git)}",
              f"- hardware: {distinct(p['cpu'] for p in have)}; "
              f"accelerator: {distinct(p['accelerator'] for p in have)}",
              f"- jax backend: {distinct(p['backend'] for p in have)}, "
              f"devices: {distinct(p['device_count'] for p in have)}",
              f"- python {distinct(p['python'] for p in have)}; "
              + "; ".join(f"{name} {distinct(p['packages'].get(name) for p in have)}" for name in have[0]["packages"]),
              "- inputs (sha256): " + "; ".join(f"{k} {distinct(p['inputs'].get(k) for p in have)}"
                                                 for k in dict.fromkeys(k for p in have for k in p["inputs"])),
              f"- command of {records[provs.index(have[0])]['name']}: `{have[0]['command']}`", ""]
    return "\n".join(lines)
