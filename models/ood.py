"""Out-of-distribution scores: is this image like the ones the classifier was trained on?

A softmax head must spread its whole probability over its labels, so an image unlike all of
them (a flower shown to an ants-vs-bees classifier) still gets a confident label. These scores
look at the backbone features (or the head's logits) instead; higher means more unusual:

- ``knn`` (the default, chosen by bench/trust.py): the cosine distance to the nearest training
  image (Sun et al., 2022, "Out-of-distribution detection with deep nearest neighbors"), measured
  separately on the mid-level (block 4) and the last block's (block 5 pool) average-pooled parts
  of the feature vector, each divided by its median over the training images (leave-one-out), and
  averaged. On raw (not standardised) features: cosine already ignores brightness-like scale, and
  standardising gave noise dimensions the same weight as signal. Stores those two 512-d parts of
  each training image in float16 (2 KB per image, at most MAX_ROWS images).
- ``mahalanobis``: the squared Mahalanobis distance to the nearest label mean under one
  covariance shared by all labels (Lee et al., 2018), on standardised features, the covariance
  shrunk by the Ledoit-Wolf formula and stored as its top `components` eigenvectors plus one
  variance for the rest. Measured and kept for comparison: with a few hundred images in 2048
  dimensions it separated far worse than knn (bench/RESULTS.md).
- ``energy`` (−logsumexp of the logits, Liu et al., 2020), ``max_logit`` and ``max_softmax``
  (Hendrycks & Gimpel, 2017): from the head's output alone; nothing to store but a threshold.
  `max_softmax` is what a plain score threshold does (issue 15: it refused 45 % of flowers).

`fit` returns a `Detector`: a method name, a few numpy arrays and a threshold, serialisable with
`to_bytes` (an .npz without pickles). `with_threshold` sets the threshold from held-out
in-distribution scores so that a share `keep` of such images pass: the split conformal quantile,
the ⌈(n + 1)·keep⌉-th smallest of n scores. For knn the training images' leave-one-out scores
join the validation images' (a few hundred scores instead of a few dozen). The default keep is
0.97, not 0.95: a dataset's validation images are often a little closer to its training images
than new photos are (hymenoptera: at 0.95 its test images were kept at 0.91), and the margin
costs few rejections of foreign images (bench/RESULTS.md).

numpy only: cheap to import, no TensorFlow.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, replace

import numpy as np

METHODS = ("knn", "mahalanobis", "energy", "max_logit", "max_softmax")
#: From the head's logits, not the features.
LOGIT_METHODS = ("energy", "max_logit", "max_softmax")
DEFAULT_METHOD = "knn"
#: Share of in-distribution images the default threshold is set to keep (see above).
DEFAULT_KEEP = 0.97
#: The parts of a backbone feature vector, in `models.backbone.FEATURES` order, as column ranges.
FEATURE_PARTS = {"block4_avg": (0, 512), "block5_avg": (512, 1024), "block5_max": (1024, 1536),
                 "pool_avg": (1536, 2048)}
#: The parts knn compares by default: one average-pooled part per depth.
DEFAULT_PARTS = ("block4_avg", "pool_avg")
#: Rows used to estimate the shared covariance / kept for kNN (a seeded sample beyond that).
MAX_ROWS = 4096


@dataclass(frozen=True)
class Detector:
    """A fitted OOD score and its threshold.

    Attributes:
        method: one of METHODS.
        arrays: the fitted state (see `fit`); float16 where large.
        threshold: scores above it are out of distribution; NaN until `with_threshold`.
    """

    method: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    threshold: float = math.nan

    @property
    def nbytes(self) -> int:
        return int(sum(array.nbytes for array in self.arrays.values()))

    def is_out(self, scores: np.ndarray) -> np.ndarray:
        """bool (n,): which scores are above the threshold (none while it is NaN)."""
        return np.asarray(scores) > self.threshold


def _standardiser(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    center = features.mean(axis=0)
    scale = features.std(axis=0)
    # NB: dead (always-zero) ReLU channels have std 0; they must neither divide by 0 nor, when a
    # new image lights them up, dominate the distance.
    scale = np.maximum(scale, 1e-3 * max(float(np.median(scale)), 1e-12))
    return center.astype(np.float32), scale.astype(np.float32)


def _sample_rows(count: int, limit: int, seed: int) -> np.ndarray:
    if count <= limit:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, limit, replace=False))


def ledoit_wolf_shrinkage(residuals: np.ndarray) -> tuple[float, float]:
    """Ledoit-Wolf shrinkage of a covariance towards μ·I, computed from the Gram matrix.

    The formula of `sklearn.covariance.ledoit_wolf_shrinkage(X, assume_centered=True)`, in
    O(n² d) instead of O(n d²) memory-light blocks, for n rows ≪ d columns.

    Args:
        residuals: float (n, d), centred rows (here: features minus their label's mean).

    Returns:
        (shrinkage in [0, 1], μ = trace(S) / d) where S = residualsᵀ residuals / n.
    """
    x = np.asarray(residuals, np.float64)
    n, d = x.shape
    gram = x @ x.T
    squared_norms = np.diag(gram)
    mu = squared_norms.sum() / n / d
    s_frobenius2 = (gram ** 2).sum() / n ** 2
    beta = ((squared_norms ** 2).sum() / n - s_frobenius2) / (d * n)
    delta = (s_frobenius2 - d * mu ** 2) / d
    if delta <= 0:
        return 1.0, float(mu)
    return float(min(beta, delta) / delta), float(mu)


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, *, components: int = 128,
                    seed: int = 0) -> Detector:
    """Label means and a shrunk shared covariance of standardised features.

    Args:
        features: float32 (n, d) training features (augmented views included, if any).
        labels: int (n,) label indices.
        components: leading eigenvectors of the covariance kept; the others share one variance.

    Returns:
        A Detector with arrays center, scale (float32 (d,)), means (float16 (k, d)), components
        (float16 (r, d)), weights (float32 (r,)) and rest (float32 (1,)): the precision matrix is
        rest·I + componentsᵀ diag(weights) components.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels, dtype=int)
    if len(features) < 2 or len(np.unique(labels)) < 1:
        raise ValueError(f"Need at least 2 training features. Received: shape={features.shape}")
    center, scale = _standardiser(features)
    x = (features - center) / scale
    classes = np.unique(labels)
    means = np.zeros((labels.max() + 1, x.shape[1]), np.float32)
    for label in classes:
        means[label] = x[labels == label].mean(axis=0)
    residuals = (x - means[labels])[_sample_rows(len(x), MAX_ROWS, seed)].astype(np.float64)
    shrinkage, mu = ledoit_wolf_shrinkage(residuals)
    # NB: float32 halves the cost of the SVD (O(n² d)); the components are stored in float16.
    _, singular, vt = np.linalg.svd(residuals.astype(np.float32), full_matrices=False)
    singular = singular.astype(np.float64)
    d = x.shape[1]
    rank = min(components, len(singular), d - 1)
    shrunk = (1 - shrinkage) * singular[:rank] ** 2 / len(residuals) + shrinkage * mu
    # The trace of the shrunk covariance is d·μ; what the kept directions do not hold is spread
    # evenly over the others (the probabilistic-PCA choice).
    rest_variance = max((d * mu - shrunk.sum()) / (d - rank), 1e-12)
    return Detector("mahalanobis", {
        "center": center, "scale": scale, "means": means[classes].astype(np.float16),
        "components": vt[:rank].astype(np.float16),
        "weights": (1 / shrunk - 1 / rest_variance).astype(np.float32),
        "rest": np.array([1 / rest_variance], np.float32)})


