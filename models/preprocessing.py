"""Image decoding and VGG16 input preparation, shared by training and serving.

Training and serving must see an image identically, so both go through `load_image`:
decode → first frame → EXIF orientation → RGB → resize (bilinear, aspect not kept) → uint8.
`preprocess_input` (VGG16's caffe mode) is applied later, inside the backbone call.

Every file is untrusted. Its declared size is checked from the header before a pixel is decoded
(pixel count and aspect ratio: a 1 × 40,000,000 PNG of 77 KB would otherwise cost seconds and a
gigabyte), and anything a decoder raises on hostile bytes becomes an `ImageDecodeError`.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

#: Formats a dataset or a prediction may use. Anything else Pillow can open is refused.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"})
# NB: Image.open tries only these plugins (MPO files are opened by the JPEG plugin).
_OPEN_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")

#: Default cap on decoded pixels (width × height); Pillow's own default is ~89 M.
DEFAULT_MAX_PIXELS = 40_000_000
#: Default cap on the long side over the short side. Decoding cost grows with rows as well as
#: pixels (a 1-pixel-wide PNG pays per-row overhead 40 M times), and no photo is this thin.
DEFAULT_MAX_ASPECT_RATIO = 100

# What Pillow's decoders and its EXIF reader raise on corrupt or hostile input besides
# OSError: struct.error from short EXIF or GIF extension blocks (`n_frames`, `getexif`),
# IndexError / KeyError / TypeError / ZeroDivisionError from inconsistent tables and headers.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
                   KeyError, TypeError, ZeroDivisionError)

# EXIF orientation → the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(ValueError):
    """The bytes are not an image Headstart accepts; `reason` is safe to show a user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    """What an image file declares before any pixel is decoded."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> ImageHeader:
    """Reads and checks an image's format and size from its header only (cheap: no pixels).

    Raises:
        ImageDecodeError: not an accepted image, or too many pixels, or too thin.
    """
    with _decoder_errors():
        return _checked_header(_open(data), max_pixels, max_aspect_ratio)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> Image.Image:
    """Decodes image bytes into an RGB Pillow image with EXIF orientation applied.

    Args:
        data: the encoded file (JPEG, PNG, GIF — first frame, BMP or WebP).
        max_pixels: refuse images whose width × height exceeds this (decompression bombs).
        max_aspect_ratio: refuse images whose long side exceeds this many times the short one.

    Returns:
        A fully loaded `PIL.Image.Image` in mode "RGB".

    Raises:
        ImageDecodeError: with a user-facing reason.
    """
    with _decoder_errors():
        image = _open(data)
        _checked_header(image, max_pixels, max_aspect_ratio)
        # NB: Image.open leaves a multi-frame file (GIF, APNG, WebP, MPO) on its first frame;
        # asking for `n_frames` would parse every frame (and raises on a broken one).
        image.load()
        method = _ORIENTATION.get(_orientation(image))
        if method is not None:
            image = image.transpose(method)
        return _to_rgb(image)


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty file")
    # NB: Pillow warns (DecompressionBombWarning, silenced by `_decoder_errors`) between its own
    # limit and twice that, and raises beyond; `_checked_header` applies ours.
    image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    if image.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}")
    return image


def _checked_header(image: Image.Image, max_pixels: int, max_aspect_ratio: float) -> ImageHeader:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image is {width}x{height} pixels")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} pixels, more than the limit of {max_pixels}")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageDecodeError(
            f"image is {width}x{height} pixels: one side is more than {max_aspect_ratio:g} "
            "times the other, the limit")
    return ImageHeader(format=image.format, width=width, height=height)


@contextmanager
def _decoder_errors() -> Iterator[None]:
    """Turns whatever Pillow raises on a hostile file into an ImageDecodeError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Pillow warns about what it skips in a damaged file (EXIF tags past its end, …).
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            yield
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is too large: {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image file") from None
    except _DECODER_ERRORS as error:
        # Truncated or corrupt data surfaces as any of these from Pillow's decoders.
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1–8); 1 (as stored) when the EXIF block is missing or unreadable.

    A broken EXIF block does not make the pixels unusable: the image is used as stored, in
    training and serving alike.
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODER_ERRORS:
        return 1
    return value if isinstance(value, int) and value in _ORIENTATION else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any Pillow mode (L, LA, P, CMYK, I;16, RGBA, …) to RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits rather than clipping everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        grey = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels composite onto white, the way a viewer shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, size: int) -> np.ndarray:
    """Resizes an RGB image to size × size (bilinear, aspect not kept).

    Returns:
        uint8 array of shape (size, size, 3).
    """
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def load_image(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> np.ndarray:
    """Decodes and resizes image bytes: the one path for training and serving.

    Returns:
        uint8 array of shape (size, size, 3), RGB.
    """
    return resize(decode_image(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio),
                  size)
