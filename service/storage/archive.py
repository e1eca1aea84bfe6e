"""The server's own dataset archive: what the store keeps of an accepted upload.

Members are named by index only (never by a name from the upload) beside a manifest that holds
labels, original paths and skipped files. The bytes are reproducible: the same dataset always
gives the same archive.
"""

from __future__ import annotations

import io
import json
import lzma
import struct
import typing
import zipfile
import zlib
from dataclasses import dataclass, field

_ARCHIVE_FORMAT_VERSION = 1
_MANIFEST_NAME = "manifest.json"
_FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # so the same dataset always gives the same bytes
# Everything zipfile raises on a corrupt stored archive.
_CORRUPT_ZIP_ERRORS = (
    zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, zlib.error, lzma.LZMAError,
)


@dataclass(frozen=True)
class DatasetImage:
    """One usable image: its label, its path inside the upload (for messages), its encoded bytes."""

    label: str
    path: str
    data: bytes


@dataclass(frozen=True)
class SkippedFile:
    """A file of the upload that is not used, and why (safe to show a user)."""

    path: str
    reason: str


@dataclass
class Dataset:
    """A validated dataset: sorted labels, usable images, and the files that were skipped."""

    labels: list[str]
    images: list[DatasetImage]
    skipped: list[SkippedFile] = field(default_factory=list)

    def per_label(self) -> dict[str, int]:
        """Number of images per label, in label order."""
        counts = dict.fromkeys(self.labels, 0)
        for image in self.images:
            counts[image.label] += 1
        return counts

    def to_archive(self) -> bytes:
        buffer = io.BytesIO()
        self.write_archive(buffer)
        return buffer.getvalue()

    def write_archive(self, file: typing.BinaryIO) -> None:
        """Packs the dataset as a server-built zip: members named by index only, plus a manifest."""
        manifest = {
            "version": _ARCHIVE_FORMAT_VERSION,
            "labels": list(self.labels),
            "images": [{"label": image.label, "path": image.path} for image in self.images],
            "skipped": [{"path": item.path, "reason": item.reason} for item in self.skipped],
        }
        # NB: ZIP_STORED because the images are already compressed; deflating them again only costs.
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED) as archive:
            archive.writestr(_stored_info(_MANIFEST_NAME), json.dumps(manifest, ensure_ascii=False))
            for index, image in enumerate(self.images):
                archive.writestr(_stored_info(_image_member_name(index)), image.data)

    @classmethod
    def from_archive(cls, data: bytes | typing.BinaryIO) -> Dataset:
        """Unpacks what `write_archive` wrote (bytes or a seekable file); anything else raises
        DatasetArchiveError."""
        try:
            with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data) as archive:
                manifest = json.loads(archive.read(_MANIFEST_NAME).decode("utf-8"))
                labels, entries, skipped = _parse_manifest(manifest)
                expected = [_MANIFEST_NAME] + [_image_member_name(i) for i in range(len(entries))]
                if sorted(archive.namelist()) != sorted(expected):
                    raise DatasetArchiveError("members do not match the manifest")
                images = [
                    DatasetImage(label=label, path=path, data=archive.read(_image_member_name(i)))
                    for i, (label, path) in enumerate(entries)
                ]
        except DatasetArchiveError:
            raise
        except (*_CORRUPT_ZIP_ERRORS, KeyError, TypeError) as error:
            raise DatasetArchiveError(f"not a dataset archive: {error}") from error
        return cls(labels=labels, images=images, skipped=skipped)


class DatasetArchiveError(ValueError):
    """Stored bytes are not a dataset archive this server wrote (a server fault, not the user's)."""


def _image_member_name(index: int) -> str:
    """The server-chosen member name of the index-th image in a dataset archive."""
    return f"images/{index:06d}"


def _stored_info(name: str) -> zipfile.ZipInfo:
    """A ZipInfo with a fixed timestamp, so archives are byte-for-byte reproducible."""
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _parse_manifest(
    manifest: object,
) -> tuple[list[str], list[tuple[str, str]], list[SkippedFile]]:
    """Validates a dataset archive's manifest; returns labels, (label, path) per image, skipped."""
    if not isinstance(manifest, dict) or manifest.get("version") != _ARCHIVE_FORMAT_VERSION:
        raise DatasetArchiveError("manifest is missing or has an unknown version")
    labels = manifest.get("labels")
    if not _is_list_of(labels, str) or labels != sorted(set(labels)):
        raise DatasetArchiveError("manifest labels are not a sorted list of distinct strings")
    entries = []
    for entry in _list_of_dicts(manifest.get("images"), "images"):
        label, path = entry.get("label"), entry.get("path")
        if label not in labels or not isinstance(path, str):
            raise DatasetArchiveError(f"manifest image entry is invalid: {entry!r}")
        entries.append((label, path))
    skipped = []
    for entry in _list_of_dicts(manifest.get("skipped"), "skipped"):
        path, reason = entry.get("path"), entry.get("reason")
        if not isinstance(path, str) or not isinstance(reason, str):
            raise DatasetArchiveError(f"manifest skipped entry is invalid: {entry!r}")
        skipped.append(SkippedFile(path=path, reason=reason))
    return labels, entries, skipped


def _list_of_dicts(value: object, name: str) -> list[dict]:
    """The value when it is a list of objects; otherwise DatasetArchiveError naming the key."""
    if not _is_list_of(value, dict):
        raise DatasetArchiveError(f"manifest {name} is not a list of objects")
    return typing.cast(list, value)


def _is_list_of(value: object, kind: type) -> bool:
    """Whether value is a list whose items are all of the given type."""
    return isinstance(value, list) and all(isinstance(item, kind) for item in value)
