"""Sweep expansion: a ``sweep`` section of a config turns one YAML into many runs.

    sweep:
      grid: {peft.rank: [4, 8, 16], train.seed: [0, 1]}      # product of the lists
      zip:  {name: [lora, qlora], quant.format: [null, nf4]}  # lists walked together (equal lengths)

Every point is a dict of dotted keys -> values, applied to the base config like ``--set`` overrides. With both
sections, each zip row is combined with each grid point.
"""
from __future__ import annotations

import itertools
import re

import yaml

from peftjax.errors import PeftjaxError


def expand(section: dict | None) -> list[dict]:
    if not section:
        return [{}]
    unknown = set(section) - {"grid", "zip"}
    if unknown:
        raise PeftjaxError(f"sweep section has unknown key {sorted(unknown)[0]!r}; use 'grid' and/or 'zip'")
    grid, zipped = section.get("grid") or {}, section.get("zip") or {}
    for kind, part in (("grid", grid), ("zip", zipped)):
        for key, values in part.items():
            if not isinstance(values, list) or not values:
                raise PeftjaxError(f"sweep.{kind}.{key} must be a non-empty list, got {values!r}")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise PeftjaxError(f"sweep.zip lists must have equal lengths, got {sorted(lengths)}")
    zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
    grid_rows = [dict(zip(grid, row)) for row in itertools.product(*grid.values())] if grid else [{}]
    points = [{**z, **g} for z in zip_rows for g in grid_rows]
    if "name" in zipped and "name" not in grid:  # a named zip row + grid values: the name carries the grid values
        for point in points:
            point["name"] = ",".join([str(point["name"])] + [_pair(k, point[k]) for k in grid])
    return points


def _pair(key: str, value) -> str:
    return f"{key.split('.')[-1]}={value}"


def point_name(point: dict) -> str:
    """A directory name for a point: its ``name`` when it has one, else its key=value pairs."""
    if "name" in point:
        return re.sub(r"[^A-Za-z0-9_.=,-]", "_", str(point["name"]))
    parts = [_pair(key, value) for key, value in point.items()]
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", ",".join(parts)) or "base"


def as_overrides(point: dict) -> list[str]:
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in point.items()]
