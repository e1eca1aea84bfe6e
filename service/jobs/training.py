"""Run a training job: claim it, train on its stored dataset stage by stage, commit each better
head and its report as it comes, then end the run.

Imports TensorFlow (through `models.training`): only training threads and workers import this.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable

import numpy as np

from models import promotion, training
from models import trust as trust_lib
from models.health import content_hash
from models.backbone import device_name
from models.features import extract_features
from models.finetune import block_arrays
from models.heads import serialize_weights
from models.prediction import apply_head
from models.options import TrainingOptions
from models.preprocessing import DecodedImages, ImageDecodeError
from service.errors import NotFound
from service.jobs import versions
from service.jobs.recovery import fail_interrupted
from service.jobs.runs import Stopped, TrainingRun
from service.jobs.services import Services
from service.serving.heads import load_served_head
from service.storage.archive import Dataset
from service.storage.classifiers import PreconditionFailed, Versioned
from service.storage.features import StoredFeatureCache
from service.storage.records import (ACTIVE_STATUSES, ClassifierRecord, Error, Lease, Progress,
                                     utc_now)

log = logging.getLogger(__name__)


def training_config(options: TrainingOptions, max_image_pixels: int,
                    fine_tune_budget_s: float = 0.0) -> training.TrainingConfig:
    """The ML code's config of the stored options (the same pydantic fields) and the limits."""
    return training.TrainingConfig.of(options, max_image_pixels=max_image_pixels,
                                      fine_tune_budget_s=fine_tune_budget_s)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


def run_training_job(services: Services, job: str,
                     should_stop: Callable[[], bool] = lambda: False) -> None:
    """Runs one delivery of a training job. Safe to call twice for the same job: a delivery that
    finds the job finished, deleted, or claimed by another worker does nothing.

    Args:
        job: the job id, which names the classifier and its version (`storage.classifiers.job_id`).
        should_stop: polled between batches and epochs; True cancels the job.

    A failure is recorded in the classifier (status failed, error with the reason), then
    re-raised for the runner to log; after a committed stage the classifier stays ready on
    that stage's head, its error saying why the refinement stopped. A cancellation after a
    committed stage leaves it ready too.
    """
    claimed = claim(services, job)
    if claimed is None:
        return
    run = TrainingRun(services, claimed, should_stop)
    comparison = None
    with run.heartbeat():
        try:
            dataset = _load_dataset(services, run.record)
            result = _train(services, run, dataset)
            report = _report(services, run, result)
            comparison = _promotion(services, run.record, dataset, result)
            if comparison is not None:
                report["promotion"] = comparison
            run.finish(list(result.stages), report)
        except (training.Cancelled, Stopped):
            run.end_refinement()  # cancelled after a committed stage: it stays ready
            log.info("job %s: stopped: %s", job, run.stop_reason or "cancelled")
            services.metrics.job_event("cancelled")
            return
        except Exception as error:  # a failed commit too: never left training
            detail = _failure_detail(error)
            if run.served_run is None:
                run.fail("Training failed", detail)
            else:  # NB: the served head is still good; only its refinement failed
                run.end_refinement(Error(title="Refinement failed", detail=detail))
            services.metrics.job_event("failed")
            raise
    if not run.finished:
        log.info("job %s: result discarded: %s", job, run.stop_reason)
        return
    log.info("job %s: ready (%s), validation accuracy %.3f", job, run.record.stage,
             run.record.metrics.val_accuracy)
    if run.record.version > 1:  # NB: after the final write, by its own compare-and-set
        versions.settle_promotion(services, run.record, comparison)


def claim(services: Services, job: str) -> Versioned | None:
    """Takes the job's lease by a compare-and-set, or returns None when this delivery has
    nothing to do. Of two workers claiming at once exactly one wins; no settle time needed."""
    store, owner = services.store, worker_identity()
    try:
        current = store.load_job(job)
    except NotFound:
        log.info("job %s: classifier was deleted, nothing to do", job)
        return None
    record = current.record
    if record.status not in ACTIVE_STATUSES:
        log.info("job %s: classifier is %s, nothing to do", job, record.status)
        return None
    if record.status == "training" and record.lease and \
            not record.lease.expired(services.settings.lease_seconds):
        log.info("job %s: already running on %s; duplicate delivery dropped", job,
                 record.lease.owner)
        return None
    if record.attempts >= services.settings.max_attempts:  # earlier runs died mid-job
        fail_interrupted(services, current)
        return None
    claimed = record.model_copy(deep=True)
    claimed.status, claimed.attempts = "training", record.attempts + 1
    claimed.lease = Lease(owner=owner, heartbeat_at=utc_now())
    claimed.progress, claimed.updated_at = Progress(stage="extracting"), utc_now()
    try:
        tag = store.save_record(claimed, current.tag)
    except PreconditionFailed:
        log.info("job %s: claimed by another worker at the same time; backing off", job)
        return None
    except NotFound:
        return None
    services.metrics.job_event("training")
    return Versioned(claimed, tag)


