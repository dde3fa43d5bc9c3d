"""The transformers baselines: `Qwen3VLMoeForConditionalGeneration` built from the same config, trained with
AdamW on the same packed microbatches (each packed row is one sequence to it, as transformers' attention has no
notion of packed samples), bf16 weights, SDPA attention; and the same with Liger's kernels (`liger-kernel`, the
`bench` extra): its Qwen3-VL-MoE patch of RoPE, RMSNorm and the experts' SwiGLU, and its fused linear
cross-entropy."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.batch import IGNORE_INDEX, Batch
from vlm_fsdp.model.hf_config import hf_config_dict


def require_liger() -> None:
    """A UserError when liger-kernel, which the transformers+liger system needs, is not installed."""
    if importlib.util.find_spec("liger_kernel") is None:
        from vlm_fsdp.errors import UserError

        raise UserError(
            "the transformers+liger system needs liger-kernel: run `uv sync --extra bench` (or leave it out of "
            "--systems)"
        )


@contextmanager
def liger_kernels() -> Iterator[None]:
    """Liger's patch of transformers' Qwen3-VL-MoE module for as long as the context lasts: Liger replaces the
    module's functions and classes in place, which would otherwise reach every later model of this process."""
    require_liger()
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe

    saved = dict(vars(modeling_qwen3_vl_moe))
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen3_vl_moe, name, value)


def build_hf(config: Config, device: torch.device, *, liger: bool = False):
    """The model and its optimizer; with `liger`, patched by Liger (call it inside `liger_kernels`)."""
    torch.manual_seed(config.train.seed)
    hf_config = Qwen3VLMoeConfig(**hf_config_dict(config.model))
    with torch.device(device):
        model = Qwen3VLMoeForConditionalGeneration._from_config(
            hf_config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl_moe

        apply_liger_kernel_to_qwen3_vl_moe(model=model)
    o = config.optimizer
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=o.lr,
        betas=(o.adam_beta1, o.adam_beta2),
        eps=o.adam_eps,
        weight_decay=o.weight_decay,
        fused=device.type == "cuda",
    )
    return model, optimizer


def hf_inputs(batch: Batch, config: Config) -> dict:
    """Our batch in transformers' terms: labels unshifted (transformers shifts them itself)."""
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    labels[:, 1:] = batch.labels[:, :-1]
    inputs = {"input_ids": batch.input_ids, "labels": labels}
    if batch.has_images:
        inputs |= {
            "pixel_values": batch.pixel_values.to(torch.bfloat16),
            "image_grid_thw": batch.image_grid_thw,
            "mm_token_type_ids": (batch.input_ids == config.model.image_token_id).long(),
        }
    return inputs
