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

A fine-tuned classifier is its trained blocks plus its head. `UpperBlocks` is the trainable
Keras model of those blocks; `ServedBlocks` holds their stored float16 weights (no deserialised
code) and maps cached activations to the same 2048-d feature vector the frozen backbone
produces, so the head is unchanged in kind. Every `ServedBlocks` of one shape runs one compiled
function that takes the weights as arguments (`served_pass`): a classifier loaded into the head
cache is served at once, without building a Keras model or tracing a graph of its own.
"""

from __future__ import annotations

import functools
import io
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from models import fitting
from models.augmentation import Augmentation, augment, augment_each, view_rng
from models.backbone import Backbone, pool_features
from models.diagnosis import fine_tuning_notes
from models.evaluation import evaluate, image_losses
from models.options import FineTuneOptions
from models.progress import Cancelled, Progress  # NB: Cancelled: the one the job code catches
from models.results import TrainingResult
from models.selection import LOSS_RESOLUTION, training_rows

#: Trained blocks → (the frozen layer whose output is cached, the conv layers that train).
BLOCKS = {
    1: ("block4_pool", ("block5_conv1", "block5_conv2", "block5_conv3")),
    2: ("block3_pool", ("block4_conv1", "block4_conv2", "block4_conv3",
                        "block5_conv1", "block5_conv2", "block5_conv3")),
}




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
        self.precision = precision
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

    def served(self) -> ServedBlocks:
        """The blocks as they are served: their current weights rounded to float16, as
        stored."""
        return ServedBlocks(self.blocks, tuple(self.model.input.shape[1:]), self.weights(),
                            self.precision)

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


class ServedBlocks:
    """A fine-tuned classifier's trained blocks for serving: the stored float16 weights, held
    in the compute dtype, and no Keras model.

    Attributes:
        blocks: 1 or 2 (`BLOCKS`); input_shape: the cached activations' (h, w, c).
        precision: the dtype policy the blocks compute in (the backbone's).
    """

    def __init__(self, blocks: int, input_shape: tuple[int, int, int],
                 weights: dict[str, tuple[np.ndarray, np.ndarray]], precision: str = "float32"):
        """Args:
            weights: conv layer name → (kernel HWIO, bias); rounded to float16 as stored.
        """
        self.blocks, self.input_shape, self.precision = blocks, tuple(input_shape), precision
        compute = keras.DTypePolicy(precision).compute_dtype
        # NB: held in the compute dtype (bfloat16 or float16 under a mixed policy, float32
        # otherwise): a cast per call of 7 M weights cost more than the convolutions' batch.
        held = [(tf.cast(np.asarray(weights[name][0], np.float16), compute),
                 tf.cast(np.asarray(weights[name][1], np.float16), compute))
                for name in BLOCKS[blocks][1]]
        self._names = BLOCKS[blocks][1]
        self._kernels = [kernel for kernel, _ in held]
        self._biases = [bias for _, bias in held]

    def predict_features(self, activations: np.ndarray) -> np.ndarray:
        """float32 (batch, 2048) features from float16 activations (batch, h, w, c)."""
        run = served_pass(self.blocks, self.input_shape, self.precision)
        return run(tf.constant(activations, tf.float16), self._kernels, self._biases).numpy()

    @property
    def nbytes(self) -> int:
        """Memory of the weights as held (2 bytes a weight under a mixed policy, else 4)."""
        return int(sum(w.shape.num_elements() * w.dtype.size
                       for w in (*self._kernels, *self._biases)))

    def weights(self, dtype=np.float32) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The weights as held: rounded to the compute dtype (bfloat16 keeps 8 bits of
        mantissa, fewer than the stored float16; `load_blocks` reads those exactly)."""
        return {name: (np.asarray(tf.cast(kernel, tf.float32), dtype),
                       np.asarray(tf.cast(bias, tf.float32), dtype))
                for name, kernel, bias in zip(self._names, self._kernels, self._biases)}

    def parameters(self) -> int:
        return int(sum(w.shape.num_elements() for w in (*self._kernels, *self._biases)))


@functools.cache
def served_pass(blocks: int, input_shape: tuple[int, int, int], precision: str):
    """The compiled forward pass of `blocks` upper blocks with the weights as arguments:
    traced once per (blocks, input shape, precision) and shared by every fine-tuned classifier.
    It computes what `UpperBlocks.features` does under the same policy: inputs cast to the
    compute dtype (the weights are held in it), conv + bias + ReLU, the two max-pools,
    `pool_features`."""
    compute = tf.as_dtype(keras.DTypePolicy(precision).compute_dtype)
    names = BLOCKS[blocks][1]
    # NB: every trained VGG16 conv layer has 512 filters; the first takes the cut's channels.
    shapes, channels = [], input_shape[-1]
    for _ in names:
        shapes.append(((3, 3, channels, 512), (512,)))
        channels = 512

    def pool(x):
        return tf.nn.max_pool2d(x, 2, 2, "VALID")

    def run(x, kernels, biases):
        # NB: tapped before the cast, as the Keras model taps its float16 input
        block4_pool = x if blocks == 1 else None
        x = tf.cast(x, compute)
        for name, kernel, bias in zip(names, kernels, biases):
            x = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias))
            if name == "block4_conv3":
                x = block4_pool = pool(x)
        return pool_features(block4_pool, x, pool(x))

    return tf.function(run, input_signature=[
        tf.TensorSpec((None, *input_shape), tf.float16),
        [tf.TensorSpec(kernel, compute) for kernel, _ in shapes],
        [tf.TensorSpec(bias, compute) for _, bias in shapes]])


