"""peftjax vs Hugging Face PEFT (+ bitsandbytes for QLoRA) on one GPU in bfloat16: tokens/s, MFU, device memory.

    python experiments/bench_gpu/run.py [--models smollm2,llama3.2-1b] [--methods lora,qlora,full]
        [--batch 8 --seq 1024 --rank 8 --steps 10 --warmup 3] [--out FILE] [--readme]
    python experiments/bench_gpu/run.py --table [--out FILE] [--readme]
    python experiments/bench_gpu/run.py --smoke --out FILE    # the whole path at toy sizes, any backend (CPU too)

Made for a GPU machine without network access (run it there from a checkout, ``PYTHONPATH=.``): it needs jax with
its CUDA plugin, flax, optax, orbax-checkpoint, numpy, pyyaml, tqdm, tokenizers, safetensors, torch, transformers
and peft, and bitsandbytes for the peer's QLoRA (without it the peer's QLoRA cell says so); it lists whatever is
missing in one line. Weights are random (a step's speed does not depend on their values): transformers builds each
architecture from its config.json values (:data:`peftjax.studies.memory.PUBLISHED`) and saves a Hugging Face
directory in bfloat16 that both sides load, so both train the same shapes.

Per model and method, one process each, peer then peftjax (so drift hits both): random token ids of batch x seq,
``--warmup`` untimed steps, the median of ``--steps`` timed ones. The peer is Hugging Face PEFT in its usual GPU
setting: the model in bfloat16 (QLoRA: ``BitsAndBytesConfig`` NF4, double quantization, bfloat16 compute), LoRA
r on every linear layer, torch's fused AdamW, no gradient checkpointing; peftjax runs ``peftjax.studies.bench`` with
bfloat16 weights and compute (QLoRA: the ``qlora`` preset, NF4 in blocks of 64 with double quantization). Full
fine-tuning trains every parameter on both sides. MFU is achieved FLOP/s (FLOPs per token from the architecture,
:func:`peftjax.studies.bench.flops_per_token`) over the device's dense bfloat16 peak (its data sheet's, by device
name) and over a bfloat16 8192^3 matmul measured in the same run. Device memory: the peak the allocator reports
(jax ``memory_stats()["peak_bytes_in_use"]``, torch ``max_memory_allocated``). Everything measured is written to
``--out`` (default results.json beside this file) after every process, so a run cut short keeps what it measured;
the README's table is generated from it (``--table --readme``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = HERE / "results.json"
README = HERE / "README.md"
METHODS = ("lora", "qlora", "full")
MODELS = ("smollm2", "llama3.2-1b")
NEEDED = ("jax", "flax", "optax", "orbax.checkpoint", "numpy", "yaml", "tqdm", "tokenizers", "safetensors", "torch",
          "transformers", "peft")
# dense bfloat16 tensor-core peaks from the vendors' data sheets (no sparsity), by a substring of the device name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
TOY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256)


def fail(message: str) -> None:
    """A user's error: one line, exit status 2."""
    print(f"bench_gpu: {message}", file=sys.stderr)
    sys.exit(2)


def missing_modules() -> list[str]:
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ModuleNotFoundError:  # a dotted name whose parent package is missing
            return True

    return [m for m in NEEDED if absent(m)]


def architecture(name: str) -> dict:
    """The config.json values of ``name`` (a published architecture, or ``toy`` for --smoke)."""
    from peftjax.studies.memory import PUBLISHED

    return dict(TOY) if name == "toy" else dict(PUBLISHED[name])


def write_checkpoint(name: str, directory: Path) -> Path:
    """A Hugging Face directory of ``name``'s architecture with random bfloat16 weights (seed 0) and a byte-level
    tokenizer (the benchmark feeds random token ids; the loader wants a tokenizer.json)."""
    import torch
    import transformers

    from peftjax.models.tokenizer import byte_tokenizer

    out = directory / name
    if (out / "config.json").exists():
        return out
    raw = architecture(name)
    raw.pop("model_type")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).to(torch.bfloat16)
    model.save_pretrained(out)
    byte_tokenizer().backend.save(str(out / "tokenizer.json"))
    return out


