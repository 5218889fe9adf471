"""Typed YAML configs, overrides, sweep expansion."""
import pytest

from peftjax.config import from_dict
from peftjax.errors import PeftjaxError
from peftjax.studies.sweep import expand, point_name


def test_overrides_are_typed():
    c = from_dict({"peft": {"rank": 4}}, ["peft.rank=16", "train.learning_rate=3e-4", "quant.format=nf4",
                                          "peft.targets=[q_proj, v_proj]"])
    assert c.peft.rank == 16 and c.train.learning_rate == 3e-4 and c.quant.rules[0].format == "nf4"
    assert c.peft.targets == ("q_proj", "v_proj")  # lists become the dataclass's tuples


def test_unknown_key_suggests_nearest():
    with pytest.raises(PeftjaxError, match=r"unknown config key peft\.rnak for method 'lora'; did you mean peft\.rank\?; lora's fields: rank, alpha"):
        from_dict({"peft": {"rnak": 4}})


def test_wrong_type_names_key():
    with pytest.raises(PeftjaxError, match=r"config key train\.batch_size must be int, got 'four'"):
        from_dict({"train": {"batch_size": "four"}})


def test_sweep_zip_and_grid():
    points = expand({"zip": {"name": ["lora", "qlora"], "quant.format": [None, "nf4"]},
                     "grid": {"train.seed": [0, 1]}})
    assert len(points) == 4
    assert [point_name(p) for p in points] == ["lora,seed=0", "lora,seed=1", "qlora,seed=0", "qlora,seed=1"]
    assert [p["name"] for p in points] == ["lora,seed=0", "lora,seed=1", "qlora,seed=0", "qlora,seed=1"]
    assert point_name({"peft.rank": 4, "quant.format": "nf4"}) == "rank=4,format=nf4"
    with pytest.raises(PeftjaxError, match="equal lengths"):
        expand({"zip": {"a": [1], "b": [1, 2]}})
    with pytest.raises(PeftjaxError, match="non-empty list"):
        expand({"grid": {"a": []}})


def test_training_keys_are_validated_by_name():
    c = from_dict({"train": {"group_learning_rates": {"lora": 1e-3, "prompt": "3e-2"}, "grad_accum": 4}})
    assert c.train.group_learning_rates == {"lora": 1e-3, "prompt": 3e-2} and c.train.grad_accum == 4
    for data, message in [({"data": {"task": "chat"}}, "data.task must be one of lm, sft, classify"),
                          ({"data": {"task": "sft"}}, "data.dataset 'shakespeare' is a 'lm' task"),
                          ({"train": {"schedule": "linear"}}, "train.schedule must be 'cosine' or 'constant'"),
                          ({"train": {"grad_accum": 0}}, "train.grad_accum must be >= 1"),
                          ({"train": {"group_learning_rates": {"lora": "fast"}}},
                           "train.group_learning_rates must be dict"),
                          ({"data": {"task": "classify", "dataset": "files", "files": ["c.yaml"]}},
                           "data.labels is empty")]:
        with pytest.raises(PeftjaxError, match=message):
            from_dict(data)
