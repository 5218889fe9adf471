"""``summary(model)``: trainable vs total parameters per module group and in total.

A module group is a parameter's module path with the layer index removed (``layers.*.self_attn.q_proj``), so a
28-layer model prints one line per kind of module. Quantized weights count by their logical (unpacked) size.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict

import jax
from flax import nnx

from peftjax.variables import Trainable
from peftjax.quant import QArray

_LAYER = re.compile(r"(^|\.)(\d+)(?=\.)")


def _size(value) -> int:
    leaves = jax.tree.leaves(value, is_leaf=lambda x: isinstance(x, QArray))
    return sum(x.size if isinstance(x, QArray) else math.prod(x.shape) for x in leaves)


def count_parameters(model: nnx.Module) -> dict[str, tuple[int, int]]:
    """{module group: (trainable, frozen)} parameter counts."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, value in nnx.to_flat_state(nnx.state(model)):
        if not isinstance(value, nnx.Variable) or isinstance(value, nnx.RngState):
            continue
        module = ".".join(str(p) for p in path[:-1] if p != "base") or "(model)"
        group = _LAYER.sub(r"\1*", module)
        groups[group][0 if isinstance(value, Trainable) else 1] += _size(value.get_value())
    return {g: (t, f) for g, (t, f) in groups.items()}


def summary(model: nnx.Module, *, print_fn=print) -> dict[str, int]:
    """Print a table of trainable / frozen parameters per module group; return the totals.

    Totals: ``trainable``, ``frozen``, ``total`` and ``base`` (the frozen parameters, i.e. what full fine-tuning of
    the same weights would train); ``percent_cut`` is 100 * (1 - trainable / base).
    """
    rows = count_parameters(model)
    width = max([len(g) for g in rows] + [len("total")])
    lines = [f"{'module group':<{width}}  {'trainable':>12}  {'frozen':>12}"]
    for group, (t, f) in rows.items():
        lines.append(f"{group:<{width}}  {t:>12,}  {f:>12,}")
    trainable = sum(t for t, _ in rows.values())
    frozen = sum(f for _, f in rows.values())
    cut = 100.0 * (1 - trainable / frozen) if frozen else 0.0
    lines.append(f"{'total':<{width}}  {trainable:>12,}  {frozen:>12,}")
    share = 100.0 * trainable / max(trainable + frozen, 1)
    lines.append(f"trainable {trainable:,} of {trainable + frozen:,} parameters ({share:.2f}%); "
                 f"{cut:.0f}% fewer than the base's {frozen:,}")
    print_fn("\n".join(lines))
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen, "base": frozen,
            "percent_cut": cut}
