"""Classifier heads: the small trainable part on top of the frozen backbone's features.

A head is standardisation (statistics of the training features, not trained) → dropout →
optional hidden ReLU layer → dense softmax, with L2 on the dense kernels. Only its weights are
stored; the architecture is rebuilt from its `HeadSpec` (`models.options.HeadOptions`), so no
user-supplied model file is ever deserialised. A linear head solved exactly
(`models.logistic`) is the same Keras model with its weights set, so serving never knows how a
head was trained.
"""

from __future__ import annotations

import io

import keras
import numpy as np

from models.logistic import LogisticFit, Standardizer
from models.options import AUTO_HEADS, HeadOptions

#: The architecture and regularisation of one head (declared once, in models/options.py).
HeadSpec = HeadOptions
#: The candidates of head "auto" (see `models.options.AUTO_HEADS`).
AUTO_CANDIDATES = AUTO_HEADS


def build_head(spec: HeadSpec, feature_dim: int, num_classes: int) -> keras.Model:
    """Builds an untrained head.

    Args:
        spec: architecture and regularisation.
        feature_dim: length of a backbone feature vector.
        num_classes: number of labels (≥ 2).

    Returns:
        A Keras model mapping float32 (batch, feature_dim) to softmax probabilities
        (batch, num_classes). Its first layer, "head_standardize", must be adapted (or have
        weights set) before use.
    """
    if num_classes < 2:
        raise ValueError(f"A head needs at least 2 classes. Received: num_classes={num_classes}")
    regularizer = keras.regularizers.L2(spec.l2) if spec.l2 else None
    inputs = keras.Input((feature_dim,), name="features")
    x = keras.layers.Normalization(axis=-1, name="head_standardize")(inputs)
    x = keras.layers.Dropout(spec.dropout, name="head_dropout")(x)
    if spec.hidden_units:
        x = keras.layers.Dense(spec.hidden_units, activation="relu",
                               kernel_regularizer=regularizer, name="head_hidden")(x)
        x = keras.layers.Dropout(spec.dropout, name="head_hidden_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax",
                                 kernel_regularizer=regularizer, name="head_softmax")(x)
    return keras.Model(inputs, outputs, name="head")


def linear_head(standardizer: Standardizer, solution: LogisticFit, spec: HeadSpec) -> keras.Model:
    """The Keras head of a logistic regression solved on standardised features.

    Args:
        standardizer: the training features' statistics, float64 (feature_dim,) each.
        solution: kernel float64 (feature_dim, num_classes) and bias (num_classes,).
        spec: a linear head's spec (hidden_units 0).

    Returns:
        A head mapping float32 (batch, feature_dim) features to the solution's probabilities.
    """
    if spec.hidden_units:
        raise ValueError(f"A logistic regression is a linear head. Received: {spec}")
    feature_dim, num_classes = solution.kernel.shape
    model = build_head(spec, feature_dim, num_classes)
    model.get_layer("head_standardize").set_weights([
        standardizer.mean.astype(np.float32), standardizer.variance.astype(np.float32),
        np.array(0, dtype="int64")])
    model.get_layer("head_standardize").finalize_state()
    model.get_layer("head_softmax").set_weights([solution.kernel.astype(np.float32),
                                                 solution.bias.astype(np.float32)])
    return model


def trainable_parameters(model: keras.Model) -> int:
    """d: the number of trainable parameters of a head."""
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def serialize_weights(model: keras.Model, extra: dict[str, np.ndarray] | None = None) -> bytes:
    """All weights of a head (trainable and statistics) as an .npz, without pickles.

    Args:
        extra: more named arrays for the same file (the classifier's `trust.*` data, a
            fine-tuned classifier's `blocks.*`); their names must not start with "arr_".
    """
    extra = dict(extra or {})
    if any(name.startswith("arr_") for name in extra):
        raise ValueError(f"arr_* names are the head's own. Received: {sorted(extra)}")
    buffer = io.BytesIO()
    np.savez(buffer, *model.get_weights(), **extra)
    return buffer.getvalue()


def stored_arrays(data: bytes, prefix: str) -> dict[str, np.ndarray]:
    """The named arrays of a head file whose names start with `prefix` (e.g. "trust.");
    empty for a file written before they existed."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files if name.startswith(prefix)}


def load_head(spec: HeadSpec, feature_dim: int, num_classes: int, data: bytes) -> keras.Model:
    """Rebuilds a head from its spec and restores weights saved by `serialize_weights`
    (the file's other named arrays are left to their readers)."""
    model = build_head(spec, feature_dim, num_classes)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        count = sum(name.startswith("arr_") for name in archive.files)
        model.set_weights([archive[f"arr_{i}"] for i in range(count)])
    # NB: Normalization reads its statistics into constants only in finalize_state().
    model.get_layer("head_standardize").finalize_state()
    return model
