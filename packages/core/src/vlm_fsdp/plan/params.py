"""Exact parameter counts of a Qwen3-VL-MoE model, by part (equal to transformers' model of the same config)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlm_fsdp.config.model import ModelConfig


@dataclass(frozen=True, kw_only=True)
class ParamCounts:
    """Parameters per part of the model."""

    vision: int
    """Vision tower: patch embedding, position embedding, blocks, patch merger and DeepStack mergers."""
    language_dense: int
    """Decoder parameters every token uses: attention, norms, routers."""
    experts: int
    """All routed experts of all MoE layers."""
    active_experts: int
    """Experts one token passes through (top-k per layer)."""
    embeddings: int
    """Input embedding and (untied) output layer."""

    @property
    def total(self) -> int:
        return self.vision + self.language_dense + self.experts + self.embeddings

    @property
    def active(self) -> int:
        """Parameters that take part in one token's forward pass."""
        return self.vision + self.language_dense + self.active_experts + self.embeddings


def vision_param_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every vision-tower tensor, named as in transformers' `Qwen3VLMoeVisionModel`."""
    v = m.vision
    h, i = v.hidden_size, v.intermediate_size
    merged = h * v.spatial_merge_size**2
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (h, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size),
        "patch_embed.proj.bias": (h,),
        "pos_embed.weight": (v.num_position_embeddings, h),
    }
    for b in range(v.depth):
        for name, shape in {
            "norm1.weight": (h,),
            "norm1.bias": (h,),
            "norm2.weight": (h,),
            "norm2.bias": (h,),
            "attn.qkv.weight": (3 * h, h),
            "attn.qkv.bias": (3 * h,),
            "attn.proj.weight": (h, h),
            "attn.proj.bias": (h,),
            "mlp.linear_fc1.weight": (i, h),
            "mlp.linear_fc1.bias": (i,),
            "mlp.linear_fc2.weight": (h, i),
            "mlp.linear_fc2.bias": (h,),
        }.items():
            shapes[f"blocks.{b}.{name}"] = shape
    mergers = [("merger.", h)] + [
        (f"deepstack_merger_list.{j}.", merged) for j in range(len(v.deepstack_visual_indexes))
    ]
    for prefix, norm in mergers:
        shapes |= {
            f"{prefix}norm.weight": (norm,),
            f"{prefix}norm.bias": (norm,),
            f"{prefix}linear_fc1.weight": (merged, merged),
            f"{prefix}linear_fc1.bias": (merged,),
            f"{prefix}linear_fc2.weight": (m.hidden_size, merged),
            f"{prefix}linear_fc2.bias": (m.hidden_size,),
        }
    return shapes


def vision_params(m: ModelConfig) -> int:
    return sum(math.prod(shape) for shape in vision_param_shapes(m).values())


def projection_params(m: ModelConfig) -> int:
    """The patch merger and DeepStack mergers, which project vision features into the decoder."""
    return sum(math.prod(s) for n, s in vision_param_shapes(m).items() if n.startswith(("merger.", "deepstack_")))


def attention_params(m: ModelConfig) -> int:
    """One decoder attention layer: Q, K, V, O projections (no biases) and the per-head QK-norm weights."""
    q = m.num_attention_heads * m.kv_channels
    kv = m.num_query_groups * m.kv_channels
    return m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 2 * m.kv_channels


def expert_params(m: ModelConfig) -> int:
    """One SwiGLU expert: gate, up and down projections."""
    return 3 * m.hidden_size * m.moe_ffn_hidden_size


def count_params(m: ModelConfig) -> ParamCounts:
    per_layer_dense = attention_params(m) + 2 * m.hidden_size + m.num_moe_experts * m.hidden_size  # norms, router
    embeddings = m.vocab_size * m.hidden_size * (2 if m.untie_embeddings_and_output_weights else 1)
    return ParamCounts(
        vision=vision_params(m),
        language_dense=m.num_layers * per_layer_dense + m.hidden_size,  # + final norm
        experts=m.num_layers * m.num_moe_experts * expert_params(m),
        active_experts=m.num_layers * m.moe_router_topk * expert_params(m),
        embeddings=embeddings,
    )
