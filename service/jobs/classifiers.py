"""Create, read and delete classifiers."""

from __future__ import annotations

import json
import logging
import tempfile
from typing import IO

from models.options import TrainingOptions
from service.errors import Conflict, Unprocessable
from service.jobs.datasets import read_dataset_zip
from service.jobs.services import Services
from service.storage.archive import Dataset
from service.storage.classifiers import new_classifier_id
from service.storage.records import Backbone, ClassifierRecord, DatasetInfo, Progress, utc_now

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
    _check_feature_budget(services, len(dataset.images), options, backbone.feature_dim)
    now = utc_now()
    record = ClassifierRecord(
        id=new_classifier_id(), name=options.name or _default_name(dataset), status="queued",
        labels=dataset.labels, created_at=now, updated_at=now,
        dataset=DatasetInfo(images=len(dataset.images), per_label=dataset.per_label(),
                            skipped=[{"path": _shown(skip.path), "reason": skip.reason}
                                     for skip in dataset.skipped[:MAX_SKIPPED_LISTED]],
                            skipped_total=len(dataset.skipped)),
        progress=Progress(stage="queued"), backbone=Backbone(**backbone.identity.as_dict()),
        options=options)
    # NB: the archive is spooled to disk past a few MiB, so a big dataset is in memory only once.
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as archive:
        dataset.write_archive(archive)
        archive.seek(0)
        services.store.save_dataset(record.id, archive)
    try:
        services.store.create_record(record)
        services.runner.submit(record.id)
    except BaseException:
        services.store.delete(record.id)  # a failed request leaves nothing behind
        raise
    services.metrics.job_event("queued")
    log.info("classifier %s created: %d images, labels %s", record.id, len(dataset.images),
             dataset.labels)
    return record


def _check_feature_budget(services: Services, images: int, options: TrainingOptions,
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
                     ) -> tuple[list[ClassifierRecord], str | None]:
    """A page of classifiers, newest first, and the cursor of the next page (or None)."""
    return services.store.list_page(limit, cursor)


def get_classifier(services: Services, classifier_id: str) -> ClassifierRecord:
    return services.store.load_record(classifier_id)


def get_report(services: Services, classifier_id: str) -> dict:
    """The served head's training report, as stored with its head, plus what only the record
    knows when it is read: "final" (no better stage can replace it: the run has ended) and
    "stages" (every stage run so far)."""
    record = services.store.load_record(classifier_id)
    if record.status != "ready":
        raise Conflict(f"classifier {classifier_id} is {record.status}; the report exists once "
                       "training has finished")
    report = json.loads(services.store.load_report(record))
    report["final"] = not record.refining
    report["stages"] = record.stages
    return report


def delete_classifier(services: Services, classifier_id: str) -> None:
    """Cancels a running job (waiting briefly for it to stop), then deletes everything."""
    record = services.store.load_record(classifier_id)
    if record.in_flight:
        services.runner.cancel(classifier_id)
    services.store.delete(classifier_id)
    services.heads.forget(classifier_id)
    log.info("classifier %s deleted", classifier_id)