def _columns(parts: tuple[str, ...], dim: int) -> list[slice]:
    """Column slices of named feature parts; ("all",) is the whole vector."""
    if parts == ("all",):
        return [slice(0, dim)]
    unknown = [part for part in parts if part not in FEATURE_PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must name parts of {tuple(FEATURE_PARTS)} or be ('all',). "
                         f"Received: parts={parts}")
    if dim != 2048:
        raise ValueError(f"Feature parts need 2048-d backbone features. Received: dim={dim}")
    return [slice(*FEATURE_PARTS[part]) for part in parts]


def _nearest_distances(bank: np.ndarray, queries: np.ndarray, k: int,
                       leave_one_out: bool = False) -> np.ndarray:
    """1 − cosine similarity to the k-th most similar bank row, per query row (both normalised)."""
    result = np.empty(len(queries))
    for start in range(0, len(queries), 512):
        similarity = queries[start:start + 512] @ bank.T
        if leave_one_out:  # query i is bank row i
            rows = np.arange(len(similarity))
            similarity[rows, start + rows] = -np.inf
        result[start:start + 512] = 1 + np.partition(-similarity, k - 1, axis=1)[:, k - 1]
    return result


def fit_knn(features: np.ndarray, *, parts: tuple[str, ...] = DEFAULT_PARTS, k: int = 1,
            seed: int = 0) -> Detector:
    """Training images' feature parts to compare new images with, part by part.

    Args:
        features: float32 (n, 2048) training features of the original images, one row per
            image. Not augmented views: they measured worse (hymenoptera AUROC 0.936 against
            0.965), and an image's other views would stay in the bank when it is left out, so
            the leave-one-out scores (and the threshold) would come out far too low.
        parts: names from FEATURE_PARTS, or ("all",) for the whole vector as one part.
        k: the score uses the k-th nearest training image.

    Returns:
        A Detector with arrays bank_0, bank_1, … (float16 (≤ MAX_ROWS, part width), L2-normalised
        rows), scale (float32 (parts,): the median leave-one-out distance per part),
        training_scores (float32 (rows,): leave-one-out scores, for the threshold), k, columns.
    """
    features = np.asarray(features, np.float32)
    if len(features) < k + 1 or k < 1:
        raise ValueError(f"Need more than k ≥ 1 training features. Received: k={k}, "
                         f"shape={features.shape}")
    columns = _columns(tuple(parts), features.shape[1])
    rows = features[_sample_rows(len(features), MAX_ROWS, seed)]
    arrays: dict[str, np.ndarray] = {}
    distances = []
    for i, column in enumerate(columns):
        bank = _normalise(rows[:, column]).astype(np.float16)
        arrays[f"bank_{i}"] = bank
        distances.append(_nearest_distances(bank.astype(np.float32),
                                            bank.astype(np.float32), k, leave_one_out=True))
    distances = np.stack(distances, axis=1)
    scale = np.maximum(np.median(distances, axis=0), 1e-6).astype(np.float32)
    arrays.update({"scale": scale, "training_scores": (distances / scale).mean(axis=1)
                   .astype(np.float32), "k": np.array([k], np.int32),
                   "columns": np.array([[c.start, c.stop] for c in columns], np.int32)})
    return Detector("knn", arrays)


