"""The benchmark harness's pure parts (experiments/bench_vs_peer/compare.py): FLOPs per token against the matmuls
JAX actually traces, the roofline's weighting, the table from a hand-written results file, and its usage errors."""
import importlib.util
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.extend import core as jcore

from peftjax import partition
from peftjax.models.llama import LlamaForCausalLM, Linear
from peftjax.studies.bench import TABLE_COLUMNS, flops_per_token, format_table, roofline_flops
from peftjax.studies.memory import architecture, method_run_config
from peftjax.train import build

ROOT = Path(__file__).resolve().parents[2]


def dot_flops(jaxpr) -> int:
    """2 x (output elements) x (contracted size) summed over every dot_general, sub-jaxprs included."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += dot_flops(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += dot_flops(sub)
    return total


@pytest.mark.parametrize("method,targets,trains_embedding", [
    ("lora", "all-linear", None),  # the first layer's q, k, v need no input gradient: the embedding is frozen
    ("full", ".*", None),  # every parameter: the tied head's weight gradient and every input gradient
    ("full", "all-linear", False),  # linear layers only: the embedding (= head) frozen
])
def test_flops_per_token_equal_the_traced_matmuls(method, targets, trains_embedding):
    """Exactly the dot_general FLOPs of the tiny model's loss and gradient over its trainable parameters."""
    B, T, rank = 2, 32, 4
    config = method_run_config(method, model="tiny", rank=rank, alpha=8.0, targets=targets)
    net = build(config, with_data=False).model
    graphdef, trainable, frozen = partition.split(net)

    def loss(trainable, frozen, ids):
        logits = partition.merge(graphdef, trainable, frozen)(ids)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1).mean()

    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(trainable, frozen, jnp.zeros((B, T), jnp.int32)).jaxpr
    expected = flops_per_token(net.config, T, method, rank, trains_embedding)["total"] * B * T
    assert dot_flops(jaxpr) == expected


def test_linear_params_are_smollm2s_linear_weights():
    """N counts every Linear weight of the built (abstract) SmolLM2 plus its tied embedding as the head."""
    arch, tied = architecture("smollm2")
    model = nnx.eval_shape(lambda: LlamaForCausalLM(arch, rngs=nnx.Rngs(0)))
    linears = sum(math.prod(m.weight.shape) for _, m in nnx.iter_modules(model) if isinstance(m, Linear))
    head = math.prod(model.embed_tokens.weight.shape)
    assert tied and arch.hidden_size == 576 and arch.num_layers == 30
    n = flops_per_token(arch, 256, "lora")["linear_params"]
    assert n == linears + head == 134_479_872
    full = flops_per_token(arch, 256, "full")
    assert full["total"] == 6 * n + 12 * 256 * 576 * 30


def test_roofline_weights_each_shape_by_its_flops():
    rows = [dict(tokens=10, d_in=100, d_out=50, count=3,
                 seconds=dict(forward=1e-6, input_grad=2e-6, weight_grad=4e-6)),
            dict(tokens=10, d_in=100, d_out=500, count=1,
                 seconds=dict(forward=1e-5, input_grad=1e-5, weight_grad=1e-5))]
    flops = 2 * 10 * 100 * (50 * 3 + 500)  # per kind
    assert roofline_flops(rows, ("forward",)) == pytest.approx(flops / (3e-6 + 1e-5))
    assert roofline_flops(rows) == pytest.approx(3 * flops / (3 * 7e-6 + 3e-5))


def peer(tokens_per_s, rss_mb=4000.0):
    return {"peer": "hf-peft", "step_s": 1024 / tokens_per_s, "tokens_per_s": tokens_per_s, "peak_rss_mb": rss_mb}


