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


def render(results: dict) -> str:
    lines = []
    header = f"{'variant':<8} {'system':<13}" + "".join(f" {title:>13}" for _, title, _ in COLUMNS)
    lines += [header, "-" * len(header)]
    for variant, systems in results.items():
        for system, figures in systems.items():
            if "error" in figures:
                lines.append(f"{variant:<8} {system:<13} {figures['error']}")
                continue
            cells = "".join(f" {fmt.format(figures[key]):>13}" for key, _, fmt in COLUMNS)
            graphs = f"  ({figures['compiled_graphs']} compiled graphs)" if "compiled_graphs" in figures else ""
            lines.append(f"{variant:<8} {system:<13}{cells}{graphs}")
        measured = {name for name, figures in systems.items() if "error" not in figures}
        if {"vlm-fsdp", "transformers"} <= measured:
            ratio = systems["vlm-fsdp"]["tokens_per_s"] / systems["transformers"]["tokens_per_s"]
            lines.append(f"{variant:<8} {'speed-up':<13} {ratio:>12.2f}x")
    return "\n".join(lines)


def write(results: dict, meta: dict, out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / "bench.json"
    record.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (key, title) in zip(axes, (("tokens_per_s", "useful tokens/s"), ("mfu", "MFU")), strict=True):
        labels, values = [], []
        for variant, systems in results.items():
            for system, figures in systems.items():
                labels.append(f"{system}\n{variant}")
                values.append(figures.get(key, 0.0))
        axis.bar(labels, values, color=["#76b900" if "vlm-fsdp" in label else "#999999" for label in labels])
        axis.set_title(title)
    figure.suptitle(f"{meta.get('recipe')} on {meta.get('device')}")
    figure.tight_layout()
    chart = out_dir / "bench.png"
    figure.savefig(chart, dpi=120)
    plt.close(figure)
    return record, chart
