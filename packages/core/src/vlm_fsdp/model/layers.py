"""Megatron-Core layers adapted for this model.

Megatron-FSDP materialises a meta-device model one FSDP unit at a time by calling `reset_parameters()` on every
module that owns parameters; Megatron-Core's own parallel linears and embedding have no such method. Its router
moves a CPU weight to the GPU on first use, which keeps the model from running on the CPU in tests.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.moe.moe_utils import router_gating_linear
from megatron.core.transformer.moe.router import TopKRouter
from vlm_fsdp.model.linear_loss import SoftmaxGrad, linear_cross_entropy, softmax_grad


class ColumnLinear(ColumnParallelLinear):
    """Column-parallel linear (QKV projection) initialised with `config.init_method`."""

    def reset_parameters(self) -> None:
        self.config.init_method(self.weight)


class RowLinear(RowParallelLinear):
    """Row-parallel linear (attention output) initialised with `config.output_layer_init_method`."""

    def reset_parameters(self) -> None:
        self.config.output_layer_init_method(self.weight)


class OutputLayer(ColumnParallelLinear):
    """Megatron-Core's output layer which, given the labels, returns the per-token loss (`linear_loss.py`) instead
    of the logits, so that Megatron-FSDP's hooks on this module still gather and reduce its weight."""

    softmax_grad: SoftmaxGrad = staticmethod(softmax_grad)
    """The loss's per-chunk gradient (`vlm_fsdp.model.compile` replaces it with its compiled version)."""

    def forward(self, input_, weight=None, runtime_gather_output=None, labels=None, count=None):
        if labels is None:
            return super().forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        weight = self.weight if weight is None else weight
        return linear_cross_entropy(input_, weight, labels, count=count, gradient=self.softmax_grad), None


def make_resettable(module: torch.nn.Module, init_method) -> None:
    """Give a module that owns one `weight` (the word embedding, the output layer) a `reset_parameters`."""
    module.reset_parameters = lambda: init_method(module.weight)


class Router(TopKRouter):
    """Megatron-Core's top-k router, computing its logits wherever its weight lives."""

    def reset_parameters(self) -> None:
        # Megatron-Core's version initialises nothing when `perform_initialization` is off, as it is for a
        # meta-device model, which would leave the materialised router weight uninitialised memory
        if not self.config.perform_initialization:
            self.config.init_method(self.weight)
        super().reset_parameters()

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if self.config.moe_router_dtype == "fp32" else input.dtype
        return router_gating_linear(input, self.weight, self.bias, dtype)
