"""Trace-time argument checks and checkify value checks shared by jxent.

Everything here runs on shapes and dtypes only, so it raises at trace time, also
under ``jax.jit``. Value checks that need the data (probabilities summing to
one, labels in range) are ``checkify.check`` calls that jxent emits only while
tracing under :func:`value_checks` (or :func:`checked`): a function traced
without them carries no checkify effect, so it exports and serializes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.experimental import checkify

REDUCTIONS = ("none", "sum", "mean")


def as_array(x: Any, name: str) -> jax.Array:
  """``x`` as a JAX array (lists, tuples and NumPy arrays accepted), or a TypeError naming it."""
  if isinstance(x, jax.Array):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be an array (or a list or NumPy array of numbers), got "
                    f"{type(x).__name__}: {e}") from e


def floating(x: Any, name: str) -> jax.Array:
  """Returns ``x`` as an array, raising TypeError unless it is floating point.

  bfloat16 and float16 inputs are promoted to float32, so every sum and log
  accumulates in at least float32.
  """
  x = as_array(x, name)
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
  x = as_array(x, name)
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


def class_axis(x: jax.Array, axis: int, name: str) -> int:
  """The canonical class axis of ``x``; a ValueError for a scalar or an empty class axis."""
  if x.ndim == 0:
    raise ValueError(f"{name} must have at least one dimension (the classes), got a scalar.")
  axis = canonical_axis(axis, x.ndim, name)
  if x.shape[axis] == 0:
    raise ValueError(f"{name} has no classes: its class axis {axis} has size 0 "
                     f"({name}.shape={x.shape}).")
  return axis


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


_VALUE_CHECKS = contextvars.ContextVar("jxent_value_checks", default=False)


@contextlib.contextmanager
def _checks_on():
  token = _VALUE_CHECKS.set(True)
  try:
    yield
  finally:
    _VALUE_CHECKS.reset(token)


def value_checks(fn: Callable) -> Callable:
  """``fn`` with jxent's value checks switched on while it is traced.

  The checks are ``checkify.check`` calls (labels in range, probabilities in
  [0, 1] or summing to one), so the result must be functionalised by
  ``checkify.checkify(..., errors=checkify.user_checks)``; :func:`checked` does
  both. Without this wrapper jxent emits no check at all (no cost, no effect).
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with _checks_on():
      return fn(*args, **kwargs)

  return wrapped


def checked(fn: Callable) -> Callable:
  """``checkify.checkify(value_checks(fn), errors=checkify.user_checks)``.

  Returns a function giving ``(error, result)``; ``error.throw()`` raises the
  first failed check, whose message names the argument.

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import jxent
  >>> from jax.experimental import checkify
  >>> f = jxent.checked(jxent.softmax_cross_entropy_with_integer_labels)
  >>> err, _ = jax.jit(f)(jnp.zeros((2, 3)), jnp.array([0, 5]))
  >>> print(err.get())  # doctest: +ELLIPSIS
  labels out of range [0, 3) for some kept example...
  """
  return checkify.checkify(value_checks(fn), errors=checkify.user_checks)


def value_checks_on() -> bool:
  return _VALUE_CHECKS.get()


def value_check(pred: jax.Array, message: str) -> None:
  """A checkify check of ``pred``, emitted only under :func:`value_checks`."""
  if _VALUE_CHECKS.get():
    checkify.check(pred, message)


def check_logits(z: jax.Array, valid: jax.Array | None, name: str) -> None:
  """Checks the ``[N, C]`` logits of kept examples: no NaN, and some logit above -inf."""
  if not _VALUE_CHECKS.get():
    return
  dropped = False if valid is None else ~valid
  value_check(jnp.all(~jnp.any(jnp.isnan(z), axis=-1) | dropped),
              f"{name} contain NaN in a kept example.")
  value_check(jnp.all(jnp.any(z > -jnp.inf, axis=-1) | dropped),
              f"{name} of a kept example are all -inf (no distribution).")


def check_probabilities(p: jax.Array, axis: int | None, name: str) -> None:
  """Checks that ``p`` is non-negative and sums to one along ``axis``."""
  if not _VALUE_CHECKS.get():
    return
  value_check(jnp.all(p >= 0), f"{name} has negative entries.")
  if axis is not None:
    tol = 1e-3 if p.dtype == jnp.float32 else 1e-6
    total = jnp.sum(p, axis=axis)
    value_check(
        jnp.all(jnp.abs(total - 1) <= tol * p.shape[axis]),
        f"{name} does not sum to one along axis {axis}.",
    )


def check_unit_interval(p: jax.Array, name: str) -> None:
  if _VALUE_CHECKS.get():
    value_check(jnp.all((p >= 0) & (p <= 1)), f"{name} has entries outside [0, 1].")


def static_number(value: Any, name: str) -> float:
  """A Python float from a static number, or a TypeError naming the argument."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(
        f"{name} must be a static Python number (it fixes the computation's structure), got "
        f"a traced value {value!r}; pass it outside jit or mark it static."
    ) from e


def static_bool(value: Any, name: str) -> bool:
  """A Python bool from a static flag, or a TypeError naming the argument."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  raise TypeError(f"{name} must be a Python bool (it fixes the outputs' structure), got "
                  f"{value!r}.")


def _coefficient(value: Any, name: str, hi: float, dtype) -> jax.Array | None:
  """None for a static 0; otherwise a scalar array in ``dtype`` (traced values accepted)."""
  if value is None:
    return None
  concrete_scalar(value, name, 0.0, hi)
  if isinstance(value, (int, float, np.integer, np.floating)) and value == 0:
    return None
  arr = jnp.asarray(value)
  if arr.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {arr.shape}.")
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise TypeError(f"{name} must be a real number, got dtype {arr.dtype}.")
  return arr.astype(dtype)


@dataclasses.dataclass(frozen=True)
class CEOptions:
  """The softmax cross-entropy options that enter the math, normalised once and shared by
  the dense, fused and sharded losses: ``label_smoothing`` and ``z_loss`` as scalars in the
  accumulation dtype (None when statically 0; traced values are kept and differentiable)."""

  label_smoothing: jax.Array | None
  z_loss: jax.Array | None

  @classmethod
  def make(cls, label_smoothing: Any, z_loss: Any, dtype) -> CEOptions:
    return cls(_coefficient(label_smoothing, "label_smoothing", 1.0, dtype),
               _coefficient(z_loss, "z_loss", float("inf"), dtype))


jax.tree_util.register_dataclass(CEOptions, data_fields=["label_smoothing", "z_loss"],
                                 meta_fields=[])


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
  return mean_of(total, losses.size if denominator is None else denominator)


def mean_of(total: jax.Array, count) -> jax.Array:
  """``total / count``, and 0 for a mean over nothing (count 0), not NaN."""
  if isinstance(count, int):
    return total / max(count, 1)
  return total / jnp.where(count == 0, 1, count).astype(total.dtype)


def options_doc(options: str) -> Callable:
  """A decorator that puts ``options`` (argument docs shared by several functions) where
  the docstring says ``<<options>>``: a docstring must be one literal, so it cannot be
  built with ``+``."""
  def deco(fn):
    fn.__doc__ = fn.__doc__.replace("<<options>>", options)
    return fn

  return deco


def nonzero_tangent(t) -> bool:
  """Whether a custom_jvp rule's tangent (``symbolic_zeros=True``) carries anything."""
  return t is not None and not isinstance(t, SymbolicZero)
