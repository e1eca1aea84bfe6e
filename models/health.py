"""Dataset health: what in the uploaded folders makes the classifier worse or its metrics wrong.

Found from arrays the training run already has (file hashes, backbone features of the original
images, labels, the validation split, out-of-fold probabilities), so it costs no backbone pass:

- **duplicates**: files with the same bytes (SHA-256). Same bytes under two labels is a
  contradiction; in train and validation it is leakage (`across_split`).
- **near_duplicates**: distinct files whose features are nearly parallel (cosine similarity of
  mean-centred features ≥ NEAR_DUPLICATE_SIMILARITY): re-saves, resizes, small crops, burst
  shots. `across_split: true` marks a train/validation pair, which inflates validation accuracy.
- **suspected_mislabels**: images whose out-of-fold predicted probabilities disagree with their
  folder, by confident learning (Northcutt et al., 2021) as implemented by cleanlab's
  `filter.find_label_issues`, ranked by self-confidence (lowest probability of the given label
  first). Out-of-fold: each image is scored by a head that never saw it, else the head simply
  memorises the wrong label.
- **imbalance**: images per label and the largest/smallest ratio.
- **warnings**: the findings in words, and a classifier that collapsed to one label (validation
  balanced accuracy near chance, or one label predicted for everything).

Every entry names archive paths ("label/file.jpg"), so a user can fix the folder.

numpy (and cleanlab, imported when used); no TensorFlow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

#: Cosine similarity of mean-centred features at or above which two images are near copies.
#: Chosen by bench/trust.py: planted near copies (rescaled 85-95 %, cropped, JPEG re-saved at
#: quality 70) scored ≥ 0.964 on hymenoptera (224 px) and ≥ 0.914 on flowers5 (128 px), the most
#: similar pairs of distinct photos at most 0.873 and 0.857.
NEAR_DUPLICATE_SIMILARITY = 0.9
#: Largest / smallest label count from which the imbalance is called out.
IMBALANCE_RATIO = 3.0
#: Balanced accuracy within this of chance (1 / labels) counts as collapsed.
COLLAPSE_MARGIN = 0.1
#: Out-of-fold accuracy below which suspected mislabels are called mostly the head's mistakes.
CONFIDENT_ACCURACY = 0.9
#: Entries listed per finding; the warnings say how many more there are.
MAX_ENTRIES = 100


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes, hex: the identity of an exact duplicate (and of the cache)."""
    return hashlib.sha256(data).hexdigest()


def exact_duplicates(paths: Sequence[str], hashes: Sequence[str], labels: np.ndarray,
                     label_names: Sequence[str], validation: np.ndarray) -> list[dict]:
    """Groups of files with identical bytes.

    Args:
        paths: archive path per image (n); hashes: `content_hash` per image (n).
        labels: int (n,); validation: bool (n,), True for the validation split, or int (n,)
            the cross-validation fold of each image (copies in different folds leak).

    Returns:
        [{"paths", "labels", "across_split", "conflicting_labels"}], one per group of ≥ 2 files,
        leaks and contradictions first, then by first path.
    """
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(hashes):
        groups.setdefault(digest, []).append(index)
    found = []
    for members in groups.values():
        if len(members) < 2:
            continue
        found.append({
            "paths": [paths[i] for i in members],
            "labels": [label_names[labels[i]] for i in members],
            "across_split": bool(len({validation[i].item() for i in members}) > 1),
            "conflicting_labels": bool(len({int(labels[i]) for i in members}) > 1),
        })
    return sorted(found, key=lambda entry: (not entry["across_split"],
                                            not entry["conflicting_labels"], entry["paths"][0]))


