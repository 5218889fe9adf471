"""`peftjax memory` against the classic tables and against XLA's allocation for the real SmolLM2 train step.

    .venv/bin/python experiments/memory/run.py [--runs runs/methods] [--out experiments/memory]

Writes results.md and two PNGs to --out. With --runs (a finished `methods` sweep directory) the table also shows
each run's measured process memory (peak RSS of the training phase minus the RSS before the model was loaded).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftjax.studies import memory as M
from peftjax.studies.report import fill_generated, markdown_table

GIB, MIB = 1024 ** 3, 1024 ** 2
BATCH, SEQ = 4, 128  # the CPU-sized SmolLM2 runs of experiments/methods and lora_vs_qlora


def smollm2_rows(runs: Path | None) -> tuple[list[list[str]], list[tuple]]:
    rows, parts = [], []
    for method in ("lora", "qlora", "full"):
        e = M.estimate("smollm2", method, batch_size=BATCH, seq_len=SEQ, weight_dtype="float32",
                       compute_dtype="float32")
        m = M.measure_step("smollm2", method, batch_size=BATCH, seq_len=SEQ)
        rss = ""
        summary = runs / method / "summary.json" if runs else None
        if summary and summary.exists():
            s = json.loads(summary.read_text())
            used = s["peak_rss_bytes"] - s["rss_start_bytes"]
            rss = f"{used / GIB:.2f} GiB ({e.total / used:.2f})"
        rows.append([method, f"{e.weights / MIB:.0f}", f"{(e.adapter + e.gradients + e.optimizer) / MIB:.0f}",
                     f"{e.activations / MIB:.0f}", f"{e.total / GIB:.3f} GiB", f"{m['total'] / GIB:.3f} GiB",
                     f"{e.total / m['total']:.3f}", rss])
        parts.append((method, e, m))
    return rows, parts


def plots(out: Path, parts) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["weights", "adapter", "gradients", "optimizer", "activations"]
    for i, (method, e, m) in enumerate(parts):
        bottom = 0.0
        for j, name in enumerate(names):
            value = getattr(e, name) / GIB
            ax.bar(i - 0.2, value, 0.4, bottom=bottom, color=f"C{j}", label=name if i == 0 else None)
            bottom += value
        ax.bar(i + 0.2, m["total"] / GIB, 0.4, color="grey", label="XLA allocation" if i == 0 else None)
    ax.set_xticks(range(len(parts)), [p[0] for p in parts])
    ax.set_ylabel("GiB (SmolLM2, batch 4 x 128, float32)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "smollm2_estimate_vs_xla.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    models = ["smollm2", "llama2-7b", "llama2-13b", "llama-65b", "llama2-70b"]
    sizes = [M.estimate(n, "full").total_params for n in models]
    for method, remat, label in (("full", False, "full FT (AdamW)"), ("lora", False, "LoRA r=8"),
                                 ("qlora", False, "QLoRA r=8"), ("qlora", True, "QLoRA r=8 + checkpointing")):
        totals = [M.estimate(n, method, batch_size=1, seq_len=512, remat=remat).total / GIB for n in models]
        ax.plot(sizes, totals, marker="o", label=label)
    ax.axhline(48, color="grey", linestyle="--", label="48 GiB GPU")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("training memory, GiB (batch 1 x 512, bf16)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory_vs_model_size.png", dpi=110)
    plt.close(fig)
    return ["smollm2_estimate_vs_xla.png", "memory_vs_model_size.png"]


MODELS = M.CLASSIC + ["llama-65b"]


def readme_tables() -> dict[str, str]:
    """The README's estimator tables (no measurement: the architecture only), by their generated region."""
    return {"bf16-weights": M.bf16_weight_table(MODELS),
            "training-memory": M.methods_table(MODELS, batch_size=1, seq_len=512)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, help="a finished methods sweep directory (for measured RSS)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--readme", action="store_true", help="only write the README's estimator tables")
    args = ap.parse_args()
    tables = readme_tables()
    for key, text in tables.items():
        fill_generated(Path(__file__).parent / "README.md", key, text)
    if args.readme:
        return
    classic, methods = tables["bf16-weights"], tables["training-memory"]
    rows, parts = smollm2_rows(args.runs)
    header = ["method", "weights MiB", "adapter + grads + AdamW MiB", "activations MiB", "estimate",
              "XLA allocation", "estimate / XLA", "process memory (estimate / it)"]
    text = (f"## bf16 weights\n\n{classic}\n\n## Training memory, batch 1 x 512 tokens\n\n{methods}\n\n"
            f"## SmolLM2-135M, batch {BATCH} x {SEQ}, float32: estimate vs measured\n\n{markdown_table(header, rows)}\n")
    args.out.mkdir(parents=True, exist_ok=True)
    names = plots(args.out, parts)
    (args.out / "results.md").write_text(text + "".join(f"\n![{n}]({n})\n" for n in names))
    print(text)


if __name__ == "__main__":
    main()
