"""Fitting one head on cached features: a logistic regression solved exactly, or a head trained
by Adam with early stopping.

A linear head without dropout is a convex problem: `models.logistic` solves it by L-BFGS (no
learning rate, batch size or epoch count to get wrong, and a warm start along a path of L2
strengths). Any other head (a hidden layer, or dropout) trains by Adam in a compiled step over
in-memory arrays, with early stopping on validation loss when validation rows are given and a
fixed epoch count when they are not (the refit on every image).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from models import heads as heads_lib
from models import logistic
from models.evaluation import cross_entropy as _cross_entropy
from models.options import HeadOptions, TrainingConfig
from models.progress import Cancelled, StopCheck


@dataclass
class Fold:
    """Training and validation rows of one cross-validation fold (or of the refit, without
    validation rows).

    Attributes:
        x_train: float32 (n, feature_dim) features, augmented views included; y_train: int (n,).
        x_val: float32 (n_val, feature_dim) un-augmented features of the held-out images, or
            None; y_val: int (n_val,) or None.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @cached_property
    def standardizer(self) -> logistic.Standardizer:
        return logistic.Standardizer.fit(self.x_train)

    @cached_property
    def rows(self) -> TensorRows:
        """The standardised training rows as one tensor, computed once per fold and shared by
        every fit on it (exact and Adam)."""
        return TensorRows(self.standardizer(self.x_train))

    @cached_property
    def z_val(self) -> np.ndarray | None:
        return None if self.x_val is None else self.standardizer(self.x_val)


class TensorRows:
    """`logistic.Rows` held as a TensorFlow constant: its thread pool (or the GPU) runs the
    solver's two products per iteration."""

    def __init__(self, z: np.ndarray):
        self.z = tf.constant(z, tf.float32)
        self.shape = tuple(z.shape)

    def times(self, kernel: np.ndarray) -> np.ndarray:
        return _times(self.z, tf.constant(kernel, tf.float32)).numpy().astype(np.float64)

    def transposed_times(self, residual: np.ndarray) -> np.ndarray:
        return _transposed_times(self.z, tf.constant(residual, tf.float32)).numpy().astype(
            np.float64)


@tf.function(reduce_retracing=True)
def _times(z, kernel):
    return tf.matmul(z, kernel)


@tf.function(reduce_retracing=True)
def _transposed_times(z, residual):
    return tf.matmul(z, residual, transpose_a=True)


@dataclass
class FitResult:
    """One head fitted on one fold (or on every image, for the refit).

    Attributes:
        spec: the head.
        history: one row per epoch (an L-BFGS iteration is a full pass, so it counts as one):
            epoch, loss, accuracy, and val_loss, val_accuracy when there were validation rows.
        best_epoch: the epoch whose weights the head keeps (Adam: the lowest validation loss;
            exact: the last iteration); epochs: epochs run.
        stopped_early: Adam stopped on patience before max_epochs (exact fits: False).
        val_probabilities: float64 (n_val, num_classes) of the kept weights, or None.
        solution: the exact fit, to warm-start the next L2 strength on the same fold.
        model: the Keras head, when asked for (`build=True`).
    """

    spec: HeadOptions
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    val_probabilities: np.ndarray | None = None
    solution: logistic.LogisticFit | None = None
    model: keras.Model | None = field(default=None, repr=False)

    @property
    def epochs(self) -> int:
        return len(self.history)


def fit_head(spec: HeadOptions, fold: Fold, num_classes: int, config: TrainingConfig, *,
             epochs: int | None = None, build: bool = False,
             warm: logistic.LogisticFit | None = None,
             on_epoch: Callable[[dict], None] = lambda row: None,
             should_stop: StopCheck = lambda: False) -> FitResult:
    """Fits one head on a fold's rows.

    Args:
        spec: the head to fit.
        fold: its training rows, and validation rows for early stopping and scoring (None for
            the refit).
        num_classes: outputs of the head.
        config: Adam's settings (learning rate, batch size, max epochs, patience, seed).
        epochs: without validation rows, the Adam epochs to run (ignored by exact fits).
        build: also return the Keras head (the refit; folds only need probabilities).
        warm: an exact fit on the same fold to start from.
        on_epoch: called with each history row.
        should_stop: polled between batches and iterations; True raises `Cancelled`.

    Returns:
        The fit: history, best epoch, validation probabilities and (if `build`) the head.
    """
    if spec.is_exact:
        return _fit_exact(spec, fold, num_classes, build=build, warm=warm, on_epoch=on_epoch,
                          should_stop=should_stop)
    return _fit_adam(spec, fold, num_classes, config, epochs=epochs, on_epoch=on_epoch,
                     should_stop=should_stop)


