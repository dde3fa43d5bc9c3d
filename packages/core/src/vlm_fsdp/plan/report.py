"""The plan of a run: parameters, FLOPs, memory and fit, as a dict (for --json) and as text."""

from __future__ import annotations

import bisect
from typing import Any

from vlm_fsdp.config.run import Config
from vlm_fsdp.config.validate import layout_problems, problems
from vlm_fsdp.plan.flops import attention_flops, output_token_flops, text_token_flops, vision_forward_flops
from vlm_fsdp.plan.memory import GiB, MemoryEstimate, estimate_memory
from vlm_fsdp.plan.params import count_params

# Share of GPU memory kept free for the CUDA context, NCCL buffers and allocator fragmentation.
MEMORY_RESERVE = 0.1
# The image the per-patch vision FLOPs refer to: 512 x 512 pixels at patch 16 -> 32 x 32 patches.
REFERENCE_IMAGE_PATCHES = 32 * 32
# The largest layout a suggestion considers.
MAX_SUGGESTED_GPUS = 65_536
# Share of sequence tokens that are image tokens in the activation estimate, unless told otherwise.
DEFAULT_IMAGE_SHARE = 0.5


def default_image_share(config: Config) -> float:
    """DEFAULT_IMAGE_SHARE, or 0 for a text-only run."""
    return 0.0 if config.data.text_only else DEFAULT_IMAGE_SHARE


def make_plan(config: Config, *, gpus: int, gpu_memory_gib: float, image_share: float) -> dict[str, Any]:
    m = config.model
    counts = count_params(m)
    memory = estimate_memory(config, gpus, image_share)
    usable = gpu_memory_gib * (1 - MEMORY_RESERVE)
    patch_flops = vision_forward_flops(m, [REFERENCE_IMAGE_PATCHES]) // REFERENCE_IMAGE_PATCHES
    token_flops = text_token_flops(m) + attention_flops(m, m.seq_length) // m.seq_length
    layout = problems(config, gpus)
    memory_fits = memory.total / GiB <= usable
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
            "training_per_labelled_token": 3 * output_token_flops(m),
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
        "fits": not layout and memory_fits,
        "memory_fits": memory_fits,
        "verdict": "fits" if not layout and memory_fits else "invalid_layout" if layout else "out_of_memory",
        "suggestion": None if memory_fits else suggest_layout(config, gpus, usable, image_share),
    }


def suggest_layout(config: Config, gpus: int, usable_gib: float, image_share: float) -> dict[str, Any]:
    """The smallest number of GPUs above `gpus`, a power of two times the expert-parallel size, on which the
    config's memory fits, with its memory per GPU and the layout problems the config has there (a batch size that
    does not divide, say); when none up to MAX_SUGGESTED_GPUS does, `gpus` is None and the memory is that of
    MAX_SUGGESTED_GPUS."""
    ep = config.model.expert_model_parallel_size
    candidates = [
        n for n in (ep << k for k in range(MAX_SUGGESTED_GPUS.bit_length())) if gpus < n <= MAX_SUGGESTED_GPUS
    ]

    def fits(n: int) -> bool:
        return estimate_memory(config, n, image_share).total / GiB <= usable_gib

    first = bisect.bisect_left(candidates, True, key=fits)  # memory per GPU only falls as GPUs are added
    if first < len(candidates):
        n = candidates[first]
        return _suggestion(n, estimate_memory(config, n, image_share), layout_problems(config, n))
    return _suggestion(None, estimate_memory(config, MAX_SUGGESTED_GPUS, image_share), [])


def _suggestion(gpus: int | None, memory: MemoryEstimate, layout: list[str]) -> dict[str, Any]:
    return {
        "gpus": gpus,
        "total_gib": memory.total / GiB,
        "activations_gib": memory.activations / GiB,
        "problems": layout,
        "up_to": MAX_SUGGESTED_GPUS,
    }


def verdict_text(plan: dict[str, Any]) -> str:
    """One line: whether the run fits, and if not whether memory or the layout is why."""
    mem, gpus = plan["memory_gib"], plan["gpus"]
    if plan["fits"]:
        return f"FITS: {mem['total']:.2f} GiB per GPU of {mem['usable']:.2f} usable"
    if plan["layout"]["problems"]:
        also = "; memory would fit" if plan["memory_fits"] else "; memory does not fit either"
        return f"DOES NOT FIT: the layout is invalid on {gpus} GPU(s) (see above){also}"
    return (
        f"DOES NOT FIT in memory: {mem['total']:.2f} GiB per GPU on {gpus} GPU(s), {mem['usable']:.2f} GiB usable "
        f"of {mem['gpu']:g}"
    )


def suggestion_text(plan: dict[str, Any]) -> str:
    """One line on a layout that fits in memory, when this one does not; '' otherwise."""
    found = plan["suggestion"]
    if found is None:
        return ""
    larger = "or GPUs with more memory (--gpu-memory GiB)"
    if found["gpus"] is None:
        return (
            f"no layout of up to {found['up_to']:,} GPUs fits: there it still takes {found['total_gib']:.2f} GiB per "
            f"GPU, {found['activations_gib']:.2f} of them activations; lower model.seq_length or "
            f"train.micro_batch_size, turn on recompute (model.recompute_granularity=full), {larger}"
        )
    ep = plan["layout"]["expert_parallel"]
    gpus = found["gpus"]
    where = f"{gpus} GPUs ({gpus // ep} expert-parallel groups of {ep}), {found['total_gib']:.2f} GiB per GPU"
    if found["problems"]:
        return f"memory fits on {where}, where the layout needs changes: {'; '.join(found['problems'])}; {larger}"
    return f"the same config fits on {where}; {larger}"


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
        f"  per labelled token   {f['training_per_labelled_token'] / 1e9:10.2f} GFLOP  more (the output layer)",
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
    lines.append(f"Verdict: {verdict_text(plan)}")
    suggestion = suggestion_text(plan)
    if suggestion:
        lines.append(f"Suggestion: {suggestion}")
    return "\n".join(lines)
