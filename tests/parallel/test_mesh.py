"""Scale-out on 8 virtual CPU devices, in subprocesses (this process keeps its one device).

One subprocess trains every mesh layout (DP=8, FSDP=8, TP=2 x DP=4, FSDP=4 x DP=2) on LoRA and QLoRA (NF4 + double
quantization) against a one-device run (:mod:`peftjax.studies.scale`); the CLI on 8 devices and on 2 processes x 4
devices (gloo over loopback) must give the losses of a one-device run of the same command in this process, and
the multi-process run's checkpoint must restore onto one device.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from peftjax import partition
from peftjax.config import from_dict, load_dict
from peftjax.errors import PeftjaxError
from peftjax.sharding import make_mesh, mesh_overrides, parse_mesh
from peftjax.studies.scale import (LAYOUTS, MEMORY_METHODS, METHODS, format_memory_table, format_table, tiny_config,
                                   write_texts)
from peftjax.train import Checkpointer, build, run

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5  # the bound: float32 sums in another order
TIMEOUT = 600  # seconds for a subprocess before it is killed


# XLA's CPU backend without its expensive LLVM passes compiles a third faster; the numbers stay float32 sums
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _env(devices: int, **extra) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", **extra}


def _wait(procs: list[subprocess.Popen]) -> list[str]:
    """The outputs of ``procs``, all of which must succeed. When one fails (the others of a multi-process run would
    wait for it) or ``TIMEOUT`` passes, every process group is killed and the test fails."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            assert not failed and time.monotonic() < deadline, \
                f"a subprocess failed or ran past {TIMEOUT} s:\n{_output(failed[0])[-3000:] if failed else ''}"
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for p in procs:
        assert p.returncode == 0, _output(p)[-3000:]
    return [_output(p) for p in procs]


def _output(p: subprocess.Popen) -> str:
    p.log.seek(0)
    return p.log.read()


def _spawn(cmd: list[str], env: dict, cwd=None) -> subprocess.Popen:
    """``cmd`` in its own process group, its output in a temporary file (a pipe nobody reads could fill up)."""
    log = tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    p.log = log
    return p


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "rows.json"
    _wait([_spawn([sys.executable, "-m", "peftjax.studies.scale", "--out", str(out)], _env(8))])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def memory_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "memory.json"
    _wait([_spawn([sys.executable, "-m", "peftjax.studies.scale", "--memory-out", str(out)], _env(8))])
    return json.loads(out.read_text())


def test_memory_per_device_estimate_is_within_15_percent_of_the_compiled_sharded_step(memory_rows):
    """``peftjax memory --mesh``'s per-device estimate against XLA's per-device allocation for the compiled sharded
    train step (SmolLM2's shape, 2 layers, 16 x 128 tokens), every layout x LoRA / QLoRA; and FSDP holds less than
    data parallelism on each device (before the activations were pinned to the batch's rows, FSDP=8 held more:
    229.7 against 193.5 MiB)."""
    assert [(r["layout"], r["method"]) for r in memory_rows] == [(l, m) for m in MEMORY_METHODS for l in LAYOUTS]
    for r in memory_rows:
        assert r["devices"] == 8
        assert abs(r["estimate"]["total"] / r["measured"]["total"] - 1) < 0.15, format_memory_table([r])
    total = {(r["layout"], r["method"]): r["measured"]["total"] for r in memory_rows}
    for method in MEMORY_METHODS:
        assert total["FSDP=8", method] < total["DP=8", method] / 2, total


def test_every_layout_trains_as_one_device(table):
    assert [(r["layout"], r["method"]) for r in table] == [(l, m) for m in METHODS for l in LAYOUTS]
    for r in table:
        assert r["devices"] == 8
        assert r["max_loss_diff"] <= TOL, format_table([r])
        assert r["max_param_diff"] <= TOL, format_table([r])
        assert r["blocks_aligned"], r  # a QArray's codes and scales split at the same block boundaries


