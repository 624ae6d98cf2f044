"""Negative log-likelihoods of real-valued and count targets: the Gaussian (whose fixed-variance
case is the squared error) and the Poisson. Elementwise, plain JAX."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent._information import _xlogy
from jxent._sigmoid import elementwise_finish as _elementwise_finish
from jxent._sigmoid import elementwise_where as _elementwise_where

Array = jax.Array

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _nonnegative_number(value, name: str) -> float:
  x = _checks.static_number(value, name)
  if not x >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}.")
  return x


@jax.custom_jvp
def _times(k: Array, x: Array) -> Array:
  """``k * x`` with 0 where ``k == 0`` (also at ``x = -inf``: a zero count at a zero rate);
  NaN stays NaN. Slopes: ``x`` in ``k``, ``k`` in ``x``."""
  return jnp.where((k == 0) & ~jnp.isnan(x), 0, k * x)


def _times_jvp(primals, tangents):
  k, x = primals
  dk, dx = tangents
  out = _times(k, x)
  terms = []
  if _checks.nonzero_tangent(dk):  # (a zero tangent adds nothing, not 0 * -inf)
    terms.append(x * dk)
  if _checks.nonzero_tangent(dx):
    terms.append(k * dx)
  if not terms:
    return out, jnp.zeros_like(out)
  return out, jnp.broadcast_to(sum(terms[1:], terms[0]), out.shape).astype(out.dtype)


_times.defjvp(_times_jvp, symbolic_zeros=True)


def gaussian_nll_loss(
    predictions: ArrayLike, targets: ArrayLike, variances: ArrayLike, *, full: bool = False,
    eps: float = 0.0, beta: float = 0.0, where: ArrayLike | None = None,
    reduction: str = "mean",
) -> Array:
  r"""Negative log-likelihood of ``targets`` under :math:`\mathcal N(\mu, \sigma^2)`:

  .. math:: \ell = \tfrac12 \Bigl(\log \sigma^2 + \frac{(y - \mu)^2}{\sigma^2}\Bigr)
            \;\bigl[+ \tfrac12 \log 2\pi \text{ with } ``full``\bigr],

  a network's predicted mean and variance for regression with uncertainty (PyTorch's
  ``gaussian_nll_loss``). At a fixed :math:`\sigma^2 = 1` it is half the squared error plus
  a constant: :func:`mean_squared_error` is this likelihood's loss. Slopes:
  :math:`(\mu - y)/\sigma^2` in the mean, :math:`\tfrac12(1/\sigma^2 - (y-\mu)^2/\sigma^4)`
  in the variance.

  Args:
    predictions: the means :math:`\mu`, floating point, any shape.
    targets: :math:`y`, the same shape.
    variances: :math:`\sigma^2 \ge 0`, broadcastable to ``predictions`` (one per entry, or
      e.g. ``[..., 1]`` for one per row: PyTorch's ``[...]`` for inputs ``[..., D]`` is
      ``variances[..., None]`` here).
    full: add the constant :math:`\tfrac12 \log 2\pi` (the exact negative log-density).
    eps: ``0`` (default: the exact value) or PyTorch's clamp: the variance is taken as
      :math:`\max(\sigma^2, \varepsilon)` in the value, its derivative passed through as if
      unclamped (PyTorch clamps without autograd; its default is ``1e-6``).
    beta: :math:`\beta \ge 0` of the β-NLL (Seitzer et al., 2022): each entry's loss times
      :math:`\mathrm{sg}(\sigma^2)^\beta`, held constant, so that the mean's slope is
      :math:`(\mu - y)/\sigma^{2(1-\beta)}` (``0``: the plain likelihood; ``1``: the mean
      learns as under the squared error).
    where: boolean mask broadcastable to ``predictions``: dropped entries give 0, no gradient.
    reduction: ``"mean"`` (default, over kept entries, as PyTorch), ``"sum"`` or ``"none"``.

  Returns:
    float32 (float64 for float64 inputs; 16-bit inputs computed in float32). At
    :math:`\sigma^2 = 0` (``eps = 0``) the density is degenerate: :math:`+\infty` where
    :math:`y \ne \mu`, :math:`-\infty` where :math:`y = \mu`, both with NaN derivatives. A
    negative variance or a NaN gives NaN (``jxent.checked`` reports negative variances).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> mu, y = jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0])
  >>> jxent.gaussian_nll_loss(mu, y, jnp.ones(2), reduction="none")  # (y - mu)^2 / 2
  Array([0.5, 0. ], dtype=float32)
  >>> loss = jxent.gaussian_nll_loss(mu, y, jnp.array([4.0, 0.25]), reduction="none")
  >>> [round(v, 4) for v in loss.tolist()]  # (log 4 + 1/4) / 2, log(1/4) / 2
  [0.8181, -0.6931]
  """
  _checks.reduction(reduction)
  mu = _checks.upcast(_checks.floating(predictions, "predictions"))
  y = _checks.upcast(_checks.floating(targets, "targets"))
  var = _checks.upcast(_checks.floating(variances, "variances"))
  _checks.same_shape(mu, y, "predictions", "targets")
  full = _checks.static_bool(full, "full")
  eps = _nonnegative_number(eps, "eps")
  beta = _nonnegative_number(beta, "beta")
  dtype = jnp.result_type(mu, y, var)
  mu, y = mu.astype(dtype), y.astype(dtype)
  try:
    var = jnp.broadcast_to(var.astype(dtype), mu.shape)
  except ValueError as e:
    raise ValueError(f"variances.shape={var.shape} does not broadcast to predictions' shape "
                     f"{mu.shape}; for one variance per row of [..., D] pass "
                     "variances[..., None].") from e
  _checks.value_check(jnp.all(~(var < 0)), "variances has negative entries.")
  keep = _elementwise_where(where, mu.shape)
  if keep is not None:  # dropped entries: value and gradient 0 whatever they hold
    mu, y, var = jnp.where(keep, mu, 0), jnp.where(keep, y, 0), jnp.where(keep, var, 1)
  negative = var < 0
  if eps > 0:  # the value at max(var, eps), the slope as if unclamped (PyTorch's no_grad clamp)
    var = var + jax.lax.stop_gradient(jnp.maximum(var, eps) - var)
  r2 = (y - mu) ** 2
  # At var = 0 the unchosen branch's slopes (0 * inf) make the derivatives NaN there, as they
  # should be: the loss is infinite.
  losses = 0.5 * (jnp.log(var) + r2 / var)
  losses = jnp.where(var == 0, jnp.where(r2 > 0, jnp.inf, -jnp.inf), losses)
  if full:
    losses = losses + _HALF_LOG_2PI
  if beta:
    losses = jnp.where(var > 0, losses * jax.lax.stop_gradient(var) ** beta, losses)
  losses = jnp.where(negative, jnp.nan, losses)
  return _elementwise_finish(losses, keep, reduction)


def poisson_nll_loss(
    inputs: ArrayLike, targets: ArrayLike, *, log_input: bool = True, full: bool = False,
    eps: float = 0.0, where: ArrayLike | None = None, reduction: str = "mean",
) -> Array:
  r"""Negative log-likelihood of counts ``targets`` :math:`k` under a Poisson of rate
  :math:`\lambda`:

  .. math:: \ell = \lambda - k \log \lambda \;\bigl[+ \log k! \text{ with } ``full``\bigr],

  from log-rates by default (:math:`\lambda = e^{\,\text{inputs}}`: log space, no clipping;
  the slope is :math:`\lambda - k`), or from rates with ``log_input=False`` (PyTorch's
  ``poisson_nll_loss``). Targets need not be integers (a quasi-likelihood for rates and
  averages); ``full`` adds :math:`\log\Gamma(k + 1)`.

  Args:
    inputs: log-rates (``log_input=True``) or rates :math:`\lambda \ge 0`, floating point.
    targets: :math:`k \ge 0`, the same shape.
    log_input: whether ``inputs`` are log-rates.
    full: add :math:`\log k! = \log\Gamma(k+1)` exactly (the true negative log-probability;
      PyTorch adds Stirling's approximation for :math:`k > 1`, :math:`0.041` less at
      :math:`k = 2`, :math:`\approx 1/(12k)` less in general).
    eps: with rates, :math:`\log(\lambda + \varepsilon)` (PyTorch's default ``1e-8``); ``0``
      (default) is exact. Unused with log-rates.
    where: boolean mask broadcastable to ``inputs``: dropped entries give 0, no gradient.
    reduction: ``"mean"`` (default, over kept entries, as PyTorch), ``"sum"`` or ``"none"``.

  Returns:
    float32 (float64 for float64 inputs; 16-bit inputs computed in float32). A zero count
    costs :math:`\lambda` (0 at :math:`\lambda = 0`, log-rate :math:`-\infty`, with slope
    0); a positive count at rate 0 costs :math:`+\infty`. A negative count or rate, or a
    NaN, gives NaN (``jxent.checked`` reports negative counts and rates).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> k = jnp.array([0.0, 2.0, 5.0])
  >>> loss = jxent.poisson_nll_loss(jnp.log(jnp.array([1.0, 2.0, 5.0])), k, full=True,
  ...                               reduction="none")
  >>> [round(v, 4) for v in loss.tolist()]  # -log P(k | rate): 1, 2 - log 2, ...
  [1.0, 1.3069, 1.7403]
  """
  _checks.reduction(reduction)
  x = _checks.upcast(_checks.floating(inputs, "inputs"))
  k = _checks.upcast(_checks.floating(targets, "targets"))
  _checks.same_shape(x, k, "inputs", "targets")
  log_input = _checks.static_bool(log_input, "log_input")
  full = _checks.static_bool(full, "full")
  eps = _nonnegative_number(eps, "eps")
  dtype = jnp.result_type(x, k)
  x, k = x.astype(dtype), k.astype(dtype)
  _checks.value_check(jnp.all(~(k < 0)), "targets has negative entries (counts are >= 0).")
  if not log_input:
    _checks.value_check(jnp.all(~(x < 0)), "inputs has negative rates.")
  keep = _elementwise_where(where, x.shape)
  if keep is not None:  # dropped entries: value and gradient 0 whatever they hold
    x, k = jnp.where(keep, x, 0), jnp.where(keep, k, 0)
  if log_input:
    losses = jnp.exp(x) - _times(k, x)
    bad = k < 0
  else:
    losses = x - _xlogy(k, x + eps)
    bad = (k < 0) | (x < 0)
  if full:
    losses = losses + jax.scipy.special.gammaln(jnp.where(bad, 0, k) + 1)
  return _elementwise_finish(jnp.where(bad, jnp.nan, losses), keep, reduction)
