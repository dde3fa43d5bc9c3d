"""Our Megatron-Core model against transformers' Qwen3-VL-MoE on the CPU in fp32: same logits and loss on real
packed image-text batches (vision tower, DeepStack, interleaved mRoPE, MoE routing, packed attention)."""

from __future__ import annotations

import pytest
import torch
from vlm_fsdp.config import load_config
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.train.distributed import init_distributed, shutdown

from .parity import build_pair, compare


@pytest.fixture(scope="module")
def config():
    config = load_config(
        "tiny",
        overrides=[
            "model.bf16=false",
            "model.moe_token_dispatcher_type=allgather",
            "model.init_model_with_meta_device=false",
            "data.num_workers=0",
        ],
    )
    init_distributed(config)
    yield config
    shutdown()


def test_fp32_logits_and_loss_equal_transformers(config):
    ours, hf = build_pair(config, torch.device("cpu"))
    hf.config._attn_implementation = "eager"
    loader = build_loader(config)
    try:
        batches = [next(loader) for _ in range(2)]
    finally:
        loader.close()
    rows = [r for b in batches for r in compare(ours, hf, b, config)]
    assert len(rows) >= 3 and sum(r["images"] for r in rows) >= 3
    for row in rows:
        assert row["max_abs_logit_diff"] < 1e-4, row
        assert abs(row["hf_loss"] - row["our_loss"]) < 1e-5, row


def test_meta_device_model_materialises_module_by_module(config):
    """What Megatron-FSDP does with init_model_with_meta_device: every module that owns parameters has
    reset_parameters, and the materialised model has no meta tensor left and runs."""
    from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
    from vlm_fsdp.model.transformer_config import transformer_config

    with torch.device("meta"):
        model = Qwen3VLMoe(transformer_config(config.model, on_meta_device=True), config.model, torch.device("cpu"))
    owners = [m for m in model.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    assert owners and all(hasattr(m, "reset_parameters") for m in owners)
    for module in owners:
        module.to_empty(device="cpu", recurse=False)
        module.reset_parameters()
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    loader = build_loader(config)
    try:
        batch = next(loader)
    finally:
        loader.close()
    losses = model(batch)
    assert torch.isfinite(losses).all() and losses.sum() > 0
