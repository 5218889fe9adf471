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


def test_qlora_memory_table_regenerates_from_its_measurements():
    """experiments/qlora_memory is not a sweep: its run.py measures and writes measurements.jsonl, and its
    table.md is that script's rendering of them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("qlora_memory_run", EXPERIMENTS / "qlora_memory" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    assert run.table() == (EXPERIMENTS / "qlora_memory" / "table.md").read_text()
