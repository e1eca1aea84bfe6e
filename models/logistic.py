"""Multinomial logistic regression with an L2 penalty, solved exactly by L-BFGS (numpy only).

This is the linear head's training when it has no dropout: the objective is convex, so the
solution does not depend on a learning rate, a batch size or an epoch count, and a fit on
cached features takes well under a second. It minimises the same objective Keras does for
`heads.build_head(HeadOptions(hidden_units=0, l2=λ))`:

    mean over examples of cross-entropy(softmax(z W + b), y)  +  λ · ‖W‖²

on standardised features z (the bias is not penalised). In scikit-learn's terms,
C = 1 / (2 λ n) for n training rows.

NB: L-BFGS iterations are full passes over the training rows, so the history reports one row
per iteration as its "epoch".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

#: Iterations before the solver gives up (it has always converged far earlier on cached
#: features: 20-300 iterations).
MAX_ITERATIONS = 1000
#: Converged when the largest gradient component is below this.
GRADIENT_TOLERANCE = 1e-5
#: Keras's Normalization divides by max(std, epsilon): the same here, so weights transfer.
EPSILON = 1e-7
_MEMORY = 10  # L-BFGS correction pairs kept


@dataclass
class Standardizer:
    """Per-feature z-scoring with training statistics, as the head's Normalization layer does.

    Attributes:
        mean, variance: float64 (feature_dim,).
    """

    mean: np.ndarray
    variance: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        """Statistics of float32 (n, feature_dim) features, accumulated in float64 (without a
        float64 copy of the features)."""
        return cls(x.mean(axis=0, dtype=np.float64), x.var(axis=0, dtype=np.float64))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float (n, feature_dim) → float32 (n, feature_dim) z-scores (one float32 copy)."""
        scale = np.maximum(np.sqrt(self.variance), EPSILON).astype(np.float32)
        z = np.asarray(x, np.float32) - self.mean.astype(np.float32)
        z /= scale
        return z


