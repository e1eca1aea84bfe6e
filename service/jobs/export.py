"""Export: a classifier as a zip to run elsewhere (SavedModel, TFLite or ONNX), built as a job
and cached in the store per (training run, format).

An export holds the whole VGG16 base (59 MB of float32 weights) and takes seconds to a minute
to build (TFLite's converter is the slow one), so a request never waits for one: the first
request for a (run, format) claims its build in the store and answers "pending"; a background
thread builds it; every later request answers "pending" until the zip is stored, then gets it.
The claim is a compare-and-set, so of several API replicas asked at once one builds; a claim
whose builder died is taken over after `STALE_AFTER_S`; a failed build is reported for
`FAILED_FOR_S`, then tried again. Builds are deterministic, so a second build of the same
export (a slow builder taken over) only costs time.

Security: everything in a zip is either built here from arrays (the graphs) or data (labels,
the model card, as JSON); nothing user-supplied is executed when an export is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import IO, Any, Literal

from pydantic import BaseModel

from service.errors import Conflict, HeadstartError, NotFound, ServiceUnavailable
from service.jobs import versions
from service.jobs.services import Services
from service.serving.heads import load_served_head
from service.storage.classifiers import PreconditionFailed
from service.storage.records import ClassifierRecord, utc_now

log = logging.getLogger(__name__)

#: A build claimed longer ago than this, with no zip yet, is taken over (its builder died).
STALE_AFTER_S = 600
#: A failed build is reported this long, then the next request tries again.
FAILED_FOR_S = 60
#: What a client waits between polls, in seconds.
RETRY_AFTER_S = 5
#: Parity the exports are built and tested to (tests/test_export.py, bench/export_parity.py).
TOLERANCE = 1e-4
_SPOOL_BYTES = 16 * 1024**2


class ExportFailed(HeadstartError):
    status = 500
    title = "Export failed"


class ExportBuild(BaseModel):
    """The stored state of an export's build, `exports/{run}/{format}.json`, while no zip
    exists."""

    status: Literal["building", "failed"]
    owner: str
    started_at: datetime
    detail: str | None = None


@dataclass(frozen=True)
class ExportReady:
    """The zip, positioned at its start; the caller closes it."""

    archive: IO[bytes]
    size: int
    filename: str


@dataclass(frozen=True)
class ExportPending:
    version: int
    retry_after_s: int = RETRY_AFTER_S


@dataclass(frozen=True)
class ExportSource:
    """Which trained head an export is made of."""

    record: ClassifierRecord  # with `run` (and `head`) of the exported version
    version: int


class ExportBuilder:
    """Builds exports one at a time on a daemon thread of this process (an export takes a few
    hundred MB and a CPU or two for up to a minute; predictions keep the rest)."""

    def __init__(self, build: Callable[[str, str, str], None]):
        self._build = build
        self._queue: queue.Queue[tuple[str, str, str]] = queue.Queue()
        self._queued: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, classifier_id: str, run: str, export_format: str) -> None:
        job = (classifier_id, run, export_format)
        with self._lock:
            if job in self._queued:
                return
            self._queued.add(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="export-builder",
                                                daemon=True)
                self._thread.start()
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._build(*job)
            except Exception:  # the builder thread must outlive any one failure
                log.exception("export %s failed", job)
            finally:
                with self._lock:
                    self._queued.discard(job)


def export_builder(services: Services) -> ExportBuilder:
    """The composition root's builder for `services`."""
    return ExportBuilder(lambda classifier_id, run, export_format: build_export(
        services, classifier_id, run, export_format))


def export_classifier(services: Services, builder: ExportBuilder, classifier_id: str,
                      export_format: str, version: int | None) -> ExportReady | ExportPending:
    """The export zip of a ready classifier, or `ExportPending` while it is being built.

    Raises:
        Conflict: the classifier (or the version asked for) is not ready.
        NotFound: no such classifier or version.
        ExportFailed: the last build failed less than `FAILED_FOR_S` ago.
    """
    store = services.store
    record = versions.resolve(services, classifier_id, version)
    if record.status != "ready":
        which = "classifier" if version is None else f"version {version} of classifier"
        raise Conflict(f"{which} {classifier_id} is {record.status}; it can be exported once "
                       "it is ready")
    source = export_source(record)
    run = source.record.run
    archive = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
    try:
        found = store.load_export(classifier_id, run, export_format, archive)
    except BaseException:
        archive.close()
        raise
    if found:
        size = archive.tell()
        archive.seek(0)
        return ExportReady(archive, size, f"{classifier_id}-v{source.version}-{export_format}.zip")
    archive.close()
    _claim(services, builder, classifier_id, run, export_format)
    return ExportPending(source.version)


