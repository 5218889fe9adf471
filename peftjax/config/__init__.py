"""Run configuration: typed sections from YAML (:mod:`~peftjax.config.schema`) and named presets
(:mod:`~peftjax.config.presets`)."""
from peftjax.config.presets import PRESETS, Preset, get_preset, label, preset_config, preset_names, register_preset
from peftjax.config.schema import (DATASETS, POLARITY, TASKS, DataConfig, MeshConfig, ModelConfig, QuantConfig,
                                   RunConfig, TrainConfig, build_method_config, build_quant_config, from_dict,
                                   load_dict, parse_override, to_dict, validate)

__all__ = ["DATASETS", "POLARITY", "PRESETS", "TASKS", "DataConfig", "MeshConfig", "ModelConfig", "Preset",
           "QuantConfig", "RunConfig", "TrainConfig", "build_method_config", "build_quant_config", "from_dict",
           "get_preset", "label", "load_dict", "parse_override", "preset_config", "preset_names", "register_preset",
           "to_dict", "validate"]
