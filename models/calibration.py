"""Calibrated scores and rejection: temperature scaling, ECE, and a threshold for a precision.

A head trained with early stopping on a few hundred images is usually over- or under-confident:
its top score is not the probability of being right. Temperature scaling (Guo et al., 2017, "On
calibration of modern neural networks") divides the logits by one scalar T fitted on held-out
(validation) images by minimising their negative log-likelihood; it never changes which label
wins, only how sure the score says it is. With few held-out images that are all classified
right, the likelihood alone keeps asking for a smaller T (more confident scores, towards 1.0 for
every image); a Gaussian prior on log T centred on T = 1 (`LOG_TEMPERATURE_PRIOR_SD`, the fit
is its maximum a posteriori) lets a few dozen images move T only as far as they show, while a
few hundred images outweigh it. The expected calibration error (ECE: the gap between
confidence and accuracy, averaged over equal-width confidence bins, weighted by their counts) is
reported before and after.

A classifier's default threshold is then chosen on the calibrated validation scores: the lowest
top score at which the validation predictions that pass it reach the target precision. A
prediction below the threshold, or one whose image is out of distribution (`models.ood`), is
rejected: `decide` returns the label index or -1 with the reason.

The head's logits are only known up to a constant per row from its softmax output, which is all
temperature scaling needs: `logits_from_probabilities(p) = log p` gives the same calibrated
probabilities as the true logits.

Everything here is numpy (scipy for the 1-D minimisation, imported when used), cheap to import.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Equal-width confidence bins of the ECE (Guo et al. use 15).
ECE_BINS = 15
#: Search interval of the temperature (a safety net: the prior keeps T well inside it).
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Standard deviation of the prior on log T (centred on 0: T = 1, the head's own scores): about
#: two thirds of its mass on T in [1/e, e]; a held-out set the head classifies perfectly drives
#: the likelihood-optimal T towards 0, and this is what stops it there.
LOG_TEMPERATURE_PRIOR_SD = 1.0
#: Reasons a prediction is rejected, as the API names them.
BELOW_THRESHOLD = "below_threshold"
OUT_OF_DISTRIBUTION = "out_of_distribution"


def logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant, from softmax probabilities.

    Args:
        probabilities: float (n, k), rows summing to 1.

    Returns:
        float64 (n, k): log p, with zeros (float32 underflow) clipped to log(1e-30).
    """
    return np.log(np.clip(np.asarray(probabilities, np.float64), 1e-30, None))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of logits / temperature.

    Args:
        logits: float (n, k).

    Returns:
        float64 (n, k), rows summing to 1.
    """
    scaled = np.asarray(logits, np.float64) / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=1, keepdims=True)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray,
                            temperature: float = 1.0) -> float:
    """Mean cross-entropy of the labels under softmax(logits / temperature).

    Args:
        logits: float (n, k); labels: int (n,).
    """
    scaled = np.asarray(logits, np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float((log_z - shifted[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    prior_sd: float | None = LOG_TEMPERATURE_PRIOR_SD) -> float:
    """The most probable temperature given the labels: a bounded 1-D search over log T of the
    mean NLL plus the prior's (log T)² / (2 · prior_sd² · n).

    Args:
        logits: float (n, k) held-out logits (or `logits_from_probabilities`); labels: int (n,).
        bounds: (lowest, highest) temperature considered.
        prior_sd: standard deviation of the Gaussian prior on log T; None for the plain
            likelihood (Guo et al.).

    Returns:
        T > 0; 1.0 when there is nothing to fit on (no images).
    """
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return 1.0
    if not 0 < bounds[0] < 1 < bounds[1]:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high. Received: bounds={bounds}")
    from scipy.optimize import minimize_scalar  # NB: imported here, so the module imports fast

    weight = 0.0 if prior_sd is None else 1 / (2 * prior_sd ** 2 * len(labels))

    def objective(t: float) -> float:
        return negative_log_likelihood(logits, labels, t) + weight * np.log(t) ** 2

    result = minimize_scalar(lambda log_t: objective(np.exp(log_t)),
                             bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded",
                             options={"xatol": 1e-4})
    # NB: the bounded search never evaluates the ends of its interval, and stops a hair away from
    # a flat optimum: the ends and "leave the scores alone" (T = 1) compete with what it found.
    return min([float(np.exp(result.x)), bounds[0], bounds[1], 1.0], key=objective)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """ECE of the top-label confidence over equal-width bins of (0, 1].

    Args:
        probabilities: float (n, k); labels: int (n,).

    Returns:
        Σ_b (n_b / n) · |accuracy_b − mean confidence_b|, in [0, 1]; 0.0 for no images.
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; the top label's confidence is ≥ 1/k > 0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.sum() / len(labels) * abs(correct[members].mean()
                                                       - confidence[members].mean())
    return float(error)


@dataclass(frozen=True)
class Calibration:
    """A fitted temperature and what it did on the images it was fitted on.

    `ece_before`/`ece_after` are measured on those same (validation) images, the numbers the
    report shows; an unbiased estimate needs other images (bench/trust.py uses the test split).
    """

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    images: int

    def as_dict(self) -> dict:
        """The report's "calibration" field."""
        return {"temperature": round(self.temperature, 4), "ece_before": round(self.ece_before, 4),
                "ece_after": round(self.ece_after, 4), "nll_before": round(self.nll_before, 4),
                "nll_after": round(self.nll_after, 4), "images": self.images,
                "bins": ECE_BINS}


