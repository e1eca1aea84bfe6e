"""Choosing a head by stratified k-fold cross-validation on cached features: the lowest loss
along each L2 path, then the one-standard-error rule between paths.

Folds are over images: all augmented views of an image train together, and a fold's held-out
images are scored on their un-augmented view only, as serving sees them. Every candidate is
fitted k times on its rows (every view, or the originals only: `HeadCandidate.trained_on`).

The rule has two steps. Candidates that differ only in L2 strength form a path (one
architecture, one dropout, one set of rows); on a path the parameter count does not change and
the mean validation loss is a smooth function of the strength, so the path's point is its
lowest mean loss (losses within `LOSS_RESOLUTION` of it tie, and the stronger L2 wins the tie).
Taking the strongest L2 within a standard error instead over-regularised by about a point of
test accuracy on every benchmark (bench/RESULTS.md). Between paths the heads differ in kind
and size, and noise in the folds favours the bigger one, so there the one-standard-error rule
(Hastie, Tibshirani and Friedman, ESL §7.10) takes the head with the fewest parameters whose
path point is within one standard error of the best; between paths of the same size, the
lower loss. A last step guards the linear probe: when the winner is a head trained on augmented
views and the same head trained on the originals alone is a path point too, the augmented one
must beat it by more than the standard error of their paired per-image out-of-fold losses
(`rows_comparison`), the rule that keeps a fine-tuned model over the frozen head. The two have
the same parameter count, so the one-standard-error rule cannot tell them apart, but the views
are an assumption (that the label survives noise, flips, rotations and shifts) that the probe
does not make; where the folds cannot show that the assumption pays, the probe is served. On
the benchmarks this kept the augmented head where it won on test (hymenoptera, flowers5) and
took the probe on 20 images per label, where it scored 2 more test images (bench/RESULTS.md).
The chosen candidate's fold models also give the out-of-fold predictions the report's
validation metrics are computed from: each image scored by the one model that did not train on
it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from models.evaluation import accuracy, cross_entropy, image_losses
from models.options import HeadCandidate, HeadOptions, TrainingConfig
from models.progress import Progress, ProgressCallback, StopCheck

ONE_STANDARD_ERROR = ("lowest validation loss along each L2 path, then one standard error "
                      "between paths; augmented views only where they beat the originals by "
                      "more than a paired standard error")
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
        trained_on: its rows: "augmented" (every view) or "original" (view 0 only).
        fold_losses, fold_accuracies: float (k,) validation cross-entropy and accuracy per fold.
        best_epochs: per fold, the epoch whose weights the fold model kept.
        stopped_early: per fold, whether patience ended an Adam fit.
        histories: per fold, the fit's rows (see `fitting.FitResult.history`).
        out_of_fold: float64 (n, num_classes): each image's probabilities from the fold model
            that did not train on it.
        image_losses: float64 (n,) each image's out-of-fold cross-entropy (−log p of its label).
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
    image_losses: np.ndarray
    seconds: float = 0.0
    trained_on: str = "augmented"

    @property
    def candidate(self) -> HeadCandidate:
        return HeadCandidate(head=self.spec, trained_on=self.trained_on)

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
            "head": self.spec.as_dict(), "trained_on": self.trained_on, "d": self.d,
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
    #: The probe check that decided between the augmented head and the probe, if one did.
    augmentation: RowsComparison | None = None

    @property
    def result(self) -> CandidateResult:
        return self.candidates[self.chosen]

    @property
    def views_rejected(self) -> bool:
        """Whether the probe check compared augmented views with the originals and the views
        did not earn their place (not the same as "the originals are served": the preview
        tries no views at all)."""
        return self.augmentation is not None and not self.augmentation.earned

    @property
    def best(self) -> int:
        """Index of the lowest mean validation loss."""
        return int(np.argmin([c.loss_mean for c in self.candidates]))

    @property
    def smaller_rejected(self) -> int:
        """Candidates smaller than the chosen one (fewer parameters, or as many and stronger L2)
        whose mean validation loss was no lower than the chosen one's: the rule's reasons not to
        call the chosen head too big. (By the rule that is every smaller candidate.)"""
        chosen = self.result
        key = chosen.spec.size_key(self.feature_dim, self.num_classes)
        return sum(c.spec.size_key(self.feature_dim, self.num_classes) < key
                   and c.loss_mean >= chosen.loss_mean for c in self.candidates)

    @property
    def path_best(self) -> list[int]:
        """Index of each path's point (see `lowest_along_paths`), in candidate order."""
        return sorted(lowest_along_paths(self.candidates))

    def report(self) -> dict:
        """The report's `selection` entry (JSON-ready)."""
        paths = self.path_best
        return {
            "method": METHOD, "k": self.k, "rule": self.rule,
            "metric": "validation loss (cross-entropy), mean over folds",
            "threshold": round(_threshold([self.candidates[i] for i in paths]), 4),
            "best": self.best, "chosen": self.chosen, "path_best": paths,
            "candidates": [c.summary() for c in self.candidates],
            **({"augmentation": self.augmentation.report()} if self.augmentation else {}),
            **self.notes,
        }


