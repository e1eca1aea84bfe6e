"""Cached features: the backbone run once per (image, augmented view), decoding the next batch
while the current one runs. Heads train on these arrays, never on pixels."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.augmentation import augment
from models.backbone import Backbone
from models.options import AugmentationOptions
from models.preprocessing import load_image
from models.progress import Cancelled, StopCheck


def extract_features(images: Sequence[bytes], backbone: Backbone, *, views: int,
                     augmentation: AugmentationOptions, rng: np.random.Generator, batch_size: int,
                     on_batch: Callable[[int], None] = lambda done: None,
                     should_stop: StopCheck = lambda: False,
                     timings: dict | None = None,
                     max_pixels: int = 40_000_000,
                     original: np.ndarray | None = None) -> np.ndarray:
    """Runs the backbone once per (image, view).

    Args:
        images: encoded image files.
        backbone: the shared frozen feature extractor.
        views: augmented views per image besides the original (0: originals only).
        augmentation: how views are perturbed.
        rng: source of the views' randomness; the same state gives the same features.
        batch_size: images per backbone pass.
        on_batch: called with the number of images done after each batch.
        should_stop: polled between passes; True raises `Cancelled`.
        timings: if given, "decode" and "features" seconds are added to it.
        max_pixels: largest decoded image (width × height): decompression bombs.
        original: float32 (len(images), feature_dim) view-0 features of an earlier pass (staged
            training's preview): copied into view 0, not computed again. The views drawn from
            `rng` are the same either way.

    Returns:
        float32 array (len(images), 1 + views, feature_dim); view 0 is the unaugmented image.
    """
    size = backbone.image_size
    timings = timings if timings is not None else {}
    timings.setdefault("decode", 0.0)
    timings.setdefault("features", 0.0)

    def decode(batch: Sequence[bytes]) -> np.ndarray:
        start = time.perf_counter()
        array = np.stack([load_image(data, size, max_pixels=max_pixels) for data in batch])
        timings["decode"] += time.perf_counter() - start
        return array

    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    features = np.zeros((len(images), 1 + views, backbone.feature_dim), np.float32)
    if original is not None:
        features[:, 0] = original
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode, batches[0]) if batches else None
        done = 0
        for index in range(len(batches)):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(decode, batches[index + 1])
            start = time.perf_counter()
            rows = slice(done, done + len(pixels))
            if original is None:
                features[rows, 0] = backbone.features(pixels)
            for view in range(1, 1 + views):
                if should_stop():
                    raise Cancelled()
                features[rows, view] = backbone.features(augment(pixels, augmentation, rng))
            timings["features"] += time.perf_counter() - start
            done += len(pixels)
            on_batch(done)
            if should_stop():
                raise Cancelled()
    return features
