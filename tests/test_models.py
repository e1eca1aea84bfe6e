"""Unit tests of models/: small images, random backbone weights."""

import numpy as np
import pytest
from pydantic import ValidationError

from models import fitting, heads, training
from models.augmentation import Augmentation, augment
from models.backbone import FEATURE_DIM, build_vgg16
from models.evaluation import evaluate
from models.features import extract_features
from models.options import (AUTO_CANDIDATES, AUTO_HEADS, AugmentationOptions, HeadOptions,
                            TrainingConfig)
from models.prediction import class_scores, rank
from models.preprocessing import load_image
from models.weights import IMAGENET_FINGERPRINT
from tests.helpers import COLOURS, forced_loss, image_bytes

SIZE = 32


def toy_images(per_label=8, labels=("red", "blue")):
    images, label_ids = [], []
    for index, label in enumerate(labels):
        for i in range(per_label):
            images.append(image_bytes(COLOURS[label], seed=1000 * index + i))
            label_ids.append(index)
    return images, np.array(label_ids), list(labels)


#: One fixed linear head, solved exactly: cross-validated for its metrics, nothing to choose.
FAST = TrainingConfig(max_epochs=30, patience=4, batch_size=16,
                      augmentation=AugmentationOptions(views=1),
                      head=HeadOptions(hidden_units=0, dropout=0.0, l2=1e-3))


# ---------------------------------------------------------------- backbone


def test_backbone_gives_2048_features_and_is_frozen(backbone):
    pixels = np.zeros((3, SIZE, SIZE, 3), np.uint8)
    features = backbone.features(pixels)
    assert features.shape == (3, FEATURE_DIM) and features.dtype == np.float32
    assert backbone.model.trainable_weights == []
    assert backbone.identity.weights == "random"
    assert backbone.identity.fingerprint != IMAGENET_FINGERPRINT


def test_backbone_rejects_wrong_image_shape(backbone):
    with pytest.raises(ValueError, match="Expected images of shape"):
        backbone.features(np.zeros((1, SIZE + 1, SIZE, 3), np.uint8))


def test_vgg16_refuses_images_smaller_than_32px():
    with pytest.raises(ValueError, match="at least 32 px"):
        build_vgg16(16)


def test_backbone_counts_passes(backbone):
    before = backbone.passes
    backbone.features(np.zeros((5, SIZE, SIZE, 3), np.uint8))
    assert backbone.passes - before == 5


# ---------------------------------------------------------------- augmentation


def test_augmentation_changes_pixels_and_keeps_shape():
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.uint8)
    out = augment(images, Augmentation(), np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 255
    assert np.abs(out - images).mean() > 5


def test_augmentation_is_reproducible_from_the_seed():
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    first = augment(images, Augmentation(), np.random.default_rng(7))
    again = augment(images, Augmentation(), np.random.default_rng(7))
    other = augment(images, Augmentation(), np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_augmentation_without_perturbations_is_identity():
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3)).astype(np.uint8)
    none = Augmentation(noise=0, flip=False, rotation=0, shift=0)
    np.testing.assert_allclose(augment(images, none, np.random.default_rng(0)), images, atol=1e-3)


def test_flip_only_mirrors_or_keeps_each_image():
    images = np.random.default_rng(0).integers(0, 256, (16, SIZE, SIZE, 3)).astype(np.uint8)
    flip = Augmentation(noise=0, flip=True, rotation=0, shift=0)
    out = augment(images, flip, np.random.default_rng(3))
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, images)]
    kept = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, images)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert any(mirrored) and any(kept)


def test_augmentation_keeps_labels_in_extracted_features(backbone):
    images, labels, _ = toy_images(per_label=3)
    features = extract_features(images, backbone, views=2, augmentation=Augmentation(),
                                rng=np.random.default_rng(0), batch_size=4)
    assert features.shape == (6, 3, FEATURE_DIM)
    # Each augmented view stays closer to its own image's label than to the other label.
    centroids = [features[labels == k, 0].mean(axis=0) for k in (0, 1)]
    for row, label in zip(features, labels):
        for view in row[1:]:
            distances = [np.linalg.norm(view - c) for c in centroids]
            assert int(np.argmin(distances)) == label


