"""Sweep expansion: a ``sweep`` section of a config turns one YAML into many runs.

    sweep:
      grid: {peft.rank: [4, 8, 16], train.seed: [0, 1]}      # product of the lists
      zip:  {name: [lora, qlora], quant.format: [null, nf4]}  # lists walked together (equal lengths)

Every point is a dict of dotted keys -> values, applied to the base config like ``--set`` overrides. With both
sections, each zip row is combined with each grid point.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import yaml

from peftjax.errors import PeftjaxError


def expand(section: dict | None) -> list[dict]:
    if not section:
        return [{}]
    unknown = set(section) - {"grid", "zip"}
    if unknown:
        raise PeftjaxError(f"sweep section has unknown key {sorted(unknown)[0]!r}; use 'grid' and/or 'zip'")
    grid, zipped = section.get("grid") or {}, section.get("zip") or {}
    for kind, part in (("grid", grid), ("zip", zipped)):
        for key, values in part.items():
            if not isinstance(values, list) or not values:
                raise PeftjaxError(f"sweep.{kind}.{key} must be a non-empty list, got {values!r}")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise PeftjaxError(f"sweep.zip lists must have equal lengths, got {sorted(lengths)}")
    zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
    grid_rows = [dict(zip(grid, row)) for row in itertools.product(*grid.values())] if grid else [{}]
    points = [{**z, **g} for z in zip_rows for g in grid_rows]
    if "name" in zipped and "name" not in grid:  # a named zip row + grid values: the name carries the grid values
        for point in points:
            point["name"] = ",".join([str(point["name"])] + [_pair(k, point[k]) for k in grid])
    return points


def _pair(key: str, value) -> str:
    return f"{key.split('.')[-1]}={value}"


def point_name(point: dict) -> str:
    """A directory name for a point: its ``name`` when it has one, else its key=value pairs."""
    if "name" in point:
        return re.sub(r"[^A-Za-z0-9_.=,-]", "_", str(point["name"]))
    parts = [_pair(key, value) for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join(parts)) or "base"


def as_overrides(point: dict) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in point.items()]


# ------------------------------------------------------------------------------------------------- the runner
def parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise PeftjaxError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def plan(spec_path: str, out: Path, shard: tuple[int, int] = (0, 1)) -> tuple[dict, list[dict]]:
    """Validate the spec and every point (before anything runs) and claim ``out`` for this sweep.

    Returns the base config dict and this shard's points. ``out`` remembers its spec in ``sweep.yaml``; a
    directory that holds another sweep is refused, so two studies never mix their results.
    """
    from peftjax.config import from_dict, load_dict

    base = load_dict(spec_path)
    section = base.pop("sweep", None)
    if not section:
        raise PeftjaxError(f"{spec_path} has no sweep section (sweep: {{grid: ..., zip: ...}}); use `peftjax train`")
    points = expand(section)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise PeftjaxError("two sweep points get the same directory name; give the zip rows distinct names")
    configs = [(point_name(p), from_dict(base, as_overrides(p))) for p in points]  # unknown keys, bad values
    check_shapes(configs)
    record = yaml.safe_dump({**base, "sweep": section}, sort_keys=True)
    marker = out / "sweep.yaml"
    if marker.exists():
        if marker.read_text() != record:
            raise PeftjaxError(f"{out} belongs to another sweep (its sweep.yaml differs from {spec_path}); "
                               "choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise PeftjaxError(f"{out} exists and is not a sweep directory; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(record)
    index, count = shard
    return base, [p for i, p in enumerate(points) if i % count == index]


def check_shapes(configs: list) -> None:
    """Apply each point's quantization and method to a one-layer, shapes-only copy of its model (no weights are
    read, nothing is computed), so that a point the model cannot take (a LoRA rank above a targeted layer's width,
    targets that match nothing) fails the sweep before any point runs, not hours into it. Points whose model's
    shape is not known without loading it (a .gguf file, an encoder) are left to their own runs."""
    from peftjax.studies.memory import _abstract_build, architecture

    seen = set()
    for name, config in configs:
        key = repr((config.model.name, config.peft, config.quant))
        if key in seen:
            continue
        seen.add(key)
        try:
            arch, _ = architecture(config.model.name)
        except (PeftjaxError, KeyError, ValueError, TypeError):
            continue
        try:
            _abstract_build(arch, 1, config)
        except PeftjaxError as e:
            raise PeftjaxError(f"sweep point {name}: {e}") from None


def append_result(out: Path, line: dict) -> None:
    """Append one JSON line under an exclusive lock: workers and shards share results.jsonl."""
    import fcntl
    import json

    with open(out / "results.jsonl", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(line) + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def train_command(spec_path: str, run_dir: Path, point: dict, *flags: str, resume: bool = False) -> list[str]:
    """The ``peftjax train`` command line of one point: its own process, so its peak memory is its own. A point
    starts afresh (``--overwrite``) or, with ``resume``, continues from its own latest checkpoint."""
    import sys

    cmd = [sys.executable, "-m", "peftjax.cli", "train", spec_path, "--out", str(run_dir),
           "--resume" if resume else "--overwrite", *flags]
    for override in as_overrides(point):
        cmd += ["--set", override]
    return cmd


def _finished_names(out: Path) -> set[str]:
    import json

    path = out / "results.jsonl"
    if not path.exists():
        return set()
    names = set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if record.get("status") in ("ok", "skipped"):
            names.add(record.get("name"))
    return names


# Points share XLA's persistent compilation cache (a directory in the sweep): a point whose compiled functions equal
# an earlier point's (another seed, data order or learning rate -- the peak rate is an input of the step, held in
# the optimizer state: same shapes, same constants) loads them instead of compiling. A point that changes the
# step's program (the method, a rank, the schedule's length) compiles its own. Set the variable yourself to use
# another cache.
COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
COMPILATION_CACHE = ".jax_cache"


def run_point(spec_path: str, out: Path, point: dict, *, stop=None, running: set | None = None,
              mesh: str | None = None) -> dict | None:
    """Run one point as its own process (honest peak memory); its output goes to ``out/logs/NAME.log``.

    The point's run directory is locked for the whole call: a point another sweep is running is returned as
    ``busy`` and not recorded. A point with checkpoints but no summary (killed or interrupted before) resumes
    from its own latest checkpoint. When ``stop`` is set while the point runs (the sweep was interrupted), it is
    recorded as ``interrupted``; a later sweep resumes it. None when ``stop`` was set before it started.
    """
    import json
    import os
    import subprocess
    import time

    from peftjax.train.loop import LOCK_ENV, lock_run_dir

    name = point_name(point)
    run_dir = out / name
    try:
        lock = lock_run_dir(run_dir, what="sweep point")
        lock.__enter__()
    except PeftjaxError as e:
        return {"name": name, "point": point, "status": "busy", "error": str(e)}
    try:
        if (run_dir / "summary.json").exists():
            line = {"name": name, "point": point, "status": "skipped",
                    "summary": json.loads((run_dir / "summary.json").read_text())}
            if name not in _finished_names(out):  # finished, but its line was lost (the sweep was killed)
                append_result(out, line)
            return line
        if stop is not None and stop.is_set():
            return None
        resume = (run_dir / "config.yaml").exists() and (run_dir / "checkpoints").is_dir()
        cmd = train_command(spec_path, run_dir, point, "--no-progress", *(("--mesh", mesh) if mesh else ()),
                            resume=resume)
        env = {**os.environ, LOCK_ENV: str(run_dir.absolute()), "PEFTJAX_PARENT_PID": str(os.getpid())}
        env.setdefault(COMPILATION_CACHE_ENV, str((out / COMPILATION_CACHE).absolute()))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every function, however quick to compile
        (out / "logs").mkdir(exist_ok=True)
        start = time.perf_counter()
        with open(out / "logs" / f"{name}.log", "a" if resume else "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if running is not None:
                running.add(proc)
            try:
                proc.wait()
            finally:
                if running is not None:
                    running.discard(proc)
        if proc.returncode == 0 and (run_dir / "summary.json").exists():
            line = {"name": name, "point": point, "status": "ok",
                    "summary": json.loads((run_dir / "summary.json").read_text())}
        elif stop is not None and stop.is_set():
            line = {"name": name, "point": point, "status": "interrupted", "exit_code": proc.returncode,
                    "error": "the sweep was interrupted; run it again to resume this point from its checkpoint",
                    "wall_s": time.perf_counter() - start}
        else:
            lines = (out / "logs" / f"{name}.log").read_text().strip().splitlines()
            line = {"name": name, "point": point, "status": "failed", "exit_code": proc.returncode,
                    "error": lines[-1] if lines else "", "wall_s": time.perf_counter() - start}
        append_result(out, line)
        return line
    finally:
        lock.__exit__(None, None, None)


def run_sweep(spec_path: str, out: Path, *, workers: int = 1, shard: tuple[int, int] = (0, 1),
              progress=print, mesh: str | None = None) -> list[dict]:
    """Run every (unfinished) point of this shard, ``workers`` at a time; a failing point does not stop the rest.

    Ctrl-C or SIGTERM stops the running points (recorded ``interrupted``; a later sweep resumes them from their
    checkpoints). A point that another sweep holds is reported ``busy`` and left to it. ``mesh`` (``data=2,fsdp=4``)
    is every point's ``--mesh``."""
    import signal
    import threading
    from concurrent.futures import ThreadPoolExecutor, as_completed

    if workers < 1:
        raise PeftjaxError(f"--workers must be >= 1, got {workers}")
    _, points = plan(spec_path, out, shard)
    stop, running = threading.Event(), set()
    results = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise KeyboardInterrupt
        previous = signal.signal(signal.SIGTERM, on_term)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(run_point, spec_path, out, p, stop=stop, running=running, mesh=mesh) for p in points]
        for i, future in enumerate(as_completed(futures), 1):
            line = future.result()
            results.append(line)
            detail = line.get("error", "") if line["status"] in ("failed", "busy") else ""
            progress(f"[{i}/{len(points)}] {line['name']}: {line['status']} {detail}".rstrip())
    except BaseException:
        stop.set()
        for proc in list(running):
            proc.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    pool.shutdown()
    return results
