"""Hostile clients (issue 11): image bombs and malformed files, amplifying bodies, slow
connections. The decoder is tested as a function; the rest through the app, and the slow clients
through real sockets against a real gunicorn."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.preprocessing import ImageDecodeError, decode_image, load_image, read_header

# The 54-byte GIF of the issue: its extension block is cut short, so `n_frames` raised struct.error.
SHORT_GIF = bytes.fromhex(
    "474946383761100008008000000000000000002c00000000100008000008150001081c48b0a0c18308132a5c"
    "c8b0a1c387080302002c")
# EXIF blocks (orientation 6, rotate) with a broken neighbouring entry, found by mutating a valid
# one: rewriting them in ImageOps.exif_transpose raised struct.error and TypeError.
BROKEN_EXIF = {
    "struct.error": bytes.fromhex(
        "4578696600004d4d002a00000008000401080002000000060000003e01120003000000010006"
        "2d00011a000500000001000000440131000200000002780000000000000043616e6f6e00000000"
        "4800000001"),
    "TypeError": bytes.fromhex(
        "4578696600004d4d002a000000080004013f0002000000060000003e01120003000000010006"
        "0098011a000500000001000000440131000200000002780000000000000043616e6f6e00000000"
        "4800000001"),
}


def encoded(fmt: str, size=(8, 4), mode="RGB", **save) -> bytes:
    """A small image with a gradient, so that its orientation shows in its pixels."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]
    pixels[..., 2] = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **save)
    return buffer.getvalue()


def thin_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- decoding (items 3 and 4)


def test_the_short_gif_of_the_issue_decodes_to_its_first_frame():
    assert decode_image(SHORT_GIF).size == (16, 8)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("broken", sorted(BROKEN_EXIF))
def test_a_broken_exif_entry_beside_the_orientation_still_rotates(fmt, broken):
    data = encoded(fmt, exif=BROKEN_EXIF[broken])

    assert decode_image(data).size == (4, 8)  # orientation 6 applied


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_an_unreadable_exif_block_leaves_the_image_as_stored(fmt):
    exif = bytearray(BROKEN_EXIF["struct.error"])
    exif[6:10] = b"MM\x00\xec"  # not a TIFF header

    assert decode_image(encoded(fmt, exif=bytes(exif))).size == (8, 4)


def test_a_one_pixel_wide_png_of_forty_million_rows_is_refused_from_its_header():
    data = thin_png(1, 40_000_000)  # 77 KB; decoding it took seconds and 1.1 GB
    started = time.perf_counter()

    with pytest.raises(ImageDecodeError, match="1x40000000 pixels: one side is more than 100"):
        load_image(data, 32)

    assert time.perf_counter() - started < 0.5


def test_the_aspect_ratio_limit_is_a_parameter():
    data = thin_png(10, 1_000)

    assert read_header(data).pixels == 10_000
    with pytest.raises(ImageDecodeError, match="more than 50 times"):
        read_header(data, max_aspect_ratio=50)


# Real files of every accepted format, with the parts hostile edits aim at: EXIF, frames, palettes.
FUZZ_SEEDS = {
    "jpeg+exif": encoded("JPEG", (24, 16), exif=BROKEN_EXIF["struct.error"][:56]),
    "progressive jpeg": encoded("JPEG", (24, 16), progressive=True),
    "png": encoded("PNG", (24, 16)),
    "palette png": encoded("PNG", (24, 16), mode="P", transparency=0),
    "gif": SHORT_GIF,
    "animated gif": None,  # filled below
    "webp+exif": encoded("WEBP", (24, 16), exif=BROKEN_EXIF["TypeError"][:56]),
    "lossless webp": encoded("WEBP", (24, 16), lossless=True),
    "bmp": encoded("BMP", (24, 16)),
}


def _animated_gif() -> bytes:
    frames = [Image.new("P", (24, 16), colour) for colour in (1, 2, 3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


FUZZ_SEEDS["animated gif"] = _animated_gif()


@st.composite
def mutated_images(draw) -> bytes:
    """A real image with a few bytes changed, inserted, duplicated or cut off; edits land in
    the first 64 bytes (headers, EXIF) more often than anywhere else."""
    data = bytearray(FUZZ_SEEDS[draw(st.sampled_from(sorted(FUZZ_SEEDS)))])
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.one_of(st.integers(0, min(63, len(data) - 1)),
                               st.integers(0, len(data) - 1)))
        edit = draw(st.sampled_from(["set", "set", "insert", "delete", "repeat", "word"]))
        if edit == "set":
            data[where] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[where:where + draw(st.integers(1, 8))]
        elif edit == "repeat":
            data[where:where] = data[where:where + draw(st.integers(1, 32))]
        else:  # a large or extreme 16/32-bit value where a size or count may be
            data[where:where + 4] = struct.pack(draw(st.sampled_from(["<I", ">I"])), draw(
                st.sampled_from([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 40_000_000])))
        if not data:
            break
    if draw(st.booleans()):
        del data[draw(st.integers(0, len(data))):]
    return bytes(data)


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_images())
def test_a_mutated_image_decodes_or_is_refused_with_a_reason(data):
    try:
        pixels = load_image(data, 32)
    except ImageDecodeError as error:
        assert error.reason
        return
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
