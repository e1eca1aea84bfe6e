"""Training a classifier: cached features of every image and its augmented views, a head chosen
by stratified k-fold cross-validation, a refit of that head on every image, and the report.

The method keeps d/m small: m grows with augmented views, d shrinks with a frozen backbone and a
small head chosen by cross-validation (the one-standard-error rule prefers the smaller of two
heads that validation cannot tell apart). The backbone runs exactly once per (image, view);
every candidate, fold and epoch trains on the cached feature vectors. No image is held out of
the served head: it is refitted on all of them, and the validation metrics are out of fold.
`assess` then fits the head's trust data (temperature, default threshold, OOD reference) on the
out-of-fold scores and checks the dataset's health: once per trained head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from models import fitting, health, trust
from models.diagnosis import diagnose
from models.evaluation import evaluate
from models.features import FeatureCache, extract_features
from models.options import HeadOptions, TrainingConfig
from models.progress import Cancelled, Progress, ProgressCallback, StopCheck
from models.selection import Selection, cross_validate, mean_history, training_rows
from models.splits import fold_count, stratified_folds, stratified_split

# NB: Cancelled, Progress, TrainingConfig and stratified_split are imported from here by the
# service and the benchmarks.
__all__ = ["Cancelled", "Progress", "ProgressCallback", "StopCheck", "TrainingConfig",
           "TrainingResult", "stratified_split", "train_classifier"]

#: What the report's history shows, in words.
HISTORY = ("the chosen head's learning curve: per epoch, the mean over its k fold fits (each "
           "scored on its held-out images); `folds` counts the fits still running that epoch. "
           "An exact (L-BFGS) fit counts each iteration, a full pass, as an epoch, and starts from "
           "the solution of the next stronger L2 on its fold, so its curve is short")
VALIDATION = ("out of fold: every image scored once, by the chosen head's fold model that did "
              "not train on it (the served head is refitted on every image)")


@dataclass
class TrainingResult:
    """A trained head and everything the report needs.

    Attributes:
        spec: the chosen head; head: the Keras head refitted on every image.
        report: JSON-ready (see `train_classifier`).
        selection: every candidate's cross-validation.
        trust: the head's calibration, default threshold and OOD detector (`models.trust`),
            stored in its head file.
    """

    spec: HeadOptions
    head: keras.Model
    report: dict
    selection: Selection
    trust: trust.Trust | None = None


def train_classifier(images: Sequence[bytes], labels: np.ndarray, label_names: Sequence[str],
                     backbone, config: TrainingConfig, *,
                     on_progress: ProgressCallback = lambda progress: None,
                     should_stop: StopCheck = lambda: False,
                     cache: FeatureCache | None = None,
                     paths: Sequence[str] | None = None,
                     hashes: Sequence[str] | None = None) -> TrainingResult:
    """Trains a head for a labeled image set.

    Args:
        images: encoded image files (already checked to decode).
        labels: int array (n,), indices into `label_names`.
        label_names: the classifier's labels, in output order.
        backbone: the shared frozen feature extractor (`models.backbone.Backbone`).
        config: folds, augmentation, head candidates and optimisation settings.
        on_progress: called with a `Progress` per extraction batch and per epoch.
        should_stop: polled between batches and epochs; True raises `Cancelled`.
        cache: feature rows of earlier runs (`features.FeatureCache`): the backbone runs only
            for the (image, view) pairs it lacks, and they are added to it.
        paths: each image's archive path, for the report's "health" (default: "image {i}").
        hashes: each file's `health.content_hash` (default: computed here).

    Returns:
        The refitted head, its trust data and the training report: "m" (images, all of them
        both trained on and validated out of fold), "d", "d_over_m", "diagnosis", "head", "selection",
        "history" and "best_epoch" / "stopped_early" (of the chosen head's folds),
        "train_accuracy" (the refit on its own images), "validation" (out of fold) and
        "timings_s" (decode, features, selection, head = the refit, trust), and
        "calibration", "threshold", "rejection", "ood", "health" (`trust.assess`).
    """
    if hashes is None:
        hashes = [health.content_hash(image) for image in images]
    if paths is None:
        paths = [f"image {i}" for i in range(len(images))]
    timings: dict[str, float] = {}
    # The total is known before the first (slow) batch.
    on_progress(Progress("extracting", images_done=0, images_total=len(images)))
    features = extract_features(
        images, backbone, views=config.augmentation.views, augmentation=config.augmentation,
        seed=config.seed, batch_size=config.extract_batch_size,
        on_batch=lambda done: on_progress(Progress("extracting", images_done=done,
                                                   images_total=len(images))),
        should_stop=should_stop, timings=timings, max_pixels=config.max_image_pixels,
        cache=cache)
    return train_on_features(features, labels, label_names, config, timings=timings,
                             on_progress=on_progress, should_stop=should_stop, paths=paths,
                             hashes=hashes)


def train_on_features(features: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                      config: TrainingConfig, *, timings: dict[str, float] | None = None,
                      on_progress: ProgressCallback = lambda progress: None,
                      should_stop: StopCheck = lambda: False,
                      paths: Sequence[str] | None = None,
                      hashes: Sequence[str] | None = None) -> TrainingResult:
    """Chooses, refits and reports a head on cached features: `train_classifier` after the
    backbone.

    Args:
        features: float32 (n, 1 + views, feature_dim) from `features.extract_features`.
        labels: int array (n,), indices into `label_names`.
        label_names: the classifier's labels, in output order.
        config: folds, head candidates and optimisation settings.
        timings: seconds so far (decode, features); selection and head are added.
        on_progress, should_stop: as for `train_classifier`.
        paths, hashes: per image, for the report's "health" (null without both).

    Returns:
        As `train_classifier`.
    """
    labels = np.asarray(labels, dtype=int)
    num_classes = len(label_names)
    timings = {} if timings is None else timings
    k = fold_count(labels, config.validation_split)
    folds = stratified_folds(labels, k, config.seed)

    start = time.perf_counter()
    selection = cross_validate(config.heads, features, labels, folds, num_classes, config,
                               on_progress=on_progress, should_stop=should_stop)
    timings["selection"] = time.perf_counter() - start
    chosen = selection.result

    start = time.perf_counter()

    def on_epoch(row: dict) -> None:
        # NB: no history: the refit has no validation rows, and a learning-curve row has them.
        on_progress(Progress("training", epoch=row["epoch"],
                             max_epochs=None if chosen.spec.is_exact else chosen.best_epoch,
                             candidate="refit"))

    everything = fitting.Fold(*training_rows(chosen.candidate, features, labels))
    refit = fitting.fit_head(chosen.spec, everything, num_classes, config,
                             epochs=chosen.best_epoch, build=True, on_epoch=on_epoch,
                             should_stop=should_stop)
    timings["head"] = time.perf_counter() - start

    start = time.perf_counter()
    assessment = assess(features[:, 0], labels, label_names, chosen.out_of_fold, folds, config,
                        paths=paths, hashes=hashes)
    timings["trust"] = time.perf_counter() - start

    validation = evaluate(chosen.out_of_fold, labels, label_names)
    training = evaluate(np.asarray(refit.model.predict_on_batch(features[:, 0])), labels,
                        label_names)
    d = chosen.d
    m = len(everything.y_train)
    counts = {name: int((labels == i).sum()) for i, name in enumerate(label_names)}
    selection_report = selection.report()
    selection_report.update({
        "history": HISTORY, "validation": VALIDATION,
        "refit": {"images": len(labels), "rows": m, "trained_on": chosen.trained_on,
                  "epochs": refit.epochs,
                  "how": ("solved exactly on every image's rows" if chosen.spec.is_exact else
                          "Adam for the chosen head's median best epoch over its folds, on "
                          "every image's rows, without early stopping")},
    })
    report = {
        "labels": list(label_names),
        "m": {
            "train": len(labels), "validation": len(labels),
            "train_after_augmentation": m,
            "per_label": {name: {"train": count, "validation": count}
                          for name, count in counts.items()},
        },
        "d": d,
        "d_over_m": round(d / m, 4),
        "diagnosis": diagnose(d, m, training["accuracy"], validation["accuracy"], len(labels),
                              num_classes, candidates=len(selection.candidates),
                              smaller_rejected=selection.smaller_rejected,
                              trained_on=chosen.trained_on),
        "head": chosen.spec.as_dict(),
        "selection": selection_report,
        "history": mean_history(chosen.histories),
        "best_epoch": chosen.best_epoch,
        "stopped_early": bool(np.mean(chosen.stopped_early) > 0.5),
        "train_accuracy": training["accuracy"],
        "validation": validation,
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
        **assessment.report,
    }
    return TrainingResult(chosen.spec, refit.model, report, selection, assessment.trust)


def assess(features: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
           out_of_fold: np.ndarray, folds: np.ndarray, config: TrainingConfig, *,
           paths: Sequence[str] | None = None,
           hashes: Sequence[str] | None = None) -> trust.Assessment:
    """Trust and health of one trained head under the run's `reject` option (`trust.assess`).

    Args:
        features: float32 (n, feature_dim) view 0 of every image; out_of_fold: float (n, k);
            folds: int (n,); the rest as for `train_on_features`.
    """
    reject = config.reject
    return trust.assess(
        features, labels, label_names, out_of_fold, folds, paths=paths, hashes=hashes,
        target_precision=None if reject == "off" else reject.target_precision,
        out_of_distribution=reject != "off" and reject.out_of_distribution)

