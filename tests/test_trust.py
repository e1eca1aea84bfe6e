"""Unit tests of the trust functions (calibration, OOD, health, uncertainty) on synthetic arrays.

No backbone and no TensorFlow: the functions take features and probabilities, so the tests
build those directly, with known answers.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

from models import calibration, health, ood, trust, uncertainty

# ---------------------------------------------------------------- helpers


def sampled_labels(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits): logits calibrated by construction."""
    p = calibration.softmax(logits)
    return (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)


def clusters(rng, per_class=60, classes=3, dim=32, spread=1.0, offset=0.0):
    """Gaussian clusters: features (n, dim) float32 and labels (n,)."""
    centres = rng.normal(0, 4, (classes, dim)) + offset
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + rng.normal(0, spread, (len(labels), dim))
    return features.astype(np.float32), labels


# ---------------------------------------------------------------- import cost


def test_trust_modules_do_not_import_tensorflow():
    code = ("import sys, models.calibration, models.ood, models.health, models.uncertainty, models.trust; "
            "heavy = [m for m in ('tensorflow', 'keras', 'cleanlab', 'sklearn', 'scipy') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- calibration


def test_softmax_and_nll_agree_with_hand_values():
    logits = np.array([[0.0, math.log(3.0)]])
    assert calibration.softmax(logits) == pytest.approx(np.array([[0.25, 0.75]]))
    assert calibration.negative_log_likelihood(logits, np.array([1])) == pytest.approx(-math.log(0.75))
    assert calibration.softmax(logits, 2.0)[0, 1] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)))


def test_logits_from_probabilities_give_back_the_probabilities():
    p = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], np.float32)
    assert calibration.softmax(calibration.logits_from_probabilities(p)) == pytest.approx(p, abs=1e-7)


def test_fit_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    labels = sampled_labels(true_logits, rng)
    # A head three times too sure of itself: its logits are the calibrated ones times 3.
    temperature = calibration.fit_temperature(3 * true_logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    # ...and one that is too timid.
    assert calibration.fit_temperature(true_logits / 2, labels) == pytest.approx(0.5, rel=0.1)


def test_the_prior_keeps_the_temperature_moderate_when_validation_is_all_correct():
    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    labels = np.array([0, 1, 0])
    # The likelihood alone runs to the lower bound: every score towards 1.0.
    plain = calibration.fit_temperature(logits, labels, prior_sd=None)
    assert plain == pytest.approx(calibration.TEMPERATURE_BOUNDS[0], rel=0.01)
    # The prior on log T stops three images from moving it far ...
    few = calibration.fit_temperature(logits, labels)
    assert 0.5 < few < 1.0
    # ... and thirty such images move it further, without reaching the bound.
    many = calibration.fit_temperature(np.tile(logits, (10, 1)), np.tile(labels, 10))
    assert calibration.TEMPERATURE_BOUNDS[0] * 2 < many < few
    top = calibration.softmax(logits, few).max(axis=1)
    assert top.max() < 0.999
    assert calibration.fit_temperature(np.zeros((0, 2)), np.zeros(0, int)) == 1.0


def test_expected_calibration_error_matches_a_hand_computation():
    # Two bins used (15 bins): confidences 0.9 (bin 14) and 0.6 (bin 9).
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    # bin of 0.9: accuracy 1/2, confidence 0.9 → 0.4 · 2/4; bin of 0.6: accuracy 1, conf 0.6 → 0.4 · 2/4
    assert calibration.expected_calibration_error(p, labels) == pytest.approx(0.4)
    assert calibration.expected_calibration_error(np.zeros((0, 2)), np.zeros(0, int)) == 0.0


def test_calibrate_lowers_ece_of_an_overconfident_head():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(0, 1.5, (3000, 4))
    labels = sampled_labels(true_logits, rng)
    fitted = calibration.calibrate(4 * true_logits, labels)
    assert fitted.temperature > 3
    assert fitted.ece_before > 0.1 and fitted.ece_after < 0.03
    assert fitted.nll_after < fitted.nll_before
    assert set(fitted.as_dict()) >= {"temperature", "ece_before", "ece_after"}


def test_precision_threshold_is_the_lowest_score_reaching_the_target():
    # Sorted by confidence: right, right, wrong, right, wrong.
    p = np.array([[0.99, 0.01], [0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    labels = np.array([0, 0, 0, 0, 0])  # rows 2 (0.8 for label 1) and 4 (0.6) are wrong
    strict = calibration.precision_threshold(p, labels, 1.0)
    assert (strict.threshold, strict.coverage, strict.reached) == (0.9, 0.4, True)
    loose = calibration.precision_threshold(p, labels, 0.75)
    assert loose.threshold == 0.7 and loose.precision == 0.75 and loose.coverage == 0.8
    everything = calibration.precision_threshold(p, labels, 0.6)
    assert everything.threshold == 0.0 and everything.coverage == 1.0
    off = calibration.precision_threshold(p, labels, None)
    assert off.threshold == 0.0 and off.target_precision is None


def test_precision_threshold_keeps_or_drops_ties_together_and_says_when_unreachable():
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]])
    labels = np.array([0, 1, 0])
    choice = calibration.precision_threshold(p, labels, 0.99)
    assert not choice.reached
    assert choice.precision == pytest.approx(2 / 3) and choice.threshold == 0.6
    with pytest.raises(ValueError, match="target_precision"):
        calibration.precision_threshold(p, labels, 1.5)


def test_decide_rejects_out_of_distribution_first_then_low_confidence():
    p = np.array([[0.95, 0.05], [0.55, 0.45], [0.99, 0.01]])
    decisions = calibration.decide(p, threshold=0.6, ood_scores=np.array([1.0, 1.0, 9.0]),
                                   ood_threshold=5.0)
    assert [(d.label, d.rejected, d.reason) for d in decisions] == [
        (0, False, None), (-1, True, calibration.BELOW_THRESHOLD),
        (-1, True, calibration.OUT_OF_DISTRIBUTION)]
    assert decisions[2].score == pytest.approx(0.99)
    assert [d.rejected for d in calibration.decide(p)] == [False, False, False]
    with pytest.raises(ValueError, match="threshold"):
        calibration.decide(p, threshold=2)


# ---------------------------------------------------------------- OOD


def test_ledoit_wolf_shrinkage_matches_scikit_learn():
    covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (40, 100)) * rng.uniform(0.5, 3, 100)
    x -= x.mean(axis=0)
    shrinkage, mu = ood.ledoit_wolf_shrinkage(x)
    assert shrinkage == pytest.approx(covariance.ledoit_wolf_shrinkage(x, assume_centered=True),
                                      rel=1e-6)
    assert mu == pytest.approx(np.trace(x.T @ x / 40) / 100)


