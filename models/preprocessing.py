"""Image decoding and VGG16 input preparation, shared by training and serving.

Training and serving must see an image identically, so both go through `load_image`:
decode → first frame → EXIF orientation → RGB → resize (bilinear, aspect not kept) → uint8.
`preprocess_input` (VGG16's caffe mode) is applied later, inside the backbone call.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats a dataset or a prediction may use. Anything else Pillow can open is refused.
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP", "WEBP", "MPO"})

#: Default cap on decoded pixels (width × height); Pillow's own default is ~89 M.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image Headstart accepts; `reason` is safe to show a user."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes image bytes into an RGB Pillow image with EXIF orientation applied.

    Args:
        data: the encoded file (JPEG, PNG, GIF — first frame, BMP or WebP).
        max_pixels: refuse images whose width × height exceeds this (decompression bombs).

    Returns:
        A fully loaded `PIL.Image.Image` in mode "RGB".

    Raises:
        ImageDecodeError: with a user-facing reason.
    """
    if not data:
        raise ImageDecodeError("empty file")
    try:
        with warnings.catch_warnings():
            # NB: Pillow warns (DecompressionBombWarning) between max and 2×max pixels; we refuse
            # by our own check below instead, so the warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ImageDecodeError(f"unsupported image format {image.format}")
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels, more than the limit of {max_pixels}"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"image is too large: {error}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Truncated or corrupt data surfaces as any of these from Pillow's decoders.
        raise ImageDecodeError(f"corrupt or truncated image: {error}") from None


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


def load_image(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes and resizes image bytes: the one path for training and serving.

    Returns:
        uint8 array of shape (size, size, 3), RGB.
    """
    return resize(decode_image(data, max_pixels=max_pixels), size)
