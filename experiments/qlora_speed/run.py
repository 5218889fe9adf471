"""QLoRA's training speed against LoRA's in one sitting: alternating `peftjax bench` processes.

    .venv/bin/python experiments/qlora_speed/run.py            # 3 rounds of LoRA then QLoRA: measurements.jsonl + table
    .venv/bin/python experiments/qlora_speed/run.py --table    # measurements.jsonl -> the README's table

Each round runs `peftjax bench` for LoRA and then QLoRA (NF4 blocks of 64 along the input, double quantization,
the rest of the base float32; LoRA on the same float32 base), each in its own process, on SmolLM2-135M at batch
4 x 256 tokens: median of 6 timed steps after 2 warm-up steps. Alternating the two within each round makes drift
of the machine hit both; the ratio is taken within a round. The table is generated from measurements.jsonl, never typed.
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from peftjax.train.provenance import cpu_model  # noqa: E402
COMMAND = ["bench", "--model", "smollm2", "--batch", "4", "--seq", "256", "--param-dtype", "float32"]
METHODS = ("lora", "qlora")



def measure(rounds: int) -> None:
    out = HERE / "measurements.jsonl"
    records = []
    for r in range(rounds):
        for method in METHODS:
            argv = [*COMMAND, "--method", method]
            done = subprocess.run([sys.executable, "-m", "peftjax.cli", *argv], check=True, capture_output=True,
                                  text=True, cwd=HERE.parents[1])
            record = json.loads(done.stdout.strip().splitlines()[-1])
            records.append({"round": r, "method": method, "command": "peftjax " + " ".join(argv),
                            "cpu": cpu_model(), **record})
            print(f"round {r} {method}: {record['tokens_per_s']:.1f} tokens/s", flush=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in records))


def table(records: list[dict]) -> str:
    by = {(x["round"], x["method"]): x for x in records}
    rounds = sorted({x["round"] for x in records})
    lines = ["| round | LoRA tokens/s | QLoRA tokens/s | QLoRA / LoRA | LoRA step device memory | "
             "QLoRA step device memory |", "|---|---|---|---|---|---|"]
    ratios = []
    for r in rounds:
        lora, qlora = by[r, "lora"], by[r, "qlora"]
        ratios.append(qlora["tokens_per_s"] / lora["tokens_per_s"])
        lines.append(f"| {r + 1} | {lora['tokens_per_s']:.1f} | {qlora['tokens_per_s']:.1f} | {ratios[-1]:.3f} | "
                     f"{lora['step_device_bytes'] / 2**20:,.0f} MiB | {qlora['step_device_bytes'] / 2**20:,.0f} MiB |")
    first = records[0]
    return ("\n".join(lines) + f"\n\nQLoRA / LoRA tokens/s: median {statistics.median(ratios):.3f}, lowest "
            f"{min(ratios):.3f}, highest {max(ratios):.3f} over {len(ratios)} rounds. {first['cpu']}, "
            f"{first['devices'] if 'devices' in first else 1} device; command per point: "
            f"`{first['command'].replace(' --method lora', ' --method lora|qlora')}`.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true", help="only regenerate the table from measurements.jsonl")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not args.table:
        measure(args.rounds)
    from peftjax.studies.report import fill_generated

    records = [json.loads(line) for line in (HERE / "measurements.jsonl").read_text().splitlines()]
    text = table(records)
    fill_generated(HERE / "README.md", "table.md", text)
    print(text)


if __name__ == "__main__":
    main()
