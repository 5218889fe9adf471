"""The CLI end to end on a tiny model, and its answers to bad input: one line, exit 2, nothing written."""
import json

import pytest


def test_train_writes_run_directory(cli, tiny_args, tmp_path, config):
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "rank", "quant", "trainable_params", "total_params", "frozen_bytes", "trainable_bytes",
                "peak_rss_bytes", "median_step_s", "tokens_per_s", "eval_loss_before", "eval_loss_after", "steps",
                "wall_s"):
        assert key in summary, key
    assert summary["steps"] == 4 and summary["method"] == "lora" and summary["rank"] == 4
    assert 0 < summary["trainable_params"] < summary["total_params"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    # the step loop's time is the first step (compilation included) and the three after it
    assert summary["train_s"] == pytest.approx(sum(r["step_s"] for r in records if "loss" in r), rel=1e-6)
    assert [r["step"] for r in records if "eval_loss" in r] == [4]  # eval at the end
    assert (out / "checkpoints" / "4").is_dir() and summary["checkpoint_bytes"] > 0
    assert "rank: 4" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.stepz=3"], "unknown config key train.stepz; did you mean train.steps?"),
    (["--set", "peft.targets=[qkv_proj]"], "LoRA target rule 'qkv_proj' matches no module; available paths:"),
    (["--set", "peft.rank=1000"], "LoRA rank 1000 does not fit"),
    (["--set", "data.dataset=files", "--set", "data.files=[/nonexistent/plays.txt]"],
     "data file /nonexistent/plays.txt not found"),
    (["--set", "train.steps=ten"], "config key train.steps must be int"),
    (["--set", "peft.method=lorax"], "unknown PEFT method 'lorax'; registered methods:"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tiny_args, tmp_path, config, extra, message):
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, *extra, "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftjax: error: "), proc.stderr
    assert message in lines[0]
    assert not out.exists()


def test_missing_config_file(cli, tmp_path):
    proc = cli("train", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "config file" in proc.stderr and "not found" in proc.stderr


def test_existing_run_directory_is_not_overwritten(cli, tiny_args, tmp_path, config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    proc = cli("train", str(config), *tiny_args, "--out", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("method", [["peft.method=ia3"], ["peft.method=prefix", "peft.num_tokens=4"],
                                    ["peft.method=prompt", "peft.num_tokens=4"], ["peft.method=vera"],
                                    ["peft.method=lora", "peft.dora=true"], ["peft.method=selective"],
                                    ["peft.method=full"]])
def test_every_method_trains_from_yaml(cli, tiny_args, tmp_path, config, method):
    """(LoHa, LoKr, OFT, QA-LoRA, AdaLoRA and EVA train from YAML in their own test files.)"""
    out = tmp_path / "run"
    sets = [arg for kv in method for arg in ("--set", kv)]
    proc = cli("train", str(config), *tiny_args, *sets, "--set", "train.steps=2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method[0].split("=")[1] and 0 < summary["trainable_params"]


def test_bench_reports_the_dtypes_it_ran(cli):
    proc = cli("bench", "--model", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--warmup", "0",
               "--compute-dtype", "bfloat16", "--param-dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (record["compute_dtype"], record["param_dtype"]) == ("bfloat16", "bfloat16")
    assert record["tokens_per_s"] > 0 and record["loss"] > 0