def choose(candidates: Sequence[CandidateResult], feature_dim: int, num_classes: int) -> int:
    """The rule: each path's lowest mean validation loss, the one-standard-error rule between
    those points, then the probe unless augmentation earned its place (see the module
    docstring).

    Args:
        candidates: cross-validated on the same folds.
        feature_dim, num_classes: to count parameters.

    Returns:
        An index into `candidates`.
    """
    return decide(candidates, feature_dim, num_classes)[0]


def decide(candidates: Sequence[CandidateResult], feature_dim: int,
           num_classes: int) -> tuple[int, RowsComparison | None]:
    """`choose`, with the probe check that decided (None where none applied)."""
    winner = between_paths(candidates, feature_dim, num_classes)
    comparison = rows_comparison(candidates, winner)
    return (comparison.original if comparison and not comparison.earned else winner), comparison


def between_paths(candidates: Sequence[CandidateResult], feature_dim: int,
                  num_classes: int) -> int:
    """The first two steps of the rule: the one-standard-error rule between the path points.

    Returns:
        An index into `candidates`.
    """
    points = lowest_along_paths(candidates)
    return points[one_standard_error([candidates[i] for i in points], feature_dim, num_classes)]


@dataclass(frozen=True)
class RowsComparison:
    """A head trained on augmented views against the same head on the originals only, paired
    per image on their out-of-fold losses.

    Attributes:
        augmented, original: indices of the two path points.
        gain: mean per-image loss of the original one minus the augmented one's (> 0: the
            views helped); gain_se: the standard error of that mean.
    """

    augmented: int
    original: int
    gain: float
    gain_se: float

    @property
    def earned(self) -> bool:
        """Whether the views beat the originals by more than a standard error."""
        return self.gain > max(self.gain_se, LOSS_RESOLUTION)

    def report(self) -> dict:
        return {"augmented": self.augmented, "original": self.original,
                "gain": round(self.gain, 4), "gain_se": round(self.gain_se, 4),
                "earned": self.earned,
                "rule": "augmented views are served only where their per-image out-of-fold "
                        "loss beats the same head on the originals by more than the standard "
                        "error of the paired differences"}


def rows_comparison(candidates: Sequence[CandidateResult],
                    winner: int) -> RowsComparison | None:
    """The winner's head trained on augmented views against the same head trained on the
    originals only, both path points; None when the winner's head has no such pair.
    """
    points = lowest_along_paths(candidates)
    head = candidates[winner].spec
    pair = {candidates[i].trained_on: i for i in points
            if (candidates[i].spec.hidden_units, candidates[i].spec.dropout)
            == (head.hidden_units, head.dropout)}
    if winner not in pair.values() or len(pair) < 2:
        return None
    augmented, original = pair["augmented"], pair["original"]
    gains = candidates[original].image_losses - candidates[augmented].image_losses
    gain_se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return RowsComparison(augmented, original, float(gains.mean()), gain_se)


