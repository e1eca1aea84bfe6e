"""The shared frozen feature extractor: VGG16's convolutional base, pooled at two depths.

A feature vector (2048-d) concatenates global average pooling of `block4_pool`, average and max
pooling of `block5_conv3`, and average pooling of `block5_pool`. The mid-level block-4 statistics
and the max-pooled part-detectors add what the usual 512-d average of the last block misses, for
the same single backbone pass (bench/RESULTS.md has the measured accuracies).

Every classifier is a head on top of these features. The base is frozen and called through one
compiled `tf.function` with a fixed input signature, so it traces once per process.

The base computes in the precision `models.precision` chooses (float32, or bfloat16 with float32
weights); its pooled outputs are cast to float32 before pooling, so features are float32 either
way. A head is exact only on features of the precision it was trained in: the precision is part
of the identity, and `in_precision` builds the same weights in another one.

NB: a later fine-tuning option makes a classifier "block5 + head": `features(…, upto="block4_pool")`
is where blocks 1-4 (shared) end and a per-classifier block 5 would start.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tensorflow as tf
import keras

from models import weights as vgg16_weights
from models.precision import POLICIES, Choice, policy_scope

log = logging.getLogger(__name__)

NAME = "vgg16"
#: What a feature vector is made of, in order; part of the backbone's identity.
FEATURES = "gap(block4_pool)|gap(block5_conv3)|gmp(block5_conv3)|gap(block5_pool)"
FEATURE_DIM = 2048
RANDOM = "random"
#: What a pass is for, counted per backbone (`Backbone.images`): "predict" where a thread says
#: so (`counted_as`), "training" for every other pass (features, fine-tuning activations).
PURPOSES = ("training", "predict")
_purpose = threading.local()


@contextmanager
def counted_as(purpose: str) -> Iterator[None]:
    """Counts the passes this thread makes meanwhile, on any backbone, under `purpose`."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}. Received: {purpose!r}")
    before = getattr(_purpose, "name", PURPOSES[0])
    _purpose.name = purpose
    try:
        yield
    finally:
        _purpose.name = before


@dataclass(frozen=True)
class BackboneIdentity:
    """What a classifier was trained on; stored with it and shown to users."""

    name: str
    weights: str          # "imagenet" or "random"
    image_size: int
    source: str           # where the weights came from, e.g. "keras cache", a file path
    fingerprint: str
    precision: str = "float32"          # the Keras dtype policy features are computed in
    precision_reason: str | None = None  # why, e.g. "auto: avx512_bf16"

    def as_dict(self) -> dict:
        return {"name": self.name, "weights": self.weights, "image_size": self.image_size,
                "features": FEATURES, "source": self.source, "fingerprint": self.fingerprint,
                "precision": self.precision, "precision_reason": self.precision_reason}


