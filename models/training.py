"""Training a classifier: split, extract cached features (with augmented views), pick and fit a
head with early stopping, evaluate, and report.

The method keeps d/m small: m grows with augmented views, d shrinks with a frozen backbone and a
small head chosen by validation loss. The backbone runs exactly once per (image, view); every head
candidate and every epoch trains on the cached feature vectors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import keras
import tensorflow as tf

from models import heads as heads_lib
from models.augmentation import Augmentation, augment
from models.backbone import Backbone
from models.preprocessing import load_image


class Cancelled(Exception):
    """Raised inside training when `should_stop` says the job was cancelled."""


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides a training run. Defaults are the product's defaults.

    `heads` holds one spec for a fixed head, several to pick the best by validation loss.
    """

    validation_split: float = 0.2
    max_epochs: int = 100
    patience: int = 10
    learning_rate: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    augmentation: Augmentation = Augmentation()
    heads: tuple[heads_lib.HeadSpec, ...] = heads_lib.AUTO_CANDIDATES
    extract_batch_size: int = 32
    max_image_pixels: int = 40_000_000  # decompression bombs: the upload limit applies here too

    def __post_init__(self):
        if not 0 < self.validation_split < 1:
            raise ValueError(f"validation_split must be in (0, 1). Received: {self.validation_split}")
        if self.max_epochs < 1 or self.patience < 0 or self.batch_size < 1 or not self.heads:
            raise ValueError(f"Invalid training config. Received: {self}")


@dataclass(frozen=True)
class Progress:
    """A snapshot of a running job, for the classifier resource."""

    stage: str                        # "extracting" or "training"
    images_done: int | None = None
    images_total: int | None = None
    epoch: int | None = None
    max_epochs: int | None = None
    val_accuracy: float | None = None
    candidate: str | None = None      # "2/4" while several heads are tried
    # The learning curve of the fit now running, one row per epoch so far: epoch, loss,
    # accuracy, val_loss, val_accuracy. A new fit (the next candidate) starts a new history.
    history: tuple[dict, ...] = ()


ProgressCallback = Callable[[Progress], None]
StopCheck = Callable[[], bool]


@dataclass
class FitResult:
    """One head trained with early stopping."""

    spec: heads_lib.HeadSpec
    model: keras.Model
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    stopped_early: bool


@dataclass
class TrainingResult:
    """A trained head and everything the report needs."""

    spec: heads_lib.HeadSpec
    head: keras.Model
    report: dict
    candidates: list[dict] = field(default_factory=list)


def stratified_split(labels: np.ndarray, validation_split: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices per label, seeded; every label with ≥ 2 images gets ≥ 1 in each part.

    Args:
        labels: int array (n,) of label indices.

    Returns:
        (train_indices, validation_indices), each a sorted int array.
    """
    rng = np.random.default_rng(seed)
    train, validation = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 2:
            train.extend(members)
            continue
        count = min(max(1, round(len(members) * validation_split)), len(members) - 1)
        validation.extend(members[:count])
        train.extend(members[count:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(validation, dtype=int))


def extract_features(images: Sequence[bytes], backbone: Backbone, *, views: int,
                     augmentation: Augmentation, rng: np.random.Generator, batch_size: int,
                     on_batch: Callable[[int], None] = lambda done: None,
                     should_stop: StopCheck = lambda: False,
                     timings: dict | None = None,
                     max_pixels: int = 40_000_000) -> np.ndarray:
    """Runs the backbone once per (image, view), decoding the next batch while it runs.

    Args:
        images: encoded image files.
        views: augmented views per image besides the original (0: originals only).

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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode, batches[0]) if batches else None
        done = 0
        for index in range(len(batches)):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(decode, batches[index + 1])
            start = time.perf_counter()
            rows = slice(done, done + len(pixels))
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


