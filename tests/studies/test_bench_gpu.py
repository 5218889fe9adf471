"""experiments/bench_gpu/run.py (the GPU benchmark, run by hand on a GPU machine, never here): its two measurements
train the same parameters on the same checkpoint, and its table computes ratios and MFU from a results file."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the interop extra (torch, transformers, peft) is not installed")

RUN = Path(__file__).resolve().parents[2] / "experiments" / "bench_gpu" / "run.py"


@pytest.fixture(scope="module")
def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["lora", "full"])
def test_peer_and_peftjax_train_the_same_parameters_of_one_checkpoint(bench_gpu, tmp_path, method):
    model_dir = bench_gpu.write_checkpoint("toy", tmp_path)
    sizes = dict(batch=2, seq=16, rank=4, steps=1, warmup=1)
    peer = bench_gpu.measure_peer(model_dir, method, **sizes)
    ours = bench_gpu.measure_peftjax(model_dir, method, **sizes)
    assert peer["trainable_params"] == ours["trainable_params"]
    n = bench_gpu.flops("toy", 16, method, 4)["linear_params"]
    assert ours["trainable_params"] > (n if method == "full" else 0)
    # both start from the same random weights: the first loss is near ln(vocab) on both sides
    assert abs(peer["loss"] - ours["loss"]) < 0.2, (peer["loss"], ours["loss"])


def test_table_ratios_and_mfu(bench_gpu):
    flop = 2e9  # per token
    results = {"date": "d", "machine": {"device": "NVIDIA H200", "backend": "gpu"},
               "versions": {}, "settings": dict(batch=8, seq=1024, rank=8, steps=10, warmup=3),
               "matmul": {"n": 8192, "flops_per_s": 800e12},
               "runs": [{"model": "m", "method": "lora", "flops_per_token": {"total": flop},
                         "peftjax": {"tokens_per_s": 98_900.0, "device_peak_bytes": 3 * 2**30, "compile_s": 12.0},
                         "peer": {"tokens_per_s": 65_933.3, "device_peak_bytes": 4 * 2**30}},
                        {"model": "m", "method": "qlora", "flops_per_token": {"total": flop},
                         "peftjax": {"tokens_per_s": 50_000.0, "device_peak_bytes": 2**30, "compile_s": 20.0},
                         "peer": {"error": "bitsandbytes is not installed"}}]}
    lines = bench_gpu.table(results).splitlines()
    assert "989 TFLOP/s (data sheet)" in lines[0] and "800 TFLOP/s measured" in lines[0]
    lora = [c.strip() for c in lines[4].strip("|").split("|")]
    # 98,900 tokens/s x 2 GFLOP = 197.8 TFLOP/s: 20% of 989, 25% of 800; the peer 131.9 TFLOP/s: 13%
    assert lora[3:9] == ["98,900", "65,933", "1.50x", "20%", "25%", "13%"]
    assert lora[9:] == ["3.00 GiB", "4.00 GiB", "12.0"]
    qlora = [c.strip() for c in lines[5].strip("|").split("|")]
    assert qlora[4] == "- (bitsandbytes is not installed)" and qlora[5] == "-"


@pytest.mark.parametrize("name", ["results.json", "results-run1.json"])
def test_recorded_gpu_tables_regenerate_byte_identically(bench_gpu, name):
    """The README's tables are written by ``table`` from the committed results of the H200 runs, never typed."""
    import json

    from peftjax.studies.report import generated_markers

    results = json.loads((RUN.parent / name).read_text())
    assert results["machine"]["backend"] == "gpu" and not results["smoke"]
    begin, end = generated_markers(name)
    region = (RUN.parent / "README.md").read_text().split(begin, 1)[1].split(end, 1)[0].strip()
    assert region == bench_gpu.table(results).strip()
