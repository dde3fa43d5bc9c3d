"""The plan of a run: parameters, FLOPs, memory and fit, as a dict (for --json) and as text."""

from __future__ import annotations

from typing import Any

from vlm_fsdp.config.run import Config
from vlm_fsdp.config.validate import problems
from vlm_fsdp.plan.flops import attention_flops, text_token_flops, vision_forward_flops
from vlm_fsdp.plan.memory import GiB, estimate_memory
from vlm_fsdp.plan.params import count_params

# Share of GPU memory kept free for the CUDA context, NCCL buffers and allocator fragmentation.
MEMORY_RESERVE = 0.1
# The image the per-patch vision FLOPs refer to: 512 x 512 pixels at patch 16 -> 32 x 32 patches.
REFERENCE_IMAGE_PATCHES = 32 * 32


def make_plan(config: Config, *, gpus: int, gpu_memory_gib: float, image_share: float) -> dict[str, Any]:
    m = config.model
    counts = count_params(m)
    memory = estimate_memory(config, gpus, image_share)
    usable = gpu_memory_gib * (1 - MEMORY_RESERVE)
    patch_flops = vision_forward_flops(m, [REFERENCE_IMAGE_PATCHES]) // REFERENCE_IMAGE_PATCHES
    token_flops = text_token_flops(m) + attention_flops(m, m.seq_length) // m.seq_length
    layout = problems(config, gpus)
    return {
        "recipe": config.recipe,
        "gpus": gpus,
        "parameters": {
            "total": counts.total,
            "active": counts.active,
            "vision": counts.vision,
            "language_dense": counts.language_dense,
            "experts": counts.experts,
            "active_experts": counts.active_experts,
            "embeddings": counts.embeddings,
        },
        "flops": {
            "training_per_text_token": 3 * token_flops,
            "training_per_vision_patch": 3 * patch_flops,
            "seq_length": m.seq_length,
            "reference_image_patches": REFERENCE_IMAGE_PATCHES,
        },
        "layout": {
            "data_parallel": None if layout else gpus,  # every GPU is a data-parallel rank
            "expert_parallel": m.expert_model_parallel_size,
            "expert_data_parallel": None if layout else gpus // m.expert_model_parallel_size,
            "sharding_strategy": config.ddp.data_parallel_sharding_strategy,
            "recompute": m.recompute_granularity,
            "problems": layout,
        },
        "memory_gib": {
            "weights": memory.weights / GiB,
            "gradients": memory.gradients / GiB,
            "optimizer": memory.optimizer / GiB,
            "fsdp_buffers": memory.fsdp_buffers / GiB,
            "activations": memory.activations / GiB,
            "total": memory.total / GiB,
            "gpu": gpu_memory_gib,
            "usable": usable,
            "image_share": image_share,
        },
        "fits": not layout and memory.total / GiB <= usable,
    }


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_plan(plan: dict[str, Any]) -> str:
    p, f, lay, mem = plan["parameters"], plan["flops"], plan["layout"], plan["memory_gib"]
    lines = [
        f"Plan for recipe '{plan['recipe']}' on {plan['gpus']} GPU(s)",
        "",
        "Parameters            count          exact",
    ]
    for key in ("total", "active", "vision", "language_dense", "experts", "active_experts", "embeddings"):
        lines.append(f"  {key:<18} {_count(p[key]):>8}  {p[key]:>15,}")
    lines += [
        "",
        "Training FLOPs (forward + backward)",
        f"  per text token       {f['training_per_text_token'] / 1e9:10.2f} GFLOP  (attention at seq_length "
        f"{f['seq_length']})",
        f"  per vision patch     {f['training_per_vision_patch'] / 1e9:10.2f} GFLOP  (images of "
        f"{f['reference_image_patches']} patches)",
        "",
        f"Layout: DP={lay['data_parallel']} EP={lay['expert_parallel']} (experts sharded over "
        f"{lay['expert_data_parallel']} ranks each), sharding {lay['sharding_strategy']}, "
        f"recompute {lay['recompute'] or 'off'}",
        "",
        f"Memory per GPU (GiB, {mem['image_share']:.0%} image tokens)",
    ]
    for key in ("weights", "gradients", "optimizer", "fsdp_buffers", "activations", "total"):
        lines.append(f"  {key:<18} {mem[key]:10.2f}")
    lines.append(
        f"  usable of {mem['gpu']:g} GiB {mem['usable']:10.2f}  ({MEMORY_RESERVE:.0%} kept for CUDA, NCCL, "
        "fragmentation)"
    )
    lines.append("")
    if lay["problems"]:
        lines.append("Invalid layout:")
        lines += [f"  - {problem}" for problem in lay["problems"]]
    verdict = "FITS" if plan["fits"] else "DOES NOT FIT"
    lines.append(f"Verdict: {verdict}")
    return "\n".join(lines)