def test_invalid_augmentation_is_refused():
    with pytest.raises(ValidationError, match="shift"):
        Augmentation(shift=0.7)


# ---------------------------------------------------------------- features and training


def test_backbone_runs_once_per_image_and_view(backbone):
    """Both stages, preview and augmented, use view 0: it is extracted once."""
    images, labels, names = toy_images(per_label=5)
    before = backbone.passes
    config = FAST.model_copy(update={"augmentation": AugmentationOptions(views=3)})
    made: list[training.TrainingResult] = []
    result = training.train_classifier(images, labels, names, backbone, config,
                                       on_stage=made.append)
    assert backbone.passes - before == len(images) * (1 + 3)
    assert [stage["stage"] for stage in result.stages] == ["preview", "augmented"]
    preview = made[0].report["m"]
    assert made[0].stage == "preview" and preview["train_after_augmentation"] == len(images)
    # Every image trains the served head, so every image has its views.
    augmented = training.train_classifier(images, labels, names, backbone, config,
                                          stages=training.STAGES[1:]).report["m"]
    assert augmented["train"] == augmented["validation"] == len(images)
    assert augmented["train_after_augmentation"] == len(images) * 4


def test_the_augmented_stage_reuses_view_0_and_draws_the_same_views(backbone):
    images, labels, names = toy_images(per_label=3)
    config = FAST.model_copy(update={"augmentation": AugmentationOptions(views=2)})
    run = training.StagedRun(images, labels, names, backbone, config,
                             folds=np.zeros(len(images), int), on_progress=lambda p: None,
                             should_stop=lambda: False)
    first = run.extract("preview", views=0).copy()
    before = backbone.passes
    staged = run.extract("augmented", views=2)
    assert backbone.passes - before == len(images) * 2
    at_once = extract_features(images, backbone, views=2, augmentation=config.augmentation,
                               seed=config.seed, batch_size=32)
    assert first.shape == (6, 1, FEATURE_DIM) and staged.shape == (6, 3, FEATURE_DIM)
    np.testing.assert_array_equal(staged[:, 0], first[:, 0])
    np.testing.assert_allclose(staged, at_once, rtol=1e-5, atol=1e-5)


def test_a_later_stage_is_served_only_when_its_loss_is_lower(backbone):
    images, labels, names = toy_images(per_label=4)
    stages = (("preview", forced_loss(training.preview_stage, 0.5)),
              ("augmented", forced_loss(training.augmented_stage, 0.7)),
              ("again", forced_loss(training.preview_stage, 0.5)),  # a tie does not replace
              ("last", forced_loss(training.augmented_stage, 0.3)))
    served: list[training.TrainingResult] = []
    result = training.train_classifier(images, labels, names, backbone, FAST, stages=stages,
                                       on_stage=served.append)
    assert [r.val_loss for r in served] == [0.5, 0.3]
    assert [r.stage for r in served] == ["preview", "augmented"]
    assert result is served[-1] and result.report["stage"] == "augmented"
    assert [s["served"] for s in result.stages] == [True, False, False, True]
    assert [s["val_loss"] for s in result.stages] == [0.5, 0.7, 0.5, 0.3]
    assert all(s["elapsed_s"] > 0 for s in result.stages)
    assert served[0].stages == result.stages[:1]  # what was known when it was served


def test_views_a_later_stage_rejected_are_not_advised_to_the_head_that_stays(backbone):
    from models.selection import RowsComparison

    def views_lost(staged):
        result = forced_loss(training.augmented_stage, 0.7)(staged)
        # the probe check compared views with the originals, and the views lost
        result.selection.augmentation = RowsComparison(0, 1, gain=-0.01, gain_se=0.005)
        return result

    images, labels, names = toy_images(per_label=4)
    stages = (("preview", forced_loss(training.preview_stage, 0.5)), ("augmented", views_lost))
    served: list[training.TrainingResult] = []
    result = training.train_classifier(images, labels, names, backbone, FAST, stages=stages,
                                       on_stage=served.append)
    assert result.stage == "preview" and len(served) == 1
    assert result.report["diagnosis"] == training.diagnosis(
        result.report, result.selection, views_rejected=True)
    assert result.report["diagnosis"] != training.diagnosis(
        result.report, result.selection, views_rejected=False)