def test_mahalanobis_equals_the_dense_shrunk_covariance_when_all_components_are_kept():
    rng = np.random.default_rng(3)
    features, labels = clusters(rng, per_class=30, classes=2, dim=12)
    detector = ood.fit_mahalanobis(features, labels, components=50)
    # The same computation written out densely.
    center, scale = features.mean(axis=0), features.std(axis=0)
    x = (features - center) / scale
    means = np.stack([x[labels == c].mean(axis=0) for c in (0, 1)])
    residuals = x - means[labels]
    shrinkage, mu = ood.ledoit_wolf_shrinkage(residuals)
    shrunk = (1 - shrinkage) * residuals.T @ residuals / len(x) + shrinkage * mu * np.eye(12)
    precision = np.linalg.inv(shrunk)
    queries = rng.normal(0, 3, (5, 12)).astype(np.float32)
    q = (queries - center) / scale
    expected = np.min([np.einsum("nd,de,ne->n", q - m, precision, q - m) for m in means], axis=0)
    assert ood.score(detector, queries) == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_feature_scores_separate_an_unseen_cluster(method):
    rng = np.random.default_rng(4)
    features, labels = clusters(rng, per_class=80, classes=3, dim=64)
    train, held_out = np.arange(len(labels)) % 4 != 0, np.arange(len(labels)) % 4 == 0
    options = {"parts": ("all",)} if method == "knn" else {}
    detector = ood.fit(method, features[train], labels[train], **options)
    outliers, _ = clusters(np.random.default_rng(5), per_class=40, classes=2, dim=64)
    in_scores, out_scores = ood.score(detector, features[held_out]), ood.score(detector, outliers)
    assert ood.auroc(in_scores, out_scores) > 0.99
    detector = ood.with_threshold(detector, in_scores, keep=0.95)
    assert detector.is_out(out_scores).mean() > 0.95
    assert detector.is_out(in_scores).mean() <= 0.1