def _fit_exact(spec, fold, num_classes, *, build, warm, on_epoch, should_stop) -> FitResult:
    solution = logistic.fit_logistic(
        fold.rows, fold.y_train, num_classes, spec.l2, z_val=fold.z_val, labels_val=fold.y_val,
        init=warm, on_iteration=on_epoch, should_stop=should_stop)
    if should_stop():
        raise Cancelled()
    val = solution.probabilities(fold.z_val) if fold.z_val is not None else None
    model = heads_lib.linear_head(fold.standardizer, solution, spec) if build else None
    return FitResult(spec, solution.history, best_epoch=max(solution.iterations, 1),
                     stopped_early=False, val_probabilities=val, solution=solution, model=model)


def _fit_adam(spec, fold, num_classes, config, *, epochs, on_epoch, should_stop) -> FitResult:
    validating = fold.x_val is not None
    if not validating and epochs is None:
        raise ValueError("An Adam fit without validation rows needs an epoch count.")
    n, feature_dim = fold.rows.shape
    program = _AdamProgram.get(spec, feature_dim, num_classes, config.learning_rate)
    with program.lock:
        program.reset(config.seed)
        rng = np.random.default_rng(config.seed)
        x_train_t = fold.rows.z
        y_train_t = tf.constant(fold.y_train, tf.int32)
        x_val_t = tf.constant(fold.z_val, tf.float32) if validating else None
        history, best_weights, best_val, best_loss, best_epoch, waited = [], None, None, np.inf, 0, 0
        max_epochs = config.max_epochs if validating else epochs
        for epoch in range(1, max_epochs + 1):
            order = tf.constant(rng.permutation(n), tf.int32)
            loss_sum = correct = 0.0
            for start in range(0, n, config.batch_size):
                if should_stop():
                    raise Cancelled()
                batch = order[start:start + config.batch_size]
                batch_loss, batch_correct = program.train_step(tf.gather(x_train_t, batch),
                                                               tf.gather(y_train_t, batch))
                loss_sum, correct = loss_sum + float(batch_loss), correct + float(batch_correct)
            row = {"epoch": epoch, "loss": loss_sum / n, "accuracy": correct / n}
            if validating:
                val = program.predict_step(x_val_t).numpy().astype(np.float64)
                row["val_loss"] = _cross_entropy(val, fold.y_val)
                row["val_accuracy"] = float((val.argmax(axis=1) == fold.y_val).mean())
            history.append(row)
            on_epoch(row)
            if not validating:
                continue
            if row["val_loss"] < best_loss:
                best_loss, best_epoch, waited = row["val_loss"], epoch, 0
                best_weights, best_val = program.model.get_weights(), val
            else:
                waited += 1
                if waited >= config.patience:
                    break
        weights = best_weights if validating else program.model.get_weights()
    model = None
    if not validating:
        model = heads_lib.build_head(spec, feature_dim, num_classes)
        model.set_weights([fold.standardizer.mean.astype(np.float32),
                           fold.standardizer.variance.astype(np.float32),
                           np.array(0, dtype="int64"), *weights[3:]])
        model.get_layer("head_standardize").finalize_state()
        return FitResult(spec, history, best_epoch=len(history), stopped_early=False, model=model)
    return FitResult(spec, history, best_epoch=best_epoch,
                     stopped_early=len(history) < config.max_epochs, val_probabilities=best_val)


