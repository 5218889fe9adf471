"""peftjax vs Hugging Face PEFT: one training step of SmolLM2-135M on this machine, measured in the same run.

Usage (from the repo root; the peer's virtual environment is set up as ../shared/peer/README.md says):

    .venv/bin/python experiments/bench_vs_peer/compare.py --peer-python PEER_VENV/bin/python \
        [--methods lora,qlora,full] [--batch 4 --seq 256 --rank 8 --steps 6]

Runs the peer script and `peftjax bench` alternately (peer, peftjax, peer, ... so drift hits both), each in its own
process, and prints a markdown table of median step time, tokens/s and peak RSS with the peftjax / peer ratio.
QLoRA is the same on both sides: NF4, blocks of 64 along the input dimension, double-quantized scales, the rest of
the base in float32 (the peer's bitsandbytes Linear4bit, peftjax's qlora preset with --param-dtype float32).
"""
import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEER = ROOT.parent / "shared" / "peer" / "hf_peft_step.py"


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{text[-2000:]}")


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return last_json_line(proc.stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer-python", required=True)
    p.add_argument("--methods", default="lora,qlora,full")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from peftjax.assets import smollm2_gguf

    gguf = smollm2_gguf()
    rows = []
    for method in a.methods.split(","):
        peer = run([a.peer_python, str(PEER), str(gguf.parent), gguf.name, "--method", method, "--batch", str(a.batch),
                    "--seq", str(a.seq), "--r", str(a.rank), "--targets", "all-linear", "--steps", str(a.steps)])
        # the same QLoRA on both sides: NF4, blocks of 64 along the input dimension, double quantization, and the
        # rest of the base in float32 as the peer's --dtype float32 keeps it (peftjax's qlora preset stores it in
        # bfloat16, so it is set back here)
        ours = run([sys.executable, "-m", "peftjax.cli", "bench", "--model", "smollm2", "--method", method,
                    "--batch", str(a.batch), "--seq", str(a.seq), "--rank", str(a.rank), "--targets", "all-linear",
                    "--steps", str(a.steps), "--warmup", "2", "--param-dtype", "float32"])
        print(json.dumps({"peer": peer, "peftjax": ours}), file=sys.stderr, flush=True)
        rows.append((method, peer, ours))
    print(f"batch {a.batch} x seq {a.seq}, r={a.rank}, all-linear, float32, {a.steps} timed steps after 2 warm-up; "
          f"{platform.machine()}, {platform.python_version()}\n")
    print("| method | HF PEFT step (s) | HF PEFT tokens/s | peftjax step (s) | peftjax tokens/s | speed-up "
          "| HF PEFT peak RSS | peftjax peak RSS | peftjax step device memory | peftjax compile (s) |")
    print("|" + "---|" * 10)
    for method, peer, ours in rows:
        print(f"| {method} | {peer['step_s']:.2f} | {peer['tokens_per_s']:.0f} | {ours['median_step_s']:.2f} "
              f"| {ours['tokens_per_s']:.0f} | {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x "
              f"| {peer['peak_rss_mb'] / 1024:.2f} GiB | {ours['peak_rss_bytes'] / 2**30:.2f} GiB "
              f"| {ours['step_device_bytes'] / 2**20:.0f} MiB | {ours['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