def fit(method: str, features: np.ndarray | None = None, labels: np.ndarray | None = None,
        **options) -> Detector:
    """Fits an OOD score on training data.

    Args:
        method: one of METHODS.
        features: float32 (n, d) training features (needed by mahalanobis and knn).
        labels: int (n,) label indices (mahalanobis).
        options: passed to `fit_mahalanobis` / `fit_knn`; `temperature` for max_softmax.

    Returns:
        A Detector without a threshold (NaN); set it with `with_threshold`.
    """
    if method == "mahalanobis":
        return fit_mahalanobis(features, labels, **options)
    if method == "knn":
        return fit_knn(features, **options)
    if method in LOGIT_METHODS:
        return Detector(method, {"temperature": np.array([options.get("temperature", 1.0)],
                                                         np.float32)})
    raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def score(detector: Detector, features: np.ndarray | None = None,
          logits: np.ndarray | None = None) -> np.ndarray:
    """OOD scores: higher is more unusual.

    Args:
        features: float32 (n, d) backbone features (mahalanobis, knn).
        logits: float (n, k) the head's pre-softmax outputs (energy, max_logit, max_softmax;
            max_softmax also accepts `calibration.logits_from_probabilities(p)`).

    Returns:
        float64 (n,).
    """
    arrays = detector.arrays
    if detector.method in LOGIT_METHODS:
        if logits is None:
            raise ValueError(f"method {detector.method!r} scores logits; none were given")
        z = np.asarray(logits, np.float64) / float(arrays["temperature"][0])
        top = z.max(axis=1)
        log_z = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        if detector.method == "energy":
            return -log_z
        if detector.method == "max_logit":
            return -top
        return -np.exp(top - log_z)
    if features is None:
        raise ValueError(f"method {detector.method!r} scores features; none were given")
    features = np.asarray(features, np.float32)
    if detector.method == "knn":
        k = int(arrays["k"][0])
        distances = np.stack([
            _nearest_distances(arrays[f"bank_{i}"].astype(np.float32),
                               _normalise(features[:, start:stop]), k)
            for i, (start, stop) in enumerate(arrays["columns"])], axis=1)
        return (distances / arrays["scale"]).mean(axis=1)
    x = (features - arrays["center"]) / arrays["scale"]
    if detector.method == "mahalanobis":
        x = x.astype(np.float64)
        means = arrays["means"].astype(np.float64)
        components = arrays["components"].astype(np.float64)
        weights = arrays["weights"].astype(np.float64)
        rest = float(arrays["rest"][0])
        squared = ((x ** 2).sum(axis=1)[:, None] - 2 * x @ means.T
                   + (means ** 2).sum(axis=1)[None, :])                       # (n, k)
        projected = (x @ components.T)[:, None, :] - (means @ components.T)[None, :, :]
        distance = rest * squared + (projected ** 2 * weights).sum(axis=2)   # (n, k)
        return distance.min(axis=1)
    raise ValueError(f"method must be one of {METHODS}. Received: method={detector.method!r}")


