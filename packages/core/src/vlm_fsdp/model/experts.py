"""Routed SwiGLU experts as two grouped GEMMs (`torch._grouped_mm`) over tokens already sorted by expert.

Weights are stacked per expert in Hugging Face's layout: `gate_up_proj` `[experts, 2 x ffn, hidden]` (gate rows
first) and `down_proj` `[experts, hidden, ffn]`. Megatron-Core's MoE layer routes and permutes the tokens and calls
`forward(tokens, tokens_per_expert, probs)` like its own expert modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`x[rows of group g] @ weight[g].T` for consecutive row groups ending at `offsets`."""
    if x.is_cuda:
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return torch.cat([chunk @ w.T for chunk, w in zip(x.split(sizes), weight, strict=True)])


class GroupedExperts(MegatronModule):
    """The experts of one MoE layer held by this expert-parallel rank."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None) -> None:
        super().__init__(config=config)
        self.num_local_experts = num_local_experts
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.gate_up_proj = torch.nn.Parameter(
            torch.empty(num_local_experts, 2 * ffn, hidden, dtype=config.params_dtype, device=device)
        )
        self.down_proj = torch.nn.Parameter(
            torch.empty(num_local_experts, hidden, ffn, dtype=config.params_dtype, device=device)
        )
        # expert weights are reduced over the expert-data-parallel group, not the full data-parallel group
        for param in (self.gate_up_proj, self.down_proj):
            param.allreduce = config.expert_model_parallel_size == 1
        if config.perform_initialization:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        self.config.init_method(self.gate_up_proj)
        self.config.output_layer_init_method(self.down_proj)

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        offsets = torch.cumsum(tokens_per_expert.to(tokens.device, non_blocking=True), 0).to(torch.int32)
        gate, up = grouped_linear(tokens, self.gate_up_proj, offsets).chunk(2, dim=-1)
        hidden = F.silu(gate) * up * probs.unsqueeze(-1).to(gate.dtype)
        return grouped_linear(hidden, self.down_proj, offsets), None
