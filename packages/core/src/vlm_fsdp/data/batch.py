"""The microbatch the trainer consumes, and how packed rows of samples become one."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from vlm_fsdp.config.model import ModelConfig
from vlm_fsdp.data.images import ImageSettings
from vlm_fsdp.data.vision_inputs import map_tensors, vision_inputs
from vlm_fsdp.plan.flops import training_flops

IGNORE_INDEX = -100


@dataclass(kw_only=True)
class Doc:
    """One encoded sample, ready to be packed into a row."""

    ids: np.ndarray
    """[L] int64 token ids."""
    is_target: np.ndarray
    """[L] bool: the token is a loss target."""
    positions: np.ndarray
    """[3, L] int64 mRoPE position ids, starting at 0."""
    pixels: list[np.ndarray]
    """[patches, C*T*P*P] float32 of each image, in order."""
    grids: list[tuple[int, int, int]]
    """(t, h, w) patch grid of each image."""


@dataclass(kw_only=True)
class Batch:
    """One microbatch of packed sequences (micro_batch_size rows of model.seq_length tokens)."""

    input_ids: torch.Tensor
    """[B, S] int64, padded to S = model.seq_length with the pad id (`<|endoftext|>`)."""
    labels: torch.Tensor
    """[B, S] int64: labels[b, t] is the target of position t (the next token), -100 where there is no loss
    (non-assistant tokens, padding, the last token of each packed sample)."""
    position_ids: torch.Tensor
    """[3, B, S] int64 (t, h, w) mRoPE ids, restarting at each packed sample; padding continues counting."""
    cu_seqlens: torch.Tensor
    """[num_segments + 1] int32 offsets of the packed samples over the flattened B*S tokens; padding at the end of
    a row is its own segment."""
    max_seqlen: int
    """Longest segment in cu_seqlens."""
    pixel_values: torch.Tensor
    """[num_patches, C*T*P*P] float32 in Hugging Face's flattened patch layout (possibly 0 patches)."""
    image_grid_thw: torch.Tensor
    """[num_images, 3] int64 patch grid of each image, in the order its tokens appear in the flattened rows."""
    vision_inputs: dict[str, torch.Tensor | int]
    """What the vision tower derives from image_grid_thw, as its keyword arguments (`vlm_fsdp.data.vision_inputs`);
    empty without images."""
    has_images: bool
    """False: no real image in this microbatch (the vision tower is skipped, or fed a dummy image when other
    data-parallel ranks may be running it)."""
    num_loss_tokens: int
    """Count of labels != -100."""
    num_tokens: int
    """Non-padding tokens (useful tokens)."""
    doc_lengths: list[int]
    """Lengths of the packed samples (for the FLOP formula)."""
    image_patches: list[int]
    """t*h*w of each image (for the FLOP formula)."""

    def training_flops(self, model: ModelConfig) -> int:
        """FLOPs of one forward and backward pass of `model` over this microbatch (`vlm_fsdp.plan.flops`)."""
        return training_flops(model, self.doc_lengths, self.image_patches, labelled_tokens=self.num_loss_tokens)

    def to(self, device) -> Batch:
        """This batch with every tensor on `device` (copied asynchronously from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """This batch in page-locked host memory; the data loader's pinning thread calls it."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        mapped = {name: fn(v) for name, v in values.items() if isinstance(v, torch.Tensor)}
        return replace(self, **mapped, vision_inputs=map_tensors(self.vision_inputs, fn))


def collate(rows: list[list[Doc]], seq_length: int, pad_id: int, images: ImageSettings) -> Batch:
    """Pack rows of samples into a Batch; every row must fit into seq_length tokens."""
    batch = len(rows)
    input_ids = np.full((batch, seq_length), pad_id, dtype=np.int64)
    labels = np.full((batch, seq_length), IGNORE_INDEX, dtype=np.int64)
    positions = np.empty((3, batch, seq_length), dtype=np.int64)
    segments, doc_lengths, pixels, grids = [], [], [], []
    for b, docs in enumerate(rows):
        at = 0
        next_position = 0
        for doc in docs:
            n = len(doc.ids)
            assert at + n <= seq_length, "packed row longer than seq_length"
            input_ids[b, at : at + n] = doc.ids
            # the target of position t is token t+1 of the same sample, where that token is learned
            labels[b, at : at + n - 1] = np.where(doc.is_target[1:], doc.ids[1:], IGNORE_INDEX)
            positions[:, b, at : at + n] = doc.positions
            next_position = int(doc.positions.max()) + 1 if n else 0
            segments.append(n)
            doc_lengths.append(n)
            pixels += doc.pixels
            grids += doc.grids
            at += n
        if at < seq_length:
            positions[:, b, at:] = np.arange(next_position, next_position + seq_length - at)
            segments.append(seq_length - at)
    cu_seqlens = np.concatenate(([0], np.cumsum(segments))).astype(np.int32)
    pixel_values = np.concatenate(pixels) if pixels else np.zeros((0, images.patch_dim), np.float32)
    image_grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        labels=torch.from_numpy(labels),
        position_ids=torch.from_numpy(positions),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=max(segments),
        pixel_values=torch.from_numpy(pixel_values),
        image_grid_thw=image_grid_thw,
        vision_inputs=vision_inputs(
            image_grid_thw, merge_size=images.merge_size, position_grid_side=images.position_grid_side
        ),
        has_images=bool(grids),
        num_loss_tokens=int((labels != IGNORE_INDEX).sum()),
        num_tokens=sum(doc_lengths),
        doc_lengths=doc_lengths,
        image_patches=[t * h * w for t, h, w in grids],
    )
