"""Train the masked-loss SFT task and the verbalizer classification task for a few steps on the real SmolLM2-135M
and record the figures in results.md / results.json beside this script.

    .venv/bin/python experiments/training_tasks/run.py [--out runs/training_tasks]

Each task is one `peftjax train` process (its run directory under --out: config.yaml, metrics.jsonl, summary.json,
checkpoints/); then `load_run` restores the SFT run for a greedy answer to a held-out prompt.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEYS = ("steps", "tokens_seen", "padded_tokens_seen", "trainable_params", "checkpoint_bytes",
        "checkpoint_trainable_bytes", "eval_loss_before", "eval_loss_after",
        "eval_ppl_before", "eval_ppl_after", "eval_accuracy_before", "eval_accuracy_after", "train_loss_first",
        "train_loss_last", "median_step_s", "tokens_per_s", "padded_tokens_per_s", "nonfinite_skipped", "eval_blocks",
        "wall_s", "provenance")


def sft_records(path: Path) -> Path:
    from peftjax.assets import fetch
    from peftjax.data import polarity_records

    cor = fetch("gensim-testdata") / "gensim" / "test" / "test_data" / "pang_lee_polarity.cor"
    with open(path, "w") as f:
        for r in polarity_records(cor):
            f.write(json.dumps({"prompt": f"Is this movie review positive or negative?\n{r['text']}",
                                "response": "Positive." if r["label"] == "pos" else "Negative."}) + "\n")
    return path


def train(config: str, out: Path, *overrides: str) -> dict:
    spec = os.path.relpath(HERE / config)  # the command lands in the summary's provenance: no machine's path
    cmd = [sys.executable, "-m", "peftjax.cli", "train", spec, "--out", str(out), "--overwrite",
           "--no-progress", *[a for o in overrides for a in ("--set", o)]]
    print("$", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def table(results: dict) -> str:
    """The README's table from results.json. Runs recorded before summaries counted padding apart have no
    padded_tokens_seen: their tokens_seen is the padded capacity, and the table says so."""
    rows = []
    for task, s in results.items():
        acc = (f"{s['eval_accuracy_before']:.3f} -> {s['eval_accuracy_after']:.3f}"
               if s["eval_accuracy_before"] is not None else "-")
        tokens = (f"{s['tokens_seen']:,} of {s['padded_tokens_seen']:,}" if s.get("padded_tokens_seen")
                  else f"{s['tokens_seen']:,} (padding included)")
        rows.append(f"| {task} | {s['steps']} | {tokens} | {s['eval_loss_before']:.3f} -> "
                    f"{s['eval_loss_after']:.3f} | {s['eval_ppl_before']:.2f} -> {s['eval_ppl_after']:.2f} | {acc} "
                    f"| {s['median_step_s']:.2f} s | {s['checkpoint_bytes'] / 2**20:.1f} MiB |")
    return ("| task | steps | tokens seen (non-padding of capacity) | held-out loss (masked) | perplexity | accuracy "
            "| median step | checkpoint |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def main():
    from peftjax.studies.report import fill_generated

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/training_tasks")
    out = Path(p.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    records = sft_records(out / "sft_polarity.jsonl")
    results = {"sft": train("sft.yaml", out / "sft", f"data.files=[{records}]"),
               "polarity": train("polarity.yaml", out / "polarity")}

    import time

    from peftjax.train import load_run

    t0 = time.perf_counter()
    load_run(out / "sft")  # what `peftjax generate RUN_DIR` builds on: base from config.yaml + latest checkpoint
    load_s = time.perf_counter() - t0

    table_text = table(results)
    text = (f"{table_text}\n\n`load_run({out / 'sft'})` rebuilt the model and restored the checkpoint in "
            f"{load_s:.1f} s.\n"
            f"Backend {results['sft']['backend']}, jax {results['sft']['jax_version']}, CPU "
            f"{results['sft']['provenance']['cpu']}, git {results['sft']['provenance']['git']['commit'][:12]}.\n")
    print(text)
    (HERE / "results.md").write_text(text)
    recorded = {k: {key: v.get(key) for key in KEYS} for k, v in results.items()}
    (HERE / "results.json").write_text(json.dumps(recorded, indent=2) + "\n")
    fill_generated(HERE / "README.md", "table.md", table_text)


if __name__ == "__main__":
    main()
