"""Everything a classifier needs to say when its score means something, fitted in one call.

The composition of `models.calibration` and `models.ood` that training runs after the head is
chosen, and that prediction applies: the temperature (fitted on validation), the default
rejection threshold for a target precision (on calibrated validation scores), and the
out-of-distribution detector (fitted on the training images' features, its threshold set on the
validation images and the training images' leave-one-out scores). `to_arrays` names its arrays
for the classifier's head file (`trust.*`, no pickles; about 2 KB per training image for the
default detector); `score` and `decisions` are what predict applies.

numpy only.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models import calibration, health, ood

#: The default of training option `reject` proposed here: "off" (None). The OOD check is on
#: regardless. A target precision turns a weak classifier mostly silent: flowers5 (0.65
#: accurate) at 0.95 answered 4 % of its test images (bench/RESULTS.md); a user who asks for
#: it gets that, one who did not would be surprised.
DEFAULT_TARGET_PRECISION = None


#: Names of a classifier's trust arrays in its head file start with this (fine-tuned blocks'
#: with "blocks."): one stored file per committed head.
PREFIX = "trust."


@dataclass(frozen=True)
class Trust:
    """A classifier's calibration, default threshold and OOD detector (None: OOD check off)."""

    calibration: calibration.Calibration
    threshold: calibration.Threshold
    detector: ood.Detector | None

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    def report(self) -> dict:
        """The report's "calibration", "threshold" (a number: the classifier's default),
        "rejection" (how that threshold was chosen) and "ood" fields."""
        detector = self.detector
        return {"calibration": self.calibration.as_dict(),
                "threshold": round(self.threshold.threshold, 4),
                "rejection": self.threshold.as_dict(),
                "ood": ({"enabled": False} if detector is None else
                        {"enabled": True, "method": detector.method,
                         "threshold": round(detector.threshold, 6), "bytes": detector.nbytes})}


def fit_trust(train_features: np.ndarray, train_labels: np.ndarray,
              validation_features: np.ndarray, validation_probabilities: np.ndarray,
              validation_labels: np.ndarray, *,
              target_precision: float | None = DEFAULT_TARGET_PRECISION,
              method: str = ood.DEFAULT_METHOD, keep: float = ood.DEFAULT_KEEP) -> Trust:
    """Fits temperature, threshold and OOD detector after a head is trained on a split.

    Args:
        train_features: float32 (n, 2048) features of the training images (originals, view 0).
        train_labels: int (n,).
        validation_features: float32 (m, 2048); validation_probabilities: float (m, k), the
            head's softmax outputs; validation_labels: int (m,).
        target_precision: for the default threshold; None for "off".
        method: the OOD score (`ood.METHODS`; logit-based ones use the validation logits).
        keep: share of in-distribution images the OOD threshold keeps.
    """
    return _fit(train_features, train_labels, validation_features, validation_probabilities,
                validation_labels, target_precision, method, keep)


def fit_for_head(features: np.ndarray, labels: np.ndarray, out_of_fold: np.ndarray, *,
                 target_precision: float | None = DEFAULT_TARGET_PRECISION,
                 method: str | None = ood.DEFAULT_METHOD,
                 keep: float = ood.DEFAULT_KEEP) -> Trust:
    """Fits temperature, threshold and OOD detector for a head chosen by cross-validation.

    Every image is both trained on (the served head is refitted on all of them) and held out
    once (its out-of-fold probabilities): temperature and threshold are fitted on the
    out-of-fold scores, the detector's reference holds every image. An image cannot be scored
    against a reference that holds it (knn: distance 0 to itself), so knn's threshold comes from
    its leave-one-out scores alone; the logit scores use the out-of-fold logits. Called once per
    trained head.

    Args:
        features: float32 (n, 2048) features of every image (originals, view 0).
        labels: int (n,).
        out_of_fold: float (n, k) each image's softmax probabilities from a head that did not
            train on it.
        target_precision, keep: as for `fit_trust`; method: as there, or None for no OOD
            check (training option `reject: "off"`).
    """
    held_out = None if method == "knn" else features
    return _fit(features, labels, held_out, out_of_fold, labels, target_precision, method, keep)


def _fit(train_features: np.ndarray, train_labels: np.ndarray,
         held_out_features: np.ndarray | None, held_out_probabilities: np.ndarray,
         held_out_labels: np.ndarray, target_precision: float | None, method: str | None,
         keep: float) -> Trust:
    logits = calibration.logits_from_probabilities(held_out_probabilities)
    fitted = calibration.calibrate(logits, held_out_labels)
    threshold = calibration.precision_threshold(
        calibration.softmax(logits, fitted.temperature), held_out_labels, target_precision)
    if method is None:
        return Trust(fitted, threshold, None)
    options = {"temperature": fitted.temperature} if method == "max_softmax" else {}
    detector = ood.fit(method, train_features, train_labels, **options)
    scores = (np.zeros(0) if held_out_features is None
              else ood.score(detector, held_out_features, logits))
    return Trust(fitted, threshold, ood.with_threshold(detector, scores, keep))


def decide(trust: Trust | None, features: np.ndarray, probabilities: np.ndarray,
           threshold: float | None = None) -> tuple[np.ndarray, list[calibration.Decision]]:
    """Calibrated probabilities and the rejection decisions for a batch.

    Args:
        trust: the classifier's, or None for a classifier stored before it had any
            (temperature 1, no OOD check, no default threshold).
        features: float32 (n, 2048) backbone features; probabilities: float (n, k) the head's
            softmax outputs for them.
        threshold: the request's `?threshold=`, else the classifier's default.

    Returns:
        (float64 (n, k) calibrated probabilities — what predict reports as scores and top_k —,
        one `calibration.Decision` per image).
    """
    scored = score(trust, features, probabilities)
    return scored[:, :-1], decisions(trust, scored, threshold)


