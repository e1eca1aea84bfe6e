"""The one place that knows the store's key layout:

    classifiers/{id}/record.json         version 1's record (`records.ClassifierRecord`)
    classifiers/{id}/dataset.zip         version 1's images, in Headstart's own archive format
    classifiers/{id}/versions/{n}/record.json   version n's record (n ≥ 2), same format
    classifiers/{id}/versions/{n}/dataset.zip   version n's images (all of them, not a delta)
    classifiers/{id}/versions.json       versions and aliases (`records.ClassifierVersions`);
                                         absent: one version, 1, which is production
    classifiers/{id}/heads/{run}.npz     a training run's head weights (architecture rebuilt from code)
    classifiers/{id}/reports/{run}.json  that run's training report
    classifiers/{id}/features.npz        the feature cache: backbone features by (image, view) key
    classifiers/{id}/exports/{run}/{format}.zip   an export of that run (a cache: rebuilt if lost)
    classifiers/{id}/exports/{run}/{format}.json  its build while there is no zip (jobs/export.py)
    active/{job}                         index: the job is queued, training or refining; a job
                                         id is the classifier id (version 1) or `{id}.v{n}`
    deleted/{id}                         tombstone: the classifier was deleted

Records change only by compare-and-set on their version tag (`save_record(record, tag)`), so of
two writers that read the same version exactly one wins; the other gets `PreconditionFailed` and
must read again. Heads and reports are keyed by run and the record names the current run, so a
result is visible only once the record that names it is written. The tombstone stops a writer
that is still working from bringing a deleted classifier back: every record write checks it.
The `active/` index lets sweeps and metrics read only the jobs in flight, not every record.
Version 1 keeps the keys classifiers had before versions, so their records load unchanged; run
ids are unique within a classifier, so heads and reports of every version share one folder.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import IO

from service.errors import NotFound
from service.storage.blobs import BlobStore, PreconditionFailed
from service.storage.records import ClassifierRecord, ClassifierVersions

_ID_PATTERN = re.compile(r"clf_[0-9a-z]{20}")  # NB: fullmatch; "$" would let "\n" through
#: What a run id or an export format may be, before either becomes part of a key.
_NAME_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,64}")
_JOB_PATTERN = re.compile(r"(clf_[0-9a-z]{20})(?:\.v([1-9][0-9]{0,8}))?")

__all__ = ["ClassifierStore", "PreconditionFailed", "Versioned", "classifier_age_s", "job_id",
           "new_classifier_id", "parse_job_id"]


def new_classifier_id() -> str:
    """Server-generated, time-ordered, unguessable: 'clf_' + 8 time digits + 12 random, base36."""
    stamp = _base36(int(time.time() * 1000)).rjust(9, "0")[-8:]
    return "clf_" + stamp + _base36(secrets.randbits(62)).rjust(12, "0")[-12:]


def job_id(classifier_id: str, version: int = 1) -> str:
    """The id of a version's training job: what the queue carries and the `active/` index holds.
    Version 1's is the classifier id, as it was before versions (messages in flight still work)."""
    return classifier_id if version == 1 else f"{classifier_id}.v{version}"


def parse_job_id(job: str) -> tuple[str, int]:
    """(classifier id, version) of a job id; a string that is no job id gives itself and 1 (the
    store then answers NotFound for it, as for any unknown classifier)."""
    match = _JOB_PATTERN.fullmatch(job)
    if match is None:
        return job, 1
    return match.group(1), int(match.group(2) or 1)


def classifier_age_s(classifier_id: str) -> float:
    """Seconds since the id was generated, from its time digits (they wrap every 89 years);
    infinite for a string that is no classifier id."""
    if not _ID_PATTERN.fullmatch(classifier_id):
        return float("inf")
    stamp = int(classifier_id[4:12], 36)
    return (int(time.time() * 1000) - stamp) % 36**8 / 1000


