"""Workarounds for megatron-core 0.16.1: running without Transformer Engine (import before building a model), and
Megatron-FSDP with a single data-parallel rank."""

from __future__ import annotations

import importlib.util

import megatron.core.transformer.moe.moe_utils as moe_utils

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

# megatron-core 0.16.1's MoE router GEMM refers to `te_general_gemm` even when Transformer Engine is absent
# (the name is never bound), so the router raises NameError; `None` selects its plain-PyTorch path.
if not HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None


def fix_single_rank_gradient_reduction(wrapped, sharding: str, dp_size: int) -> None:
    """megatron-core 0.16.1's Megatron-FSDP counts gradients twice when a sharded strategy runs on one
    data-parallel rank: the gradient buffer is then not distributed, so it accumulates in place, and the
    reduce-scatter of that buffer is added back to it, doubling the accumulated sum at every microbatch. The
    reduction scales the buffer in place before it is reduced; a factor of one half makes the sum come out once.
    """
    if dp_size != 1 or sharding == "no_shard":
        return
    for group in wrapped.module.param_and_grad_buffer.parameter_groups:
        buffer = group.main_grad_buffer
        if buffer is not None and not buffer.is_data_distributed:
            buffer.gradient_scaling_factor = 0.5 * (buffer.gradient_scaling_factor or 1.0)
