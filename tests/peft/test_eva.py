"""EVA (explained variance adaptation): A from the principal directions of each layer's inputs, checked against
numpy on inputs captured independently, the rank redistribution against its closed form, Hugging Face PEFT's live
EVA on the same weights, and a run from YAML."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import peft
from peftjax.errors import PeftjaxError
from peftjax.models import tiny_model
from peftjax.models.llama import Linear
from peftjax.peft.eva import eva_init
from peftjax.peft.hf_format import adapter_modules
from peftjax.peft.lora import LoRAConfig, LoRALinear
from peftjax.rules import modules_of_type
from peftjax.variables import LoRA

RANK = 4


@pytest.fixture(scope="module")
def base():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (4, 32), dtype=np.int32) for _ in range(3)]


@pytest.fixture(scope="module")
def captured(base, batches, monkeymodule):
    """{path: (tokens, d_in) float64}: every linear layer's inputs over all batches, recorded by an eager forward
    through a patched ``Linear.__call__`` (not EVA's taps), and the order the forward calls the layers."""
    paths = {id(m): p for p, m in modules_of_type(base, Linear).items()}
    seen: dict[str, list] = {}
    original = Linear.__call__

    def record(self, x, key=None):
        seen.setdefault(paths[id(self)], []).append(np.asarray(x, np.float64))
        return original(self, x, key)

    monkeymodule.setattr(Linear, "__call__", record)
    for ids in batches:
        base(jnp.asarray(ids))
    monkeymodule.undo()
    return {p: np.concatenate(xs) for p, xs in seen.items()}


@pytest.fixture(scope="module")
def monkeymodule():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def principal(x: np.ndarray):
    """Right singular vectors and explained-variance ratios of the centred stacked inputs (numpy, float64)."""
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return vt, s ** 2 / np.sum(s ** 2)


@pytest.fixture(scope="module")
def svds(captured):
    """{path: (right singular vectors, explained-variance ratios)} of each layer's captured inputs."""
    return {p: principal(x) for p, x in captured.items()}


def eva(base, batches, **kw):
    return eva_init(base, batches, LoRAConfig(rank=RANK, init="eva", eva_tau=1.0, eva_batches=len(batches), **kw))


def test_a_spans_top_principal_directions_and_b_zero(base, batches, captured, svds):
    result = eva(base, batches, eva_rho=1.0)
    assert result.batches == len(batches) and result.tokens == sum(b.size for b in batches)
    layers = adapter_modules(result.model, LoRALinear)
    assert set(layers) == set(captured) and len(layers) == 14
    worst = 0.0
    for path, layer in layers.items():
        vt, ratio = svds[path]
        a = np.asarray(layer.lora_a[...], np.float64)  # (d_in, r)
        assert a.shape == (layer.d_in, RANK) and layer.rank == RANK
        cos = np.abs(np.sum(a.T * vt[:RANK], axis=1))
        worst = max(worst, float(np.max(np.abs(cos - 1.0))))
        np.testing.assert_allclose(result.ratios[path][:RANK], ratio[:RANK], rtol=1e-4)
        assert not np.any(np.asarray(layer.lora_b[...]))
    assert worst < 1e-4, worst
    ids = jnp.asarray(batches[0])
    np.testing.assert_array_equal(np.asarray(result.model(ids)), np.asarray(base(ids)))  # B = 0: the base exactly


def closed_form_ranks(svds, order, rank, rho):
    """The n_layers * rank largest explained-variance ratios over every layer's first rho * rank components; ties to
    the layer called first (``order``)."""
    k = round(rank * rho)
    pool = [(-svds[p][1][i], j, i) for j, p in enumerate(order) for i in range(k)]
    counts = dict.fromkeys(order, 0)
    for _, j, _ in sorted(pool)[: len(order) * rank]:
        counts[order[j]] += 1
    return counts


@pytest.mark.parametrize("rho", [2.0, 3.0])
def test_rank_redistribution_closed_form(base, batches, captured, svds, rho):
    result = eva(base, batches, eva_rho=rho)
    order = list(captured)  # the order the forward called the layers
    expected = closed_form_ranks(svds, order, RANK, rho)
    assert result.ranks == expected
    assert sum(result.ranks.values()) == len(order) * RANK and len(set(expected.values())) > 2
    assert max(expected.values()) <= round(rho * RANK)
    layers = adapter_modules(result.model, LoRALinear)
    assert {p: m.rank for p, m in layers.items()} == {p: r for p, r in expected.items() if r}
    for path, layer in layers.items():  # A still the top directions, and alpha scaled so the scale stays alpha / r
        vt, _ = svds[path]
        cos = np.abs(np.sum(np.asarray(layer.lora_a[...], np.float64).T * vt[:layer.rank], axis=1))
        assert np.max(np.abs(cos - 1.0)) < 1e-4
        assert layer.scale == pytest.approx(16.0 / RANK)
    linears = modules_of_type(result.model, Linear)
    for path, r in expected.items():  # a layer allotted nothing stays its plain base layer
        if r == 0:
            assert type(linears[path]) is Linear


def test_plain_apply_is_a_one_line_error_and_bad_fields(base):
    with pytest.raises(PeftjaxError, match=r"init='eva' needs data: use peftjax.peft.eva.eva_init") as e:
        peft.apply(base, LoRAConfig(init="eva"))
    assert "\n" not in str(e.value)
    for bad, msg in [({"eva_rho": 0.5}, "eva_rho must be >= 1"), ({"eva_tau": 1.5}, "eva_tau must be in"),
                     ({"eva_batches": 0}, "eva_batches must be >= 1")]:
        with pytest.raises(PeftjaxError, match=msg):
            LoRAConfig(init="eva", **bad)
    with pytest.raises(PeftjaxError, match="no batches"):
        eva_init(base, [], LoRAConfig(init="eva"))


def test_tau_stops_early_when_components_settle(base, batches):
    """The same batch twice leaves the components unchanged (|cos| = 1), so tau = 0.99 stops after batch 2."""
    same = [batches[0]] * 5
    result = eva_init(base, same, LoRAConfig(rank=RANK, init="eva", eva_tau=0.99, eva_batches=5))
    assert result.converged and result.batches == 2
    once = eva_init(base, same[:1], LoRAConfig(rank=RANK, init="eva", eva_batches=1))
    assert not once.converged and once.ranks == result.ranks


def test_quantized_base(base, batches, captured):
    """On an NF4 base the inputs are those of the quantized forward; A their principal directions."""
    from peftjax.quant.policy import QuantRule, quantize_model

    qbase = quantize_model(base, [QuantRule(format="nf4", block_size=32)])
    result = eva(qbase, batches[:1])
    ids = jnp.asarray(batches[0])
    np.testing.assert_array_equal(np.asarray(result.model(ids)), np.asarray(qbase(ids)))
    assert sum(result.ranks.values()) == 14 * RANK


def test_matches_hf_peft_live_eva(tmp_path, randomise):
    """HF PEFT's ``initialize_lora_eva_weights`` on a transformers Llama with the same weights: same ranks, same A
    (same sign convention too). One batch (HF cycles it: the second pass leaves its incremental PCA unchanged, so it converges),
    and 2 * max components >= every d_in, so HF's randomized ``svd_lowrank`` (q = 2 * components) is exact."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_peft = pytest.importorskip("peft")
    from peftjax.models import from_pretrained
    from peftjax.models.tokenizer import byte_tokenizer

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer().backend).save_pretrained(tmp_path)
    ours_base, _ = from_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(0, 256, (4, 32), dtype=np.int32)

    r, rho = 16, 2.0
    config = hf_peft.LoraConfig(r=r, lora_alpha=32, target_modules="all-linear", init_lora_weights="eva",
                                eva_config=hf_peft.EvaConfig(rho=rho, tau=0.99))
    pm = hf_peft.get_peft_model(hf, config, low_cpu_mem_usage=True)
    hf_peft.initialize_lora_eva_weights(pm, dataloader=[{"input_ids": torch.tensor(ids, dtype=torch.long)}],
                                        show_progress_bar=False)
    hf_a = {n.removeprefix("base_model.model.model."): m.lora_A["default"].weight.detach().numpy()
            for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}

    result = eva_init(ours_base, [ids], LoRAConfig(rank=r, alpha=32, init="eva", eva_rho=rho, eva_batches=1))
    assert {p: k for p, k in result.ranks.items() if k} == {p: a.shape[0] for p, a in hf_a.items()}
    assert len(set(result.ranks.values())) > 1  # the ranks were redistributed
    layers = adapter_modules(result.model, LoRALinear)
    for path, a in hf_a.items():
        ours = np.asarray(layers[path].lora_a[...]).T  # (r, d_in), HF's layout
        cos = np.abs(np.sum(ours * a, axis=1)) / np.linalg.norm(a, axis=1)
        np.testing.assert_allclose(cos, 1.0, atol=1e-4, err_msg=path)
        np.testing.assert_allclose(ours, a, atol=1e-4, err_msg=path)  # same sign rule too (largest |entry| > 0)
        assert layers[path].scale == pytest.approx(pm.base_model.model.get_submodule(
            "model." + path).scaling["default"])

    trained = randomise(result.model, LoRA)  # as if trained: B nonzero, so the export's ranks and scales matter
    peft.save_hf_adapter(trained, tmp_path / "adapter")
    torch.manual_seed(0)
    again = hf_peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM(cfg).eval(), tmp_path / "adapter")
    with torch.no_grad():
        theirs = again(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trained(jnp.asarray(ids))), theirs, atol=1e-4)


def test_hf_adapter_round_trip_with_unadapted_layers(base, batches, tmp_path, randomise):
    """A layer allotted rank 0 stays unadapted, so the export names the adapted layers in full (a short name such as
    down_proj would adapt it too) and carries the ranks and adjusted alphas as patterns."""
    result = eva(base, batches, eva_rho=2.0, rslora=True)
    assert 0 in result.ranks.values()
    trained = randomise(result.model, LoRA)
    peft.save_hf_adapter(trained, tmp_path)
    back = peft.load_hf_adapter(base, tmp_path)
    assert {p: m.rank for p, m in adapter_modules(back, LoRALinear).items()} == {
        p: r for p, r in result.ranks.items() if r}
    ids = jnp.asarray(batches[0])
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(trained(ids)))


def test_trains_from_yaml_and_bad_field_is_exit_2(cli, tiny_args, tmp_path, config, capsys):
    text = config.read_text()
    assert "peft: {method: lora, rank: 4}" in text
    config.write_text(text.replace("peft: {method: lora, rank: 4}", "peft: {method: lora, rank: 4, init: eva, "
                                                                      "eva_batches: 3}"))
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--set", "train.steps=6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "EVA init from 3 batches" in proc.stderr and "total 56" in proc.stderr  # 14 layers x rank 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["rank"] == 4
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert "init: eva" in (out / "config.yaml").read_text()
    from peftjax.train.rundir import load_run

    capsys.readouterr()
    model, _ = load_run(out)  # rebuilt from the run's eva.npz (no data pass), then restored
    assert "EVA init read from" in capsys.readouterr().err
    ranks = {p: m.rank for p, m in adapter_modules(model, LoRALinear).items()}
    assert sum(ranks.values()) == 56 and len(set(ranks.values())) > 1
    (out / "eva.npz").unlink()  # without it: the data pass again, the same ranks (deterministic)
    again, _ = load_run(out)
    assert "EVA init from 3 batches" in capsys.readouterr().err
    assert {p: m.rank for p, m in adapter_modules(again, LoRALinear).items()} == ranks
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9]])
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))

    bad = cli("train", str(config), *tiny_args, "--set", "peft.eva_rho=0.5",
              "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "eva_rho must be >= 1" in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()
