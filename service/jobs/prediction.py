"""Predict: images in, labels and calibrated scores out, through the shared backbone."""

from __future__ import annotations

import base64
import binascii
import time

import numpy as np

from models.prediction import apply_head, rank
from models.preprocessing import ImageDecodeError, load_image
from service.errors import BadRequest, Conflict, ServiceUnavailable, Unprocessable
from service.jobs.services import Services
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


def servable_record(services: Services, classifier_id: str) -> ClassifierRecord:
    """The record of a classifier that can predict: checked before the request body is read.

    Raises:
        NotFound: no such classifier. Conflict: it is not ready.
    """
    record = services.store.load_record(classifier_id)
    if record.status != "ready":
        raise Conflict(f"classifier {classifier_id} is {record.status}, not ready")
    return record


def predict(services: Services, record: ClassifierRecord, images: list[bytes],
            top_k: int) -> list[list[tuple[str, float]]]:
    """The top_k (label, score) pairs for each image, in request order, best first.

    Decoding counts against `predict_timeout_s` as waiting for the backbone does.
    """
    check_image_count(services, len(images))
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
    # NB: through a backbone of the precision the head was trained on (service.serving.backbone);
    # a fine-tuned classifier's rows share the frozen blocks' pass, then take its own blocks.
    scores = services.backbone.features(np.stack(decoded),
                                        lambda features: apply_head(served.head, features),
                                        upper=served.upper, deadline=deadline,
                                        precision=record.features_precision)
    services.metrics.predictions(len(images))
    return rank(scores, record.labels, min(top_k, len(record.labels)))


def _decode(data: bytes, index: int, size: int, max_pixels: int) -> np.ndarray:
    try:
        return load_image(data, size, max_pixels=max_pixels)
    except ImageDecodeError as error:
        raise Unprocessable(f"image {index}: {error.reason}",
                            errors=[{"field": f"image.{index}", "message": error.reason}]) from None
