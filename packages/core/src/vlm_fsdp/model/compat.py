"""Workarounds for running megatron-core 0.16.1 without Transformer Engine. Import before building a model."""

from __future__ import annotations

import importlib.util

import megatron.core.transformer.moe.moe_utils as moe_utils

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

# megatron-core 0.16.1's MoE router GEMM refers to `te_general_gemm` even when Transformer Engine is absent
# (the name is never bound), so the router raises NameError; `None` selects its plain-PyTorch path.
if not HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None