def lowest_along_paths(candidates: Sequence[CandidateResult]) -> list[int]:
    """Per path (candidates that differ only in L2), the index of its lowest mean validation
    loss; losses within `LOSS_RESOLUTION` of it tie and the strongest L2 among them wins.

    Returns:
        One index into `candidates` per path, in the order the paths first appear.
    """
    paths: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        paths.setdefault(c.candidate.path, []).append(i)
    points = []
    for members in paths.values():
        lowest = min(candidates[i].loss_mean for i in members)
        tied = [i for i in members if candidates[i].loss_mean <= lowest + LOSS_RESOLUTION]
        points.append(max(tied, key=lambda i: candidates[i].spec.l2))
    return points


def one_standard_error(candidates: Sequence[CandidateResult], feature_dim: int,
                       num_classes: int) -> int:
    """The smallest candidate whose mean validation loss is within one standard error of the
    lowest mean (Hastie, Tibshirani and Friedman, ESL §7.10), or within `LOSS_RESOLUTION`.

    Args:
        candidates: cross-validated on the same folds.
        feature_dim, num_classes: to count parameters ("smaller" = fewer parameters; among
            as many, the lower mean loss, then the stronger L2).

    Returns:
        An index into `candidates`.
    """
    threshold = _threshold(candidates)
    within = [i for i, c in enumerate(candidates) if c.loss_mean <= threshold]

    def key(i: int) -> tuple:
        parameters, *rest = candidates[i].spec.size_key(feature_dim, num_classes)
        return (parameters, round(candidates[i].loss_mean / LOSS_RESOLUTION), *rest)

    return min(within, key=key)


def _threshold(candidates: Sequence[CandidateResult]) -> float:
    best = min(candidates, key=lambda c: c.loss_mean)
    return best.loss_mean + max(best.loss_se, LOSS_RESOLUTION)


