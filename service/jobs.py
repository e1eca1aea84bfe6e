"""Use cases: what the API and the training workers do. Routes call exactly one of these.

Every function takes a `Services` (the composition root's wiring) and ids or validated inputs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import numpy as np

from models import training
from models.augmentation import Augmentation
from models.backbone import device_name
from models.heads import AUTO_CANDIDATES, HeadSpec, serialize_weights
from models.prediction import class_scores, rank
from models.preprocessing import ImageDecodeError, load_image
from service.datasets import Dataset, DatasetLimits, read_dataset_zip
from service.errors import BadRequest, Conflict, NotFound, Unprocessable
from service.schemas import (ACTIVE_STATUSES, BackboneOut, Classifier, ClassifierRecord,
                             DatasetSummary, ErrorOut, HeadOptions, LabelScore, Lease,
                             MetricsOut, Prediction, PredictionResponse, ProgressOut, Report,
                             TrainingOptions, utc_now)
from service.store import new_classifier_id

if TYPE_CHECKING:
    from service.metrics import Metrics
    from service.runner import TrainingRunner
    from service.serving import BackboneHolder, HeadCache
    from service.settings import Settings
    from service.store import ClassifierStore

log = logging.getLogger(__name__)

#: Progress is written to the store at most this often (plus at every stage change).
PROGRESS_INTERVAL_S = 1.0


@dataclass
class Services:
    """What the use cases need, built once by the composition root (`service.app`)."""

    settings: Settings
    store: ClassifierStore
    backbone: BackboneHolder
    heads: HeadCache
    runner: TrainingRunner
    metrics: Metrics

    @property
    def dataset_limits(self) -> DatasetLimits:
        s = self.settings
        return DatasetLimits(max_members=s.max_dataset_members,
                             max_uncompressed_bytes=s.max_dataset_bytes,
                             max_image_bytes=s.max_image_bytes,
                             max_image_pixels=s.max_image_pixels)


# ---------------------------------------------------------------- create, read, delete


def create_classifier(services: Services, dataset_file: IO[bytes],
                      options: TrainingOptions) -> Classifier:
    """Validates a dataset zip, stores it, and queues its training job.

    Nothing is stored unless the whole dataset is accepted.
    """
    backbone = services.backbone.identity()  # 503 while the backbone is not loaded
    dataset = read_dataset_zip(dataset_file, services.dataset_limits)
    now = utc_now()
    record = ClassifierRecord(
        id=new_classifier_id(), name=options.name or _default_name(dataset), status="queued",
        labels=dataset.labels, created_at=now, updated_at=now,
        dataset=DatasetSummary(images=len(dataset.images), per_label=dataset.per_label(),
                               skipped=[vars(skip) for skip in dataset.skipped]),
        progress=ProgressOut(stage="queued"), backbone=BackboneOut(**backbone.as_dict()),
        options=options)
    services.store.save_dataset(record.id, dataset.to_archive())
    services.store.save_record(record)
    services.runner.submit(record.id)
    services.metrics.job_event("queued")
    log.info("classifier %s created: %d images, labels %s", record.id, len(dataset.images),
             dataset.labels)
    return record.public()


def _default_name(dataset: Dataset) -> str:
    return "-vs-".join(dataset.labels) if len(dataset.labels) <= 3 else \
        f"{dataset.labels[0]}-and-{len(dataset.labels) - 1}-more"


def list_classifiers(services: Services) -> list[Classifier]:
    return [record.public() for record in services.store.list_records()]


def get_classifier(services: Services, classifier_id: str) -> Classifier:
    return services.store.load_record(classifier_id).public()


def get_report(services: Services, classifier_id: str) -> Report:
    record = services.store.load_record(classifier_id)
    if record.status != "ready":
        raise Conflict(f"classifier {classifier_id} is {record.status}; the report exists once "
                       "training has finished")
    return services.store.load_report(classifier_id)


def delete_classifier(services: Services, classifier_id: str) -> None:
    """Cancels a running job (waiting briefly for it to stop), then deletes everything."""
    record = services.store.load_record(classifier_id)
    if record.status in ACTIVE_STATUSES:
        services.runner.cancel(classifier_id)
    services.store.delete(classifier_id)
    services.heads.forget(classifier_id)
    log.info("classifier %s deleted", classifier_id)


# ---------------------------------------------------------------- predict


def decode_base64_images(encoded: list[str]) -> list[bytes]:
    """Decodes JSON `b64` instances; a bad one is a 400 naming its index."""
    images = []
    for index, text in enumerate(encoded):
        try:
            images.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"instances[{index}].b64 is not valid base64",
                             errors=[{"field": f"instances.{index}.b64",
                                      "message": "not valid base64"}]) from None
    return images


def predict(services: Services, classifier_id: str, images: list[bytes],
            top_k: int) -> PredictionResponse:
    """Labels and softmax scores for each image, in request order."""
    if not images:
        raise BadRequest("send at least one image: multipart parts named 'image', or JSON "
                         '{"instances": [{"b64": "..."}]}')
    if len(images) > services.settings.max_predict_images:
        raise BadRequest(f"{len(images)} images in one request; the limit is "
                         f"{services.settings.max_predict_images}")
    record = services.store.load_record(classifier_id)
    if record.status != "ready":
        raise Conflict(f"classifier {classifier_id} is {record.status}, not ready")
    backbone = services.backbone.get()
    pixels = np.stack([_decode_for_prediction(data, index, backbone.image_size,
                                              services.settings.max_image_pixels)
                       for index, data in enumerate(images)])
    head = services.heads.get(record)
    scores = class_scores(backbone, head, pixels)
    services.metrics.predictions(len(images))
    ranked = rank(scores, record.labels, min(top_k, len(record.labels)))
    return PredictionResponse(classifier_id=classifier_id, predictions=[
        Prediction(label=pairs[0][0], score=pairs[0][1],
                   top_k=[LabelScore(label=label, score=score) for label, score in pairs])
        for pairs in ranked])


def _decode_for_prediction(data: bytes, index: int, size: int, max_pixels: int) -> np.ndarray:
    try:
        return load_image(data, size, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise Unprocessable(f"image {index}: {error.reason}",
                            errors=[{"field": f"image.{index}", "message": error.reason}]) from None


# ---------------------------------------------------------------- training jobs


def training_config(options: TrainingOptions) -> training.TrainingConfig:
    """Maps the public options onto the ML code's config."""
    heads = AUTO_CANDIDATES if options.head == "auto" else (HeadSpec(**options.head.model_dump()),)
    return training.TrainingConfig(
        validation_split=options.validation_split, max_epochs=options.max_epochs,
        patience=options.patience, learning_rate=options.learning_rate,
        batch_size=options.batch_size, seed=options.seed,
        augmentation=Augmentation(**options.augmentation.model_dump()), heads=heads)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class _ProgressWriter:
    """Writes progress and the lease heartbeat to the record, throttled; notices deletion."""

    def __init__(self, services: Services, record: ClassifierRecord, owner: str,
                 should_stop: Callable[[], bool]):
        self.services, self.record, self.owner = services, record, owner
        self.should_stop = should_stop
        self._last_write = 0.0
        self._last_stage = None

    def stopped(self) -> bool:
        return self.should_stop()

    def __call__(self, progress: training.Progress) -> None:
        now = time.monotonic()
        if progress.stage == self._last_stage and now - self._last_write < PROGRESS_INTERVAL_S:
            return
        if self.should_stop() or not self.services.store.exists(self.record.id):
            raise training.Cancelled()
        self._last_write, self._last_stage = now, progress.stage
        self.record.progress = ProgressOut(**vars(progress))
        self.record.lease = Lease(owner=self.owner, heartbeat_at=utc_now())
        self.record.updated_at = utc_now()
        self.services.store.save_record(self.record)


