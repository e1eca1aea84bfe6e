"""Tests for reading uploaded dataset zips (service/jobs/datasets.py) and the stored archive format (service/storage/archive.py): built in memory, tiny images."""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import struct
import time
import unicodedata
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.preprocessing import decode_image
from service.jobs.datasets import DatasetLimits, read_dataset_zip
from service.storage.archive import Dataset, DatasetArchiveError, DatasetImage, SkippedFile
from service.errors import BadRequest, PayloadTooLarge, Unprocessable

MiB = 1024**2


# --- building uploads --------------------------------------------------------------------------

def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (16, 16), mode: str = "RGB",
                color: object = (200, 40, 40), **save: object) -> bytes:
    """A tiny one-colour image encoded in the given format."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def noisy_jpeg(size: int = 32) -> bytes:
    """A JPEG of random pixels, so that its entropy-coded data is most of the file."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG", color=(30, 160, 60))


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> io.BytesIO:
    """A zip (as a stream at position 0) with the given member names and contents."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            # zipfile's writestr cannot take an empty name as a string; a ZipInfo can carry one.
            archive.writestr(name or zipfile.ZipInfo(name), data)
    buffer.seek(0)
    return buffer


def symlink_zip(members: dict[str, bytes], link_name: str, target: str) -> io.BytesIO:
    """A zip with the given members plus a Unix symbolic link member."""
    buffer = make_zip(members)
    with zipfile.ZipFile(buffer, "a") as archive:
        info = zipfile.ZipInfo(link_name)
        info.create_system = 3  # Unix, so external_attr's high 16 bits are st_mode
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, target)
    buffer.seek(0)
    return buffer


def patch_flags(stream: io.BytesIO, set_bits: int = 0, clear_bits: int = 0) -> io.BytesIO:
    """Rewrites the general-purpose flag bits of every member (local and central headers).

    zipfile resets these flags when writing, so encrypted-looking or flag-less UTF-8 members can
    only be made by patching the bytes.
    """
    data = bytearray(stream.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        infos, central = archive.infolist(), archive.start_dir
    for info in infos:
        assert data[central:central + 4] == b"PK\x01\x02"
        for offset in (info.header_offset + 6, central + 8):
            (flags,) = struct.unpack_from("<H", data, offset)
            struct.pack_into("<H", data, offset, (flags | set_bits) & ~clear_bits)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, central + 28)
        central += 46 + name_len + extra_len + comment_len
    return io.BytesIO(bytes(data))


def two_labels(**extra: bytes) -> dict[str, bytes]:
    """A minimal valid dataset (cat and dog, two images each) plus extra members."""
    return {"cat/1.png": PNG, "cat/2.jpg": JPEG, "dog/1.png": PNG, "dog/2.jpg": JPEG, **extra}


# --- the happy path ----------------------------------------------------------------------------

def test_wrapping_root_folder_gives_labels_and_junk_is_ignored():
    upload = make_zip({
        "photos/": b"",
        "photos/cat/": b"",
        "photos/cat/1.png": PNG,
        "photos/cat/2.jpg": JPEG,
        "photos/dog/a.png": PNG,
        "photos/dog/deeper/b.jpg": JPEG,  # sub-folders belong to their label
        "photos/.DS_Store": b"\x00\x00\x00\x01Bud1",
        "photos/cat/.hidden.png": b"not even an image",
        "__MACOSX/photos/cat/._1.png": b"\x00\x05\x16\x07",
    })

    dataset = read_dataset_zip(upload)

    assert dataset.labels == ["cat", "dog"]
    assert dataset.per_label() == {"cat": 2, "dog": 2}
    assert dataset.skipped == []
    assert [(image.label, image.path) for image in dataset.images] == [
        ("cat", "photos/cat/1.png"), ("cat", "photos/cat/2.jpg"),
        ("dog", "photos/dog/a.png"), ("dog", "photos/dog/deeper/b.jpg"),
    ]
    assert [image.data for image in dataset.images] == [PNG, JPEG, PNG, JPEG]


def test_labels_are_top_level_folders_and_top_level_files_are_skipped():
    dataset = read_dataset_zip(make_zip(two_labels(**{"README.txt": b"my cats", "x.png": PNG})))

    assert dataset.labels == ["cat", "dog"]
    assert {item.path for item in dataset.skipped} == {"README.txt", "x.png"}
    assert all("label folder" in item.reason for item in dataset.skipped)


def test_top_level_files_beside_a_wrapping_root_are_skipped():
    wrapped = {f"photos/{name}": data for name, data in two_labels().items()}
    upload = make_zip({"photos/notes.txt": b"hi", **wrapped})

    dataset = read_dataset_zip(upload)

    assert dataset.labels == ["cat", "dog"]
    assert dataset.skipped == [SkippedFile("photos/notes.txt", dataset.skipped[0].reason)]
    assert "label folder" in dataset.skipped[0].reason


def test_top_level_files_outside_a_wrapping_root_do_not_hide_it():
    # "notes.txt" beside "photos/": the user's folder is still the wrapper, the file skipped
    wrapped = {f"photos/{name}": data for name, data in two_labels().items()}
    dataset = read_dataset_zip(make_zip({"notes.txt": b"hi", "stray.png": PNG, **wrapped}))

    assert dataset.labels == ["cat", "dog"] and dataset.per_label() == {"cat": 2, "dog": 2}
    assert {item.path for item in dataset.skipped} == {"notes.txt", "stray.png"}
    assert all("label folder" in item.reason for item in dataset.skipped)


def test_a_non_seekable_stream_is_read():
    class OneWay(io.RawIOBase):
        def __init__(self, data: bytes):
            self._source = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            chunk = self._source.read(len(buffer))
            buffer[:len(chunk)] = chunk
            return len(chunk)

    dataset = read_dataset_zip(OneWay(make_zip(two_labels()).getvalue()))

    assert dataset.per_label() == {"cat": 2, "dog": 2}


# --- image formats: content decides ------------------------------------------------------------

def exif_rotated_jpeg() -> bytes:
    """A 20x10 JPEG whose EXIF orientation (6: rotate 90° clockwise) makes it display 10x20."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_bytes("JPEG", size=(20, 10), exif=exif.tobytes())