def fit_head(spec: heads_lib.HeadSpec, x_train: np.ndarray, y_train: np.ndarray,
             x_val: np.ndarray, y_val: np.ndarray, num_classes: int, config: TrainingConfig,
             *, on_epoch: Callable[[int, dict], None] = lambda epoch, logs: None,
             should_stop: StopCheck = lambda: False) -> FitResult:
    """Trains one head on cached features with early stopping on validation loss.

    A compiled train step over in-memory arrays: on cached features an epoch is a few
    milliseconds, where `model.fit` spends ~0.2 s per epoch on its own machinery.

    Args:
        x_train, x_val: float32 (n, feature_dim) features; y_train, y_val: int (n,) labels.

    Returns:
        The head with its best epoch's weights restored, and its history.
    """
    keras.utils.set_random_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = heads_lib.build_head(spec, x_train.shape[1], num_classes)
    model.get_layer("head_standardize").adapt(x_train)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
    signature = [tf.TensorSpec((None, x_train.shape[1]), tf.float32),
                 tf.TensorSpec((None,), tf.int32)]

    @tf.function(input_signature=signature)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            loss = cross_entropy(y, probabilities) / tf.cast(tf.shape(x)[0], tf.float32)
            total = loss + tf.add_n(model.losses) if model.losses else loss
        optimizer.apply(tape.gradient(total, model.trainable_weights), model.trainable_weights)
        return _sums(y, probabilities, cross_entropy)

    @tf.function(input_signature=signature)
    def evaluate_step(x, y):
        return _sums(y, model(x, training=False), cross_entropy)

    x_train_t, y_train_t = tf.constant(x_train, tf.float32), tf.constant(y_train, tf.int32)
    x_val_t, y_val_t = tf.constant(x_val, tf.float32), tf.constant(y_val, tf.int32)
    history, best_weights, best_loss, waited = [], model.get_weights(), np.inf, 0
    for epoch in range(1, config.max_epochs + 1):
        order = tf.constant(rng.permutation(len(x_train)), tf.int32)
        loss_sum = correct = 0.0
        for start in range(0, len(x_train), config.batch_size):
            if should_stop():
                raise Cancelled()
            batch = order[start:start + config.batch_size]
            batch_loss, batch_correct = train_step(tf.gather(x_train_t, batch),
                                                   tf.gather(y_train_t, batch))
            loss_sum, correct = loss_sum + float(batch_loss), correct + float(batch_correct)
        val_loss, val_correct = (float(v) for v in evaluate_step(x_val_t, y_val_t))
        row = {"epoch": epoch, "loss": loss_sum / len(x_train), "accuracy": correct / len(x_train),
               "val_loss": val_loss / len(x_val), "val_accuracy": val_correct / len(x_val)}
        history.append(row)
        on_epoch(epoch, row)
        if row["val_loss"] < best_loss:
            best_loss, best_weights, waited = row["val_loss"], model.get_weights(), 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    model.set_weights(best_weights)
    best = int(np.argmin([row["val_loss"] for row in history]))
    return FitResult(spec, model, history, best_epoch=best + 1,
                     best_val_loss=history[best]["val_loss"],
                     stopped_early=len(history) < config.max_epochs)


def _sums(labels: tf.Tensor, probabilities: tf.Tensor, cross_entropy) -> tuple[tf.Tensor, tf.Tensor]:
    """Summed cross-entropy (without the L2 penalty) and the number of correct predictions."""
    predicted = tf.argmax(probabilities, axis=1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
    return cross_entropy(labels, probabilities), correct


def evaluate(head: keras.Model, features: np.ndarray, labels: np.ndarray,
             label_names: Sequence[str]) -> dict:
    """Accuracy, loss, per-label precision/recall/F1 and the confusion matrix.

    Args:
        features: float32 (n, feature_dim); labels: int (n,).

    Returns:
        {"accuracy", "loss", "per_label": {name: {"precision", "recall", "f1", "support"}},
         "confusion_matrix": rows are true labels, columns predicted, in `label_names` order}.
    """
    probabilities = head.predict_on_batch(features) if len(features) else np.zeros((0, len(label_names)))
    predicted = probabilities.argmax(axis=1)
    k = len(label_names)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_label = {}
    for i, name in enumerate(label_names):
        true_positive = confusion[i, i]
        precision = true_positive / max(confusion[:, i].sum(), 1)
        recall = true_positive / max(confusion[i].sum(), 1)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4),
                           "f1": round(float(f1), 4), "support": int(confusion[i].sum())}
    picked = probabilities[np.arange(len(labels)), labels] if len(labels) else np.ones(0)
    return {
        "accuracy": round(float((predicted == labels).mean()) if len(labels) else 0.0, 4),
        "loss": round(float(-np.log(np.clip(picked, 1e-7, 1.0)).mean()) if len(labels) else 0.0, 4),
        "per_label": per_label,
        "confusion_matrix": confusion.tolist(),
    }


def diagnose(d: int, m: int, train_accuracy: float, val_accuracy: float,
             validation_size: int, num_classes: int) -> list[str]:
    """Plain-language advice from d/m and the gap between training and validation error."""
    notes = []
    if d > m:
        notes.append(
            f"d/m = {d / m:.2f}: the head has more trainable parameters ({d}) than training "
            f"examples ({m}), so it can memorise them. More images per label, more augmented "
            "views (augmentation.views) or a smaller head (head.hidden_units = 0, larger head.l2) "
            "would help.")
    train_error, val_error = 1 - train_accuracy, 1 - val_accuracy
    if val_error - train_error > 0.1 and val_error > 1.5 * train_error:
        notes.append(
            f"Validation error ({val_error:.0%}) stays far above training error "
            f"({train_error:.0%}): the head overfits. More images, stronger augmentation "
            "(augmentation.views, rotation, shift, noise) or a smaller, more regularised head "
            "would help.")
    if val_accuracy < 1.0 / num_classes + 0.1:
        notes.append(
            f"Validation accuracy ({val_accuracy:.0%}) is near chance for {num_classes} labels: "
            "check that the folders hold what their names say and that the classes can be told "
            "apart from the pictures; more images per label would help.")
    if validation_size < 10 * num_classes:
        notes.append(
            f"Only {validation_size} validation images: the validation metrics are a rough "
            "estimate. More images per label would make them firmer.")
    if not notes:
        notes.append(f"d/m = {d / m:.2f} and validation error is close to training error: "
                     "no sign of overfitting.")
    return notes


