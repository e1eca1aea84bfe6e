"""Create, read and delete classifiers. A classifier shows its production version's record
(`service.jobs.versions` makes the others)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from typing import IO

from models.options import TrainingOptions
from service.errors import Conflict, NotFound, Unprocessable
from service.jobs.datasets import read_dataset_zip
from service.jobs.services import Services
from service.storage.archive import Dataset
from service.storage.classifiers import job_id, new_classifier_id
from service.storage.records import (ACTIVE_STATUSES, Backbone, ClassifierRecord,
                                     ClassifierVersions, DatasetInfo, Progress, utc_now)

log = logging.getLogger(__name__)

#: Datasets bigger than this are spooled to a temporary file on their way to the store.
_SPOOL_BYTES = 16 * 1024**2
#: Training holds the feature array twice (numpy, and the tensor the head trains on).
_FEATURE_COPIES = 2
#: The record lists this many skipped files (and counts them all): it is rewritten on every
#: progress write, so a zip of thousands of junk names must not make it megabytes.
MAX_SKIPPED_LISTED = 100
#: A skipped file's path is shown up to this many characters.
_MAX_SHOWN_PATH = 300


def create_classifier(services: Services, dataset_file: IO[bytes],
                      options: TrainingOptions) -> ClassifierRecord:
    """Validates a dataset zip, stores it, and queues its training job.

    Nothing is left in the store unless the whole dataset is accepted and the job queued.
    """
    backbone = services.backbone.get()  # 503 while the backbone is not loaded
    dataset = read_dataset_zip(dataset_file, services.dataset_limits)
    check_feature_budget(services, len(dataset.images), options, backbone.feature_dim)
    now = utc_now()
    record = ClassifierRecord(
        id=new_classifier_id(), name=options.name or _default_name(dataset), status="queued",
        labels=dataset.labels, created_at=now, updated_at=now, dataset=dataset_info(dataset),
        progress=Progress(stage="queued"), backbone=Backbone(**backbone.identity.as_dict()),
        options=options)
    # NB: a failed request leaves nothing behind
    store_and_queue(services, record, dataset, undo=lambda: services.store.delete(record.id))
    log.info("classifier %s created: %d images, labels %s", record.id, len(dataset.images),
             dataset.labels)
    return record


def dataset_info(dataset: Dataset) -> DatasetInfo:
    """What a record keeps of its dataset: counts, and the first skipped files."""
    return DatasetInfo(images=len(dataset.images), per_label=dataset.per_label(),
                       skipped=[{"path": _shown(skip.path), "reason": skip.reason}
                                for skip in dataset.skipped[:MAX_SKIPPED_LISTED]],
                       skipped_total=len(dataset.skipped))


def store_and_queue(services: Services, record: ClassifierRecord, dataset: Dataset,
                    undo: Callable[[], None]) -> None:
    """Stores the dataset of a queued record, then the record, then queues its job; `undo`
    removes what was stored if any step fails."""
    # NB: the archive is spooled to disk past a few MiB, so a big dataset is in memory only once.
    try:
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as archive:
            dataset.write_archive(archive)
            archive.seek(0)
            services.store.save_dataset(record.id, archive, record.version)
        services.store.create_record(record)
        services.runner.submit(job_id(record.id, record.version))
    except BaseException:
        undo()
        raise
    services.metrics.job_event("queued")


def check_feature_budget(services: Services, images: int, options: TrainingOptions,
                          feature_dim: int) -> None:
    """Training caches images × views × feature_dim float32 values in memory: refuse a dataset
    and options that would exceed `HEADSTART_MAX_FEATURE_BYTES` before storing anything."""
    limit = services.settings.max_feature_bytes
    needed = images * (options.augmentation.views + 1) * feature_dim * 4 * _FEATURE_COPIES
    if needed > limit:
        most_views = limit // (images * feature_dim * 4 * _FEATURE_COPIES) - 1
        raise Unprocessable(
            f"{images} images with {options.augmentation.views} augmented views need "
            f"{_size(needed)} of features in training; the limit is "
            f"{_size(limit)} (HEADSTART_MAX_FEATURE_BYTES): use fewer images"
            + (f" or at most {most_views} views" if most_views >= 0 else ""),
            errors=[{"field": "options.augmentation.views", "message": "feature memory budget"}])


def _size(count: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _shown(path: str) -> str:
    """A path as the record shows it: whole, or its start and end around an ellipsis."""
    if len(path) <= _MAX_SHOWN_PATH:
        return path
    half = _MAX_SHOWN_PATH // 2
    return f"{path[:half]}…{path[-half:]}"


def _default_name(dataset: Dataset) -> str:
    return "-vs-".join(dataset.labels) if len(dataset.labels) <= 3 else \
        f"{dataset.labels[0]}-and-{len(dataset.labels) - 1}-more"


def list_classifiers(services: Services, limit: int, cursor: str | None
                     ) -> tuple[list[tuple[ClassifierRecord, ClassifierVersions]], str | None]:
    """A page of classifiers, newest first, as (production's record, versions and aliases),
    and the cursor of the next page (or None)."""
    records, next_cursor = services.store.list_page(limit, cursor)
    views = []
    for first in records:
        try:
            views.append(_view(services, first))
        except NotFound:  # deleted while listing
            continue
    return views, next_cursor


def get_classifier(services: Services, classifier_id: str) -> ClassifierRecord:
    """The record of the version `production` names: what the classifier resource shows."""
    return get_view(services, classifier_id)[0]


def get_view(services: Services, classifier_id: str
             ) -> tuple[ClassifierRecord, ClassifierVersions]:
    """Production's record and the classifier's versions and aliases."""
    return _view(services, services.store.load_record(classifier_id))


def _view(services: Services, first: ClassifierRecord
          ) -> tuple[ClassifierRecord, ClassifierVersions]:
    versions = services.store.load_versions(first.id)[0]
    if versions.production == first.version:
        return first, versions
    record = services.store.load_record(first.id, versions.production)
    # NB: the classifier was created with its first version, whichever serves now
    return record.model_copy(update={"created_at": first.created_at}), versions


def get_report(services: Services, classifier_id: str) -> dict:
    """The served head's training report, as stored with its head, plus what only the record
    knows when it is read: "final" (no better stage can replace it: the run has ended) and
    "stages" (every stage run so far)."""
    record = get_classifier(services, classifier_id)
    if record.status != "ready":
        raise Conflict(f"classifier {classifier_id} is {record.status}; the report exists once "
                       "its first head is served (status ready), soon after one backbone pass "
                       "over its images")
    report = json.loads(services.store.load_report(record))
    report["final"] = not record.refining
    report["stages"] = record.stages
    return report


def delete_classifier(services: Services, classifier_id: str) -> None:
    """Cancels running jobs of every version (waiting briefly for each to stop), then deletes
    everything."""
    store = services.store
    store.load_record(classifier_id)  # 404 for an unknown classifier
    for version in store.load_versions(classifier_id)[0].versions:
        try:
            record = store.load_record(classifier_id, version)
        except NotFound:
            continue
        if record.in_flight:
            services.runner.cancel(job_id(classifier_id, version))
    store.delete(classifier_id)
    services.heads.forget(classifier_id)
    log.info("classifier %s deleted", classifier_id)