class Backbone:
    """Frozen VGG16 base mapping images to pooled features.

    Thread-safe: concurrent calls share the one compiled function.
    """

    def __init__(self, model: keras.Model, identity: BackboneIdentity):
        self.model = model
        self.identity = identity
        self.image_size = identity.image_size
        self.precision = model.dtype_policy.name
        self.feature_dim = FEATURE_DIM
        self._taps = keras.Model(
            model.input, [model.get_layer(name).output
                          for name in ("block4_pool", "block5_conv3", "block5_pool")])
        self._lower: dict[tuple[str, str], object] = {}
        self.images: Counter[str] = Counter()  # images sent through the base, by purpose
        self._passes_lock = threading.Lock()
        size = identity.image_size
        self._compiled = tf.function(
            self._forward,
            input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)],
        )

    @property
    def passes(self) -> int:
        """Images sent through the base, for every purpose."""
        return sum(self.images.values())

    def _count(self, images: int) -> None:
        with self._passes_lock:
            self.images[getattr(_purpose, "name", PURPOSES[0])] += images

    def _forward(self, images: tf.Tensor) -> tf.Tensor:
        return pool_features(*self._taps(keras.applications.vgg16.preprocess_input(images),
                                         training=False))

    def activation_shape(self, layer: str) -> tuple[int, int, int]:
        """(h, w, c) of a layer's output: where fine-tuned blocks take over."""
        return tuple(self.model.get_layer(layer).output.shape[1:])

    def activations(self, images: np.ndarray, layer: str, dtype=tf.float16) -> np.ndarray:
        """(batch, h, w, c) output of `layer` ("block3_pool" or "block4_pool"): the frozen
        blocks' part of a pass; float16 is what fine-tuning caches once per (image, view)."""
        key = (layer, dtype.name)
        if key not in self._lower:
            lower = keras.Model(self.model.input, self.model.get_layer(layer).output)
            size = self.image_size
            self._lower[key] = tf.function(
                lambda x: tf.cast(lower(keras.applications.vgg16.preprocess_input(x),
                                        training=False), dtype),
                input_signature=[tf.TensorSpec((None, size, size, 3), tf.float32)])
        self._count(len(images))
        return self._lower[key](tf.convert_to_tensor(images, tf.float32)).numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        """Runs the base once over a batch.

        Args:
            images: uint8 or float32 array (batch, size, size, 3), RGB in 0-255.

        Returns:
            float32 array (batch, FEATURE_DIM).
        """
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"Expected images of shape (batch, {self.image_size}, {self.image_size}, 3). "
                f"Received: shape={images.shape}")
        self._count(len(images))
        return self._compiled(tf.convert_to_tensor(images, tf.float32)).numpy()

    def warm_up(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Runs the compiled function once so the first request does not pay for tracing."""
        for batch in batch_sizes:
            self._compiled(tf.zeros((batch, self.image_size, self.image_size, 3), tf.float32))

    def in_precision(self, choice: Choice | str) -> Backbone:
        """The same weights computing in another precision (a new model; this one is unchanged).

        Copies the float32 variables, so no file is read again; the fingerprint is checked.
        """
        choice = choice if isinstance(choice, Choice) else Choice(choice, "set explicitly")
        model = build_vgg16(self.image_size, choice.policy)
        model.set_weights(self.model.get_weights())
        fingerprint = vgg16_weights.model_fingerprint(model)
        if fingerprint != self.identity.fingerprint:  # cannot happen: the same float32 values
            raise vgg16_weights.WeightsMismatch(
                f"the {choice.policy} copy of the backbone has fingerprint {fingerprint}, "
                f"not {self.identity.fingerprint}")
        return Backbone(model, replace(self.identity, precision=choice.policy,
                                       precision_reason=choice.reason))


def pool_features(block4_pool: tf.Tensor, block5_conv3: tf.Tensor,
                  block5_pool: tf.Tensor) -> tf.Tensor:
    """The FEATURES vector, float32 (batch, 2048), from the three tapped activations."""
    block4, block5, pooled = (tf.cast(t, tf.float32) for t in (block4_pool, block5_conv3,
                                                                block5_pool))
    return tf.concat([tf.reduce_mean(block4, axis=[1, 2]), tf.reduce_mean(block5, axis=[1, 2]),
                      tf.reduce_max(block5, axis=[1, 2]), tf.reduce_mean(pooled, axis=[1, 2])],
                     axis=-1)


def _grow_gpu_memory() -> None:
    """Lets the GPU allocator grow on demand instead of taking the whole card at start."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # the GPU is already initialised; its setting stands
            pass


def device_name() -> str:
    """Where TensorFlow runs the backbone and heads: the first GPU's name, or "CPU"."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"GPU: {details.get('device_name', gpus[0].name)}"


PRECISIONS = POLICIES


def build_vgg16(image_size: int, precision: str = "float32") -> keras.Model:
    """VGG16 convolutional base (include_top=False), frozen, randomly initialised.

    Args:
        precision: a Keras dtype policy from PRECISIONS. Mixed policies compute in 16 bits and
            keep float32 weights, so the fingerprint is unchanged.
    """
    if image_size < 32:
        raise ValueError(f"VGG16 needs images of at least 32 px. Received: image_size={image_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}. Received: {precision!r}")
    # NB: keras.applications takes no dtype; the global policy is set for the build only.
    with policy_scope(precision):
        model = keras.applications.VGG16(
            include_top=False, weights=None, input_shape=(image_size, image_size, 3))
    model.trainable = False
    return model


def _initialise(model: keras.Model, seed: int) -> None:
    """Glorot-uniform kernels and zero biases from a private generator: the same weights in
    every process, whatever else has drawn from the global random state (other threads do)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if not layer.weights:
            continue
        kernel, bias = layer.get_weights()
        fan_in, fan_out = np.prod(kernel.shape[:-1]), np.prod(kernel.shape[:-2]) * kernel.shape[-1]
        limit = np.sqrt(6 / (fan_in + fan_out))
        layer.set_weights([rng.uniform(-limit, limit, kernel.shape).astype(kernel.dtype),
                           np.zeros_like(bias)])


def load_backbone(weights: str | Path, image_size: int, *, source: str | None = None,
                  seed: int = 0, precision: Choice | str = "float32") -> Backbone:
    """Builds the backbone.

    Args:
        weights: "random", or a path to a `.h5` / `.weights.h5` file, checked against the
            ImageNet fingerprint; nothing is ever substituted. (`service.weights` turns the
            setting "imagenet" into such a file.)
        image_size: input side in pixels.
        source: where the file came from, for the backbone's identity (default: its path).
        seed: initialisation seed for "random".
        precision: the dtype policy of the backbone's computation (see `build_vgg16`), or a
            `models.precision.Choice` that also says why (part of the identity); features are
            float32 whatever it is.
    """
    _grow_gpu_memory()
    choice = precision if isinstance(precision, Choice) else Choice(precision, "set explicitly")
    model = build_vgg16(image_size, choice.policy)
    chosen = {"precision": choice.policy, "precision_reason": choice.reason}
    if weights == RANDOM:
        _initialise(model, seed)
        log.warning("backbone weights are RANDOM: for development and tests only, "
                    "predictions are meaningless")
        # NB: fingerprinted too, so API replicas and workers can check they hold the same one.
        identity = BackboneIdentity(NAME, RANDOM, image_size, f"random initialisation, seed {seed}",
                                    vgg16_weights.model_fingerprint(model), **chosen)
        return Backbone(model, identity)
    if weights == "imagenet":
        raise ValueError('weights must be "random" or a file; resolve "imagenet" first with '
                         "service.weights.local_weights")
    path, source = Path(weights), source or str(weights)
    model.load_weights(str(path))
    fingerprint = vgg16_weights.model_fingerprint(model)
    if fingerprint != vgg16_weights.IMAGENET_FINGERPRINT:
        raise vgg16_weights.WeightsMismatch(
            f"weights from {source} do not match the VGG16 ImageNet fingerprint "
            f"(got {fingerprint})")
    log.info("backbone vgg16 imagenet weights loaded from %s (fingerprint %s…), computing in %s "
             "(%s)", source, fingerprint[:12], choice.policy, choice.reason)
    return Backbone(model, BackboneIdentity(NAME, "imagenet", image_size, source, fingerprint,
                                            **chosen))
