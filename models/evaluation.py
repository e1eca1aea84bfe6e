"""Scoring predicted probabilities against labels: accuracy, loss, per-label precision, recall
and F1, and the confusion matrix (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def evaluate(probabilities: np.ndarray, labels: np.ndarray, label_names: Sequence[str]) -> dict:
    """Accuracy, loss, per-label precision/recall/F1 and the confusion matrix.

    Args:
        probabilities: float (n, num_classes) softmax scores; labels: int (n,) true labels.
        label_names: the classifier's labels, in output order.

    Returns:
        {"accuracy", "loss" (mean cross-entropy), "per_label": {name: {"precision", "recall",
        "f1", "support"}}, "confusion_matrix": rows are true labels, columns predicted, in
        `label_names` order}.
    """
    labels = np.asarray(labels, int)
    k = len(label_names)
    probabilities = np.asarray(probabilities, np.float64).reshape(len(labels), k)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_label = {}
    for i, name in enumerate(label_names):
        true_positive = confusion[i, i]
        precision = true_positive / max(confusion[:, i].sum(), 1)
        recall = true_positive / max(confusion[i].sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "support": int(confusion[i].sum())}
    return {
        "accuracy": round(accuracy(probabilities, labels), 4),
        "loss": round(cross_entropy(probabilities, labels), 4),
        "per_label": per_label,
        "confusion_matrix": confusion.tolist(),
    }


def accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose highest score is the true label; 0 for no rows.

    Args:
        probabilities: float (n, num_classes); labels: int (n,).
    """
    return float((probabilities.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean −log p(true label), probabilities clipped at 1e-7 as Keras does; 0 for no rows.

    Args:
        probabilities: float (n, num_classes); labels: int (n,).
    """
    return float(image_losses(probabilities, labels).mean()) if len(labels) else 0.0


def image_losses(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 (n,) −log p(true label) per row, clipped at 1e-7 as `cross_entropy`."""
    picked = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, 1e-7, 1.0))
