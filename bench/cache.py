"""Cached training features for the in-process quality runs (`bench.quality --cache-dir`).

The backbone runs once per (dataset, image size, augmentation, seed, weights, precision): the
training images through `models.features.extract_features` exactly as a training job runs it
(same rng, views and batch size, so the same features the service would compute), the test
images on their un-augmented view as serving computes them. Everything after the backbone is
then the product's own code (`models.training.train_on_features`), rerun in seconds.

This module imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.train_speed import Data

#: Test images per backbone pass.
TEST_BATCH = 32


@dataclass
class CachedFeatures:
    """Features of one split under one training configuration.

    Attributes:
        train: float32 (n, 1 + views, feature_dim), view 0 un-augmented.
        test: float32 (n_test, feature_dim), un-augmented.
        backbone: the backbone's identity (as the report shows it).
        timings: seconds the backbone took ("decode", "features") when they were computed.
        cached: whether they were read from the cache.
    """

    train: np.ndarray
    test: np.ndarray
    backbone: dict
    timings: dict
    cached: bool


def cache_key(name: str, data: Data, image_size: int, config, identity: dict) -> str:
    """What the features depend on, hashed: the images' bytes, their order and labels, the
    image size, the augmentation, views, seed and extraction batch (the rng's draws follow the
    batches), the weights fingerprint and the precision."""
    digest = hashlib.sha256()
    for content in (*data.train_bytes, *data.test_bytes):
        digest.update(hashlib.sha256(content).digest())
    described = {"dataset": name, "image_size": image_size,
                 "labels": [int(label) for label in data.train_labels],
                 "augmentation": config.augmentation.model_dump(), "seed": config.seed,
                 "extract_batch_size": config.extract_batch_size,
                 "fingerprint": identity["fingerprint"], "precision": identity["precision"]}
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()[:24]


def load_or_extract(name: str, data: Data, backbone, config, directory: Path) -> CachedFeatures:
    """The split's features from `directory`, or computed (and stored there) once."""
    from models.features import extract_features
    from models.preprocessing import load_image

    identity = backbone.identity.as_dict()
    key = cache_key(name, data, backbone.image_size, config, identity)
    views = config.augmentation.views
    path = directory / f"{name}-{backbone.image_size}px-views{views}-{identity['precision']}-{key}.npz"
    if path.is_file():
        with np.load(path) as archive:
            timings = json.loads(str(archive["timings"]))
            print(f"[{name}] features from the cache {path}", file=sys.stderr)
            return CachedFeatures(archive["train"], archive["test"], identity, timings, True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    train = extract_features(data.train_bytes, backbone, views=views,
                             augmentation=config.augmentation,
                             rng=np.random.default_rng(config.seed),
                             batch_size=config.extract_batch_size, timings=timings,
                             max_pixels=config.max_image_pixels)
    test = np.concatenate([
        backbone.features(np.stack([load_image(content, backbone.image_size)
                                    for content in data.test_bytes[i:i + TEST_BATCH]]))
        for i in range(0, len(data.test_bytes), TEST_BATCH)])
    print(f"[{name}] features computed in {time.perf_counter() - started:.1f} s, "
          f"stored in {path}", file=sys.stderr)
    directory.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(temporary, train=train, test=test, timings=json.dumps(timings))
    os.replace(temporary, path)
    return CachedFeatures(train, test, identity, timings, False)
