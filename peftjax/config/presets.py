"""Named presets: one vocabulary for run configs (``preset: qlora``), ``peftjax bench --method``, ``peftjax memory
--method`` and the labels of reports and paper tables.

A preset is a partial run config (nested sections); a config that names it overrides any of its values. Every
registered PEFT method's name is also accepted where a preset is (``vera`` = ``{peft: {method: vera}}``), so there is
no second list of methods. The QLoRA presets follow the paper (Dettmers et al. 2023): NF4 blocks of 64 with the
scales double-quantized in blocks of 256, LoRA on every linear layer, and the weights that are not quantized (the
embedding, which is also the tied output head, and the norms) stored in bfloat16; computation is float32.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib

from peftjax.errors import PeftjaxError


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    label: str  # how tables name runs made with it
    config: dict  # sections of a run config
    description: str


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, label: str, config: dict, description: str) -> None:
    PRESETS[name] = Preset(name, label, config, description)


def _quant(fmt: str, double_quant: bool) -> dict:
    return {"format": fmt, "block_size": 64, "double_quant": double_quant}


# QLoRA keeps what it does not quantize (embedding / tied head, norms) in 16 bits; computation stays float32 on CPU
_QBASE = {"param_dtype": "bfloat16"}


register_preset("lora", "LoRA", {"peft": {"method": "lora"}}, "LoRA on the base in model.param_dtype")
register_preset("lora-bf16", "LoRA (bf16 base)", {"peft": {"method": "lora"}, "model": {"param_dtype": "bfloat16"}},
                "LoRA on a bfloat16-stored base, the usual 16-bit baseline of QLoRA comparisons")
register_preset("qlora", "QLoRA (NF4+DQ)",
                {"peft": {"method": "lora"}, "quant": _quant("nf4", True), "model": _QBASE},
                "LoRA on an NF4 base, blocks of 64, double-quantized scales, the rest of the base in bfloat16 "
                "(the QLoRA paper's setting)")
register_preset("qlora-nf4", "QLoRA (NF4)",
                {"peft": {"method": "lora"}, "quant": _quant("nf4", False), "model": _QBASE},
                "QLoRA without double quantization")
register_preset("qlora-fp4", "QLoRA (FP4+DQ)",
                {"peft": {"method": "lora"}, "quant": _quant("fp4", True), "model": _QBASE},
                "LoRA on an FP4 base (the paper's comparison data type)")
register_preset("qlora-int4", "QLoRA (INT4+DQ)",
                {"peft": {"method": "lora"}, "quant": _quant("int4", True), "model": _QBASE},
                "LoRA on an absmax int4 base")
register_preset("dora", "DoRA", {"peft": {"method": "lora", "dora": True}}, "LoRA with DoRA's magnitude vector")
register_preset("qdora", "QDoRA (NF4+DQ)",
                {"peft": {"method": "lora", "dora": True}, "quant": _quant("nf4", True), "model": _QBASE},
                "DoRA on the QLoRA base")
register_preset("full", "Full FT", {"peft": {"method": "full"}}, "full fine-tuning (every parameter trains)")


def preset_names() -> list[str]:
    """Presets and registered method names: the one vocabulary of ``--method`` options."""
    from peftjax.peft import registered_methods

    return list(PRESETS) + [m for m in registered_methods() if m not in PRESETS]


def get_preset(name: str) -> Preset:
    """The preset ``name``; a registered method's name is the preset of that method with its defaults."""
    if name in PRESETS:
        return PRESETS[name]
    from peftjax.peft import registered_methods

    if name in registered_methods():
        return Preset(name, name, {"peft": {"method": name}}, f"the {name} method with its defaults")
    near = difflib.get_close_matches(str(name), preset_names(), n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    raise PeftjaxError(f"unknown preset or method {name!r}; {hint}known: {', '.join(preset_names())}")


def preset_config(name: str) -> dict:
    """A copy of the run-config sections of preset ``name``."""
    return copy.deepcopy(get_preset(name).config)


def _fingerprint(method, quant, double_quant, dora, param_dtype) -> tuple:
    return (method, quant or None, bool(double_quant) if quant else False, bool(dora), param_dtype or "float32")


def _preset_fingerprint(p: Preset) -> tuple:
    q = p.config.get("quant", {})
    return _fingerprint(p.config["peft"]["method"], q.get("format"), q.get("double_quant"),
                        p.config["peft"].get("dora"), p.config.get("model", {}).get("param_dtype"))


def label(summary: dict) -> str:
    """The table label of a run summary: its preset's label, else the preset it is equal to, else a label made
    from its method and base format (``QLoRA (INT8)``, ``ia3``)."""
    if summary.get("preset") in PRESETS:
        return PRESETS[summary["preset"]].label
    fp = _fingerprint(summary["method"], summary.get("quant"), summary.get("double_quant"), summary.get("dora"),
                      summary.get("param_dtype"))
    for p in PRESETS.values():
        if _preset_fingerprint(p) == fp:
            return p.label
    if summary["method"] == "lora" and summary.get("quant"):
        return f"QLoRA ({summary['quant'].upper()}{'+DQ' if summary.get('double_quant') else ''})"
    return summary["method"]
