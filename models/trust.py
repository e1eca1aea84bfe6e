"""Everything a classifier needs to say when its score means something, fitted in one call.

The composition of `models.calibration` and `models.ood` that training runs after the head is
chosen, and that prediction applies: the temperature (fitted on validation), the default
rejection threshold for a target precision (on calibrated validation scores), and the
out-of-distribution detector (fitted on the training images' features, its threshold set on the
validation images and the training images' leave-one-out scores). `to_bytes` stores it beside
the head (an .npz, no pickles; about 2 KB per training image for the default detector).

numpy only.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np

from models import calibration, ood

#: The default of training option `reject` proposed here: "off" (None). The OOD check is on
#: regardless. A target precision turns a weak classifier mostly silent: flowers5 (0.65
#: accurate) at 0.95 answered 4 % of its test images (bench/RESULTS.md); a user who asks for
#: it gets that, one who did not would be surprised.
DEFAULT_TARGET_PRECISION = None


@dataclass(frozen=True)
class Trust:
    """A classifier's calibration, default threshold and OOD detector."""

    calibration: calibration.Calibration
    threshold: calibration.Threshold
    detector: ood.Detector

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    def report(self) -> dict:
        """The report's "calibration" and "threshold" fields and an "ood" summary."""
        return {"calibration": self.calibration.as_dict(),
                "threshold": self.threshold.as_dict(),
                "ood": {"method": self.detector.method,
                        "threshold": round(self.detector.threshold, 6),
                        "bytes": self.detector.nbytes}}


def fit_trust(train_features: np.ndarray, train_labels: np.ndarray,
              validation_features: np.ndarray, validation_probabilities: np.ndarray,
              validation_labels: np.ndarray, *,
              target_precision: float | None = DEFAULT_TARGET_PRECISION,
              method: str = ood.DEFAULT_METHOD, keep: float = ood.DEFAULT_KEEP) -> Trust:
    """Fits temperature, threshold and OOD detector after a head is trained.

    Args:
        train_features: float32 (n, 2048) features of the training images (originals, view 0).
        train_labels: int (n,).
        validation_features: float32 (m, 2048); validation_probabilities: float (m, k), the
            head's softmax outputs; validation_labels: int (m,).
        target_precision: for the default threshold; None for "off".
        method: the OOD score (`ood.METHODS`; logit-based ones use the validation logits).
        keep: share of in-distribution images the OOD threshold keeps.
    """
    logits = calibration.logits_from_probabilities(validation_probabilities)
    fitted = calibration.calibrate(logits, validation_labels)
    threshold = calibration.precision_threshold(
        calibration.softmax(logits, fitted.temperature), validation_labels, target_precision)
    options = {"temperature": fitted.temperature} if method == "max_softmax" else {}
    detector = ood.fit(method, train_features, train_labels, **options)
    scores = ood.score(detector, validation_features, logits)
    return Trust(fitted, threshold, ood.with_threshold(detector, scores, keep))


def decide(trust: Trust, features: np.ndarray, probabilities: np.ndarray,
           threshold: float | None = None) -> tuple[np.ndarray, list[calibration.Decision]]:
    """Calibrated probabilities and the rejection decisions for a batch.

    Args:
        features: float32 (n, 2048) backbone features; probabilities: float (n, k) the head's
            softmax outputs for them.
        threshold: the request's `?threshold=`, else the classifier's default.

    Returns:
        (float64 (n, k) calibrated probabilities — what predict reports as scores and top_k —,
        one `calibration.Decision` per image).
    """
    logits = calibration.logits_from_probabilities(probabilities)
    calibrated = calibration.softmax(logits, trust.temperature)
    scores = ood.score(trust.detector, features, logits)
    chosen = trust.threshold.threshold if threshold is None else threshold
    return calibrated, calibration.decide(calibrated, chosen, scores, trust.detector.threshold)


def to_bytes(trust: Trust) -> bytes:
    """The fitted state as one .npz: the detector's arrays plus the scalars (no pickles)."""
    c, t = trust.calibration, trust.threshold
    scalars = np.array([c.temperature, c.ece_before, c.ece_after, c.nll_before, c.nll_after,
                        c.images, t.threshold,
                        math.nan if t.target_precision is None else t.target_precision,
                        t.precision, t.coverage, float(t.reached)], np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, __scalars__=scalars,
             __detector__=np.frombuffer(ood.to_bytes(trust.detector), np.uint8))
    return buffer.getvalue()


def from_bytes(data: bytes) -> Trust:
    """The inverse of `to_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        s = archive["__scalars__"]
        detector = ood.from_bytes(archive["__detector__"].tobytes())
    fitted = calibration.Calibration(float(s[0]), float(s[1]), float(s[2]), float(s[3]),
                                     float(s[4]), int(s[5]))
    threshold = calibration.Threshold(float(s[6]), None if math.isnan(s[7]) else float(s[7]),
                                      float(s[8]), float(s[9]), bool(s[10]))
    return Trust(fitted, threshold, detector)