def run_training_job(services: Services, classifier_id: str,
                     should_stop: Callable[[], bool] = lambda: False) -> None:
    """Trains one classifier. Idempotent: a job that is not queued/training is left alone.

    A failure is recorded in the classifier (status failed, error with the reason), then
    re-raised for the runner to log.
    """
    store = services.store
    try:
        record = store.load_record(classifier_id)
    except NotFound:
        log.info("job %s: classifier was deleted, nothing to do", classifier_id)
        return
    if record.status not in ACTIVE_STATUSES:
        log.info("job %s: classifier is %s, nothing to do", classifier_id, record.status)
        return
    owner = worker_identity()
    record.status, record.attempts = "training", record.attempts + 1
    record.lease = Lease(owner=owner, heartbeat_at=utc_now())
    record.progress, record.updated_at = ProgressOut(stage="extracting"), utc_now()
    store.save_record(record)
    services.metrics.job_event("training")
    started = time.monotonic()
    writer = _ProgressWriter(services, record, owner, should_stop)
    try:
        dataset = Dataset.from_archive(store.load_dataset(classifier_id))
        backbone = services.backbone.get(wait=True)
        label_index = {label: i for i, label in enumerate(record.labels)}
        result = training.train_classifier(
            [image.data for image in dataset.images],
            np.array([label_index[image.label] for image in dataset.images]),
            record.labels, backbone, training_config(record.options),
            on_progress=writer, should_stop=writer.stopped)
    except training.Cancelled:
        log.info("job %s: cancelled", classifier_id)
        services.metrics.job_event("cancelled")
        return
    except Exception as error:
        _record_failure(services, record, "Training failed", _failure_detail(error))
        services.metrics.job_event("failed")
        raise
    if not store.exists(classifier_id):  # deleted during the last epoch
        return
    store.save_head(classifier_id, serialize_weights(result.head))
    report = Report(classifier_id=classifier_id, options=record.options,
                    backbone=record.backbone, device=device_name(), **result.report)
    store.save_report(report)
    record.status, record.progress, record.lease = "ready", None, None
    record.head = HeadOptions(**result.spec.as_dict())
    record.metrics = MetricsOut(val_accuracy=report.validation.accuracy,
                                val_loss=report.validation.loss)
    record.updated_at = utc_now()
    store.save_record(record)  # last: the record says ready only once head and report exist
    services.metrics.job_event("ready", time.monotonic() - started)
    log.info("job %s: ready, validation accuracy %.3f", classifier_id, report.validation.accuracy)


