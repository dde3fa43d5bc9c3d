"""The vision tower: transformers' Qwen3-VL-MoE ViT (patch embedding, 2D RoPE blocks, patch merger, DeepStack
mergers), with its per-image attention routed to the flash-attention varlen kernel on CUDA (elsewhere, SDPA with
the equivalent block-diagonal mask). Either way the attention sees all images of a microbatch in one call, with
no per-image Python loop, so that a compiled block does not depend on the number of images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.varlen import varlen_attn
from transformers import AttentionInterface
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.data.vision_inputs import INTERPOLATION
from vlm_fsdp.model.attention import segment_ids
from vlm_fsdp.model.hf_config import hf_config_dict

# transformers passes cumulative image lengths only to implementations whose name contains "flash"
VARLEN_ATTENTION = "flash_varlen_torch"

VisionTower = Qwen3VLMoeVisionModel
"""The tower is one Megatron-FSDP unit: its blocks are small next to a decoder layer (27 of them against the proxy's
6 decoder layers), and every unit adds the host time of its hooks to every microbatch."""


def _varlen_attention(
    module, query, key, value, attention_mask, *, scaling, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, **_
):
    """Bidirectional attention inside each image: `[1, heads, tokens, dim]` in, `[1, tokens, heads, dim]` out."""
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling)
        return out.unsqueeze(0), None
    ids = segment_ids(cu_seq_lens_q, query.shape[2])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=ids[:, None] == ids[None, :], scale=scaling)
    return out.transpose(1, 2), None


AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention)


def build_vision(model: ModelConfig, device: torch.device) -> Qwen3VLMoeVisionModel:
    """The vision tower of `model`, with random weights, on `device`."""
    config = Qwen3VLMoeVisionConfig(**hf_config_dict(model)["vision_config"])
    dtype = torch.bfloat16 if model.bf16 else torch.float32
    with torch.device(device):
        tower = Qwen3VLMoeVisionModel._from_config(config, dtype=dtype, attn_implementation="sdpa")
    # set after construction: transformers would try to load a flash-attention package for a "flash" name
    tower.config._attn_implementation = VARLEN_ATTENTION
    settings = {"mode": tower.interpolation_mode, "align_corners": tower.interpolation_align_corners}
    if settings != INTERPOLATION:
        raise RuntimeError(
            f"this transformers version's vision tower interpolates its position embeddings with {settings}, the "
            f"loader with {INTERPOLATION} (vlm_fsdp.data.vision_inputs): install the locked transformers version"
        )
    return tower
