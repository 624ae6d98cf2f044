"""Sigmoid (binary, multi-label) cross-entropy and focal loss, elementwise.

``sigmoid_binary_cross_entropy`` is a ``jax.custom_jvp`` kernel with the hand-written rule

    d loss = ((1 - y) sigmoid(z) - pw y sigmoid(-z)) dz + (pw softplus(-z) - softplus(z)) dy
             + y softplus(-z) d pw,

``sigmoid(z) - y`` in the plain case, evaluated inside ``jax.checkpoint`` so that reverse mode
keeps only the inputs. Both the loss and its derivative are written as sums of non-negative
terms where they are tiny, so they keep their relative accuracy at saturated logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks, _cpu
from jxent import _reference as R
from jxent._platform import dispatch

Array = jax.Array


_nonzero = _checks.nonzero_tangent


def _sigmoids(z):
  """(sigmoid(z), sigmoid(-z)), each to full relative accuracy (XLA's logistic)."""
  return jax.nn.sigmoid(z), jax.nn.sigmoid(-z)


def _tangent(z, y, pw, dz, dy, dpw):
  # 16-bit inputs are converted behind a barrier, so that no compiler shares (and so
  # materialises) one float32 copy between the forward's sum and this pass.
  zf, yf = _checks.upcast(_cpu.unshared(z)), _checks.upcast(_cpu.unshared(y))
  dtype = jnp.result_type(zf, yf)
  terms = []
  if _nonzero(dz):
    s_pos, s_neg = _sigmoids(zf)
    neg = yf * s_neg if pw is None else pw * yf * s_neg
    g = (s_pos - yf * s_pos) - neg + R.label_poison(yf)  # NaN for a label outside [0, 1]
    terms.append(g * dz.astype(dtype))
  if _nonzero(dy):
    sp_neg = R.softplus(-zf)
    slope = (sp_neg if pw is None else pw * sp_neg) - R.softplus(zf)
    terms.append(slope * dy.astype(dtype))
  if _nonzero(dpw):
    terms.append(yf * R.softplus(-zf) * dpw)
  if not terms:
    return jnp.zeros(jnp.broadcast_shapes(zf.shape, yf.shape), dtype)
  return sum(terms[1:], terms[0])


def _elementwise(z, y, pw):
  return R.bce(_checks.upcast(z), _checks.upcast(y), pw)


@jax.custom_jvp
def bce(z, y, pw):
  """Elementwise sigmoid BCE (float32 for 16-bit inputs)."""
  return _elementwise(z, y, pw)


@jax.custom_jvp
def bce_total(z, y, pw, keep):
  """Sum of the elementwise BCE over the entries ``keep`` marks (all when None)."""
  ref = lambda: jnp.sum(_elementwise(z, y, pw), where=keep)
  fast = lambda: _cpu.bce_total(z, y, pw, keep)
  return dispatch(reference=ref, cpu=fast)


def _drop_zeros(tangents):
  return [t if _nonzero(t) else None for t in tangents]


def _bce_rule(primals, tangents):
  z, y, pw = primals
  dz, dy, dpw = _drop_zeros(tangents)
  return bce(z, y, pw), jax.checkpoint(_tangent)(z, y, pw, dz, dy, dpw)


def _masked_tangent(z, y, pw, keep, dz, dy, dpw):
  # Masked entries are replaced before the tangent is formed, so that their values (NaN, inf)
  # cannot reach the gradient: transposing a mask applied afterwards would give 0 * NaN.
  if keep is not None:
    z, y = jnp.where(keep, z, 0), jnp.where(keep, y, 0)
  t = _tangent(z, y, pw, dz, dy, dpw)
  return t if keep is None else jnp.where(keep, t, 0)


def _masked_tangent_sum(*args):
  return jnp.sum(_masked_tangent(*args))


def _bce_total_rule(primals, tangents):
  z, y, pw, keep = primals
  dz, dy, dpw, _ = _drop_zeros(tangents)
  # The sum is inside the checkpoint: reverse mode then passes the scalar cotangent into the
  # recomputation, not its [N, C] broadcast (which a checkpoint's barrier would write out).
  t = jax.checkpoint(_masked_tangent_sum)(z, y, pw, keep, dz, dy, dpw)
  return bce_total(z, y, pw, keep), t


bce.defjvp(_bce_rule, symbolic_zeros=True)
bce_total.defjvp(_bce_total_rule, symbolic_zeros=True)


# --------------------------------------------------------------------------- helpers


def elementwise_where(where, shape):
  if where is None:
    return None
  where = _checks.as_array(where, "where")
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
  try:
    return jnp.broadcast_to(where, shape)
  except ValueError as e:
    raise ValueError(f"where.shape={where.shape} does not broadcast to {shape}.") from e


def elementwise_finish(losses, where, reduction):
  if where is not None:
    losses = jnp.where(where, losses, 0)
  return _checks.reduce(losses, reduction, None if where is None else jnp.sum(where))


def logits_and_targets(logits, labels, name_l="logits", name_t="labels"):
  logits = _checks.as_array(logits, name_l)
  labels = _checks.as_array(labels, name_t)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name_l} must be floating point, got dtype {logits.dtype}.")
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    labels = labels.astype(jnp.result_type(logits.dtype, jnp.float32))
  _checks.same_shape(logits, labels, name_l, name_t)
  return logits, labels


# ----------------------------------------------------------------------------- public


