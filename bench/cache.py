"""Cached features for the in-process quality runs (`bench.quality --cache-dir`,
`bench.selection_study`).

The training images go through `models.features.extract_features` exactly as a training job
calls it (same seed, views and augmentation), the test images on their un-augmented view as
serving computes them, with a `models.features.FeatureCache` kept in one file per directory:
the product's own row keys (image bytes, view, seed, augmentation, backbone fingerprint, image
size, precision) decide what is reused, so a changed setting computes new rows and never reads
stale ones. Everything after the backbone is then the product's own code
(`models.training.train_on_features`), rerun in seconds.

This module imports TensorFlow.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.train_speed import Data


class FileFeatureCache:
    """A `models.features.FeatureCache` in one .npz file (rows by hex key), rewritten
    atomically after each `put`."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, np.ndarray] = {}
        self.computed = 0  # rows put by this process
        if path.is_file():
            with np.load(path) as archive:
                self.rows = {key: archive[key] for key in archive.files}

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        return {key: self.rows[key.hex()] for key in keys if key.hex() in self.rows}

    def put(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        for key, row in zip(keys, rows):
            self.rows[key.hex()] = np.asarray(row, np.float32)
        self.computed += len(keys)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp.npz")
        np.savez(temporary, **self.rows)
        os.replace(temporary, self.path)


@dataclass
class CachedFeatures:
    """Features of one split under one training configuration.

    Attributes:
        train: float32 (n, 1 + views, feature_dim), view 0 un-augmented.
        test: float32 (n_test, feature_dim), un-augmented.
        backbone: the backbone's identity (as the report shows it).
        timings: seconds of this call's decoding and backbone passes.
        computed: (image, view) rows this call ran the backbone for (0: all from the cache).
    """

    train: np.ndarray
    test: np.ndarray
    backbone: dict
    timings: dict
    computed: int


def load_or_extract(name: str, data: Data, backbone, config, directory: Path) -> CachedFeatures:
    """The split's features, from the cache in `directory` where it holds them."""
    from models.features import extract_features

    identity = backbone.identity.as_dict()
    cache = FileFeatureCache(directory / f"features-{identity['fingerprint'][:16]}-"
                                         f"{backbone.image_size}px-{identity['precision']}.npz")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    common = {"augmentation": config.augmentation, "seed": config.seed,
              "batch_size": config.extract_batch_size, "timings": timings,
              "max_pixels": config.max_image_pixels, "cache": cache}
    train = extract_features(data.train_bytes, backbone, views=config.augmentation.views,
                             **common)
    test = extract_features(data.test_bytes, backbone, views=0, **common)[:, 0]
    print(f"[{name}] features: {cache.computed} (image, view) rows computed in "
          f"{time.perf_counter() - started:.1f} s, the others from {cache.path}", file=sys.stderr)
    return CachedFeatures(train, test, identity, timings, cache.computed)
