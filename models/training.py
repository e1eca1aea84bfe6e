"""Training a classifier in stages: cached features of every image and its augmented views, a
head chosen by stratified k-fold cross-validation, a refit of that head on every image, and the
report; a first head early, better ones as they come.

The method keeps d/m small: m grows with augmented views, d shrinks with a frozen backbone and a
small head chosen by cross-validation (the one-standard-error rule prefers the smaller of two
heads that validation cannot tell apart). The backbone runs exactly once per (image, view);
every candidate, fold and epoch trains on the cached feature vectors. No image is held out of
the served head: it is refitted on all of them, and the validation metrics are out of fold.
`assess` then fits the head's trust data (temperature, default threshold, OOD reference) on the
out-of-fold scores and checks the dataset's health: once per trained head, so once per stage.

Staged training (`STAGES`): "preview" trains on the un-augmented view only (one backbone pass
per image) with the exact logistic-regression candidates, so a first head exists soon after one
pass over the dataset; "augmented" then extracts the augmented views (view 0 is reused, not run
again) and cross-validates every candidate. Every stage uses the same folds, so their
out-of-fold validation losses compare; a stage is handed to `on_stage` only when its loss is
lower than that of the best stage so far, and the best is returned.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from models import fitting, health, trust
from models.backbone import Backbone
from models.diagnosis import diagnose
from models.evaluation import cross_entropy, evaluate
from models.features import FeatureCache, extract_features, image_hash
from models.finetune import fine_tune_stage
from models.options import HeadCandidate, HeadOptions, TrainingConfig
from models.preprocessing import DecodedImages
from models.progress import Cancelled, Progress, ProgressCallback, StopCheck
from models.results import TrainingResult
from models.selection import Selection, cross_validate, mean_history, training_rows
from models.splits import fold_count, stratified_folds, stratified_split

# NB: Cancelled, Progress, TrainingConfig and stratified_split are imported from here by the
# service and the benchmarks.
__all__ = ["STAGES", "Cancelled", "Progress", "ProgressCallback", "StopCheck", "TrainingConfig",
           "TrainingResult", "stratified_split", "train_classifier"]

#: What the report's history shows, in words.
HISTORY = ("the chosen head's learning curve: per epoch, the mean over its k fold fits (each "
           "scored on its held-out images); `folds` counts the fits still running that epoch. "
           "An exact (L-BFGS) fit counts each iteration, a full pass, as an epoch, and starts from "
           "the solution of the next stronger L2 on its fold, so its curve is short")
VALIDATION = ("out of fold: every image scored once, by the chosen head's fold model that did "
              "not train on it (the served head is refitted on every image)")


StageCallback = Callable[[TrainingResult], None]


@dataclass
class StagedRun:
    """What the stages of one `train_classifier` call share: the images, the folds (the same
    for every stage, so their losses compare) and the features extracted so far."""

    images: Sequence[bytes]
    labels: np.ndarray
    label_names: Sequence[str]
    backbone: Backbone
    config: TrainingConfig
    folds: np.ndarray
    on_progress: ProgressCallback
    should_stop: StopCheck
    cache: FeatureCache | None = None
    paths: Sequence[str] | None = None
    hashes: Sequence[str] | None = None
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    #: float32 (n, 1 + views, feature_dim): the views extracted so far (None before the first).
    features: np.ndarray | None = None
    #: The served stage's result so far (None before the first): what later stages must beat.
    best: TrainingResult | None = None

    def progress(self, stage: str) -> ProgressCallback:
        """`on_progress`, with each report naming the stage it belongs to."""
        return lambda progress: self.on_progress(
            dataclasses.replace(progress, training_stage=stage))

    def extract(self, stage: str, views: int) -> np.ndarray:
        """Features with `views` augmented views per image; view 0 is reused once extracted."""
        if self.features is not None and self.features.shape[1] == 1 + views:
            return self.features
        report, total = self.progress(stage), len(self.images)
        report(Progress("extracting", images_done=0, images_total=total))  # before the slow part
        config = self.config
        self.features = extract_features(
            self.images, self.backbone, views=views, augmentation=config.augmentation,
            seed=config.seed, batch_size=config.extract_batch_size,
            on_batch=lambda done: report(Progress("extracting", images_done=done,
                                                  images_total=total)),
            should_stop=self.should_stop, timings=self.timings,
            max_pixels=config.max_image_pixels, cache=self.cache,
            original=None if self.features is None else self.features[:, 0])
        return self.features

    def fit(self, stage: str, features: np.ndarray,
            heads: Sequence[HeadCandidate]) -> TrainingResult:
        """Cross-validates `heads` on the run's folds, refits the chosen one, reports it."""
        return train_on_features(features, self.labels, self.label_names, self.config,
                                 timings=dict(self.timings), heads=heads, folds=self.folds,
                                 stage=stage, on_progress=self.progress(stage),
                                 should_stop=self.should_stop, paths=self.paths,
                                 hashes=self.hashes)