def test_knn_averages_part_distances_scaled_by_their_leave_one_out_medians():
    rng = np.random.default_rng(12)
    train = rng.random((40, 2048)).astype(np.float32) ** 3
    queries = rng.random((3, 2048)).astype(np.float32)
    detector = ood.fit_knn(train)  # the default parts: block4_avg and pool_avg
    assert detector.arrays["bank_0"].shape == (40, 512)
    assert detector.arrays["bank_0"].dtype == np.float16

    def nearest(bank, q, leave_one_out=False):
        similarity = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
            bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
        if leave_one_out:
            np.fill_diagonal(similarity, -np.inf)
        return 1 - similarity.max(axis=1)

    columns = [slice(0, 512), slice(1536, 2048)]
    scale = [np.median(nearest(train[:, c], train[:, c], True)) for c in columns]
    expected = np.mean([nearest(train[:, c], queries[:, c]) / s for c, s in zip(columns, scale)],
                       axis=0)
    assert ood.score(detector, queries) == pytest.approx(expected, rel=1e-3)
    # The threshold ranks the 40 leave-one-out scores together with the validation ones.
    assert ood.with_threshold(detector, np.full(9, 100.0), keep=0.85).threshold == 100.0
    # ⌈50 · 0.8⌉ = 40th smallest of 49: the largest leave-one-out score
    assert ood.with_threshold(detector, np.full(9, 100.0), keep=0.8).threshold == pytest.approx(
        detector.arrays["training_scores"].max())
    with pytest.raises(ValueError, match="parts"):
        ood.fit_knn(train, parts=("block6",))


def test_feature_parts_follow_the_backbone_layout():
    from models.backbone import FEATURE_DIM, FEATURES

    order = ["gap(block4_pool)", "gap(block5_conv3)", "gmp(block5_conv3)", "gap(block5_pool)"]
    assert FEATURES.split("|") == order and FEATURE_DIM == 2048
    assert list(ood.FEATURE_PARTS.values()) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]


def test_logit_scores_follow_their_formulas():
    logits = np.array([[2.0, 0.0], [0.5, 0.4]])
    energy = ood.score(ood.fit("energy"), logits=logits)
    assert energy == pytest.approx(-np.log(np.exp(logits).sum(axis=1)))
    assert ood.score(ood.fit("max_logit"), logits=logits) == pytest.approx([-2.0, -0.5])
    msp = ood.score(ood.fit("max_softmax", temperature=2.0), logits=logits)
    assert msp == pytest.approx(-calibration.softmax(logits, 2.0).max(axis=1))
    with pytest.raises(ValueError, match="scores logits"):
        ood.score(ood.fit("energy"), features=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="method must be one of"):
        ood.fit("nearest-banana")


def test_conformal_threshold_rank():
    scores = np.arange(1, 100, dtype=float)  # 99 validation scores 1..99
    assert ood.conformal_threshold(scores, 0.95) == 95.0   # ⌈100 · 0.95⌉ = 95th smallest
    assert ood.conformal_threshold(np.arange(10.0), 0.95) == 9.0  # too few: the largest
    assert ood.conformal_threshold(np.zeros(0)) == math.inf
    with pytest.raises(ValueError, match="keep"):
        ood.conformal_threshold(scores, 1.0)


def test_auroc_hand_values():
    assert ood.auroc([0, 1, 2], [3, 4]) == 1.0
    assert ood.auroc([3, 4], [0, 1, 2]) == 0.0
    assert ood.auroc([1, 1], [1, 1]) == 0.5
    # in [0, 2], out [1, 3]: pairs (out > in): 1>0, 3>0, 3>2 → 3 of 4.
    assert ood.auroc([0, 2], [1, 3]) == 0.75


@pytest.mark.parametrize("method", ["mahalanobis", "knn", "energy"])
def test_detector_round_trips_through_bytes(method):
    rng = np.random.default_rng(6)
    features, labels = clusters(rng, dim=40)
    options = {"parts": ("all",)} if method == "knn" else {}
    detector = ood.with_threshold(ood.fit(method, features, labels, **options), rng.random(30))
    restored = ood.from_bytes(ood.to_bytes(detector))
    assert restored.method == method and restored.threshold == detector.threshold
    logits = rng.normal(0, 1, (4, 3))
    assert ood.score(restored, features[:4], logits) == pytest.approx(
        ood.score(detector, features[:4], logits))


