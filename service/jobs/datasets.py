"""Reading an uploaded dataset zip safely: the checks an untrusted archive must pass.

An upload is untrusted: it is read in memory, member by member, and nothing is ever written under a
name taken from it (no `extractall`, no files at all). Labels are the top-level folders (a single
wrapping root folder is allowed); every image is decoded once here so that training never meets a
file it cannot read, and its decoded pixels are dropped as soon as it has been checked. What it
may cost is bounded before the work is done: entries are counted from the end of the archive
before `zipfile` parses its directory, and pixels are counted from each image's header before
it is decoded.
"""

from __future__ import annotations

import io
import json
import lzma
import os
import re
import stat
import struct
import typing
import unicodedata
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass

from models.preprocessing import ImageDecodeError, decode_image, read_header
from service.errors import BadRequest, PayloadTooLarge, Unprocessable
from service.storage.archive import Dataset, DatasetImage, SkippedFile

#: A dataset needs this many labels, and this many usable images per label, to train anything.
MIN_LABELS = 2
MIN_IMAGES_PER_LABEL = 2

#: Members are read this many bytes at a time, so a limit is passed by at most one chunk.
_CHUNK_BYTES = 1024 * 1024
#: A label is a folder name; longer ones are refused (255 is what most file systems allow).
MAX_LABEL_LENGTH = 255
#: An image file over this size that takes more than a byte per pixel (BMP, uncompressed PNG) is
#: kept re-encoded as PNG when that is smaller: it decodes to the same pixels.
_RECODE_MIN_BYTES = 256 * 1024

_UTF8_NAME_FLAG = 0x800
_ENCRYPTED_FLAG = 0x1
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
_ARCHIVE_MAGICS = (
    b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08",  # zip (local header, empty, spanned)
    b"\x1f\x8b",  # gzip
    b"\xfd7zXZ\x00",  # xz
    b"7z\xbc\xaf\x27\x1c",  # 7z
    b"Rar!\x1a\x07",  # rar
)
_BZIP2_MAGIC = re.compile(rb"^BZh[1-9]")
_TAR_MAGIC_OFFSET = 257  # "ustar" sits here in a POSIX tar header

# Everything zipfile and its decompressors raise on corrupt input (lzma and zlib errors are not
# OSErrors; struct.error comes from truncated extra fields).
_CORRUPT_ZIP_ERRORS = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, zlib.error, lzma.LZMAError,
)

# The zip records read before zipfile is given the archive (APPNOTE 4.3.12, 4.3.14–16).
_END_RECORD = struct.Struct("<4s4H2LH")  # signature, disks, entries here, entries, size, offset, comment
_END_RECORD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_END_RECORD = struct.Struct("<4sQ2H2L4Q")  # …, entries here, entries, size, offset
_ZIP64_END_RECORD_SIGNATURE = b"PK\x06\x06"
_CENTRAL_HEADER_SIZE = 46
_CENTRAL_HEADER_SIGNATURE = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds on an upload; every one is enforced while reading, never trusted from zip headers."""

    max_members: int = 20_000  # zip entries (files + dirs)
    max_uncompressed_bytes: int = 2 * 1024**3  # all members read, together
    max_image_bytes: int = 50 * 1024**2  # one member
    max_image_pixels: int = 40_000_000
    max_dataset_pixels: int = 4_000_000_000  # all images, from their headers: bounds decoding CPU
    max_labels: int = 1_000


def read_dataset_zip(stream: typing.BinaryIO, limits: DatasetLimits = DatasetLimits(), *,
                     complete: bool = True) -> Dataset:
    """Reads an uploaded dataset zip into a Dataset, or raises the 4xx error saying what is wrong.

    `complete=False` reads a part of a dataset (images added to a new version): the counts of
    labels and images per label are then checked on the whole (`check_counts`).

    Raises:
        BadRequest: not a zip, a corrupt or unsafe archive, a label with control characters.
        PayloadTooLarge: too many members, more uncompressed bytes or decoded pixels than allowed.
        Unprocessable: no files, labels that collide, too many or too long labels, too few labels
            or images per label.
    """
    with _open_archive(stream, limits.max_members) as archive:
        members, files = _checked_members(archive, limits)
        depth = _label_depth(members)
        labels = _labels(members, depth)
        _check_label_names(set(labels.values()), limits.max_labels)
        images, skipped, skipped_by_label = _read_images(archive, files, depth, labels, limits)
    label_names = sorted(set(labels.values()))
    if complete:
        _check_counts(label_names, images, skipped_by_label)
    images.sort(key=lambda image: (image.label, image.path))
    return Dataset(labels=label_names, images=images, skipped=skipped)


def read_image_zip(stream: typing.BinaryIO, limits: DatasetLimits = DatasetLimits(),
                   max_images: int | None = None) -> Dataset:
    """Reads a zip of unlabeled images, in any folder layout, with the checks and limits of
    `read_dataset_zip`; files that are not images are skipped with the reason.

    Returns:
        A Dataset without labels: each image's label is "", its path the member's name;
        sorted by path.

    Raises:
        As `read_dataset_zip`; Unprocessable also when no file is a usable image, and
        PayloadTooLarge for more than `max_images` images.
    """
    with _open_archive(stream, limits.max_members) as archive:
        _, files = _checked_members(archive, limits)
        if max_images is not None and len(files) > max_images:
            raise PayloadTooLarge(f"the archive has {len(files)} files, more than the limit of "
                                  f"{max_images} images")
        budget = _Budget(limits.max_uncompressed_bytes, limits.max_dataset_pixels)
        images, skipped = [], []
        for member in files:
            data, reason = _image_bytes(archive, member, limits, budget)
            if data is None:
                skipped.append(SkippedFile(member.name, reason))
            else:
                images.append(DatasetImage(label="", path=member.name, data=data))
    if not images:
        raise _unprocessable(["the archive contains no usable image"])
    images.sort(key=lambda image: image.path)
    return Dataset(labels=[], images=images, skipped=skipped)


def _checked_members(archive: zipfile.ZipFile,
                     limits: DatasetLimits) -> tuple[list[_Member], list[_Member]]:
    """The archive's members that pass the safety checks, and those of them that are files."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise _too_many_entries(len(infos), limits.max_members)
    members = [member for member in map(_checked_member, infos) if not _is_ignored(member)]
    files = [member for member in members if not member.is_dir]
    if not files:
        raise _unprocessable(["the archive contains no files"])
    _refuse_nested_archive_names(files)
    return members, files