def preview_heads(config: TrainingConfig) -> tuple[HeadCandidate, ...]:
    """The preview's candidates: the exact (logistic-regression) heads on the originals, which
    take seconds on cached features; a fixed Adam-trained head is trained as given."""
    exact, seen = [], set()
    for candidate in config.heads:
        key = tuple(candidate.head.as_dict().values())
        if candidate.head.is_exact and key not in seen:
            seen.add(key)
            exact.append(HeadCandidate(head=candidate.head, trained_on="original"))
    return tuple(exact) or config.heads


def preview_stage(run: StagedRun) -> TrainingResult:
    """Un-augmented features (one backbone pass per image) and the exact candidates."""
    return run.fit("preview", run.extract("preview", views=0), preview_heads(run.config))


def augmented_stage(run: StagedRun) -> TrainingResult | None:
    """The augmented views (view 0 reused) and every candidate; None when that is the
    preview's work again (no views, and every head already tried by the preview)."""
    views = run.config.augmentation.views
    tried = {tuple(c.head.as_dict().values()) for c in preview_heads(run.config)}
    if views == 0 and {tuple(c.head.as_dict().values()) for c in run.config.heads} <= tried:
        return None
    return run.fit("augmented", run.extract("augmented", views=views), run.config.heads)


def fine_tuned_stage(run: StagedRun) -> TrainingResult | None:
    """The deepest blocks fine-tuned from the served head (`finetune.fine_tune_stage`, which
    decides whether it runs and whether it won); None when the served head stays, with the
    reason in its report's "fine_tuning"."""
    frozen, config = run.best, run.config
    if frozen is None:
        return None
    pixels = DecodedImages(run.images, run.backbone.image_size, max_pixels=config.max_image_pixels)
    result = fine_tune_stage(pixels, run.labels, run.label_names, frozen, run.backbone, config,
                             hashes=[image_hash(image) for image in run.images],
                             on_progress=run.progress("fine_tuned"),
                             should_stop=run.should_stop)
    if result is frozen:
        return None
    # NB: fine-tuning is scored against the served head on the same held-out images (paired
    # per-image losses); on the stages' scale its loss is the served one less that gain.
    result.val_loss = frozen.val_loss - result.report["fine_tuning"]["improvement"]
    return result


Stage = Callable[[StagedRun], "TrainingResult | None"]
#: The stages of a run, in order: each makes a head from what the run has so far, or returns
#: None where it does not apply. Adding a stage is adding its entry.
STAGES: tuple[tuple[str, Stage], ...] = (
    ("preview", preview_stage),
    ("augmented", augmented_stage),
    ("fine_tuned", fine_tuned_stage),
)


def train_classifier(images: Sequence[bytes], labels: np.ndarray, label_names: Sequence[str],
                     backbone, config: TrainingConfig, *,
                     on_progress: ProgressCallback = lambda progress: None,
                     should_stop: StopCheck = lambda: False,
                     on_stage: StageCallback = lambda result: None,
                     stages: Sequence[tuple[str, Stage]] | None = None,
                     cache: FeatureCache | None = None,
                     paths: Sequence[str] | None = None,
                     hashes: Sequence[str] | None = None) -> TrainingResult:
    """Trains a head for a labeled image set, stage by stage (`STAGES`).

    Args:
        images: encoded image files (already checked to decode).
        labels: int array (n,), indices into `label_names`.
        label_names: the classifier's labels, in output order.
        backbone: the shared frozen feature extractor (`models.backbone.Backbone`).
        config: folds, augmentation, head candidates and optimisation settings.
        on_progress: called with a `Progress` per extraction batch and per epoch, naming its
            stage (`training_stage`).
        should_stop: polled between batches and epochs; True raises `Cancelled`.
        on_stage: called with each stage's result whose out-of-fold validation loss is lower
            than every earlier stage's (the first stage's always): the head to serve now.
            What it raises stops training.
        stages: the stages to run (default `STAGES`, read when called).
        cache: feature rows of earlier runs (`features.FeatureCache`): the backbone runs only
            for the (image, view) pairs it lacks, and they are added to it.
        paths: each image's archive path, for the report's "health" (default: "image {i}").
        hashes: each file's `health.content_hash` (default: computed here).

    Returns:
        The best stage's result (the last one given to `on_stage`), its `stages` summarising
        every stage. Its report: "stage", "m" (images, all of them both trained on and
        validated out of fold), "d", "d_over_m", "diagnosis", "head", "selection", "history"
        and "best_epoch" / "stopped_early" (of the chosen head's folds), "train_accuracy" (the
        refit on its own images), "validation" (out of fold), "timings_s" (decode and
        features so far, this stage's selection, head = the refit, and trust), and
        "calibration", "threshold", "rejection", "ood", "health" (`trust.assess`).
    """
    if hashes is None:
        hashes = [health.content_hash(image) for image in images]
    if paths is None:
        paths = [f"image {i}" for i in range(len(images))]
    labels = np.asarray(labels, dtype=int)
    folds = stratified_folds(labels, fold_count(labels, config.validation_split), config.seed)
    run = StagedRun(images, labels, label_names, backbone, config, folds, on_progress,
                    should_stop, cache, paths, hashes)
    best: TrainingResult | None = None
    summaries: list[dict] = []
    views_rejected = False
    for _name, stage in STAGES if stages is None else stages:
        result = stage(run)
        if result is None:
            continue
        views_rejected |= result.selection.views_rejected
        better = best is None or result.val_loss < best.val_loss
        summaries.append(stage_summary(result, time.perf_counter() - run.started, better))
        result.stages = tuple(summaries)
        if better:
            best = run.best = result
            on_stage(result)
        if should_stop():
            raise Cancelled()
    if best is None:
        raise ValueError("no training stage applied: give at least one stage that makes a head")
    best.stages = tuple(summaries)
    if views_rejected and not best.selection.views_rejected:
        # the preview tried no views, so its advice was "try views"; a later stage did, and
        # they lost: the served head's final report must not advise them again
        best.report["diagnosis"] = diagnosis(best.report, best.selection, views_rejected=True)
    return best