def test_every_stage_validates_on_the_same_folds(backbone):
    images, labels, names = toy_images(per_label=5)
    served: list[training.TrainingResult] = []
    stages = (("preview", forced_loss(training.preview_stage, 1.0)),
              ("augmented", forced_loss(training.augmented_stage, 0.1)))
    training.train_classifier(images, labels, names, backbone, FAST, stages=stages,
                              on_stage=served.append)
    preview, augmented = served
    np.testing.assert_array_equal(preview.selection.folds, augmented.selection.folds)
    assert preview.report["selection"]["k"] == augmented.report["selection"]["k"] == 5


def test_the_preview_cross_validates_only_the_exact_candidates(backbone):
    images, labels, names = toy_images(per_label=4)
    config = TrainingConfig(augmentation=AugmentationOptions(views=1), max_epochs=5)
    served: list[training.TrainingResult] = []
    stages = (("preview", forced_loss(training.preview_stage, 1.0)),
              ("augmented", forced_loss(training.augmented_stage, 0.1)))
    training.train_classifier(images, labels, names, backbone, config, stages=stages,
                              on_stage=served.append)
    preview, augmented = (r.report["selection"]["candidates"] for r in served)
    assert [c["head"] for c in preview] == [h.as_dict() for h in AUTO_HEADS if h.is_exact]
    assert {c["trained_on"] for c in preview} == {"original"}
    assert [(c["head"], c["trained_on"]) for c in augmented] == [
        (c.head.as_dict(), c.trained_on) for c in TrainingConfig().heads]


def test_a_stage_that_would_repeat_the_preview_is_skipped(backbone):
    images, labels, names = toy_images(per_label=3)
    config = FAST.model_copy(update={"augmentation": AugmentationOptions(views=0)})
    seen = []
    result = training.train_classifier(images, labels, names, backbone, config,
                                       on_progress=seen.append)
    assert [s["stage"] for s in result.stages] == ["preview"]
    assert {p.training_stage for p in seen} == {"preview"}


def test_a_stop_between_stages_cancels(backbone):
    images, labels, names = toy_images(per_label=3)
    served = []

    def stop_after_the_first(result):
        served.append(result)

    with pytest.raises(training.Cancelled):
        training.train_classifier(images, labels, names, backbone, FAST,
                                  on_stage=stop_after_the_first,
                                  should_stop=lambda: bool(served))
    assert [r.stage for r in served] == ["preview"]


def test_early_stopping_restores_the_best_epoch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    x_val = rng.normal(size=(20, 16)).astype(np.float32)
    y_val = rng.integers(0, 2, 20)  # unlearnable: validation loss soon rises
    config = FAST.model_copy(update={"max_epochs": 200, "patience": 3, "learning_rate": 0.05})
    spec = HeadOptions(hidden_units=0, dropout=0.1, l2=0.0)  # dropout: trained by Adam
    fit = fitting.fit_head(spec, fitting.Fold(x, y, x_val, y_val), 2, config)
    assert not spec.is_exact
    assert fit.stopped_early and len(fit.history) < 200
    assert fit.best_epoch == len(fit.history) - 3
    restored = evaluate(fit.val_probabilities, y_val, ["a", "b"])["loss"]
    assert restored == pytest.approx(fit.history[fit.best_epoch - 1]["val_loss"], abs=2e-3)
    assert restored < fit.history[-1]["val_loss"]


def test_an_adam_refit_runs_the_given_epochs_and_serves_raw_features():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(40, 8)) * 50 + 100).astype(np.float32)  # far from standardised
    y = (x[:, 0] > 100).astype(int)
    spec = HeadOptions(hidden_units=4, dropout=0.0, l2=0.0)
    config = FAST.model_copy(update={"learning_rate": 0.05})
    fit = fitting.fit_head(spec, fitting.Fold(x, y), 2, config, epochs=7, build=True)
    assert fit.epochs == 7 and fit.val_probabilities is None
    probabilities = np.asarray(fit.model.predict_on_batch(x))
    assert (probabilities.argmax(axis=1) == y).mean() >= 0.9
    assert heads.trainable_parameters(fit.model) == spec.parameters(8, 2)


