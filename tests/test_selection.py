"""Unit tests of choosing a head on cached features: splits, folds, the exact logistic
regression, cross-validation with the one-standard-error rule, evaluation, diagnosis and the
one declaration of the options. Synthetic features, no backbone."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from models import fitting, heads, logistic
from models.diagnosis import diagnose
from models.evaluation import evaluate
from models.options import (
    AUTO_CANDIDATES,
    AUTO_HEADS,
    L2_PATH,
    AugmentationOptions,
    HeadCandidate,
    HeadOptions,
    TrainingConfig,
    TrainingOptions,
)
from models.selection import (
    FIXED,
    LOSS_RESOLUTION,
    ONE_STANDARD_ERROR,
    CandidateResult,
    choose,
    cross_validate,
    lowest_along_paths,
    mean_history,
    one_standard_error,
    rows_comparison,
    training_rows,
)
from models.splits import fold_count, stratified_folds, stratified_split

LINEAR = HeadOptions(hidden_units=0, dropout=0.0, l2=1e-2)
HIDDEN = HeadOptions(hidden_units=32, dropout=0.0, l2=1e-4)


def blobs(per_label: int, views: int, dim: int = 32, separation: float = 3.0, seed: int = 0):
    """Two Gaussian classes apart along the first axis; views are jittered copies of their image.

    Returns:
        float32 (n, 1 + views, dim) features and int (n,) labels.
    """
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], per_label)
    centres = np.zeros((2, dim))
    centres[1, 0] = separation
    images = centres[labels] + rng.normal(size=(len(labels), dim))
    features = images[:, None, :] + 0.1 * rng.normal(size=(len(labels), 1 + views, dim))
    features[:, 0] = images
    return features.astype(np.float32), labels


# ---------------------------------------------------------------- splits and folds


def test_stratified_split_is_seeded_and_covers_every_label():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    train, val = stratified_split(labels, 0.2, seed=3)
    again = stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    assert set(labels[val]) == {0, 1, 2} and set(labels[train]) == {0, 1, 2}
    assert len(set(train) & set(val)) == 0 and len(train) + len(val) == len(labels)


@pytest.mark.parametrize(("per_label", "split", "k"), [
    ((2, 2), 0.2, 2), ((3, 40), 0.2, 3), ((50, 60), 0.2, 5), ((50, 60), 0.5, 2),
    ((50, 60), 0.1, 10), ((1, 9), 0.2, 2)])
def test_fold_count_is_bounded_by_the_smallest_label(per_label, split, k):
    labels = np.repeat(np.arange(len(per_label)), per_label)
    assert fold_count(labels, split) == k


def test_stratified_folds_deal_each_label_evenly_and_are_seeded():
    labels = np.array([0] * 11 + [1] * 7 + [2] * 5)
    folds = stratified_folds(labels, 5, seed=1)
    np.testing.assert_array_equal(folds, stratified_folds(labels, 5, seed=1))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=2))
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for label in range(3):
        per_fold = np.bincount(folds[labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
        assert per_fold.min() >= 1  # every label with ≥ k images is validated in every fold


def test_stratified_folds_need_two_folds():
    with pytest.raises(ValueError, match="k ≥ 2"):
        stratified_folds(np.array([0, 1]), 1, seed=0)


# ---------------------------------------------------------------- the exact logistic regression


def objective_gradient(z, labels, kernel, bias, l2):
    """The gradient of mean cross-entropy + l2‖kernel‖², written out independently."""
    logits = z @ kernel + bias
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1
    return z.T @ p / len(labels) + 2 * l2 * kernel, p.mean(axis=0)


@pytest.mark.parametrize("l2", [1.0, 1e-2, 1e-4])
def test_logistic_regression_reaches_the_minimum(l2):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 40)) * rng.uniform(0.1, 10, 40) + rng.normal(size=40)
    labels = (x[:, :3] @ rng.normal(size=(3, 3))).argmax(axis=1)
    z = logistic.Standardizer.fit(x)(x)
    fit = logistic.fit_logistic(z, labels, 3, l2)
    kernel_gradient, bias_gradient = objective_gradient(z.astype(np.float64), labels, fit.kernel,
                                                        fit.bias, l2)
    assert fit.converged and fit.iterations == len(fit.history) >= 1
    assert np.abs(kernel_gradient).max() < 1e-4 and np.abs(bias_gradient).max() < 1e-4
    assert np.allclose(fit.probabilities(z).sum(axis=1), 1.0)


def test_a_warm_start_reaches_the_same_solution_sooner():
    features, labels = blobs(40, 0, dim=256, separation=1.0)
    z = logistic.Standardizer.fit(features[:, 0])(features[:, 0])
    strong = logistic.fit_logistic(z, labels, 2, 0.03)
    cold = logistic.fit_logistic(z, labels, 2, 0.01)
    warm = logistic.fit_logistic(z, labels, 2, 0.01, init=strong)
    assert warm.iterations < cold.iterations
    np.testing.assert_allclose(warm.probabilities(z), cold.probabilities(z), atol=5e-4)


def test_a_solved_linear_head_scores_raw_features_like_the_solution():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(50, 16)) * 30 + 80).astype(np.float32)
    x[:, 5] = 7.0  # a constant feature: zero variance, as dead ReLU channels have
    labels = (x[:, 0] > 80).astype(int)
    standardizer = logistic.Standardizer.fit(x)
    solution = logistic.fit_logistic(standardizer(x), labels, 2, 1e-3)
    head = heads.linear_head(standardizer, solution, LINEAR)
    served = np.asarray(head.predict_on_batch(x))
    np.testing.assert_allclose(served, solution.probabilities(standardizer(x)), atol=1e-5)
    restored = heads.load_head(LINEAR, 16, 2, heads.serialize_weights(head))
    np.testing.assert_allclose(np.asarray(restored.predict_on_batch(x)), served, atol=1e-6)


# ---------------------------------------------------------------- cross-validation and the rule


def candidate(l2: float, hidden: int, losses, accuracies=None, trained_on: str = "augmented",
              image_losses=None) -> CandidateResult:
    """A cross-validated candidate; its per-image losses default to each fold's loss for the
    four images of that fold."""
    losses = np.array(losses, float)
    per_image = np.repeat(losses, 4) if image_losses is None else np.array(image_losses, float)
    return CandidateResult(HeadOptions(hidden_units=hidden, dropout=0.0, l2=l2),
                           HeadOptions(hidden_units=hidden, l2=l2).parameters(10, 2), losses,
                           np.array(accuracies if accuracies else [0.9] * len(losses)),
                           [1] * len(losses), [False] * len(losses), [[]] * len(losses),
                           np.zeros((len(per_image), 2)), per_image, trained_on=trained_on)


def test_one_standard_error_prefers_the_smallest_head_within_one_se_of_the_best():
    big = candidate(1e-3, 64, [0.20, 0.30, 0.25, 0.35, 0.15])  # mean 0.25, SE 0.035
    close = candidate(0.1, 0, [0.26, 0.33, 0.27, 0.30, 0.24])  # mean 0.28: within
    stronger = candidate(1.0, 0, [0.40, 0.45, 0.42, 0.39, 0.44])  # mean 0.42: outside
    assert one_standard_error([big, close, stronger], 10, 2) == 1
    far = candidate(0.1, 0, [0.33, 0.36, 0.30, 0.31, 0.35])  # mean 0.33: outside
    assert one_standard_error([big, far, stronger], 10, 2) == 0


def test_one_standard_error_breaks_ties_of_size_by_stronger_l2():
    weak = candidate(1e-3, 0, [0.2, 0.2, 0.2])
    strong = candidate(0.3, 0, [0.2004, 0.2004, 0.2004])  # within LOSS_RESOLUTION
    assert one_standard_error([weak, strong], 10, 2) == 1
    assert LOSS_RESOLUTION > 4e-4


def test_along_an_l2_path_the_lowest_loss_wins_not_the_strongest_within_one_se():
    # hymenoptera's augmented path (bench/RESULTS.md): L2 1 is within a standard error of the
    # lowest loss (L2 0.3), and the one-standard-error rule alone would take it.
    path = [candidate(3.0, 0, [0.26, 0.27, 0.25, 0.28, 0.25]),
            candidate(1.0, 0, [0.20, 0.24, 0.19, 0.25, 0.19]),   # mean 0.214
            candidate(0.3, 0, [0.16, 0.24, 0.15, 0.26, 0.15]),   # mean 0.192, SE 0.024
            candidate(0.1, 0, [0.15, 0.26, 0.14, 0.28, 0.15])]   # mean 0.196
    assert path[1].loss_mean <= path[2].loss_mean + path[2].loss_se < path[0].loss_mean
    assert lowest_along_paths(path) == [2]
    assert choose(path, 10, 2) == 2


def test_ties_on_a_path_go_to_the_stronger_l2():
    path = [candidate(1e-3, 0, [0.1, 0.1, 0.1]), candidate(0.3, 0, [0.1008, 0.1008, 0.1008]),
            candidate(3.0, 0, [0.2, 0.2, 0.2])]
    assert lowest_along_paths(path) == [1]


def test_between_paths_the_smaller_head_wins_within_one_standard_error():
    linear = [candidate(1.0, 0, [0.30, 0.34, 0.29, 0.35, 0.32]),  # the path point: mean 0.32
              candidate(3.0, 0, [0.40, 0.41, 0.39, 0.42, 0.40])]
    close = candidate(1e-3, 64, [0.20, 0.40, 0.25, 0.35, 0.30])   # mean 0.30, SE 0.035
    assert choose([*linear, close], 10, 2) == 0
    far = candidate(1e-3, 64, [0.20, 0.30, 0.22, 0.28, 0.25])     # mean 0.25, SE 0.019
    assert choose([*linear, far], 10, 2) == 2


def test_paths_of_the_same_size_go_to_the_lower_loss():
    augmented = candidate(0.3, 0, [0.19, 0.20, 0.18, 0.21, 0.19])
    original = candidate(3.0, 0, [0.20, 0.21, 0.19, 0.22, 0.20], trained_on="original")
    # Within a standard error of each other, and the original-only one has the stronger L2:
    # neither is the smaller hypothesis, so the lower validation loss decides.
    assert choose([augmented, original], 10, 2) == 0
    assert choose([original.__class__(**{**original.__dict__, "fold_losses":
                                         original.fold_losses - 0.02}), augmented], 10, 2) == 0


def test_augmented_views_must_beat_the_probe_by_a_paired_standard_error():
    # Few-shot hymenoptera (bench/RESULTS.md): the augmented path point has the lower mean loss
    # (0.399 vs 0.437), but image by image the gain (0.039) is within its standard error
    # (0.040), so the probe trained on the originals is served.
    probe_losses = np.tile([0.3, 0.6], 20)
    noisy = probe_losses - np.tile([0.44, -0.36], 20)[::-1]  # mean gain 0.04, SE 0.065
    augmented = candidate(0.3, 0, [noisy[i::5].mean() for i in range(5)], image_losses=noisy)
    original = candidate(1.0, 0, [probe_losses[i::5].mean() for i in range(5)],
                         trained_on="original", image_losses=probe_losses)
    assert augmented.loss_mean < original.loss_mean
    comparison = rows_comparison([augmented, original], 0)
    assert comparison.original == 1 and not comparison.earned
    assert comparison.gain == pytest.approx(original.image_losses.mean()
                                            - augmented.image_losses.mean())
    assert comparison.gain_se > comparison.gain > 0
    assert choose([augmented, original], 10, 2) == 1
    # The same mean gain with little spread between images is earned.
    steady = probe_losses - comparison.gain
    consistent = candidate(0.3, 0, [steady[i::5].mean() for i in range(5)], image_losses=steady)
    assert rows_comparison([consistent, original], 0).earned
    assert choose([consistent, original], 10, 2) == 0


def test_the_probe_check_applies_only_to_an_augmented_winner_with_a_twin():
    hidden = candidate(1e-3, 64, [0.10] * 5)
    original = candidate(1.0, 0, [0.30] * 5, trained_on="original")
    assert rows_comparison([hidden, original], 0) is None  # no probe of the same head
    assert choose([hidden, original], 10, 2) == 0
    assert rows_comparison([hidden, original], 1) is None  # no augmented twin of the probe
    lone = candidate(0.3, 0, [0.2] * 5)
    assert rows_comparison([lone], 0) is None


def test_candidates_trained_on_originals_use_view_0_only():
    features, labels = blobs(per_label=6, views=3)
    probe = HeadCandidate(head=LINEAR, trained_on="original")
    x, y = training_rows(probe, features, labels)
    np.testing.assert_array_equal(x, features[:, 0])
    np.testing.assert_array_equal(y, labels)
    x, y = training_rows(HeadCandidate(head=LINEAR), features, labels)
    assert x.shape == (4 * len(labels), features.shape[-1])
    np.testing.assert_array_equal(y, np.repeat(labels, 4))


def test_when_augmented_views_mislead_the_probe_is_chosen():
    # Augmented views that carry the other label's signal: every head trained on them learns
    # the wrong thing, the originals alone do not, and the folds (scored on originals) show it.
    features, labels = blobs(per_label=20, views=4, separation=3.0)
    features[:, 1:, 0] = 3.0 * (1 - labels[:, None])
    folds = stratified_folds(labels, 5, seed=0)
    specs = [*(HeadCandidate(head=HeadOptions(hidden_units=0, dropout=0.0, l2=l2))
               for l2 in (1.0, 0.1)),
             *(HeadCandidate(head=HeadOptions(hidden_units=0, dropout=0.0, l2=l2),
                             trained_on="original") for l2 in (1.0, 0.1))]
    selection = cross_validate(specs, features, labels, folds, 2, TrainingConfig())
    assert selection.result.trained_on == "original"
    assert selection.result.accuracy_mean > 0.8
    assert max(c.accuracy_mean for c in selection.candidates[:2]) < 0.5
    probe = [c for c in selection.candidates if c.trained_on == "original"]
    picked = probe[0].out_of_fold[np.arange(len(labels)), labels]
    np.testing.assert_allclose(probe[0].image_losses, -np.log(np.clip(picked, 1e-7, 1)))
    for fold in range(5):  # out of fold, from a fit on the originals of the other folds
        train, held_out = folds != fold, folds == fold
        solved = fitting.fit_head(probe[0].spec, fitting.Fold(
            features[train, 0], labels[train], features[held_out, 0], labels[held_out]), 2,
            TrainingConfig())
        np.testing.assert_allclose(probe[0].out_of_fold[held_out], solved.val_probabilities,
                                   atol=1e-6)
    report = selection.report()
    assert [c["trained_on"] for c in report["candidates"]] == \
        ["augmented", "augmented", "original", "original"]
    # The report says why: the augmented views raised the per-image validation loss.
    assert report["augmentation"]["original"] == selection.chosen
    assert report["augmentation"]["gain"] < 0 and not report["augmentation"]["earned"]
    assert selection.views_rejected
    # A selection among probes alone (the preview) compared no views: none were rejected.
    assert not cross_validate(specs[2:], features, labels, folds, 2,
                              TrainingConfig()).views_rejected
    # Nor does one without views (augmentation.views 0): both twins train on the originals.
    alone = cross_validate(specs, features[:, :1], labels, folds, 2, TrainingConfig())
    assert alone.augmentation is None and not alone.views_rejected
    assert alone.result.trained_on == "original"
    assert "augmentation" not in alone.report()


def test_the_default_grid_chooses_by_the_rule_and_its_diagnosis_agrees():
    features, labels = blobs(per_label=15, views=2, dim=48, separation=1.5)
    folds = stratified_folds(labels, 5, seed=0)
    config = TrainingConfig(max_epochs=30, patience=5)
    assert config.candidates == AUTO_CANDIDATES
    selection = cross_validate(config.heads, features, labels, folds, 2, config)
    candidates, chosen = selection.candidates, selection.result
    assert len(candidates) == 2 * len(L2_PATH) + 1
    assert {c.trained_on for c in candidates} == {"augmented", "original"}
    assert selection.rule == ONE_STANDARD_ERROR
    # On its path the chosen head has the lowest mean loss (up to the resolution) ...
    path = [c for c in candidates if c.candidate.path == chosen.candidate.path]
    assert chosen.loss_mean <= min(c.loss_mean for c in path) + LOSS_RESOLUTION
    # ... and every other path's point is worse by more than the threshold, or bigger, or as
    # big with a higher loss.
    report = selection.report()
    assert selection.chosen in report["path_best"] and len(report["path_best"]) == 3
    # The augmented linear head and its twin on the originals are compared image by image; the
    # report carries the comparison when a linear head won.
    linear = next(i for i in report["path_best"]
                  if not candidates[i].spec.hidden_units and candidates[i].trained_on == "augmented")
    verdict = rows_comparison(candidates, linear)
    assert candidates[verdict.original].trained_on == "original"
    gains = candidates[verdict.original].image_losses - candidates[linear].image_losses
    assert verdict.gain == pytest.approx(gains.mean())
    assert verdict.earned == (gains.mean() > max(gains.std(ddof=1) / np.sqrt(30),
                                                 LOSS_RESOLUTION))
    if chosen.spec.hidden_units:
        assert "augmentation" not in report
    else:
        assert report["augmentation"] == verdict.report()
        assert selection.chosen == (linear if verdict.earned else verdict.original)
    for i in report["path_best"]:
        other = candidates[i]
        assert (other.loss_mean > report["threshold"] or other.d > chosen.d
                or (other.d == chosen.d and other.loss_mean >= chosen.loss_mean)
                or i == selection.chosen or (i == linear and not verdict.earned))
    # The diagnosis may not call the chosen head too big: every smaller head lost.
    key = chosen.spec.size_key(48, 2)
    smaller = [c for c in candidates if c.spec.size_key(48, 2) < key]
    assert selection.smaller_rejected == len(smaller)
    assert all(c.loss_mean >= chosen.loss_mean for c in smaller)
    notes = " ".join(diagnose(chosen.d, 60, 1.0, chosen.accuracy_mean, 30, 2,
                              candidates=len(candidates),
                              smaller_rejected=selection.smaller_rejected))
    assert "smaller head" not in notes and "can memorise" not in notes


def test_with_few_separable_examples_the_rule_keeps_the_linear_head():
    features, labels = blobs(per_label=8, views=2)
    folds = stratified_folds(labels, 4, seed=0)
    config = TrainingConfig(max_epochs=100, patience=10, learning_rate=1e-2, batch_size=16)
    selection = cross_validate((HIDDEN, LINEAR), features, labels, folds, 2, config)
    assert selection.rule == ONE_STANDARD_ERROR and selection.k == 4
    assert selection.result.spec == LINEAR
    assert selection.smaller_rejected == 0
    report = selection.report()
    assert [c["head"] for c in report["candidates"]] == [HIDDEN.as_dict(), LINEAR.as_dict()]
    for entry in report["candidates"]:
        assert {"val_loss_mean", "val_loss_std", "val_loss_se", "val_accuracy_mean",
                "val_accuracy_std", "best_epoch", "d"} <= set(entry)
        assert entry["val_loss_se"] == pytest.approx(entry["val_loss_std"] / 2, abs=1e-4)


def test_when_a_hidden_layer_is_needed_the_rule_picks_it():
    # XOR of the signs of two features: no linear head beats chance, a hidden layer can.
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(240, 8))
    x[:, :2] += np.sign(x[:, :2]) * 0.3  # a margin around the axes
    labels = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(int)
    features = x[:, None, :].astype(np.float32)
    folds = stratified_folds(labels, 5, seed=0)
    config = TrainingConfig(max_epochs=150, patience=15, learning_rate=3e-2, batch_size=64)
    specs = (LINEAR, HeadOptions(hidden_units=0, dropout=0.0, l2=1.0), HIDDEN)
    selection = cross_validate(specs, features, labels, folds, 2, config)
    assert selection.result.spec == HIDDEN
    assert selection.result.accuracy_mean > 0.9
    assert max(c.accuracy_mean for c in selection.candidates[:2]) < 0.7
    assert selection.smaller_rejected == 2


def test_augmented_views_stay_in_their_images_fold():
    # Pure noise with labels that mean nothing, and views that are near copies of their image:
    # had a held-out image's views been trained on, a weak-L2 head would recognise them.
    rng = np.random.default_rng(4)
    images = rng.normal(size=(40, 256))
    features = (images[:, None, :] + 0.01 * rng.normal(size=(40, 4, 256))).astype(np.float32)
    labels = np.array([0, 1] * 20)
    folds = stratified_folds(labels, 5, seed=0)
    weak = HeadOptions(hidden_units=0, dropout=0.0, l2=1e-4)
    selection = cross_validate((weak,), features, labels, folds, 2, TrainingConfig())
    assert selection.rule == FIXED
    assert selection.result.accuracy_mean < 0.8
    assert evaluate(selection.result.out_of_fold, labels, ["a", "b"])["accuracy"] < 0.8


def test_out_of_fold_probabilities_come_from_the_fold_that_held_each_image_out():
    features, labels = blobs(per_label=6, views=1, separation=6.0)
    folds = stratified_folds(labels, 3, seed=0)
    selection = cross_validate((LINEAR,), features, labels, folds, 2, TrainingConfig())
    out_of_fold = selection.result.out_of_fold
    for fold in range(3):
        train, held_out = folds != fold, folds == fold
        solved = fitting.fit_head(LINEAR, fitting.Fold(
            features[train].reshape(-1, features.shape[-1]), np.repeat(labels[train], 2),
            features[held_out, 0], labels[held_out]), 2, TrainingConfig())
        np.testing.assert_allclose(out_of_fold[held_out], solved.val_probabilities, atol=1e-6)


def test_mean_history_averages_the_folds_still_running_while_most_of_them_run():
    def fold(*val_losses: float) -> list[dict]:
        return [{"epoch": e, "loss": 1.0, "accuracy": 0.5, "val_loss": v, "val_accuracy": 0.5}
                for e, v in enumerate(val_losses, 1)]

    rows = mean_history([fold(2.0, 1.0, 0.8), fold(4.0, 3.0), fold(3.0, 2.0, 1.0, 0.1),
                         fold(3.0), fold(3.0)])
    assert rows == [
        {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 3.0, "val_accuracy": 0.5, "folds": 5},
        {"epoch": 2, "loss": 1.0, "accuracy": 0.5, "val_loss": 2.0, "val_accuracy": 0.5, "folds": 3}]
    # epochs 3 (2 of 5 folds) and 4 (1 fold: 0.1, a jump no fold's curve has) are left out
    two = mean_history([fold(2.0, 1.0), fold(4.0)])
    assert [row["folds"] for row in two] == [2]


# ---------------------------------------------------------------- evaluation and diagnosis


def test_evaluate_counts_per_label_scores_and_the_confusion_matrix():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    result = evaluate(probabilities, np.array([0, 1, 1, 1]), ["a", "b"])
    assert result["accuracy"] == 0.75
    assert result["confusion_matrix"] == [[1, 0], [1, 2]]
    assert result["per_label"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": 0.6667, "support": 1}
    assert result["loss"] == pytest.approx(-np.log([0.9, 0.8, 0.4, 0.7]).mean(), abs=1e-4)


def test_diagnosis_does_not_call_the_chosen_head_too_big_when_smaller_ones_lost():
    notes = diagnose(d=4098, m=980, train_accuracy=1.0, val_accuracy=0.93, validation_size=245,
                     num_classes=2, candidates=12, smaller_rejected=3)
    text = " ".join(notes)
    assert "d/m = 4.18" in text and "smaller head" not in text
    assert "cross-validation tried 3 smaller" in text and "none had a lower" in text
    assert "augmented views (augmentation.views)" in text


def test_diagnosis_of_a_probe_does_not_advise_more_augmentation():
    notes = " ".join(diagnose(d=4098, m=245, train_accuracy=1.0, val_accuracy=0.8,
                              validation_size=245, num_classes=2, candidates=23,
                              smaller_rejected=3, views_rejected=True))
    assert "augmentation" not in notes and "original images only" in notes
    assert "overfits" in notes and "smaller head" not in notes


def test_diagnosis_of_a_head_that_saw_no_views_still_advises_them():
    # The preview (and augmentation.views 0) trains on the originals without comparing views.
    notes = " ".join(diagnose(d=4098, m=245, train_accuracy=1.0, val_accuracy=0.8,
                              validation_size=245, num_classes=2, candidates=12,
                              smaller_rejected=3))
    assert "augmented views (augmentation.views)" in notes and "did not beat" not in notes


def test_diagnosis_suggests_a_smaller_head_only_for_a_fixed_head():
    fixed = " ".join(diagnose(d=525058, m=980, train_accuracy=1.0, val_accuracy=0.8,
                              validation_size=245, num_classes=2, candidates=1))
    assert "smaller head" in fixed and 'head "auto"' in fixed and "overfits" in fixed
    # The chosen head is the smallest that was tried: nothing smaller to suggest.
    smallest = " ".join(diagnose(d=4098, m=200, train_accuracy=1.0, val_accuracy=0.8,
                                 validation_size=40, num_classes=2, candidates=12))
    assert "smaller head" not in smallest and "already the smallest" in smallest
    assert "overfits" in smallest


# ---------------------------------------------------------------- one declaration of the options


def test_the_api_schemas_use_the_models_options():
    from service.api import schemas

    assert schemas.AugmentationOptions is AugmentationOptions
    assert schemas.HeadOptions is HeadOptions
    assert schemas.TrainingOptions is TrainingOptions
    with pytest.raises(ValidationError):
        TrainingOptions.model_validate({"augmentation": {"viewz": 2}})
    with pytest.raises(ValidationError):
        TrainingOptions.model_validate({"head": {"l2": -1}})


def test_a_config_of_options_keeps_every_option_and_the_grid():
    options = TrainingOptions.model_validate(
        {"name": "x", "validation_split": 0.25, "seed": 3, "augmentation": {"views": 2},
         "head": {"hidden_units": 8, "dropout": 0.1, "l2": 0.5}})
    config = TrainingConfig.of(options, max_image_pixels=1000)
    assert config.validation_split == 0.25 and config.seed == 3 and config.max_image_pixels == 1000
    assert config.augmentation.views == 2
    assert config.heads == (HeadCandidate(head=HeadOptions(hidden_units=8, dropout=0.1, l2=0.5)),)
    assert TrainingConfig.of(TrainingOptions()).heads == AUTO_CANDIDATES
    assert [c.head for c in AUTO_CANDIDATES if c.trained_on == "augmented"] == list(AUTO_HEADS)
    # A plain head given as a candidate trains on augmented rows.
    assert TrainingConfig(candidates=(LINEAR,)).candidates == (HeadCandidate(head=LINEAR),)
    with pytest.raises(ValidationError):
        HeadCandidate(head=LINEAR, trained_on="augmented views")


def test_options_and_the_rules_import_without_tensorflow():
    code = ("import sys; import models.options, models.splits, models.selection, "
            "models.diagnosis, models.evaluation, models.logistic, models.progress; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('tensorflow', 'keras')))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