# the mesh axis of each linear layer's input and output (hidden -> fsdp, heads and mlp -> tensor)
INPUT = {"q_proj": "fsdp", "k_proj": "fsdp", "v_proj": "fsdp", "gate_proj": "fsdp", "up_proj": "fsdp",
         "o_proj": "tensor", "down_proj": "tensor"}
OUTPUT = {"q_proj": "tensor", "k_proj": "tensor", "v_proj": "tensor", "gate_proj": "tensor", "up_proj": "tensor",
          "o_proj": "fsdp", "down_proj": "fsdp"}


def test_adapters_are_laid_out_like_their_kernels_and_moments_like_their_parameters(table):
    for r in table:
        specs = r["trainable_specs"]
        assert len(specs) == 2 * len(INPUT)
        for path, spec in specs.items():
            layer, matrix = path.split("/")[-3:-1]
            want = f"P('{INPUT[layer]}', None)" if matrix == "lora_a" else f"P(None, '{OUTPUT[layer]}')"
            assert spec == want, (r["layout"], path)
        assert r["optimizer_like_params"], r["layout"]


def test_frozen_bytes_per_device_are_split_over_model_shards_plus_whole_leaves(table):
    """Read from the arrays' shardings: every device holds 1 / (F T) of the 2-D weights and of a QArray's codes and
    per-block scales, and the whole of the 1-D leaves (summary.json's frozen_bytes_per_device)."""
    for r in table:
        shards = r["mesh"].get("fsdp", 1) * r["mesh"].get("tensor", 1)
        assert r["split_bytes"] % shards == 0 and r["frozen_bytes"] == r["split_bytes"] + r["whole_bytes"]
        assert r["frozen_bytes_per_device"] == r["split_bytes"] // shards + r["whole_bytes"], format_table([r])
        assert r["whole_bytes"] < r["split_bytes"] / 20  # the whole leaves are small


