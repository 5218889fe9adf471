"""Model surgery: the one match-and-replace loop that every PEFT method and the quantization policy use.

    replace_matching(model, Linear, "all-linear", lambda path, layer, rule: LoRALinear(layer, ...), what="LoRA")

finds every submodule of a type, matches its dotted path against ordered regex rules (:mod:`peftjax.rules`: first
match wins; a rule that matches nothing is an error listing the paths), builds the replacement and sets it at the
same path, in place (``peft.apply`` and ``quantize_model`` clone first). Module paths never change, so a rule
written for one method names the same modules for every other one and for Hugging Face PEFT.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from flax import nnx

from peftjax.errors import PeftjaxError
from peftjax.rules import as_patterns, match_rules, modules_of_type, set_at_path


def replace_matching(model: nnx.Module, of_type: type | tuple[type, ...], targets: str | Sequence[str],
                     make: Callable[[str, nnx.Module, int], object], *, what: str,
                     keep: Callable[[str, nnx.Module], bool] | None = None) -> dict[str, object]:
    """Replace every ``of_type`` submodule whose path a rule of ``targets`` matches by ``make(path, module, i)``
    (``i``: the index of the first matching rule); returns ``{path: replacement}`` in model order.

    ``keep(path, module)`` narrows the candidates first (e.g. only some layers, or not yet quantized ones);
    ``make`` may return the module itself to leave it in place after editing it.
    """
    candidates = modules_of_type(model, of_type)
    if keep is not None:
        candidates = {p: m for p, m in candidates.items() if keep(p, m)}
    matched = match_rules(candidates, as_patterns(targets), what=what)
    replaced = {}
    for path, rule in matched.items():
        new = make(path, candidates[path], rule)
        if new is not candidates[path]:
            set_at_path(model, path, new)
        replaced[path] = new
    return replaced


def check_rank(rank: int, layer, path: str, *, what: str) -> None:
    """A low-rank update of ``layer`` (``d_in`` x ``d_out``) needs 1 <= rank <= min(d_in, d_out)."""
    limit = min(layer.d_in, layer.d_out)
    if not 1 <= rank <= limit:
        raise PeftjaxError(f"{what} rank {rank} does not fit {path} (1 <= rank <= min(d_in, d_out) = {limit}); "
                           "choose a rank in that range")
