"""Routed SwiGLU experts as two grouped GEMMs (`torch._grouped_mm`) over tokens already sorted by expert.

Weights are stacked per expert in Hugging Face's layout: `gate_up_proj` `[experts, 2 x ffn, hidden]` (gate rows
first) and `down_proj` `[experts, hidden, ffn]`. Megatron-Core's MoE layer routes and permutes the tokens and calls
`forward(tokens, tokens_per_expert, probs)` like its own expert modules. Under expert parallelism a rank holds the
experts from `expert_offset` on; each expert is initialised from a seed of its own global index, so the experts
are the same under every expert-parallel size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank
from vlm_fsdp.model.init import derive_seed, seeded_rng


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`x[rows of group g] @ weight[g].T` for consecutive row groups ending at `offsets`."""
    if x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    return _loop_linear(x, weight, offsets)


@torch.compiler.disable  # its sizes come from the data: compiled, it would specialise on them
def _loop_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`grouped_linear` in other dtypes than bf16, which `torch._grouped_mm` takes alone (fp32 CPU tests): one
    matrix product per group."""
    sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    return torch.cat([chunk @ w.T for chunk, w in zip(x.split(sizes), weight, strict=True)])


class _RegatheredLinear(torch.autograd.Function):
    """`grouped_linear(routed, weight, offsets)` where `routed` is `source[index]`: the backward pass gathers
    `routed` again for the weight's gradient instead of keeping it from the forward pass. At top-k routing it has
    k rows per token, and `source` is kept for the backward pass anyway (the router's input), so this saves k
    times the layer's input per MoE layer (at top-8 and 4,096 tokens of width 2048, 128 MiB) for one gather of
    tens of microseconds. `routed`'s gradient flows on through the gather that made it."""

    @staticmethod
    def forward(ctx, routed, weight, offsets, source, index):
        ctx.save_for_backward(weight, offsets, source, index)
        return grouped_linear(routed, weight, offsets)

    @staticmethod
    def backward(ctx, grad):
        weight, offsets, source, index = ctx.saved_tensors
        grad = grad.contiguous()  # `torch._grouped_mm` takes no broadcast (zero-stride) operand
        # the products autograd takes through `grouped_linear`, with `routed` gathered again
        grad_routed = torch._grouped_mm(grad, weight, offs=offsets) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch._grouped_mm(grad.t(), source.index_select(0, index), offs=offsets)
        return grad_routed, grad_weight, None, None, None


class GroupedExperts(MegatronModule):
    """The experts of one MoE layer held by this expert-parallel rank."""

    def __init__(self, num_local_experts: int, config: TransformerConfig, pg_collection=None) -> None:
        super().__init__(config=config)
        self.num_local_experts = num_local_experts
        self.expert_offset = get_pg_rank(pg_collection.ep) * num_local_experts if pg_collection else 0
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

    @torch.no_grad()
    def reset_parameters(self) -> None:
        base = int(torch.randint(0, 2**62, (), device="cpu"))  # the module's seeded generator (`vlm_fsdp.model.init`)
        for local in range(self.num_local_experts):
            with seeded_rng(derive_seed(base, f"expert {self.expert_offset + local}"), self.gate_up_proj.device):
                self.config.init_method(self.gate_up_proj[local])
                self.config.output_layer_init_method(self.down_proj[local])

    def forward(
        self,
        tokens: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        probs: torch.Tensor,
        source: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ):
        """`tokens` sorted by expert; where they are `source[index]` (`LocalTokenDispatcher`) and bf16, the
        backward pass gathers them again from `source` instead of keeping them."""
        offsets = torch.cumsum(tokens_per_expert.to(tokens.device, non_blocking=True), 0).to(torch.int32)
        if source is None or tokens.dtype != torch.bfloat16:
            gate_up = grouped_linear(tokens, self.gate_up_proj, offsets)
        else:
            gate_up = _RegatheredLinear.apply(tokens, self.gate_up_proj, offsets, source, index)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up * probs.unsqueeze(-1).to(gate.dtype)
        return grouped_linear(hidden, self.down_proj, offsets), None