def conformal_threshold(scores: np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """The ⌈(n + 1)·keep⌉-th smallest of n held-out in-distribution scores.

    For new images exchangeable with these, at least `keep` of them score at or below it on
    average. With fewer than 1 / (1 − keep) − 1 images that rank is past the largest score, and
    the largest is used (all held-out images kept).

    Args:
        scores: float (n,) OOD scores of validation images; keep: in (0, 1).
    """
    if not 0 < keep < 1:
        raise ValueError(f"keep must be in (0, 1). Received: keep={keep}")
    scores = np.sort(np.asarray(scores, np.float64))
    if len(scores) == 0:
        return math.inf
    rank = min(math.ceil((len(scores) + 1) * keep), len(scores))
    return float(scores[rank - 1])


def with_threshold(detector: Detector, validation_scores: np.ndarray,
                   keep: float = DEFAULT_KEEP) -> Detector:
    """The detector with its threshold set to keep `keep` of in-distribution images:
    `conformal_threshold` of the validation images' scores, and for knn of the training
    images' leave-one-out scores too.

    Args:
        validation_scores: float (n,) `score(detector, validation features)`.
    """
    scores = np.asarray(validation_scores, np.float64)
    if "training_scores" in detector.arrays:
        scores = np.r_[scores, detector.arrays["training_scores"]]
    return replace(detector, threshold=conformal_threshold(scores, keep))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling out- from in-distribution images by score.

    The probability that a random out-of-distribution image scores higher than a random
    in-distribution one (ties count half): the Mann-Whitney U statistic over n_in · n_out.
    """
    in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if not len(in_scores) or not len(out_scores):
        return math.nan
    values, inverse, counts = np.unique(np.r_[in_scores, out_scores], return_inverse=True,
                                        return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, ties share their mean rank
    ranks = average_rank[inverse]
    n_out = len(out_scores)
    u = ranks[len(in_scores):].sum() - n_out * (n_out + 1) / 2
    return float(u / (len(in_scores) * n_out))


def to_bytes(detector: Detector) -> bytes:
    """The detector as an .npz (arrays, method, threshold), loadable without pickles."""
    buffer = io.BytesIO()
    np.savez(buffer, __method__=np.array(detector.method),
             __threshold__=np.array(detector.threshold, np.float64), **detector.arrays)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Detector:
    """The inverse of `to_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files
                  if name not in ("__method__", "__threshold__")}
        method = str(archive["__method__"])
        threshold = float(archive["__threshold__"])
    if method not in METHODS:
        raise ValueError(f"Unknown OOD method in stored detector. Received: {method!r}")
    return Detector(method, arrays, threshold)