class _AdamProgram:
    """A head, its Adam optimizer and their compiled train and predict steps, built and traced
    once per (head, feature_dim, num_classes, learning rate) in a process and reset for each
    fit. Tracing a train step took 5-15 s on a busy 2-core machine; cross-validation fits a
    head k + 1 times.

    The program's head takes standardised features (its standardisation layer is the identity):
    Keras's Normalization bakes its statistics into the traced graph as constants, and every
    fold has its own. The served head is rebuilt with the fold's statistics.
    """

    _programs: ClassVar[dict[tuple, _AdamProgram]] = {}
    _programs_lock: ClassVar[threading.Lock] = threading.Lock()
    _MAX_PROGRAMS: ClassVar[int] = 8

    @classmethod
    def get(cls, spec: HeadOptions, feature_dim: int, num_classes: int,
            learning_rate: float) -> _AdamProgram:
        key = (spec.hidden_units, spec.dropout, spec.l2, feature_dim, num_classes, learning_rate)
        with cls._programs_lock:
            if key not in cls._programs:
                if len(cls._programs) >= cls._MAX_PROGRAMS:
                    cls._programs.pop(next(iter(cls._programs)))
                cls._programs[key] = cls(spec, feature_dim, num_classes, learning_rate)
            return cls._programs[key]

    def __init__(self, spec: HeadOptions, feature_dim: int, num_classes: int,
                 learning_rate: float):
        self.spec, self.feature_dim, self.num_classes = spec, feature_dim, num_classes
        self.lock = threading.Lock()
        self.model = heads_lib.build_head(spec, feature_dim, num_classes)
        self.model.get_layer("head_standardize").set_weights(
            [np.zeros(feature_dim, np.float32), np.ones(feature_dim, np.float32),
             np.array(0, dtype="int64")])
        self.model.get_layer("head_standardize").finalize_state()
        self.optimizer = keras.optimizers.Adam(learning_rate)
        self.optimizer.build(self.model.trainable_variables)
        self._optimizer_start = [v.numpy() for v in self.optimizer.variables]
        self._seed_states = [layer.seed_generator.state for layer in self.model.layers
                             if getattr(layer, "seed_generator", None) is not None]
        self._initial: dict[int, list[np.ndarray]] = {}
        cross_entropy = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
        model, optimizer = self.model, self.optimizer
        signature = [tf.TensorSpec((None, feature_dim), tf.float32),
                     tf.TensorSpec((None,), tf.int32)]

        @tf.function(input_signature=signature)
        def train_step(x, y):
            with tf.GradientTape() as tape:
                probabilities = model(x, training=True)
                loss = cross_entropy(y, probabilities) / tf.cast(tf.shape(x)[0], tf.float32)
                total = loss + tf.add_n(model.losses) if model.losses else loss
            optimizer.apply(tape.gradient(total, model.trainable_weights),
                            model.trainable_weights)
            return _sums(y, probabilities, cross_entropy)

        @tf.function(input_signature=[signature[0]])
        def predict_step(x):
            return model(x, training=False)

        self.train_step, self.predict_step = train_step, predict_step

    def reset(self, seed: int) -> None:
        """Fresh weights as `build_head` draws them after `keras.utils.set_random_seed(seed)`,
        fresh optimizer state, and dropout masks drawn from `seed`."""
        if seed not in self._initial:
            keras.utils.set_random_seed(seed)
            fresh = heads_lib.build_head(self.spec, self.feature_dim, self.num_classes)
            self._initial = {seed: fresh.get_weights()}  # one seed at a time is enough
        initial = self._initial[seed]
        self.model.set_weights([np.zeros(self.feature_dim, np.float32),
                                np.ones(self.feature_dim, np.float32),
                                np.array(0, dtype="int64"), *initial[3:]])
        for variable, value in zip(self.optimizer.variables, self._optimizer_start):
            variable.assign(value)
        for index, state in enumerate(self._seed_states):
            state.assign(keras.random.SeedGenerator(seed + index).state.value)


def _sums(labels: tf.Tensor, probabilities: tf.Tensor, cross_entropy) -> tuple[tf.Tensor, tf.Tensor]:
    """Summed cross-entropy (without the L2 penalty) and the number of correct predictions."""
    predicted = tf.argmax(probabilities, axis=1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float32))
    return cross_entropy(labels, probabilities), correct

