"""The store: the single source of truth for every classifier.

`BlobStore` is the byte-level interface (a local directory here, S3 in `service.s3`);
`ClassifierStore` is the one place that knows the key layout:

    classifiers/{id}/record.json         the classifier resource and job bookkeeping
    classifiers/{id}/dataset.zip         the accepted images, in Headstart's own archive format
    classifiers/{id}/heads/{run}.npz     a training run's head weights (architecture rebuilt from code)
    classifiers/{id}/reports/{run}.json  that run's training report
    deleted/{id}                         tombstone: the classifier was deleted

Heads and reports are keyed by run, and the record names the current run, so a result committed
twice (two workers finishing the same job) still leaves one consistent classifier: whichever record
write lands last, its head and report are the ones it names. The tombstone stops a worker that is
still writing from bringing a deleted classifier back: workers check it after each record write.
"""

from __future__ import annotations

import errno
import io
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Protocol

from service.errors import NotFound, ServiceUnavailable
from service.schemas import ClassifierRecord, Report
from service.settings import Settings

_ID_PATTERN = re.compile(r"clf_[0-9a-z]{20}")  # NB: fullmatch; "$" would let "\n" through


class StoreUnavailable(ServiceUnavailable):
    """The store cannot be reached or written; the request can be retried later."""

    title = "Store unavailable"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"Retry-After": "5"})


class BlobStore(Protocol):
    """Keys are '/'-separated paths built by `ClassifierStore`, never by user input."""

    def put(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, file: IO[bytes]) -> None: ...   # streams from file
    def get(self, key: str) -> bytes: ...          # raises KeyError when absent
    def get_file(self, key: str, file: IO[bytes]) -> None: ...   # streams into file; KeyError
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
        self.put_file(key, io.BytesIO(data))

    def put_file(self, key: str, source: IO[bytes]) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as file:
                    shutil.copyfileobj(source, file)
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

    def get_file(self, key: str, target: IO[bytes]) -> None:
        try:
            with self._path(key).open("rb") as file:
                shutil.copyfileobj(file, target)
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
        if not _ID_PATTERN.fullmatch(classifier_id):
            raise NotFound(f"no classifier {classifier_id!r}")
        return f"classifiers/{classifier_id}/{name}"

    def _get(self, classifier_id: str, name: str) -> bytes:
        try:
            return self.blobs.get(self._key(classifier_id, name))
        except KeyError:
            raise NotFound(f"no classifier {classifier_id!r}") from None

    # records
    def save_record(self, record: ClassifierRecord) -> None:
        """Raises NotFound, and removes what it wrote, if the classifier was deleted meanwhile."""
        self.blobs.put(self._key(record.id, "record.json"), record.model_dump_json().encode())
        if self.is_deleted(record.id):
            self._purge(record.id)
            raise NotFound(f"classifier {record.id} was deleted")

    def load_record(self, classifier_id: str) -> ClassifierRecord:
        return ClassifierRecord.model_validate_json(self._get(classifier_id, "record.json"))

    def exists(self, classifier_id: str) -> bool:
        return self.blobs.exists(self._key(classifier_id, "record.json"))

    def is_deleted(self, classifier_id: str) -> bool:
        return self.blobs.exists(f"deleted/{classifier_id}")

    def list_records(self) -> list[ClassifierRecord]:
        """Every classifier, newest first."""
        records = []
        for key in self.blobs.list("classifiers"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == "record.json" and _ID_PATTERN.fullmatch(parts[1]):
                try:
                    records.append(self.load_record(parts[1]))
                except NotFound:  # deleted while listing
                    continue
        return sorted(records, key=lambda record: (record.created_at, record.id), reverse=True)

    # artefacts
    def save_dataset(self, classifier_id: str, archive: IO[bytes]) -> None:
        self.blobs.put_file(self._key(classifier_id, "dataset.zip"), archive)

    def load_dataset(self, classifier_id: str, target: IO[bytes]) -> None:
        try:
            self.blobs.get_file(self._key(classifier_id, "dataset.zip"), target)
        except KeyError:
            raise NotFound(f"no classifier {classifier_id!r}") from None

    def save_head(self, classifier_id: str, run: str, weights: bytes) -> None:
        self.blobs.put(self._key(classifier_id, f"heads/{run}.npz"), weights)

    def load_head(self, record: ClassifierRecord) -> bytes:
        return self._get(record.id, f"heads/{record.run}.npz")

    def save_report(self, run: str, report: Report) -> None:
        self.blobs.put(self._key(report.classifier_id, f"reports/{run}.json"),
                       report.model_dump_json().encode())

    def load_report(self, record: ClassifierRecord) -> Report:
        return Report.model_validate_json(self._get(record.id, f"reports/{record.run}.json"))

    def delete_run(self, classifier_id: str, run: str) -> None:
        """Removes a run's head and report (a run that lost the race to commit)."""
        self.blobs.delete(self._key(classifier_id, f"heads/{run}.npz"))
        self.blobs.delete(self._key(classifier_id, f"reports/{run}.json"))

    def delete(self, classifier_id: str) -> None:
        self._key(classifier_id, "")  # validates the id before anything is written
        self.blobs.put(f"deleted/{classifier_id}", b"")
        self._purge(classifier_id)

    def _purge(self, classifier_id: str) -> None:
        # The record goes first, so a reader never sees a record whose artefacts are half gone.
        self.blobs.delete(self._key(classifier_id, "record.json"))
        self.blobs.delete_prefix(f"classifiers/{classifier_id}")

    def ping(self) -> None:
        self.blobs.ping()


def open_store(settings: Settings) -> ClassifierStore:
    """The composition root's way to build a store from `HEADSTART_STORE`."""
    if settings.store.startswith("s3://"):
        from service.s3 import open_s3_blob_store  # boto3 is imported only when S3 is used

        return ClassifierStore(open_s3_blob_store(settings.store, settings))
    return ClassifierStore(LocalBlobStore(settings.store))


