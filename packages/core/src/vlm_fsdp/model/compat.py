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


def single_rank_sharding(strategy: str, dp_size: int) -> str:
    """The data-parallel sharding strategy to build Megatron-FSDP with.

    With one data-parallel rank there is nothing to shard, and megatron-core 0.16.1 counts gradients twice when a
    sharded strategy has a single rank: its gradient buffer then accumulates in place and the reduce-scatter
    result is added to that same buffer, doubling the accumulated sum at every microbatch. `no_shard` reduces it
    once, in place, which over one rank leaves it as it is.
    """
    return "no_shard" if dp_size == 1 else strategy
