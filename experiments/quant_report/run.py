"""Post-training quantization of SmolLM2-135M-Instruct in every 4-bit-class format: measure, record the raw rows
in results.json (with the run's provenance), and write the README's table from them.

    .venv/bin/python experiments/quant_report/run.py            # measures (a few minutes), results.json + README
    .venv/bin/python experiments/quant_report/run.py --table    # the README's table from results.json only

The measurement is `peftjax quant-report --model smollm2 --formats FORMATS` (same code path, same table).
"""
import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = "int8,int4,nf4,nf4-dq,fp4,nf3,int2"


def measure(formats: str, seq_len: int = 128, eval_blocks: int = 16) -> dict:
    from peftjax.config import from_dict
    from peftjax.studies.quant_report import parse_format_spec, quant_report
    from peftjax.train import load_base, load_data
    from peftjax.train.provenance import provenance

    config = from_dict({"model": {"name": "smollm2"},
                        "data": {"dataset": "shakespeare", "seq_len": seq_len, "eval_docs": 2,
                                 "max_eval_blocks": eval_blocks, "forgetting": "off"}})
    model, tokenizer = load_base(config)
    data = load_data(config, tokenizer)
    rows, _ = quant_report(model, data.eval.tokens, [(n, parse_format_spec(n, 64)) for n in formats.split(",")])
    return {"model": "smollm2", "block_size": 64, "eval": f"{len(data.eval)} blocks x {seq_len} tokens of "
            + ", ".join(data.info["eval_docs"]), "rows": rows, "provenance": provenance(config, sys.argv)}


def table(results: dict) -> str:
    from peftjax.studies.quant_report import format_table

    return (f"{results['model']}, linear layers quantized in blocks of {results['block_size']}; held-out loss on "
            f"{results['eval']}.\n\n{format_table(results['rows'])}\n")


if __name__ == "__main__":
    from peftjax.studies.report import fill_generated

    p = argparse.ArgumentParser()
    p.add_argument("--formats", default=FORMATS)
    p.add_argument("--table", action="store_true", help="only regenerate the README's table from results.json")
    a = p.parse_args()
    if not a.table:
        (HERE / "results.json").write_text(json.dumps(measure(a.formats), indent=2) + "\n")
    results = json.loads((HERE / "results.json").read_text())
    fill_generated(HERE / "README.md", "table.md", table(results))
    print(table(results))
