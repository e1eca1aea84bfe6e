"""Layer-wise fine-tuning of the deepest VGG16 blocks toward the pretrained weights (L2-SP).

The course's second half: the input blocks stay frozen and shared; only the deepest one or two
blocks train, with a small step size, early stopping, and the penalty α/2·‖w − w⁰‖² on their
conv weights (w⁰: the ImageNet weights) — the "distance to the pretrained hypothesis". The step
size and α bound how far the trained blocks move, which is what keeps the effective hypothesis
space small although d (all the trained parameters) is large.

The frozen blocks run exactly once per (image, view): their output (`block4_pool` for one
trained block, `block3_pool` for two) is cached in float16, in memory up to a budget and in a
temporary memory-mapped file past it. An epoch then costs only the trained blocks' forward and
backward passes.

A fine-tuned classifier is its trained blocks plus its head. `UpperBlocks` rebuilds the trained
blocks from stored float16 weights (no deserialised code) and maps cached activations to the
same 2048-d feature vector the frozen backbone produces, so the head is unchanged in kind.
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from models.augmentation import Augmentation, augment
from models.backbone import Backbone, pool_features

#: Trained blocks → (the frozen layer whose output is cached, the conv layers that train).
BLOCKS = {
    1: ("block4_pool", ("block5_conv1", "block5_conv2", "block5_conv3")),
    2: ("block3_pool", ("block4_conv1", "block4_conv2", "block4_conv3",
                        "block5_conv1", "block5_conv2", "block5_conv3")),
}


class Cancelled(Exception):
    """Raised inside fine-tuning when `should_stop` says the job was cancelled."""


@dataclass(frozen=True)
class FineTuneConfig:
    """One fine-tuning run.

    Attributes:
        blocks: 1 trains block5, 2 trains block4 and block5.
        l2_sp: α of the penalty α/2·‖w − w⁰‖² over the trained conv kernels.
        learning_rate: Adam's step size; small, so the blocks stay near w⁰.
    """

    blocks: int = 1
    l2_sp: float = 0.01
    learning_rate: float = 1e-5
    max_epochs: int = 15
    patience: int = 3
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.blocks not in BLOCKS or self.l2_sp < 0 or self.learning_rate <= 0 or \
                self.max_epochs < 1 or self.patience < 0 or self.batch_size < 1:
            raise ValueError(f"Invalid fine-tuning config. Received: {self}")


# ---------------------------------------------------------------- the trained blocks


class UpperBlocks:
    """The trainable top of VGG16 as its own Keras model: cached activations → 2048-d features.

    The pooled feature vector is the backbone's (`models.backbone.FEATURES`): gap of block4_pool,
    gap and gmp of block5_conv3, gap of block5_pool.
    """

    def __init__(self, blocks: int, input_shape: tuple[int, int, int],
                 weights: dict[str, tuple[np.ndarray, np.ndarray]], precision: str = "float32"):
        """Args:
            weights: conv layer name → (kernel HWIO, bias), float16 or float32.
        """
        self.blocks = blocks
        self.layer_names = BLOCKS[blocks][1]
        self._compiled = None
        policy = keras.DTypePolicy(precision)
        inputs = keras.Input(input_shape, name="cached_activations")
        x, block4_pool = inputs, inputs if blocks == 1 else None
        for name in self.layer_names:
            kernel = weights[name][0]
            x = keras.layers.Conv2D(kernel.shape[-1], 3, padding="same", activation="relu",
                                    name=name, dtype=policy)(x)
            if name == "block4_conv3":
                x = block4_pool = keras.layers.MaxPooling2D(2, name="block4_pool", dtype=policy)(x)
        block5 = x
        pooled = keras.layers.MaxPooling2D(2, name="block5_pool", dtype=policy)(block5)
        self.model = keras.Model(inputs, [block4_pool, block5, pooled], name=f"upper{blocks}")
        for name in self.layer_names:
            kernel, bias = weights[name]
            self.model.get_layer(name).set_weights([np.asarray(kernel, np.float32),
                                                    np.asarray(bias, np.float32)])

    def predict_features(self, activations: np.ndarray) -> np.ndarray:
        """Serving: float32 (batch, 2048) features from float16 activations, compiled once."""
        if self._compiled is None:
            self._compiled = tf.function(
                lambda x: self.features(x),
                input_signature=[tf.TensorSpec((None, *self.model.input.shape[1:]), tf.float16)])
        return self._compiled(tf.constant(activations, tf.float16)).numpy()

    @property
    def nbytes(self) -> int:
        """Memory of the weights as stored (float16)."""
        return self.parameters() * 2

    @property
    def conv_layers(self) -> list:
        return [self.model.get_layer(name) for name in self.layer_names]

    def features(self, activations: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Float32 (batch, 2048) features from cached activations (batch, h, w, c)."""
        return pool_features(*self.model(activations, training=training))

    def weights(self, dtype=np.float16) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {layer.name: tuple(np.asarray(w, dtype) for w in layer.get_weights())
                for layer in self.conv_layers}

    def parameters(self) -> int:
        return int(sum(np.prod(w.shape) for layer in self.conv_layers for w in layer.weights))