def similarity_matrix_rows(features: np.ndarray, batch: int = 1024):
    """Yields (start, rows of the cosine similarity matrix) of mean-centred features.

    Centring first (on the mean of these images) matters: the backbone's features are
    non-negative pooled activations, so raw cosines of unrelated photos are high (0.95 between
    distinct flowers5 photos). Scaling each dimension as well (standardising) was measured
    worse: it lifts noisy dimensions, and re-saved copies of small images fell below distinct
    photos (bench/trust.py).

    Args:
        features: float32 (n, d).
    """
    x = np.asarray(features, np.float32)
    x = x - x.mean(axis=0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    for start in range(0, len(x), batch):
        yield start, x[start:start + batch] @ x.T


def near_duplicates(paths: Sequence[str], features: np.ndarray, validation: np.ndarray,
                    labels: np.ndarray, label_names: Sequence[str], *,
                    hashes: Sequence[str] | None = None,
                    threshold: float = NEAR_DUPLICATE_SIMILARITY) -> list[dict]:
    """Pairs of distinct files whose features are nearly the same.

    Args:
        paths: archive path per image (n); features: float32 (n, d), original images (no views).
        validation: bool (n,), or int (n,) folds (see `exact_duplicates`); labels: int (n,).
        hashes: when given, pairs with equal hashes are left to `exact_duplicates`.
        threshold: cosine similarity (mean-centred features) from which a pair is reported.

    Returns:
        [{"paths": [a, b], "labels": [..], "similarity", "across_split"}], across-split pairs
        first, then by similarity, highest first.
    """
    n = len(paths)
    if n < 3:  # NB: standardising 2 images makes them exactly opposite; nothing to learn
        return []
    found = []
    for start, rows in similarity_matrix_rows(features):
        i, j = np.nonzero(rows >= threshold)
        i = i + start
        for a, b in zip(i, j):
            if a >= b or (hashes is not None and hashes[a] == hashes[b]):
                continue
            found.append({"paths": [paths[a], paths[b]],
                          "labels": [label_names[labels[a]], label_names[labels[b]]],
                          "similarity": round(float(rows[a - start, b]), 4),
                          "across_split": bool(validation[a] != validation[b])})
    return sorted(found, key=lambda entry: (not entry["across_split"], -entry["similarity"],
                                            entry["paths"]))


def suspected_mislabels(paths: Sequence[str], labels: np.ndarray, label_names: Sequence[str],
                        out_of_fold_probabilities: np.ndarray) -> list[dict]:
    """Images whose folder disagrees with out-of-fold predictions (cleanlab's confident learning).

    Args:
        paths: archive path per image (n); labels: int (n,) the given labels.
        out_of_fold_probabilities: float (n, k), each row from a head that did not train on
            that image.

    Returns:
        [{"path", "given", "predicted", "confidence"}], the least self-confident first;
        `confidence` is the out-of-fold probability of `predicted`.
    """
    labels = np.asarray(labels, dtype=int)
    probabilities = np.asarray(out_of_fold_probabilities, np.float64)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return []
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    from cleanlab.filter import find_label_issues  # NB: imported here: it takes seconds

    # NB: n_jobs=1: cleanlab otherwise forks a multiprocessing pool, and TensorFlow (loaded in
    # the same process by the training job) is not fork-safe.
    issues = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence",
                               n_jobs=1)
    found = []
    for i in issues:
        predicted = int(probabilities[i].argmax())
        if predicted == labels[i]:
            continue  # NB: flagged as uncertain, but the head agrees with the folder
        found.append({"path": paths[i], "given": label_names[labels[i]],
                      "predicted": label_names[predicted],
                      "confidence": round(float(probabilities[i, predicted]), 4)})
    return found


def mislabel_warning(count: int, labels: np.ndarray, out_of_fold_probabilities: np.ndarray,
                     num_classes: int) -> str:
    """The warning for `count` suspected mislabels, weighed by how good the predictions that
    found them are: a head that is often wrong out of fold disagrees with right labels too.

    Args:
        labels: int (n,) the given labels; out_of_fold_probabilities: float (n, k).
    """
    predicted = np.asarray(out_of_fold_probabilities).argmax(axis=1)
    accuracy = float((predicted == labels).mean())
    if balanced_accuracy(labels, predicted, num_classes) <= 1 / num_classes + COLLAPSE_MARGIN:
        return (f"{count} image(s) disagree with their folder out of fold, but out of fold the "
                f"classifier is near chance ({accuracy:.2f} accuracy): these are its errors, not "
                "evidence of wrong labels (suspected_mislabels).")
    if accuracy < CONFIDENT_ACCURACY:
        return (f"{count} image(s) may be mislabeled: their out-of-fold predictions disagree "
                f"with their folder (suspected_mislabels). At {accuracy:.2f} out-of-fold "
                "accuracy many are the classifier's own mistakes; check the first listed, the "
                "most confident disagreements.")
    return (f"{count} image(s) look mislabeled: their out-of-fold predictions disagree with "
            "their folder (suspected_mislabels). Check them.")


