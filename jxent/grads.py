"""Closed-form gradients of the classification losses, for study.

Each function states a derivation as code; the test suite checks every one of
them against ``jax.grad`` of the corresponding jxent loss, and
``python -m jxent grads`` prints the measured agreement.

* Softmax cross-entropy, ``l = -sum_c y_c log softmax(z)_c`` with ``sum_c y_c = 1``:
  ``dl/dz = softmax(z) - y``.
* Sigmoid binary cross-entropy, ``l = -y log s - (1-y) log(1-s)``, ``s = sigmoid(z)``:
  ``dl/dz = s - y``; the ``s (1 - s)`` of ``ds/dz`` cancels against the
  ``1 / (s (1 - s))`` of the log.
* Squared error on a sigmoid, ``l = (s - y)^2 / 2``: ``dl/dz = (s - y) s (1 - s)``.
  Nothing cancels the ``s (1 - s)`` factor here, so when the sigmoid saturates on
  the wrong side (``s -> 0`` while ``y = 1``) the gradient vanishes although the
  error is maximal: why MSE learns slowly on a classifier.
* Hessian of softmax cross-entropy in ``z`` (one example): ``diag(p) - p p^T``,
  independent of ``y``, positive semi-definite: the loss is convex in the logits.

>>> import jax.numpy as jnp
>>> import numpy as np
>>> from jxent import grads
>>> g = grads.softmax_cross_entropy_grad(jnp.log(jnp.array([0.3, 0.6, 0.1])),
...                                     jnp.array([0., 1., 0.]))
>>> print(np.asarray(g).round(4))
[ 0.3 -0.4  0.1]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks

__all__ = [
    "sigmoid_binary_cross_entropy_grad",
    "sigmoid_mse_grad",
    "softmax_cross_entropy_grad",
    "softmax_cross_entropy_hessian",
]


def softmax_cross_entropy_grad(logits: ArrayLike, labels: ArrayLike, *,
                               axis: int = -1) -> jax.Array:
  """``softmax(logits) - labels``: the gradient of softmax CE with probability labels.

  Args:
    logits: ``[..., C, ...]``.
    labels: probabilities (one-hot or soft), same shape, summing to one along ``axis``.
    axis: the class axis.
  """
  logits = _checks.floating(logits, "logits")
  labels = _checks.floating(labels, "labels")
  _checks.same_shape(logits, labels, "logits", "labels")
  return jax.nn.softmax(logits, axis=axis) - labels


def sigmoid_binary_cross_entropy_grad(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
  """``sigmoid(logits) - labels``: the gradient of sigmoid BCE, elementwise."""
  logits = _checks.floating(logits, "logits")
  labels = _checks.floating(labels, "labels")
  _checks.same_shape(logits, labels, "logits", "labels")
  return jax.nn.sigmoid(logits) - labels


def sigmoid_mse_grad(logits: ArrayLike, targets: ArrayLike) -> jax.Array:
  """``(s - y) s (1 - s)`` with ``s = sigmoid(logits)``: the gradient of ``(s - y)^2 / 2``.

  The factor ``s (1 - s) = sigmoid'(z)`` is at most 1/4 and goes to 0 as ``|z|`` grows.
  """
  logits = _checks.floating(logits, "logits")
  targets = _checks.floating(targets, "targets")
  _checks.same_shape(logits, targets, "logits", "targets")
  s = jax.nn.sigmoid(logits)
  return (s - targets) * s * jax.nn.sigmoid(-logits)


def softmax_cross_entropy_hessian(logits: ArrayLike) -> jax.Array:
  """``diag(p) - p p^T`` with ``p = softmax(logits)``, for one example ``[C]``."""
  logits = _checks.floating(logits, "logits")
  if logits.ndim != 1:
    raise ValueError(
        f"softmax_cross_entropy_hessian takes one example's logits [C], got shape {logits.shape}."
    )
  p = jax.nn.softmax(logits)
  return jnp.diag(p) - jnp.outer(p, p)
