"""peftjax memory: exact parameter counts, the classic bf16 table, method ordering, and estimate vs XLA."""
import json
import math

import jax

import pytest
from flax import nnx

from peftjax.studies import memory as M
from peftjax import partition, peft
from peftjax.cli import main
from peftjax.config import from_dict
from peftjax.train import lm_loss, make_optimizer
from peftjax.models import LlamaConfig, LlamaForCausalLM
from peftjax.peft.lora import LoRAConfig

GIB = 1024 ** 3

# published parameter counts (Touvron et al. 2023a/b, Mistral 7B model card) and the classic bf16 table
CLASSIC = {"llama2-70b": (68_976_648_192, 128), "llama2-13b": (13_015_864_320, 24),
           "llama2-7b": (6_738_415_616, 12), "mistral-7b": (7_241_732_096, 13), "llama-65b": (65_285_660_672, 121)}


@pytest.mark.parametrize("name", sorted(CLASSIC))
def test_classic_bf16_table(name):
    params, gib = CLASSIC[name]
    e = M.estimate(name, "full")
    assert e.total_params == params
    assert math.floor(2 * params / GIB) == gib
    assert f"| {gib} GB |" in M.bf16_weight_table([name])


def test_smollm2_count_matches_a_real_build():
    """The two-build extrapolation gives exactly the counts of the full model (SmolLM2: 134,515,008)."""
    arch, _ = M.architecture("smollm2")
    e = M.estimate("smollm2", "lora", rank=8)
    assert e.total_params - e.trainable_params == 134_515_008
    built = jax.eval_shape(lambda: partition.split(peft.apply(LlamaForCausalLM(arch, rngs=nnx.Rngs(0)),
                                                              LoRAConfig(rank=8)))[1:])
    assert e.trainable_params == partition.param_count(built[0]) == 2_442_240


def test_memory_ordering_and_the_65b_qlora_claim():
    for name in CLASSIC:
        full, lora, qlora = (M.estimate(name, m, batch_size=1, seq_len=512).total for m in ("full", "lora", "qlora"))
        assert qlora < lora < full
    # QLoRA (Dettmers et al. 2023): a 65B model fine-tunes on one 48 GB GPU (with activation checkpointing)
    assert M.estimate("llama-65b", "qlora", batch_size=1, seq_len=512, remat=True).total < 48 * GIB
    # full fine-tuning in mixed precision is 16 bytes per parameter before activations
    e = M.estimate("llama2-7b", "full")
    assert e.weights + e.gradients + e.optimizer == 16 * e.total_params


def test_tiny_parts_are_exact_sizes():
    e = M.estimate("tiny", "lora", rank=4, weight_dtype="float32", batch_size=2, seq_len=16)
    model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = partition.split(peft.apply(model, LoRAConfig(rank=4)))
    assert e.adapter == partition.tree_nbytes(trainable)
    assert e.weights == partition.tree_nbytes(frozen)
    # gradients and optimizer state as the framework's own loss and AdamW build them (shapes only, nothing runs)
    blocks = jax.ShapeDtypeStruct((2, 17), jax.numpy.int32)
    grads = jax.eval_shape(lambda t, f, b: jax.grad(lm_loss, argnums=1)(graphdef, t, f, b), trainable, frozen, blocks)
    opt_state = jax.eval_shape(make_optimizer(from_dict({}).train).init, trainable)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if x.ndim > 0)  # noqa: E731
    assert e.gradients == nbytes(grads)
    assert e.optimizer == nbytes(opt_state)  # AdamW's two moments (its scalar step count aside)


@pytest.mark.parametrize("method", ["lora", "full", "qlora"])
def test_estimate_agrees_with_xla_on_tiny(method):
    e = M.estimate("tiny", method, batch_size=4, seq_len=64, weight_dtype="float32", compute_dtype="float32")
    measured = M.measure_step("tiny", method, batch_size=4, seq_len=64)["total"]
    assert 0.8 < e.total / measured < 1.2


@pytest.mark.slow
@pytest.mark.parametrize("method,weight_dtype", [("lora", "float32"), ("qlora", "bfloat16")])
def test_estimate_within_15_percent_of_xla_on_smollm2(method, weight_dtype):
    """SmolLM2's first 6 decoder layers (its real widths, vocabulary and tied head) x 128 tokens, float32 compute,
    at two batch sizes: the estimate against XLA's allocation for the compiled train step (LoRA on the float32
    base; QLoRA with the rest of its base in bfloat16, as its preset). Six layers, not 30: the estimate is per
    layer plus the embedding, and the unrolled 30-layer steps took minutes to compile here;
    experiments/memory and experiments/qlora_memory record the full model."""
    measured = M.measure_steps("smollm2", method, batch_sizes=(1, 4), seq_len=128, num_layers=6)
    for batch_size, allocation in measured.items():
        e = M.estimate("smollm2", method, batch_size=batch_size, seq_len=128, weight_dtype=weight_dtype,
                       compute_dtype="float32", num_layers=6)
        assert abs(e.total / allocation["total"] - 1) < 0.15, (batch_size, e.total, allocation)