def results():
    ours = dict(median_step_s=2.0, tokens_per_s=512.0, step_device_bytes=600 * 2**20, peak_rss_bytes=3 * 2**30,
                compile_s=9.5)
    matmuls = [dict(tokens=1024, d_in=576, d_out=576, count=1, seconds=dict(forward=s, input_grad=s, weight_grad=s))
               for s in (2 * 1024 * 576 * 576 / 100e9,)]
    slower = [dict(m, seconds={k: 2 * v for k, v in m["seconds"].items()}) for m in matmuls]
    return {
        "date": "2026-12-10 12:00 UTC", "command": "compare.py",
        "machine": dict(cpu="Test CPU", cores=2, backend="cpu"),
        "versions": dict(jax="0.10.2", torch="2.13.0", peft="0.21.2", transformers="5.24.0", bitsandbytes="0.50.2"),
        "settings": dict(batch=4, seq=256, rank=8, targets="all-linear", steps=6, warmup=2),
        "roofline": {"runs": [slower, matmuls]},  # the faster run (100 GFLOP/s) is the roofline
        "methods": {
            "lora": {"flops_per_token": {"total": 50e6}, "peftjax": ours,
                     "peer": {"float32": peer(200.0), "bfloat16": peer(256.0, 3000.0)}},
            "full": {"flops_per_token": {"total": 100e6}, "peftjax": dict(ours, tokens_per_s=300.0),
                     "peer": {"float32": peer(250.0), "bfloat16": peer(200.0)}},
        },
    }


def test_table_from_a_results_file():
    lines = format_table(results()).splitlines()
    assert "Test CPU (2 cores, cpu)" in lines[0] and "LoRA/QLoRA 100, full 100 GFLOP/s" in lines[0]
    assert lines[2] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    lora = lines[4].split(" | ")
    cell = dict(zip(TABLE_COLUMNS, [lora[0].strip("| "), *lora[1:-1], lora[-1].strip(" |")]))
    assert cell["method"] == "lora" and cell["peftjax tokens/s"] == "512"
    assert cell["peftjax MFU"] == "26%"  # 512 tokens/s x 50 MFLOP / 100 GFLOP/s
    assert cell["HF PEFT float32 tokens/s"] == "200" and cell["HF PEFT bfloat16 tokens/s"] == "256"
    assert cell["peftjax / best HF PEFT"] == "2.00x (vs bfloat16)"  # against the faster peer setting
    assert cell["HF PEFT peak RSS (best)"] == "2.93 GiB"
    assert cell["peftjax step device memory"] == "600 MiB" and cell["peftjax compile (s)"] == "9.5"
    assert "| 1.20x (vs float32) |" in lines[5]


def load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "experiments" / "bench_vs_peer" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args,message", [
    (["--methods", "lora,lokr"], "unknown or missing --methods / --peer-dtypes lokr"),
    (["--peer-dtypes", "float16"], "unknown or missing --methods / --peer-dtypes float16"),
    (["--methods", "lora"], "pass --peer PATH: the Hugging Face PEFT timing script"),
    (["--methods", "lora", "--peer", "missing/hf_peft_step.py"], "--peer missing/hf_peft_step.py is not a file"),
])
def test_usage_errors_are_one_line_with_status_2(args, message, monkeypatch, capsys, tmp_path):
    compare = load_compare()
    with pytest.raises(SystemExit) as exit_:
        compare.main([*args, "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_table_rewrites_only_the_readmes_section(monkeypatch, capsys, tmp_path):
    compare = load_compare()
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\n{compare.MARKERS[0]}\nold\n{compare.MARKERS[1]}\n\n## History\nkept\n")
    monkeypatch.setattr(compare, "README", readme)
    (tmp_path / "r.json").write_text(json.dumps(results()))
    assert compare.main(["--table", "--readme", "--out", str(tmp_path / "r.json")]) == 0
    table = format_table(results())
    assert capsys.readouterr().out.strip() == table
    assert readme.read_text() == (f"# Title\n\n{compare.MARKERS[0]}\n\n{table}\n\n{compare.MARKERS[1]}\n\n"
                                  "## History\nkept\n")