def _claim(services: Services, builder: ExportBuilder, classifier_id: str, run: str,
           export_format: str) -> None:
    """Starts the build unless a live one exists; reports a recent failure."""
    store = services.store
    for _ in range(3):  # NB: each loss of the compare-and-set means another process moved
        current = store.load_export_build(classifier_id, run, export_format)
        tag = None
        if current is not None:
            data, tag = current
            build = ExportBuild.model_validate_json(data)
            age = (utc_now() - build.started_at).total_seconds()
            if build.status == "building" and age < STALE_AFTER_S:
                return
            if build.status == "failed" and age < FAILED_FOR_S:
                raise ExportFailed(f"building the {export_format} export failed: {build.detail}; "
                                   f"it is tried again {FAILED_FOR_S} s after the failure")
        claim = ExportBuild(status="building", owner=_owner(), started_at=utc_now())
        try:
            store.save_export_build(classifier_id, run, export_format,
                                    claim.model_dump_json().encode(), tag)
        except PreconditionFailed:
            continue
        log.info("export %s %s (run %s) queued", classifier_id, export_format, run)
        builder.submit(classifier_id, run, export_format)
        return
    raise ServiceUnavailable("the export's build state keeps changing; retry shortly",
                             headers={"Retry-After": str(RETRY_AFTER_S)})


def export_source(record: ClassifierRecord) -> ExportSource:
    """What to export of a ready version's record (`versions.resolve` maps a version to it)."""
    if record.run is None or record.head is None:
        raise NotFound(f"classifier {record.id} has no trained version {record.version}")
    return ExportSource(record, record.version)


def build_export(services: Services, classifier_id: str, run: str, export_format: str) -> None:
    """Builds one export and stores it (the builder thread's job); a failure is recorded in
    the build state, so requests report it."""
    store = services.store
    try:
        if not store.has_export(classifier_id, run, export_format):
            record = versions.record_of_run(services, classifier_id, run)
            if record is None:
                log.info("export %s %s dropped: run %s is no longer one of the classifier's",
                         classifier_id, export_format, run)
                store.delete_export_build(classifier_id, run, export_format)
                return
            with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as archive:
                write_export(services, export_source(record), export_format, archive)
                archive.seek(0)
                store.save_export(classifier_id, run, export_format, archive)
            log.info("export %s %s (run %s) stored", classifier_id, export_format, run)
        store.delete_export_build(classifier_id, run, export_format)
    except Exception as error:
        if not store.exists(classifier_id):  # deleted meanwhile: nothing to report
            log.info("export %s %s dropped: the classifier was deleted", classifier_id,
                     export_format)
            return
        log.exception("export %s %s (run %s) failed", classifier_id, export_format, run)
        detail = error.detail if isinstance(error, HeadstartError) else \
            f"{type(error).__name__}: {error}"
        _record_failure(services, classifier_id, run, export_format, detail)


def _record_failure(services: Services, classifier_id: str, run: str, export_format: str,
                    detail: str) -> None:
    store = services.store
    failed = ExportBuild(status="failed", owner=_owner(), started_at=utc_now(), detail=detail)
    try:
        current = store.load_export_build(classifier_id, run, export_format)
        store.save_export_build(classifier_id, run, export_format,
                                failed.model_dump_json().encode(),
                                current[1] if current else None)
    except (PreconditionFailed, HeadstartError) as error:  # taken over, gone, or unreachable
        log.warning("export %s %s: the failure was not recorded: %s", classifier_id,
                    export_format, getattr(error, "detail", error))


