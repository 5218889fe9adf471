"""Every recorded experiment's tables are written by code from the raw results committed beside them (the raw
results are the source; the markdown, CSV and the README's tables are derived, never edited by hand), and this
test regenerates them byte for byte."""
import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from peftjax.cli import main
from peftjax.studies.report import generated_markers

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
TABLES = {"bits_ablation": "bits", "forgetting": "methods", "lora_vs_qlora": "lora-vs-qlora", "methods": "methods",
          "rank_ablation": "rank", "loraplus": "methods",
          "qlora_accuracy": "methods", "quickstart": "lora-vs-qlora", "loftq": "methods",
          "seed_table": "lora-vs-qlora", "forgetting_full": "methods", "rslora": "rank",
          "loraplus_lr": "methods"}


def _run_module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_run", EXPERIMENTS / name / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _region(readme: Path, key: str = "table.md") -> str:
    begin, end = generated_markers(key)
    return readme.read_text().split(begin, 1)[1].split(end, 1)[0].strip()


def test_every_recorded_sweep_is_listed():
    recorded = {p.parent.name for p in EXPERIMENTS.glob("*/results.jsonl")}
    assert recorded == set(TABLES)


@pytest.mark.parametrize("readme", sorted(EXPERIMENTS.glob("*/README.md")), ids=lambda p: p.parent.name)
def test_every_readme_table_is_inside_a_generated_region(readme):
    inside = False
    for n, line in enumerate(readme.read_text().splitlines(), 1):
        if line.startswith("<!-- end"):  # fill_generated's markers, or a folder script's own
            inside = False
        elif line.startswith("<!--") and "generated" in line:
            inside = True
        assert inside or not line.startswith("|"), f"{readme}:{n} is a table line typed outside a generated region"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_tables_regenerate_byte_identically(tmp_path, capsys, name):
    source = EXPERIMENTS / name
    work = tmp_path / name
    work.mkdir()
    for f in ("results.jsonl", "spec.yaml", "README.md"):
        shutil.copy(source / f, work / f)
    assert main(["report", str(work), "--table", TABLES[name]]) == 0
    for f in ("table.md", "report.md", "report.csv", "README.md"):
        assert (work / f).read_text() == (source / f).read_text(), f"{name}/{f} differs from its regeneration"


def test_qlora_memory_table_regenerates_from_its_measurements():
    """experiments/qlora_memory is not a sweep: its run.py measures and writes measurements.jsonl, and its
    table.md (also in its README) is that script's rendering of them."""
    table = _run_module("qlora_memory").table()
    assert table == (EXPERIMENTS / "qlora_memory" / "table.md").read_text()
    assert _region(EXPERIMENTS / "qlora_memory" / "README.md") == table.strip()


def test_encoder_classification_table_regenerates_from_its_results():
    results = json.loads((EXPERIMENTS / "encoder_classification" / "results.json").read_text())
    table = _run_module("encoder_classification").table(results)
    assert _region(EXPERIMENTS / "encoder_classification" / "README.md") == table.strip()


def test_quant_report_table_regenerates_from_its_results():
    results = json.loads((EXPERIMENTS / "quant_report" / "results.json").read_text())
    assert _region(EXPERIMENTS / "quant_report" / "README.md") == _run_module("quant_report").table(results).strip()


def test_memory_estimator_tables_regenerate():
    readme = EXPERIMENTS / "memory" / "README.md"
    for key, text in _run_module("memory").readme_tables().items():
        assert _region(readme, key) == text.strip(), f"memory/README.md {key} differs from run.py's"


def test_memory_smollm2_table_regenerates_from_its_measurements():
    """experiments/memory's SmolLM2 table: the estimate beside XLA's allocation for the compiled step, both recorded
    in measurements.json; the recorded estimates must be what the estimator says now (re-record when it changes)."""
    module = _run_module("memory")
    record = json.loads((EXPERIMENTS / "memory" / "measurements.json").read_text())
    assert _region(EXPERIMENTS / "memory" / "README.md", "smollm2") == module.smollm2_table(record).strip()
    assert {r["method"]: r["estimate"] for r in record["rows"]} == module.estimates()
    assert all(0.85 <= r["estimate"]["total"] / r["xla"]["total"] <= 1.15 for r in record["rows"])


def test_qlora_speed_table_regenerates_from_its_measurements():
    """experiments/qlora_speed: alternating LoRA / QLoRA bench processes; QLoRA >= 0.9x LoRA's tokens/s in every
    round (issue 12)."""
    folder = EXPERIMENTS / "qlora_speed"
    records = [json.loads(line) for line in (folder / "measurements.jsonl").read_text().splitlines()]
    assert _region(folder / "README.md") == _run_module("qlora_speed").table(records).strip()
    by = {(r["round"], r["method"]): r["tokens_per_s"] for r in records}
    assert len(by) == 6 and all(by[r, "qlora"] >= 0.9 * by[r, "lora"] for r in range(3))


def test_training_tasks_table_regenerates_from_its_results():
    results = json.loads((EXPERIMENTS / "training_tasks" / "results.json").read_text())
    table = _run_module("training_tasks").table(results)
    assert _region(EXPERIMENTS / "training_tasks" / "README.md") == table.strip()


SPECS = sorted(EXPERIMENTS.glob("*/spec.yaml")) + sorted((EXPERIMENTS.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_study_spec_is_valid_and_sweeps_three_seeds(tmp_path, spec):
    from peftjax.studies.sweep import plan

    _, points = plan(str(spec), tmp_path / "sweep")  # every point validated, nothing run
    replicates = ("train.seed", "data.fold")  # seeds, or the folds of a cross-validation
    rows: dict[str, set] = {}
    for point in points:
        rest = tuple(sorted((k, str(v)) for k, v in point.items() if k not in (*replicates, "name")))
        rows.setdefault(rest, set()).add(tuple(point.get(k) for k in replicates))
    assert all(len(seeds) >= 3 for seeds in rows.values()), f"{spec}: a row has fewer than 3 seeds or folds"


MACHINE_PATH = re.compile(r"(?<![\w.])/(tmp|work|home|root|Users|mnt|var/folders)/")


def test_recorded_files_name_no_path_of_the_machine_that_ran_them():
    # Raw results carry commands, checkpoint and run directories: a sweep run with --out /tmp/x records /tmp/x
    # until its lines are rewritten to runs/...; a committed study must read the same on any clone
    found = [f"{p.relative_to(EXPERIMENTS)}:{n}: {line.strip()[:120]}"
             for p in sorted(EXPERIMENTS.rglob("*")) if p.suffix in {".md", ".json", ".jsonl", ".csv", ".yaml", ".py"}
             for n, line in enumerate(p.read_text().splitlines(), 1) if MACHINE_PATH.search(line)]
    assert found == []