def calibrate(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fits temperature scaling on held-out images and measures ECE and NLL before and after.

    Args:
        logits: float (n, k) validation logits (or `logits_from_probabilities(p)`);
            labels: int (n,).
    """
    labels = np.asarray(labels, dtype=int)
    temperature = fit_temperature(logits, labels)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(softmax(logits), labels),
        ece_after=expected_calibration_error(softmax(logits, temperature), labels),
        nll_before=negative_log_likelihood(logits, labels) if len(labels) else 0.0,
        nll_after=negative_log_likelihood(logits, labels, temperature) if len(labels) else 0.0,
        images=int(len(labels)))


@dataclass(frozen=True)
class Threshold:
    """A rejection threshold on the calibrated top score, chosen on validation.

    Attributes:
        threshold: predictions whose top score is below it are rejected (0.0: none are).
        target_precision: what was asked for; None for "off".
        precision: precision of the validation predictions that pass (1.0 when none pass).
        coverage: share of validation images that pass.
        reached: whether `precision` ≥ `target_precision` (always True for "off").
    """

    threshold: float
    target_precision: float | None
    precision: float
    coverage: float
    reached: bool

    def as_dict(self) -> dict:
        return {"threshold": round(self.threshold, 4), "target_precision": self.target_precision,
                "validation_precision": round(self.precision, 4),
                "validation_coverage": round(self.coverage, 4), "reached": self.reached}


def precision_threshold(probabilities: np.ndarray, labels: np.ndarray,
                        target_precision: float | None) -> Threshold:
    """The lowest top-score threshold at which the kept validation predictions reach a precision.

    Precision here is the share of kept predictions (top score ≥ threshold) whose label is right,
    over all labels together. When no threshold reaches the target, the one with the highest
    precision is returned (the lowest such) with `reached=False`, so the caller can say so.

    Args:
        probabilities: float (n, k) calibrated validation probabilities; labels: int (n,).
        target_precision: in (0, 1], or None for "off" (threshold 0: reject nothing).
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, dtype=int)
    n = len(labels)
    correct = probabilities.argmax(axis=1) == labels if n else np.zeros(0, bool)
    if target_precision is None:
        return Threshold(0.0, None, float(correct.mean()) if n else 1.0, 1.0, True)
    if not 0 < target_precision <= 1:
        raise ValueError(f"target_precision must be in (0, 1]. Received: {target_precision}")
    if n == 0:
        return Threshold(0.0, target_precision, 1.0, 1.0, False)
    confidence = probabilities.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence, sorted_correct = confidence[order], correct[order]
    # Candidate cut i keeps the i + 1 most confident; ties must be kept or dropped together, so
    # only the last position of each run of equal confidences is a valid cut.
    kept = np.arange(1, n + 1)
    precision = np.cumsum(sorted_correct) / kept
    valid = np.r_[sorted_confidence[1:] < sorted_confidence[:-1], True]
    # NB: a tolerance, so a precision of exactly p (e.g. 19/20 for 0.95) counts as reached.
    reaching = np.flatnonzero(valid & (precision >= target_precision - 1e-12))
    if len(reaching):
        cut = reaching[-1]  # the most images kept
        return Threshold(float(sorted_confidence[cut]) if cut < n - 1 else 0.0, target_precision,
                         float(precision[cut]), float(kept[cut] / n), True)
    best = np.flatnonzero(valid & (precision == precision[valid].max()))[-1]
    return Threshold(float(sorted_confidence[best]), target_precision, float(precision[best]),
                     float(kept[best] / n), False)


@dataclass(frozen=True)
class Decision:
    """What predict answers for one image: `label` is an index, or -1 when rejected."""

    label: int
    score: float
    rejected: bool
    reason: str | None


def decide(probabilities: np.ndarray, threshold: float = 0.0,
           ood_scores: np.ndarray | None = None,
           ood_threshold: float | None = None) -> list[Decision]:
    """Applies the rejection rules to calibrated scores.

    An image is rejected as out of distribution when its OOD score is above `ood_threshold`
    (that reason wins: such a score says nothing about any label), else as low confidence when
    its top score is below `threshold`.

    Args:
        probabilities: float (n, k) calibrated probabilities (`softmax(logits, T)`).
        threshold: in [0, 1]; the classifier's default or the request's `?threshold=`.
        ood_scores: float (n,) from `models.ood.score`, or None to skip that check.
        ood_threshold: the classifier's OOD threshold; None skips that check.

    Returns:
        One `Decision` per row, in order. `score` is the top calibrated probability either way
        (the caller keeps `top_k` for rejected images too).
    """
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    probabilities = np.asarray(probabilities, np.float64)
    top = probabilities.argmax(axis=1)
    score = probabilities.max(axis=1)
    unusual = (np.zeros(len(top), bool) if ood_scores is None or ood_threshold is None
               else np.asarray(ood_scores) > ood_threshold)
    decisions = []
    for i in range(len(top)):
        if unusual[i]:
            decisions.append(Decision(-1, float(score[i]), True, OUT_OF_DISTRIBUTION))
        elif score[i] < threshold:
            decisions.append(Decision(-1, float(score[i]), True, BELOW_THRESHOLD))
        else:
            decisions.append(Decision(int(top[i]), float(score[i]), False, None))
    return decisions