def _load_dataset(services: Services, record: ClassifierRecord) -> Dataset:
    with tempfile.TemporaryFile() as archive:
        services.store.load_dataset(record.id, archive, record.version)
        archive.seek(0)
        return Dataset.from_archive(archive)


def _train(services: Services, run: TrainingRun, dataset: Dataset) -> training.TrainingResult:
    record = run.record
    # NB: in the precision the classifier was created for (the API's), which it is served in
    backbone = services.backbone.get(wait=True, precision=record.features_precision)
    _check_same_backbone(record, backbone.identity.as_dict())
    label_index = {label: i for i, label in enumerate(record.labels)}
    config = training_config(record.options, services.settings.max_image_pixels,
                             services.settings.fine_tune_budget_s)
    encoded = [image.data for image in dataset.images]
    labels = np.array([label_index[image.label] for image in dataset.images])
    cache = StoredFeatureCache(services.store, record.id, services.settings.feature_cache_bytes)

    def serve(result: training.TrainingResult) -> None:
        result.report["features"] = dict(cache.summary)  # so far: this stage's extractions
        run.commit_stage(result.stage, head_file(result),
                         _report(services, run, result), result.spec.as_dict(),
                         list(result.stages), fine_tuned=result.fine_tuned)

    result = training.train_classifier(
        encoded, labels, record.labels, backbone, config,
        on_progress=run.on_progress, should_stop=run.should_stop, on_stage=serve, cache=cache,
        paths=[image.path for image in dataset.images],
        hashes=[content_hash(data) for data in encoded])
    result.report["features"] = dict(cache.summary)  # the whole run's, for the final report
    return result


def head_file(result: training.TrainingResult) -> bytes:
    """The committed head's one stored file: its weights, its `trust.*` arrays and, when it
    is fine-tuned, its own blocks as float16 `blocks.*` arrays."""
    extra = trust_lib.to_arrays(result.trust) if result.trust is not None else {}
    if result.upper:
        extra.update(block_arrays(result.upper))
    return serialize_weights(result.head, extra or None)


def _report(services: Services, run: TrainingRun, result: training.TrainingResult) -> dict:
    record = run.record
    return {"classifier_id": record.id, "options": record.options.model_dump(mode="json"),
            "backbone": record.backbone.model_dump(mode="json"), "device": device_name(),
            "precision": record.features_precision, **result.report}


def _promotion(services: Services, record: ClassifierRecord, dataset: Dataset,
                result: training.TrainingResult) -> dict | None:
    """How this version compares with production's on the images production never trained on
    (`models.promotion`); None for version 1, which has nothing to compare with."""
    if record.version == 1:
        return None
    store = services.store
    against = store.load_versions(record.id)[0].production
    try:
        old = store.load_record(record.id, against)
    except NotFound:
        return {"against": against, "better": True, "reason": f"version {against} is gone"}
    if old.status != "ready" or old.run is None or old.head is None:
        return {"against": against, "better": True, "reason": f"version {against} is {old.status}"}
    seen = {content_hash(image.data) for image in _load_dataset(services, old).images}
    fresh = [i for i, image in enumerate(dataset.images) if content_hash(image.data) not in seen]
    if not fresh:
        return {"against": against, "better": False, "images": 0,
                "reason": f"every image of this version was in version {against}'s training "
                          "set: there is nothing to compare on", "rule": promotion.RULE}
    backbone = services.backbone.get(wait=True, precision=old.features_precision)
    # NB: the originals' features of this run, from the classifier's feature cache, when the
    # versions compute in one precision (an original's key does not depend on the options)
    features = extract_features(
        [dataset.images[i].data for i in fresh], backbone, views=0,
        augmentation=old.options.augmentation, seed=0,
        batch_size=training.TrainingConfig().extract_batch_size,
        max_pixels=services.settings.max_image_pixels,
        cache=StoredFeatureCache(store, record.id, services.settings.feature_cache_bytes))[:, 0]
    served = load_served_head(old, store.load_head(old), backbone)
    if served.upper is not None:  # a fine-tuned production version: through its own blocks
        from models.finetune import mixed_pass

        pixels = DecodedImages([dataset.images[i].data for i in fresh], backbone.image_size,
                               max_pixels=services.settings.max_image_pixels)[:]
        features = mixed_pass(backbone, pixels, [served.upper] * len(pixels))
    label_index = {label: i for i, label in enumerate(record.labels)}
    # NB: this version's side is the frozen stage's out-of-fold scores, fine-tuned or not
    return {"against": against, **promotion.compare(
        result.selection.result.out_of_fold[fresh], apply_head(served.head, features),
        np.array([label_index[dataset.images[i].label] for i in fresh]), record.labels,
        old.labels)}


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


def _failure_detail(error: Exception) -> str:
    if isinstance(error, (ValueError, ImageDecodeError, TimeoutError)):
        return str(error)
    return f"{type(error).__name__}: {error}"
