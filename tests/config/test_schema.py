"""The peft: section is the registered method's own config dataclass; quant: is an ordered list of rules; presets
are one vocabulary. Checked through from_dict and, for what a user types, through the CLI."""
import dataclasses
import json

import pytest
import yaml

from peftjax import peft
from peftjax.config import from_dict, get_preset, preset_names, to_dict
from peftjax.config.presets import label
from peftjax.errors import PeftjaxError
from peftjax.peft.vera import VeRAConfig
from peftjax.quant.policy import QuantRule


def test_every_field_of_every_method_is_settable_and_defaults_are_the_methods_own():
    for name in peft.registered_methods():
        cls = peft.get_method(name).config_cls
        c = from_dict({"peft": {"method": name}, "train": {"seed": 7}})
        assert type(c.peft) is cls and c.method == name
        for f in dataclasses.fields(cls):
            expected = 7 if f.name == "seed" else getattr(cls(), f.name)  # seed follows train.seed
            assert getattr(c.peft, f.name) == expected, (name, f.name)


def test_vera_defaults_and_its_own_options():
    c = from_dict({"peft": {"method": "vera"}})
    assert c.peft == VeRAConfig(seed=0) and c.peft.rank == 16  # VeRA's own default, not LoRA's 8
    c = from_dict({"peft": {"method": "vera"}}, ["peft.d_init=0.2", "peft.targets=[q_proj]"])
    assert c.peft.d_init == 0.2 and c.peft.targets == ("q_proj",)
    with pytest.raises(PeftjaxError, match=r"^unknown config key peft\.bogus for method 'vera'; vera's fields: rank, "
                                           r"targets, d_init, seed$"):
        from_dict({"peft": {"method": "vera", "bogus": 1}})


def test_vera_from_yaml_through_the_cli(cli, tiny_args, config, tmp_path):
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--set", "peft.method=vera", "--set", "peft.d_init=0.2",
               "--set", "train.steps=2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    recorded = yaml.safe_load((out / "config.yaml").read_text())["peft"]
    assert summary["method"] == "vera" and summary["rank"] == 16
    assert recorded["d_init"] == 0.2 and recorded["rank"] == 16
    # VeRA trains d (rank) and b (d_out) per adapted layer: 14 linear layers of the tiny model
    assert summary["trainable_params"] == sum(16 + lin.d_out for lin in _tiny_linears())
    bad = cli("train", str(config), *tiny_args, "--set", "peft.method=vera", "--set", "peft.bogus=1",
              "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "peftjax: error: unknown config key peft.bogus for method 'vera'; vera's fields: rank, targets, d_init, seed"]
    assert not (tmp_path / "bad").exists()


def _tiny_linears():
    from peftjax.models import Linear, tiny_model

    return list(peft.modules_of_type(tiny_model(), Linear).values())


def test_switching_method_by_override_starts_from_its_defaults():
    c = from_dict({"peft": {"method": "lora", "rank": 4, "dropout": 0.1}}, ["peft.method=ia3"])
    assert c.method == "ia3" and c.peft == peft.IA3Config()


def test_quant_rules_first_match_wins_and_round_trip():
    data = {"quant": [{"targets": r"self_attn\..*", "format": "int8", "axis": 1},
                      {"targets": r"mlp\..*", "format": "nf4", "block_size": 64, "double_quant": True}]}
    c = from_dict(data)
    assert c.quant.rules == (QuantRule(targets=r"self_attn\..*", format="int8", axis=1),
                             QuantRule(targets=r"mlp\..*", format="nf4", block_size=64, double_quant=True))
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(c))))
    assert again == c
    # one rule as a mapping is the shorthand of a one-rule list; format null means no quantization
    assert from_dict({"quant": {"format": "nf4"}}).quant.rules == (QuantRule(format="nf4"),)
    assert from_dict({"quant": {"format": None}}).quant.rules == ()
    with pytest.raises(PeftjaxError, match=r"unknown config key quant\.1\.blok_size; did you mean quant\.1\.block_size"):
        from_dict({"quant": [{"format": "int8"}, {"format": "nf4", "blok_size": 64}]})


def test_two_rule_quant_trains_and_reports_bits_per_rule(cli, tiny_args, config, tmp_path):
    """Attention int8 per output channel, MLP NF4 + double quantization: one config, bits reported per rule."""
    text = config.read_text() + ("quant:\n  - {targets: 'self_attn\\..*', format: int8, axis: 1}\n"
                                 "  - {targets: 'mlp\\..*', format: nf4, block_size: 64, double_quant: true}\n")
    config.write_text(text)
    out = tmp_path / "run"
    proc = cli("train", str(config), *tiny_args, "--set", "train.steps=2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    attn = [lin for lin in _tiny_linears() if lin.d_in * lin.d_out in (64 * 64, 64 * 32)]
    rules = summary["quant_rules"]
    assert [r["format"] for r in rules] == ["int8", "nf4"] and summary["quant"] == "int8+nf4"
    assert rules[0]["layers"] == 8 and rules[1]["layers"] == 6  # 2 layers x (q, k, v, o) and x (gate, up, down)
    assert rules[0]["params"] == sum(lin.d_in * lin.d_out for lin in attn)
    # int8 codes + one fp32 scale per output column of d_in = 64 values (every attention projection reads the
    # 64-wide hidden state)
    assert rules[0]["bits_per_param"] == pytest.approx(8 + 32 / 64)
    # NF4 codes + one int8 scale per 64 values; each 8192-weight MLP matrix has 128 scales, one (partial) DQ block of
    # 256: one fp32 second-level absmax and bitsandbytes' one fp32 offset per tensor
    assert rules[1]["bits_per_param"] == pytest.approx(4 + 8 / 64 + (32 + 32) / 8192)


def test_presets_are_one_vocabulary():
    names = preset_names()
    assert {"lora", "qlora", "qlora-fp4", "lora-bf16", "full"} <= set(names)
    assert set(peft.registered_methods()) <= set(names)  # every method's name is a preset of it
    q = from_dict({"preset": "qlora"})
    assert q.method == "lora" and q.quant.rules == (QuantRule(format="nf4", block_size=64, double_quant=True,
                                                              dq_block_size=256),)
    # the file's values override the preset's; naming another method drops the preset's method fields
    assert from_dict({"preset": "qlora", "peft": {"rank": 4}}).peft.rank == 4
    v = from_dict({"preset": "dora", "peft": {"method": "vera"}})
    assert v.peft == VeRAConfig(seed=0)
    assert label({"preset": "qlora", "method": "lora"}) == get_preset("qlora").label
    with pytest.raises(PeftjaxError, match=r"unknown preset or method 'qlroa'; did you mean qlora\?"):
        from_dict({"preset": "qlroa"})