def score(trust: Trust | None, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Calibrated probabilities and OOD scores of a batch, as one array.

    Args:
        trust, features, probabilities: as for `decide`.

    Returns:
        float64 (n, k + 1): columns :k the calibrated probabilities, column k the OOD score
        (NaN without a detector).
    """
    probabilities = np.asarray(probabilities, np.float64)
    if trust is None:
        return np.column_stack([probabilities, np.full(len(probabilities), np.nan)])
    logits = calibration.logits_from_probabilities(probabilities)
    calibrated = calibration.softmax(logits, trust.temperature)
    unusual = (np.full(len(calibrated), np.nan) if trust.detector is None
               else ood.score(trust.detector, features, logits))
    return np.column_stack([calibrated, unusual])


def decisions(trust: Trust | None, scored: np.ndarray,
              threshold: float | None = None) -> list[calibration.Decision]:
    """The rejection decisions of `score`'s output.

    Args:
        threshold: the request's, else the classifier's default (0 without trust).
    """
    default = trust.threshold.threshold if trust is not None else 0.0
    detector = trust.detector if trust is not None else None
    return calibration.decide(scored[:, :-1], default if threshold is None else threshold,
                              None if detector is None else scored[:, -1],
                              None if detector is None else detector.threshold)


def to_arrays(trust: Trust) -> dict[str, np.ndarray]:
    """The fitted state as named arrays for the head file, every name starting with PREFIX."""
    c, t = trust.calibration, trust.threshold
    arrays = {f"{PREFIX}scalars": np.array(
        [c.temperature, c.ece_before, c.ece_after, c.nll_before, c.nll_after, c.images,
         t.threshold, math.nan if t.target_precision is None else t.target_precision,
         t.precision, t.coverage, float(t.reached)], np.float64)}
    if trust.detector is not None:
        arrays[f"{PREFIX}ood_method"] = np.array(trust.detector.method)
        arrays[f"{PREFIX}ood_threshold"] = np.array(trust.detector.threshold, np.float64)
        arrays.update({f"{PREFIX}ood.{name}": array
                       for name, array in trust.detector.arrays.items()})
    return arrays


def from_arrays(arrays: dict[str, np.ndarray]) -> Trust | None:
    """The inverse of `to_arrays`; None when the arrays hold no trust data (an old head file).
    Names without PREFIX are ignored."""
    if f"{PREFIX}scalars" not in arrays:
        return None
    s = arrays[f"{PREFIX}scalars"]
    fitted = calibration.Calibration(float(s[0]), float(s[1]), float(s[2]), float(s[3]),
                                     float(s[4]), int(s[5]))
    threshold = calibration.Threshold(float(s[6]), None if math.isnan(s[7]) else float(s[7]),
                                      float(s[8]), float(s[9]), bool(s[10]))
    detector = None
    if f"{PREFIX}ood_method" in arrays:
        method = str(arrays[f"{PREFIX}ood_method"])
        if method not in ood.METHODS:
            raise ValueError(f"Unknown OOD method in stored trust data. Received: {method!r}")
        inner = f"{PREFIX}ood."
        detector = ood.Detector(method, {name[len(inner):]: array
                                         for name, array in arrays.items()
                                         if name.startswith(inner)},
                                float(arrays[f"{PREFIX}ood_threshold"]))
    return Trust(fitted, threshold, detector)


def to_bytes(trust: Trust) -> bytes:
    """The fitted state as one .npz of `to_arrays` (no pickles)."""
    buffer = io.BytesIO()
    np.savez(buffer, **to_arrays(trust))
    return buffer.getvalue()


def from_bytes(data: bytes) -> Trust:
    """The inverse of `to_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        found = from_arrays({name: archive[name] for name in archive.files})
    if found is None:
        raise ValueError("The data holds no trust arrays")
    return found


@dataclass(frozen=True)
class Assessment:
    """What one trained head's report says about its scores and its dataset.

    Attributes:
        trust: to store in the head file and apply at predict.
        report: the report's "calibration", "threshold", "rejection", "ood" and "health".
    """

    trust: Trust
    report: dict


def assess(features: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
           out_of_fold: np.ndarray, folds: np.ndarray, *,
           target_precision: float | None = DEFAULT_TARGET_PRECISION,
           out_of_distribution: bool = True, paths: Sequence[str] | None = None,
           hashes: Sequence[str] | None = None) -> Assessment:
    """Trust and dataset health of a head chosen by cross-validation; called once per trained
    head (per stage, when a run trains several).

    Args:
        features: float32 (n, 2048) features of every image (originals, view 0).
        labels: int (n,); label_names: the classifier's labels (k).
        out_of_fold: float (n, k) out-of-fold softmax probabilities of the chosen head.
        folds: int (n,) each image's cross-validation fold.
        target_precision, out_of_distribution: the training option `reject`.
        paths: archive path per image; hashes: `health.content_hash` per image. Without both
            the report's "health" is null.
    """
    trust = fit_for_head(features, labels, out_of_fold, target_precision=target_precision,
                         method=ood.DEFAULT_METHOD if out_of_distribution else None)
    report = trust.report()
    report["health"] = None if paths is None or hashes is None else health.dataset_health(
        paths, labels, label_names, hashes=hashes, features=features,
        validation=np.ones(len(labels), bool), out_of_fold_probabilities=out_of_fold,
        validation_predicted=np.asarray(out_of_fold).argmax(axis=1), folds=folds)
    return Assessment(trust, report)