def stage_summary(result: TrainingResult, elapsed_s: float, served: bool) -> dict:
    """What the classifier shows of one stage: {"stage", "val_loss", "val_accuracy", "d",
    "head", "elapsed_s" (since training started), "served" (it replaced the served head)},
    and "augmentation" where its selection compared augmented views with the originals
    (`selection.RowsComparison.report`: why the preview's probe may stay served)."""
    augmentation = result.report.get("selection", {}).get("augmentation")
    return {"stage": result.stage, "val_loss": round(result.val_loss, 4),
            "val_accuracy": result.report["validation"]["accuracy"], "d": result.report["d"],
            "head": result.spec.as_dict(), "elapsed_s": round(elapsed_s, 3), "served": served,
            **({"augmentation": augmentation} if augmentation else {})}


def train_on_features(features: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                      config: TrainingConfig, *, timings: dict[str, float] | None = None,
                      heads: Sequence[HeadCandidate] | None = None,
                      folds: np.ndarray | None = None, stage: str = "augmented",
                      on_progress: ProgressCallback = lambda progress: None,
                      should_stop: StopCheck = lambda: False,
                      paths: Sequence[str] | None = None,
                      hashes: Sequence[str] | None = None) -> TrainingResult:
    """Chooses, refits and reports a head on cached features: one stage of `train_classifier`
    after the backbone. Everything done to a chosen head (refit, report) happens here, once
    per stage.

    Args:
        features: float32 (n, 1 + views, feature_dim) from `features.extract_features`.
        labels: int array (n,), indices into `label_names`.
        label_names: the classifier's labels, in output order.
        config: folds, head candidates and optimisation settings.
        timings: seconds so far (decode, features); selection and head are added.
        heads: the candidates (default: `config.heads`).
        folds: int (n,) fold per image (default: `stratified_folds` of the config's split).
        stage: the stage this is, for the result and report.
        on_progress, should_stop: as for `train_classifier`.
        paths, hashes: per image, for the report's "health" (null without both).

    Returns:
        As `train_classifier` (with `stages` empty).
    """
    labels = np.asarray(labels, dtype=int)
    num_classes = len(label_names)
    timings = {} if timings is None else timings
    if folds is None:
        folds = stratified_folds(labels, fold_count(labels, config.validation_split),
                                 config.seed)

    start = time.perf_counter()
    selection = cross_validate(tuple(heads or config.heads), features, labels, folds,
                               num_classes, config, on_progress=on_progress,
                               should_stop=should_stop)
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
        "stage": stage,
        "labels": list(label_names),
        "m": {
            "train": len(labels), "validation": len(labels),
            "train_after_augmentation": m,
            "per_label": {name: {"train": count, "validation": count}
                          for name, count in counts.items()},
        },
        "d": d,
        "d_over_m": round(d / m, 4),
        "diagnosis": [],  # below, from the report's numbers
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
    report["diagnosis"] = diagnosis(report, selection, views_rejected=selection.views_rejected)
    return TrainingResult(chosen.spec, refit.model, report, selection, assessment.trust,
                          stage=stage, val_loss=cross_entropy(chosen.out_of_fold, labels))


def diagnosis(report: dict, selection, *, views_rejected: bool) -> list[str]:
    """The report's advice on its head (`diagnosis.diagnose`), from the report's own numbers
    and the selection that chose the head."""
    m = report["m"]
    return diagnose(report["d"], m["train_after_augmentation"], report["train_accuracy"],
                    report["validation"]["accuracy"], m["validation"], len(report["labels"]),
                    candidates=len(selection.candidates),
                    smaller_rejected=selection.smaller_rejected, views_rejected=views_rejected)


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

