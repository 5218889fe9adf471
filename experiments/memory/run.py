"""`peftjax memory` against the classic tables and against XLA's allocation for the real SmolLM2 train step.

    .venv/bin/python experiments/memory/run.py            # measure: measurements.json, README tables, results.md, PNGs
    .venv/bin/python experiments/memory/run.py --table    # measurements.json -> the README's tables and the PNGs
    .venv/bin/python experiments/memory/run.py --readme   # only the README's estimator tables (no measurement)

The SmolLM2 table sets the estimate beside XLA's allocation for the compiled float32 train step at the shapes of
the CPU-sized studies (batch 4 x 128); both are recorded in measurements.json (with the machine and versions) and
the table is generated from it, never typed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from peftjax.studies import memory as M  # noqa: E402
from peftjax.studies.report import fill_generated, markdown_table  # noqa: E402

GIB, MIB = 1024 ** 3, 1024 ** 2
BATCH, SEQ = 4, 128  # the CPU-sized SmolLM2 runs of experiments/methods and lora_vs_qlora
METHODS = ("lora", "qlora", "full")
PARTS = ("weights", "adapter", "gradients", "optimizer", "activations")


def estimates() -> dict[str, dict]:
    """The estimator's figures for the SmolLM2 table (architecture only, no weights: seconds)."""
    out = {}
    for method in METHODS:
        e = M.estimate("smollm2", method, batch_size=BATCH, seq_len=SEQ, weight_dtype="float32",
                       compute_dtype="float32")
        out[method] = {**{k: getattr(e, k) for k in PARTS}, "total": e.total}
    return out


def measure() -> dict:
    """Compile the real SmolLM2 train step per method (no step runs) and record XLA's allocation beside the
    estimate."""
    import jax

    from peftjax.train.provenance import cpu_model, package_versions

    estimate = estimates()
    rows = []
    for method in METHODS:
        xla = M.measure_step("smollm2", method, batch_size=BATCH, seq_len=SEQ)
        rows.append({"method": method, "estimate": estimate[method], "xla": xla})
        print(f"{method}: estimate {estimate[method]['total'] / GIB:.3f} GiB, XLA {xla['total'] / GIB:.3f} GiB",
              flush=True)
    return {"recorded": datetime.date.today().isoformat(), "cpu": cpu_model(), "backend": jax.default_backend(),
            "versions": package_versions(), "batch_size": BATCH, "seq_len": SEQ,
            "command": "python experiments/memory/run.py", "rows": rows}


def smollm2_table(record: dict) -> str:
    header = ["method", "weights MiB", "adapter + grads + AdamW MiB", "activations MiB", "estimate",
              "XLA allocation", "estimate / XLA"]
    rows = []
    for r in record["rows"]:
        e, x = r["estimate"], r["xla"]
        rows.append([r["method"], f"{e['weights'] / MIB:.0f}", f"{(e['adapter'] + e['gradients'] + e['optimizer']) / MIB:.0f}",
                     f"{e['activations'] / MIB:.0f}", f"{e['total'] / GIB:.3f} GiB", f"{x['total'] / GIB:.3f} GiB",
                     f"{e['total'] / x['total']:.3f}"])
    return (markdown_table(header, rows) + f"\n\nRecorded {record['recorded']}: {record['cpu']}, "
            f"{record['backend']} backend, jax {record['versions'].get('jax')}; batch {record['batch_size']} x "
            f"{record['seq_len']}, float32; `{record['command']}`.\n")


def plots(out: Path, record: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["weights", "adapter", "gradients", "optimizer", "activations"]
    for i, row in enumerate(record["rows"]):
        bottom = 0.0
        for j, name in enumerate(names):
            value = row["estimate"][name] / GIB
            ax.bar(i - 0.2, value, 0.4, bottom=bottom, color=f"C{j}", label=name if i == 0 else None)
            bottom += value
        ax.bar(i + 0.2, row["xla"]["total"] / GIB, 0.4, color="grey", label="XLA allocation" if i == 0 else None)
    ax.set_xticks(range(len(record["rows"])), [f"{r['method']}\n(estimate | XLA)" for r in record["rows"]])
    ax.set_ylabel("train step memory (GiB)")
    ax.set_title(f"SmolLM2-135M, batch {record['batch_size']} x {record['seq_len']}, float32: estimate vs XLA")
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
    ax.set_title("Estimated training memory vs model size")
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
    ap.add_argument("--table", action="store_true", help="only regenerate the tables and plots from measurements.json")
    ap.add_argument("--readme", action="store_true", help="only write the README's estimator tables")
    args = ap.parse_args()
    tables = readme_tables()
    for key, text in tables.items():
        fill_generated(HERE / "README.md", key, text)
    if args.readme:
        return
    if not args.table:
        (HERE / "measurements.json").write_text(json.dumps(measure(), indent=1) + "\n")
    record = json.loads((HERE / "measurements.json").read_text())
    smollm2 = smollm2_table(record)
    fill_generated(HERE / "README.md", "smollm2", smollm2)
    text = (f"## bf16 weights\n\n{tables['bf16-weights']}\n\n## Training memory, batch 1 x 512 tokens\n\n"
            f"{tables['training-memory']}\n\n## SmolLM2-135M, batch {BATCH} x {SEQ}, float32: estimate vs XLA\n\n"
            f"{smollm2}")
    names = plots(HERE, record)
    (HERE / "results.md").write_text(text + "".join(f"\n![{n}]({n})\n" for n in names))
    print(text)


if __name__ == "__main__":
    main()