def test_cli(capsys):
    assert main(["memory", "--table", "classic"]) == 0
    out = capsys.readouterr().out
    assert "| llama2-70b | 68,976,648,192 | 128.48 GiB | 128 GB |" in out
    assert main(["memory", "--model", "llama2-7b", "--method", "qlora"]) == 0
    assert "optimizer state" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "gpt-5"], "unknown model 'gpt-5' for the memory estimate; give one of smollm2"),
    (["--method", "nope"], "nope"),
    (["--weight-dtype", "int3"], "--weight-dtype must be one of float32, bfloat16, float16, got 'int3'"),
])
def test_cli_errors(capsys, argv, message):
    assert main(["memory", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftjax: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["llama3.1-8b", "qwen2.5-7b", "gemma2-9b", "mistral-7b"])
def test_published_parameter_counts_equal_transformers(name):
    """Each published architecture, built by transformers from the same config.json keys on the meta device (no
    memory), has exactly the parameter count the estimate reports."""
    torch = pytest.importorskip("torch", reason="the interop extra (torch, transformers) is not installed")
    transformers = pytest.importorskip("transformers")

    raw = dict(M.PUBLISHED[name])
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    expected = sum(p.numel() for p in model.parameters())  # a tied head is one parameter, counted once
    assert M.estimate(name, "full").total_params == expected


def test_memory_from_a_config_json(tmp_path, capsys):
    """``peftjax memory --model DIR`` reads a Hugging Face config.json (here Gemma 2 9B's keys) as a checkpoint's."""
    (tmp_path / "config.json").write_text(json.dumps(M.PUBLISHED["gemma2-9b"]))
    assert main(["memory", "--model", str(tmp_path), "--method", "qlora"]) == 0
    out = capsys.readouterr().out
    by_name = M.estimate("gemma2-9b", "qlora", seq_len=512)
    assert f"{by_name.total_params:,} parameters" in out and M.human(by_name.total) in out
    (tmp_path / "config.json").write_text(json.dumps({**M.PUBLISHED["gemma2-9b"], "model_type": "falcon"}))
    assert main(["memory", "--model", str(tmp_path)]) == 2
    assert "model_type 'falcon'" in capsys.readouterr().err


def test_mesh_of_one_device_is_the_one_device_estimate():
    for model, method in (("tiny", "qlora"), ("llama3.1-8b", "lora"), ("smollm2", "full")):
        one = M.estimate(model, method, batch_size=4, seq_len=64)
        on_mesh = M.estimate(model, method, batch_size=4, seq_len=64, mesh={"data": 1})
        assert on_mesh.total == one.total and on_mesh.gathered == 0


def test_per_device_estimate_divides_as_the_layout_splits():
    """Llama 3.1 8B QLoRA (untied head) per device of FSDP=8 and TP=8: the frozen base is split 8 ways but for the
    whole 1-D leaves; FSDP=8 splits the batch, TP=8 does not (each device computes every row), and only FSDP gathers
    the linear layers' weights; the untied head is split like the embedding."""
    kw = dict(batch_size=8, seq_len=256)
    one = M.estimate("llama3.1-8b", "qlora", **kw)
    fsdp = M.estimate("llama3.1-8b", "qlora", mesh={"fsdp": 8}, **kw)
    tensor = M.estimate("llama3.1-8b", "qlora", mesh={"tensor": 8}, **kw)
    for e in (fsdp, tensor):
        assert one.weights / 8 < e.weights < one.weights / 8 * 1.01
        assert e.optimizer == e.gradients * 2 < one.gradients * 2
    assert fsdp.gathered > 0 and tensor.gathered == 0
    assert fsdp.activations < one.activations / 7 and tensor.activations > one.activations / 8


def test_cli_mesh(capsys):
    assert main(["memory", "--model", "llama2-7b", "--method", "qlora", "--mesh", "data=2,fsdp=4"]) == 0
    out = capsys.readouterr().out
    assert "per device of the mesh data=2 x fsdp=4 x tensor=1" in out and "| total per device |" in out
    assert "| weights gathered for compute (FSDP) |" in out
    assert main(["memory", "--mesh", "fsdp=two"]) == 2
    assert "--mesh expects axis=size pairs" in capsys.readouterr().err
    if jax.device_count() < 8:
        assert main(["memory", "--model", "tiny", "--mesh", "fsdp=8", "--measure"]) == 2
        err = capsys.readouterr().err
        assert "needs 8 devices" in err and "xla_force_host_platform_device_count=8" in err and err.count("\n") == 1