@dataclass
class LogisticFit:
    """A solved logistic regression on standardised features.

    Attributes:
        kernel: float64 (feature_dim, num_classes); bias: float64 (num_classes,).
        iterations: L-BFGS iterations run; converged: the gradient tolerance was met.
        history: one row per iteration: epoch, loss, accuracy (training rows, penalty left out),
            and val_loss, val_accuracy when validation rows were given.
    """

    kernel: np.ndarray
    bias: np.ndarray
    iterations: int
    converged: bool
    history: list[dict] = field(default_factory=list)

    def probabilities(self, z: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float64 (n, num_classes), of standardised features z."""
        return softmax(_logits(z, self.kernel, self.bias))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of float (n, k) logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class Rows(Protocol):
    """Standardised training rows z, float (n, feature_dim), and the two products L-BFGS needs.

    Each iteration's cost is these two products; `fitting` supplies TensorFlow-backed rows
    (its thread pool, or the GPU), the default is numpy.
    """

    shape: tuple[int, int]

    def times(self, kernel: np.ndarray) -> np.ndarray:
        """z @ kernel: float64 (feature_dim, k) → float64 (n, k)."""

    def transposed_times(self, residual: np.ndarray) -> np.ndarray:
        """zᵀ @ residual: float64 (n, k) → float64 (feature_dim, k)."""


class NumpyRows:
    """`Rows` held as a float32 numpy array (the features' precision, half of float64's memory).

    NB: on a machine whose cores are busy, OpenBLAS's threads spin and each product can take
    several times longer than TensorFlow's; `fitting` uses `TensorRows` for that reason.
    """

    def __init__(self, z: np.ndarray):
        self.z = np.asarray(z, np.float32)
        self.shape = self.z.shape

    def times(self, kernel: np.ndarray) -> np.ndarray:
        return (self.z @ kernel.astype(np.float32)).astype(np.float64)

    def transposed_times(self, residual: np.ndarray) -> np.ndarray:
        return (self.z.T @ residual.astype(np.float32)).astype(np.float64)


def _logits(z: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (np.asarray(z, np.float32) @ kernel.astype(np.float32)).astype(np.float64) + bias


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # NB: not `a @ b`: a BLAS call per tiny dot product spins up OpenBLAS's threads, and on a
    # busy machine (TensorFlow beside it) each call then took ~10 ms instead of microseconds.
    return float(np.sum(a * b))


def _cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def fit_logistic(z: np.ndarray | Rows, labels: np.ndarray, num_classes: int, l2: float, *,
                 z_val: np.ndarray | None = None, labels_val: np.ndarray | None = None,
                 weights: np.ndarray | None = None,
                 init: LogisticFit | None = None, max_iterations: int = MAX_ITERATIONS,
                 tolerance: float = GRADIENT_TOLERANCE,
                 on_iteration: Callable[[dict], None] = lambda row: None,
                 should_stop: Callable[[], bool] = lambda: False) -> LogisticFit:
    """Minimises mean cross-entropy + l2 · ‖kernel‖² by L-BFGS with a backtracking line search.

    Args:
        z: float (n, feature_dim) standardised training features, or `Rows` holding them;
            labels: int (n,) in [0, num_classes).
        num_classes: outputs of the softmax (≥ 2).
        l2: penalty strength λ (> 0 keeps the problem strongly convex; 0 is allowed but may
            not converge on separable data).
        z_val, labels_val: optional validation rows, scored into the history each iteration.
        weights: optional float (n,) row weights (the mean cross-entropy becomes their
            weighted mean).
        init: a previous solution to start from (warm start along a path of l2 values).
        on_iteration: called with each history row.
        should_stop: polled every iteration; True ends the fit early (the caller raises).

    Returns:
        The solution, its iteration count and its history.
    """
    rows = z if hasattr(z, "transposed_times") else NumpyRows(z)
    labels = np.asarray(labels, int)
    n, dim = rows.shape
    onehot = np.zeros((n, num_classes))
    onehot[np.arange(n), labels] = 1.0
    shape = (dim + 1, num_classes)  # kernel rows, then the bias row
    row_weights = (np.full(n, 1.0 / n) if weights is None
                   else np.asarray(weights, np.float64) / np.sum(weights))

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        matrix = theta.reshape(shape)
        return matrix[:dim], matrix[dim]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        kernel, bias = unpack(theta)
        probabilities = softmax(rows.times(kernel) + bias)
        picked = probabilities[np.arange(n), labels]
        loss = float(-(row_weights * np.log(np.clip(picked, 1e-300, 1.0))).sum()) + \
            l2 * float(np.sum(kernel ** 2))
        residual = (probabilities - onehot) * row_weights[:, None]
        gradient = np.vstack([rows.transposed_times(residual) + 2 * l2 * kernel,
                              residual.sum(axis=0)])
        return loss, gradient.reshape(-1), probabilities

    theta = (np.vstack([init.kernel, init.bias]).reshape(-1).copy() if init is not None
             else np.zeros(shape[0] * shape[1]))
    value, gradient, probabilities = objective(theta)
    history: list[dict] = []
    s_list: list[np.ndarray] = []
    y_list: list[np.ndarray] = []
    converged = bool(np.abs(gradient).max() < tolerance)
    iteration = 0
    while not converged and iteration < max_iterations and not should_stop():
        direction = -_two_loop(gradient, s_list, y_list)
        slope = _dot(gradient, direction)
        if slope >= 0:  # not a descent direction (rounding): restart from steepest descent
            s_list.clear(), y_list.clear()
            direction, slope = -gradient, -_dot(gradient, gradient)
        step = 1.0 if s_list else min(1.0, 1.0 / max(np.abs(gradient).sum(), 1e-12))
        while True:
            candidate = theta + step * direction
            new_value, new_gradient, new_probabilities = objective(candidate)
            if new_value <= value + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = candidate - theta, new_gradient - gradient
        if _dot(s, y) > 1e-12:  # keeps the inverse-Hessian estimate positive definite
            s_list.append(s), y_list.append(y)
            if len(s_list) > _MEMORY:
                s_list.pop(0), y_list.pop(0)
        decrease = value - new_value
        theta, value, gradient, probabilities = candidate, new_value, new_gradient, new_probabilities
        iteration += 1
        row = {"epoch": iteration, "loss": _cross_entropy(probabilities, labels),
               "accuracy": float((probabilities.argmax(axis=1) == labels).mean())}
        if z_val is not None and len(z_val):
            kernel, bias = unpack(theta)
            val_probabilities = softmax(_logits(z_val, kernel, bias))
            row["val_loss"] = _cross_entropy(val_probabilities, labels_val)
            row["val_accuracy"] = float((val_probabilities.argmax(axis=1) == labels_val).mean())
        history.append(row)
        on_iteration(row)
        converged = bool(np.abs(gradient).max() < tolerance) or \
            decrease <= 1e-12 * max(abs(value), 1.0)
    kernel, bias = unpack(theta)
    return LogisticFit(kernel.copy(), bias.copy(), iteration, converged, history)


def _two_loop(gradient: np.ndarray, s_list: list[np.ndarray],
              y_list: list[np.ndarray]) -> np.ndarray:
    """The L-BFGS estimate of (inverse Hessian) · gradient."""
    q = gradient.copy()
    alphas = []
    for s, y in zip(reversed(s_list), reversed(y_list)):
        alpha = _dot(s, q) / _dot(y, s)
        alphas.append(alpha)
        q -= alpha * y
    if s_list:
        q *= _dot(s_list[-1], y_list[-1]) / _dot(y_list[-1], y_list[-1])
    for (s, y), alpha in zip(zip(s_list, y_list), reversed(alphas)):
        beta = _dot(y, q) / _dot(y, s)
        q += (alpha - beta) * s
    return q
