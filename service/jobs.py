"""Use cases: what the API and the training workers do. Routes call exactly one of these.

Every function takes a `Services` (the composition root's wiring) and ids or validated inputs.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import numpy as np

from models import training
from models.augmentation import Augmentation
from models.backbone import device_name
from models.heads import AUTO_CANDIDATES, HeadSpec, serialize_weights
from models.prediction import apply_head, rank
from models.preprocessing import ImageDecodeError, load_image
from service.datasets import Dataset, DatasetLimits, read_dataset_zip
from service.errors import BadRequest, Conflict, NotFound, ServiceUnavailable, Unprocessable
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
#: Datasets bigger than this are spooled to a temporary file on their way to the store.
_SPOOL_BYTES = 16 * 1024**2


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
    # NB: the archive is spooled to disk past a few MiB, so a big dataset is in memory only once.
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as archive:
        dataset.write_archive(archive)
        archive.seek(0)
        services.store.save_dataset(record.id, archive)
    services.store.save_record(record)
    try:
        services.runner.submit(record.id)
    except ServiceUnavailable:
        services.store.delete(record.id)  # a failed request leaves nothing behind
        raise
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
    return services.store.load_report(record)


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
    size = services.backbone.get().image_size
    pixels = np.stack([_decode_for_prediction(data, index, size, services.settings.max_image_pixels)
                       for index, data in enumerate(images)])
    head = services.heads.get(record)
    scores = services.backbone.features(pixels, lambda features: apply_head(head, features))
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


def run_training_job(services: Services, classifier_id: str,
                     should_stop: Callable[[], bool] = lambda: False, *,
                     settle_s: float = 0.0) -> None:
    """Runs one delivery of a training job. Safe to call twice for the same job: a delivery that
    finds the job finished, deleted, or running under a live lease does nothing.

    Args:
        should_stop: polled between batches and epochs; True cancels the job.
        settle_s: after claiming the job, wait this long and check the claim held. Workers
            sharing a broker use it because S3 offers no compare-and-set; a second worker that
            claimed in the same instant then backs off.

    A failure is recorded in the classifier (status failed, error with the reason), then
    re-raised for the runner to log.
    """
    record = _claim(services, classifier_id, settle_s)
    if record is None:
        return
    run = _TrainingRun(services, record, should_stop)
    with run.heartbeat():
        try:
            run.commit(_train(services, run))
        except training.Cancelled:
            log.info("job %s: stopped: %s", classifier_id, run.stop_reason or "cancelled")
            services.metrics.job_event("cancelled")
            return
        except Exception as error:  # a failed commit too: never left training
            run.fail("Training failed", _failure_detail(error))
            services.metrics.job_event("failed")
            raise
    if run.stop_reason:
        log.info("job %s: result discarded: %s", classifier_id, run.stop_reason)
        return
    services.metrics.job_event("ready")
    log.info("job %s: ready, validation accuracy %.3f", classifier_id,
             run.record.metrics.val_accuracy)


def _claim(services: Services, classifier_id: str, settle_s: float) -> ClassifierRecord | None:
    """Takes the job's lease, or returns None when this delivery has nothing to do."""
    store, owner = services.store, worker_identity()
    try:
        record = store.load_record(classifier_id)
    except NotFound:
        log.info("job %s: classifier was deleted, nothing to do", classifier_id)
        return None
    if record.status not in ACTIVE_STATUSES:
        log.info("job %s: classifier is %s, nothing to do", classifier_id, record.status)
        return None
    if record.status == "training" and record.lease and \
            not record.lease.expired(services.settings.lease_seconds):
        log.info("job %s: already running on %s; duplicate delivery dropped", classifier_id,
                 record.lease.owner)
        return None
    if record.attempts >= services.settings.max_attempts:  # earlier runs died mid-job
        _fail_interrupted(services, record)
        return None
    record.status, record.attempts = "training", record.attempts + 1
    record.lease = Lease(owner=owner, heartbeat_at=utc_now())
    record.progress, record.updated_at = ProgressOut(stage="extracting"), utc_now()
    try:
        store.save_record(record)
        if settle_s:
            time.sleep(settle_s)
            current = store.load_record(classifier_id)
            if current.lease is None or current.lease.owner != owner:
                log.info("job %s: claimed by %s at the same time; backing off", classifier_id,
                         current.lease.owner if current.lease else "nobody")
                return None
    except NotFound:
        return None
    services.metrics.job_event("training")
    return record


