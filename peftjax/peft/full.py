"""Full and selective fine-tuning: base weights whose parameter path matches ``targets`` become trainable in place.

``full`` (default: every parameter) is the baseline that PEFT methods are measured against; its gradient and optimizer
state are as large as the model. ``selective`` trains only the matched parameters (default: the norms' gains; e.g.
``targets="bias"`` is BitFit, Ben Zaken et al. 2022) and freezes the rest.
"""
from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.peft.registry import register_method
from peftjax.variables import Tuned
from peftjax.models.llama import Linear
from peftjax.rules import ALL_LINEAR, as_patterns, match_rules, modules_of_type, path_str, set_at_path


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullConfig:
    targets: str | tuple[str, ...] = ".*"  # parameter paths (e.g. "layers\\.0\\..*"); default: everything


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelectiveConfig:
    targets: str | tuple[str, ...] = r".*norm\.weight"  # parameter paths, e.g. "bias", "layers\.1[01]\..*"


def apply_full(model: nnx.Module, config: FullConfig | SelectiveConfig) -> None:
    params = {path_str(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    patterns = as_patterns(config.targets)
    if ALL_LINEAR in patterns:  # here: the weights (and biases) of linear layers, not embeddings or norms
        linears = modules_of_type(model, Linear)
        params = {p: v for p, v in params.items() if p.rsplit(".", 1)[0] in linears}
    matched = match_rules(params, patterns, what="fine-tuning target")
    for path in matched:
        set_at_path(model, path, Tuned(params[path].get_value()))


register_method("full", FullConfig, apply_full, trains_base=True)
register_method("selective", SelectiveConfig, apply_full, trains_base=True)