def _failure_detail(error: Exception) -> str:
    if isinstance(error, (ValueError, ImageDecodeError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _record_failure(services: Services, record: ClassifierRecord, title: str, detail: str) -> None:
    if not services.store.exists(record.id):
        return
    record.status, record.progress, record.lease = "failed", None, None
    record.error = ErrorOut(title=title, detail=detail)
    record.updated_at = utc_now()
    services.store.save_record(record)
    log.error("job %s: %s: %s", record.id, title, detail)


def recover_jobs(services: Services) -> None:
    """On start of the in-process runner: re-queue what a previous process left queued or
    training (it is gone: nothing else runs these jobs), or fail a job that keeps dying."""
    for record in services.store.list_records():
        if record.status not in ACTIVE_STATUSES:
            continue
        if record.attempts >= services.settings.max_attempts:
            _record_failure(services, record, "Training was interrupted",
                            f"training stopped {record.attempts} times without finishing "
                            "(the process was killed or ran out of memory); create the "
                            "classifier again, perhaps with fewer images or views")
            continue
        record.status, record.progress, record.lease = "queued", ProgressOut(stage="queued"), None
        record.updated_at = utc_now()
        services.store.save_record(record)
        services.runner.submit(record.id)
        log.warning("job %s: re-queued after an interrupted run", record.id)