def test_mahalanobis_state_is_small_and_float16_where_big():
    rng = np.random.default_rng(7)
    features = rng.random((120, 1024)).astype(np.float32)
    detector = ood.fit_mahalanobis(features, np.arange(120) % 2, components=64)
    assert detector.arrays["components"].dtype == np.float16
    assert detector.arrays["components"].shape == (64, 1024)
    assert detector.nbytes < 150_000   # 64·1024·2 + 2·1024·2 + 2·1024·4 + …
    assert np.isfinite(ood.score(detector, features[:3])).all()


# ---------------------------------------------------------------- health


def test_exact_duplicates_name_paths_and_flag_leaks_and_contradictions():
    paths = ["a/1.jpg", "a/2.jpg", "b/3.jpg", "a/4.jpg"]
    hashes = ["x", "y", "x", "y"]
    labels = np.array([0, 0, 1, 0])
    validation = np.array([False, False, False, True])
    found = health.exact_duplicates(paths, hashes, labels, ["a", "b"], validation)
    assert found == [
        {"paths": ["a/2.jpg", "a/4.jpg"], "labels": ["a", "a"], "across_split": True,
         "conflicting_labels": False},
        {"paths": ["a/1.jpg", "b/3.jpg"], "labels": ["a", "b"], "across_split": False,
         "conflicting_labels": True}]


def test_near_duplicates_find_planted_copies_across_the_split():
    rng = np.random.default_rng(8)
    features = rng.random((50, 256)).astype(np.float32) * 10
    features[40] = features[3] * 1.02 + rng.normal(0, 0.05, 256)   # a near copy in validation
    features[41] = features[7] + rng.normal(0, 0.05, 256)          # one inside training
    validation = np.arange(50) >= 40
    paths = [f"l/{i}.jpg" for i in range(50)]
    found = health.near_duplicates(paths, features, validation, np.zeros(50, int), ["l"])
    assert sorted(entry["paths"] for entry in found) == [["l/3.jpg", "l/40.jpg"],
                                                          ["l/7.jpg", "l/41.jpg"]]
    assert [entry["across_split"] for entry in found] == [True, True]
    features[41] = features[7]
    hashes = [str(i) for i in range(50)]
    hashes[41] = hashes[7]
    inside = health.near_duplicates(paths, features, np.zeros(50, bool), np.zeros(50, int), ["l"],
                                    hashes=hashes)
    assert [entry["paths"] for entry in inside] == [["l/3.jpg", "l/40.jpg"]]
    assert inside[0]["across_split"] is False


def out_of_fold_logistic(x, y, k, folds=5, l2=1e-2, steps=300, learning_rate=0.5):
    """Out-of-fold probabilities of a linear softmax head (full-batch gradient descent on
    standardised features), the way the product's k-fold heads give them."""
    fold = np.random.default_rng(0).permutation(len(y)) % folds
    out = np.zeros((len(y), k))
    for f in range(folds):
        train = fold != f
        mean, std = x[train].mean(axis=0), x[train].std(axis=0)
        xt = (x[train] - mean) / std
        w, b = np.zeros((x.shape[1], k)), np.zeros(k)
        onehot = np.eye(k)[y[train]]
        for _ in range(steps):
            gradient = calibration.softmax(xt @ w + b) - onehot
            w -= learning_rate * (xt.T @ gradient / len(xt) + l2 * w)
            b -= learning_rate * gradient.mean(axis=0)
        out[~train] = calibration.softmax(((x[~train] - mean) / std) @ w + b)
    return out


def planted_mislabels(rng, n_per_class=100, flipped=10, dim=16):
    """Two separable clusters (a linear head is ~96 % right out of fold), `flipped` images of
    label 0 moved to label 1, and the out-of-fold probabilities of a head trained on that."""
    true = np.repeat([0, 1], n_per_class)
    centres = rng.normal(0, 1, (2, dim))
    centres *= 5.0 / np.linalg.norm(centres[0] - centres[1])
    x = centres[true] + rng.normal(0, 1, (len(true), dim))
    given = true.copy()
    moved = rng.choice(n_per_class, flipped, replace=False)
    given[moved] = 1
    return out_of_fold_logistic(x, given, 2), given, moved


