"""`train.compile` on the CPU: the compiled units give the eager model's loss and gradients, and microbatches with
other image sizes reuse the compiled graphs instead of recompiling. Dynamo's capture and autograd run for real;
the graphs execute through the `aot_eager` backend, since Inductor's CPU code generation is not what a GPU runs."""

from __future__ import annotations

import functools

import pytest
import torch
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.model.compile import compile_units
from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
from vlm_fsdp.model.transformer_config import transformer_config
from vlm_fsdp.train.parallel import init_distributed, shutdown

from .parity import cpu_config


@pytest.fixture
def config(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    config = cpu_config()
    init_distributed(config)
    yield config
    shutdown()
    torch._dynamo.reset()


def test_compiled_units_match_eager_without_recompiling(config):
    torch.manual_seed(0)
    model = Qwen3VLMoe(transformer_config(config.model, on_meta_device=False), config.model, torch.device("cpu"))
    loader = build_loader(config)
    try:
        batches = [next(loader) for _ in range(3)]
    finally:
        loader.close()
    patches = [int(b.image_grid_thw.prod(-1).sum()) for b in batches]
    assert len(set(patches)) == len(patches), patches

    def step(batch):
        model.zero_grad(set_to_none=True)
        loss = model(batch).sum()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager = [step(b) for b in batches]
    graphs = compile_units(model)
    counts = []
    for batch, (eager_loss, eager_grads) in zip(batches, eager, strict=True):
        loss, grads = step(batch)
        counts.append(graphs())
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            scale = eager_grads[name].abs().max().clamp(min=1e-6)
            assert (grad - eager_grads[name]).abs().max() / scale < 1e-4, name
    assert counts[0] > 0
    assert counts[-1] == counts[0], f"recompiled for new image sizes: graphs after each microbatch {counts}"
