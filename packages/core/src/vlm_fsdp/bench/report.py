"""The bench's table, JSON record and chart."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("tflops_per_gpu", "TFLOP/s", "{:.1f}"),
    ("mfu", "MFU", "{:.1%}"),
    ("peak_memory_gib", "peak GiB", "{:.1f}"),
    ("step_time_s", "step s", "{:.3f}"),
    ("data_wait_s", "data s", "{:.3f}"),
    ("vision_forward_s", "vision fwd s", "{:.3f}"),
    ("optimizer_s", "optim s", "{:.3f}"),
    ("rest_s", "LM + bwd s", "{:.3f}"),
)


OURS = "vlm-fsdp"
OURS_BF16_ADAM = "vlm-fsdp-bf16-adam"
"""vlm-fsdp with `ddp.preserve_fp32_weights=false`: Adam on the bf16 weights with bf16 moments, the baselines'
precision."""
BASELINES = ("transformers", "transformers+liger")
SYSTEMS = (OURS, OURS_BF16_ADAM, *BASELINES)
SETTINGS = {"8 microbatches": 8, "1 microbatch": 1}
"""Setting name -> microbatches per optimizer step."""
VARIANTS = {"images": False, "text": True}
"""Variant name -> whether its data is text only."""


def render(results: dict) -> str:
    """One table per setting: a row per variant and system, then our speed-up over each baseline measured."""
    lines = []
    for setting, variants in results.items():
        header = f"{'variant':<8} {'system':<19}" + "".join(f" {title:>13}" for _, title, _ in COLUMNS)
        lines += ["", setting, header, "-" * len(header)]
        for variant, systems in variants.items():
            for system, figures in systems.items():
                if "error" in figures:
                    lines.append(f"{variant:<8} {system:<19} {figures['error']}")
                    continue
                cells = "".join(f" {fmt.format(figures[key]):>13}" for key, _, fmt in COLUMNS)
                graphs = f"  ({figures['compiled_graphs']} compiled graphs)" if "compiled_graphs" in figures else ""
                lines.append(f"{variant:<8} {system:<19}{cells}{graphs}")
            measured = {name for name, figures in systems.items() if "error" not in figures}
            for ours in (OURS, OURS_BF16_ADAM):
                for baseline in BASELINES:
                    if {ours, baseline} <= measured:
                        ratio = systems[ours]["tokens_per_s"] / systems[baseline]["tokens_per_s"]
                        lines.append(f"{variant:<8} {ours + ' vs ' + baseline:<40} {ratio:>6.2f}x")
    return "\n".join(lines[1:])


def write_record(results: dict, meta: dict, out_dir: Path) -> Path:
    """bench.json: the figures so far (rewritten after every run, so an interrupted bench keeps them)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "bench.json"
    partial = record.with_suffix(".json.partial")
    partial.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    partial.replace(record)
    return record


def write(results: dict, meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """bench.json and the chart, bench.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = write_record(results, meta, out_dir)
    metrics = (("tokens_per_s", "useful tokens/s"), ("mfu", "MFU"), ("peak_memory_gib", "peak memory, GiB"))
    figure, axes = plt.subplots(len(results), len(metrics), figsize=(15, 4 * len(results)), squeeze=False)
    colours = {OURS: "#76b900", OURS_BF16_ADAM: "#3f6600", "transformers": "#999999", "transformers+liger": "#5b8cc9"}
    for row, (setting, variants) in zip(axes, results.items(), strict=True):
        for axis, (key, title) in zip(row, metrics, strict=True):
            labels, values, colour = [], [], []
            for variant, systems in variants.items():
                for system, figures in systems.items():
                    labels.append(f"{system}\n{variant}")
                    values.append(figures.get(key, 0.0))
                    colour.append(colours.get(system, "#999999"))
            axis.bar(labels, values, color=colour)
            axis.set_title(f"{title} ({setting})")
            axis.tick_params(axis="x", labelsize=7)
    figure.suptitle(f"{meta.get('recipe')} on {meta.get('device')}")
    figure.tight_layout()
    chart = out_dir / "bench.png"
    figure.savefig(chart, dpi=120)
    plt.close(figure)
    return record, chart
