"""Causal attention over packed sequences: every packed sample attends only to itself.

Megatron-Core's SelfAttention projects Q/K/V, applies QK-norm and RoPE, then calls this module with
`[seq, batch, heads, head_dim]` tensors. The sample boundaries arrive in the `attention_mask` slot as cumulative
sequence lengths over the flattened `batch x seq` tokens. On CUDA the flash-attention varlen kernel computes only
the blocks inside each sample (it needs bf16 or fp16); otherwise (CPU tests, fp32) SDPA runs with the equivalent
block-diagonal causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.varlen import varlen_attn


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Index of the packed sample each of `total` flattened tokens belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


class PackedAttention(MegatronModule):
    """Core attention of the language decoder (flash varlen on CUDA, masked SDPA elsewhere)."""

    def __init__(self, *, config: TransformerConfig, softmax_scale: float | None = None, **_: object) -> None:
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, /, **_: object) -> torch.Tensor:
        seq, batch, heads, dim = query.shape
        cu_seqlens = attention_mask
        if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
            q, k, v = (t.transpose(0, 1).reshape(batch * seq, t.shape[2], dim) for t in (query, key, value))
            out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, seq, seq, scale=self.softmax_scale, window_size=(-1, 0))
            return out.view(batch, seq, heads * dim).transpose(0, 1)
        ids = segment_ids(cu_seqlens, batch * seq).view(batch, 1, seq)
        mask = (ids[..., :, None] == ids[..., None, :]) & torch.ones(
            seq, seq, dtype=torch.bool, device=ids.device
        ).tril()
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale, enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * dim)
