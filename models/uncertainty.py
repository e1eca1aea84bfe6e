"""Uncertainty sampling: which unlabeled images to label next.

An image the classifier is unsure about sits near a decision boundary between two labels; a
label there moves the boundary, a label for an image it already gets right with 0.99 teaches it
little (Settles, "Active learning literature survey", 2009). Two standard measures, both from the
head's (calibrated) probabilities:

- ``margin`` (the default): 1 − (p₁ − p₂), one minus the gap between the two best labels. It looks
  at exactly the boundary a label would move; for a linear head it orders binary images by their
  distance to the boundary.
- ``entropy``: −Σ p log p / log k, in [0, 1]; spreads attention over all labels.

Out-of-distribution images (see `models.ood`) are uncertain in a different way: they may need a
new label, or none. `suggest` ranks them after the in-distribution ones and says so, so a user
labels the informative photos first.

numpy only.
"""

from __future__ import annotations

import numpy as np

METHODS = ("margin", "entropy")


def uncertainty(probabilities: np.ndarray, method: str = "margin") -> np.ndarray:
    """How unsure the head is about each image; higher is more unsure.

    Args:
        probabilities: float (n, k) softmax probabilities, k ≥ 2.
        method: "margin" (1 − (p₁ − p₂)) or "entropy" (normalised to [0, 1]).

    Returns:
        float64 (n,) in [0, 1].
    """
    p = np.asarray(probabilities, np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"Expected probabilities of shape (n, k ≥ 2). Received: shape={p.shape}")
    if method == "margin":
        top_two = np.sort(p, axis=1)[:, -2:]
        return 1.0 - (top_two[:, 1] - top_two[:, 0])
    if method == "entropy":
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1) / np.log(p.shape[1])
    raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")


def rank(probabilities: np.ndarray, method: str = "margin",
         out_of_distribution: np.ndarray | None = None) -> np.ndarray:
    """Indices of the images, the most useful to label first.

    Args:
        probabilities: float (n, k); method: see `uncertainty`.
        out_of_distribution: bool (n,) or None; True ones go last (by their own uncertainty).

    Returns:
        int (n,): a permutation; ties keep input order.
    """
    scores = uncertainty(probabilities, method)
    unusual = (np.zeros(len(scores), bool) if out_of_distribution is None
               else np.asarray(out_of_distribution, bool))
    # np.lexsort sorts by the last key first: in-distribution first, then most uncertain.
    return np.lexsort((np.arange(len(scores)), -scores, unusual))


def suggest(probabilities: np.ndarray, label_names: list[str] | tuple[str, ...],
            method: str = "margin", out_of_distribution: np.ndarray | None = None,
            limit: int | None = None) -> list[dict]:
    """The ranked answer of `POST …/suggest`: one entry per image, most useful first.

    Args:
        probabilities: float (n, k) calibrated probabilities of the unlabeled images.
        label_names: the classifier's labels (k).
        out_of_distribution: bool (n,) from the classifier's OOD detector, or None.
        limit: at most this many entries.

    Returns:
        [{"index" (into the input), "uncertainty", "label", "score", "out_of_distribution"}];
        the caller adds each image's name.
    """
    p = np.asarray(probabilities, np.float64)
    scores = uncertainty(p, method)
    order = rank(p, method, out_of_distribution)[:limit]
    unusual = (np.zeros(len(p), bool) if out_of_distribution is None
               else np.asarray(out_of_distribution, bool))
    return [{"index": int(i), "uncertainty": round(float(scores[i]), 4),
             "label": label_names[int(p[i].argmax())], "score": round(float(p[i].max()), 4),
             "out_of_distribution": bool(unusual[i])} for i in order]
