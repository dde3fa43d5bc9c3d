"""Our Megatron-Core model against transformers' Qwen3-VL-MoE on the CPU in fp32: same logits and loss on real
packed image-text batches (vision tower, DeepStack, interleaved mRoPE, MoE routing, packed attention)."""

from __future__ import annotations

import pytest
import torch
from vlm_fsdp.data.loader import build_loader
from vlm_fsdp.train.parallel import init_distributed, shutdown

from .parity import build_pair, compare, cpu_config


@pytest.fixture(scope="module")
def config():
    config = cpu_config()
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
    reset_parameters, which initialises all of them, and the materialised model runs."""
    from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
    from vlm_fsdp.model.transformer_config import transformer_config

    with torch.device("meta"):
        model = Qwen3VLMoe(transformer_config(config.model, on_meta_device=True), config.model, torch.device("cpu"))
    owners = [m for m in model.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    assert owners and all(hasattr(m, "reset_parameters") for m in owners)
    for module in owners:
        module.to_empty(device="cpu", recurse=False)
        with torch.no_grad():
            for param in module.parameters(recurse=False):
                param.fill_(float("nan"))  # what reset_parameters leaves untouched stays NaN
        module.reset_parameters()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert not [n for n, t in tensors if t.is_meta]
    assert not [n for n, t in tensors if t.is_floating_point() and t.isnan().any()]
    loader = build_loader(config)
    try:
        batch = next(loader)
    finally:
        loader.close()
    losses = model(batch)
    assert torch.isfinite(losses).all() and losses.sum() > 0


def test_fp32_gradients_equal_transformers(config):
    """Backward through both models on one packed sample with images: every parameter's gradient agrees, so the
    DeepStack hooks, the router, the grouped experts and the packed attention are differentiated correctly."""
    from dataclasses import replace

    from vlm_fsdp.model.hf_mapping import mapping

    no_aux = replace(config, model=replace(config.model, moe_aux_loss_coeff=0.0))
    ours, hf = build_pair(no_aux, torch.device("cpu"))
    hf.config._attn_implementation = "eager"
    loader = build_loader(no_aux)
    try:
        batch = next(loader)
    finally:
        loader.close()
    end = int(batch.cu_seqlens[1])
    ids, labels = batch.input_ids[:1, :end], batch.labels[0, :end]
    images = int((ids == no_aux.model.vision_start_token_id).sum())
    assert images >= 1
    grids = batch.image_grid_thw[:images]
    pixels = batch.pixel_values[: int(grids.prod(-1).sum())]
    target = labels != -100
    reference = hf(
        input_ids=ids,
        pixel_values=pixels,
        image_grid_thw=grids,
        mm_token_type_ids=(ids == no_aux.model.image_token_id).long(),
    ).logits[0]
    torch.nn.functional.cross_entropy(reference[target], labels[target], reduction="sum").backward()
    batch.labels[0, end:] = batch.labels[1:] = -100  # the loss of the first sample only
    batch.num_loss_tokens = int(target.sum())
    ours(batch).sum().backward()

    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    params = dict(ours.named_parameters())
    checked = 0
    for entry in mapping(no_aux.model):
        ref = [hf_grads[n] for n in entry.hf]
        if any(g is None for g in ref):
            assert params[entry.ours].grad is None or not params[entry.ours].grad.any(), entry.ours
            continue
        expected = entry.to_ours(ref, no_aux.model)
        got = params[entry.ours].grad
        scale = expected.abs().max().clamp(min=1e-6)
        assert (got - expected).abs().max() / scale < 1e-4, entry.ours
        checked += 1
    assert checked > 50


def test_text_only_microbatch_runs_the_vision_tower_only_when_other_ranks_may(config):
    """Without images, the tower runs on a dummy image (zero contribution) only when another data-parallel rank
    may be running it; otherwise it is skipped, and the loss is the same either way."""
    from dataclasses import replace

    from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
    from vlm_fsdp.model.transformer_config import transformer_config

    text = replace(config, data=replace(config.data, text_only=True))
    torch.manual_seed(0)
    model = Qwen3VLMoe(transformer_config(text.model, on_meta_device=False), text.model, torch.device("cpu"))
    calls = []
    model.vision.register_forward_hook(lambda *_: calls.append(1))
    loader = build_loader(text)
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert not batch.has_images

    losses = {}
    for runs_tower in (True, False):
        model.vision_without_images = runs_tower
        model.zero_grad(set_to_none=True)
        calls.clear()
        losses[runs_tower] = model(batch).sum()
        losses[runs_tower].backward()
        assert len(calls) == int(runs_tower)
        vision_grads = [p.grad for p in model.vision.parameters()]
        if runs_tower:
            assert all(g is not None and not g.any() for g in vision_grads)
        else:
            assert all(g is None for g in vision_grads)
    assert torch.equal(losses[True], losses[False])


def test_bf16_model_has_no_fp32_weights_so_every_norm_takes_the_fused_kernel(config):
    """Megatron-Core builds its PyTorch RMSNorms in fp32; in a bf16 model a norm with an fp32 weight and bf16 input
    falls back to torch's unfused RMSNorm. Every weight of the bf16 model is bf16 (the optimizer keeps fp32 copies)."""
    from dataclasses import replace

    from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
    from vlm_fsdp.model.transformer_config import transformer_config

    bf16 = replace(config.model, bf16=True)
    with torch.device("meta"):
        model = Qwen3VLMoe(transformer_config(bf16, on_meta_device=True), bf16, torch.device("meta"))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert any("layernorm" in name for name in dtypes)
    assert {name for name, dtype in dtypes.items() if dtype != torch.bfloat16} == set()


