"""The linear probe the default pipeline must not lose to (issue 12), in process.

A logistic regression on the same pooled backbone features the service computes (the
un-augmented image only), z-scored with the training images' statistics, with C chosen by
stratified 5-fold cross-validation from a grid, then refitted on every training image. It is
what a careful practitioner would try first. Two criteria for C are run, the lowest mean
cross-validated log loss and the highest mean accuracy (scikit-learn's `LogisticRegressionCV`
default; ties go to the smaller C), and the pipeline is compared with the better of the two on
the test images.

The solver is `models.logistic` (exact L-BFGS; scikit-learn is not a dependency): with
C = 1 / (2·l2·n) it minimises scikit-learn's objective (checked against its lbfgs solver).

Features are cached on disk per image content, image size and weights fingerprint, so a rerun
(and the few-shot split, a subset of hymenoptera) does not run the backbone again. This module
imports TensorFlow; `bench.quality` imports it only when the probe runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import Split

#: The C grid (inverse regularisation, scikit-learn's convention), ascending.
C_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "headstart-bench"


@dataclass(frozen=True)
class ProbeResult:
    """One probe: how C was chosen, its cross-validated scores and its test accuracy."""

    criterion: str           # "cv loss" or "cv accuracy"
    c: float
    cv_loss: float
    cv_accuracy: float
    test_correct: int
    test_total: int

    @property
    def test_accuracy(self) -> float:
        return self.test_correct / self.test_total


class FeatureCache:
    """Backbone features (view 0) by image content, for one backbone and image size."""

    def __init__(self, weights: str, image_size: int, directory: Path = CACHE):
        from models.backbone import load_backbone

        self.backbone = load_backbone(weights, image_size)
        self.image_size = image_size
        fingerprint = self.backbone.identity.fingerprint[:16]
        self.path = directory / f"features-{image_size}px-{fingerprint}.npz"
        self._vectors: dict[str, np.ndarray] = {}
        if self.path.is_file():
            with np.load(self.path) as archive:
                self._vectors = {key: archive[key] for key in archive.files}

    def features(self, paths: list[Path], batch_size: int = 32) -> np.ndarray:
        """float32 (len(paths), feature_dim), decoded exactly as the service decodes."""
        from models.preprocessing import load_image

        keys = [hashlib.sha256(path.read_bytes()).hexdigest() for path in paths]
        missing = [i for i, key in enumerate(keys) if key not in self._vectors]
        started = time.perf_counter()
        for start in range(0, len(missing), batch_size):
            batch = missing[start:start + batch_size]
            pixels = np.stack([load_image(paths[i].read_bytes(), self.image_size) for i in batch])
            for i, vector in zip(batch, self.backbone.features(pixels)):
                self._vectors[keys[i]] = vector
        if missing:
            print(f"probe: {len(missing)} images through the backbone in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.npz")
            np.savez(temporary, **self._vectors)
            os.replace(temporary, self.path)
        return np.stack([self._vectors[key] for key in keys])


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
          num_classes: int, seed: int = 0) -> list[ProbeResult]:
    """The probe under both criteria for C.

    Args:
        x_train, x_test: float32 (n, feature_dim) features; y_train, y_test: int (n,) labels.

    Returns:
        [chosen by cv loss, chosen by cv accuracy].
    """
    from models.logistic import Standardizer, fit_logistic
    from models.splits import stratified_folds

    k = max(2, min(FOLDS, int(np.bincount(y_train).min())))
    folds = stratified_folds(y_train, k, seed)
    losses = np.zeros((len(C_GRID), k))
    accuracies = np.zeros((len(C_GRID), k))
    for fold in range(k):
        train, held_out = folds != fold, folds == fold
        standardizer = Standardizer.fit(x_train[train])
        z, z_held_out = standardizer(x_train[train]), standardizer(x_train[held_out])
        warm = None
        for i, c in enumerate(C_GRID):  # strongest regularisation first, warm-started
            warm = fit_logistic(z, y_train[train], num_classes, 1 / (2 * c * len(z)), init=warm)
            p = warm.probabilities(z_held_out)
            truth = y_train[held_out]
            losses[i, fold] = -np.log(np.clip(p[np.arange(len(truth)), truth], 1e-7, 1)).mean()
            accuracies[i, fold] = (p.argmax(axis=1) == truth).mean()
    standardizer = Standardizer.fit(x_train)
    z, z_test = standardizer(x_train), standardizer(x_test)
    results = []
    for criterion, index in (("cv loss", int(np.argmin(losses.mean(axis=1)))),
                             ("cv accuracy", int(np.argmax(accuracies.mean(axis=1))))):
        c = C_GRID[index]
        solution = fit_logistic(z, y_train, num_classes, 1 / (2 * c * len(z)))
        correct = int((solution.probabilities(z_test).argmax(axis=1) == y_test).sum())
        results.append(ProbeResult(criterion, c, float(losses[index].mean()),
                                   float(accuracies[index].mean()), correct, len(y_test)))
    return results


def run(split: Split, cache: FeatureCache) -> list[ProbeResult]:
    """The probe on a benchmark split: train on `split.train`, test on `split.test`."""
    labels = split.labels
    index = {label: i for i, label in enumerate(labels)}
    x_train = cache.features([path for _, path in split.train])
    x_test = cache.features([path for _, path in split.test])
    y_train = np.array([index[label] for label, _ in split.train])
    y_test = np.array([index[label] for label, _ in split.test])
    return probe(x_train, y_train, x_test, y_test, len(labels))
