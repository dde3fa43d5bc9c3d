"""torch.compile of the computation inside each Megatron-FSDP unit.

Compiled: every vision block's forward, every decoder layer's self-attention and experts, and the loss's
per-chunk softmax gradient (`vlm_fsdp.model.linear_loss.softmax_grad`). Left eager:
Megatron-FSDP's parameter gathering and gradient hooks (they run around the units, not inside them), the MoE
router and token dispatch (data-dependent shapes) and the DeepStack hooks. Shapes are dynamic from the first
call, because the number of patches and the longest image change from one microbatch to the next; blocks and
layers of one kind share their compiled code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._dynamo.utils import counters
from vlm_fsdp.model.linear_loss import softmax_grad
from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe


def compile_units(model: Qwen3VLMoe) -> Callable[[], int]:
    """Compile `model`'s units in place; returns a function that counts the graphs compiled since (a count that
    keeps growing after the first steps means recompilation)."""
    torch._dynamo.reset()
    start = counters["stats"]["unique_graphs"]
    for block in model.vision.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    for layer in model.language_model.decoder.layers:
        layer.self_attention.forward = torch.compile(layer.self_attention.forward, dynamic=True)
        layer.mlp.experts.forward = torch.compile(layer.mlp.experts.forward, dynamic=True)
    model.language_model.output_layer.softmax_grad = torch.compile(softmax_grad, dynamic=True)
    return lambda: counters["stats"]["unique_graphs"] - start