def test_image_tokens_that_disagree_with_the_patches_are_refused(config):
    """The image tokens are found without waiting for the GPU, from the count the patches give; a batch whose
    tokens disagree stops at a device-side assertion instead of placing features at the wrong positions."""
    from dataclasses import replace

    from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
    from vlm_fsdp.model.transformer_config import transformer_config

    torch.manual_seed(0)
    model = Qwen3VLMoe(transformer_config(config.model, on_meta_device=False), config.model, torch.device("cpu"))
    loader = build_loader(config)
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert batch.has_images
    with torch.no_grad():
        assert torch.isfinite(model(batch)).all()
        image_id = config.model.image_token_id
        first = (batch.input_ids == image_id).nonzero()[0]
        ids = batch.input_ids.clone()
        ids[first[0], first[1]] = image_id + 1
        with pytest.raises(RuntimeError, match="nonzero value"):  # torch._assert_async on the CPU
            model(replace(batch, input_ids=ids))


def test_the_towers_inputs_from_the_loader_are_the_ones_it_would_compute(config):
    """The loader's workers compute what the tower derives from the patch grids (`vlm_fsdp.data.vision_inputs`);
    given them, the tower's outputs are bitwise those it computes on its own, and they travel with the batch."""
    from vlm_fsdp.model.vision import build_vision

    loader = build_loader(config)
    try:
        batch = next(loader)
    finally:
        loader.close()
    assert batch.has_images and set(batch.vision_inputs) == {
        "cu_seqlens", "max_seqlen", "position_ids", "interp_indices", "interp_weights"
    }  # fmt: skip
    assert batch.vision_inputs["interp_indices"].shape[0] == sum(batch.image_patches)
    moved = batch.to(torch.device("meta"))
    assert (
        moved.vision_inputs["cu_seqlens"].is_meta
        and moved.vision_inputs["max_seqlen"] == batch.vision_inputs["max_seqlen"]
    )
    torch.manual_seed(0)
    tower = build_vision(config.model, torch.device("cpu"))
    own = tower(batch.pixel_values, batch.image_grid_thw)
    given = tower(batch.pixel_values, batch.image_grid_thw, **batch.vision_inputs)
    assert torch.equal(own.pooler_output, given.pooler_output)
    assert all(torch.equal(a, b) for a, b in zip(own.deepstack_features, given.deepstack_features, strict=True))
