"""Shared by the CPU and GPU parity tests: our model and transformers' model with the same weights, compared
packed sample by packed sample on a real batch of the bundled data."""

from __future__ import annotations

import itertools

import torch
from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from vlm_fsdp.config import load_config
from vlm_fsdp.config.run import Config
from vlm_fsdp.data.batch import Batch
from vlm_fsdp.model.hf_config import hf_config_dict
from vlm_fsdp.model.hf_mapping import mapping
from vlm_fsdp.model.qwen3_vl import Qwen3VLMoe
from vlm_fsdp.model.transformer_config import transformer_config


def cpu_config() -> Config:
    """The tiny recipe as the CPU tests run it: fp32, the all-gather token dispatcher (constructing the all-to-all
    one needs CUDA streams; on one rank either is replaced by `LocalTokenDispatcher`), built directly on the CPU,
    data read in the test's process, two sequences per microbatch."""
    return load_config(
        "tiny",
        overrides=[
            "model.bf16=false",
            "model.moe_token_dispatcher_type=allgather",
            "model.init_model_with_meta_device=false",
            "data.num_workers=0",
            "train.micro_batch_size=2",
        ],
    )


def build_pair(config: Config, device: torch.device) -> tuple[Qwen3VLMoe, Qwen3VLMoeForConditionalGeneration]:
    """Our model and a random transformers model of the same architecture, our weights copied from it."""
    dtype = torch.bfloat16 if config.model.bf16 else torch.float32
    torch.manual_seed(0)
    # built in its dtype rather than cast: a cast would also round the rotary inverse frequencies to bf16
    hf = Qwen3VLMoeForConditionalGeneration._from_config(Qwen3VLMoeConfig(**hf_config_dict(config.model)), dtype=dtype)
    hf = hf.to(device).eval()
    ours = Qwen3VLMoe(transformer_config(config.model, on_meta_device=False), config.model, device).to(device)
    ours.eval()
    hf_state, params = hf.state_dict(), dict(ours.named_parameters())
    with torch.no_grad():
        for entry in mapping(config.model):
            params.pop(entry.ours).copy_(entry.to_ours([hf_state[n] for n in entry.hf], config.model))
    assert not params, f"parameters without a Hugging Face counterpart: {sorted(params)}"
    return ours, hf


def samples(batch: Batch, config: Config, *, padding: bool = False):
    """Each packed sample with targets (and, with `padding`, also the padding segments) as (row, first, last,
    labels, transformers' keyword arguments)."""
    m = config.model
    seq = batch.input_ids.shape[1]
    image, patch = 0, 0
    for start, end in itertools.pairwise(batch.cu_seqlens.tolist()):
        row, first = divmod(start, seq)
        last = first + end - start
        ids = batch.input_ids[row : row + 1, first:last]
        images = int((ids == m.vision_start_token_id).sum())
        grids = batch.image_grid_thw[image : image + images]
        patches = int(grids.prod(-1).sum()) if images else 0
        labels = batch.labels[row, first:last]
        image, patch = image + images, patch + patches
        if (labels == -100).all() and not padding:
            continue
        inputs = {"input_ids": ids}
        if images:
            inputs |= dict(
                pixel_values=batch.pixel_values[patch - patches : patch],
                image_grid_thw=grids,
                mm_token_type_ids=(ids == m.image_token_id).long(),
            )
        yield row, first, last, labels, inputs


def hf_loss_sum(hf, batch: Batch, config: Config) -> torch.Tensor:
    """transformers' summed next-token loss over the batch, one packed sample at a time (differentiable)."""
    total = torch.zeros((), device=batch.input_ids.device)
    for _, _, _, labels, inputs in samples(batch, config):
        target = labels != -100
        logits = hf(**inputs).logits[0].float()
        total = total + torch.nn.functional.cross_entropy(logits[target], labels[target], reduction="sum")
    return total


@torch.no_grad()
def compare(ours: Qwen3VLMoe, hf, batch: Batch, config: Config) -> list[dict]:
    """Per packed sample: max and mean |logit difference| and both losses over its target tokens."""
    logits = ours.logits(batch).float()
    token_loss = ours(batch).float()
    rows = []
    for row, first, last, labels, inputs in samples(batch, config):
        reference = hf(**inputs).logits[0].float()
        ours_logits = logits[row, first:last]
        target = labels != -100
        hf_loss = torch.nn.functional.cross_entropy(reference[target], labels[target])
        rows.append(
            {
                "tokens": last - first,
                "images": int((inputs["input_ids"] == config.model.vision_start_token_id).sum()),
                "max_abs_logit_diff": (reference - ours_logits).abs().max().item(),
                "mean_abs_logit_diff": (reference - ours_logits).abs().mean().item(),
                "hf_loss": hf_loss.item(),
                "our_loss": (token_loss[row, first:last].sum() / target.sum()).item(),
            }
        )
    return rows
