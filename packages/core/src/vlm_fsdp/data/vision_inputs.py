"""What the vision tower derives from the images' patch grids, computed where the batch is packed.

transformers' Qwen3-VL tower computes its attention boundaries, rotary position ids and position-embedding
interpolation from `image_grid_thw` on the GPU, with `repeat_interleave`, `tolist()` and `.max().item()`: each of
them makes the host wait for the GPU, about seven times per microbatch, and the per-image loop launches a dozen
small kernels per image. The tower takes them as keyword arguments instead; computed by transformers' own
functions in the loader's workers, they reach the GPU with the rest of the batch.
"""

from __future__ import annotations

import torch
from vlm_fsdp.config.model import VisionConfig

INTERPOLATION = {"mode": "bilinear", "align_corners": True}
"""How the tower resamples its learned position embeddings (`Qwen3VLMoeVisionModel`'s settings)."""


def map_tensors(inputs: dict[str, torch.Tensor | int], fn) -> dict[str, torch.Tensor | int]:
    """`inputs` with `fn` applied to its tensors (to pin them, or move them to a device)."""
    return {name: fn(value) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def position_grid_side(vision: VisionConfig) -> int:
    """Side of the tower's square grid of learned position embeddings."""
    return int(vision.num_position_embeddings**0.5)


def vision_inputs(grid_thw: torch.Tensor, *, merge_size: int, position_grid_side: int) -> dict[str, torch.Tensor | int]:
    """The tower's keyword arguments for the images of `grid_thw` ([images, 3] (t, h, w) patch grids); empty for no
    images."""
    if not len(grid_thw):
        return {}
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    cu_seqlens = get_vision_cu_seqlens(grid_thw)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=position_grid_side, spatial_merge_size=merge_size, **INTERPOLATION
    )
    return {
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(cu_seqlens.diff().max()),
        "position_ids": get_vision_position_ids(grid_thw, merge_size),
        "interp_indices": indices,
        "interp_weights": weights,
    }