def test_suspected_mislabels_find_planted_ones():
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(3)
    probabilities, given, moved = planted_mislabels(rng)
    paths = [f"{'ab'[g]}/{i}.jpg" for i, g in enumerate(given)]
    found = health.suspected_mislabels(paths, given, ["a", "b"], probabilities)
    flagged = [entry["path"] for entry in found]
    assert len(set(flagged) & {paths[i] for i in moved}) >= 7
    assert len(flagged) <= 15
    assert all(entry["given"] == "b" and entry["predicted"] == "a" for entry in found[:3])
    assert found[0]["confidence"] >= found[-1]["confidence"]


def test_imbalance_and_collapse():
    counts = health.imbalance(np.array([0] * 30 + [1] * 5), ["cat", "dog"])
    assert counts == {"per_label": {"cat": 30, "dog": 5}, "largest": "cat", "smallest": "dog",
                      "ratio": 6.0}
    assert health.imbalance(np.array([0, 0]), ["cat", "dog"])["ratio"] is None
    balanced = health.imbalance(np.array([0, 1, 2, 0, 1, 2]), ["cat", "dog", "eel"])
    assert (balanced["largest"], balanced["smallest"], balanced["ratio"]) == ("cat", "eel", 1.0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert health.balanced_accuracy(labels, np.array([0, 0, 1, 0, 2, 1]), 3) == pytest.approx(2 / 3)
    assert "collapsed to one label" in health.collapse_warning(labels, np.zeros(6, int),
                                                               ["a", "b", "c"])
    assert "near chance" in health.collapse_warning(labels, np.array([0, 1, 0, 1, 0, 1]),
                                                    ["a", "b", "c"])
    assert health.collapse_warning(labels, labels, ["a", "b", "c"]) is None


def test_the_mislabel_warning_weighs_how_good_the_out_of_fold_predictions_are():
    labels = np.array([0] * 10 + [1] * 10)
    good = np.eye(2)[labels] * 0.9 + 0.05
    good[[0, 10]] = good[[0, 10]][:, ::-1]      # two disagree: 0.9 accuracy
    assert "look mislabeled" in health.mislabel_warning(2, labels, good, 2)
    weak = good.copy()
    weak[[1, 2, 11]] = weak[[1, 2, 11]][:, ::-1]  # five disagree: 0.75
    text = health.mislabel_warning(5, labels, weak, 2)
    assert "may be mislabeled" in text and "0.75" in text and "own mistakes" in text
    chance = np.tile([0.6, 0.4], (20, 1))        # one label for everything: chance
    text = health.mislabel_warning(10, labels, chance, 2)
    assert "near chance" in text and "not evidence of wrong labels" in text


def test_dataset_health_report():
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(10)
    probabilities, given, moved = planted_mislabels(rng, n_per_class=40, flipped=4)
    n = len(given)
    features = rng.random((n, 64)).astype(np.float32)
    features[n - 1] = features[0]        # a copy of a training image in validation...
    hashes = [f"h{i}" for i in range(n)]
    hashes[n - 1] = hashes[0]            # ...with the same bytes
    validation = np.arange(n) >= n - 10
    paths = [f"{'ab'[g]}/{i}.jpg" for i, g in enumerate(given)]
    report = health.dataset_health(paths, given, ["a", "b"], hashes=hashes, features=features,
                                   validation=validation, out_of_fold_probabilities=probabilities,
                                   validation_predicted=np.zeros(10, int))
    assert set(report) == {"duplicates", "near_duplicates", "suspected_mislabels", "imbalance",
                           "warnings", "counts"}
    assert report["duplicates"][0]["paths"] == [paths[0], paths[n - 1]]
    assert report["duplicates"][0]["across_split"]
    assert report["near_duplicates"] == []  # the pair is an exact duplicate, listed once
    flagged = {e["path"] for e in report["suspected_mislabels"]}
    assert len(flagged & {paths[i] for i in moved}) >= 3
    text = " ".join(report["warnings"])
    assert "inflated" in text and "look mislabeled" in text and "collapsed" in text
    with pytest.raises(ValueError, match="one entry per image"):
        health.dataset_health(paths[:-1], given, ["a", "b"], hashes=hashes, features=features,
                              validation=validation)
    without = health.dataset_health(paths, given, ["a", "b"], hashes=hashes, features=features,
                                    validation=validation)
    assert without["suspected_mislabels"] == []
    assert any("not checked" in warning for warning in without["warnings"])


# ---------------------------------------------------------------- uncertainty


def test_margin_and_entropy_rank_the_undecided_first():
    p = np.array([[0.98, 0.01, 0.01], [0.4, 0.35, 0.25], [0.5, 0.5, 0.0], [0.7, 0.2, 0.1]])
    assert uncertainty.uncertainty(p, "margin") == pytest.approx([0.03, 0.95, 1.0, 0.5])
    assert list(uncertainty.rank(p)) == [2, 1, 3, 0]
    assert list(uncertainty.rank(p, "entropy")) == [1, 3, 2, 0]  # 0.73 > 0.63 for [.5 .5 0]
    assert uncertainty.uncertainty(np.full((1, 4), 0.25), "entropy") == pytest.approx([1.0])
    assert list(uncertainty.rank(p, out_of_distribution=np.array([False, False, True, False]))) \
        == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="method"):
        uncertainty.uncertainty(p, "vibes")


