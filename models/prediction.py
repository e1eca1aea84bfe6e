"""Prediction: backbone features → head → softmax scores → ranked labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # NB: no TensorFlow at import: the API process imports this before it forks
    import keras

    from models.backbone import Backbone


def class_scores(backbone: Backbone, head: keras.Model, images: np.ndarray) -> np.ndarray:
    """Softmax probabilities for a batch of images.

    Args:
        images: float32 (or uint8) array (batch, size, size, 3) from `preprocessing.load_image`.

    Returns:
        float32 array (batch, num_classes); each row sums to 1.
    """
    return apply_head(head, backbone.features(images))


def apply_head(head: keras.Model, features: np.ndarray) -> np.ndarray:
    """Softmax probabilities from backbone features (batch, feature_dim)."""
    return np.asarray(head(features, training=False), dtype=np.float32)


def rank(scores: np.ndarray, labels: Sequence[str], top_k: int) -> list[list[tuple[str, float]]]:
    """The top_k (label, score) pairs of each row, best first; ties keep label order."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return [[(labels[i], float(row[i])) for i in indices] for row, indices in zip(scores, order)]
