"""Tables that compare runs, from their ``summary.json`` files."""
from __future__ import annotations

GIB, MIB = 1024 ** 3, 1024 ** 2


def _mem(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def method_label(summary: dict) -> str:
    if summary["method"] == "lora" and summary.get("quant"):
        dq = "+DQ" if summary.get("double_quant") else ""
        return f"QLoRA ({summary['quant'].upper()}{dq})"
    return {"lora": "LoRA", "full": "Full FT"}.get(summary["method"], summary["method"])


def comparison_table(summaries: list[dict]) -> str:
    """Markdown table: method, trainable params (% of total), frozen weight memory, peak memory, step time,
    tokens/s, eval loss before -> after."""
    header = ("| method | trainable params | frozen weights | peak RSS (training) | median step | tokens/s "
              "| eval loss before -> after |")
    lines = [header, "|" + "---|" * 7]
    for s in summaries:
        pct = 100.0 * s["trainable_params"] / s["total_params"]
        lines.append(
            f"| {method_label(s)} | {s['trainable_params']:,} ({pct:.2f}%) | {_mem(s['frozen_bytes'])} "
            f"| {_mem(s['peak_rss_bytes'])} | {s['median_step_s']:.2f} s | {s['tokens_per_s']:.0f} "
            f"| {s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f} |")
    return "\n".join(lines)
