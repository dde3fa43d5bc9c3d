"""Workarounds for megatron-core 0.16.1 running without Transformer Engine or Apex, and clipping bf16 gradients
(import before building a model or an optimizer). Those of Megatron-FSDP's buffers are in
`vlm_fsdp.train.parallel`."""

from __future__ import annotations

import importlib.util

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as optimizer
import megatron.core.transformer.moe.moe_utils as moe_utils
import torch
from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale, to_local_if_dtensor

HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

# megatron-core 0.16.1's MoE router GEMM refers to `te_general_gemm` even when Transformer Engine is absent
# (the name is never bound), so the router raises NameError; `None` selects its plain-PyTorch path.
if not HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for Apex's `multi_tensor_l2norm`: the L2 norm over all tensors, as a 1-element GPU tensor."""
    norms = [norm for tensors in tensor_lists for norm in torch._foreach_norm(tensors, 2, dtype=torch.float32)]
    if not norms:
        return torch.zeros(1, dtype=torch.float, device="cuda"), None
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for Apex's `multi_tensor_scale`: `dst = src * scale` for every pair of tensors."""
    sources, targets = tensor_lists
    if all(s is t for s, t in zip(sources, targets, strict=True)):
        torch._foreach_mul_(targets, scale)
    else:
        torch._foreach_copy_(targets, sources if scale == 1.0 else torch._foreach_mul(sources, scale))


# Without Apex or Transformer Engine, megatron-core's fallbacks for gradient clipping loop over the tensors in
# Python, and the norm converts every per-tensor norm to a Python float: one host synchronisation per parameter
# at every step. The foreach versions run a few batched kernels and leave the result on the GPU.
if clip_grads.l2_norm_impl is local_multi_tensor_l2_norm:
    clip_grads.l2_norm_impl = _foreach_l2_norm
for _module in (clip_grads, optimizer):
    if _module.multi_tensor_scale_impl is local_multi_tensor_scale:
        _module.multi_tensor_scale_impl = _foreach_scale


_clip_fp32 = optimizer.clip_grad_by_total_norm_fp32


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """megatron-core 0.16.1's gradient clipping asserts that every gradient is fp32; with bf16 main weights
    (`ddp.preserve_fp32_weights=false`) the optimizer's gradients are bf16, and they are scaled the same way."""
    parameters = list(parameters)
    if use_decoupled_grad or all(p.grad is None or p.grad.dtype == torch.float32 for p in parameters):
        return _clip_fp32(parameters, max_norm, total_norm, use_decoupled_grad)
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(
            [to_local_if_dtensor(p.grad).detach() for p in parameters if p.grad is not None], clip_coeff
        )


optimizer.clip_grad_by_total_norm_fp32 = _clip_by_total_norm
