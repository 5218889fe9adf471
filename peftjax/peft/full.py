"""Full fine-tuning: every base weight (matching ``targets``, default all) becomes trainable in place.

The baseline that PEFT methods are measured against; its gradient and optimizer state are as large as the model.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.peft.registry import register_method
from peftjax.peft.variables import Tuned
from peftjax.rules import as_patterns, match_rules, path_str, set_at_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig:
    targets: str | tuple[str, ...] = ".*"  # parameter paths (e.g. "layers\\.0\\..*"); default: everything


def apply_full(model: nnx.Module, config: FullConfig) -> None:
    params = {path_str(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    matched = match_rules(params, as_patterns(config.targets), what="fine-tuning target")
    for path in matched:
        set_at_path(model, path, Tuned(params[path].get_value()))


register_method("full", FullConfig, apply_full)