# --- one measurement per process ---------------------------------------------------------------------------------

def measure_peer(model_dir: Path, method: str, *, batch: int, seq: int, rank: int, steps: int, warmup: int) -> dict:
    """Hugging Face PEFT's training step on ``model_dir`` in bfloat16 (on the GPU when there is one)."""
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    kwargs = {"dtype": torch.bfloat16}
    if method == "qlora":
        if importlib.util.find_spec("bitsandbytes") is None:
            return {"error": "bitsandbytes is not installed"}
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0} if cuda else {"": "cpu"}
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if method != "qlora":
        model = model.to(device)
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_step_s": median, "tokens_per_s": batch * seq / median, "step_times_s": times,
            "loss": float(loss.detach()), "trainable_params": sum(p.numel() for p in params),
            "device_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu"}


VARIANT_KEYS = {"attention": str, "scan_layers": lambda v: v.lower() in ("1", "true", "yes")}


def parse_variant(text: str) -> dict:
    """``default`` -> {}; ``attention=xla+scan_layers=true`` -> bench keyword arguments (``model.*`` settings)."""
    if text == "default":
        return {}
    out = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS or not value:
            fail(f"--variants entry {part!r} is not KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)} (or 'default')")
        out[key] = VARIANT_KEYS[key](value)
    return out


def measure_peftjax(model_dir: Path, method: str, *, batch: int, seq: int, rank: int, steps: int,
                    warmup: int, variant: str = "default") -> dict:
    """peftjax's jitted training step (:func:`peftjax.studies.bench.bench`) in bfloat16, with a variant's
    settings (:func:`parse_variant`)."""
    import jax

    from peftjax.studies.bench import bench

    record = bench(model=str(model_dir), method=method, batch=batch, seq=seq, rank=rank,
                   targets=".*" if method == "full" else "all-linear", steps=steps, warmup=warmup,
                   compute_dtype="bfloat16", param_dtype="bfloat16", **parse_variant(variant))
    record["variant"] = variant
    record["model"] = model_dir.name
    record["device"] = jax.devices()[0].device_kind
    return record


def matmul_peak() -> dict:
    """A bfloat16 8192 x 8192 x 8192 matmul through XLA on the first device: median FLOP/s of 10 after 3 warm-up."""
    import jax
    import jax.numpy as jnp

    n = 8192 if jax.default_backend() != "cpu" else 512
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    times = []
    for i in range(13):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return {"n": n, "flops_per_s": 2 * n ** 3 / statistics.median(times), "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend()}


def one(args) -> None:
    """The child process: one measurement, printed as the last JSON line."""
    if args.one == "matmul":
        record = matmul_peak()
    else:
        kwargs = dict(batch=args.batch, seq=args.seq, rank=args.rank, steps=args.steps, warmup=args.warmup)
        if args.one == "peer":
            record = measure_peer(Path(args.model_dir), args.methods, **kwargs)
        else:
            record = measure_peftjax(Path(args.model_dir), args.methods, variant=args.variants, **kwargs)
    print(json.dumps(record))


# --- the harness -------------------------------------------------------------------------------------------------

def child(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    record = _child(argv)
    record["process_wall_s"] = time.perf_counter() - t0  # import, load, compile and steps: what a run costs
    return record


def _child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else ''}", "stderr_tail": lines[-40:]}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": "no JSON line in the output"}


def versions() -> dict:
    from peftjax.train.provenance import package_versions

    out = package_versions()
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def flops(name: str, seq: int, method: str, rank: int) -> dict:
    from peftjax.models.families import config_from_hf
    from peftjax.studies.bench import flops_per_token

    return flops_per_token(config_from_hf(architecture(name), name), seq, method, rank)