def training_rows(candidate: HeadCandidate, features: np.ndarray,
                  labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows a candidate trains on.

    Args:
        features: float32 (n, 1 + views, feature_dim); view 0 un-augmented.
        labels: int (n,).

    Returns:
        float32 (rows, feature_dim) features and int (rows,) labels: every view of every image
        (image-major), or view 0 only for a candidate trained on the originals.
    """
    if candidate.trained_on == "original":
        return features[:, 0], labels
    return features.reshape(-1, features.shape[-1]), np.repeat(labels, features.shape[1])


def cross_validate(specs: Sequence[HeadCandidate | HeadOptions], features: np.ndarray,
                   labels: np.ndarray, folds: np.ndarray, num_classes: int,
                   config: TrainingConfig, *,
                   on_progress: ProgressCallback = lambda progress: None,
                   should_stop: StopCheck = lambda: False) -> Selection:
    """Fits every candidate on every fold and chooses one (`choose`).

    With one candidate (a fixed head) nothing is chosen, but its folds still give out-of-fold
    metrics and the refit's epoch count.

    Args:
        specs: the candidates; a plain head trains on augmented rows.
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
    candidates = [c if isinstance(c, HeadCandidate) else HeadCandidate(head=c) for c in specs]
    labels = np.asarray(labels, int)
    n, _, feature_dim = features.shape
    k = int(folds.max()) + 1
    # Exact fits go from the strongest L2 down, each warm-started from the last on its path
    # and fold.
    order = sorted(range(len(candidates)), key=lambda i: (
        not candidates[i].head.is_exact, candidates[i].path,
        -candidates[i].head.l2 if candidates[i].head.is_exact else 0, i))
    losses = np.zeros((len(candidates), k))
    accuracies = np.zeros((len(candidates), k))
    best_epochs = [[0] * k for _ in candidates]
    stopped = [[False] * k for _ in candidates]
    histories: list[list[list[dict]]] = [[[] for _ in range(k)] for _ in candidates]
    out_of_fold = np.zeros((len(candidates), n, num_classes))
    seconds = np.zeros(len(candidates))
    for fold_index in range(k):
        train, held_out = folds != fold_index, folds == fold_index
        fold_of: dict[str, fitting.Fold] = {}  # by rows, built when first needed
        warm: dict[tuple, object] = {}
        for i in order:
            candidate, spec, rows = candidates[i], candidates[i].head, []
            if candidate.trained_on not in fold_of:
                fold_of[candidate.trained_on] = fitting.Fold(
                    *training_rows(candidate, features[train], labels[train]),
                    features[held_out, 0], labels[held_out])
            label = f"{i + 1}/{len(candidates)} fold {fold_index + 1}/{k}"

            def on_epoch(row: dict, label=label, rows=rows, spec=spec) -> None:
                rows.append(row)
                on_progress(Progress(
                    "training", epoch=row["epoch"],
                    max_epochs=None if spec.is_exact else config.max_epochs,
                    val_accuracy=row.get("val_accuracy"), candidate=label,
                    history=tuple(rows)))

            start = time.perf_counter()
            fit = fitting.fit_head(spec, fold_of[candidate.trained_on], num_classes, config,
                                   warm=warm.get(candidate.path) if spec.is_exact else None,
                                   on_epoch=on_epoch, should_stop=should_stop)
            seconds[i] += time.perf_counter() - start
            if spec.is_exact:
                warm[candidate.path] = fit.solution
            probabilities = fit.val_probabilities
            out_of_fold[i, held_out] = probabilities
            losses[i, fold_index] = cross_entropy(probabilities, labels[held_out])
            accuracies[i, fold_index] = accuracy(probabilities, labels[held_out])
            best_epochs[i][fold_index] = fit.best_epoch
            stopped[i][fold_index] = fit.stopped_early
            histories[i][fold_index] = fit.history
    results = [
        CandidateResult(c.head, c.head.parameters(feature_dim, num_classes), losses[i],
                        accuracies[i], best_epochs[i], stopped[i], histories[i], out_of_fold[i],
                        image_losses(out_of_fold[i], labels), seconds[i],
                        trained_on=c.trained_on)
        for i, c in enumerate(candidates)]
    if len(results) == 1:
        (chosen, comparison), rule = (0, None), FIXED
    elif features.shape[1] == 1:
        # NB: no augmented views: a head "on augmented views" trained on the originals, the
        # same rows as its twin, so there is nothing for the probe check to compare, and the
        # twin on the originals is what the winner really is.
        winner = between_paths(results, feature_dim, num_classes)
        twin = rows_comparison(results, winner)
        (chosen, comparison), rule = (twin.original if twin else winner, None), ONE_STANDARD_ERROR
    else:
        (chosen, comparison), rule = decide(results, feature_dim, num_classes), ONE_STANDARD_ERROR
    return Selection(folds, k, results, chosen, rule, feature_dim, num_classes,
                     seconds=time.perf_counter() - started, augmentation=comparison)


def mean_history(histories: Sequence[Sequence[dict]]) -> list[dict]:
    """The learning curve of a cross-validated head: per epoch, the mean over the folds that
    ran that epoch (`folds` says how many did; folds that stopped earlier are left out).

    The curve ends where fewer than a majority of the folds still run: past that a mean of one
    or two late folds jumps to their level, which reads as a change in training that did not
    happen (early stopping ends folds at different epochs).

    Args:
        histories: per fold, its rows {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}.

    Returns:
        One row per epoch while more than half the folds ran it, with the same keys plus
        "folds".
    """
    rows = []
    for epoch in range(1, max((len(h) for h in histories), default=0) + 1):
        present = [h[epoch - 1] for h in histories if len(h) >= epoch]
        if 2 * len(present) <= len(histories):
            break
        row = {"epoch": epoch}
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            values = [r[key] for r in present if key in r]
            if values:
                row[key] = round(float(np.mean(values)), 4)
        row["folds"] = len(present)
        rows.append(row)
    return rows