def animated_gif() -> bytes:
    """A two-frame GIF."""
    frames = [Image.new("P", (12, 12), index) for index in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def png_16_bit() -> bytes:
    """A 16-bit greyscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10), 40_000, dtype=np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def test_every_common_image_flavour_decodes():
    flavours = {
        "gif": animated_gif(),
        "grey": image_bytes("JPEG", mode="L", color=128),
        "cmyk": image_bytes("JPEG", mode="CMYK", color=(0, 100, 200, 0)),
        "png16": png_16_bit(),
        "palette": image_bytes("PNG", mode="P", color=3),
        "rgba": image_bytes("PNG", mode="RGBA", color=(1, 2, 3, 4)),
        "rotated": exif_rotated_jpeg(),
        "bmp": image_bytes("BMP"),
        "webp": image_bytes("WEBP"),
    }
    members = {f"a/{name}.img": data for name, data in flavours.items()}
    members.update({f"b/{name}.img": data for name, data in flavours.items()})

    dataset = read_dataset_zip(make_zip(members))

    assert dataset.skipped == []
    assert dataset.per_label() == {"a": len(flavours), "b": len(flavours)}
    rotated = next(image for image in dataset.images if image.path == "a/rotated.img")
    assert rotated.data == flavours["rotated"]  # the original bytes are kept …
    assert decode_image(rotated.data).size == (10, 20)  # … and decode with orientation applied


def test_extension_does_not_matter_content_does():
    dataset = read_dataset_zip(make_zip(two_labels(**{
        "cat/really-a-png.txt": PNG,
        "dog/not-an-image.jpg": b"just some text\n",
    })))

    assert any(image.path == "cat/really-a-png.txt" for image in dataset.images)
    assert dataset.skipped == [SkippedFile("dog/not-an-image.jpg", "not a recognised image file")]


def test_truncated_jpeg_is_skipped_with_the_decoders_reason():
    whole = noisy_jpeg()
    dataset = read_dataset_zip(make_zip(two_labels(**{"cat/broken.jpg": whole[: len(whole) // 2]})))

    assert [item.path for item in dataset.skipped] == ["cat/broken.jpg"]
    assert dataset.skipped[0].reason.startswith("corrupt or truncated image")
    assert dataset.per_label() == {"cat": 2, "dog": 2}


def test_empty_and_oversized_members_are_skipped_with_a_reason():
    big = b"\x00" * (2 * MiB)
    limits = DatasetLimits(max_image_bytes=1 * MiB)

    dataset = read_dataset_zip(make_zip(two_labels(**{"cat/big.png": big, "dog/empty.png": b""})),
                               limits)

    reasons = {item.path: item.reason for item in dataset.skipped}
    assert reasons == {"cat/big.png": "file is larger than 1 MiB, the limit for one image",
                       "dog/empty.png": "empty file"}


def test_too_many_pixels_is_skipped():
    upload = make_zip(two_labels(**{"cat/huge.png": image_bytes(size=(40, 40))}))

    dataset = read_dataset_zip(upload, DatasetLimits(max_image_pixels=16 * 16))

    assert [item.path for item in dataset.skipped] == ["cat/huge.png"]
    assert "more than the limit" in dataset.skipped[0].reason


def test_duplicate_member_names_keep_the_first():
    upload = io.BytesIO()
    with zipfile.ZipFile(upload, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns "Duplicate name"
        for name, data in two_labels().items():
            archive.writestr(name, data)
        archive.writestr("cat/1.png", JPEG)
    upload.seek(0)

    dataset = read_dataset_zip(upload)

    assert dataset.per_label() == {"cat": 2, "dog": 2}
    assert [item.path for item in dataset.skipped] == ["cat/1.png"]


# --- unsafe archives: 400 ----------------------------------------------------------------------

@pytest.mark.parametrize("name, words", [
    ("/etc/cat/1.png", "absolute path"),
    ("C:/cat/1.png", "absolute path"),
    ("c:cat/1.png", "absolute path"),
    ("cat/../../1.png", "'..'"),
    ("../cat/1.png", "'..'"),
    ("cat\\1.png", "backslash"),
    ("__MACOSX/../../x", "'..'"),  # safety checks apply even to entries that would be ignored
])
def test_unsafe_member_names_refuse_the_upload(name, words):
    with pytest.raises(BadRequest) as raised:
        read_dataset_zip(make_zip(two_labels(**{name: PNG})))

    assert words in raised.value.detail
    assert repr(name) in raised.value.detail
    assert raised.value.status == 400


def test_symlink_member_refuses_the_upload():
    with pytest.raises(BadRequest, match="symbolic link: 'cat/link.png'"):
        read_dataset_zip(symlink_zip(two_labels(), "cat/link.png", "/etc/passwd"))


def test_encrypted_member_refuses_the_upload():
    with pytest.raises(BadRequest, match="encrypted"):
        read_dataset_zip(patch_flags(make_zip(two_labels()), set_bits=0x1))


@pytest.mark.parametrize("name, data", [
    ("cat/inner.zip", PNG),  # by name
    ("cat/photos.tar.gz", PNG),
    ("cat/x.7z", PNG),
    ("cat/looks-like.png", make_zip({"a": b"b"}).getvalue()),  # by content
    ("cat/looks-like.jpg", gzip.compress(b"hello")),
    ("cat/x.bin", b"BZh91AY&SY" + b"\x00" * 20),
    ("cat/x.bin", b"\xfd7zXZ\x00" + b"\x00" * 20),
])
def test_nested_archives_refuse_the_upload(name, data):
    with pytest.raises(BadRequest, match="another archive"):
        read_dataset_zip(make_zip(two_labels(**{name: data})))


@pytest.mark.parametrize("data", [b"", b"not a zip at all", b"PK\x03\x04" + b"\x00" * 40])
def test_not_a_zip_is_a_bad_request(data):
    with pytest.raises(BadRequest, match="not a readable zip"):
        read_dataset_zip(io.BytesIO(data))


def test_corrupt_member_is_a_bad_request():
    data = bytearray(make_zip(two_labels(), compression=zipfile.ZIP_STORED).getvalue())
    data[data.index(PNG) + 40] ^= 0xFF  # the CRC no longer matches

    with pytest.raises(BadRequest, match="corrupt"):
        read_dataset_zip(io.BytesIO(bytes(data)))


def test_unsupported_compression_is_a_bad_request():
    data = bytearray(make_zip(two_labels(), compression=zipfile.ZIP_STORED).getvalue())
    patched = data.replace(b"PK\x01\x02\x14\x03\x14\x00\x00\x00\x00\x00",
                           b"PK\x01\x02\x14\x03\x14\x00\x00\x00\x09\x00", 1)  # deflate64
    assert patched != data

    with pytest.raises(BadRequest, match="compression method"):
        read_dataset_zip(io.BytesIO(bytes(patched)))


def test_unsupported_zip_version_is_a_bad_request():
    data = make_zip(two_labels()).getvalue()
    central = data.index(b"PK\x01\x02")
    patched = data[:central + 6] + b"\x40" + data[central + 7:]  # "version needed to extract" 6.4

    with pytest.raises(BadRequest, match="unsupported features"):
        read_dataset_zip(io.BytesIO(patched))


# --- size limits: 413, fast --------------------------------------------------------------------

@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    """One member of 200 MiB of zeros, deflated to about 200 KiB, beside a valid dataset."""
    buffer = make_zip(two_labels())
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("cat/bomb.png", "w") as member:
            zeros = bytes(MiB)
            for _ in range(200):
                member.write(zeros)
    return buffer.getvalue()


def test_zip_bomb_is_refused_quickly(zip_bomb):
    assert len(zip_bomb) < 1 * MiB
    limits = DatasetLimits(max_uncompressed_bytes=50 * MiB)
    started = time.perf_counter()

    with pytest.raises(PayloadTooLarge, match="unpacks to more than 50 MiB"):
        read_dataset_zip(io.BytesIO(zip_bomb), limits)

    assert time.perf_counter() - started < 2


def test_zip_bomb_of_many_small_members_is_refused():
    zeros = bytes(MiB)
    upload = make_zip(two_labels(**{f"cat/{i}.png": zeros for i in range(30)}))

    with pytest.raises(PayloadTooLarge, match="unpacks to more than 10 MiB"):
        read_dataset_zip(upload, DatasetLimits(max_uncompressed_bytes=10 * MiB))


def test_too_many_members_is_refused_before_reading():
    members = two_labels(**{"cat/": b"", "dog/": b""})  # directories count too

    with pytest.raises(PayloadTooLarge, match="6 entries, more than the limit of 5"):
        read_dataset_zip(make_zip(members), DatasetLimits(max_members=5))
    dataset = read_dataset_zip(make_zip(members), DatasetLimits(max_members=6))
    assert dataset.labels == ["cat", "dog"]


# --- dataset content: 422 ----------------------------------------------------------------------

def unprocessable(members: dict[str, bytes]) -> Unprocessable:
    """The 422 that reading these members raises."""
    with pytest.raises(Unprocessable) as raised:
        read_dataset_zip(make_zip(members))
    assert raised.value.status == 422
    assert raised.value.errors and all(set(e) == {"field", "message"} for e in raised.value.errors)
    return raised.value


@pytest.mark.parametrize("members", [{}, {"cat/": b"", "__MACOSX/x": b"", ".DS_Store": b""}])
def test_empty_archive(members):
    assert "no files" in unprocessable(members).detail


def test_one_label_is_not_enough():
    error = unprocessable({"cat/1.png": PNG, "cat/2.png": PNG, "cat/3.png": PNG})

    assert "needs at least 2 labels (top-level folders), found 1: cat" in error.detail


def test_no_label_folders_at_all():
    error = unprocessable({"1.png": PNG, "2.png": PNG})

    assert "needs at least 2 labels (top-level folders), found 0" in error.detail


def test_each_label_with_too_few_images_is_named():
    error = unprocessable({
        "cat/1.png": PNG, "cat/2.png": PNG,
        "dog/1.png": PNG, "dog/oops.txt": b"text",
        "bird/": b"",
    })

    messages = [entry["message"] for entry in error.errors]
    assert messages == [
        "label 'bird' has 0 usable images, needs at least 2",
        "label 'dog' has 1 usable image, needs at least 2 "
        "(1 skipped, e.g. 'dog/oops.txt': not a recognised image file)",
    ]


def test_labels_differing_only_in_case_collide():
    error = unprocessable({"Cat/1.png": PNG, "Cat/2.png": PNG, "cat/1.png": PNG, "cat/2.png": PNG,
                           "dog/1.png": PNG, "dog/2.png": PNG})

    assert '"Cat" and "cat" differ only in letter case' in error.detail


def test_control_character_in_a_label_is_a_bad_request():
    with pytest.raises(BadRequest, match="control character"):
        read_dataset_zip(make_zip(two_labels(**{"bad\x07label/1.png": PNG})))


# --- unicode labels ----------------------------------------------------------------------------

def test_unicode_label_is_preserved_as_nfc():
    nfd = unicodedata.normalize("NFD", "café")
    assert nfd != "café"

    dataset = read_dataset_zip(make_zip({f"{nfd}/1.png": PNG, f"{nfd}/2.png": PNG,
                                         "thé/1.png": PNG, "thé/2.png": PNG}))

    assert dataset.labels == ["café", "thé"]
    assert dataset.per_label() == {"café": 2, "thé": 2}


def test_utf8_names_without_the_utf8_flag_are_read_as_utf8():
    upload = patch_flags(make_zip({"café/1.png": PNG, "café/2.png": PNG,
                                   "dog/1.png": PNG, "dog/2.png": PNG}), clear_bits=0x800)
    with zipfile.ZipFile(upload) as archive:
        assert "café/1.png" not in archive.namelist()  # zipfile alone would read cp437 mojibake
    upload.seek(0)

    assert read_dataset_zip(upload).labels == ["café", "dog"]


# --- the server's own archive format -----------------------------------------------------------

def test_archive_round_trip():
    original = read_dataset_zip(make_zip(two_labels(**{"dog/x.txt": b"?", "top.png": PNG})))

    packed = original.to_archive()
    restored = Dataset.from_archive(packed)

    assert restored == original
    assert packed == original.to_archive()  # reproducible bytes
    with zipfile.ZipFile(io.BytesIO(packed)) as archive:
        assert archive.namelist() == ["manifest.json", "images/000000", "images/000001",
                                      "images/000002", "images/000003"]
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}


@pytest.mark.parametrize("data", [
    b"garbage",
    make_zip(two_labels()).getvalue(),  # a user's upload is not a dataset archive
    make_zip({"manifest.json": b'{"version": 1, "labels": ["a"], "images": [], "skipped": []}',
              "images/000000": PNG}).getvalue(),  # a member the manifest does not list
    make_zip({"manifest.json": b'{"version": 1, "labels": ["a"], "images": [{"label": "b", '
                               b'"path": "x"}], "skipped": []}', "images/000000": PNG}).getvalue(),
])
def test_from_archive_trusts_only_its_own_format(data):
    with pytest.raises(DatasetArchiveError):
        Dataset.from_archive(data)


def test_per_label_counts_in_label_order():
    dataset = Dataset(labels=["a", "b"], images=[DatasetImage("b", "b/1", b"")], skipped=[])

    assert dataset.per_label() == {"a": 0, "b": 1}


# --- properties --------------------------------------------------------------------------------

SAMPLE_CONTENTS = [PNG, JPEG, animated_gif(), noisy_jpeg()[:300], b"", gzip.compress(b"x"),
                   make_zip({"a.png": PNG}).getvalue()]
NAME_PARTS = st.one_of(
    st.sampled_from(["cat", "dog", "Cat", "photos", "..", ".", "", ".DS_Store", "__MACOSX", "C:",
                     "a\\b", "caf\u00e9", "cafe\u0301", "x.zip", "bad\x07", "1.png"]),
    st.text(max_size=6),
)
MEMBER_NAMES = st.one_of(st.lists(NAME_PARTS, min_size=1, max_size=4).map("/".join),
                         st.text(max_size=12)).filter(lambda name: "\x00" not in name)
CONTENTS = st.one_of(st.sampled_from(SAMPLE_CONTENTS), st.binary(max_size=64))
LIMITS = st.builds(DatasetLimits, max_members=st.integers(1, 12),
                   max_uncompressed_bytes=st.integers(0, 20_000),
                   max_image_bytes=st.integers(0, 3_000))


def check_outcome(upload: io.BytesIO, limits: DatasetLimits) -> None:
    """Reading either gives a consistent Dataset or raises one of the three user errors."""
    try:
        dataset = read_dataset_zip(upload, limits)
    except (BadRequest, Unprocessable, PayloadTooLarge) as error:
        assert error.detail
        return
    assert dataset.labels == sorted(dataset.labels) and len(dataset.labels) >= 2
    assert all(count >= 2 for count in dataset.per_label().values())
    assert Dataset.from_archive(dataset.to_archive()) == dataset


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory) -> str:
    """A directory the property tests run in, to prove nothing is written to the cwd."""
    return str(tmp_path_factory.mktemp("cwd"))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=st.dictionaries(MEMBER_NAMES, CONTENTS, max_size=8), limits=LIMITS,
       deflate=st.booleans())
def test_any_names_and_contents_give_only_user_errors_and_write_nothing(
    empty_dir, members, limits, deflate
):
    upload = make_zip(members, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    with contextlib.chdir(empty_dir):
        check_outcome(upload, limits)
    assert os.listdir(empty_dir) == []


VALID_UPLOADS = [make_zip(two_labels(), compression).getvalue()
                 for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)]


@settings(max_examples=100, deadline=None)
@given(data=st.data(), upload=st.sampled_from(VALID_UPLOADS))
def test_corrupted_archives_give_only_user_errors(data, upload):
    corrupted = bytearray(upload)
    for position in data.draw(st.lists(st.integers(0, len(upload) - 1), min_size=1, max_size=4)):
        corrupted[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(corrupted)))
    if data.draw(st.booleans()):
        corrupted = corrupted[:cut]

    check_outcome(io.BytesIO(bytes(corrupted)), DatasetLimits())


ZIP_LIKE_PREFIXES = [b"", b"PK\x03\x04", b"PK\x05\x06", b"PK\x01\x02", b"\x1f\x8b"]


@settings(max_examples=200, deadline=None)
@given(prefix=st.sampled_from(ZIP_LIKE_PREFIXES), rest=st.binary(max_size=512))
def test_arbitrary_bytes_give_only_user_errors_and_write_nothing(empty_dir, prefix, rest):
    with contextlib.chdir(empty_dir):
        check_outcome(io.BytesIO(prefix + rest), DatasetLimits())
    assert os.listdir(empty_dir) == []