def write_export(services: Services, source: ExportSource, export_format: str,
                 target: IO[bytes]) -> None:
    """Writes the export zip of `source` into `target`."""
    import numpy as np

    # NB: TensorFlow, on the builder thread after fork.
    from models import export as export_lib
    from models.finetune import load_blocks

    record, store = source.record, services.store
    backbone = services.backbone.get(wait=True)
    report = json.loads(store.load_report(record))
    head_file = store.load_head(record)
    served = load_served_head(record, head_file, backbone)
    calibration = report.get("calibration")
    # NB: the head file's temperature, not the report's (rounded): scores match the service's
    temperature = served.trust.temperature if served.trust is not None else None
    # a fine-tuned classifier's own blocks as stored (float16, exact in float32; the served
    # copy is rounded to the compute dtype), or the shared ones
    own_blocks = None
    if served.upper is not None:
        own_blocks = {name: tuple(np.asarray(w, np.float32) for w in pair)
                      for name, pair in load_blocks(head_file)[1].items()}
    model = export_lib.from_keras(backbone.model, served.head, backbone.image_size,
                                  temperature=temperature, own_blocks=own_blocks)
    card = model_card(services, source, report, model, export_format, calibration)
    export_lib.write_archive(model, export_format, record.labels, card, target)


def model_card(services: Services, source: ExportSource, report: dict[str, Any], model,
               export_format: str, calibration: Any) -> dict[str, Any]:
    """model-card.json: what the model is, what it takes, how good it was, how it was made."""
    import tensorflow as tf

    from models import export as export_lib

    record, backbone = source.record, services.backbone.get()
    threshold = report.get("threshold")
    decodes = export_format == "savedmodel"
    return {
        "schema_version": 1,
        "format": export_format,
        "classifier": {"id": record.id, "name": record.name, "version": source.version,
                       "run": record.run, "created_at": record.created_at,
                       "trained_at": record.updated_at},
        "labels": record.labels,
        "image_size": model.image_size,
        "backbone": record.backbone.model_dump() if record.backbone else None,
        "weights_fingerprint": model.weights_fingerprint(),
        "fine_tuned": getattr(record, "fine_tuned", None),
        "input": {
            "name": export_lib.INPUT, "dtype": "float32", "shape": [None, None, None, 3],
            "meaning": "RGB pixels in 0-255, any height and width (one size per batch)",
            "image_bytes": {"signature": "serving_default", "name": export_lib.BYTES_INPUT,
                            "dtype": "string", "shape": [None],
                            "decodes": ["JPEG", "PNG", "GIF", "BMP"]} if decodes else None},
        "output": {"name": export_lib.OUTPUT, "dtype": "float32",
                   "shape": [None, model.num_classes],
                   "meaning": "probabilities per label (labels.json order), summing to 1"},
        "preprocessing": {
            "decode": ("in the model for image_bytes: JPEG with the accurate integer DCT and "
                       "EXIF orientation, as Pillow" if decodes else "outside the model") +
                      "; Headstart: Pillow, first frame, EXIF orientation, transparency on "
                      "white, RGB",
            "resize": f"to {model.image_size}x{model.image_size}, aspect not kept: Pillow's "
                      "antialiased bilinear (triangle) weights as two matrices, float32, not "
                      "rounded (models/preprocessing.py resize_weights)",
            "normalize": "VGG16 caffe: RGB to BGR, minus the ImageNet mean "
                         f"{list(export_lib.CAFFE_MEAN_BGR)}"},
        "head": record.head.model_dump() if record.head else None,
        "options": record.options.model_dump(),
        "metrics": record.metrics.model_dump() if record.metrics else None,
        "validation": report.get("validation"),
        "threshold": threshold,
        "calibration": calibration,
        "temperature": model.temperature if calibration else None,
        "made_by": {
            "service": "headstart", "service_version": _version("headstart"),
            "exported_at": utc_now(),
            "how": "graph written by models/export.py from the backbone's and head's float32 "
                   "arrays (no converter" + (", then TFLite's converter with builtin ops and "
                   "no optimisation)" if export_format == "tflite" else ")"),
            "tensorflow": tf.__version__,
            "onnx": _version("onnx") if export_format == "onnx" else None,
            "onnx_opset": export_lib.ONNX_OPSET if export_format == "onnx" else None,
            "precision": "float32", "service_precision": backbone.precision},
        "parity": {"tolerance": TOLERANCE, "against": "the service's scores for the same "
                   "image with a float32 backbone (POST …/predict)"},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
