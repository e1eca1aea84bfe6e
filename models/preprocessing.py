"""Image decoding and VGG16 input preparation, shared by training and serving.

Training and serving must see an image identically, so both go through `load_image`:
decode → first frame → EXIF orientation → RGB → resize (aspect not kept) → float32.
`preprocess_input` (VGG16's caffe mode) is applied later, inside the backbone call.

Every file is untrusted. Its declared size is checked from the header before a pixel is decoded
(pixel count and aspect ratio: a 1 × 40,000,000 PNG of 77 KB would otherwise cost seconds and a
gigabyte), and anything a decoder raises on hostile bytes becomes an `ImageDecodeError`.

The resize is PIL's antialiased bilinear (triangle) filter written as two fixed linear maps,
`resize_weights(H, size) @ image @ resize_weights(W, size).T`, and applied in float32 without
rounding. An exported model (`models.export`) builds the same matrices from the same integer
formula inside its graph, so TensorFlow, TFLite and ONNX Runtime resize as the service does, to
float32 rounding (~1e-5 of an intensity level). PIL's own `Image.resize` rounds to uint8 after
each of its passes, which no graph reproduces; this differs from it by under one level.
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


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """The linear map of PIL's bilinear resize along one axis, antialiased when reducing.

    Output sample i is centred at (i + 0.5)·s in input coordinates (s = in_size / out_size) and
    weighs input sample j by the triangle 1 − |x|, x = (j + 0.5 − centre) / max(s, 1), each row
    normalised to sum 1: PIL's `precompute_coeffs` for its bilinear filter. The offset is
    formed exactly in integers, ((2j + 1)·out − (2i + 1)·in) / (2·max(in, out)), so that float32
    loses nothing to cancellation on large images, and every runtime computes the same values.

    Returns:
        float32 array (out_size, in_size).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"Sizes must be positive. Received: in_size={in_size}, "
                         f"out_size={out_size}")
    inputs = np.arange(in_size, dtype=np.int64)
    outputs = np.arange(out_size, dtype=np.int64)
    offset = (2 * inputs[None, :] + 1) * out_size - (2 * outputs[:, None] + 1) * in_size
    x = offset.astype(np.float32) / np.float32(2 * max(in_size, out_size))
    weights = np.maximum(np.float32(1) - np.abs(x), np.float32(0))
    return weights / weights.sum(axis=1, keepdims=True)


def _banded_product(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`weights @ x` in float32, a block of output rows at a time over only the inputs they
    use: a resize map is a band (about 2·scale taps per output), and `x` (uint8 or float32) is
    converted to float32 a band at a time, so a 40 MP photo is never converted whole."""
    used = weights > 0
    first = used.argmax(axis=1)
    last = weights.shape[1] - used[:, ::-1].argmax(axis=1)
    out = np.empty((weights.shape[0], x.shape[1]), np.float32)
    # NB: blocks of several outputs multiply zeros between their bands; past a reduction of
    # about 8x one output (a matrix-vector product) at a time is faster (12 MP: ~15x).
    block = max(1, min(8, int(8 * weights.shape[0] / weights.shape[1])))
    for start in range(0, len(weights), block):
        stop = min(len(weights), start + block)
        lo, hi = first[start:stop].min(), last[start:stop].max()
        out[start:stop] = weights[start:stop, lo:hi] @ x[lo:hi].astype(np.float32, copy=False)
    return out


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resizes an image to size × size with `resize_weights`: rows, then columns.

    Args:
        pixels: uint8 or float32 array (height, width, channels).

    Returns:
        float32 array (size, size, channels), values in 0-255, not rounded.
    """
    height, width, channels = pixels.shape
    rows = _banded_product(resize_weights(height, size), pixels.reshape(height, -1))
    by_column = rows.reshape(size, width, channels).transpose(1, 0, 2).reshape(width, -1)
    resized = _banded_product(resize_weights(width, size), by_column)
    return np.ascontiguousarray(resized.reshape(size, size, channels).transpose(1, 0, 2))


def resize(image: Image.Image, size: int) -> np.ndarray:
    """Resizes an RGB image to size × size (`resize_pixels`, aspect not kept).

    Returns:
        float32 array of shape (size, size, 3), values in 0-255.
    """
    return resize_pixels(np.asarray(image, dtype=np.uint8), size)


def load_image(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> np.ndarray:
    """Decodes and resizes image bytes: the one path for training and serving.

    Returns:
        float32 array of shape (size, size, 3), RGB in 0-255.
    """
    return resize(decode_image(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio),
                  size)


class DecodedImages:
    """Encoded images that decode when sliced: `images[a:b]` is uint8 (b − a, size, size, 3)
    from `load_image`. For a second pass over a dataset (fine-tuning) without holding every
    decoded image at once."""

    def __init__(self, encoded, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        self._encoded, self._size, self._max_pixels = list(encoded), size, max_pixels

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self[i] for i in range(*index.indices(len(self)))])
        return load_image(self._encoded[index], self._size, max_pixels=self._max_pixels)
