"""Losses on probabilities (the textbook forms) and mean squared error: plain JAX, so every
transformation applies as it does to any JAX code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent._information import _invalid_rows, _xlogy
from jxent._sigmoid import elementwise_finish as _elementwise_finish
from jxent._sigmoid import elementwise_where as _elementwise_where

Array = jax.Array


def categorical_cross_entropy(
    probs: ArrayLike, labels: ArrayLike, *, axis: int = -1, where: ArrayLike | None = None,
    reduction: str = "none",
) -> Array:
  r"""The textbook single-label loss on probabilities: :math:`-\sum_c y_c \log \hat y_c`.

  For training from logits prefer :func:`softmax_cross_entropy` (log space,
  exact gradient). Terms with :math:`y_c = 0` contribute nothing (also when
  :math:`\hat y_c = 0`); :math:`y_c > 0` with :math:`\hat y_c = 0` gives ``+inf``.

  Args:
    probs: predicted probabilities ``[..., C, ...]``.
    labels: target probabilities, same shape.
    axis: the class axis.
    where: per-example mask (``probs.ndim - 1``) or class mask (``probs``' shape).
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over kept examples).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> jxent.categorical_cross_entropy(jnp.array([0.3, 0.6, 0.1]), jnp.array([0., 1., 0.]))
  ... # doctest: +ELLIPSIS
  Array(0.5108..., dtype=float32)
  """
  _checks.reduction(reduction)
  probs = _checks.floating(probs, "probs")
  labels = _checks.floating(labels, "labels")
  _checks.same_shape(probs, labels, "probs", "labels")
  axis = _checks.canonical_axis(axis, probs.ndim, "probs")
  _checks.check_probabilities(probs, axis, "probs")
  bad = _invalid_rows(probs, axis) | _invalid_rows(labels, axis)
  batch_shape = probs.shape[:axis] + probs.shape[axis + 1 :]
  keep = None
  if where is not None:
    where = _checks.as_array(where, "where")
    if where.ndim == probs.ndim:
      cmask = jnp.broadcast_to(where, probs.shape)
      # Masked classes leave the sum (their inputs, NaN included, cannot reach the result).
      probs, labels = jnp.where(cmask, probs, 1), jnp.where(cmask, labels, 0)
    else:
      keep = _elementwise_where(where, batch_shape)
      # Dropped examples: value and gradient 0 whatever they hold.
      kb = jnp.expand_dims(keep, axis)
      probs, labels = jnp.where(kb, probs, 1), jnp.where(kb, labels, 0)
      bad = bad & keep
  losses = jnp.where(bad, jnp.nan, -jnp.sum(_xlogy(labels, probs), axis=axis))
  return _elementwise_finish(losses, keep, reduction)


def binary_cross_entropy(probs: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None,
                         reduction: str = "none") -> Array:
  r"""Elementwise binary cross-entropy on probabilities: :math:`-y\log\hat y-(1-y)\log(1-\hat y)`.

  The multi-label textbook formula; for training prefer
  :func:`sigmoid_binary_cross_entropy` on logits. PyTorch clamps the logs at
  -100; jxent returns the true value, ``+inf`` where :math:`\hat y` is 0 or 1
  against a target that disagrees, and 0 for the terms whose weight is 0. The slope in the
  labels is :math:`\log((1-\hat y)/\hat y)` for :math:`0 < \hat y < 1`, hard labels
  included; in :math:`\hat y` it is :math:`(1-y)/(1-\hat y) - y/\hat y` with the term of
  a zero weight left out (so 1 at :math:`\hat y = y = 0`).

  Args:
    probs: predicted probabilities in [0, 1], any shape.
    labels: targets in [0, 1], same shape.
    where: boolean mask broadcastable to ``probs``.
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over kept entries).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.binary_cross_entropy(jnp.array([0.1, 0.7, 0.8]), jnp.array([0., 1., 1.]),
  ...                                  reduction="sum"))  # doctest: +ELLIPSIS
  0.685...
  """
  _checks.reduction(reduction)
  probs = _checks.floating(probs, "probs")
  labels = _checks.floating(labels, "labels")
  _checks.same_shape(probs, labels, "probs", "labels")
  _checks.check_unit_interval(probs, "probs")
  keep = _elementwise_where(where, probs.shape)
  if keep is not None:  # dropped entries: value and gradient 0 whatever they hold
    probs, labels = jnp.where(keep, probs, 0.5), jnp.where(keep, labels, 0.5)
  bad = _invalid_rows(probs, None) | _invalid_rows(labels, None)
  losses = -(_xlogy(labels, probs) + _xlogy(1 - labels, 1 - probs))
  return _elementwise_finish(jnp.where(bad, jnp.nan, losses), keep, reduction)


def mean_squared_error(predictions: ArrayLike, targets: ArrayLike, *,
                       where: ArrayLike | None = None, reduction: str = "mean") -> Array:
  r"""Squared error :math:`(\hat y - y)^2`, averaged by default.

  ``reduction="mean"`` gives :math:`\frac1m\sum (y-\hat y)^2`; the
  :math:`\frac{1}{2m}\sum` convention of many textbooks is
  ``0.5 * mean_squared_error(...)``, whose gradient is :math:`\hat y - y`.

  Args:
    predictions: floating point, any shape.
    targets: same shape.
    where: boolean mask broadcastable to ``predictions``.
    reduction: ``"mean"`` (default, over kept entries), ``"sum"`` or ``"none"``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.mean_squared_error(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])))
  2.5
  """
  _checks.reduction(reduction)
  predictions = _checks.floating(predictions, "predictions")
  targets = _checks.floating(targets, "targets")
  _checks.same_shape(predictions, targets, "predictions", "targets")
  keep = _elementwise_where(where, predictions.shape)
  if keep is not None:  # dropped entries: value and gradient 0 whatever they hold
    predictions, targets = jnp.where(keep, predictions, 0), jnp.where(keep, targets, 0)
  return _elementwise_finish((predictions - targets) ** 2, keep, reduction)
