"""Qwen3-VL-MoE for training: the vision tower and the Megatron-Core language decoder in one module.

A step's microbatch flows as: token embeddings -> vision tower over the microbatch's images -> merged image
features replace the embeddings of the `<|image_pad|>` tokens (batch-major order, as transformers does) ->
DeepStack features are handed to the decoder -> decoder with mRoPE over packed samples -> per-token loss.
When other data-parallel ranks may see images, a microbatch without images runs the tower on one dummy 32x32 image
whose output is multiplied by zero, so that every rank issues the same Megatron-FSDP collectives; otherwise the
tower is skipped and Megatron-FSDP reduces zero gradients for it.
"""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.config.run import FrozenParts
from vlm_fsdp.data.batch import Batch
from vlm_fsdp.data.vision_inputs import map_tensors, position_grid_side, vision_inputs
from vlm_fsdp.model.language import LanguageModel, Targets
from vlm_fsdp.model.vision import build_vision

PROJECTION_PREFIXES = ("merger.", "deepstack_merger_list.")


class Qwen3VLMoe(MegatronModule):
    """Vision tower (`vision`) + language decoder (`language_model`). `vision_without_images`: run the tower on a
    dummy image for a microbatch without images (needed when other data-parallel ranks may be running it)."""

    def __init__(
        self,
        config: TransformerConfig,
        model: ModelConfig,
        vision_device: torch.device,
        *,
        vision_without_images: bool = True,
    ) -> None:
        super().__init__(config=config)
        self.model_config = model
        self.vision_without_images = vision_without_images
        self._dummy: tuple | None = None  # the dummy image's tensors, made on first use
        self.vision = build_vision(model, vision_device)
        self.language_model = LanguageModel(config, model)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron-core's forward/backward schedule

    def set_input_tensor(self, input_tensor: list) -> None:
        """The previous pipeline stage's output, which megatron-core's schedule hands over; without pipeline
        parallelism there is none."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Per-token cross-entropy `[batch, seq]` in fp32; zero where `batch.labels` is -100."""
        return self._decode(batch, Targets(labels=batch.labels, count=batch.num_loss_tokens))

    def logits(self, batch: Batch) -> torch.Tensor:
        """Output logits `[batch, seq, vocab]`."""
        return self._decode(batch, None)

    def _decode(self, batch: Batch, targets: Targets | None) -> torch.Tensor:
        lm = self.language_model
        embeds = lm.embedding(input_ids=batch.input_ids, position_ids=None)  # [seq, batch, hidden]
        embeds, lm.deepstack = self._add_vision(batch, embeds)
        try:
            return lm(
                input_ids=batch.input_ids,
                position_ids=batch.position_ids,
                attention_mask=batch.cu_seqlens,
                decoder_input=embeds,
                labels=targets,
            )
        finally:
            lm.deepstack = None

    def _add_vision(self, batch: Batch, embeds: torch.Tensor):
        dtype = next(self.vision.parameters()).dtype
        if not batch.has_images:
            if not self.vision_without_images:
                return embeds, None
            if self._dummy is None:
                self._dummy = _dummy_image(self.model_config, embeds.device, dtype)
            pixels, grid, inputs = self._dummy
            out = self.vision(pixels, grid, **inputs)
            zero = out.pooler_output.sum() + sum(f.sum() for f in out.deepstack_features)
            return embeds + 0.0 * zero.to(embeds.dtype), None
        out = self.vision(batch.pixel_values.to(dtype), batch.image_grid_thw, **batch.vision_inputs)
        # the count is known on the host, so finding the image tokens does not wait for the GPU (as nonzero would)
        count = sum(batch.image_patches) // self.model_config.vision.spatial_merge_size**2
        is_image = batch.input_ids == self.model_config.image_token_id
        torch._assert_async(is_image.sum() == count)
        batch_index, seq_index = torch.nonzero_static(is_image, size=count).unbind(1)
        embeds = embeds.index_put((seq_index, batch_index), out.pooler_output.to(embeds.dtype))
        return embeds, ((batch_index, seq_index), list(out.deepstack_features))


def _dummy_image(model: ModelConfig, device: torch.device, dtype: torch.dtype) -> tuple:
    """Zero pixels, grid and tower inputs of one image of 2 x 2 patches, on `device`."""
    v = model.vision
    grid = torch.tensor([[1, 2, 2]])
    inputs = vision_inputs(grid, merge_size=v.spatial_merge_size, position_grid_side=position_grid_side(v))
    pixels = torch.zeros(4, v.in_channels * v.temporal_patch_size * v.patch_size**2, dtype=dtype)
    return pixels.to(device), grid.to(device), map_tensors(inputs, lambda t: t.to(device))


def apply_freezing(model: Qwen3VLMoe, frozen: FrozenParts) -> None:
    """Turn off gradients of the `frozen` parts."""
    for name, param in model.vision.named_parameters():
        projection = name.startswith(PROJECTION_PREFIXES)
        if (projection and frozen.vision_projection) or (not projection and frozen.vision_model):
            param.requires_grad_(False)
    if frozen.language_model:
        model.language_model.requires_grad_(False)
