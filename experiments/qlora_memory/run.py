"""Where QLoRA's memory win shows: frozen weights, XLA's allocation for the train step, and process RSS, for LoRA on
a float32 base, LoRA on a bfloat16 base and QLoRA (NF4 + double quantization, the rest of the base in bfloat16), all
with float32 compute, next to `peftjax memory`'s estimate of the step.

    .venv/bin/python experiments/qlora_memory/run.py [--rounds 2] [--batch 1 --seq 256]   # writes measurements.jsonl
    .venv/bin/python experiments/qlora_memory/run.py --table                               # measurements.jsonl -> table.md

Each measurement is `peftjax bench` in its own process (so its peak RSS is its own), the configurations alternating
(A B C A B C ...) so that drift of the machine hits all of them, and `peftjax memory`'s estimate beside each; SmolLM2-135M-Instruct, LoRA r=8 on every linear
layer, activation checkpointing on. The table is generated from measurements.jsonl (medians over the rounds).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = [("LoRA (float32 base)", "lora", "float32"), ("LoRA (bfloat16 base)", "lora-bf16", "bfloat16"),
           ("QLoRA (NF4+DQ, rest bfloat16)", "qlora", "bfloat16")]
MIB = 2 ** 20


def measure(a) -> None:
    sys.path.insert(0, str(HERE.parents[1]))
    from peftjax.train.provenance import cpu_model
    from peftjax.studies.memory import estimate

    rows = []
    for r in range(a.rounds):
        for label, preset, dtype in CONFIGS:
            cmd = [sys.executable, "-m", "peftjax.cli", "bench", "--model", "smollm2", "--method", preset,
                   "--batch", str(a.batch), "--seq", str(a.seq), "--rank", "8", "--targets", "all-linear",
                   "--steps", str(a.steps), "--warmup", "1", "--remat", "--param-dtype", dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            record = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
            est = estimate("smollm2", preset, rank=8, targets="all-linear", batch_size=a.batch, seq_len=a.seq,
                           weight_dtype=dtype, compute_dtype="float32", remat=True)
            record.update(label=label, round=r, estimate={"total_bytes": est.total, "activations": est.activations},
                          cpu=cpu_model())
            rows.append(record)
            print(json.dumps({k: record[k] for k in ("label", "round", "step_device_bytes", "tokens_per_s")}),
                  flush=True)
    (HERE / "measurements.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def table() -> str:
    rows = [json.loads(line) for line in (HERE / "measurements.jsonl").read_text().splitlines()]
    by = {label: [r for r in rows if r["label"] == label] for label, _, _ in CONFIGS}
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    first = rows[0]
    lora32, lora16 = med(by[CONFIGS[0][0]], "step_device_bytes"), med(by[CONFIGS[1][0]], "step_device_bytes")
    lines = [f"SmolLM2-135M-Instruct, batch {first['batch']} x {first['seq']}, LoRA r={first['rank']} all-linear, "
             f"activation checkpointing, float32 compute; medians of {len(by[CONFIGS[0][0]])} rounds; "
             f"{first['cpu']}, jax {first['jax_version']}.", "",
             "| configuration | frozen weights | step device memory (XLA) | estimate (`peftjax memory`) "
             "| vs LoRA float32 | vs LoRA bfloat16 | peak RSS, loading | peak RSS, training | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, _, _ in CONFIGS:
        rs = by[label]
        step = med(rs, "step_device_bytes")
        est = statistics.median(r["estimate"]["total_bytes"] for r in rs)
        lines.append(f"| {label} | {med(rs, 'frozen_bytes') / MIB:.1f} MiB | {step / MIB:.1f} MiB "
                     f"| {est / MIB:.1f} MiB ({100 * (est / step - 1):+.1f}%) | {step / lora32:.2f}x "
                     f"| {step / lora16:.2f}x | {med(rs, 'peak_rss_load_bytes') / MIB:.0f} MiB "
                     f"| {med(rs, 'peak_rss_bytes') / MIB:.0f} MiB | {med(rs, 'tokens_per_s'):.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from peftjax.studies.report import fill_generated

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--table", action="store_true", help="only regenerate table.md from measurements.jsonl")
    a = p.parse_args()
    if not a.table:
        measure(a)
    (HERE / "table.md").write_text(table())
    fill_generated(HERE / "README.md", "table.md", table())
    print(table())