def _train(services: Services, run: _TrainingRun) -> training.TrainingResult:
    record = run.record
    with tempfile.TemporaryFile() as archive:
        services.store.load_dataset(record.id, archive)
        archive.seek(0)
        dataset = Dataset.from_archive(archive)
    backbone = services.backbone.get(wait=True)
    _check_same_backbone(record, backbone.identity.as_dict())
    label_index = {label: i for i, label in enumerate(record.labels)}
    return training.train_classifier(
        [image.data for image in dataset.images],
        np.array([label_index[image.label] for image in dataset.images]),
        record.labels, backbone, training_config(record.options),
        on_progress=run.on_progress, should_stop=run.stopped)


def _check_same_backbone(record: ClassifierRecord, worker: dict) -> None:
    """A head is only valid on the backbone it was created for: API and workers must agree."""
    wanted = record.backbone
    if (wanted.weights, wanted.image_size, wanted.fingerprint) != \
            (worker["weights"], worker["image_size"], worker["fingerprint"]):
        raise ValueError(
            f"this worker's backbone ({worker['weights']}, {worker['image_size']} px, "
            f"fingerprint {worker['fingerprint']}) is not the one the classifier was created "
            f"with ({wanted.weights}, {wanted.image_size} px, fingerprint {wanted.fingerprint}); "
            "give workers and API the same HEADSTART_BACKBONE_WEIGHTS and HEADSTART_IMAGE_SIZE")


