"""The scale-out equality table: every mesh layout x method against one device, on 8 virtual CPU devices.

    .venv/bin/python experiments/scale/run.py            # trains and compiles (peftjax.studies.scale): results.json,
                                                         # memory.json and the README's two tables
    .venv/bin/python experiments/scale/run.py --table    # results.json, memory.json -> the README's tables
    .venv/bin/python experiments/scale/run.py --real-devices   # on a machine with 8 GPUs / TPU chips

The training runs in a child process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the
flag must be set before jax starts); the table is generated from results.json, never typed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from peftjax.train.provenance import cpu_model  # noqa: E402



def measure(real_devices: bool) -> None:
    from peftjax.studies.scale import write_texts

    virtual = {} if real_devices else {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env = {**os.environ, **virtual}
    out = HERE / "results.json"
    memory = HERE / "memory.json"
    with tempfile.TemporaryDirectory() as texts:  # the three small documents the tiny runs train on
        subprocess.run([sys.executable, "-m", "peftjax.studies.scale", "--out", str(out), "--memory-out", str(memory),
                        "--files", *write_texts(Path(texts))], env=env, check=True, cwd=HERE.parents[1])
    for path in (out, memory):
        rows = json.loads(path.read_text())
        for r in rows:
            r["cpu"] = cpu_model()
        path.write_text(json.dumps(rows, indent=1) + "\n")


def _where(first: dict) -> str:
    """The devices a recording ran on."""
    if first["platform"] == "cpu":
        return f"{first['devices']} virtual CPU devices ({first['cpu']})"
    return f"{first['devices']} {first['platform']} devices"


def table(rows: list[dict]) -> str:
    from peftjax.studies.scale import format_table

    first = rows[0]
    return (format_table(rows) + f"\n{_where(first)}, jax "
            f"{first['jax_version']}; tiny model (1 decoder layer), LoRA r=8 on every linear layer, 5 AdamW steps "
            "of 8 x 32 tokens.\n")


def memory_table(rows: list[dict]) -> str:
    from peftjax.studies.scale import format_memory_table

    first = rows[0]
    return (format_memory_table(rows) + f"\n{_where(first)}, jax {first['jax_version']}; {first['model']}'s shape "
            "(its widths, vocabulary and tied head, random weights: only shapes are compiled) cut to "
            f"{first['num_layers']} decoder layers, LoRA r=8 on every linear layer (QLoRA: NF4 + double quantization), batch "
            f"{first['batch_size']} x {first['seq_len']} tokens, float32.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", action="store_true", help="only regenerate the table from results.json")
    p.add_argument("--real-devices", action="store_true", help="the machine's own 8 accelerators, not virtual CPUs")
    args = p.parse_args()
    if not args.table:
        measure(args.real_devices)
    from peftjax.studies.report import fill_generated

    text = table(json.loads((HERE / "results.json").read_text()))
    fill_generated(HERE / "README.md", "table.md", text)
    memory = memory_table(json.loads((HERE / "memory.json").read_text()))
    fill_generated(HERE / "README.md", "memory.md", memory)
    print(text + "\n" + memory)


if __name__ == "__main__":
    main()
