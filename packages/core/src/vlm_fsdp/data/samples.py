"""From a stored sample to what packing needs (its cost) and to what a batch needs (ids, positions, pixels)."""

from __future__ import annotations

from vlm_fsdp.data.batch import Doc
from vlm_fsdp.data.chat import SampleError, encode, image_refs
from vlm_fsdp.data.images import ImageError, grid_thw, image_patches, num_image_tokens
from vlm_fsdp.data.rope_index import mrope_positions
from vlm_fsdp.data.settings import DataSettings
from vlm_fsdp.data.tokenizer import load_tokenizer


def image_sizes(record: dict) -> dict[str, tuple[int, int]]:
    return {image["name"]: (image["width"], image["height"]) for image in record["images"]}


def cost(record: dict, settings: DataSettings) -> tuple[int, int]:
    """Tokens and vision patches of a stored sample, from its recorded image sizes (no image is decoded)."""
    sizes = image_sizes(record)
    try:
        grids = [grid_thw(sizes[ref][1], sizes[ref][0], settings.images) for ref in image_refs(record["messages"])]
    except ImageError as err:
        raise SampleError(err.kind, str(err)) from None
    tokens = [num_image_tokens(g, settings.images) for g in grids]
    encoded = encode(record["messages"], tokens, load_tokenizer(settings.tokenizer), settings.special)
    return len(encoded.ids), sum(t * h * w for t, h, w in grids)


def make_doc(parts: dict, settings: DataSettings) -> Doc:
    """Decode, resize and patchify a stored sample's images and encode its conversation."""
    record = parts["json"]
    sizes = image_sizes(record)
    pixels, grids = [], []
    for ref in image_refs(record["messages"]):
        if ref not in parts:
            raise SampleError("missing image", f"{ref} is not in the sample")
        try:
            patches, grid = image_patches(parts[ref], sizes[ref], settings.images)
        except ImageError as err:
            raise SampleError(err.kind, f"{ref}: {err}") from None
        pixels.append(patches)
        grids.append(grid)
    tokens = [num_image_tokens(g, settings.images) for g in grids]
    encoded = encode(record["messages"], tokens, load_tokenizer(settings.tokenizer), settings.special)
    return Doc(
        ids=encoded.ids,
        is_target=encoded.is_target,
        positions=mrope_positions(encoded.ids, grids, settings.special.image_pad, settings.images.merge_size),
        pixels=pixels,
        grids=grids,
    )