def pretrained_weights(backbone: Backbone, blocks: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """w⁰: the backbone's own weights of the layers `blocks` trains (float32)."""
    return {name: tuple(backbone.model.get_layer(name).get_weights())
            for name in BLOCKS[blocks][1]}


#: Prefix of the fine-tuned conv weights inside a stored head file (`blocks.{layer}.kernel`).
BLOCKS_PREFIX = "blocks."


def block_arrays(weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """The trained blocks as float16 named arrays for a head file: `blocks.{layer}.kernel|bias`."""
    return {f"{BLOCKS_PREFIX}{name}.{part}": np.asarray(array, np.float16)
            for name, pair in weights.items() for part, array in zip(("kernel", "bias"), pair)}


def blocks_from_arrays(arrays) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """(blocks, weights) from a head file's `blocks.*` arrays (an npz or a mapping); None when
    it has none (a frozen classifier). Anything but exactly one block set's layers is refused."""
    keys = [key for key in arrays if key.startswith(BLOCKS_PREFIX)]
    if not keys:
        return None
    names = sorted({key[len(BLOCKS_PREFIX):].rsplit(".", 1)[0] for key in keys})
    for blocks, (_, layers) in BLOCKS.items():
        if names == sorted(layers):
            return blocks, {name: (arrays[f"{BLOCKS_PREFIX}{name}.kernel"],
                                   arrays[f"{BLOCKS_PREFIX}{name}.bias"]) for name in layers}
    raise ValueError(f"not a fine-tuned block file: layers {names}")


def load_upper(arrays, backbone: Backbone) -> ServedBlocks | None:
    """Serving: the trained blocks of a head file on `backbone`, or None (frozen)."""
    found = blocks_from_arrays(arrays)
    if found is None:
        return None
    blocks, weights = found
    return ServedBlocks(blocks, backbone.activation_shape(BLOCKS[blocks][0]), weights,
                       backbone.precision)


def serialize_blocks(weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Trained blocks alone as a float16 .npz (about 14 MB for block5), no pickles."""
    buffer = io.BytesIO()
    np.savez(buffer, **block_arrays(weights))
    return buffer.getvalue()


def load_blocks(data: bytes) -> tuple[int, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(blocks, weights) from `serialize_blocks`' bytes; refuses anything else."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        found = blocks_from_arrays(archive)
    if found is None:
        raise ValueError("not a fine-tuned block file: no blocks.* arrays")
    return found


def mixed_pass(backbone: Backbone, images: np.ndarray,
               uppers: Sequence[ServedBlocks | None]) -> np.ndarray:
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
    features = np.zeros((len(images), backbone.feature_dim), np.float32)
    # NB: the shared upper blocks run only for the rows that need them (frozen rows, and the
    # block4_pool of one-block rows when two-block rows set the cut), so a batch of fine-tuned
    # rows costs the frozen blocks plus their own blocks, not the shared ones as well.
    shared_rows = [row for row, upper in enumerate(uppers)
                   if upper is None or upper.blocks != deepest]
    block4_pool = None
    if shared_rows:
        shared = _shared_upper(backbone, deepest, lower.shape[1:])
        taps = [t.numpy() for t in shared.model(lower[shared_rows], training=False)]
        block4_pool = np.zeros((len(images), *taps[0].shape[1:]), taps[0].dtype)
        block4_pool[shared_rows] = taps[0]
        features[shared_rows] = pool_features(*taps).numpy()
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
                      *, views: int, augmentation: Augmentation,
                      rng: np.random.Generator | None = None, seed: int | None = None,
                      hashes: Sequence[bytes] | None = None,
                      batch_size: int = 32, memory_budget_bytes: int = 2 * 1024**3,
                      on_batch: Callable[[int], None] = lambda done: None,
                      should_stop: Callable[[], bool] = lambda: False) -> ActivationCache:
    """Runs the frozen blocks once per (image, view).

    Args:
        images: uint8 (n, size, size, 3) decoded images.
        views: augmented views per image besides the original (view 0).
        rng: the views' randomness, drawn in order; or, with `seed` and `hashes` (each image's
            `features.image_hash`), each view is `augmentation.view_rng(seed, hash, view)`'s,
            the very views `features.extract_features` draws for the frozen stage.
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
            if hashes is None:
                viewed = augment(pixels, augmentation, rng)
            else:
                viewed = augment_each(pixels, augmentation,
                                      [view_rng(seed, hashes[i], view)
                                       for i in range(start, start + len(pixels))])
            cache.array[rows, view] = backbone.activations(viewed, layer)
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


def fine_tune(train: np.ndarray, y_train: np.ndarray, val: np.ndarray | None,
              y_val: np.ndarray | None, head: keras.Model, backbone: Backbone,
              config: FineTuneConfig, *,
              on_epoch: Callable[[int, dict], None] = lambda epoch, row: None,
              should_stop: Callable[[], bool] = lambda: False) -> FineTuneResult:
    """Trains the deepest blocks and a warm-started head together, with L2-SP.

    Args:
        train: float16 (n, h, w, c) cached activations of training views; y_train int (n,).
        val: float16 (m, h, w, c) activations of unaugmented validation images; y_val (m,).
            None for a refit on every image: it runs exactly `max_epochs` and keeps the last.
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
    # NB: Normalization reads its statistics into constants only in finalize_state(); without
    # it the clone standardises nothing and the "warm start" is another head.
    tuned_head.get_layer("head_standardize").finalize_state()
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

    validating = val is not None
    # epoch 0: the warm start, which fine-tuning must beat
    val_loss, val_accuracy = evaluate() if validating else (None, None)
    history = [{"epoch": 0, "loss": None, "accuracy": None, "val_loss": val_loss,
                "val_accuracy": val_accuracy}]
    best, best_loss, waited = snapshot(), val_loss if validating else np.inf, 0
    for epoch in range(1, config.max_epochs + 1):
        order = rng.permutation(len(train))
        loss_sum = correct = 0.0
        for start in range(0, len(train), config.batch_size):
            if should_stop():
                raise Cancelled()
            batch = np.sort(order[start:start + config.batch_size])  # sorted: memmap reads
            l, c = train_step(tf.constant(train[batch]), tf.constant(y_train[batch], tf.int32))
            loss_sum, correct = loss_sum + float(l), correct + float(c)
        val_loss, val_accuracy = evaluate() if validating else (None, None)
        row = {"epoch": epoch, "loss": loss_sum / len(train), "accuracy": correct / len(train),
               "val_loss": val_loss, "val_accuracy": val_accuracy}
        history.append(row)
        on_epoch(epoch, row)
        if not validating:
            best = snapshot()
        elif val_loss < best_loss:
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
    if validating:
        best_val_loss, _ = evaluate()
        best_epoch = min(range(len(history)), key=lambda i: history[i]["val_loss"])
    else:
        best_val_loss, best_epoch = float("nan"), len(history) - 1
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


# ---------------------------------------------------------------- the fine-tuning stage

#: Per trained-block set, the cost of one fine-tuning epoch per (image, view) row, in full
#: backbone passes (forward and backward through the trained blocks): block5 is about a sixth
#: of VGG16's multiply-adds at any image size, block4 about four times block5.
EPOCH_COST = {1: 0.5, 2: 2.5}
#: Caching the frozen blocks' activations (and the features of the warm start), in passes per row.
CACHE_COST = 1.0
#: A frozen head whose out-of-fold loss is below this (and accuracy 1) leaves no room.
NO_ROOM_LOSS = 0.02
KEEP_RULE = ("kept only if the frozen head's loss minus fine-tuning's, per held-out image, "
             "averages more than its standard error (and 0.001): the frozen head is the "
             "smaller hypothesis")
RULE = ("the smallest change (mean relative shift of the trained layers) whose validation loss "
        "is within one standard error (over the held-out images) of the lowest")


def split_description(scored: int, k: int) -> str:
    """How the candidates were scored: on `scored` of the frozen stage's `k` folds."""
    if scored == 1:
        return ("one split: the frozen stage's first cross-validation fold is held out of "
                "fine-tuning and scores every candidate, against the frozen head's out-of-fold "
                "predictions for the same images")
    return (f"cross-validated on {scored} of the frozen stage's {k} folds: every candidate "
            "trains without each fold and scores it, against the frozen head's out-of-fold "
            "predictions for the same images")


def estimate_seconds(option, images: int, views: int, seconds_per_row: float, folds: int,
                     scored: int = 1) -> float:
    """Predicted wall time of fine-tuning one candidate (`FineTuneOptions`): its fits on
    `scored` of the `folds` cross-validation splits and its refit, each for at most
    `max_epochs` (the cache is counted by `fine_tune_stage`)."""
    rows = images * (1 + views)
    split_rows = rows * (1 - 1 / folds)
    return (seconds_per_row * option.max_epochs * EPOCH_COST[option.blocks]
            * (scored * split_rows + rows))


def scored_folds(candidates, images: int, views: int, seconds_per_row: float, folds: int,
                 budget_s: float, spent_s: float) -> int:
    """How many of the `folds` splits score the candidates: as many as the budget allows
    beside `spent_s` (the cache), at least one."""
    def cost(scored: int) -> float:
        return spent_s + sum(estimate_seconds(c, images, views, seconds_per_row, folds, scored)
                             for c in candidates)
    return max([1] + [scored for scored in range(2, folds + 1) if cost(scored) <= budget_s])


def fine_tune_stage(images: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                    frozen, backbone: Backbone, config, *, hashes: Sequence[bytes] | None = None,
                    on_progress: Callable = lambda progress: None,
                    should_stop: Callable[[], bool] = lambda: False):
    """The fine-tuning stage after a frozen head: decides, chooses, refits and reports.

    With `config.fine_tune` "auto" it runs only when the frozen head leaves room on validation
    (out-of-fold accuracy below 1 or loss above `NO_ROOM_LOSS`) and the estimated cost (the
    frozen stage's measured seconds per backbone pass × `EPOCH_COST` × rows × epochs) fits
    `config.fine_tune_budget_s`; it then tries as many of `config.fine_tune_candidates` as the
    budget allows. An explicit option runs that one candidate. The frozen blocks run once per
    (image, view), with the frozen stage's seeded views. Every candidate is cross-validated on
    the frozen stage's folds, as many as the budget allows beside the candidates (`scored_folds`;
    at least the first, `split_description`): trained without a fold, warm-started from the
    frozen head refitted on the same images, and scored on the fold's images. The chosen one
    (`RULE`) must beat the frozen head's out-of-fold loss on the same images by more than a
    standard error (`KEEP_RULE`), else the frozen result is returned. The winner is refitted
    on every image for its median best epoch count, warm-started from the frozen stage's served
    head.

    Args:
        images: uint8 (n, size, size, 3) decoded training images, in `labels`' order, or a
            sequence whose slices are such arrays (`models.preprocessing.DecodedImages`).
        labels: int (n,) indices into `label_names`.
        frozen: the frozen stage's `models.training.TrainingResult` (its head, report, folds).
        backbone: the shared backbone (its conv weights are w⁰; it is not modified).
        config: `models.options.TrainingConfig` (fine_tune, augmentation, seed, budget).
        hashes: each image's `features.image_hash`: the frozen stage's views exactly
            (`augmentation.view_rng`); without them, views drawn in order from the seed.
        on_progress: called with `Progress("fine_tuning", …)` per cached batch and per epoch.
        should_stop: polled between batches; True raises `Cancelled`.

    Returns:
        A `TrainingResult`: the fine-tuned one (stage "fine_tuned", `upper` the float16
        weights, `fine_tuned` {blocks, l2_sp, learning_rate, relative_shift}, a report whose
        `d` counts the trained conv parameters), or `frozen` itself with report entries
        `fine_tuning` (why it was skipped or lost, by how much) and `fine_tuned` None.
    """
    started = time.perf_counter()
    labels = np.asarray(labels, int)
    option, report = config.fine_tune, frozen.report
    views = config.augmentation.views
    rows = len(images) * (1 + views)
    timings = report.get("timings_s", {})
    seconds_per_row = timings.get("features", 0.0) / max(rows, 1)
    folds = frozen.selection.folds
    k = int(folds.max()) + 1

    def kept_frozen(**why) -> object:
        frozen.report = {**report, "fine_tuned": None, "fine_tuning": why}
        return frozen

    if option == "off":
        return kept_frozen(ran=False, reason='fine_tune is "off"')
    candidates = [option] if isinstance(option, FineTuneOptions) else []
    budget = {"budget_s": config.fine_tune_budget_s,
              "seconds_per_backbone_pass": round(seconds_per_row, 5)}
    if not candidates:
        validation = report["validation"]
        if validation["accuracy"] >= 1.0 and validation["loss"] <= NO_ROOM_LOSS:
            return kept_frozen(
                ran=False, reason=f"no room: the frozen head is right on every image out of "
                                  f"fold, with validation loss {validation['loss']:.4f} "
                                  f"≤ {NO_ROOM_LOSS}", **budget)
        cost = seconds_per_row * rows * CACHE_COST
        for candidate in config.fine_tune_candidates:
            more = estimate_seconds(candidate, len(images), views, seconds_per_row, k)
            if cost + more > config.fine_tune_budget_s:
                break
            cost += more
            candidates.append(candidate)
        if not candidates:
            first = config.fine_tune_candidates[0]
            need = seconds_per_row * rows * CACHE_COST + estimate_seconds(
                first, len(images), views, seconds_per_row, k)
            work = f"fine-tuning {len(images)} images × {1 + views} views"
            if config.fine_tune_budget_s <= 0:
                reason = (f'no budget: "auto" fine-tunes only within HEADSTART_FINE_TUNE_BUDGET_S, '
                          f"which is 0 here (the default); {work} is estimated at {need:.0f} s "
                          'on this device; ask for it explicitly (fine_tune {"blocks": 1}) or '
                          "set a budget")
            else:
                reason = (f"over budget: {work} is estimated at {need:.0f} s on this device, "
                          f"more than the {config.fine_tune_budget_s:g} s budget "
                          "(HEADSTART_FINE_TUNE_BUDGET_S); a GPU fits it, or ask for it "
                          "explicitly")
            return kept_frozen(ran=False, reason=reason, estimated_s=round(need, 1), **budget)
        budget["estimated_s"] = round(cost, 1)

    # One cache serves every candidate: they train the same blocks.
    blocks = candidates[0].blocks
    candidates = [candidate for candidate in candidates if candidate.blocks == blocks]
    scored = scored_folds(candidates, len(images), views, seconds_per_row, k,
                          config.fine_tune_budget_s, seconds_per_row * rows * CACHE_COST)
    if scored > 1:
        budget["estimated_s"] = round(seconds_per_row * rows * CACHE_COST + sum(
            estimate_seconds(c, len(images), views, seconds_per_row, k, scored)
            for c in candidates), 1)
    total = len(images)
    on_progress(Progress("fine_tuning", images_done=0, images_total=total,
                         candidate="caching activations"))
    cache = cache_activations(
        images, backbone, blocks, views=views, augmentation=config.augmentation,
        rng=np.random.default_rng(config.seed), seed=config.seed, hashes=hashes,
        batch_size=config.extract_batch_size, memory_budget_bytes=config.fine_tune_memory_bytes,
        on_batch=lambda done: on_progress(Progress("fine_tuning", images_done=done,
                                                   images_total=total,
                                                   candidate="caching activations")),
        should_stop=should_stop)
    try:
        cached_s = time.perf_counter() - started
        y_rows = np.repeat(labels, 1 + views)
        flat = cache.array.reshape(-1, *cache.array.shape[2:])
        # The features the pretrained upper blocks give from the cached activations: what the
        # warm starts on the splits are refitted on.
        shared = _shared_upper(backbone, blocks, cache.array.shape[2:])
        features = _features(shared, flat, config.extract_batch_size, should_stop)
        features = features.reshape(len(labels), 1 + views, -1)
        tried = [_Tried(candidate, np.zeros((len(labels), len(label_names))))
                 for candidate in candidates]
        for fold in range(scored):
            _score_fold(fold, scored, tried, folds, features, labels, flat, y_rows,
                        np.asarray(cache.array[folds == fold, 0]), frozen, backbone, config,
                        on_progress, should_stop)
        held = folds < scored
        y_val = labels[held]
        frozen_losses = frozen.selection.result.image_losses[held]
        frozen_loss = float(frozen_losses.mean())
        for run in tried:
            run.losses = image_losses(run.probabilities[held], y_val)
        best = min(tried, key=lambda run: run.losses.mean())
        threshold = best.losses.mean() + best.losses.std(ddof=1) / np.sqrt(len(best.losses))
        chosen = min((run for run in tried if run.losses.mean() <= threshold),
                     key=lambda run: run.mean_shift)
        candidate, losses, probabilities = chosen.candidate, chosen.losses, \
            chosen.probabilities[held]
        summary = {
            "ran": True, "split": split_description(scored, k), "rule": RULE,
            "folds": scored, "held_out_images": int(held.sum()),
            "frozen_val_loss": round(frozen_loss, 4),
            "frozen_val_accuracy": round(float(
                (frozen.selection.result.out_of_fold[held].argmax(1) == y_val).mean()), 4),
            "tried": [run.summary(y_val, held) for run in tried],
            "chosen": tried.index(chosen),
            "history": chosen.fits[0].history, **budget,
        }
        val_loss = float(losses.mean())
        # The frozen head is the smallest change of all (none): fine-tuning must beat it by
        # more than the standard error of the paired per-image differences.
        gains = frozen_losses - losses
        gain, gain_se = float(gains.mean()), float(gains.std(ddof=1) / np.sqrt(len(gains)))
        summary.update(val_loss=round(val_loss, 4), improvement=round(gain, 4),
                       improvement_se=round(gain_se, 4), keep_rule=KEEP_RULE)
        held_out = f"{int(held.sum())} held-out images" + (
            f" of {scored} folds" if scored > 1 else "")
        if chosen.best_epoch == 0 or gain <= max(gain_se, LOSS_RESOLUTION):
            summary["seconds"] = round(time.perf_counter() - started, 3)
            epochs = [fit.best_epoch for fit in chosen.fits]
            why = (f"the median fold kept no epoch of fine-tuning (best epochs {epochs}: 0 is "
                   "the warm start), so it did not improve the frozen head consistently"
                   if chosen.best_epoch == 0 else
                   f"that is {gain:+.4f}, not more than its standard error {gain_se:.4f}")
            return kept_frozen(
                kept=False, **summary,
                reason=f"the frozen head won: fine-tuning's validation loss {val_loss:.4f} "
                       f"against the frozen head's {frozen_loss:.4f} on the same "
                       f"{held_out}; {why}")

        # The refit on every image, for the chosen candidate's best epoch count (the median
        # over the scored folds), warm-started from the frozen stage's served head.
        refit_option = candidate.model_copy(update={"max_epochs": chosen.best_epoch})
        refit = _fit_candidate(refit_option, flat, y_rows, None, None, frozen.head, backbone,
                               config, "refit", on_progress, should_stop)
        train_accuracy = float((_probabilities(refit, np.asarray(cache.array[:, 0]),
                                               config.extract_batch_size).argmax(1)
                                == labels).mean())
    finally:
        cache.close()

    upper, head = refit.upper, refit.head
    d_blocks = upper.parameters()
    d_head = int(report["d"])
    m = int(report["m"]["train_after_augmentation"])
    d = d_head + d_blocks
    shift = {name: round(value, 6) for name, value in refit.relative_shift.items()}
    fine_tuned = {"blocks": candidate.blocks, "l2_sp": candidate.l2_sp,
                  "learning_rate": candidate.learning_rate, "relative_shift": shift}
    validation = evaluate(probabilities, y_val, label_names)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    summary["kept"] = True
    summary["reason"] = (f"fine-tuning won: validation loss {val_loss:.4f} against the frozen "
                         f"head's {frozen_loss:.4f} on the same {held_out} "
                         f"({gain:+.4f} ± {gain_se:.4f})")
    summary["validation"] = ("each held-out image scored by the chosen candidate's model that "
                             "trained without its fold; the served blocks and head are "
                             "refitted on every image")
    summary["trust"] = ("calibration, threshold and the out-of-distribution reference are the "
                        "frozen stage's (fitted on its out-of-fold scores and features)")
    counts = {name: int((y_val == i).sum()) for i, name in enumerate(label_names)}
    fine_report = {
        **report,
        "stage": "fine_tuned",
        "d": d, "d_over_m": round(d / m, 4),
        "diagnosis": [*report["diagnosis"], *fine_tuning_notes(
            d_head, d_blocks, m, l2_sp=candidate.l2_sp, learning_rate=candidate.learning_rate,
            relative_shift=shift, best_epoch=chosen.best_epoch,
            max_epochs=candidate.max_epochs)],
        "m": {**report["m"], "validation": int(held.sum()),
              "per_label": {name: {**report["m"]["per_label"][name], "validation": count}
                            for name, count in counts.items()}},
        "validation": validation,
        "train_accuracy": train_accuracy,
        "fine_tuned": fine_tuned,
        "fine_tuning": summary,
        "timings_s": {**timings, "fine_tuning": round(time.perf_counter() - started, 3),
                      "fine_tuning_cache": round(cached_s, 3)},
    }
    # NB: the frozen stage's trust data (temperature, threshold, OOD reference), fitted on its
    # out-of-fold scores and features: there are no out-of-fold fine-tuned scores to refit it on.
    return TrainingResult(frozen.spec, head, fine_report, frozen.selection, trust=frozen.trust,
                          stage="fine_tuned", upper=upper.weights(), fine_tuned=fine_tuned)


def _features(upper: UpperBlocks, activations: np.ndarray, batch_size: int,
              should_stop: Callable[[], bool]) -> np.ndarray:
    """float32 (rows, 2048) features of cached activations (rows, h, w, c) through `upper`."""
    out = np.zeros((len(activations), 2048), np.float32)
    for start in range(0, len(activations), batch_size):
        if should_stop():
            raise Cancelled()
        # NB: the Keras model, not `served()`: w⁰ in float32, as fine-tuning starts from it.
        out[start:start + batch_size] = pool_features(*upper.model.predict_on_batch(
            np.asarray(activations[start:start + batch_size], np.float16))).numpy()
    return out


@dataclass
class _Tried:
    """One candidate across the scored folds: its fold runs and their out-of-fold scores."""

    candidate: FineTuneOptions
    probabilities: np.ndarray          # (n, num_classes), filled on the scored folds' images
    fits: list[FineTuneResult] = field(default_factory=list)
    losses: np.ndarray | None = None   # per scored image, once every fold is scored

    @property
    def best_epoch(self) -> int:
        """The median over folds of the kept epoch (0: the warm start): the refit's epochs."""
        return int(round(float(np.median([fit.best_epoch for fit in self.fits]))))

    @property
    def mean_shift(self) -> float:
        return float(np.mean([np.mean(list(fit.relative_shift.values())) for fit in self.fits]))

    def summary(self, y_val: np.ndarray, held: np.ndarray) -> dict:
        losses = self.losses
        return {**self.candidate.model_dump(), "val_loss": round(float(losses.mean()), 4),
                "val_loss_se": round(float(losses.std(ddof=1) / np.sqrt(len(losses))), 4),
                "val_accuracy": round(float(
                    (self.probabilities[held].argmax(1) == y_val).mean()), 4),
                "best_epoch": self.best_epoch,
                "best_epochs": [fit.best_epoch for fit in self.fits],
                "stopped_early": any(fit.stopped_early for fit in self.fits),
                "relative_shift": {name: round(float(np.mean(
                    [fit.relative_shift[name] for fit in self.fits])), 6)
                    for name in self.fits[0].relative_shift},
                "seconds": round(sum(fit.seconds for fit in self.fits), 3)}


def _score_fold(fold: int, scored: int, tried: list[_Tried], folds: np.ndarray,
                features: np.ndarray, labels: np.ndarray, flat: np.ndarray, y_rows: np.ndarray,
                val: np.ndarray, frozen, backbone: Backbone, config, on_progress,
                should_stop) -> None:
    """Trains every candidate without `fold` and scores its images (`val`, their cached
    originals), warm-started from the frozen head's spec refitted on the same images (on the
    rows it was chosen with: every view, or the originals only)."""
    held = folds == fold
    chosen = frozen.selection.result
    rows = training_rows(chosen.candidate, features[~held], labels[~held])
    warm = fitting.fit_head(frozen.spec, fitting.Fold(*rows), tried[0].probabilities.shape[1],
                            config, epochs=chosen.best_epochs[fold], build=True,
                            should_stop=should_stop).model
    train_mask = np.repeat(~held, features.shape[1])
    train, y_train = flat[train_mask], y_rows[train_mask]
    for index, run in enumerate(tried):
        label = f"{index + 1}/{len(tried)}" + (f" fold {fold + 1}/{scored}" if scored > 1 else "")
        fit = _fit_candidate(run.candidate, train, y_train, val, labels[held], warm, backbone,
                             config, label, on_progress, should_stop)
        run.fits.append(fit)
        run.probabilities[held] = _probabilities(fit, val, config.extract_batch_size)


def _fit_candidate(option, train, y_train, val, y_val, head, backbone, config, label,
                   on_progress, should_stop) -> FineTuneResult:
    rows: list[dict] = []

    def on_epoch(epoch: int, row: dict) -> None:
        rows.append(row)
        on_progress(Progress("fine_tuning", epoch=epoch, max_epochs=option.max_epochs,
                             val_accuracy=row["val_accuracy"], candidate=label,
                             history=tuple(rows) if val is not None else ()))

    return fine_tune(train, y_train, val, y_val, head, backbone,
                     FineTuneConfig(blocks=option.blocks, l2_sp=option.l2_sp,
                                    learning_rate=option.learning_rate,
                                    max_epochs=option.max_epochs, patience=option.patience,
                                    seed=config.seed),
                     on_epoch=on_epoch, should_stop=should_stop)


def _probabilities(fit: FineTuneResult, activations: np.ndarray, batch_size: int) -> np.ndarray:
    """float64 (n, num_classes) of a fine-tuned run on float16 activations (n, h, w, c)."""
    served = fit.upper.served()
    return np.concatenate([
        np.asarray(fit.head(served.predict_features(activations[start:start + batch_size]),
                            training=False), np.float64)
        for start in range(0, len(activations), batch_size)])
