"""peftjax quant-report: per-format bits/param, bytes, weight error and held-out loss (no training)."""
import math

import numpy as np
import pytest

from peftjax.cli import main
from peftjax.studies.quant_report import format_table, parse_format_spec, quant_report
from peftjax.data import random_blocks
from peftjax.models import tiny_model


def test_quant_report_on_the_tiny_model():
    model = tiny_model()
    blocks = np.asarray(random_blocks(6, 33))
    specs = [(name, parse_format_spec(name, 64)) for name in ("int8", "nf4", "nf4-dq", "int2")]
    rows, per_layer = quant_report(model, blocks, specs, batch_size=4)
    assert [r["format"] for r in rows] == ["float32", "int8", "nf4", "nf4-dq", "int2"]
    assert rows[0]["bits_per_param"] == 32.0 and rows[0]["mean_rel_error"] == 0.0
    by = {r["format"]: r for r in rows}
    assert by["int8"]["bits_per_param"] == pytest.approx(8.5) and by["nf4"]["bits_per_param"] == pytest.approx(4.5)
    assert by["nf4-dq"]["bits_per_param"] < 4.5
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert abs(by["int8"]["eval_loss"] - rows[0]["eval_loss"]) < 0.01  # 8-bit barely moves a random model
    assert by["int8"]["mean_rel_error"] < by["nf4"]["mean_rel_error"] < by["int2"]["mean_rel_error"]
    assert len(per_layer["nf4"]) == 2 * 7  # every linear layer of the 2-layer model
    assert "| nf4-dq |" in format_table(rows)


@pytest.mark.slow
def test_quant_report_cli_on_smollm2(capsys):
    assert main(["quant-report", "--formats", "nf4-dq", "--eval-blocks", "2", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| nf4-dq |"))
    assert row.startswith("| nf4-dq | 4.127 |")
    assert float(row.split("|")[5]) < 4.4  # held-out loss of the NF4+DQ model (float32: 3.99 on these blocks)


def test_quant_report_cli_rejects_an_unknown_format(capsys):
    assert main(["quant-report", "--formats", "nf5x"]) == 2
    assert "unknown quantization format 'nf5x'" in capsys.readouterr().err