@dataclass(frozen=True)
class _Member:
    """A zip member whose name has passed the safety checks."""

    info: zipfile.ZipInfo
    name: str
    parts: tuple[str, ...]  # path components, without empty and "." ones
    is_dir: bool


def _open_archive(stream: typing.BinaryIO, max_members: int) -> zipfile.ZipFile:
    """Opens the upload as a zip, or raises BadRequest (PayloadTooLarge: too many entries)."""
    if not _seekable(stream):
        # zipfile needs to seek (the central directory is at the end); the upload's size is already
        # capped by the request limit, so holding it in memory is bounded.
        stream = io.BytesIO(stream.read())
    try:
        _count_entries(stream, max_members)
        stream.seek(0)
        return zipfile.ZipFile(stream)
    except NotImplementedError as error:  # e.g. "zip file version 6.4" (needs newer features)
        raise BadRequest(f"the dataset zip uses unsupported features ({error})") from None
    except _CORRUPT_ZIP_ERRORS as error:
        raise BadRequest(f"the dataset is not a readable zip archive ({error})") from None


def _count_entries(stream: typing.BinaryIO, limit: int) -> None:
    """Refuses an archive of more than `limit` entries before zipfile parses its directory.

    zipfile builds an object per central-directory entry (a 47 MB zip of a million entries cost
    343 MB and 4.6 s), and it reads every header in the directory whatever the end record's count
    says; so the count is checked, then the headers are counted, up to `limit` + 1. An archive
    these records do not describe is left for zipfile to refuse.

    Raises:
        PayloadTooLarge: more than `limit` entries.
    """
    size = stream.seek(0, os.SEEK_END)
    tail_start = max(0, size - _END_RECORD.size - _MAX_COMMENT)
    stream.seek(tail_start)
    tail = stream.read()
    at = tail.rfind(_END_RECORD_SIGNATURE)
    if at < 0 or at + _END_RECORD.size > len(tail):
        return
    *_, entries, directory_size, _offset, _comment = _END_RECORD.unpack_from(tail, at)
    end = tail_start + at  # where the directory (and any zip64 records) stops
    locator = end - _ZIP64_LOCATOR.size
    if locator - _ZIP64_END_RECORD.size >= 0:
        stream.seek(locator - _ZIP64_END_RECORD.size)
        records = stream.read(_ZIP64_END_RECORD.size + _ZIP64_LOCATOR.size)
        if records[_ZIP64_END_RECORD.size:][:4] == _ZIP64_LOCATOR_SIGNATURE:
            record = _ZIP64_END_RECORD.unpack_from(records)
            if record[0] == _ZIP64_END_RECORD_SIGNATURE:
                entries, directory_size = max(entries, record[7]), record[8]
                end = locator - _ZIP64_END_RECORD.size
    if entries > limit:
        raise _too_many_entries(entries, limit)
    start = end - directory_size
    if start < 0:
        return
    # Headers are read a block at a time; a name or extra field longer than a block is skipped.
    block, at, position, counted = b"", 0, start, 0
    while position + _CENTRAL_HEADER_SIZE <= end:
        if at + _CENTRAL_HEADER_SIZE > len(block):
            stream.seek(position)
            block, at = stream.read(min(_CHUNK_BYTES, end - position)), 0
        if block[at:at + 4] != _CENTRAL_HEADER_SIGNATURE:
            return
        counted += 1
        if counted > limit:
            raise PayloadTooLarge(f"the archive has more entries than the limit of {limit}")
        name, extra, comment = struct.unpack_from("<3H", block, at + 28)
        step = _CENTRAL_HEADER_SIZE + name + extra + comment
        at, position = at + step, position + step