def test_training_learns_a_separable_toy_task_and_reports(backbone):
    images, labels, names = toy_images(per_label=10)
    result = training.train_classifier(images, labels, names, backbone, FAST)
    report = result.report
    assert report["validation"]["accuracy"] == 1.0
    assert report["d"] == FEATURE_DIM * 2 + 2
    assert report["d_over_m"] == pytest.approx(report["d"] / report["m"]["train_after_augmentation"],
                                               abs=1e-3)
    assert report["best_epoch"] <= len(report["history"])
    assert set(report["validation"]["per_label"]) == {"red", "blue"}
    # Out of fold: every image is in the confusion matrix exactly once.
    assert np.array(report["validation"]["confusion_matrix"]).sum() == len(images)
    assert any("d/m" in note for note in report["diagnosis"])
    assert {"decode", "features", "selection", "head"} <= set(report["timings_s"])
    selection = report["selection"]
    assert selection["k"] == 5 and len(selection["candidates"]) == 1
    assert selection["rule"].startswith("fixed head")
    assert report["head"] == FAST.head.as_dict()


def test_the_default_grid_is_what_train_classifier_cross_validates(backbone):
    assert TrainingConfig().heads == AUTO_CANDIDATES
    images, labels, names = toy_images(per_label=4)
    config = TrainingConfig(augmentation=AugmentationOptions(views=1), max_epochs=20)
    # NB: the augmented stage alone: after a preview, its report would be the preview's where
    # the views did not earn their place (the same probe).
    report = training.train_classifier(images, labels, names, backbone, config,
                                       stages=[("augmented", training.augmented_stage)]).report
    tried = [{"head": candidate["head"], "trained_on": candidate["trained_on"]}
             for candidate in report["selection"]["candidates"]]
    assert tried == [candidate.as_dict() for candidate in AUTO_CANDIDATES]
    assert report["selection"]["rule"].startswith("lowest validation loss along each L2 path")
    chosen = report["selection"]["candidates"][report["selection"]["chosen"]]
    assert report["selection"]["refit"]["trained_on"] == chosen["trained_on"]
    assert report["selection"]["refit"]["rows"] == report["m"]["train_after_augmentation"] == (
        8 if chosen["trained_on"] == "original" else 16)
    tried = [candidate["head"] for candidate in tried]
    assert report["selection"]["k"] == 4  # the smallest label has 4 images
    # Both ends the benchmarks need: weak L2 (1e-4) and strong (1), and one hidden layer.
    l2s = [head["l2"] for head in tried if head["hidden_units"] == 0]
    assert min(l2s) <= 1e-4 and max(l2s) >= 1.0
    assert any(head["hidden_units"] for head in tried)
    chosen = report["selection"]["candidates"][report["selection"]["chosen"]]
    assert chosen["head"] == report["head"] and chosen["d"] == report["d"]


def test_out_of_fold_metrics_are_not_the_refit_training_metrics(backbone):
    # Labels unrelated to the pictures: a weakly regularised head memorises its training images
    # (the refit scores 1.0 on them) but cannot predict an image it did not train on.
    images, _, names = toy_images(per_label=8)
    labels = np.array([0, 1] * 8)
    config = FAST.model_copy(update={"head": HeadOptions(hidden_units=0, dropout=0.0, l2=1e-4)})
    report = training.train_classifier(images, labels, names, backbone, config).report
    assert report["train_accuracy"] == 1.0
    assert report["validation"]["accuracy"] <= 0.75
    assert any("overfits" in note for note in report["diagnosis"])


