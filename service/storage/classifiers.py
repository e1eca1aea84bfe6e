"""The one place that knows the store's key layout:

    classifiers/{id}/record.json         the classifier's record (`records.ClassifierRecord`)
    classifiers/{id}/dataset.zip         the accepted images, in Headstart's own archive format
    classifiers/{id}/heads/{run}.npz     a training run's head weights (architecture rebuilt from code)
    classifiers/{id}/reports/{run}.json  that run's training report
    classifiers/{id}/features.npz        the feature cache: backbone features by (image, view) key
    classifiers/{id}/exports/{run}/{format}.zip   an export of that run (a cache: rebuilt if lost)
    classifiers/{id}/exports/{run}/{format}.json  its build while there is no zip (jobs/export.py)
    active/{id}                          index: the classifier's job is queued, training or refining
    deleted/{id}                         tombstone: the classifier was deleted

Records change only by compare-and-set on their version tag (`save_record(record, tag)`), so of
two writers that read the same version exactly one wins; the other gets `PreconditionFailed` and
must read again. Heads and reports are keyed by run and the record names the current run, so a
result is visible only once the record that names it is written. The tombstone stops a writer
that is still working from bringing a deleted classifier back: every record write checks it.
The `active/` index lets sweeps and metrics read only the jobs in flight, not every record.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import IO

from service.errors import NotFound
from service.storage.blobs import BlobStore, PreconditionFailed
from service.storage.records import ClassifierRecord

_ID_PATTERN = re.compile(r"clf_[0-9a-z]{20}")  # NB: fullmatch; "$" would let "\n" through
#: What a run id or an export format may be, before either becomes part of a key.
_NAME_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")

__all__ = ["ClassifierStore", "PreconditionFailed", "Versioned", "classifier_age_s",
           "new_classifier_id"]


def new_classifier_id() -> str:
    """Server-generated, time-ordered, unguessable: 'clf_' + 8 time digits + 12 random, base36."""
    stamp = _base36(int(time.time() * 1000)).rjust(9, "0")[-8:]
    return "clf_" + stamp + _base36(secrets.randbits(62)).rjust(12, "0")[-12:]


def classifier_age_s(classifier_id: str) -> float:
    """Seconds since the id was generated, from its time digits (they wrap every 89 years);
    infinite for a string that is no classifier id."""
    if not _ID_PATTERN.fullmatch(classifier_id):
        return float("inf")
    stamp = int(classifier_id[4:12], 36)
    return (int(time.time() * 1000) - stamp) % 36**8 / 1000


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


@dataclass(frozen=True)
class Versioned:
    """A record as read, with the version tag a conditional write must name."""

    record: ClassifierRecord
    tag: str


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

    # ------------------------------------------------------------ records

    def create_record(self, record: ClassifierRecord) -> str:
        """Writes a new record (its id must be unused); returns its version tag."""
        if record.in_flight:
            self.blobs.put(f"active/{record.id}", b"")
        return self.blobs.put_if(self._key(record.id, "record.json"), record.to_json(), None)

    def save_record(self, record: ClassifierRecord, tag: str) -> str:
        """Replaces the record if it is still at version `tag`; returns the new tag.

        Raises:
            PreconditionFailed: someone else wrote it since `tag` was read.
            NotFound: the classifier was deleted (what this call wrote is removed again).
        """
        key = self._key(record.id, "record.json")
        if record.in_flight:
            self.blobs.put(f"active/{record.id}", b"")
        try:
            new_tag = self.blobs.put_if(key, record.to_json(), tag)
        except (PreconditionFailed, KeyError):
            if self.is_deleted(record.id) or not self.exists(record.id):
                self.blobs.delete(f"active/{record.id}")  # what this call wrote first
                raise NotFound(f"classifier {record.id} was deleted") from None
            raise PreconditionFailed(key) from None
        if self.is_deleted(record.id):
            self.purge(record.id)
            raise NotFound(f"classifier {record.id} was deleted")
        if not record.in_flight:
            self.blobs.delete(f"active/{record.id}")
        return new_tag

    def load_record(self, classifier_id: str) -> ClassifierRecord:
        return ClassifierRecord.model_validate_json(self._get(classifier_id, "record.json"))

    def load_versioned(self, classifier_id: str) -> Versioned:
        try:
            data, tag = self.blobs.get_versioned(self._key(classifier_id, "record.json"))
        except KeyError:
            raise NotFound(f"no classifier {classifier_id!r}") from None
        return Versioned(ClassifierRecord.model_validate_json(data), tag)

    def exists(self, classifier_id: str) -> bool:
        return self.blobs.exists(self._key(classifier_id, "record.json"))

    def is_deleted(self, classifier_id: str) -> bool:
        return self.blobs.exists(f"deleted/{classifier_id}")

    def classifier_ids(self) -> list[str]:
        """Every classifier's id, newest first (ids are time-ordered). One listing, no reads."""
        ids = {key.split("/")[1] for key in self.blobs.list("classifiers")
               if key.endswith("/record.json") and key.count("/") == 2}
        return sorted((i for i in ids if _ID_PATTERN.fullmatch(i)), reverse=True)

    def list_page(self, limit: int, cursor: str | None = None
                  ) -> tuple[list[ClassifierRecord], str | None]:
        """Up to `limit` records, newest first, after the id `cursor`; and the next cursor."""
        ids = [i for i in self.classifier_ids() if cursor is None or i < cursor]
        records = []
        for classifier_id in ids:
            if len(records) == limit:
                break
            try:
                records.append(self.load_record(classifier_id))
            except NotFound:  # deleted while listing
                continue
        more = len(records) == limit and any(i < records[-1].id for i in ids)
        return records, (records[-1].id if more else None)

    def list_records(self) -> list[ClassifierRecord]:
        """Every classifier, newest first: one read per classifier (tests and tools)."""
        return self.list_page(limit=len(self.classifier_ids()) or 1)[0]

    def active_ids(self) -> list[str]:
        """Classifiers whose job may be queued, training or refining, from the index: one
        listing."""
        return sorted((key.split("/", 1)[1] for key in self.blobs.list("active")), reverse=True)

    def drop_from_active(self, classifier_id: str) -> None:
        """Removes a stale index entry (its job ended but the entry outlived it)."""
        self.blobs.delete(f"active/{classifier_id}")

    # ------------------------------------------------------------ artefacts

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

    def load_features(self, classifier_id: str) -> tuple[bytes, str] | None:
        """The feature cache object (`storage.features`) as (data, version tag), or None."""
        try:
            return self.blobs.get_versioned(self._key(classifier_id, "features.npz"))
        except KeyError:
            return None

    def save_features(self, classifier_id: str, data: bytes, tag: str | None) -> str:
        """Compare-and-set of the feature cache object (`tag` None: only if there is none);
        returns the new tag. A classifier deleted meanwhile is purged again.

        Raises:
            PreconditionFailed: another run wrote it since `tag` was read.
            NotFound: the classifier was deleted.
        """
        key = self._key(classifier_id, "features.npz")
        try:
            new_tag = self.blobs.put_if(key, data, tag)
        except KeyError:  # removed since `tag` was read
            raise PreconditionFailed(key) from None
        if self.is_deleted(classifier_id):
            self.purge(classifier_id)
            raise NotFound(f"classifier {classifier_id} was deleted")
        return new_tag

    def save_report(self, classifier_id: str, run: str, report: bytes) -> None:
        """A report is a JSON document; its schema belongs to the API (`schemas.Report`)."""
        self.blobs.put(self._key(classifier_id, f"reports/{run}.json"), report)

    def load_report(self, record: ClassifierRecord) -> bytes:
        return self._get(record.id, f"reports/{record.run}.json")

    def delete_run(self, classifier_id: str, run: str) -> None:
        """Removes a run's head and report (a run that lost the race to commit)."""
        self.blobs.delete(self._key(classifier_id, f"heads/{run}.npz"))
        self.blobs.delete(self._key(classifier_id, f"reports/{run}.json"))

    # ------------------------------------------------------------ exports

    def _export_key(self, classifier_id: str, run: str, export_format: str, suffix: str) -> str:
        if not (_NAME_PATTERN.fullmatch(run) and _NAME_PATTERN.fullmatch(export_format)):
            raise ValueError(f"not a run and format: {run!r}, {export_format!r}")
        return self._key(classifier_id, f"exports/{run}/{export_format}{suffix}")

    def save_export(self, classifier_id: str, run: str, export_format: str,
                    archive: IO[bytes]) -> None:
        """Stores an export zip; a classifier deleted meanwhile is purged again.

        Raises:
            NotFound: the classifier was deleted.
        """
        self.blobs.put_file(self._export_key(classifier_id, run, export_format, ".zip"), archive)
        if self.is_deleted(classifier_id):
            self.purge(classifier_id)
            raise NotFound(f"classifier {classifier_id} was deleted")

    def load_export(self, classifier_id: str, run: str, export_format: str,
                    target: IO[bytes]) -> bool:
        """Copies a stored export zip into `target`; False when there is none."""
        try:
            self.blobs.get_file(self._export_key(classifier_id, run, export_format, ".zip"),
                                target)
        except KeyError:
            return False
        return True

    def has_export(self, classifier_id: str, run: str, export_format: str) -> bool:
        return self.blobs.exists(self._export_key(classifier_id, run, export_format, ".zip"))

    def load_export_build(self, classifier_id: str, run: str,
                          export_format: str) -> tuple[bytes, str] | None:
        """An export's build state as (data, version tag), or None."""
        try:
            return self.blobs.get_versioned(
                self._export_key(classifier_id, run, export_format, ".json"))
        except KeyError:
            return None

    def save_export_build(self, classifier_id: str, run: str, export_format: str,
                          data: bytes, tag: str | None) -> str:
        """Compare-and-set of an export's build state (`tag` None: only if there is none).

        Raises:
            PreconditionFailed: another process wrote it first.
        """
        key = self._export_key(classifier_id, run, export_format, ".json")
        try:
            return self.blobs.put_if(key, data, tag)
        except KeyError:  # it was removed since `tag` was read: someone else finished
            raise PreconditionFailed(key) from None

    def delete_export_build(self, classifier_id: str, run: str, export_format: str) -> None:
        self.blobs.delete(self._export_key(classifier_id, run, export_format, ".json"))

    def delete(self, classifier_id: str) -> None:
        """Tombstone first, then everything under the classifier's prefix."""
        self._key(classifier_id, "")  # validates the id before anything is written
        self.blobs.put(f"deleted/{classifier_id}", b"")
        self.purge(classifier_id)

    def purge(self, classifier_id: str) -> None:
        """Removes whatever is under a deleted classifier's prefix (again: a writer that was
        still working when it was deleted calls this after its last write)."""
        # The record goes first, so a reader never sees a record whose artefacts are half gone.
        self.blobs.delete(self._key(classifier_id, "record.json"))
        self.blobs.delete_prefix(f"classifiers/{classifier_id}")
        self.blobs.delete(f"active/{classifier_id}")

    def ping(self) -> None:
        self.blobs.ping()
