"""Ordered regex rules on module paths, shared by PEFT surgery and quantization policies.

A module path is the dotted attribute path of a module in the model, e.g. ``layers.3.self_attn.q_proj``. A rule
pattern matches a path when the regex matches the whole path or a whole dotted suffix of it, so ``q_proj`` matches
every query projection, ``self_attn\\..*`` every attention projection and ``layers\\.0\\..*`` everything in the first
layer. Rules are tried in order and the first match wins. ``"all-linear"`` expands to every linear layer (the tied
output head is an embedding, never a target).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from flax import nnx

from peftjax.errors import PeftjaxError

ALL_LINEAR = "all-linear"


def path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def modules_of_type(model: nnx.Module, cls: type | tuple[type, ...]) -> dict[str, nnx.Module]:
    """Every submodule that is an instance of ``cls``, keyed by dotted path, in model order."""
    return {path_str(p): m for p, m in nnx.iter_modules(model) if p and isinstance(m, cls)}


def pattern_matches(pattern: str, path: str) -> bool:
    if pattern == ALL_LINEAR:
        return True
    try:
        return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path) is not None
    except re.error as e:
        raise PeftjaxError(f"target pattern {pattern!r} is not a valid regular expression ({e})") from None


def match_rules(paths: Iterable[str], patterns: Sequence[str], *, what: str = "target") -> dict[str, int]:
    """Map each path to the index of the first pattern that matches it (unmatched paths are left out).

    Raises when a pattern matches nothing, listing the available paths, so a typo never trains the wrong thing.
    """
    paths = list(paths)
    matched: dict[str, int] = {}
    used = [False] * len(patterns)
    for path in paths:
        for i, pattern in enumerate(patterns):
            if pattern_matches(pattern, path):
                matched[path] = i
                used[i] = True
                break
    for pattern, hit in zip(patterns, used):
        if not hit and not any(pattern_matches(pattern, p) for p in paths):
            shown = ", ".join(paths[:12]) + (f", ... ({len(paths)} in all)" if len(paths) > 12 else "")
            raise PeftjaxError(f"{what} rule {pattern!r} matches no module; available paths: {shown}")
    return matched


def as_patterns(targets: str | Sequence[str]) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def set_at_path(model: nnx.Module, path: str, new) -> None:
    """Set the submodule or variable at dotted ``path`` to ``new`` (in place; callers clone first)."""
    *parent_parts, last = path.split(".")
    parent = model
    for part in parent_parts:
        parent = parent[int(part)] if isinstance(parent, nnx.List) else getattr(parent, part)
    if isinstance(parent, nnx.List):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)
