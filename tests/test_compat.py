"""The megatron-core workarounds in `vlm_fsdp.model.compat`: batched replacements for the gradient-clipping
fallbacks that megatron-core uses without Apex or Transformer Engine."""

from __future__ import annotations

import importlib.util

import megatron.core.optimizer.clip_grads as clip_grads
import megatron.core.optimizer.optimizer as optimizer
import pytest
import torch
from vlm_fsdp.model import compat


@pytest.mark.skipif(importlib.util.find_spec("apex") is not None, reason="Apex provides the fused kernels")
def test_fallbacks_are_replaced():
    assert clip_grads.l2_norm_impl is compat._foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is compat._foreach_scale
    assert optimizer.multi_tensor_scale_impl is compat._foreach_scale


def test_l2_norm_over_all_tensors_stays_a_tensor():
    torch.manual_seed(0)
    tensors = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2).to(torch.bfloat16)]
    norm, per_tensor = compat._foreach_l2_norm(0, None, [tensors], False)
    expected = torch.cat([t.float().flatten() for t in tensors]).norm()
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    torch.testing.assert_close(norm[0], expected, rtol=1e-2, atol=0)


def test_scale_in_place_and_into_other_tensors():
    torch.manual_seed(0)
    sources = [torch.randn(5, 3), torch.randn(7)]
    targets = [torch.zeros(5, 3, dtype=torch.bfloat16), torch.zeros(7, dtype=torch.bfloat16)]
    compat._foreach_scale(0, None, [sources, targets], 1.0)
    for source, target in zip(sources, targets, strict=True):
        assert torch.equal(target, source.to(torch.bfloat16))
    compat._foreach_scale(0, None, [sources, targets], 0.25)
    for source, target in zip(sources, targets, strict=True):
        assert torch.equal(target, (source * 0.25).to(torch.bfloat16))
    grads = [s.clone() for s in sources]
    compat._foreach_scale(0, None, [grads, grads], 0.5)
    for source, grad in zip(sources, grads, strict=True):
        assert torch.equal(grad, source * 0.5)
