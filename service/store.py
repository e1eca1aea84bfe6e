"""The store: the single source of truth for every classifier.

`BlobStore` is the byte-level interface (a local directory here; S3 behind the same interface);
`ClassifierStore` is the one place that knows the key layout:

    classifiers/{id}/record.json    the classifier resource and job bookkeeping
    classifiers/{id}/dataset.zip    the accepted images, in Headstart's own archive format
    classifiers/{id}/head.npz       the trained head's weights (architecture rebuilt from code)
    classifiers/{id}/report.json    the training report
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Protocol

from service.errors import NotFound, ServiceUnavailable
from service.schemas import ClassifierRecord, Report

_ID_PATTERN = re.compile(r"^clf_[0-9a-z]{20}$")


class StoreUnavailable(ServiceUnavailable):
    """The store cannot be reached or written; the request can be retried later."""

    title = "Store unavailable"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"Retry-After": "5"})


class BlobStore(Protocol):
    """Keys are '/'-separated paths built by `ClassifierStore`, never by user input."""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...          # raises KeyError when absent
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...  # keys under prefix
    def delete(self, key: str) -> None: ...        # no error when absent
    def delete_prefix(self, prefix: str) -> None: ...
    def ping(self) -> None: ...                    # raises StoreUnavailable


class LocalBlobStore:
    """A directory. Writes go to a temp file in the same folder, then `os.replace`: atomic."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temp, path)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as error:
            raise StoreUnavailable(f"cannot write to the store: {error.strerror}") from error

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None
        except OSError as error:
            raise StoreUnavailable(f"cannot read the store: {error.strerror}") from error

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(
            path.relative_to(self.root).as_posix() for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(".tmp-"))

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as error:
            raise StoreUnavailable(f"cannot delete from the store: {error.strerror}") from error

    def delete_prefix(self, prefix: str) -> None:
        try:
            shutil.rmtree(self._path(prefix))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise StoreUnavailable(f"cannot delete from the store: {error.strerror}") from error

    def ping(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".tmp-ping"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            if error.errno in (errno.EROFS, errno.EACCES, errno.ENOSPC, errno.ENOENT):
                raise StoreUnavailable(f"store directory {self.root} is not writable: "
                                       f"{error.strerror}") from error
            raise StoreUnavailable(f"store directory {self.root}: {error}") from error


def new_classifier_id() -> str:
    """Server-generated, time-ordered, unguessable: 'clf_' + 8 time digits + 12 random, base36."""
    stamp = _base36(int(time.time() * 1000)).rjust(9, "0")[-8:]
    return "clf_" + stamp + _base36(secrets.randbits(62)).rjust(12, "0")[-12:]


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


class ClassifierStore:
    """Classifier records, datasets, heads and reports over a `BlobStore`."""

    def __init__(self, blobs: BlobStore):
        self.blobs = blobs

    @staticmethod
    def _key(classifier_id: str, name: str) -> str:
        if not _ID_PATTERN.match(classifier_id):
            raise NotFound(f"no classifier {classifier_id!r}")
        return f"classifiers/{classifier_id}/{name}"

    def _get(self, classifier_id: str, name: str) -> bytes:
        try:
            return self.blobs.get(self._key(classifier_id, name))
        except KeyError:
            raise NotFound(f"no classifier {classifier_id!r}") from None

    # records
    def save_record(self, record: ClassifierRecord) -> None:
        self.blobs.put(self._key(record.id, "record.json"), record.model_dump_json().encode())

    def load_record(self, classifier_id: str) -> ClassifierRecord:
        return ClassifierRecord.model_validate_json(self._get(classifier_id, "record.json"))

    def exists(self, classifier_id: str) -> bool:
        return self.blobs.exists(self._key(classifier_id, "record.json"))

    def list_records(self) -> list[ClassifierRecord]:
        """Every classifier, newest first."""
        records = []
        for key in self.blobs.list("classifiers"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "record.json" and _ID_PATTERN.match(parts[1]):
                try:
                    records.append(self.load_record(parts[1]))
                except NotFound:  # deleted while listing
                    continue
        return sorted(records, key=lambda record: (record.created_at, record.id), reverse=True)

    # artefacts
    def save_dataset(self, classifier_id: str, archive: bytes) -> None:
        self.blobs.put(self._key(classifier_id, "dataset.zip"), archive)

    def load_dataset(self, classifier_id: str) -> bytes:
        return self._get(classifier_id, "dataset.zip")

    def save_head(self, classifier_id: str, weights: bytes) -> None:
        self.blobs.put(self._key(classifier_id, "head.npz"), weights)

    def load_head(self, classifier_id: str) -> bytes:
        return self._get(classifier_id, "head.npz")

    def save_report(self, report: Report) -> None:
        self.blobs.put(self._key(report.classifier_id, "report.json"),
                       report.model_dump_json().encode())

    def load_report(self, classifier_id: str) -> Report:
        return Report.model_validate_json(self._get(classifier_id, "report.json"))

    def delete(self, classifier_id: str) -> None:
        # The record goes first, so a reader never sees a record whose artefacts are half gone.
        self.blobs.delete(self._key(classifier_id, "record.json"))
        self.blobs.delete_prefix(f"classifiers/{classifier_id}")

    def ping(self) -> None:
        self.blobs.ping()


def open_store(location: str) -> ClassifierStore:
    """The composition root's way to build a store from `HEADSTART_STORE`."""
    if location.startswith("s3://"):
        raise ValueError("S3 stores come with the scale-out work; use a local directory")
    return ClassifierStore(LocalBlobStore(location))


