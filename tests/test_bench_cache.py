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
    assert not first.cached and first.train.shape == (4, 3, backbone.feature_dim)
    job = extract_features(data.train_bytes, backbone, views=2, augmentation=config.augmentation,
                           rng=np.random.default_rng(config.seed),
                           batch_size=config.extract_batch_size)
    np.testing.assert_array_equal(first.train, job)
    assert first.test.shape == (2, backbone.feature_dim)
    served = backbone.features(np.stack([load_image(b, backbone.image_size)
                                         for b in data.test_bytes]))
    np.testing.assert_allclose(first.test, served, atol=1e-6)
    again = cache.load_or_extract("toy", data, backbone, config, tmp_path)
    assert again.cached
    np.testing.assert_array_equal(again.train, first.train)
    assert again.backbone["fingerprint"] == backbone.identity.fingerprint


def test_the_cache_key_follows_every_setting_the_features_depend_on(backbone):
    data, config = toy_data(), TrainingConfig()
    identity = backbone.identity.as_dict()
    key = cache.cache_key("toy", data, 32, config, identity)
    assert key == cache.cache_key("toy", data, 32, config, identity)
    changed = [
        cache.cache_key("toy", data, 64, config, identity),
        cache.cache_key("toy", data, 32, TrainingConfig(seed=1), identity),
        cache.cache_key("toy", data, 32, TrainingConfig(
            augmentation=AugmentationOptions(views=2)), identity),
        cache.cache_key("toy", data, 32, TrainingConfig(extract_batch_size=8), identity),
        cache.cache_key("toy", data, 32, config, {**identity, "precision": "float32x"}),
        cache.cache_key("toy", data, 32, config, {**identity, "fingerprint": "0" * 64}),
        cache.cache_key("toy", Data(data.label_names, data.train_bytes[::-1], data.train_labels,
                                    data.test_bytes, data.test_labels, []), 32, config, identity),
    ]
    assert len({key, *changed}) == len(changed) + 1
