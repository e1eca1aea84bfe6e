"""Cached features: the backbone run once per (image, augmented view), decoding the next batch
while the current one runs. Heads train on these arrays, never on pixels.

A view is a function of (seed, image content hash, view index) (`augmentation.view_rng`), so a
feature row can be kept beyond the run that computed it: `extract_features` takes a
`FeatureCache` and runs the backbone only for the (image, view) pairs it does not hold. A row's
key (`view_keys`) names everything the row depends on: the image's bytes, the view (its index,
the seed and the augmentation parameters; none of these for the unaugmented view 0), and the
backbone (fingerprint, image size, precision, feature layout).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from models.augmentation import augment_each, view_rng
from models.backbone import FEATURES, Backbone
from models.options import AugmentationOptions
from models.preprocessing import load_image
from models.progress import Cancelled, StopCheck

#: How views are drawn from their generators; part of every augmented view's key, so a change
#: of `models.augmentation` that changes views must change this too.
VIEWS = "view_rng(seed, sha256(image), view): affine then noise, v1"
#: Length in bytes of a row's key.
KEY_BYTES = 32


class FeatureCache(Protocol):
    """Feature rows kept beyond a run, by key (`view_keys`): bytes of length KEY_BYTES."""

    def get(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """The stored rows (float32 (feature_dim,)) of those keys it holds; others are absent."""

    def put(self, keys: Sequence[bytes], rows: np.ndarray) -> None:
        """Keeps float32 `rows` (len(keys), feature_dim), computed by this run, under `keys`."""


def image_hash(data: bytes) -> bytes:
    """An image's content hash: SHA-256 of its encoded bytes."""
    return hashlib.sha256(data).digest()


def view_keys(hashes: Sequence[bytes], backbone: Backbone, *, views: int,
              augmentation: AugmentationOptions, seed: int) -> list[list[bytes]]:
    """The cache key of every (image, view).

    Args:
        hashes: `image_hash` of each image.
        backbone: whose identity (fingerprint, image size, precision) the features are of.
        views, augmentation, seed: as for `extract_features`.

    Returns:
        len(hashes) lists of 1 + views keys (KEY_BYTES each); view 0's key is the same for
        every seed and augmentation.
    """
    identity = backbone.identity
    space = {"fingerprint": identity.fingerprint, "image_size": identity.image_size,
             "precision": backbone.precision, "features": FEATURES}
    perturbation = {"views": VIEWS, "seed": int(seed),
                    **augmentation.model_dump(mode="json", exclude={"views"})}
    prefixes = [_digest({**space, "view": 0})]
    prefixes += [_digest({**space, **perturbation, "view": view}) for view in range(1, 1 + views)]
    return [[hashlib.sha256(prefix + content).digest() for prefix in prefixes]
            for content in hashes]


def _digest(description: dict) -> bytes:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest()


def extract_features(images: Sequence[bytes], backbone: Backbone, *, views: int,
                     augmentation: AugmentationOptions, seed: int | None = None,
                     rng: np.random.Generator | None = None, batch_size: int,
                     on_batch: Callable[[int], None] = lambda done: None,
                     should_stop: StopCheck = lambda: False,
                     timings: dict | None = None,
                     max_pixels: int = 40_000_000,
                     cache: FeatureCache | None = None,
                     original: np.ndarray | None = None) -> np.ndarray:
    """Runs the backbone once per (image, view) that `cache` does not hold.

    Args:
        images: encoded image files.
        backbone: the shared frozen feature extractor.
        views: augmented views per image besides the original (0: originals only).
        augmentation: how views are perturbed.
        seed: with each image's content hash and the view's index, all a view depends on
            (`augmentation.view_rng`); the same seed gives the same features, in any order.
        rng: instead of `seed` (older callers): the seed is one draw from it.
        batch_size: images per backbone pass.
        on_batch: called with the number of images done after each batch (images whose every
            view came from the cache count as done from the start).
        should_stop: polled between passes; True raises `Cancelled`.
        timings: if given, "decode" and "features" seconds are added to it.
        max_pixels: largest decoded image (width × height): decompression bombs.
        cache: rows of earlier runs; what this run computes is `put` into it at the end.
        original: float32 (len(images), feature_dim) view-0 features of an earlier pass (staged
            training's preview): copied into view 0, not computed again (nor `put`).

    Returns:
        float32 array (len(images), 1 + views, feature_dim); view 0 is the unaugmented image.
        A row from the cache is bit-identical to the row its first run computed.
    """
    if seed is None:
        seed = int(rng.integers(2**31)) if rng is not None else 0
    size = backbone.image_size
    timings = timings if timings is not None else {}
    timings.setdefault("decode", 0.0)
    timings.setdefault("features", 0.0)
    hashes = [image_hash(data) for data in images]
    keys = view_keys(hashes, backbone, views=views, augmentation=augmentation, seed=seed)
    features = np.zeros((len(images), 1 + views, backbone.feature_dim), np.float32)
    missing = np.ones(features.shape[:2], bool)
    if original is not None:
        features[:, 0], missing[:, 0] = original, False
    if cache is not None and len(images):
        asked = [(i, view) for i, view in np.argwhere(missing)]  # NB: not the `original` rows
        found = cache.get([keys[i][view] for i, view in asked])
        for i, view in asked:
            if keys[i][view] in found:
                features[i, view], missing[i, view] = found[keys[i][view]], False
    todo = np.flatnonzero(missing.any(axis=1))

    def decode(batch: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        array = np.stack([load_image(images[i], size, max_pixels=max_pixels) for i in batch])
        timings["decode"] += time.perf_counter() - start
        return array

    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    done = len(images) - len(todo)
    if done:
        on_batch(done)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode, batches[0]) if batches else None
        for index, batch in enumerate(batches):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(decode, batches[index + 1])
            start = time.perf_counter()
            for view in range(1 + views):
                if view and should_stop():
                    raise Cancelled()
                wanted = np.flatnonzero(missing[batch, view])
                if not len(wanted):
                    continue
                chosen = pixels[wanted]
                if view:
                    chosen = augment_each(chosen, augmentation,
                                          [view_rng(seed, hashes[i], view) for i in batch[wanted]])
                features[batch[wanted], view] = backbone.features(chosen)
            timings["features"] += time.perf_counter() - start
            done += len(batch)
            on_batch(done)
            if should_stop():
                raise Cancelled()
    if cache is not None and missing.any():
        cache.put([keys[i][view] for i, view in np.argwhere(missing)], features[missing])
    return features
