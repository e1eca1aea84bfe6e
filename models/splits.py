"""Splitting a labelled image set: a stratified hold-out split and stratified k folds.

Splits are over images, never over augmented views: every view of an image goes where its
image goes, so a validation image's views are never trained on.
"""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, validation_split: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices per label, seeded; every label with ≥ 2 images gets ≥ 1 in each part.

    Args:
        labels: int array (n,) of label indices.
        validation_split: share of each label to hold out, in (0, 1).

    Returns:
        (train_indices, validation_indices), each a sorted int array.
    """
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            train.extend(members)
            continue
        count = min(max(1, round(len(members) * validation_split)), len(members) - 1)
        validation.extend(members[:count])
        train.extend(members[count:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(validation, dtype=int))


def fold_count(labels: np.ndarray, validation_split: float) -> int:
    """k for k-fold cross-validation: round(1 / validation_split), at most the smallest label's
    count (so every fold validates every label), at least 2.

    Args:
        labels: int array (n,) of label indices.
    """
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    return max(2, min(round(1 / validation_split), smallest))


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Assigns each image to one of k folds, per label in turn, seeded.

    Each label's images are shuffled and dealt round-robin, continuing where the previous label
    stopped, so fold sizes differ by at most one and each label's by at most one.

    Args:
        labels: int array (n,) of label indices.
        k: number of folds (≥ 2).

    Returns:
        int array (n,) of fold indices in [0, k).
    """
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k ≥ 2. Received: k={k}")
    labels = np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    folds = np.zeros(len(labels), dtype=int)
    dealt = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (dealt + np.arange(len(members))) % k
        dealt += len(members)
    return folds