def test_two_images_per_label_train_with_two_folds(backbone):
    images, labels, names = toy_images(per_label=2)
    result = training.train_classifier(images, labels, names, backbone, TrainingConfig(
        augmentation=AugmentationOptions(views=1), max_epochs=10))
    report = result.report
    assert report["selection"]["k"] == 2
    assert np.array(report["validation"]["confusion_matrix"]).sum() == 4
    assert all(len(c["best_epochs"]) == 2 for c in report["selection"]["candidates"])
    pixels = np.stack([load_image(data, SIZE) for data in images])
    assert class_scores(backbone, result.head, pixels).shape == (4, 2)


def test_same_seed_same_run(backbone):
    images, labels, names = toy_images(per_label=6)
    first = training.train_classifier(images, labels, names, backbone, FAST)
    second = training.train_classifier(images, labels, names, backbone, FAST)
    assert [row["val_loss"] for row in first.report["history"]] == pytest.approx(
        [row["val_loss"] for row in second.report["history"]], rel=1e-5)
    for a, b in zip(first.head.get_weights(), second.head.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_should_stop_cancels_training(backbone):
    images, labels, names = toy_images(per_label=4)
    with pytest.raises(training.Cancelled):
        training.train_classifier(images, labels, names, backbone, FAST, should_stop=lambda: True)


def test_progress_is_reported_for_both_stages_with_the_rows_so_far(backbone):
    images, labels, names = toy_images(per_label=4)
    seen = []
    training.train_classifier(images, labels, names, backbone, FAST, on_progress=seen.append)
    stages = [p.stage for p in seen]
    assert stages[0] == "extracting" and stages[-1] == "training"
    assert seen[0].images_total == len(images)
    folds = [p for p in seen if p.stage == "training" and p.candidate != "refit"]
    assert folds[0].candidate == "1/1 fold 1/4" and folds[-1].candidate == "1/1 fold 4/4"
    for progress in folds:
        assert len(progress.history) == progress.epoch
        assert progress.history[-1]["val_accuracy"] == progress.val_accuracy
        assert {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(progress.history[-1])
    assert seen[-1].candidate == "refit" and seen[-1].history == ()


# ---------------------------------------------------------------- heads and prediction


def test_head_round_trips_through_its_weights(backbone):
    images, labels, names = toy_images(per_label=4)
    result = training.train_classifier(images, labels, names, backbone, FAST)
    restored = heads.load_head(result.spec, FEATURE_DIM, 2, heads.serialize_weights(result.head))
    pixels = np.stack([load_image(data, SIZE) for data in images])
    np.testing.assert_allclose(class_scores(backbone, restored, pixels),
                               class_scores(backbone, result.head, pixels), rtol=1e-6)


def test_scores_are_probabilities_and_rank_orders_them(backbone):
    images, labels, names = toy_images(per_label=4)
    result = training.train_classifier(images, labels, names, backbone, FAST)
    pixels = np.stack([load_image(data, SIZE) for data in images[:3]])
    scores = class_scores(backbone, result.head, pixels)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    ranked = rank(scores, names, top_k=2)
    assert all(pairs[0][1] >= pairs[1][1] for pairs in ranked)


def test_head_parameter_count():
    spec = heads.HeadSpec(hidden_units=8)
    model = heads.build_head(spec, 16, 3)
    assert heads.trainable_parameters(model) == 16 * 8 + 8 + 8 * 3 + 3 == spec.parameters(16, 3)
    linear = heads.HeadSpec(hidden_units=0)
    assert heads.trainable_parameters(heads.build_head(linear, 16, 3)) == linear.parameters(16, 3)


def test_a_mixed_precision_backbone_gives_float32_features_close_to_float32(backbone):
    import keras

    from models.backbone import load_backbone

    mixed = load_backbone("random", 32, seed=0, precision="mixed_bfloat16")
    assert mixed.precision == "mixed_bfloat16" and backbone.precision == "float32"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    assert mixed.identity.fingerprint == backbone.identity.fingerprint  # same float32 weights
    pixels = load_image(image_bytes(COLOURS["red"]), 32)[None]
    features, reference = mixed.features(pixels), backbone.features(pixels)
    assert features.dtype == np.float32
    assert np.abs(features - reference).max() <= 0.05 * np.abs(reference).max()