def test_margin_ranks_a_linear_head_by_distance_to_its_boundary():
    rng = np.random.default_rng(11)
    x = rng.normal(0, 1, (200, 8))
    w, b = rng.normal(0, 1, 8), 0.3
    logit_gap = x @ w + b
    p = calibration.softmax(np.stack([np.zeros(200), logit_gap], axis=1))
    distance = np.abs(logit_gap) / np.linalg.norm(w)
    assert list(uncertainty.rank(p)) == list(np.argsort(distance, kind="stable"))


def test_suggest_answers_ranked_entries():
    p = np.array([[0.9, 0.1], [0.55, 0.45]])
    assert uncertainty.suggest(p, ["ant", "bee"], limit=1) == [
        {"index": 1, "uncertainty": 0.9, "label": "ant", "score": 0.55,
         "out_of_distribution": False}]


# ---------------------------------------------------------------- trust: the composition


def test_fit_trust_rejects_foreign_images_and_survives_storage():
    rng = np.random.default_rng(13)
    prototypes = rng.random((2, 2048)) ** 4          # two labels: non-negative "activations"
    labels = np.repeat([0, 1], 60)
    features = (prototypes[labels] + 0.05 * rng.random((120, 2048))).astype(np.float32)
    foreign = (rng.random((20, 2048)) ** 4).astype(np.float32)
    train, validation = np.arange(120) % 5 != 0, np.arange(120) % 5 == 0

    def head(x):  # a linear head on the difference of the prototypes, a little overconfident
        gap = 40 * (x @ (prototypes[1] - prototypes[0]) / np.linalg.norm(prototypes[1] - prototypes[0]) ** 2 - 0.5)
        return calibration.softmax(np.stack([np.zeros(len(x)), gap], axis=1))

    fitted = trust.fit_trust(features[train], labels[train], features[validation],
                             head(features[validation]), labels[validation])
    report = fitted.report()
    assert set(report) == {"calibration", "threshold", "rejection", "ood"}
    assert report["ood"]["method"] == "knn" and report["threshold"] == 0.0
    queries = np.concatenate([features[validation][:5], foreign[:5]])
    calibrated, decisions = trust.decide(fitted, queries, head(queries))
    assert calibrated.shape == (10, 2)
    assert [d.rejected for d in decisions] == [False] * 5 + [True] * 5
    assert {d.reason for d in decisions[5:]} == {calibration.OUT_OF_DISTRIBUTION}
    _, strict = trust.decide(fitted, queries[:5], head(queries[:5]), threshold=1.0)
    assert all(d.reason == calibration.BELOW_THRESHOLD for d in strict if d.score < 1.0)
    restored = trust.from_bytes(trust.to_bytes(fitted))
    assert restored.report() == report
    again, decisions_again = trust.decide(restored, queries, head(queries))
    assert again == pytest.approx(calibrated) and decisions_again == decisions