def command(argv: list[str]) -> str:
    """The command line as recorded: ``--out`` names a file of the machine it ran on, so it is left out."""
    kept, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        skip = a == "--out"
        if not skip:
            kept.append(a)
    return " ".join(["python experiments/bench_gpu/run.py", *kept])


def harness(args) -> None:
    missing = missing_modules()
    if missing:
        fail(f"missing Python packages: {', '.join(missing)} (install them, or carry their wheels to this machine)")
    models = ["toy"] if args.smoke else args.models.split(",")
    methods = args.methods.split(",")
    from peftjax.studies.memory import PUBLISHED

    unknown = [m for m in models if m != "toy" and m not in PUBLISHED] + [m for m in methods if m not in METHODS]
    if unknown:
        fail(f"unknown --models / --methods value(s) {', '.join(unknown)}: models are {', '.join(MODELS)} (or any of "
             f"peftjax.studies.memory.PUBLISHED), methods {', '.join(METHODS)}")
    variants = args.variants.split(",")
    for v in variants:
        parse_variant(v)
    variant_methods = methods if args.variant_methods is None else args.variant_methods.split(",")
    variant_models = models if args.variant_models is None else args.variant_models.split(",")
    import jax

    settings = dict(batch=args.batch, seq=args.seq, rank=args.rank, steps=args.steps, warmup=args.warmup)
    flags = [f"--{k}={v}" for k, v in settings.items()]
    settings["variants"] = variants[0]
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               "machine": {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
                           "devices": jax.device_count(), "platform": platform.machine()},
               "versions": versions(), "settings": settings, "smoke": args.smoke,
               "command": command(sys.argv[1:]), "runs": []}
    out = Path(args.out)
    results["matmul"] = child(["--one", "matmul"])
    out.write_text(json.dumps(results, indent=1) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model_dir = write_checkpoint(name, Path(tmp))
            for method in methods:
                row = {"model": name, "method": method, "flops_per_token": flops(name, args.seq, method, args.rank),
                       "peer": {"error": "not measured (the run stopped first)"},
                       "peftjax": {"error": "not measured (the run stopped first)"}}
                results["runs"].append(row)
                sides = [("peer", "peer", "default"), ("peftjax", "peftjax", variants[0])]
                sides += [(f"peftjax[{v}]", "peftjax", v) for v in variants[1:]
                          if method in variant_methods and name in variant_models]
                for side, who, variant in sides:
                    row[side] = child(["--one", who, "--model-dir", str(model_dir), "--methods", method,
                                       "--variants", variant, *flags])
                    print(f"{name} {method} {side}: " + (f"{row[side]['tokens_per_s']:.0f} tokens/s"
                                                       if "tokens_per_s" in row[side] else row[side]["error"]),
                          flush=True)
                    out.write_text(json.dumps(results, indent=1) + "\n")  # a run cut short keeps every side
    print(table(results))


def peak_bf16(device: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in device.lower()), None)