def sigmoid_binary_cross_entropy(
    logits: ArrayLike, labels: ArrayLike, *, pos_weight: ArrayLike | None = None,
    where: ArrayLike | None = None, reduction: str = "none",
) -> Array:
  r"""Sigmoid (binary / multi-label) cross-entropy, elementwise.

  Each entry is an independent Bernoulli node (multi-label, n-hot targets):

  .. math:: \ell = -[\,w_+ y \log\sigma(z) + (1-y)\log(1-\sigma(z))\,]
     = w_+ y\,\mathrm{softplus}(-z) + (1-y)\,\mathrm{softplus}(z)

  and :math:`\partial\ell/\partial z = \sigma(z) - y` for :math:`w_+ = 1`
  (a hand-written rule valid in every autodiff mode; labels and ``pos_weight``
  are differentiable too). Stable for any logit, ``±1e4`` and ``±inf``
  included (``z = -inf, y = 0`` gives 0; ``z = -inf, y = 1`` gives ``+inf``),
  and accurate to float32 rounding *relative to the loss* where the loss is
  tiny (``z = 16, y = 1`` gives ``1.1e-7``).

  Args:
    logits: ``[..., C]`` floating point.
    labels: targets in [0, 1] with the same shape (integer 0/1 accepted).
    pos_weight: PyTorch's ``pos_weight``: a scalar or ``[C]`` weight of the
      positive term (broadcast along the last axis).
    where: boolean mask broadcastable to ``logits``; masked entries give 0 and
      leave the mean's denominator.
    reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"`` (over kept
      entries, as PyTorch's mean over all elements).

  >>> import jax
  >>> import jax.numpy as jnp
  >>> import jxent
  >>> z = jax.scipy.special.logit(jnp.array([0.1, 0.7, 0.8]))
  >>> float(jxent.sigmoid_binary_cross_entropy(z, jnp.array([0., 1., 1.]), reduction="sum"))
  ... # doctest: +ELLIPSIS
  0.685...
  """
  _checks.reduction(reduction)
  logits, labels = logits_and_targets(logits, labels)
  pw = None
  if pos_weight is not None:
    pw = _checks.floating(pos_weight, "pos_weight")
    last = logits.shape[-1] if logits.ndim else 1
    if pw.ndim > 1 or (pw.ndim == 1 and pw.shape[0] not in (1, last)):
      raise ValueError(
          f"pos_weight must be a scalar or have shape ({last},) (one weight per label), got "
          f"pos_weight.shape={pw.shape}."
      )
  _checks.check_unit_interval(labels, "labels")
  if _checks.value_checks_on():
    _checks.value_check(~jnp.any(jnp.isnan(logits)), "logits contain NaN.")
  where = elementwise_where(where, logits.shape)
  if reduction == "none":
    if where is not None:  # dropped entries: value and gradient 0 whatever they hold
      logits, labels = jnp.where(where, logits, 0), jnp.where(where, labels, 0)
    return elementwise_finish(bce(logits, labels, pw), where, reduction)
  total = bce_total(logits, labels, pw, where)
  if reduction == "sum":
    return total
  return _checks.mean_of(total, logits.size if where is None else jnp.sum(where))


def sigmoid_focal_loss(
    logits: ArrayLike, labels: ArrayLike, *, alpha: float | None = None, gamma: float = 2.0,
    where: ArrayLike | None = None, reduction: str = "none",
) -> Array:
  r"""Focal loss (Lin et al. 2017) on sigmoid outputs, elementwise.

  .. math:: \ell = \alpha_t (1 - p_t)^\gamma \cdot \mathrm{BCE}(z, y),\quad
     1 - p_t = y\,\sigma(-z) + (1-y)\,\sigma(z)

  with :math:`\alpha_t = \alpha y + (1-\alpha)(1-y)` when ``alpha`` is given.
  Both factors are computed from the logits to full relative accuracy, so the
  loss keeps it where :math:`p_t \to 1` (for labels in {0, 1}). Matches
  ``optax.losses.sigmoid_focal_loss``.

  Args:
    logits: floating point, any shape.
    labels: targets in [0, 1], same shape.
    alpha: optional weight of the positive class in [0, 1].
    gamma: focusing exponent (0 gives BCE).
    where: boolean mask broadcastable to ``logits``.
    reduction: ``"none"``, ``"sum"`` or ``"mean"``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> jxent.sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0]), gamma=0.0).round(4)
  Array([0.6931], dtype=float32)
  """
  _checks.reduction(reduction)
  logits, labels = logits_and_targets(logits, labels)
  _checks.concrete_scalar(gamma, "gamma", 0.0, float("inf"))
  if alpha is not None:
    _checks.concrete_scalar(alpha, "alpha", 0.0, 1.0)
  where = elementwise_where(where, logits.shape)
  if where is not None:  # dropped entries: value and gradient 0 whatever they hold
    logits, labels = jnp.where(where, logits, 0), jnp.where(where, labels, 0)
  ce = bce(logits, labels, None)
  zf, yf = _checks.upcast(logits), _checks.upcast(labels)
  s_pos, s_neg = _sigmoids(zf)
  one_minus_pt = yf * s_neg + (1 - yf) * s_pos
  losses = ce * one_minus_pt**gamma
  if alpha is not None:
    losses = (alpha * yf + (1 - alpha) * (1 - yf)) * losses
  return elementwise_finish(losses, where, reduction)
