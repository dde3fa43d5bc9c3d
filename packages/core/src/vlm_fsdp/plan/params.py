"""Exact parameter counts of a Qwen3-VL-MoE model, by part (equal to transformers' model of the same config)."""

from __future__ import annotations

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


def vision_block_params(m: ModelConfig) -> int:
    """One vision transformer block: two LayerNorms, fused QKV, output projection, MLP (all with biases)."""
    h, i = m.vision.hidden_size, m.vision.intermediate_size
    return 2 * (2 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * i + i) + (i * h + h)


def merger_params(m: ModelConfig, *, postshuffle_norm: bool) -> int:
    """A patch merger: LayerNorm, then an MLP from merged patches (merge^2 x width) to the decoder width."""
    v = m.vision
    merged = v.hidden_size * v.spatial_merge_size**2
    norm = 2 * (merged if postshuffle_norm else v.hidden_size)
    return norm + (merged * merged + merged) + (merged * m.hidden_size + m.hidden_size)


def vision_params(m: ModelConfig) -> int:
    v = m.vision
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2 * v.hidden_size + v.hidden_size
    positions = v.num_position_embeddings * v.hidden_size
    mergers = merger_params(m, postshuffle_norm=False) + len(v.deepstack_visual_indexes) * merger_params(
        m, postshuffle_norm=True
    )
    return patch + positions + v.depth * vision_block_params(m) + mergers


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