def train_classifier(images: Sequence[bytes], labels: np.ndarray, label_names: Sequence[str],
                     backbone: Backbone, config: TrainingConfig, *,
                     on_progress: ProgressCallback = lambda progress: None,
                     should_stop: StopCheck = lambda: False) -> TrainingResult:
    """Trains a head for a labeled image set.

    Args:
        images: encoded image files (already checked to decode).
        labels: int array (n,), indices into `label_names`.
        label_names: the classifier's labels, in output order.
        backbone: the shared frozen feature extractor.
        config: split, augmentation, head candidates and optimisation settings.
        on_progress: called with a `Progress` per extraction batch and per epoch.
        should_stop: polled between batches and epochs; True raises `Cancelled`.

    Returns:
        The best head and the training report (a JSON-ready dict).
    """
    labels = np.asarray(labels, dtype=int)
    timings: dict[str, float] = {}
    train_idx, val_idx = stratified_split(labels, config.validation_split, config.seed)
    rng = np.random.default_rng(config.seed)
    total = len(train_idx) + len(val_idx)

    def extraction_progress(offset: int) -> Callable[[int], None]:
        return lambda done: on_progress(Progress("extracting", images_done=offset + done,
                                                 images_total=total))

    extraction_progress(0)(0)  # the total is known before the first (slow) batch
    views = config.augmentation.views
    train_features = extract_features(
        [images[i] for i in train_idx], backbone, views=views, augmentation=config.augmentation,
        rng=rng, batch_size=config.extract_batch_size, on_batch=extraction_progress(0),
        should_stop=should_stop, timings=timings, max_pixels=config.max_image_pixels)
    val_features = extract_features(
        [images[i] for i in val_idx], backbone, views=0, augmentation=config.augmentation,
        rng=rng, batch_size=config.extract_batch_size,
        on_batch=extraction_progress(len(train_idx)), should_stop=should_stop,
        timings=timings, max_pixels=config.max_image_pixels)[:, 0]

    x_train = train_features.reshape(-1, train_features.shape[-1])
    y_train = np.repeat(labels[train_idx], 1 + views)
    y_val = labels[val_idx]
    start = time.perf_counter()
    fits = []
    for number, spec in enumerate(config.heads, start=1):
        candidate = f"{number}/{len(config.heads)}" if len(config.heads) > 1 else None
        rows: list[dict] = []

        def on_epoch(epoch: int, logs: dict, candidate=candidate, rows=rows) -> None:
            rows.append(dict(logs))
            on_progress(Progress("training", epoch=epoch, max_epochs=config.max_epochs,
                                 val_accuracy=logs.get("val_accuracy"), candidate=candidate,
                                 history=tuple(rows)))

        fits.append(fit_head(spec, x_train, y_train, val_features, y_val, len(label_names),
                             config, on_epoch=on_epoch, should_stop=should_stop))
    best = min(fits, key=lambda fit: fit.best_val_loss)
    timings["head"] = time.perf_counter() - start

    validation = evaluate(best.model, val_features, y_val, label_names)
    training = evaluate(best.model, train_features[:, 0], labels[train_idx], label_names)
    d = heads_lib.trainable_parameters(best.model)
    m = len(x_train)
    report = {
        "labels": list(label_names),
        "m": {
            "train": int(len(train_idx)), "validation": int(len(val_idx)),
            "train_after_augmentation": int(m),
            "per_label": {
                name: {"train": int((labels[train_idx] == i).sum()),
                       "validation": int((y_val == i).sum())}
                for i, name in enumerate(label_names)},
        },
        "d": d,
        "d_over_m": round(d / m, 4),
        "diagnosis": diagnose(d, m, training["accuracy"], validation["accuracy"], len(val_idx),
                              len(label_names)),
        "head": best.spec.as_dict(),
        "candidates": [
            {"head": fit.spec.as_dict(), "best_val_loss": round(fit.best_val_loss, 4),
             "best_epoch": fit.best_epoch, "epochs": len(fit.history),
             "d": heads_lib.trainable_parameters(fit.model)} for fit in fits],
        "history": best.history,
        "best_epoch": best.best_epoch,
        "stopped_early": best.stopped_early,
        "train_accuracy": training["accuracy"],
        "validation": validation,
        "timings_s": {name: round(value, 3) for name, value in timings.items()},
    }
    return TrainingResult(best.spec, best.model, report)