def pretrained_weights(backbone: Backbone, blocks: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """w⁰: the backbone's own weights of the layers `blocks` trains (float32)."""
    return {name: tuple(backbone.model.get_layer(name).get_weights())
            for name in BLOCKS[blocks][1]}


def serialize_blocks(weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Trained blocks as a float16 .npz (about 14 MB for block5), no pickles."""
    buffer = io.BytesIO()
    np.savez(buffer, **{f"{name}/{part}": np.asarray(array, np.float16)
                        for name, pair in weights.items()
                        for part, array in zip(("kernel", "bias"), pair)})
    return buffer.getvalue()


def load_blocks(data: bytes) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(blocks, weights) from `serialize_blocks`' bytes; refuses anything else."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        names = sorted({key.split("/")[0] for key in archive.files})
        for blocks, (_, layers) in BLOCKS.items():
            if names == sorted(layers):
                return blocks, {name: (archive[f"{name}/kernel"], archive[f"{name}/bias"])
                                for name in layers}
    raise ValueError(f"not a fine-tuned block file: layers {names}")


def mixed_pass(backbone: Backbone, images: np.ndarray,
               uppers: Sequence[UpperBlocks | None]) -> np.ndarray:
    """One serving pass for a batch whose rows belong to frozen and fine-tuned classifiers.

    The frozen blocks run once for every row; rows of frozen classifiers then go through the
    shared (pretrained) upper blocks, and each fine-tuned classifier's rows through its own,
    grouped. Fine-tuned rows see float16 activations, exactly as in training; frozen rows stay
    float32, as in `Backbone.features`.

    Args:
        images: uint8 (n, size, size, 3); uppers: per row, None (frozen) or the trained blocks.

    Returns:
        float32 (n, 2048) features.
    """
    deepest = max((upper.blocks for upper in uppers if upper is not None), default=0)
    if deepest == 0:
        return backbone.features(images)
    cut = BLOCKS[deepest][0]
    lower = backbone.activations(images, cut, dtype=tf.float32)
    shared = _shared_upper(backbone, deepest, lower.shape[1:])
    block4_pool, block5, pooled = (t.numpy() for t in shared.model(lower, training=False))
    features = pool_features(block4_pool, block5, pooled).numpy()
    groups: dict[int, list[int]] = {}
    for row, upper in enumerate(uppers):
        if upper is not None:
            groups.setdefault(id(upper), []).append(row)
    for rows in groups.values():
        upper = uppers[rows[0]]
        source = lower if upper.blocks == deepest else block4_pool
        features[rows] = upper.predict_features(source[rows].astype(np.float16))
    return features


def _shared_upper(backbone: Backbone, blocks: int, shape) -> UpperBlocks:
    """The pretrained upper blocks of `backbone`, built once per backbone."""
    cache = backbone.__dict__.setdefault("_shared_uppers", {})
    if blocks not in cache:
        cache[blocks] = UpperBlocks(blocks, tuple(shape), pretrained_weights(backbone, blocks),
                                    backbone.precision)
    return cache[blocks]


# ---------------------------------------------------------------- cached activations


@dataclass
class ActivationCache:
    """float16 activations (images, 1 + views, h, w, c) below the trained blocks."""

    array: np.ndarray
    spilled: bool = False
    _file: object = field(default=None, repr=False)

    def close(self) -> None:
        if self._file is not None:
            del self.array
            self._file.close()
            self._file = None


def cache_activations(images: Sequence[np.ndarray] | np.ndarray, backbone: Backbone, blocks: int,
                      *, views: int, augmentation: Augmentation, rng: np.random.Generator,
                      batch_size: int = 32, memory_budget_bytes: int = 2 * 1024**3,
                      on_batch: Callable[[int], None] = lambda done: None,
                      should_stop: Callable[[], bool] = lambda: False) -> ActivationCache:
    """Runs the frozen blocks once per (image, view).

    Args:
        images: uint8 (n, size, size, 3) decoded images.
        views: augmented views per image besides the original (view 0).
        memory_budget_bytes: past this, the cache is a temporary memory-mapped file.

    Returns:
        The cache; view 0 of each image is unaugmented.
    """
    layer = BLOCKS[blocks][0]
    shape = backbone.activation_shape(layer)
    total = (len(images), 1 + views, *shape)
    nbytes = int(np.prod(total)) * 2
    if nbytes > memory_budget_bytes:
        handle = tempfile.TemporaryFile(prefix="headstart-activations-")
        array = np.memmap(handle, np.float16, "w+", shape=total)
        cache = ActivationCache(array, spilled=True, _file=handle)
    else:
        cache = ActivationCache(np.zeros(total, np.float16))
    for start in range(0, len(images), batch_size):
        pixels = np.asarray(images[start:start + batch_size])
        rows = slice(start, start + len(pixels))
        cache.array[rows, 0] = backbone.activations(pixels, layer)
        for view in range(1, 1 + views):
            if should_stop():
                raise Cancelled()
            cache.array[rows, view] = backbone.activations(augment(pixels, augmentation, rng),
                                                           layer)
        on_batch(start + len(pixels))
    return cache


# ---------------------------------------------------------------- training


@dataclass
class FineTuneResult:
    upper: UpperBlocks
    head: keras.Model
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool
    relative_shift: dict[str, float]
    seconds: float


def fine_tune(train: np.ndarray, y_train: np.ndarray, val: np.ndarray, y_val: np.ndarray,
              head: keras.Model, backbone: Backbone, config: FineTuneConfig, *,
              on_epoch: Callable[[int, dict], None] = lambda epoch, row: None,
              should_stop: Callable[[], bool] = lambda: False) -> FineTuneResult:
    """Trains the deepest blocks and a warm-started head together, with L2-SP.

    Args:
        train: float16 (n, h, w, c) cached activations of training views; y_train int (n,).
        val: float16 (m, h, w, c) activations of unaugmented validation images; y_val (m,).
        head: the best frozen head (its weights are the warm start; it is not modified).
        config: blocks, α, η, epochs.

    Returns:
        The best epoch's blocks (weights rounded to float16, as stored) and head, evaluated
        with those rounded weights, and each trained layer's ‖w − w⁰‖/‖w⁰‖.
    """
    started = time.perf_counter()
    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    initial = pretrained_weights(backbone, config.blocks)
    upper = UpperBlocks(config.blocks, train.shape[1:], initial, backbone.precision)
    tuned_head = keras.models.clone_model(head)
    tuned_head.set_weights(head.get_weights())
    anchors = [tf.constant(initial[layer.name][0], tf.float32) for layer in upper.conv_layers]
    kernels = [layer.kernel for layer in upper.conv_layers]
    variables = upper.model.trainable_weights + tuned_head.trainable_weights
    optimizer = keras.optimizers.Adam(config.learning_rate)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    alpha = tf.constant(config.l2_sp, tf.float32)
    signature = [tf.TensorSpec((None, *train.shape[1:]), tf.float16),
                 tf.TensorSpec((None,), tf.int32)]

    @tf.function(input_signature=signature)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            probabilities = tuned_head(upper.features(x, training=True), training=True)
            loss = cross_entropy(y, probabilities) / tf.cast(tf.shape(x)[0], tf.float32)
            l2_sp = alpha / 2 * tf.add_n([tf.reduce_sum(tf.square(tf.cast(w, tf.float32) - w0))
                                          for w, w0 in zip(kernels, anchors)])
            total = loss + l2_sp + (tf.add_n(tuned_head.losses) if tuned_head.losses else 0.0)
        optimizer.apply(tape.gradient(total, variables), variables)
        return _sums(y, probabilities, cross_entropy)

    @tf.function(input_signature=signature)
    def evaluate_step(x, y):
        return _sums(y, tuned_head(upper.features(x), training=False), cross_entropy)

    def evaluate() -> tuple[float, float]:
        loss = correct = 0.0
        for start in range(0, len(val), config.batch_size):
            l, c = evaluate_step(tf.constant(val[start:start + config.batch_size]),
                                 tf.constant(y_val[start:start + config.batch_size], tf.int32))
            loss, correct = loss + float(l), correct + float(c)
        return loss / len(val), correct / len(val)

    def snapshot():
        return upper.model.get_weights(), tuned_head.get_weights()

    val_loss, val_accuracy = evaluate()  # epoch 0: the warm start, which fine-tuning must beat
    history = [{"epoch": 0, "loss": None, "accuracy": None, "val_loss": val_loss,
                "val_accuracy": val_accuracy}]
    best, best_loss, waited = snapshot(), val_loss, 0
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(len(train))
        loss_sum = correct = 0.0
        for start in range(0, len(train), config.batch_size):
            if should_stop():
                raise Cancelled()
            batch = np.sort(order[start:start + config.batch_size])  # sorted: memmap reads
            l, c = train_step(tf.constant(train[batch]), tf.constant(y_train[batch], tf.int32))
            loss_sum, correct = loss_sum + float(l), correct + float(c)
        val_loss, val_accuracy = evaluate()
        row = {"epoch": epoch, "loss": loss_sum / len(train), "accuracy": correct / len(train),
               "val_loss": val_loss, "val_accuracy": val_accuracy}
        history.append(row)
        on_epoch(epoch, row)
        if val_loss < best_loss:
            best, best_loss, waited = snapshot(), val_loss, 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    upper.model.set_weights(best[0])
    tuned_head.set_weights(best[1])
    # NB: stored as float16; evaluate what will be served, not the float32 master weights.
    for layer in upper.conv_layers:
        layer.set_weights([np.asarray(w, np.float16).astype(np.float32) for w in layer.get_weights()])
    best_val_loss, _ = evaluate()
    best_epoch = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    shift = {layer.name: float(np.linalg.norm(layer.get_weights()[0] - initial[layer.name][0])
                               / np.linalg.norm(initial[layer.name][0]))
             for layer in upper.conv_layers}
    return FineTuneResult(upper, tuned_head, history, best_epoch=int(history[best_epoch]["epoch"]),
                          best_val_loss=best_val_loss,
                          stopped_early=len(history) - 1 < config.max_epochs,
                          relative_shift=shift, seconds=time.perf_counter() - started)


def _sums(labels, probabilities, cross_entropy):
    predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return (cross_entropy(labels, probabilities),
            tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32)))
