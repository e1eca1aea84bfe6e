"""The bench's feature cache (`bench.cache`): what `bench.quality --cache-dir` trains on must be
the features a training job computes, and a changed setting must not read stale ones."""

import numpy as np

from bench import cache
from bench.train_speed import Data
from models.features import extract_features
from models.options import AugmentationOptions, TrainingConfig
from models.preprocessing import load_image
from tests.helpers import COLOURS, image_bytes


def toy_data() -> Data:
    images = [image_bytes(COLOURS[label], seed=i) for i, label in
              enumerate(("red", "blue", "red", "blue", "red", "blue"))]
    labels = np.array([0, 1] * 3)
    return Data(["red", "blue"], images[:4], labels[:4], images[4:], labels[4:], [])


def test_cached_features_are_a_training_jobs_features_and_are_read_back(backbone, tmp_path):
    data, config = toy_data(), TrainingConfig(augmentation=AugmentationOptions(views=2))
    first = cache.load_or_extract("toy", data, backbone, config, tmp_path)
    assert first.computed == 4 * 3 + 2 and first.train.shape == (4, 3, backbone.feature_dim)
    job = extract_features(data.train_bytes, backbone, views=2, augmentation=config.augmentation,
                           seed=config.seed, batch_size=config.extract_batch_size)
    np.testing.assert_array_equal(first.train, job)
    served = backbone.features(np.stack([load_image(b, backbone.image_size)
                                         for b in data.test_bytes]))
    np.testing.assert_allclose(first.test, served, atol=1e-6)
    passes = backbone.passes
    again = cache.load_or_extract("toy", data, backbone, config, tmp_path)
    assert again.computed == 0 and backbone.passes == passes
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.test, first.test)
    assert again.backbone["fingerprint"] == backbone.identity.fingerprint


def test_a_changed_setting_computes_its_views_again(backbone, tmp_path):
    data = toy_data()
    config = TrainingConfig(augmentation=AugmentationOptions(views=1))
    cache.load_or_extract("toy", data, backbone, config, tmp_path)
    reseeded = cache.load_or_extract("toy", data, backbone, TrainingConfig(
        seed=1, augmentation=AugmentationOptions(views=1)), tmp_path)
    assert reseeded.computed == 4  # view 1 of each training image; view 0 does not depend on it
    stronger = cache.load_or_extract("toy", data, backbone, TrainingConfig(
        augmentation=AugmentationOptions(views=1, noise=20.0)), tmp_path)
    assert stronger.computed == 4
    assert not np.array_equal(stronger.train[:, 1], reseeded.train[:, 1])
