"""Data augmentation: Gaussian noise, horizontal flips, rotations and shifts.

Each augmented view is one random affine transform (flip, rotation about the centre, shift) applied
with a single bilinear resampling, plus pixel noise. Parameters are drawn from a seeded
`numpy.random.Generator`, so a run is reproducible on one machine.

Training draws each view from a generator of its own, `view_rng(seed, image hash, view index)`:
a view is then the same whatever the dataset's order or size, so a stored feature of it stays
valid when images are added (`models.features`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from models.options import AugmentationOptions

#: How training images are perturbed (declared once, in models/options.py).
Augmentation = AugmentationOptions


def random_transforms(batch_size: int, image_size: int, augmentation: AugmentationOptions,
                      rng: np.random.Generator) -> np.ndarray:
    """Draws one output→input affine transform per image.

    Args:
        batch_size: transforms to draw; image_size: the square images' side in pixels.
        augmentation: the largest flip, rotation and shift.
        rng: source of randomness.

    Returns:
        float32 array (batch_size, 8) in the layout of `ImageProjectiveTransformV3`.
    """
    transforms = np.zeros((batch_size, 8), dtype=np.float32)
    for i in range(batch_size):
        transforms[i] = _random_transform(image_size, augmentation, rng)
    return transforms


def _random_transform(image_size: int, augmentation: AugmentationOptions,
                      rng: np.random.Generator) -> np.ndarray:
    centre = (image_size - 1) / 2.0
    flip = augmentation.flip and rng.random() < 0.5
    angle = math.radians(rng.uniform(-augmentation.rotation, augmentation.rotation))
    dx, dy = rng.uniform(-augmentation.shift, augmentation.shift, size=2) * image_size
    # Forward map input→output: move centre to origin, flip, rotate, move back and shift.
    forward = (_translation(centre + dx, centre + dy) @ _rotation(angle)
               @ np.diag([-1.0 if flip else 1.0, 1.0, 1.0]) @ _translation(-centre, -centre))
    inverse = np.linalg.inv(forward)
    return (inverse.reshape(-1)[:8] / inverse[2, 2]).astype(np.float32)


def view_rng(seed: int, image_hash: bytes, view: int) -> np.random.Generator:
    """The generator of one augmented view: a function of the run's seed, the image's content
    hash (`image_hash`, e.g. its SHA-256) and the view's index, and of nothing else."""
    return np.random.default_rng([int(seed), int.from_bytes(image_hash, "little"), int(view)])


def augment(images: np.ndarray, augmentation: AugmentationOptions,
            rng: np.random.Generator) -> np.ndarray:
    """Returns one random augmented view of each image.

    Args:
        images: uint8 or float32 array (batch, size, size, 3), RGB in 0-255.
        augmentation: the perturbations to apply.
        rng: source of randomness; the same state gives the same views.

    Returns:
        float32 array of the same shape, values in 0-255.
    """
    transforms = random_transforms(images.shape[0], images.shape[1], augmentation, rng)
    noise = rng.normal(0.0, augmentation.noise, size=images.shape).astype(np.float32)
    return _warp(images, transforms, noise)


def augment_each(images: np.ndarray, augmentation: AugmentationOptions,
                 rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One augmented view of each image, image i's drawn from `rngs[i]` alone (`view_rng`), so
    it does not depend on the other images of the batch. The same distribution as `augment`.

    Args:
        images: uint8 or float32 array (batch, size, size, 3), RGB in 0-255.
        rngs: one generator per image.

    Returns:
        float32 array of the same shape, values in 0-255.
    """
    if len(rngs) != len(images):
        raise ValueError(f"augment_each needs one generator per image. Received: "
                         f"{len(rngs)} generators for {len(images)} images")
    size = images.shape[1]
    transforms, noise = np.zeros((len(images), 8), np.float32), []
    for i, rng in enumerate(rngs):
        transforms[i] = _random_transform(size, augmentation, rng)
        noise.append(rng.normal(0.0, augmentation.noise, size=images.shape[1:]))
    return _warp(images, transforms, np.asarray(noise, np.float32).reshape(images.shape))


def _warp(images: np.ndarray, transforms: np.ndarray, noise: np.ndarray) -> np.ndarray:
    size = images.shape[1]
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.convert_to_tensor(images, tf.float32), transforms=transforms,
        output_shape=[size, size], fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
    return np.clip(warped.numpy() + noise, 0.0, 255.0)


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _rotation(angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