def _too_many_entries(entries: int, limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the archive has {entries} entries, more than the limit of {limit}")


def _seekable(stream: typing.BinaryIO) -> bool:
    """Whether the stream can seek (not every file-like object has `seekable`)."""
    seekable = getattr(stream, "seekable", None)
    return bool(seekable and seekable())


def _checked_member(info: zipfile.ZipInfo) -> _Member:
    """Refuses, with BadRequest, a member that is unsafe no matter where it sits in the archive."""
    name = _member_name(info)
    shown = repr(name)
    if name.startswith("/") or _DRIVE_LETTER.match(name):
        raise BadRequest(f"the archive contains an absolute path: {shown}")
    if "\\" in name:
        # Some Windows tools write "\" as the separator; zip paths use "/", so such an archive is
        # ambiguous (is "a\b.jpg" one file or a folder?) and is refused rather than guessed at.
        raise BadRequest(f"the archive contains a path with a backslash: {shown} (use '/')")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise BadRequest(f"the archive contains a path that goes up with '..': {shown}")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise BadRequest(f"the archive contains a symbolic link: {shown}")
    if info.flag_bits & _ENCRYPTED_FLAG:
        raise BadRequest(f"the archive contains an encrypted file: {shown}")
    is_dir = name.endswith("/")
    if not parts and not is_dir:
        raise BadRequest(f"the archive contains a file with an empty name: {shown}")
    return _Member(info=info, name=name, parts=parts, is_dir=is_dir)


def _member_name(info: zipfile.ZipInfo) -> str:
    """The member's name; UTF-8 names written without the zip UTF-8 flag are read as UTF-8."""
    if info.flag_bits & _UTF8_NAME_FLAG:
        return info.filename
    # Without the flag zipfile decodes as cp437, but many tools write UTF-8 and omit the flag;
    # genuine cp437 names with non-ASCII characters are almost never valid UTF-8.
    try:
        return info.filename.encode("cp437").decode("utf-8")
    except UnicodeError:
        return info.filename


def _is_ignored(member: _Member) -> bool:
    """macOS resource forks, dotfiles and dot-folders, and entries that name nothing are ignored."""
    if not member.parts:
        return True
    return any(part == "__MACOSX" or part.startswith(".") for part in member.parts)


def _refuse_nested_archive_names(files: list[_Member]) -> None:
    """Refuses archives inside the archive, judged by name (contents are checked when read)."""
    for member in files:
        if member.parts[-1].lower().endswith(_ARCHIVE_SUFFIXES):
            raise BadRequest(f"the archive contains another archive: {member.name!r}")


def _label_depth(members: list[_Member]) -> int:
    """1 when every folder sits in one wrapping root folder that holds the label folders, else 0.

    Files directly at the top ("notes.txt" beside "photos/") are outside any label either way
    and are skipped; they do not keep the wrapper from being one.
    """
    inside = [member for member in members if member.is_dir or len(member.parts) >= 2]
    if len({member.parts[0] for member in inside}) != 1:
        return 0
    # A lone folder holding only files is a (single) label, not a wrapper: "cat/1.jpg" alone
    # means label cat.
    has_label_folders = any(len(member.parts) >= 3 for member in inside if not member.is_dir)
    return 1 if has_label_folders else 0


def _label_part(member: _Member, depth: int) -> str | None:
    """The raw label folder name of a member, or None when it is not inside a label folder."""
    inside = len(member.parts) > depth if member.is_dir else len(member.parts) > depth + 1
    return member.parts[depth] if inside else None


def _labels(members: list[_Member], depth: int) -> dict[str, str]:
    """Maps each raw label folder name to its label (NFC); refuses control characters and clashes.

    Folders that differ only in Unicode normalisation look identical and become one label.
    """
    labels: dict[str, str] = {}
    for member in members:
        raw = _label_part(member, depth)
        if raw is None or raw in labels:
            continue
        label = unicodedata.normalize("NFC", raw)
        if any(unicodedata.category(char) == "Cc" for char in label):
            raise BadRequest(f"the label folder {label!r} contains a control character")
        labels[raw] = label
    _refuse_case_clashes(set(labels.values()))
    return labels


def _check_label_names(labels: set[str], max_labels: int) -> None:
    """Refuses more labels than a head may have, and label folder names too long to show."""
    if len(labels) > max_labels:
        raise _unprocessable([f"the dataset has {len(labels)} labels (top-level folders), more "
                              f"than the limit of {max_labels}"])
    too_long = sorted(label for label in labels if len(label) > MAX_LABEL_LENGTH)
    if too_long:
        raise _unprocessable([f"a label folder name is longer than {MAX_LABEL_LENGTH} characters: "
                              f"{too_long[0][:40]!r}…"])


def _refuse_case_clashes(labels: set[str]) -> None:
    """Refuses labels that differ only in letter case: a classifier's labels must be unambiguous."""
    by_key: dict[str, list[str]] = defaultdict(list)
    for label in sorted(labels):
        by_key[unicodedata.normalize("NFC", label.casefold())].append(label)
    messages = [
        f"labels {_quoted_list(group)} differ only in letter case; rename or merge these folders"
        for group in by_key.values()
        if len(group) > 1
    ]
    if messages:
        raise _unprocessable(messages)


def _read_images(
    archive: zipfile.ZipFile,
    files: list[_Member],
    depth: int,
    labels: dict[str, str],
    limits: DatasetLimits,
) -> tuple[list[DatasetImage], list[SkippedFile], dict[str, list[SkippedFile]]]:
    """Reads and decodes every file in a label folder: images, skipped, and skipped per label."""
    budget = _Budget(limits.max_uncompressed_bytes, limits.max_dataset_pixels)
    images: list[DatasetImage] = []
    skipped: list[SkippedFile] = []
    skipped_by_label: dict[str, list[SkippedFile]] = defaultdict(list)
    seen: set[str] = set()
    for member in files:
        raw_label = _label_part(member, depth)
        if raw_label is None:
            reason = "not inside a label folder (labels are the top-level folders)"
            skipped.append(SkippedFile(member.name, reason))
            continue
        label = labels[raw_label]
        if member.name in seen:
            data, reason = None, "another file in the archive has the same name"
        else:
            seen.add(member.name)
            data, reason = _image_bytes(archive, member, limits, budget)
        if data is not None:
            images.append(DatasetImage(label=label, path=member.name, data=data))
        else:
            item = SkippedFile(member.name, reason)
            skipped.append(item)
            skipped_by_label[label].append(item)
    return images, skipped, skipped_by_label


def _image_bytes(
    archive: zipfile.ZipFile, member: _Member, limits: DatasetLimits, budget: _Budget
) -> tuple[bytes | None, str]:
    """The bytes to keep of a member when it is a usable image, else None and the reason to
    skip it."""
    data = _read_member(archive, member, limits, budget)
    if data is None:
        return None, (f"file is larger than {_format_bytes(limits.max_image_bytes)}, "
                      "the limit for one image")
    try:
        header = read_header(data, max_pixels=limits.max_image_pixels)
        budget.spend_pixels(header.pixels)  # before decoding: the budget bounds decoding time
        image = decode_image(data, max_pixels=limits.max_image_pixels)
    except ImageDecodeError as error:
        return None, error.reason
    if len(data) > max(_RECODE_MIN_BYTES, header.pixels):
        data = _smaller_as_png(data, image)
    return data, ""


def _smaller_as_png(data: bytes, image) -> bytes:
    """The decoded image as a PNG when that is smaller than the file (a solid-colour 4000²
    BMP: 48 MB → 0.2 MB). `load_image` reads the PNG to exactly the pixels it reads from the
    original, which is already upright and RGB."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)  # NB: fast; the point is to bound, not to squeeze
    return buffer.getvalue() if buffer.tell() < len(data) else data


class _Budget:
    """What the whole upload may still cost: uncompressed bytes and decoded pixels. Refuses the
    upload as soon as either is spent."""

    def __init__(self, max_bytes: int, max_pixels: int):
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self.bytes = self.pixels = 0

    def spend(self, count: int) -> None:
        """Counts bytes just read; raises PayloadTooLarge as soon as the total passes the limit."""
        self.bytes += count
        if self.bytes > self.max_bytes:
            raise PayloadTooLarge(
                f"the archive unpacks to more than {_format_bytes(self.max_bytes)}, "
                "the limit for a dataset"
            )

    def spend_pixels(self, count: int) -> None:
        """Counts an image's pixels before it is decoded; raises PayloadTooLarge past the limit."""
        self.pixels += count
        if self.pixels > self.max_pixels:
            raise PayloadTooLarge(
                f"the images of the archive decode to more than {self.max_pixels:,} pixels, "
                "the limit for a dataset"
            )


def _read_member(
    archive: zipfile.ZipFile, member: _Member, limits: DatasetLimits, budget: _Budget
) -> bytes | None:
    """Reads one member in chunks, counting every byte; None when it exceeds the one-image limit.

    At most max_image_bytes + 1 bytes are held, whatever the member's header claims.
    """
    data = bytearray()
    try:
        with archive.open(member.info) as stream:
            while chunk := stream.read(min(_CHUNK_BYTES, limits.max_image_bytes + 1 - len(data))):
                budget.spend(len(chunk))
                data += chunk
                if len(data) > limits.max_image_bytes:
                    _refuse_nested_archive_bytes(member, data)
                    return None
    except NotImplementedError:
        raise BadRequest(
            f"the archive member {member.name!r} uses a compression method that is not supported "
            "(use deflate or no compression)"
        ) from None
    except _CORRUPT_ZIP_ERRORS as error:
        raise BadRequest(f"the archive member {member.name!r} is corrupt ({error})") from None
    _refuse_nested_archive_bytes(member, data)
    return bytes(data)


def _refuse_nested_archive_bytes(member: _Member, data: bytes | bytearray) -> None:
    """Refuses a member whose bytes are an archive, whatever its name says."""
    is_archive = (
        data.startswith(_ARCHIVE_MAGICS)
        or _BZIP2_MAGIC.match(data) is not None
        or data[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar"
    )
    if is_archive:
        raise BadRequest(f"the archive contains another archive: {member.name!r}")


def check_counts(dataset: Dataset) -> None:
    """Refuses a whole dataset with too few labels, or a label with too few images."""
    _check_counts(dataset.labels, dataset.images, {label: [] for label in dataset.labels})


def _check_counts(
    labels: list[str], images: list[DatasetImage], skipped_by_label: dict[str, list[SkippedFile]]
) -> None:
    """Refuses a dataset with too few labels, or a label with too few usable images."""
    messages = []
    if len(labels) < MIN_LABELS:
        found = f"{len(labels)}: {', '.join(labels)}" if labels else "0"
        messages.append(
            f"a dataset needs at least {MIN_LABELS} labels (top-level folders), found {found}"
        )
    counts = dict.fromkeys(labels, 0)
    for image in images:
        counts[image.label] += 1
    for label, count in counts.items():
        if count < MIN_IMAGES_PER_LABEL:
            messages.append(
                f"label {label!r} has {count} usable image{'' if count == 1 else 's'}, "
                f"needs at least {MIN_IMAGES_PER_LABEL}{_skipped_note(skipped_by_label[label])}"
            )
    if messages:
        raise _unprocessable(messages)


def _skipped_note(skipped: list[SkippedFile]) -> str:
    """A hint at why a label has fewer images than the user expects."""
    if not skipped:
        return ""
    first = skipped[0]
    return f" ({len(skipped)} skipped, e.g. {first.path!r}: {first.reason})"


def _unprocessable(messages: list[str]) -> Unprocessable:
    """A 422 for dataset-content problems, one error entry per problem."""
    return Unprocessable(
        "; ".join(messages),
        errors=[{"field": "dataset", "message": message} for message in messages],
    )


def _quoted_list(items: list[str]) -> str:
    """'"a", "b" and "c"' — for naming labels in messages."""
    quoted = [json.dumps(item, ensure_ascii=False) for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _format_bytes(count: int) -> str:
    """A byte count for people: 50 MiB, 2 GiB, 1500 bytes."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"