def _version_folder(version: int) -> str:
    """Where a version's record and dataset live, relative to the classifier's prefix."""
    if not isinstance(version, int) or version < 1:
        raise NotFound(f"no version {version!r}")
    return "" if version == 1 else f"versions/{version}/"


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

    def _record_key(self, classifier_id: str, version: int) -> str:
        return self._key(classifier_id, _version_folder(version) + "record.json")

    @staticmethod
    def _active_key(record: ClassifierRecord) -> str:
        return f"active/{job_id(record.id, record.version)}"

    def create_record(self, record: ClassifierRecord) -> str:
        """Writes a new record (its id and version must be unused); returns its version tag."""
        if record.in_flight:
            self.blobs.put(self._active_key(record), b"")
        return self.blobs.put_if(self._record_key(record.id, record.version), record.to_json(),
                                 None)

    def save_record(self, record: ClassifierRecord, tag: str) -> str:
        """Replaces the record (of its version) if it is still at version tag `tag`; returns
        the new tag.

        Raises:
            PreconditionFailed: someone else wrote it since `tag` was read.
            NotFound: the classifier (or this version) was deleted (what this call wrote is
                removed again).
        """
        key, active = self._record_key(record.id, record.version), self._active_key(record)
        if record.in_flight:
            self.blobs.put(active, b"")
        try:
            new_tag = self.blobs.put_if(key, record.to_json(), tag)
        except (PreconditionFailed, KeyError):
            if self.is_deleted(record.id) or not self.exists(record.id, record.version):
                self.blobs.delete(active)  # what this call wrote first
                raise NotFound(f"classifier {record.id} was deleted") from None
            raise PreconditionFailed(key) from None
        if self.is_deleted(record.id):
            self.purge(record.id)
            raise NotFound(f"classifier {record.id} was deleted")
        if not record.in_flight:
            self.blobs.delete(active)
        return new_tag

    def load_record(self, classifier_id: str, version: int = 1) -> ClassifierRecord:
        return self.load_versioned(classifier_id, version).record

    def load_versioned(self, classifier_id: str, version: int = 1) -> Versioned:
        try:
            data, tag = self.blobs.get_versioned(self._record_key(classifier_id, version))
        except KeyError:
            raise NotFound(f"no classifier {classifier_id!r}"
                           + (f" version {version}" if version != 1 else "")) from None
        record = ClassifierRecord.model_validate_json(data)
        return Versioned(record.model_copy(update={"version": version}), tag)

    def load_job(self, job: str) -> Versioned:
        """The record a job id names, with its tag."""
        return self.load_versioned(*parse_job_id(job))

    def exists(self, classifier_id: str, version: int = 1) -> bool:
        return self.blobs.exists(self._record_key(classifier_id, version))

    def is_deleted(self, classifier_id: str) -> bool:
        return self.blobs.exists(f"deleted/{classifier_id}")

    # ------------------------------------------------------------ versions and aliases

    def load_versions(self, classifier_id: str) -> tuple[ClassifierVersions, str | None]:
        """The classifier's versions and aliases, with the tag a conditional write names (None:
        never written, the classifier has only version 1)."""
        try:
            data, tag = self.blobs.get_versioned(self._key(classifier_id, "versions.json"))
        except KeyError:
            return ClassifierVersions(), None
        return ClassifierVersions.model_validate_json(data), tag

    def save_versions(self, classifier_id: str, versions: ClassifierVersions,
                      tag: str | None) -> str:
        """Compare-and-set of the versions and aliases (`tag` None: only if never written).

        Raises:
            PreconditionFailed: someone else wrote them since `tag` was read.
            NotFound: the classifier was deleted.
        """
        key = self._key(classifier_id, "versions.json")
        if self.is_deleted(classifier_id) or not self.exists(classifier_id):
            raise NotFound(f"no classifier {classifier_id!r}")
        try:
            new_tag = self.blobs.put_if(key, versions.model_dump_json().encode(), tag)
        except KeyError:  # removed since `tag` was read: the classifier is being deleted
            raise PreconditionFailed(key) from None
        if self.is_deleted(classifier_id):
            self.purge(classifier_id)
            raise NotFound(f"classifier {classifier_id} was deleted")
        return new_tag

    def delete_version(self, record: ClassifierRecord) -> None:
        """Removes a version's images, head, report and exports, and its record; version 1's
        record stays, bare, as the classifier's own (its id and name): `versions.json` no
        longer lists it."""
        if record.run:
            self.delete_run(record.id, record.run)
            self.blobs.delete_prefix(self._key(record.id, f"exports/{record.run}"))
        self.blobs.delete(self._key(record.id, _version_folder(record.version) + "dataset.zip"))
        if record.version != 1:
            self.blobs.delete_prefix(self._key(record.id, _version_folder(record.version)))

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
        """Jobs that may be queued, training or refining, from the index: one listing. Job ids: see
        `job_id`."""
        return sorted((key.split("/", 1)[1] for key in self.blobs.list("active")), reverse=True)

    def drop_from_active(self, job: str) -> None:
        """Removes a stale index entry (its job ended but the entry outlived it)."""
        self.blobs.delete(f"active/{job}")

    # ------------------------------------------------------------ artefacts

    def save_dataset(self, classifier_id: str, archive: IO[bytes], version: int = 1) -> None:
        self.blobs.put_file(self._key(classifier_id, _version_folder(version) + "dataset.zip"),
                            archive)

    def load_dataset(self, classifier_id: str, target: IO[bytes], version: int = 1) -> None:
        try:
            self.blobs.get_file(
                self._key(classifier_id, _version_folder(version) + "dataset.zip"), target)
        except KeyError:
            raise NotFound(f"no classifier {classifier_id!r} version {version}") from None

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
        for job in self.active_ids():
            if parse_job_id(job)[0] == classifier_id:
                self.blobs.delete(f"active/{job}")

    def ping(self) -> None:
        self.blobs.ping()