def table(results: dict) -> str:
    """The markdown the README shows: a line of settings, then one row per model and method."""
    s, m, v = results["settings"], results["machine"], results["versions"]
    sheet = peak_bf16(m["device"])
    measured = results.get("matmul", {}).get("flops_per_s")
    head = (f"{m['device']} ({m['backend']}), {results['date']}; batch {s['batch']} x seq {s['seq']}, LoRA r={s['rank']} "
            f"on every linear layer, bfloat16, {s['steps']} timed steps after {s['warmup']} warm-up; jax "
            f"{v.get('jax')}, torch {v.get('torch')}, peft {v.get('peft')}, transformers {v.get('transformers')}, "
            f"bitsandbytes {v.get('bitsandbytes')}. Dense bfloat16 peak: "
            + (f"{sheet / 1e12:.0f} TFLOP/s (data sheet)" if sheet else "not on the data-sheet list")
            + (f", {measured / 1e12:.0f} TFLOP/s measured (XLA {results['matmul']['n']}^3 matmul)." if measured
               else "."))
    cols = ["model", "method", "GFLOP / token", "peftjax tokens/s", "HF PEFT tokens/s", "peftjax / HF PEFT",
            "peftjax MFU (sheet)", "peftjax MFU (measured)", "HF PEFT MFU (sheet)", "peftjax device peak",
            "HF PEFT device peak", "peftjax compile (s)"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(rec, key, fmt):
        return fmt(rec[key]) if rec.get(key) is not None else (f"- ({rec['error']})" if "error" in rec else "-")

    for r in results["runs"]:
        ours, peer, f = r["peftjax"], r["peer"], r["flops_per_token"]["total"]
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        ratio = (f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x" if "tokens_per_s" in ours
                 and "tokens_per_s" in peer else "-")
        util = lambda rec, peak: (f"{rec['tokens_per_s'] * f / peak:.0%}"  # noqa: E731
                                  if peak and "tokens_per_s" in rec else "-")
        lines.append("| " + " | ".join([
            r["model"], r["method"], f"{f / 1e9:.2f}", cell(ours, "tokens_per_s", lambda x: f"{x:,.0f}"),
            cell(peer, "tokens_per_s", lambda x: f"{x:,.0f}"), ratio, util(ours, sheet), util(ours, measured),
            util(peer, sheet), cell(ours, "device_peak_bytes", gib), cell(peer, "device_peak_bytes", gib),
            cell(ours, "compile_s", lambda x: f"{x:.1f}")]) + " |")
    extra = [(r, k) for r in results["runs"] for k in r if k.startswith("peftjax[")]
    if extra:
        cols = ["model", "method", "peftjax setting", "tokens/s", "vs the first column", "vs HF PEFT", "MFU (sheet)",
                "device peak", "compile (s)"]
        lines += ["", f"The same run, other peftjax settings (the peftjax column above is "
                      f"`{results['settings'].get('variants', 'default')}`):", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r, k in extra:
            rec, base, peer, f = r[k], r["peftjax"], r["peer"], r["flops_per_token"]["total"]
            tps = rec.get("tokens_per_s")
            per = lambda other: (f"{tps / other['tokens_per_s']:.2f}x"  # noqa: E731
                                 if tps and "tokens_per_s" in other else "-")
            lines.append("| " + " | ".join([
                r["model"], r["method"], f"`{k[len('peftjax['):-1]}`", cell(rec, "tokens_per_s", lambda x: f"{x:,.0f}"),
                per(base), per(peer), f"{tps * f / sheet:.0%}" if tps and sheet else "-",
                cell(rec, "device_peak_bytes", lambda b: f"{b / 2**30:.2f} GiB"),
                cell(rec, "compile_s", lambda x: f"{x:.1f}")]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default="default",
                   help="peftjax settings to measure, comma-separated: 'default' or KEY=VALUE joined by '+' "
                        "(attention=xla, scan_layers=true); the first is the table's peftjax column, the others "
                        "are rows of the variants table")
    p.add_argument("--variant-methods", help="methods that get the variants after the first (default: all)")
    p.add_argument("--variant-models", help="models that get the variants after the first (default: all)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--table", action="store_true", help="print the table of an existing --out")
    p.add_argument("--readme", action="store_true", help="also write the table into README.md")
    p.add_argument("--smoke", action="store_true", help="a toy model, batch 2 x 32, 2 steps: checks the path")
    p.add_argument("--one", choices=("peer", "peftjax", "matmul"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    if args.smoke:
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1
    if not args.table:
        harness(args)
    elif not Path(args.out).exists():
        fail(f"{args.out} does not exist: run without --table first")
    results = json.loads(Path(args.out).read_text())
    text = table(results)
    if args.table:
        print(text)
    if args.readme:
        from peftjax.studies.report import fill_generated

        region = Path(args.out).name  # each results file has its own region of the README, named after it
        if not fill_generated(README, region, text):
            fail(f"{README} has no generated region for {region}")


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the peak, not the preallocated pool
    main()
