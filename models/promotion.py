"""Whether a new version of a classifier beats the one in production, on images the production
version never trained on. Plain functions over arrays.

Both are scored on the same images: the new version's images that the production version's
dataset does not hold (by content). The new version's score on each is its out-of-fold
prediction (from the cross-validation fold model that did not train on it), the production
version's is its served head's prediction; neither trained on the image. A label the
production version does not know is one of its errors. The new version wins only with strictly
more correct answers: a tie keeps production, since moving it would change answers for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULE = ("accuracy on the new version's images that the production version never trained on: "
        "the new version's out-of-fold predictions against the production version's; labels "
        "the production version does not know count as its errors; the new version must be "
        "right on strictly more images")


def compare(new_probabilities: np.ndarray, old_probabilities: np.ndarray, labels: np.ndarray,
            new_labels: Sequence[str], old_labels: Sequence[str]) -> dict:
    """Scores two versions on the same images.

    Args:
        new_probabilities: float (k, len(new_labels)): the new version's out-of-fold scores.
        old_probabilities: float (k, len(old_labels)): the production version's scores.
        labels: int (k,): each image's true label, an index into `new_labels`.

    Returns:
        JSON-ready: "images", "new_correct", "old_correct", "new_accuracy", "old_accuracy",
        "unknown_to_old" (images whose label the old version lacks), "better", "rule".
    """
    labels = np.asarray(labels, dtype=int)
    count = len(labels)
    if np.shape(new_probabilities) != (count, len(new_labels)) or \
            np.shape(old_probabilities) != (count, len(old_labels)):
        raise ValueError(f"scores must be ({count}, labels) arrays. Received: "
                         f"{np.shape(new_probabilities)} and {np.shape(old_probabilities)}")
    new_correct = int((np.argmax(new_probabilities, axis=1) == labels).sum()) if count else 0
    old_index = {label: i for i, label in enumerate(old_labels)}
    wanted = np.array([old_index.get(new_labels[label], -1) for label in labels], dtype=int)
    old_correct = int((np.argmax(old_probabilities, axis=1) == wanted)[wanted >= 0].sum()) \
        if count else 0
    return {"images": count, "new_correct": new_correct, "old_correct": old_correct,
            "new_accuracy": round(new_correct / count, 4) if count else None,
            "old_accuracy": round(old_correct / count, 4) if count else None,
            "unknown_to_old": int((wanted < 0).sum()), "better": new_correct > old_correct,
            "rule": RULE}
