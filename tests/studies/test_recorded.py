"""Every recorded experiment regenerates its tables byte for byte from its committed results.jsonl (the raw
results are the source; the markdown and CSV are derived, never edited by hand)."""
import shutil
from pathlib import Path

import pytest

from peftjax.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
TABLES = {"bits_ablation": "bits", "lora_vs_qlora": "lora-vs-qlora", "methods": "methods", "rank_ablation": "rank"}


def test_every_recorded_sweep_is_listed():
    recorded = {p.parent.name for p in EXPERIMENTS.glob("*/results.jsonl")}
    assert recorded == set(TABLES)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_tables_regenerate_byte_identically(tmp_path, capsys, name):
    source = EXPERIMENTS / name
    work = tmp_path / name
    work.mkdir()
    for f in ("results.jsonl", "spec.yaml"):
        shutil.copy(source / f, work / f)
    assert main(["report", str(work), "--table", TABLES[name]]) == 0
    for f in ("table.md", "report.md", "report.csv"):
        assert (work / f).read_text() == (source / f).read_text(), f"{name}/{f} differs from its regeneration"
