"""Predict: images in, labels and calibrated scores out, through the shared backbone."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from typing import IO

import numpy as np

from models import trust, uncertainty
from models.prediction import apply_head, rank
from models.preprocessing import ImageDecodeError, load_image
from service.errors import BadRequest, Conflict, ServiceUnavailable, Unprocessable
from service.jobs import versions
from service.jobs.datasets import read_image_zip
from service.jobs.services import Services
from service.serving.heads import ServedHead
from service.storage.archive import SkippedFile
from service.storage.records import ClassifierRecord


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


def check_image_count(services: Services, count: int) -> None:
    """Cheap bound, checked before anything is decoded or parsed further."""
    if not count:
        raise BadRequest("send at least one image: multipart parts named 'image', or JSON "
                         '{"instances": [{"b64": "..."}]}')
    if count > services.settings.max_predict_images:
        raise BadRequest(f"{count} images in one request; the limit is "
                         f"{services.settings.max_predict_images} (HEADSTART_MAX_PREDICT_IMAGES)")


def servable_record(services: Services, classifier_id: str, version: int | None = None,
                    alias: str | None = None) -> ClassifierRecord:
    """The record of the version that is to predict (by number, by alias, or production's),
    checked before the request body is read.

    Raises:
        NotFound: no such classifier, version or alias. Conflict: it is not ready.
    """
    record = versions.resolve(services, classifier_id, version, alias)
    if record.status != "ready":
        which = "" if version is None and alias is None else f" version {record.version}"
        raise Conflict(f"classifier {classifier_id}{which} is {record.status}, not ready")
    return record


@dataclass(frozen=True)
class ImagePrediction:
    """One image's answer: `label` is None when it is rejected (`reason` says why); `top_k`
    (label, calibrated score) pairs, best first, either way."""

    label: str | None
    score: float
    top_k: list[tuple[str, float]]
    rejected: bool
    reason: str | None


def parse_threshold(raw: str | None) -> float | None:
    """A request's `?threshold=`: a number from 0 to 1, else a 400 saying so."""
    if raw is None:
        return None
    try:
        threshold = float(raw)
    except ValueError:
        threshold = None
    if threshold is None or not 0 <= threshold <= 1:  # NB: NaN fails both comparisons
        raise BadRequest(f"threshold must be a number from 0 to 1; received {raw[:40]!r}",
                         errors=[{"field": "threshold", "message": "must be a number from 0 "
                                                                   "to 1"}])
    return threshold


def predict(services: Services, record: ClassifierRecord, images: list[bytes],
            top_k: int, threshold: float | None = None) -> list[ImagePrediction]:
    """Each image's label (or rejection) and top_k calibrated scores, in request order.

    Args:
        threshold: the request's `?threshold=`; None: the classifier's default.

    Decoding counts against `predict_timeout_s` as waiting for the backbone does.
    """
    check_image_count(services, len(images))
    served, scored = _scored(services, record, images)
    services.metrics.predictions(len(images))
    ranked = rank(scored[:, :-1], record.labels, min(top_k, len(record.labels)))
    return [ImagePrediction(None if decision.rejected else record.labels[decision.label],
                            decision.score, pairs, decision.rejected, decision.reason)
            for decision, pairs in zip(trust.decisions(served.trust, scored, threshold), ranked)]


def _scored(services: Services, record: ClassifierRecord,
            images: list[bytes]) -> tuple[ServedHead, np.ndarray]:
    """The served head and `models.trust.score` of the images: float64 (n, k + 1), calibrated
    probabilities and the OOD score, computed in the backbone's shared passes."""
    timeout_s = services.settings.predict_timeout_s
    deadline = time.monotonic() + timeout_s
    size = services.backbone.get().image_size
    decoded = []
    for index, data in enumerate(images):
        if time.monotonic() > deadline:
            raise ServiceUnavailable(
                f"prediction did not finish within {timeout_s:g} s: decoding the first {index} "
                f"of {len(images)} images took that long; send fewer or smaller images",
                headers={"Retry-After": "5"})
        decoded.append(_decode(data, index, size, services.settings.max_image_pixels))
    served = services.heads.get(record)
    # NB: through a backbone of the precision the head was trained on (service.serving.backbone)
    scored = services.backbone.features(
        np.stack(decoded),
        lambda features: trust.score(served.trust, features, apply_head(served.head, features)),
        deadline=deadline, precision=record.features_precision)
    return served, scored


@dataclass(frozen=True)
class Suggestions:
    """`POST …/suggest`'s answer: the images most worth labeling first."""

    method: str
    images: int
    suggestions: list[dict]
    skipped: list[SkippedFile]


def suggest(services: Services, record: ClassifierRecord, dataset: IO[bytes], limit: int,
            method: str = "margin") -> Suggestions:
    """Ranks a zip of unlabeled images by how much a label for each would teach the classifier.

    Images are scored by its calibrated head, a predict request's worth at a time; the most
    uncertain (by `method`, see `models.uncertainty`) come first, out-of-distribution ones last.

    Raises:
        As `datasets.read_image_zip` (bad archive, too many images), and as predict.
    """
    read = read_image_zip(dataset, services.dataset_limits,
                          max_images=services.settings.max_suggest_images)
    step = services.settings.max_predict_images
    served, scored = None, []
    for start in range(0, len(read.images), step):
        served, part = _scored(services, record,
                               [image.data for image in read.images[start:start + step]])
        scored.append(part)
    scored = np.concatenate(scored)
    detector = served.trust.detector if served.trust is not None else None
    unusual = None if detector is None else detector.is_out(scored[:, -1])
    ranked = uncertainty.suggest(scored[:, :-1], record.labels, method, unusual, limit)
    for entry in ranked:
        entry["path"] = read.images[entry.pop("index")].path
    services.metrics.predictions(len(read.images))
    return Suggestions(method, len(read.images), ranked, read.skipped)


def _decode(data: bytes, index: int, size: int, max_pixels: int) -> np.ndarray:
    try:
        return load_image(data, size, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise Unprocessable(f"image {index}: {error.reason}",
                            errors=[{"field": f"image.{index}", "message": error.reason}]) from None
