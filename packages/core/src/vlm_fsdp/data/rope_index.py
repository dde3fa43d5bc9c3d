"""The 3D (time, height, width) position ids of multimodal RoPE for one sample.

Equal to transformers' `Qwen3VLMoeModel.get_rope_index` for images: text tokens count up on all three axes; an
image's merged tokens get time = start, height = start + row, width = start + column, and the text after it
continues at start + max(rows, columns).
"""

from __future__ import annotations

import itertools

import numpy as np


def mrope_positions(ids: np.ndarray, grids: list[tuple[int, int, int]], image_token_id: int, merge_size: int):
    """[3, L] int64 position ids of a sample's token ids; `grids` are its images' (t, h, w) patch grids in order."""
    positions = np.empty((3, len(ids)), dtype=np.int64)
    is_image = ids == image_token_id
    # starts and ends of the runs of image tokens
    change = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = np.concatenate(([0], change, [len(ids)]))
    images = iter(grids)
    pos = 0
    for start, end in itertools.pairwise(bounds):
        if not is_image[start]:
            positions[:, start:end] = np.arange(pos, pos + end - start)
            pos += end - start
            continue
        t, h, w = next(images)
        h, w = h // merge_size, w // merge_size
        assert t * h * w == end - start, "image token run does not match its grid"
        positions[:, start:end] = np.indices((t, h, w)).reshape(3, -1) + pos
        pos += max(h, w)
    return positions