QUICKSTART = ["configs/quickstart.yaml", "--set", "model.name=tiny"]
ON_MESH = ["--set", "mesh.fsdp=4", "--set", "mesh.data=2"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_quickstart_on_8_devices_gives_the_one_device_summary(tmp_path):
    """The issue's command under 8 virtual devices (batch 4: split over fsdp, repeated over data) against the same
    command on this process's one device."""
    cmd = [sys.executable, "-m", "peftjax.cli", "train", *QUICKSTART, *ON_MESH, "--no-progress",
           "--out", str(tmp_path / "eight")]
    proc = _spawn(cmd, _env(8), cwd=ROOT)
    data = load_dict(ROOT / "configs" / "quickstart.yaml")
    data.pop("sweep")
    config = from_dict(data, QUICKSTART[2::2])
    one = run(config, tmp_path / "one", progress=False)  # meanwhile, the same on this process's one device
    (out,) = _wait([proc])
    assert "does not split over mesh data x fsdp = 8 devices" in out
    eight = json.loads((tmp_path / "eight" / "summary.json").read_text())
    assert eight["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "processes": 1}
    assert len(_losses(tmp_path / "one")) == one["steps"] == 30
    assert np.max(np.abs(np.array(_losses(tmp_path / "eight")) - _losses(tmp_path / "one"))) <= TOL
    for key in ("train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after"):
        assert abs(eight[key] - one[key]) <= TOL, key
    assert eight["frozen_bytes"] == one["frozen_bytes"] == one["frozen_bytes_per_device"]
    assert eight["frozen_bytes_per_device"] < one["frozen_bytes"] / 3.9  # split 4 ways (fsdp), norms whole
    # the 8-device checkpoint restores onto this one device (checksum of every leaf checked) as the one-device run's
    _, template, _ = partition.split(build(config, with_data=False).model)
    restored = [_restore(tmp_path / name / "checkpoints", template, config) for name in ("eight", "one")]
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(*map(jax.tree.leaves, restored), strict=True)) <= TOL


def test_sigkill_on_a_mesh_then_resume_is_bitwise_equal_to_uninterrupted(play_files, tmp_path):
    """QLoRA with dropout on FSDP=2 x DP=2 (4 virtual devices): killed after step 13 and resumed from its step-10
    checkpoint, the run ends bitwise where the uninterrupted run on the same mesh ends (restored onto one device)."""
    from peftjax.train import load_run
    from tests.train.test_checkpoint import run_until

    files = ", ".join(map(str, play_files))
    (tmp_path / "c.yaml").write_text(
        "name: k\nmodel: {name: tiny}\npreset: qlora\npeft: {method: lora, rank: 4, dropout: 0.1}\n"
        f"data: {{dataset: files, eval_docs: 1, seq_len: 32, max_eval_blocks: 2, files: [{files}]}}\n"
        "train: {steps: 16, batch_size: 4, learning_rate: 0.01, warmup_steps: 3, save_every: 10, log_every: 1}\n")
    cmd = [sys.executable, "-m", "peftjax.cli", "train", str(tmp_path / "c.yaml"), "--mesh", "data=2,fsdp=2",
           "--no-progress", "--out"]
    assert run_until(cmd + [str(tmp_path / "killed")], tmp_path / "killed", "step", 13, env=_env(4)) == 10
    _wait([_spawn(cmd + [str(tmp_path / "killed"), "--resume"], _env(4)),
           _spawn(cmd + [str(tmp_path / "full")], _env(4))])
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["mesh"]["fsdp"] == 2
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "full")
    trained = [jax.tree.leaves(partition.split(load_run(tmp_path / name)[0])[1]) for name in ("killed", "full")]
    for a, b in zip(*trained, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _restore(directory: Path, template, config):
    ckpt = Checkpointer(directory)
    try:
        trainable, _, meta = ckpt.restore(template, config=config)
    finally:
        ckpt.close()
    assert meta["step"] == config.train.steps
    return trainable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_4_devices_train_as_one_process_of_8(table, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed, gloo over loopback) on the FSDP=4 x DP=2 mesh give the losses
    of the one-process 8-device run of the same config (the table's row) and of one device; the checkpoint they
    write collectively restores onto this process's one device (its leaves' checksums checked: bitwise)."""
    config = tiny_config(write_texts(tmp_path / "texts"), None)
    (tmp_path / "c.yaml").write_text(json.dumps({**config, "name": "two"}))  # JSON is YAML
    cmd = [sys.executable, "-m", "peftjax.cli", "train", str(tmp_path / "c.yaml"), "--mesh", "data=2,fsdp=4",
           "--no-progress", "--out", str(tmp_path / "two")]
    port = _free_port()
    _wait([_spawn(cmd, _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                            JAX_PROCESS_ID=str(i))) for i in range(2)])
    (row,) = [r for r in table if r["layout"] == "FSDP=4 x DP=2" and r["method"] == "LoRA"]
    losses = np.array(_losses(tmp_path / "two"))
    assert np.max(np.abs(losses - row["losses"])) <= TOL and np.max(np.abs(losses - row["reference_losses"])) <= TOL
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1, "processes": 2}
    assert summary["frozen_bytes_per_device"] == row["frozen_bytes_per_device"]
    run_config = from_dict(config)
    _, template, _ = partition.split(build(run_config, with_data=False).model)
    restored = _restore(tmp_path / "two" / "checkpoints", template, run_config)
    assert all(x.shape == y.shape for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(template)))


def test_mesh_settings_are_checked_in_one_line(tmp_path, capsys):
    from peftjax.cli import main

    out = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), "--set", "model.name=tiny", "--mesh", "fsdp=2",
                 "--out", str(out)]) == 2
    assert "mesh fsdp=2 x tensor=1 does not divide the 1 devices" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    with pytest.raises(PeftjaxError, match=r"mesh data=2 x fsdp=4 x tensor=1 = 8 devices, but 1 are in use"):
        make_mesh({"data": 2, "fsdp": 4})
    with pytest.raises(PeftjaxError, match="--mesh expects axis=size pairs of data, fsdp, tensor"):
        parse_mesh("data=2,pipeline=4")
    with pytest.raises(PeftjaxError, match="--mesh expects"):
        parse_mesh("fsdp=0")
    assert mesh_overrides("data=2, fsdp=4") == ["mesh.data=2", "mesh.fsdp=4"]
    assert make_mesh({}).shape == {"data": 1, "fsdp": 1, "tensor": 1}  # default: every device on data
    for override, message in (("mesh.rules={embeding: fsdp}", "mesh.rules has unknown logical axis 'embeding'"),
                              ("mesh.rules={heads: model}", "mesh.rules.heads must be one of data, fsdp, tensor"),
                              ("mesh.tensor=0", "mesh.tensor must be >= 1"),
                              ("mesh.process_id=1", "mesh.coordinator, mesh.num_processes and mesh.process_id go "
                                                    "together")):
        with pytest.raises(PeftjaxError, match=message):
            from_dict({"model": {"name": "tiny"}}, [override])


def test_recorded_equality_table_regenerates_from_its_results():
    """experiments/scale's README tables are run.py's rendering of the committed results.json (every layout x method
    within the bound) and memory.json (every per-device estimate within 15% of XLA's)."""
    import importlib.util

    from peftjax.studies.report import generated_markers

    folder = ROOT / "experiments" / "scale"
    spec = importlib.util.spec_from_file_location("scale_run", folder / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = json.loads((folder / "results.json").read_text())
    assert [(r["layout"], r["method"]) for r in rows] == [(l, m) for m in METHODS for l in LAYOUTS]
    assert all(r["max_loss_diff"] <= TOL and r["max_param_diff"] <= TOL and r["blocks_aligned"] for r in rows)
    readme = (folder / "README.md").read_text()
    begin, end = generated_markers("table.md")
    assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == module.table(rows).strip()
    memory = json.loads((folder / "memory.json").read_text())
    assert [(r["layout"], r["method"]) for r in memory] == [(l, m) for m in MEMORY_METHODS for l in LAYOUTS]
    assert all(abs(r["estimate"]["total"] / r["measured"]["total"] - 1) < 0.15 for r in memory)
    begin, end = generated_markers("memory.md")
    assert readme.split(begin, 1)[1].split(end, 1)[0].strip() == module.memory_table(memory).strip()


def test_optimizer_state_with_learning_rate_groups_is_laid_out_like_its_parameters():
    """optax.partition (train.group_learning_rates) holds masked moments per group: each is still found by its
    parameter's path and laid out like it (here on a one-device mesh, where every layout is that device)."""
    from peftjax.train import make_optimizer
    from peftjax.train.placement import place

    config = from_dict({"model": {"name": "tiny", "num_layers": 1}, "peft": {"method": "lora", "rank": 4},
                        "train": {"group_learning_rates": {"lorab": 0.016}}})
    placed = place(build(config, with_data=False).model, make_mesh({}), make_optimizer(config.train), batch_size=1)
    specs = {jax.tree_util.keystr(p): x.sharding.spec
             for p, x in jax.tree_util.tree_flatten_with_path(placed.trainable)[0]}
    moments = [(k, x.sharding.spec) for p, x in jax.tree_util.tree_flatten_with_path(placed.opt_state)[0]
               for k in specs if jax.tree_util.keystr(p).endswith(k)]
    assert len(moments) == 2 * len(specs)  # mu and nu of every parameter, in the group that holds it
    assert all(spec == specs[k] for k, spec in moments)
    assert {str(spec) for spec in specs.values()} == {"P('fsdp', None)", "P(None, 'fsdp')", "P('tensor', None)",
                                                      "P(None, 'tensor')"}
