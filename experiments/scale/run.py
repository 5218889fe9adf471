"""The scale-out equality table: every mesh layout x method against one device, on 8 virtual CPU devices.

    .venv/bin/python experiments/scale/run.py            # trains (peftjax.studies.scale), writes results.json + table
    .venv/bin/python experiments/scale/run.py --table    # results.json -> the README's table
    .venv/bin/python experiments/scale/run.py --real-devices   # on a machine with 8 GPUs / TPU chips

The training runs in a child process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the
flag must be set before jax starts); the table is generated from results.json, never typed.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(real_devices: bool) -> None:
    from peftjax.studies.scale import write_texts

    virtual = {} if real_devices else {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env = {**os.environ, **virtual}
    out = HERE / "results.json"
    with tempfile.TemporaryDirectory() as texts:  # the three small documents the tiny runs train on
        subprocess.run([sys.executable, "-m", "peftjax.studies.scale", "--out", str(out), "--files",
                        *write_texts(Path(texts))], env=env, check=True, cwd=HERE.parents[1])
    rows = json.loads(out.read_text())
    for r in rows:
        r["cpu"] = cpu_model()
    out.write_text(json.dumps(rows, indent=1) + "\n")


def table(rows: list[dict]) -> str:
    from peftjax.studies.scale import format_table

    first = rows[0]
    cpu = first["platform"] == "cpu"
    where = f"{first['devices']} virtual CPU devices ({first['cpu']})" if cpu else \
        f"{first['devices']} {first['platform']} devices"
    return (format_table(rows) + f"\n{where}, jax "
            f"{first['jax_version']}; tiny model (1 decoder layer), LoRA r=8 on every linear layer, 5 AdamW steps "
            "of 8 x 32 tokens.\n")


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
    print(text)


if __name__ == "__main__":
    main()
