"""Interleaved multimodal RoPE (Qwen3-VL): rotary frequency pairs take turns between the time, height and width
position ids (t, h, w, t, h, w, ...), with `mrope_section` pairs for each; text tokens have t = h = w."""

from __future__ import annotations

import torch


def mrope_frequencies(position_ids: torch.Tensor, *, head_dim: int, base: float, section: list[int]) -> torch.Tensor:
    """Rotary angles in Megatron-Core's layout `[seq, batch, 1, head_dim]` for position ids `[3, batch, seq]`."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim)
    )
    freqs = position_ids.float()[..., None] * inv_freq  # [3, batch, seq, head_dim / 2]
    mixed = freqs[0].clone()
    for axis in (1, 2):
        pairs = slice(axis, section[axis] * 3, 3)
        mixed[..., pairs] = freqs[axis, ..., pairs]
    return torch.cat((mixed, mixed), dim=-1).transpose(0, 1).unsqueeze(2)