class _TrainingRun:
    """One worker's run of a job. Owns the record's lease: writes progress and heartbeats, and
    notices when the classifier is deleted or the job was handed to another worker."""

    def __init__(self, services: Services, record: ClassifierRecord,
                 should_stop: Callable[[], bool]):
        self.services, self.record = services, record
        self.owner = record.lease.owner
        self.run_id = f"{record.attempts}-{secrets.token_hex(4)}"
        self.stop_reason: str | None = None
        self._should_stop = should_stop
        self._lock = threading.Lock()
        self._started = self._last_write = time.monotonic()
        self._last_stage = record.progress.stage

    def stopped(self) -> bool:
        """Polled by the training loop between batches and epochs."""
        limit = self.services.settings.job_time_limit_s
        if time.monotonic() - self._started > limit:  # fails the job, with this reason
            raise TimeoutError(f"training ran longer than the limit of {limit:g} s "
                               "(HEADSTART_JOB_TIME_LIMIT_S)")
        if self.stop_reason is None and self._should_stop():
            self.stop_reason = "cancelled"
        return self.stop_reason is not None

    def on_progress(self, progress: training.Progress) -> None:
        """Called by the training loop between batches and epochs."""
        now = time.monotonic()
        if progress.stage != self._last_stage or now - self._last_write >= PROGRESS_INTERVAL_S:
            self._last_stage = progress.stage
            self._write(lambda record: setattr(record, "progress", ProgressOut(**vars(progress))))
        if self.stopped():
            raise training.Cancelled()

    @contextmanager
    def heartbeat(self) -> Iterator[None]:
        """Renews the lease on a thread, so slow stages (a big download) keep it too."""
        interval = self.services.settings.lease_seconds / 6
        done = threading.Event()

        def beat() -> None:
            while not done.wait(interval):
                if time.monotonic() - self._last_write >= interval:
                    self._write()

        thread = threading.Thread(target=beat, name=f"heartbeat-{self.record.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def commit(self, result: training.TrainingResult) -> None:
        """Head and report first, under this run's id; then the record that names them."""
        store, record = self.services.store, self.record
        store.save_head(record.id, self.run_id, serialize_weights(result.head))
        report = Report(classifier_id=record.id, options=record.options, backbone=record.backbone,
                        device=device_name(), precision=self.services.backbone.get().precision,
                        **result.report)
        store.save_report(self.run_id, report)

        def ready(record: ClassifierRecord) -> None:
            record.status, record.progress, record.run = "ready", None, self.run_id
            record.head = HeadOptions(**result.spec.as_dict())
            record.metrics = MetricsOut(val_accuracy=report.validation.accuracy,
                                        val_loss=report.validation.loss)
            record.training_seconds = round(time.monotonic() - self._started, 3)

        self._write(ready, final=True)
        if self.stop_reason is None:
            self._drop_run_if_superseded()
        elif self.stop_reason != "deleted":
            store.delete_run(record.id, self.run_id)

    def fail(self, title: str, detail: str) -> None:
        def failed(record: ClassifierRecord) -> None:
            record.status, record.progress = "failed", None
            record.error = ErrorOut(title=title, detail=detail)

        self._write(failed, final=True)
        log.error("job %s: %s: %s", self.record.id, title, detail)

    def _write(self, change: Callable[[ClassifierRecord], None] | None = None,
               final: bool = False) -> None:
        """Applies `change` and renews the lease (or ends it, if `final`), if the job is
        still this run's; otherwise sets `stop_reason`."""
        store, record = self.services.store, self.record
        with self._lock:
            if self.stop_reason:
                return
            try:
                current = store.load_record(record.id)
                if current.status != "training" or current.lease is None or \
                        current.lease.owner != self.owner:
                    self.stop_reason = "the job was handed to another worker (lease lost)"
                    return
                if change:
                    change(record)
                record.lease = None if final else Lease(owner=self.owner, heartbeat_at=utc_now())
                record.updated_at = utc_now()
                store.save_record(record)
            except NotFound:
                self.stop_reason = "deleted"
            except ServiceUnavailable as error:  # retried at the next beat; the lease may lapse
                log.warning("job %s: cannot write progress: %s", record.id, error.detail)
            self._last_write = time.monotonic()

    def _drop_run_if_superseded(self) -> None:
        """If another run committed over this one (a duplicate delivery), remove this run's
        files: the record names the other run's head and report, which are complete."""
        try:
            current = self.services.store.load_record(self.record.id)
        except NotFound:
            return
        if current.run != self.run_id:
            self.services.store.delete_run(self.record.id, self.run_id)


def _failure_detail(error: Exception) -> str:
    if isinstance(error, (ValueError, ImageDecodeError, TimeoutError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _fail_interrupted(services: Services, record: ClassifierRecord) -> None:
    record.status, record.progress, record.lease = "failed", None, None
    record.error = ErrorOut(
        title="Training was interrupted",
        detail=f"training stopped {record.attempts} times without finishing (its worker was "
               "killed, ran out of memory or lost its node); create the classifier again, "
               "perhaps with fewer images or views")
    record.updated_at = utc_now()
    try:
        services.store.save_record(record)
    except NotFound:
        return
    services.metrics.job_event("failed")
    log.error("job %s: %s", record.id, record.error.detail)


def _requeue_or_fail(services: Services, record: ClassifierRecord) -> None:
    if record.attempts >= services.settings.max_attempts:
        _fail_interrupted(services, record)
        return
    previous = record.model_copy(deep=True)
    record.status, record.progress, record.lease = "queued", ProgressOut(stage="queued"), None
    record.updated_at = utc_now()
    try:
        services.store.save_record(record)
        services.runner.submit(record.id)
    except NotFound:
        return
    except ServiceUnavailable as error:  # leave it as it was; the next sweep tries again
        services.store.save_record(previous)
        log.warning("job %s: cannot re-queue yet: %s", record.id, error.detail)
        return
    log.warning("job %s: re-queued after an interrupted run (attempt %d of %d)", record.id,
                record.attempts + 1, services.settings.max_attempts)


def recover_jobs(services: Services) -> None:
    """On start of the in-process runner: re-queue what a previous process left queued or
    training (it is gone: nothing else runs these jobs), or fail a job that keeps dying."""
    for record in services.store.list_records():
        if record.status in ACTIVE_STATUSES:
            _requeue_or_fail(services, record)


def requeue_lost_jobs(services: Services) -> None:
    """With a broker: re-queue (or fail) training jobs whose worker stopped renewing its lease:
    killed, out of memory, or its node lost. API processes run this every few seconds."""
    for record in services.store.list_records():
        if record.status == "training" and (
                record.lease is None or record.lease.expired(services.settings.lease_seconds)):
            _requeue_or_fail(services, record)