def _two_prototypes(seed: int, n: int):
    rng = np.random.default_rng(seed)
    prototypes = rng.random((2, 2048)) ** 4
    labels = np.repeat([0, 1], n // 2)
    features = (prototypes[labels] + 0.05 * rng.random((n, 2048))).astype(np.float32)
    foreign = (rng.random((10, 2048)) ** 4).astype(np.float32)
    return prototypes, labels, features, foreign


def test_fit_for_head_sets_the_ood_threshold_from_leave_one_out_and_stores_as_named_arrays():
    _, labels, features, foreign = _two_prototypes(17, 60)
    out_of_fold = np.where(labels[:, None] == np.arange(2), 0.8, 0.2)  # right, 0.8 sure
    fitted = trust.fit_for_head(features, labels, out_of_fold, target_precision=0.9)
    # Every image is in the reference: its own distance is 0, so only leave-one-out counts.
    loo = fitted.detector.arrays["training_scores"]
    assert fitted.detector.threshold == pytest.approx(ood.conformal_threshold(loo))
    assert fitted.detector.threshold > 0
    _, decisions = trust.decide(fitted, np.concatenate([features[:3], foreign[:3]]),
                                np.full((6, 2), 0.5) + [[0.3, -0.3]] * 6)
    assert [d.reason for d in decisions] == [None] * 3 + [calibration.OUT_OF_DISTRIBUTION] * 3
    assert fitted.temperature < 1  # 0.8 sure and always right: underconfident, sharpened
    arrays = trust.to_arrays(fitted)
    assert all(name.startswith(trust.PREFIX) for name in arrays)
    assert trust.from_arrays({"arr_0": np.zeros(3), **arrays}).report() == fitted.report()
    assert trust.from_arrays({"arr_0": np.zeros(3)}) is None  # a head file from before


def test_without_trust_nothing_is_rejected_unless_a_threshold_is_asked_for():
    probabilities = np.array([[0.6, 0.4], [0.95, 0.05]])
    scored = trust.score(None, np.zeros((2, 2048), np.float32), probabilities)
    assert scored[:, :2] == pytest.approx(probabilities)  # temperature 1
    assert [d.rejected for d in trust.decisions(None, scored)] == [False, False]
    assert [d.reason for d in trust.decisions(None, scored, threshold=0.9)] == [
        calibration.BELOW_THRESHOLD, None]


def test_reject_off_fits_no_detector():
    _, labels, features, foreign = _two_prototypes(19, 20)
    fitted = trust.fit_for_head(features, labels, np.full((20, 2), 0.5), method=None)
    assert fitted.detector is None and fitted.report()["ood"] == {"enabled": False}
    _, decisions = trust.decide(fitted, foreign, np.full((10, 2), 0.5))
    assert not any(d.rejected for d in decisions)
    assert trust.from_bytes(trust.to_bytes(fitted)).detector is None


def test_assess_reports_copies_in_different_folds_as_across_split_with_their_paths():
    _, labels, features, _ = _two_prototypes(23, 8)
    features[1] = features[0]
    paths = [f"{'ab'[label]}/{i}.png" for i, label in enumerate(labels)]
    hashes = [f"h{i}" for i in range(8)]
    hashes[1] = hashes[0]
    folds = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    same_fold = folds.copy()
    same_fold[1] = 0
    out_of_fold = np.where(labels[:, None] == np.arange(2), 0.9, 0.1)
    leaked = trust.assess(features, labels, ["a", "b"], out_of_fold, folds, paths=paths,
                          hashes=hashes).report["health"]
    assert leaked["duplicates"] == [{"paths": ["a/0.png", "a/1.png"], "labels": ["a", "a"],
                                     "across_split": True, "conflicting_labels": False}]
    assert any("validation accuracy is inflated" in warning for warning in leaked["warnings"])
    kept = trust.assess(features, labels, ["a", "b"], out_of_fold, same_fold, paths=paths,
                        hashes=hashes).report["health"]
    assert kept["duplicates"][0]["across_split"] is False
    assert trust.assess(features, labels, ["a", "b"], out_of_fold, folds).report["health"] is None


def test_the_head_file_holds_the_weights_and_the_trust_arrays_side_by_side():
    from models.heads import build_head, load_head, serialize_weights, stored_arrays
    from models.options import HeadOptions

    spec = HeadOptions(hidden_units=0, dropout=0.0, l2=0.1)
    head = build_head(spec, 8, 2)
    head.get_layer("head_standardize").adapt(np.random.default_rng(0).random((16, 8)))
    _, labels, features, _ = _two_prototypes(29, 10)
    fitted = trust.fit_for_head(features, labels, np.full((10, 2), 0.5))
    data = serialize_weights(head, trust.to_arrays(fitted))
    restored = load_head(spec, 8, 2, data)
    for saved, loaded in zip(head.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(saved, loaded)
    assert trust.from_arrays(stored_arrays(data, trust.PREFIX)).report() == fitted.report()
    assert stored_arrays(serialize_weights(head), trust.PREFIX) == {}  # a head file from before
    with pytest.raises(ValueError, match="arr_"):
        serialize_weights(head, {"arr_0": np.zeros(1)})
