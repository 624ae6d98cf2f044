"""Trace-time argument checks and checkify value checks shared by jxent.

Everything here runs on shapes and dtypes only, so it raises at trace time, also
under ``jax.jit``. Value checks that need the data (probabilities summing to
one, labels in range) go through :func:`jax.experimental.checkify.debug_check`:
they cost nothing unless the caller wraps the function in
``checkify.checkify(f, errors=checkify.user_checks)``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

REDUCTIONS = ("none", "sum", "mean")


def floating(x: Any, name: str) -> jax.Array:
  """Returns ``x`` as an array, raising TypeError unless it is floating point.

  bfloat16 and float16 inputs are promoted to float32, so every sum and log
  accumulates in at least float32.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be a floating-point array, got dtype {x.dtype} with shape {x.shape}."
    )
  return upcast(x)


def upcast(x: jax.Array) -> jax.Array:
  """Promotes 16-bit floats to float32; leaves float32/float64 alone."""
  if jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  return x


def integer(x: Any, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(
        f"{name} must be an integer array of class ids, got dtype {x.dtype} with shape "
        f"{x.shape}; for one-hot or soft labels use softmax_cross_entropy."
    )
  return x


def same_shape(a: jax.Array, b: jax.Array, name_a: str, name_b: str) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"{name_a} and {name_b} must have the same shape, got {name_a}.shape={a.shape} and "
        f"{name_b}.shape={b.shape}."
    )


def canonical_axis(axis: int, ndim: int, name: str = "x") -> int:
  if not isinstance(axis, (int, np.integer)):
    raise TypeError(f"axis must be an int, got {axis!r}.")
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis={axis} is out of range for {name} with ndim={ndim}.")
  return int(axis) % ndim


def reduction(value: str) -> str:
  if value not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}.")
  return value


def log_base(base: Any) -> float | None:
  """Returns log(base) for converting nats, or None for nats themselves."""
  if base is None:
    return None
  try:
    b = float(base)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"base must be a Python number or None, got {base!r}.") from e
  if not (b > 0 and b != 1 and math.isfinite(b)):
    raise ValueError(f"base must be a positive finite number other than 1, got {base!r}.")
  return math.log(b)


def in_nats_to_base(x: jax.Array, base: Any) -> jax.Array:
  lb = log_base(base)
  return x if lb is None else x / lb


def concrete_scalar(value: Any, name: str, lo: float, hi: float) -> None:
  """Range-checks a Python/concrete scalar; traced values are left to the caller."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if not lo <= v <= hi:
    raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value!r}.")


def check_probabilities(p: jax.Array, axis: int | None, name: str) -> None:
  """checkify.debug_check that ``p`` is non-negative and sums to one along ``axis``."""
  checkify.debug_check(jnp.all(p >= 0), f"{name} has negative entries.")
  if axis is not None:
    tol = 1e-3 if p.dtype == jnp.float32 else 1e-6
    total = jnp.sum(p, axis=axis)
    checkify.debug_check(
        jnp.all(jnp.abs(total - 1) <= tol * p.shape[axis]),
        f"{name} does not sum to one along axis {axis}.",
    )


def check_unit_interval(p: jax.Array, name: str) -> None:
  checkify.debug_check(jnp.all((p >= 0) & (p <= 1)), f"{name} has entries outside [0, 1].")


def reduce(
    losses: jax.Array, how: str, denominator: jax.Array | None = None
) -> jax.Array:
  """Applies a reduction; ``denominator`` overrides the count for "mean".

  A mean over nothing (denominator 0) is 0, not NaN.
  """
  if how == "none":
    return losses
  total = jnp.sum(losses)
  if how == "sum":
    return total
  if denominator is None:
    return total / max(losses.size, 1)
  return total / jnp.where(denominator == 0, 1, denominator).astype(total.dtype)
