"""`peftjax sweep` and `peftjax report` on a tiny model: run dirs, resume, failures, shards, report and plots."""
import json
import os

import pytest

from peftjax.errors import PeftjaxError
from peftjax.studies.sweep import parse_shard, plan


def write_spec(files, tmp_path, sweep: str, name="spec.yaml"):
    spec = tmp_path / name
    spec.write_text(
        "model: {name: tiny}\npeft: {method: lora, rank: 2}\n"
        f"data: {{dataset: files, eval_docs: 1, seq_len: 32, max_eval_blocks: 4, files: [{', '.join(map(str, files))}]}}\n"
        "train: {steps: 3, batch_size: 2, learning_rate: 0.01}\n" + sweep)
    return spec


def test_sweep_runs_points_resumes_and_reports(cli, play_files, tmp_path):
    spec = write_spec(play_files, tmp_path, "sweep:\n  grid: {train.seed: [0, 1]}\n"
                                "  zip: {name: [lora, qlora], quant.format: [null, nf4], peft.rank: [1, 2]}\n")
    out = tmp_path / "sweep"
    own_cache = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the suite's cache
    proc = cli("sweep", str(spec), "--out", str(out), "--workers", "2", env=own_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir() if (p / "summary.json").exists())
    assert names == sorted(f"{m},seed={s}" for m in ("lora", "qlora") for s in (0, 1))
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(line["status"] == "ok" for line in lines)
    assert {line["summary"]["rank"] for line in lines} == {1, 2}
    report = (out / "report.md").read_text()
    assert "± " in report and report.count("\n| ") == 3  # header + 2 groups (seeds averaged)
    assert "4 finished runs in 2 groups" in report and "eval loss after vs best" in report
    for plot in ("quality_vs_memory.png", "quality_vs_time.png", "eval_loss_vs_rank.png", "tokens_per_s.png",
                 "loss_curves.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.csv").read_text().startswith("name,peft.rank,quant.format,seeds")
    assert any((out / ".jax_cache").iterdir())  # the points' shared compilation cache
    # a rerun skips finished points
    again = cli("sweep", str(spec), "--out", str(out))
    assert again.returncode == 0 and again.stdout.count(": skipped") == 4


def test_failing_point_is_recorded_and_the_sweep_goes_on(cli, play_files, tmp_path):
    empty = tmp_path / "empty.txt"  # found out by the point's run (plan checks keys, values and shapes)
    empty.write_text("")
    spec = write_spec(play_files, tmp_path, f"sweep:\n  zip: {{name: [ok, bad], data.files: [[{', '.join(map(str, play_files))}], [{empty}]]}}\n")
    out = tmp_path / "sweep"
    proc = cli("sweep", str(spec), "--out", str(out))
    assert proc.returncode == 1
    lines = {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert lines["ok"]["status"] == "ok"
    assert lines["bad"]["status"] == "failed" and "every data file is empty" in lines["bad"]["error"]


def test_shards_split_the_points(play_files, tmp_path):
    spec = write_spec(play_files, tmp_path, "sweep:\n  grid: {peft.rank: [1, 2, 3]}\n")
    _, first = plan(str(spec), tmp_path / "a", parse_shard("0/2"))
    _, second = plan(str(spec), tmp_path / "a", parse_shard("1/2"))
    assert [p["peft.rank"] for p in first] == [1, 3] and [p["peft.rank"] for p in second] == [2]


@pytest.mark.parametrize("sweep, message", [
    ("sweep:\n  grid: {peft.rnak: [1, 2]}\n", "unknown config key peft.rnak for method 'lora'; did you mean peft.rank?"),
    ("sweep:\n  grid: {peft.rank: []}\n", "must be a non-empty list"),
    ("", "has no sweep section"),
    # the tiny model's k / v projections are 64 -> 32: rank 48 does not fit them (a shapes-only build says so)
    ("sweep:\n  grid: {peft.rank: [2, 48]}\n", "sweep point rank=48: .*rank 48"),
    ("sweep:\n  zip: {name: [ok, bad], peft.targets: [all-linear, [nothing_here]]}\n",
     "sweep point bad: .*matches no module"),
])
def test_bad_sweeps_fail_before_any_point_runs(play_files, tmp_path, sweep, message):
    spec = write_spec(play_files, tmp_path, sweep)
    out = tmp_path / "sweep"
    with pytest.raises(PeftjaxError, match=message.replace("?", r"\?")):
        plan(str(spec), out)
    assert not out.exists()


def test_directory_of_another_sweep_is_refused(cli, play_files, tmp_path):
    plan(str(write_spec(play_files, tmp_path, "sweep:\n  grid: {peft.rank: [1]}\n")), tmp_path / "s")
    other = write_spec(play_files, tmp_path, "sweep:\n  grid: {peft.rank: [2]}\n", name="other.yaml")
    with pytest.raises(PeftjaxError, match="belongs to another sweep"):
        plan(str(other), tmp_path / "s")
    proc = cli("sweep", str(other), "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("peftjax: error:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_shard_text():
    with pytest.raises(PeftjaxError, match="--shard expects I/N"):
        parse_shard("3/2")


def test_quickstart_runs_its_points_and_keeps_raw_results(cli, play_files, tmp_path):
    """`peftjax quickstart --config`: every point its own process, the comparison table, and results.jsonl from
    which `report --table lora-vs-qlora` makes the paper's table."""
    config = write_spec(play_files, tmp_path, "sweep:\n  zip: {name: [lora, qlora], preset: [lora, qlora]}\n")
    out = tmp_path / "quick"
    proc = cli("quickstart", "--config", str(config), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "| LoRA |" in proc.stdout and "| QLoRA (NF4+DQ) |" in proc.stdout
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"], r["summary"]["quant"]) for r in lines] == [("lora", "ok", None),
                                                                               ("qlora", "ok", "nf4")]
    table = cli("report", str(out), "--table", "lora-vs-qlora")
    assert table.returncode == 0 and "| QLoRA (NF4+DQ) | " in (out / "table.md").read_text()
