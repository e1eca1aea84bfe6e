"""Choosing a head by stratified k-fold cross-validation on cached features, with the
one-standard-error rule.

Folds are over images: all augmented views of an image train together, and a fold's held-out
images are scored on their un-augmented view only, as serving sees them. Every candidate is
fitted k times; the chosen one is the smallest hypothesis (fewer parameters, then stronger L2)
whose mean validation loss is within one standard error of the lowest mean. The chosen
candidate's fold models also give the out-of-fold predictions the report's validation metrics
are computed from: each image scored by the one model that did not train on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.evaluation import accuracy, cross_entropy
from models.options import HeadOptions, TrainingConfig
from models.progress import Progress, ProgressCallback, StopCheck

ONE_STANDARD_ERROR = "one standard error"
FIXED = "fixed head (given in options): cross-validated for honest metrics, not chosen"
#: Mean validation losses closer than this (nats per image) are ties, even when their standard
#: error is smaller: on separable data every fold's loss goes to 0 and the SE with it, and the
#: rule would then pick whatever head reached 0.0000 first rather than the smaller one.
LOSS_RESOLUTION = 1e-3
METHOD = ("stratified k-fold cross-validation over images (augmented views stay with their "
          "image; held-out images are scored on their un-augmented view)")


@dataclass
class CandidateResult:
    """One head cross-validated over k folds.

    Attributes:
        spec: the head; d: its trainable parameters.
        fold_losses, fold_accuracies: float (k,) validation cross-entropy and accuracy per fold.
        best_epochs: per fold, the epoch whose weights the fold model kept.
        stopped_early: per fold, whether patience ended an Adam fit.
        histories: per fold, the fit's rows (see `fitting.FitResult.history`).
        out_of_fold: float64 (n, num_classes): each image's probabilities from the fold model
            that did not train on it.
        seconds: wall time of its k fits.
    """

    spec: HeadOptions
    d: int
    fold_losses: np.ndarray
    fold_accuracies: np.ndarray
    best_epochs: list[int]
    stopped_early: list[bool]
    histories: list[list[dict]]
    out_of_fold: np.ndarray
    seconds: float = 0.0

    @property
    def k(self) -> int:
        return len(self.fold_losses)

    @property
    def loss_mean(self) -> float:
        return float(self.fold_losses.mean())

    @property
    def loss_std(self) -> float:
        return float(self.fold_losses.std(ddof=1)) if self.k > 1 else 0.0

    @property
    def loss_se(self) -> float:
        """Standard error of the mean validation loss over folds: std / √k."""
        return self.loss_std / np.sqrt(self.k)

    @property
    def accuracy_mean(self) -> float:
        return float(self.fold_accuracies.mean())

    @property
    def accuracy_std(self) -> float:
        return float(self.fold_accuracies.std(ddof=1)) if self.k > 1 else 0.0

    @property
    def best_epoch(self) -> int:
        """The median over folds of the kept epoch: how long the refit trains (Adam)."""
        return max(1, round(float(np.median(self.best_epochs))))

    def summary(self) -> dict:
        """The report's entry for this candidate (JSON-ready)."""
        return {
            "head": self.spec.as_dict(), "d": self.d,
            "solver": "exact (L-BFGS)" if self.spec.is_exact else "adam, early stopping",
            "val_loss_mean": round(self.loss_mean, 4), "val_loss_std": round(self.loss_std, 4),
            "val_loss_se": round(self.loss_se, 4),
            "val_accuracy_mean": round(self.accuracy_mean, 4),
            "val_accuracy_std": round(self.accuracy_std, 4),
            "val_accuracy_se": round(self.accuracy_std / np.sqrt(self.k), 4),
            "best_epoch": self.best_epoch, "best_epochs": [int(e) for e in self.best_epochs],
            "epochs": int(sum(len(h) for h in self.histories)),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Selection:
    """The cross-validated candidates and the chosen one.

    Attributes:
        folds: int (n,) fold index of each image; k: the number of folds.
        candidates: in the order they were given.
        chosen: index into `candidates`; rule: how it was chosen.
        feature_dim, num_classes: what the heads' sizes were counted for.
    """

    folds: np.ndarray
    k: int
    candidates: list[CandidateResult]
    chosen: int
    rule: str
    feature_dim: int
    num_classes: int
    seconds: float = 0.0
    notes: dict = field(default_factory=dict)

    @property
    def result(self) -> CandidateResult:
        return self.candidates[self.chosen]

    @property
    def best(self) -> int:
        """Index of the lowest mean validation loss."""
        return int(np.argmin([c.loss_mean for c in self.candidates]))

    @property
    def smaller_rejected(self) -> int:
        """Candidates smaller than the chosen one (that cross-validation therefore found worse
        by more than a standard error)."""
        key = self.result.spec.size_key(self.feature_dim, self.num_classes)
        return sum(c.spec.size_key(self.feature_dim, self.num_classes) < key
                   for c in self.candidates)

    def report(self) -> dict:
        """The report's `selection` entry (JSON-ready)."""
        return {
            "method": METHOD, "k": self.k, "rule": self.rule,
            "metric": "validation loss (cross-entropy), mean over folds",
            "threshold": round(_threshold(self.candidates), 4),
            "best": self.best, "chosen": self.chosen,
            "candidates": [c.summary() for c in self.candidates],
            **self.notes,
        }


def one_standard_error(candidates: Sequence[CandidateResult], feature_dim: int,
                       num_classes: int) -> int:
    """The smallest candidate whose mean validation loss is within one standard error of the
    lowest mean (Hastie, Tibshirani and Friedman, ESL §7.10), or within `LOSS_RESOLUTION`.

    Args:
        candidates: cross-validated on the same folds.
        feature_dim, num_classes: to count parameters ("smaller" = fewer parameters, then
            stronger L2).

    Returns:
        An index into `candidates`.
    """
    threshold = _threshold(candidates)
    within = [i for i, c in enumerate(candidates) if c.loss_mean <= threshold]
    return min(within, key=lambda i: candidates[i].spec.size_key(feature_dim, num_classes))


def _threshold(candidates: Sequence[CandidateResult]) -> float:
    best = min(candidates, key=lambda c: c.loss_mean)
    return best.loss_mean + max(best.loss_se, LOSS_RESOLUTION)


def cross_validate(specs: Sequence[HeadOptions], features: np.ndarray, labels: np.ndarray,
                   folds: np.ndarray, num_classes: int, config: TrainingConfig, *,
                   on_progress: ProgressCallback = lambda progress: None,
                   should_stop: StopCheck = lambda: False) -> Selection:
    """Fits every candidate on every fold and chooses one.

    With one candidate (a fixed head) nothing is chosen, but its folds still give out-of-fold
    metrics and the refit's epoch count.

    Args:
        specs: the candidate heads.
        features: float32 (n, 1 + views, feature_dim) cached features; view 0 un-augmented.
        labels: int (n,) label index per image.
        folds: int (n,) fold index per image, from `splits.stratified_folds`.
        num_classes: outputs of the heads.
        config: optimisation settings for Adam-trained heads.
        on_progress: called per epoch with stage "training" and candidate "i/N fold f/k".
        should_stop: polled between batches and iterations; True raises `Cancelled`.

    Returns:
        The selection, with every candidate's fold scores and out-of-fold probabilities.
    """
    from models import fitting  # NB: TensorFlow; this module's rules import without it

    started = time.perf_counter()
    labels = np.asarray(labels, int)
    n, views, feature_dim = features.shape
    k = int(folds.max()) + 1
    # Exact fits go from the strongest L2 down, each warm-started from the last on its fold.
    order = sorted(range(len(specs)),
                   key=lambda i: (not specs[i].is_exact, -specs[i].l2 if specs[i].is_exact else 0, i))
    losses = np.zeros((len(specs), k))
    accuracies = np.zeros((len(specs), k))
    best_epochs = [[0] * k for _ in specs]
    stopped = [[False] * k for _ in specs]
    histories: list[list[list[dict]]] = [[[] for _ in range(k)] for _ in specs]
    out_of_fold = np.zeros((len(specs), n, num_classes))
    seconds = np.zeros(len(specs))
    for fold_index in range(k):
        train, held_out = folds != fold_index, folds == fold_index
        fold = fitting.Fold(features[train].reshape(-1, feature_dim),
                            np.repeat(labels[train], views),
                            features[held_out, 0], labels[held_out])
        warm = None
        for i in order:
            spec, rows = specs[i], []
            label = f"{i + 1}/{len(specs)} fold {fold_index + 1}/{k}"

            def on_epoch(row: dict, label=label, rows=rows, spec=spec) -> None:
                rows.append(row)
                on_progress(Progress(
                    "training", epoch=row["epoch"],
                    max_epochs=None if spec.is_exact else config.max_epochs,
                    val_accuracy=row.get("val_accuracy"), candidate=label,
                    history=tuple(rows)))

            start = time.perf_counter()
            fit = fitting.fit_head(spec, fold, num_classes, config,
                                   warm=warm if spec.is_exact else None, on_epoch=on_epoch,
                                   should_stop=should_stop)
            seconds[i] += time.perf_counter() - start
            if spec.is_exact:
                warm = fit.solution
            probabilities = fit.val_probabilities
            out_of_fold[i, held_out] = probabilities
            losses[i, fold_index] = cross_entropy(probabilities, labels[held_out])
            accuracies[i, fold_index] = accuracy(probabilities, labels[held_out])
            best_epochs[i][fold_index] = fit.best_epoch
            stopped[i][fold_index] = fit.stopped_early
            histories[i][fold_index] = fit.history
    candidates = [
        CandidateResult(spec, spec.parameters(feature_dim, num_classes), losses[i], accuracies[i],
                        best_epochs[i], stopped[i], histories[i], out_of_fold[i], seconds[i])
        for i, spec in enumerate(specs)]
    if len(candidates) == 1:
        chosen, rule = 0, FIXED
    else:
        chosen, rule = one_standard_error(candidates, feature_dim, num_classes), ONE_STANDARD_ERROR
    return Selection(folds, k, candidates, chosen, rule, feature_dim, num_classes,
                     seconds=time.perf_counter() - started)


def mean_history(histories: Sequence[Sequence[dict]]) -> list[dict]:
    """The learning curve of a cross-validated head: per epoch, the mean over the folds that
    ran that epoch (`folds` says how many did; folds that stopped earlier are left out).

    Args:
        histories: per fold, its rows {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}.

    Returns:
        One row per epoch up to the longest fold, with the same keys plus "folds".
    """
    rows = []
    for epoch in range(1, max((len(h) for h in histories), default=0) + 1):
        present = [h[epoch - 1] for h in histories if len(h) >= epoch]
        row = {"epoch": epoch}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            values = [r[key] for r in present if key in r]
            if values:
                row[key] = round(float(np.mean(values)), 4)
        row["folds"] = len(present)
        rows.append(row)
    return rows
