"""Images: Qwen's resize rule, resolution buckets, and the flattened patch layout of the Qwen-VL image processors.

An image becomes `pixel_values` rows exactly as transformers' `Qwen2VLImageProcessor` (which Qwen3-VL uses) makes
them: converted to RGB (transparency over white), resized with bicubic filtering so both sides are multiples of
patch_size x merge_size, scaled to [0, 1], normalised with mean/std, repeated temporal_patch_size times and cut into
patches ordered by 2x2 merge window, each flattened as (channel, time, row, column).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

QWEN3_VL_MIN_PIXELS = 65_536
QWEN3_VL_MAX_PIXELS = 16_777_216
MAX_ASPECT = 200


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """How images are sized and cut into patches (the model's vision settings plus the processor's)."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    min_pixels: int = QWEN3_VL_MIN_PIXELS
    max_pixels: int = QWEN3_VL_MAX_PIXELS
    buckets: tuple[tuple[int, int], ...] = ()
    """Allowed (height, width) sizes; empty: every image keeps its own (resized) size."""

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x time x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


class ImageError(Exception):
    """An image that cannot be used (the message says why); the sample holding it is skipped."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule (as in transformers): sides rounded to multiples of `factor`, area within the limits,
    aspect ratio kept as closely as possible."""
    check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def check_aspect(height: int, width: int) -> None:
    """Qwen's processors reject images more than 200 times wider than high (or the reverse)."""
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above {MAX_ASPECT}")


def target_size(height: int, width: int, settings: ImageSettings) -> tuple[int, int]:
    """The (height, width) an image of this size is resized to: Qwen's rule, then, when buckets are set, the bucket
    closest to the image's aspect ratio and, among those, to the area Qwen's rule gave."""
    h, w = smart_resize(height, width, settings.factor, settings.min_pixels, settings.max_pixels)
    if not settings.buckets:
        return h, w
    aspect, area = math.log(height / width), math.log(h * w)
    return min(
        settings.buckets,
        key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 6), abs(math.log(b[0] * b[1]) - area)),
    )


def grid_thw(height: int, width: int, settings: ImageSettings) -> tuple[int, int, int]:
    """The (time, height, width) patch grid of an image of this original size."""
    h, w = target_size(height, width, settings)
    return 1, h // settings.patch_size, w // settings.patch_size


def num_image_tokens(grid: tuple[int, int, int], settings: ImageSettings) -> int:
    """Language tokens (`<|image_pad|>`) of one image: its patches merged merge_size x merge_size."""
    return grid[0] * grid[1] * grid[2] // settings.merge_size**2


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' `convert_to_rgb` makes it: transparent pixels become white."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def decode(data: bytes) -> Image.Image:
    """Decode image bytes completely into an RGB image."""
    with _opened(data) as image:
        return to_rgb(image)


def verify(data: bytes) -> tuple[str | None, int, int]:
    """Format name, width and height of image bytes that decode completely and have a usable shape."""
    with _opened(data) as image:
        kind, width, height = image.format, image.width, image.height
    check_aspect(height, width)
    return kind, width, height


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """The completely decoded image (so truncated files fail here, not later), or ImageError."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            yield image
    except UnidentifiedImageError:
        raise ImageError("not an image file Pillow can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot decode: {err}") from None


def patchify(image: Image.Image, settings: ImageSettings) -> np.ndarray:
    """[num_patches, C*T*P*P] float32 rows of an RGB image whose sides are multiples of settings.factor."""
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    pixels = np.asarray(image)
    height, width, channels = pixels.shape
    gh, gw = height // p, width // p
    # reorder while still one byte per value: (gh/m, gw/m, m, m) patches, merge windows first, each (C, p, p)
    pixels = pixels.reshape(gh // m, m, p, gw // m, m, p, channels).transpose(0, 3, 1, 4, 6, 2, 5)
    values = pixels.reshape(gh * gw, channels, 1, p * p).astype(np.float32) * np.float32(1 / 255)
    values -= np.asarray(settings.mean, np.float32)[:, None, None]
    values /= np.asarray(settings.std, np.float32)[:, None, None]
    patches = np.empty((gh * gw, channels, t, p * p), np.float32)
    patches[:] = values  # the still image repeated along time
    return patches.reshape(gh * gw, channels * t * p * p)


def image_patches(data: bytes, size: tuple[int, int], settings: ImageSettings) -> tuple[np.ndarray, tuple]:
    """Pixel rows and (t, h, w) grid of an encoded image whose recorded (width, height) is `size`.

    The target size comes from the recorded size, so it matches the token count the packer planned with."""
    image = decode(data)
    width, height = size
    if image.size != (width, height):
        raise ImageError(f"decodes to {image.size[0]}x{image.size[1]}, but the dataset records {width}x{height}")
    h, w = target_size(height, width, settings)
    if (h, w) != (height, width):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    return patchify(image, settings), (1, h // settings.patch_size, w // settings.patch_size)
