"""Faults a sweep must survive: a SIGKILLed sweep leaves no orphan and its point resumes from its own checkpoint;
a point another process holds is left alone and not recorded; reports without matplotlib."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftjax.studies.report import write_sweep_report
from peftjax.studies.sweep import plan, run_point, run_sweep
from peftjax.train.loop import lock_run_dir

ROOT = Path(__file__).resolve().parents[2]


def _spec(tmp_path, files, steps=3, extra=""):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: {name: tiny}\npeft: {method: lora, rank: 2}\n"
        "data: {dataset: files, eval_docs: 1, seq_len: 32, max_eval_blocks: 4, "
        f"files: [{', '.join(map(str, files))}]}}\n"
        f"train: {{steps: {steps}, batch_size: 2, learning_rate: 0.01{extra}}}\n"
        "sweep:\n  grid: {peft.rank: [1]}\n")
    return spec


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_killed_sweep_leaves_no_orphan_and_the_point_resumes_from_its_checkpoint(play_files, tmp_path):
    spec = _spec(tmp_path, play_files, steps=400, extra=", save_every: 20")
    out = tmp_path / "sweep"
    sweep = subprocess.Popen([sys.executable, "-m", "peftjax.cli", "sweep", str(spec), "--out", str(out)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    point = out / "rank=1"
    try:
        deadline = time.time() + 120
        while not (point / "checkpoints" / "20").is_dir():
            assert time.time() < deadline and sweep.poll() is None, "no checkpoint appeared"
            time.sleep(0.2)
        children = _children_of(sweep.pid)
        assert children
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.time() + 20
    while any(_alive(c) for c in children):  # the point dies with its sweep
        assert time.time() < deadline, "the point outlived its SIGKILLed sweep"
        time.sleep(0.1)
    assert not (point / "summary.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "peftjax.cli", "sweep", str(spec), "--out", str(out)],
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "1 points finished, 0 failed" in resumed.stdout
    summary = json.loads((point / "summary.json").read_text())
    assert summary["resumed_from_step"] and summary["resumed_from_step"] >= 20
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["ok"]


def test_a_point_held_by_another_process_is_left_alone_and_not_recorded(play_files, tmp_path):
    spec = _spec(tmp_path, play_files)
    out = tmp_path / "sweep"
    plan(str(spec), out)  # the other sweep claimed the directory
    lines = []
    with lock_run_dir(out / "rank=1"):  # another sweep (or train) is running this point
        results = run_sweep(str(spec), out, progress=lines.append)
    assert [r["status"] for r in results] == ["busy"]
    assert "in use by another peftjax process" in lines[0]
    assert not (out / "rank=1").exists() and not (out / "results.jsonl").exists()


def test_a_finished_point_whose_line_was_lost_is_recorded_once(play_files, tmp_path):
    spec = _spec(tmp_path, play_files)
    out = tmp_path / "sweep"
    (out / "rank=1").mkdir(parents=True)
    (out / "rank=1" / "summary.json").write_text('{"rank": 1}')  # finished, then the sweep was killed
    assert run_point(str(spec), out, {"peft.rank": 1})["status"] == "skipped"
    assert run_point(str(spec), out, {"peft.rank": 1})["status"] == "skipped"
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line["status"] for line in lines] == ["skipped"]


def _fake_sweep(out: Path) -> None:
    out.mkdir()
    summary = {"eval_loss_before": 5.0, "eval_loss_after": 4.0, "trainable_params": 10, "total_params": 100,
               "frozen_bytes": 360, "peak_rss_bytes": 1 << 20, "tokens_per_s": 100.0, "median_step_s": 0.1}
    with open(out / "results.jsonl", "w") as f:
        for rank in (1, 2):
            f.write(json.dumps({"name": f"rank={rank}", "point": {"peft.rank": rank}, "status": "ok",
                                "summary": {**summary, "rank": rank}}) + "\n")


def test_report_without_matplotlib_writes_report_md_and_says_so(tmp_path, monkeypatch, capsys):
    import peftjax.studies.plots as plots_module

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setattr(plots_module, "_PLOT_NOTE_SHOWN", False)
    _fake_sweep(tmp_path / "s")
    text, plots = write_sweep_report(tmp_path / "s")
    assert plots == [] and "| 1 |" in text
    assert (tmp_path / "s" / "report.md").read_text() == text
    assert not list((tmp_path / "s").glob("*.png"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib is not installed, so no plots were drawn" in err


def test_report_with_matplotlib_draws_plots(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_sweep(tmp_path / "s")
    _, plots = write_sweep_report(tmp_path / "s")
    assert "eval_loss_vs_rank.png" in plots and (tmp_path / "s" / "eval_loss_vs_rank.png").exists()


def _tiny_run_config(files, **train):
    from peftjax.config import from_dict

    return from_dict({"model": {"name": "tiny"}, "peft": {"method": "lora", "rank": 2},
                      "data": {"dataset": "files", "eval_docs": 1, "seq_len": 32, "max_eval_blocks": 4,
                               "files": [str(f) for f in files]},
                      "train": {"steps": 4, "batch_size": 2, "learning_rate": 0.01, "save_every": 2, **train}})


def test_resume_after_a_kill_during_the_final_eval_writes_a_full_summary(play_files, tmp_path):
    """Killed after the last checkpoint, before summary.json: the resumed run trains no step, and its summary
    still holds the step time, tokens/s and train losses of the run (from metrics.jsonl), not nulls."""
    from peftjax.train import run

    config = _tiny_run_config(play_files)
    whole = run(config, tmp_path / "run", progress=False)
    (tmp_path / "run" / "summary.json").unlink()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines[:-1]) + '\n{"step": 4, "eval_lo')  # cut line
    resumed = run(config, tmp_path / "run", progress=False, resume=True)
    for key in ("median_step_s", "tokens_per_s", "train_loss_first", "train_loss_last", "eval_loss_after"):
        assert resumed[key] is not None, key
    assert resumed["train_loss_first"] == whole["train_loss_first"]
    assert resumed["train_loss_last"] == whole["train_loss_last"]
    assert resumed["eval_loss_after"] == whole["eval_loss_after"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [4]  # one final eval, no duplicate


def test_report_names_unfinished_points_and_skips_a_cut_line(tmp_path):
    _fake_sweep(tmp_path / "s")
    with open(tmp_path / "s" / "results.jsonl", "a") as f:
        f.write(json.dumps({"name": "rank=4", "point": {"peft.rank": 4}, "status": "interrupted"}) + "\n")
        f.write('{"name": "rank=8", "poi')  # the sweep was killed while writing
    text, _ = write_sweep_report(tmp_path / "s")
    assert "2 finished runs" in text and "Not finished (left out): rank=4 (interrupted)" in text


def test_the_nonfinite_streak_survives_a_resume(play_files, tmp_path, monkeypatch):
    """Steps 5.. report non-finite losses; with max_nonfinite=3 a 6-step run ends with a streak of 2, and its
    continuation to 8 steps stops at step 7, as one uninterrupted run would."""
    import jax

    from peftjax.errors import PeftjaxError
    from peftjax.train import run

    original, calls = jax.device_get, []

    def poisoned(x):
        out = original(x)
        if isinstance(out, dict) and "finite" in out:
            calls.append(1)
            if len(calls) >= 5:
                out = {**out, "finite": False, "loss": float("nan")}
        return out

    monkeypatch.setattr(jax, "device_get", poisoned)
    config = _tiny_run_config(play_files, schedule="constant", max_nonfinite=3, steps=6, save_every=0)
    assert run(config, tmp_path / "run", progress=False)["nonfinite_skipped"] == 2
    longer = _tiny_run_config(play_files, schedule="constant", max_nonfinite=3, steps=8, save_every=0)
    with pytest.raises(PeftjaxError, match="stopped at step 7: 3 non-finite"):
        run(longer, tmp_path / "run", progress=False, resume=True)


def test_a_full_disk_while_writing_the_summary_is_one_line_and_the_run_resumes(play_files, tmp_path, monkeypatch):
    import errno

    import peftjax.train.loop as loop
    from peftjax.errors import PeftjaxError
    from peftjax.train import run

    original = loop.write_json

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(loop, "write_json", full)
    config = _tiny_run_config(play_files)
    with pytest.raises(PeftjaxError) as info:
        run(config, tmp_path / "run", progress=False)
    assert str(info.value).startswith(f"{tmp_path / 'run' / 'summary.json'}: No space left on device; the run "
                                      "stopped")
    monkeypatch.setattr(loop, "write_json", original)
    summary = run(config, tmp_path / "run", progress=False, resume=True)
    assert summary["steps"] == 4 and (tmp_path / "run" / "summary.json").exists()
