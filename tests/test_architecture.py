"""The package's import graph: arrows point down the data flow (import-linter's contracts in pyproject.toml), no
module imports another that imports it back, and nothing but the CLI's own modules imports the CLI."""
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("peftjax")


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


def test_no_import_cycles(graph):
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join((module, *back)))
    assert not cycles, "\n".join(cycles[:10])


def test_only_the_cli_imports_the_cli(graph):
    importers = {m for m in graph.find_modules_that_directly_import("peftjax.cli") if not m.startswith("peftjax.cli")}
    assert not importers


def test_train_is_a_package_of_focused_modules():
    train = ROOT / "peftjax" / "train"
    assert train.is_dir() and not (ROOT / "peftjax" / "train.py").exists()
    sizes = {p.name: len(p.read_text().splitlines()) for p in train.glob("*.py")}
    assert max(sizes.values()) < 400, sizes
