"""Images: Qwen's resize rule, resolution buckets, and the flattened patch layout of the Qwen-VL image processors.

An image becomes `pixel_values` rows exactly as transformers' `Qwen2VLImageProcessor` (which Qwen3-VL uses) makes
them: converted to RGB (transparency over white), resized with bicubic filtering so both sides are multiples of
patch_size x merge_size, scaled to [0, 1], normalised with mean/std, repeated temporal_patch_size times and cut into
patches ordered by 2x2 merge window, each flattened as (channel, time, row, column).

Decoding goes further than the processor for files it would get wrong: 16-bit grayscale is scaled to 8 bits (not
clipped to white), the EXIF orientation is applied, and only common formats are opened. `prepare` and the loader
decode with the same functions, so the sizes recorded at prepare time are the sizes decoded at training time.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

QWEN3_VL_MIN_PIXELS = 65_536
QWEN3_VL_MAX_PIXELS = 16_777_216
MAX_ASPECT = 200
MAX_DECODED_PIXELS = 100_000_000
"""Larger images are refused before they are decoded (Pillow's own limit, MAX_IMAGE_PIXELS, only warns below
twice its 89 million pixels)."""
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""The only formats Pillow may open (its decoders of rarer formats never see a dataset's bytes); JPEG includes MPO."""
FORMAT_NAMES = ("JPEG", "PNG", "WebP", "GIF", "BMP", "TIFF")
WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transposition that makes the image upright (as Pillow's ImageOps.exif_transpose)."""


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
    position_grid_side: int = 48
    """Side of the tower's square grid of learned position embeddings (the square root of
    model.vision.num_position_embeddings), which the loader interpolates to each image's grid
    (`vlm_fsdp.data.vision_inputs`)."""

    @property
    def factor(self) -> int:
        """Both sides of a resized image are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x time x patch x patch."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size


CORRUPT = "corrupt image"
UNSUPPORTED = "unsupported image"
TOO_LARGE = "image too large"


class ImageError(Exception):
    """An image that cannot be used (the message says why, `kind` is the short reason skip counts group by); the
    sample holding it is skipped."""

    def __init__(self, message: str, kind: str = CORRUPT):
        super().__init__(message)
        self.kind = kind


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
    """8-bit RGB as transformers' `convert_to_rgb` makes it (transparent pixels become white), except that 16-bit
    grayscale is scaled to 8 bits first (Pillow's own conversion clips it to white)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_GRAY:
        image = _gray_to_8bit(image)
    elif image.mode == "La":  # premultiplied alpha, which Pillow converts only to LA
        image = image.convert("LA")
    elif image.mode == "F":
        raise ImageError(
            "32-bit floating-point pixels are not supported: store the image with 8 or 16 bits", UNSUPPORTED
        )
    try:
        rgba = image.convert("RGBA")
    except ValueError:
        raise ImageError(f"pixel mode {image.mode} is not supported", UNSUPPORTED) from None
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits with rounding (65535 -> 255); 32-bit integer pixels ("I") are read as
    16-bit values, as Pillow stores them for 16-bit files, and clipped to that range."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))


def decode(data: bytes, *, orient: bool = True) -> Image.Image:
    """Decode image bytes completely into an 8-bit RGB image, turned upright as its EXIF orientation says (unless
    `orient` is false); ImageError says why it cannot be used."""
    return _decode(data, orient=orient)[0]


def verify(data: bytes) -> tuple[str | None, int, int]:
    """Format name, width and height (upright) of image bytes that decode completely into RGB and have a usable
    shape."""
    image, kind = _decode(data, orient=True)
    check_aspect(image.height, image.width)
    return kind, image.width, image.height


def _decode(data: bytes, *, orient: bool) -> tuple[Image.Image, str | None]:
    """The decoded RGB image and the file's format name."""
    with _quiet():
        image = _load(data)
        try:
            rgb = to_rgb(image)
        except ImageError:
            raise
        except Exception as err:  # Pillow's conversions raise assorted errors on odd palettes and modes
            raise ImageError(f"cannot convert to RGB: {_reason(err)}") from None
        transpose = ORIENTATIONS.get(_orientation(image)) if orient else None
        return (rgb if transpose is None else rgb.transpose(transpose)), image.format


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Pillow warns about odd files (corrupt EXIF, large images); what matters is raised as ImageError instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _load(data: bytes) -> Image.Image:
    """The completely decoded image (so truncated files fail here, not later), or ImageError."""
    if not data:
        raise ImageError("the file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageError(f"not an image in a supported format ({', '.join(FORMAT_NAMES)})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(str(err), TOO_LARGE) from None
    except Exception as err:  # Pillow's parsers raise assorted errors on damaged headers
        raise ImageError(f"cannot decode: {_reason(err)}") from None
    _check_pixels(image.width, image.height)
    try:
        image.load()
    except Exception as err:  # Pillow's decoders raise assorted errors on damaged data
        raise ImageError(f"cannot decode: {_reason(err)}") from None
    return image


def _check_pixels(width: int, height: int) -> None:
    if width < 1 or height < 1:
        raise ImageError(f"the image has no pixels ({width}x{height})")
    if width * height > MAX_DECODED_PIXELS:
        raise ImageError(
            f"{width}x{height} is more than {MAX_DECODED_PIXELS:,} pixels (a decompression bomb, or a scan far "
            "larger than the model sees): scale it down",
            TOO_LARGE,
        )


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1: as stored); unreadable EXIF data counts as 1, the same at prepare and train time."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # Pillow's EXIF parser raises assorted errors on damaged data
        return 1


def _reason(err: Exception) -> str:
    return " ".join(str(err).split()) or type(err).__name__


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
    if image.size != (width, height) and image.size == (height, width):
        image = decode(data, orient=False)  # a dataset prepared before EXIF orientation was applied
    if image.size != (width, height):
        raise ImageError(f"decodes to {image.size[0]}x{image.size[1]}, but the dataset records {width}x{height}")
    h, w = target_size(height, width, settings)
    if (h, w) != (height, width):
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    return patchify(image, settings), (1, h // settings.patch_size, w // settings.patch_size)
