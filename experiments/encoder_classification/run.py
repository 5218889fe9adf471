"""The encoder study's table: accuracy over 5 folds per method, from the sweep's results.

    .venv/bin/peftjax sweep experiments/encoder_classification/spec.yaml --out runs/encoder --workers 1
    .venv/bin/python experiments/encoder_classification/run.py --runs runs/encoder

``--runs`` copies each point's summary fields the table needs into ``results.json`` (committed); without it the
table is rebuilt from ``results.json`` alone, and written into README.md between its generated markers.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["full", "lora", "qlora", "ia3", "prompt"]
LABELS = {"full": "full fine-tuning", "lora": "LoRA r=8 (all linear)", "qlora": "QLoRA r=8 (NF4 + DQ)",
          "ia3": "IA3 (key, value, output.dense)", "prompt": "prompt tuning (8 tokens)"}
FIELDS = ("eval_accuracy_before", "eval_accuracy_after", "eval_loss_after", "trainable_params", "frozen_bytes",
          "trainable_bytes", "step_device_bytes", "peak_rss_bytes", "median_step_s", "train_s",
          "provenance")  # the committed results.json was collected before provenance was copied: it has none


def collect(runs: Path) -> list[dict]:
    """One record per finished point: method, fold, and the summary fields of FIELDS."""
    out = []
    for line in (runs / "results.jsonl").read_text().splitlines():
        point = json.loads(line)
        if point.get("status") != "ok":
            continue
        name = point["name"]
        summary = json.loads((runs / name / "summary.json").read_text())
        method, fold = name.split(",fold=")
        out.append({"method": method, "fold": int(fold), **{k: summary.get(k) for k in FIELDS}})
    return sorted(out, key=lambda r: (METHODS.index(r["method"]), r["fold"]))


def table(results: list[dict]) -> str:
    """Markdown: per method, accuracy over its folds (mean ± sample std, the 95% Student-t interval of the mean,
    the range), trainable parameters, frozen base, step device memory, training time; then QLoRA against 16-bit
    LoRA, resolved only when the two intervals are disjoint."""
    from peftjax.studies.stats import difference, interval

    lines = ["| method | folds | accuracy mean ± std | 95% CI | min-max | before training | trainable params | "
             "frozen base | step device memory | train time / fold |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ci = {}
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        acc = [r["eval_accuracy_after"] for r in rows]
        ci[method] = interval(acc)
        before = statistics.fmean(r["eval_accuracy_before"] for r in rows)
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        mib = lambda key: statistics.fmean(r[key] for r in rows) / 2**20  # noqa: E731
        lines.append(f"| {LABELS[method]} | {len(rows)} | {statistics.fmean(acc):.3f} ± {std:.3f} | "
                     f"{ci[method].format()} | {min(acc):.3f}-{max(acc):.3f} | {before:.3f} | "
                     f"{rows[0]['trainable_params']:,} | {mib('frozen_bytes'):.1f} MiB | "
                     f"{mib('step_device_bytes'):.1f} MiB | {statistics.fmean(r['train_s'] for r in rows):.1f} s |")
    if "lora" in ci and "qlora" in ci:
        lines += ["", f"QLoRA - LoRA accuracy: {difference(ci['qlora'], ci['lora'])} by the 95% intervals."]
    return "\n".join(lines) + "\n"


def plots(results: list[dict]) -> list[str]:
    """Held-out error rate (1 - accuracy, lower is better, so the Pareto front minimises both axes) against step
    device memory and against training time per fold, mean ± 95% CI over the folds; PNGs beside this script."""
    from peftjax.studies import plots as P
    from peftjax.studies.stats import interval

    plt = P.pyplot()
    if plt is None:
        return []
    by_method = {m: [r for r in results if r["method"] == m] for m in METHODS}
    by_method = {m: rows for m, rows in by_method.items() if rows}
    folds = P.seed_note(len(rows) for rows in by_method.values()).replace("seeds", "folds")
    written = []
    for key, unit, name, what in (("step_device_bytes", 2**20, "quality_vs_memory.png", "step device memory (MiB)"),
                                  ("train_s", 1.0, "quality_vs_time.png", "training time per fold (s)")):
        points = [P.Point(LABELS[m], interval([r[key] / unit for r in rows]),
                          interval([1.0 - r["eval_accuracy_after"] for r in rows])) for m, rows in by_method.items()]
        fig = P.scatter(plt, points, title=f"encoder classification (all-MiniLM-L6-v2, polarity): error rate vs "
                        f"{what.split(' (')[0]}\n({folds})", xlabel=what,
                        ylabel="held-out error rate (1 - accuracy)")
        written.append(P.save(plt, fig, HERE / name))
    return written


def main() -> None:
    from peftjax.studies.report import fill_generated

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, help="the finished sweep directory (else: results.json as committed)")
    args = ap.parse_args()
    if args.runs is not None:
        (HERE / "results.json").write_text(json.dumps(collect(args.runs), indent=1) + "\n")
    results = json.loads((HERE / "results.json").read_text())
    text = table(results)
    fill_generated(HERE / "README.md", "table.md", text)
    print(text)
    for name in plots(results):
        print(f"wrote {name}")


if __name__ == "__main__":
    main()