def imbalance(labels: np.ndarray, label_names: Sequence[str]) -> dict:
    """Images per label.

    Returns:
        {"per_label": {name: count}, "largest", "smallest" (label names), "ratio" (largest /
        smallest count; null when a label has no image)}. Ties name the first label as the
        largest and the last as the smallest, so a balanced set names two labels.
    """
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=len(label_names))
    largest, smallest = int(counts.argmax()), len(counts) - 1 - int(counts[::-1].argmin())
    return {"per_label": {name: int(count) for name, count in zip(label_names, counts)},
            "largest": label_names[largest], "smallest": label_names[smallest],
            "ratio": round(float(counts[largest] / counts[smallest]), 3) if counts[smallest] else None}


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean recall over the labels that occur in `labels` (int (n,) each)."""
    labels, predicted = np.asarray(labels, dtype=int), np.asarray(predicted, dtype=int)
    present = [c for c in range(num_classes) if (labels == c).any()]
    if not present:
        return 0.0
    return float(np.mean([(predicted[labels == c] == c).mean() for c in present]))


def collapse_warning(labels: np.ndarray, predicted: np.ndarray,
                     label_names: Sequence[str]) -> str | None:
    """A warning when the classifier answers (nearly) one label whatever the image.

    Args:
        labels, predicted: int (n,) validation labels and the head's predictions.

    Returns:
        The warning in words, or None.
    """
    k = len(label_names)
    if len(labels) == 0 or k < 2:
        return None
    score = balanced_accuracy(labels, predicted, k)
    used = np.unique(predicted)
    if len(used) == 1:
        return (f"The classifier collapsed to one label: it answers {label_names[used[0]]!r} for "
                f"every validation image (balanced accuracy {score:.2f}, chance {1 / k:.2f}). "
                "Check that the folders hold what their names say and that each label has "
                "enough images.")
    if score <= 1 / k + COLLAPSE_MARGIN:
        return (f"Balanced accuracy on validation is {score:.2f}, near chance ({1 / k:.2f}): the "
                "classifier barely tells the labels apart. Check that the folders hold what "
                "their names say; more images per label would help.")
    return None


def dataset_health(paths: Sequence[str], labels: np.ndarray, label_names: Sequence[str], *,
                   hashes: Sequence[str], features: np.ndarray, validation: np.ndarray,
                   out_of_fold_probabilities: np.ndarray | None = None,
                   validation_predicted: np.ndarray | None = None,
                   folds: np.ndarray | None = None) -> dict:
    """The report's "health" field.

    Args:
        paths: archive path per image (n), e.g. "ants/0013035.jpg".
        labels: int (n,) given labels; label_names: the classifier's labels (k).
        hashes: `content_hash` of each file (n).
        features: float32 (n, d) backbone features of the original images (view 0).
        validation: bool (n,) True for images in the validation split.
        out_of_fold_probabilities: float (n, k) out-of-fold head probabilities; None skips
            `suspected_mislabels` (and says so).
        folds: int (n,) each image's cross-validation fold, when validation is by folds (every
            image then is a validation image once): copies in different folds are
            `across_split`, since one trains the head that scores the other.
        validation_predicted: int (n_validation,) the served head's labels for the validation
            images, in the order of `np.flatnonzero(validation)`; None skips the collapse check.

    Returns:
        {"duplicates", "near_duplicates", "suspected_mislabels", "imbalance", "warnings",
         "counts"}; each list holds at most MAX_ENTRIES entries, "counts" has the full numbers.
    """
    labels = np.asarray(labels, dtype=int)
    validation = np.asarray(validation, dtype=bool)
    if not len(paths) == len(labels) == len(hashes) == len(features) == len(validation):
        raise ValueError("paths, labels, hashes, features and validation must have one entry "
                         f"per image. Received lengths: {len(paths)}, {len(labels)}, "
                         f"{len(hashes)}, {len(features)}, {len(validation)}")
    split = validation if folds is None else np.asarray(folds, dtype=int)
    if len(split) != len(paths):
        raise ValueError(f"folds must have one entry per image. Received: {len(split)}")
    duplicates = exact_duplicates(paths, hashes, labels, label_names, split)
    near = near_duplicates(paths, features, split, labels, label_names, hashes=hashes)
    mislabels = (suspected_mislabels(paths, labels, label_names, out_of_fold_probabilities)
                 if out_of_fold_probabilities is not None else [])
    balance = imbalance(labels, label_names)
    warnings = []
    leaks = sum(entry["across_split"] for entry in duplicates + near)
    if leaks:
        warnings.append(
            f"{leaks} group(s) of copies sit on both sides of validation (an exact or near copy "
            "in training of an image in validation): validation accuracy is inflated. Remove one copy of each (see duplicates and near_duplicates, "
            "across_split).")
    contradictions = sum(entry["conflicting_labels"] for entry in duplicates)
    if contradictions:
        warnings.append(f"{contradictions} file(s) appear with the same bytes under different "
                        "labels: keep each in the one right folder.")
    if duplicates:
        warnings.append(f"{len(duplicates)} group(s) of identical files: each copy counts as an "
                        "extra training image of the same photo.")
    if mislabels:
        warnings.append(mislabel_warning(len(mislabels), labels, out_of_fold_probabilities,
                                         len(label_names)))
    if out_of_fold_probabilities is None:
        warnings.append("No out-of-fold predictions for this run: mislabels were not checked.")
    if balance["ratio"] is None:
        warnings.append(f"Label {balance['smallest']!r} has no images.")
    elif balance["ratio"] >= IMBALANCE_RATIO:
        warnings.append(
            f"Labels are imbalanced: {balance['largest']!r} has {balance['ratio']:g}× the images "
            f"of {balance['smallest']!r}. The classifier will favour the larger label; more "
            f"images of {balance['smallest']!r} would help.")
    if validation_predicted is not None:
        collapse = collapse_warning(labels[validation], validation_predicted, label_names)
        if collapse:
            warnings.append(collapse)
    for name, entries in (("duplicates", duplicates), ("near_duplicates", near),
                          ("suspected_mislabels", mislabels)):
        if len(entries) > MAX_ENTRIES:
            warnings.append(f"{name}: {len(entries) - MAX_ENTRIES} more not listed.")
    return {"duplicates": duplicates[:MAX_ENTRIES], "near_duplicates": near[:MAX_ENTRIES],
            "suspected_mislabels": mislabels[:MAX_ENTRIES], "imbalance": balance,
            "warnings": warnings,
            "counts": {"duplicates": len(duplicates), "near_duplicates": len(near),
                       "suspected_mislabels": len(mislabels), "across_split": leaks}}
