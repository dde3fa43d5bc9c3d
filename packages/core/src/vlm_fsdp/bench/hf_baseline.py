"""The transformers baseline: `Qwen3VLMoeForConditionalGeneration` built from the same config, trained with
AdamW on the same packed microbatches (each packed row is one sequence to it, as transformers' attention has no
notion of packed samples), bf16 weights, SDPA attention."""

from __future__ import annotations

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.batch import Batch
from vlm_fsdp.model.hf_config import hf_config_dict


def build_hf(config: Config, device: torch.device):
    torch.manual_seed(config.train.seed)
    hf_config = Qwen3VLMoeConfig(**hf_config_dict(config.model))
    with torch.device(device):
        model = Qwen3VLMoeForConditionalGeneration._from_config(
            hf_config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
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
    labels = torch.full_like(batch.labels, -100)
    labels[:, 1:] = batch.labels[:, :-1]
    inputs = {"input_ids": batch.input_ids, "labels": labels}
    if batch.has_images:
        inputs |= {
            "pixel_values": batch.pixel_values.to(torch.bfloat16),
            "image_grid_thw": batch.image_grid_thw,
            "mm_token_type_ids": (batch.input_ids == config.model.image_token_id).long(),
        }
    return inputs
