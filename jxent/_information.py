"""Information quantities on probabilities and on logits.

Every function returns nats by default; ``base=2`` gives bits and any positive
base other than 1 works. Inputs in bfloat16/float16 are accumulated, and
returned, in float32.

Conventions at the boundary (all tested):

* ``0 * log 0 = 0``: a zero-probability entry of ``p`` adds nothing to the
  value *and nothing to the gradient* (the one-sided derivative of
  ``-p log p`` at 0 is +inf; jxent uses 0 so that training never sees NaN/inf
  from classes that are simply absent).
* Where the mathematics says +inf, the result is +inf: ``-log 0``,
  ``D(p||q)`` and ``H(p, q)`` with some ``p_i > 0`` where ``q_i = 0``.
* From logits, ``-inf`` entries mask classes out of the distribution; values
  and gradients stay finite, the gradient of a masked entry is exactly 0.
  ``+inf`` entries take their limit: the mass is shared by the ``+inf``
  entries (entropy of ``softmax([inf, inf, 0])`` is ``log 2``).
* Where the value is undefined the result is NaN, never a plausible number: a
  NaN input, a probability outside [0, 1], a distribution without mass (all
  probabilities 0, or all logits ``-inf``). Sums away from one are reported by
  :func:`jxent.checked`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _reference as R

Array = jax.Array


@jax.custom_jvp
def _xlogy(x: Array, y: Array) -> Array:
  """x * log(y) with 0 where x == 0, unless y is NaN: a NaN stays NaN.

  Derivatives: in x, log y (also where x == 0: the slope of a target's zero entry is finite
  wherever y > 0); in y, x / y (0 where x == 0, where the function is 0 for every y). At
  x == y == 0 (``0 log 0`` of an entropy) the slope in x is taken as 0; its true value is
  -inf."""
  nonzero = x != 0
  safe_y = jnp.where(nonzero, y, 1)
  return jnp.where(nonzero, x * jnp.log(safe_y), jnp.where(jnp.isnan(y), jnp.nan, 0))


def _xlogy_jvp(primals, tangents):
  x, y = primals
  dx, dy = tangents
  out = _xlogy(x, y)
  nonzero = x != 0
  terms = []
  if _checks.nonzero_tangent(dx):  # (a zero tangent adds nothing, not 0 * -inf)
    pos = y > 0
    slope_x = jnp.where(pos, jnp.log(jnp.where(pos, y, 1)),
                        jnp.where(nonzero, -jnp.inf, jnp.where(jnp.isnan(y), jnp.nan, 0)))
    terms.append(slope_x * dx)
  if _checks.nonzero_tangent(dy):
    terms.append(jnp.where(nonzero, x / jnp.where(nonzero, y, 1), 0) * dy)
  if not terms:
    return out, jnp.zeros_like(out)
  return out, jnp.broadcast_to(sum(terms[1:], terms[0]), out.shape).astype(out.dtype)


_xlogy.defjvp(_xlogy_jvp, symbolic_zeros=True)


def _invalid_rows(p: Array, axis: int | None) -> Array:
  """Where ``p`` is no probability: an entry outside [0, 1] or NaN, or, along ``axis``, a
  distribution without mass. The positions whose result must be NaN. (Sums away from one
  are reported by ``jxent.checked``: a tolerance there would be arbitrary.)"""
  bad = ~((p >= 0) & (p <= 1))
  if axis is None:
    return bad
  return jnp.any(bad, axis=axis) | (jnp.sum(p, axis=axis) == 0)


def _nan_where(bad: Array, x: Array) -> Array:
  return jnp.where(bad, jnp.nan, x)


def _pair(p, q, name_p: str, name_q: str, axis: int):
  """Checked ``(p, q, axis, bad)``: bad marks the rows where either is no distribution."""
  p = _checks.floating(p, name_p)
  q = _checks.floating(q, name_q)
  _checks.same_shape(p, q, name_p, name_q)
  dtype = jnp.result_type(p, q)
  axis = _checks.canonical_axis(axis, p.ndim, name_p)
  _checks.check_probabilities(p, axis, name_p)
  _checks.check_probabilities(q, axis, name_q)
  bad = _invalid_rows(p, axis) | _invalid_rows(q, axis)
  return p.astype(dtype), q.astype(dtype), axis, bad


def self_information(p: ArrayLike, *, base: float | None = None) -> Array:
  r"""Self-information (surprisal) :math:`I(p) = -\log p`, elementwise.

  Args:
    p: probabilities of the events, any shape, values in [0, 1].
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    An array with the shape of ``p``. ``-log 0 = +inf``; ``-log 1 = 0``.

  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> import jxent
  >>> print(np.asarray(jxent.self_information(jnp.array([0.7, 0.2, 0.1]))).round(2))
  [0.36 1.61 2.3 ]
  """
  p = _checks.floating(p, "p")
  _checks.check_unit_interval(p, "p")
  return _checks.in_nats_to_base(_nan_where(_invalid_rows(p, None), -jnp.log(p)),
                                 base)


def entropy(p: ArrayLike, *, axis: int = -1, base: float | None = None) -> Array:
  r"""Shannon entropy :math:`H(p) = -\sum_i p_i \log p_i` along ``axis``.

  Args:
    p: probabilities ``[..., n, ...]`` summing to one along ``axis``.
    axis: the axis that holds the distribution.
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    ``p``'s shape without ``axis``. Entries with ``p_i = 0`` contribute 0 to the
    value and to the gradient, so ``H`` lies in ``[0, log n]``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.entropy(jnp.array([0.7, 0.2, 0.1])))  # doctest: +ELLIPSIS
  0.8018...
  """
  p = _checks.floating(p, "p")
  axis = _checks.canonical_axis(axis, p.ndim, "p")
  _checks.check_probabilities(p, axis, "p")
  h = -jnp.sum(_xlogy(p, p), axis=axis)
  return _checks.in_nats_to_base(_nan_where(_invalid_rows(p, axis), h), base)


def binary_entropy(p: ArrayLike, *, base: float | None = None) -> Array:
  r"""Entropy of a Bernoulli(p): :math:`-p \log p - (1-p) \log (1-p)`, elementwise.

  Args:
    p: success probabilities, any shape, values in [0, 1].
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    ``p``'s shape; 0 at ``p = 0`` and ``p = 1``, ``log 2`` at ``p = 0.5``. The
    derivative ``log((1-p)/p)`` is returned inside (0, 1) and taken as 0 at
    the two ends (where it is ``±inf``).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> jxent.binary_entropy(jnp.array([0.0, 0.5, 1.0]), base=2)
  Array([0., 1., 0.], dtype=float32)
  """
  p = _checks.floating(p, "p")
  _checks.check_unit_interval(p, "p")
  h = _nan_where(_invalid_rows(p, None), _binary_entropy(p))
  return _checks.in_nats_to_base(h, base)


@jax.custom_jvp
def _binary_entropy(p: Array) -> Array:
  q = 1 - p
  return 0.0 - (_xlogy(p, p) + _xlogy(q, q))


@_binary_entropy.defjvp
def _binary_entropy_jvp(primals, tangents):
  # dH/dp = log((1 - p) / p), finite inside (0, 1); 0 at p = 0 and p = 1 by convention.
  (p,), (dp,) = primals, tangents
  inside = (p > 0) & (p < 1)
  safe = jnp.where(inside, p, 0.5)
  slope = jnp.where(inside, jnp.log1p(-safe) - jnp.log(safe), 0)
  return _binary_entropy(p), slope * dp


def kl_divergence(p: ArrayLike, q: ArrayLike, *, axis: int = -1,
                  base: float | None = None) -> Array:
  r"""Kullback-Leibler divergence :math:`D(p\|q) = \sum_i p_i \log(p_i / q_i)`.

  The arguments are in mathematical order: ``p`` is the reference (true)
  distribution, ``q`` the model. (``optax.losses.kl_divergence`` takes
  ``(log_predictions, targets)``, the other way round.)

  Args:
    p: probabilities ``[..., n, ...]``.
    q: probabilities, same shape as ``p``.
    axis: the axis that holds the distributions.
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    The shape of ``p`` without ``axis``. Non-negative; 0 iff ``p == q``;
    ``+inf`` where some ``p_i > 0`` has ``q_i = 0``. Terms with ``p_i = 0``
    contribute 0 to the value and to the gradient in ``q`` whatever ``q_i`` is; the slope
    in such a ``p_i`` is the cross-entropy term's, :math:`-\log q_i` (that of
    :math:`p_i \log p_i`, :math:`-\infty` in truth, is taken as 0 there).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> p, q = jnp.array([0.7, 0.2, 0.1]), jnp.array([0.5, 0.3, 0.2])
  >>> float(jxent.kl_divergence(p, q))  # doctest: +ELLIPSIS
  0.0851...
  """
  p, q, axis, bad = _pair(p, q, "p", "q", axis)
  d = jnp.sum(_xlogy(p, p) - _xlogy(p, q), axis=axis)
  return _checks.in_nats_to_base(_nan_where(bad, d), base)


def generalized_kl_divergence(p: ArrayLike, q: ArrayLike, *, axis: int | None = -1,
                              base: float | None = None) -> Array:
  r"""Generalised KL divergence of non-negative measures (Csiszár's I-divergence):

  .. math:: D(p\|q) = \sum_i \Big(p_i \log \frac{p_i}{q_i} - p_i + q_i\Big).

  The Bregman divergence of :math:`\sum_i x_i \log x_i - x_i` on the non-negative orthant:
  ``p`` and ``q`` need not sum to one (intensities, counts, NMF factors); it is the KL
  divergence where both do, and each term is non-negative. ``optax.losses.
  generalized_kl_divergence(log_predictions, targets)`` and ``convex_kl_divergence`` are
  ``D(targets || exp(log_predictions))``.

  Args:
    p: non-negative values ``[..., n, ...]`` (the reference, or targets).
    q: non-negative values, same shape as ``p`` (the model).
    axis: the axis to sum over (``None``: elementwise terms, no sum).
    base: logarithm base (``None`` for nats, ``2`` for bits; the ``- p + q`` terms are
      scaled with the logarithm, so the result stays a Bregman divergence).

  Returns:
    The shape of ``p`` without ``axis``; 0 iff ``p == q``; ``+inf`` where some
    ``p_i > 0`` has ``q_i = 0``. A term with ``p_i = 0`` is ``q_i``. NaN where an entry of
    either is negative or NaN (no measure). The gradient in ``q`` is :math:`1 - p_i/q_i`; in
    ``p``, :math:`\log(p_i/q_i)`, and at ``p_i = 0`` (where the true slope is
    :math:`-\infty`) :math:`-\log q_i - 1`, as :func:`kl_divergence` takes the slope of
    :math:`p_i \log p_i` there as 0.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> p, q = jnp.array([2.0, 0.5, 0.0]), jnp.array([1.0, 0.5, 0.25])
  >>> float(jxent.generalized_kl_divergence(p, q))  # 2 log 2 - 2 + 1 + 0 + 0.25
  ... # doctest: +ELLIPSIS
  0.6362...
  """
  p = _checks.floating(p, "p")
  q = _checks.floating(q, "q")
  _checks.same_shape(p, q, "p", "q")
  dtype = jnp.result_type(p, q)
  p, q = p.astype(dtype), q.astype(dtype)
  if axis is not None:
    axis = _checks.canonical_axis(axis, p.ndim, "p")
  terms = _xlogy(p, p) - _xlogy(p, q) + (q - p)
  bad = ~((p >= 0) & (q >= 0))  # negative or NaN: no measure
  if axis is not None:
    terms, bad = jnp.sum(terms, axis=axis), jnp.any(bad, axis=axis)
  return _checks.in_nats_to_base(_nan_where(bad, terms), base)


def cross_entropy(p: ArrayLike, q: ArrayLike, *, axis: int = -1,
                  base: float | None = None) -> Array:
  r"""Cross-entropy :math:`H(p, q) = -\sum_i p_i \log q_i = H(p) + D(p\|q)`.

  Args:
    p: the reference distribution ``[..., n, ...]`` (the labels).
    q: the model's distribution, same shape as ``p`` (the predictions).
    axis: the axis that holds the distributions.
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    The shape of ``p`` without ``axis``; ``+inf`` where some ``p_i > 0`` has
    ``q_i = 0``; terms with ``p_i = 0`` contribute nothing to the value or to the gradient
    in ``q``. The gradient in ``p`` is :math:`-\log q_i`, at ``p_i = 0`` too (a one-hot
    target's zero entries have a slope).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.cross_entropy(jnp.array([0., 1., 0.]), jnp.array([0.3, 0.6, 0.1])))
  ... # doctest: +ELLIPSIS
  0.5108...
  """
  p, q, axis, bad = _pair(p, q, "p", "q", axis)
  return _checks.in_nats_to_base(_nan_where(bad, -jnp.sum(_xlogy(p, q), axis=axis)), base)


def js_divergence(p: ArrayLike, q: ArrayLike, *, axis: int = -1,
                  base: float | None = None) -> Array:
  r"""Jensen-Shannon divergence :math:`\tfrac12 D(p\|m) + \tfrac12 D(q\|m)`, :math:`m = (p+q)/2`.

  Symmetric, always finite, and bounded by ``log 2`` (1 bit).

  Args:
    p: probabilities ``[..., n, ...]``.
    q: probabilities, same shape as ``p``.
    axis: the axis that holds the distributions.
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    The shape of ``p`` without ``axis``, in ``[0, log 2]``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.js_divergence(jnp.array([1., 0.]), jnp.array([0., 1.]), base=2))
  1.0
  """
  p, q, axis, bad = _pair(p, q, "p", "q", axis)
  m = 0.5 * (p + q)
  d_pm = _xlogy(p, p) - _xlogy(p, m)
  d_qm = _xlogy(q, q) - _xlogy(q, m)
  return _checks.in_nats_to_base(_nan_where(bad, 0.5 * jnp.sum(d_pm + d_qm, axis=axis)), base)


def _half_abs(d: Array) -> Array:
  """|d| / 2 elementwise as sign(d) d / 2, whose derivative is sign(d) / 2 (sign's own is
  0): 0 at d = 0, the middle of the subdifferential there (``jnp.abs``'s derivative at 0 is
  1)."""
  return 0.5 * jnp.sign(d) * d


def tv_distance(p: ArrayLike, q: ArrayLike, *, axis: int = -1) -> Array:
  r"""Total variation distance :math:`\delta(p, q) = \tfrac12 \sum_i |p_i - q_i|`.

  The largest difference of the probabilities the two give to one event,
  :math:`\max_A |P(A) - Q(A)|`; symmetric, in :math:`[0, 1]` (1 for disjoint supports),
  and bounded by the KL divergence (Pinsker: :math:`\delta \le \sqrt{D(p\|q)/2}`). Not a
  logarithmic quantity: it has no ``base``.

  Args:
    p: probabilities ``[..., n, ...]``.
    q: probabilities, same shape as ``p``.
    axis: the axis that holds the distributions.

  Returns:
    The shape of ``p`` without ``axis``, in ``[0, 1]``. The gradient in ``p`` is
    :math:`\tfrac12 \operatorname{sign}(p - q)` (in ``q`` its negative), 0 where
    :math:`p_i = q_i`: :math:`\delta` has a kink there, and 0 is the middle of its
    subdifferential, as Liger's TVD loss takes (``jnp.abs`` alone would give +1). NaN where
    either is no distribution.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.tv_distance(jnp.array([0.7, 0.2, 0.1]), jnp.array([0.5, 0.3, 0.2])))
  ... # doctest: +ELLIPSIS
  0.2...
  """
  p, q, axis, bad = _pair(p, q, "p", "q", axis)
  return _nan_where(bad, jnp.sum(_half_abs(p - q), axis=axis))


# --------------------------------------------------------------------------- logits


def _log_softmax(logits: Array, axis: int) -> Array:
  """log_softmax that tolerates -inf entries (masked classes) without NaN.

  Rows with +inf logits take their limit: the mass is shared equally by the +inf entries.
  A row whose entries are all -inf has no distribution, and a row with a NaN is undefined:
  their log-probabilities are NaN.

  The top class's log-probability keeps its relative accuracy when it is tiny (a nearly
  one-hot row: -1e-8, not 0): where the shifted logsumexp is below 0.5 the max is unique
  and it is ``log1p`` of the other terms' sum (``_reference.sharpen``). The shift m carries
  its gradient for that (the max's own term is then exactly 1, with no derivative).
  """
  m = jnp.max(logits, axis=axis, keepdims=True)
  has_pos_inf = m == jnp.inf
  logits = jnp.where(has_pos_inf, jnp.where(logits == jnp.inf, 0.0, -jnp.inf), logits)
  m = jnp.where(has_pos_inf, 0, m)
  no_mass = m == -jnp.inf
  m = jnp.where(jnp.isfinite(m), m, 0)
  shifted = logits - m
  e = jnp.exp(shifted)
  lse = jnp.log(jnp.sum(e, axis=axis, keepdims=True))
  rest = jnp.sum(jnp.where(shifted == 0, 0, e), axis=axis, keepdims=True)
  return jnp.where(no_mass, jnp.nan, shifted - R.sharpen(lse, rest))


def _logits(x, name: str, axis: int):
  x = _checks.floating(x, name)
  return x, _checks.class_axis(x, axis, name)


def _plogq(logp: Array, logq: Array) -> Array:
  """p * log q with p = exp(logp); 0 (and zero gradient) where p == 0; NaN stays NaN."""
  nonzero = logp != -jnp.inf
  p = jnp.exp(jnp.where(nonzero, logp, 0))
  safe_logq = jnp.where(nonzero, logq, 0)
  return jnp.where(nonzero, p * safe_logq, 0)


def plog_p_over_m(logp: Array, logq: Array, beta: float) -> Array:
  """p (log p - log m) for m = beta p + (1 - beta) q, from log p and log q, elementwise.

  ``log p - log m = -log1p((1 - beta) expm1(log q - log p))``: exactly 0 where p = q (a
  difference of two logaddexp results would round to about ±1e-8 there), ``-log beta``
  where q = 0, no overflow where q >> p; 0 with zero gradient where p = 0.
  """
  nonzero = logp != -jnp.inf
  lp = jnp.where(nonzero, logp, 0)
  d = logq - lp
  # (1 - beta) expm1(d) overflows soon after d = 30; there log1p(.) = log(1 - beta) + d.
  # beta may be an array (one per row) and then may be 1, where m = p and the term is 0.
  big = jnp.logical_and(d > 30, beta < 1)
  small = -jnp.log1p((1 - beta) * jnp.expm1(jnp.where(big, 0, d)))
  r = jnp.where(big, -(jnp.log1p(-jnp.where(big, beta, 0)) + jnp.where(big, d, 0)), small)
  return jnp.where(nonzero, jnp.exp(lp) * r, 0)


def entropy_from_logits(logits: ArrayLike, *, axis: int = -1,
                        base: float | None = None) -> Array:
  r"""Entropy of ``softmax(logits)``: :math:`-\sum_i p_i \log p_i`, computed in log space.

  Args:
    logits: unnormalised log-probabilities ``[..., n, ...]``; ``-inf`` masks a class.
    axis: the class axis.
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    ``logits``' shape without ``axis``. Finite for any finite logits (also
    ``±1e4``); masked classes add nothing and get a zero gradient.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> float(jxent.entropy_from_logits(jnp.log(jnp.array([0.7, 0.2, 0.1]))))
  ... # doctest: +ELLIPSIS
  0.8018...
  """
  logits, axis = _logits(logits, "logits", axis)
  logp = _log_softmax(logits, axis)
  return _checks.in_nats_to_base(0.0 - jnp.sum(_plogq(logp, logp), axis=axis), base)


def _tempered(logits: Array, temperature, name: str) -> Array:
  """``logits / temperature`` (a positive number; a traced one is taken as given)."""
  if isinstance(temperature, (int, float)):
    if not temperature > 0:
      raise ValueError(f"{name} must be positive, got {temperature!r}.")
    return logits if temperature == 1 else logits / temperature
  return logits / jnp.asarray(temperature, logits.dtype)


def kl_divergence_from_logits(p_logits: ArrayLike, q_logits: ArrayLike, *, axis: int = -1,
                              base: float | None = None,
                              temperature: ArrayLike = 1.0) -> Array:
  r""":math:`D(p\|q)` for ``p = softmax(p_logits / T)`` and ``q = softmax(q_logits / T)``.

  Args:
    p_logits: logits of the reference distribution ``[..., n, ...]`` (in distillation, the
      teacher: then this is the forward KL).
    q_logits: logits of the model, same shape.
    axis: the class axis.
    base: logarithm base (``None`` for nats, ``2`` for bits).
    temperature: :math:`T > 0` dividing both logits (distillation's softening). The
      gradient is that of the tempered divergence (multiply by :math:`T^2` for Hinton's
      scaling).

  Returns:
    ``p_logits``' shape without ``axis``. Classes masked in ``p`` (``-inf``)
    contribute 0; a class masked in ``q`` but not in ``p`` gives ``+inf``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> z = jnp.array([1.0, 2.0, 3.0])
  >>> float(jxent.kl_divergence_from_logits(z, z))
  0.0
  """
  p_logits, axis = _logits(p_logits, "p_logits", axis)
  q_logits, _ = _logits(q_logits, "q_logits", axis)
  _checks.same_shape(p_logits, q_logits, "p_logits", "q_logits")
  logp = _log_softmax(_tempered(p_logits, temperature, "temperature"), axis)
  logq = _log_softmax(_tempered(q_logits, temperature, "temperature"), axis)
  return _checks.in_nats_to_base(
      jnp.sum(_plogq(logp, logp) - _plogq(logp, logq), axis=axis), base
  )


def js_divergence_from_logits(p_logits: ArrayLike, q_logits: ArrayLike, *, beta: float = 0.5,
                              axis: int = -1, base: float | None = None,
                              temperature: ArrayLike = 1.0) -> Array:
  r"""Generalised Jensen–Shannon divergence of ``p = softmax(p_logits / T)`` and
  ``q = softmax(q_logits / T)``:

  .. math:: \mathrm{JS}_\beta(p\|q) = \beta D(p\|m) + (1-\beta) D(q\|m),
     \qquad m = \beta p + (1 - \beta) q,

  computed in log space (:math:`\log m` by ``logaddexp``). :math:`\beta = 1/2` is the
  symmetric JS divergence, in :math:`[0, \log 2]`. As :math:`\beta \to 0`,
  :math:`\mathrm{JS}_\beta / \beta \to D(p\|q)` and as :math:`\beta \to 1`,
  :math:`\mathrm{JS}_\beta / (1-\beta) \to D(q\|p)`; at the end points themselves, as
  Liger's ``jsd_beta`` does, ``beta=0`` gives the forward KL :math:`D(p\|q)` and ``beta=1``
  the reverse KL :math:`D(q\|p)` (with ``p`` the teacher and ``q`` the student of a
  distillation).

  Args:
    p_logits: logits of the first distribution (the teacher) ``[..., n, ...]``.
    q_logits: logits of the second (the student), same shape.
    beta: :math:`\beta \in [0, 1]`, a Python number (static).
    axis: the class axis.
    base: logarithm base (``None`` for nats, ``2`` for bits).
    temperature: :math:`T > 0` dividing both logits.

  Returns:
    ``p_logits``' shape without ``axis``: finite for ``0 < beta < 1`` whatever the masks
    (``m`` covers both supports); at the end points as :func:`kl_divergence_from_logits`.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> a = jnp.array([0.0, -jnp.inf]); b = jnp.array([-jnp.inf, 0.0])
  >>> float(jxent.js_divergence_from_logits(a, b, base=2))  # disjoint supports: 1 bit
  1.0
  """
  beta = _checks.static_number(beta, "beta")
  if not 0 <= beta <= 1:
    raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
  if beta == 0:
    return kl_divergence_from_logits(p_logits, q_logits, axis=axis, base=base,
                                     temperature=temperature)
  if beta == 1:
    return kl_divergence_from_logits(q_logits, p_logits, axis=axis, base=base,
                                     temperature=temperature)
  p_logits, axis = _logits(p_logits, "p_logits", axis)
  q_logits, _ = _logits(q_logits, "q_logits", axis)
  _checks.same_shape(p_logits, q_logits, "p_logits", "q_logits")
  logp = _log_softmax(_tempered(p_logits, temperature, "temperature"), axis)
  logq = _log_softmax(_tempered(q_logits, temperature, "temperature"), axis)
  js = (beta * jnp.sum(plog_p_over_m(logp, logq, beta), axis=axis)
        + (1 - beta) * jnp.sum(plog_p_over_m(logq, logp, 1 - beta), axis=axis))
  return _checks.in_nats_to_base(js, base)


def tv_distance_from_logits(p_logits: ArrayLike, q_logits: ArrayLike, *, axis: int = -1,
                            temperature: ArrayLike = 1.0) -> Array:
  r"""Total variation distance :math:`\tfrac12 \sum_i |p_i - q_i|` of
  ``p = softmax(p_logits / T)`` and ``q = softmax(q_logits / T)``, as :func:`tv_distance`.

  Args:
    p_logits: logits of the first distribution (the teacher) ``[..., n, ...]``.
    q_logits: logits of the second (the student), same shape.
    axis: the class axis.
    temperature: :math:`T > 0` dividing both logits.

  Returns:
    ``p_logits``' shape without ``axis``, in ``[0, 1]``; finite whatever the masks
    (``-inf`` classes have probability 0), NaN for a row with no distribution (all
    ``-inf``). The gradient in the logits of ``q`` is
    :math:`-\tfrac12\, q \odot (s - \sum_i q_i s_i) / T` with
    :math:`s = \operatorname{sign}(p - q)` (0 where :math:`p_i = q_i`), and in those of
    ``p`` :math:`\tfrac12\, p \odot (s - \sum_i p_i s_i) / T`.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> a = jnp.array([0.0, -jnp.inf]); b = jnp.array([-jnp.inf, 0.0])
  >>> float(jxent.tv_distance_from_logits(a, b))  # disjoint supports
  1.0
  """
  p_logits, axis = _logits(p_logits, "p_logits", axis)
  q_logits, _ = _logits(q_logits, "q_logits", axis)
  _checks.same_shape(p_logits, q_logits, "p_logits", "q_logits")
  p = jnp.exp(_log_softmax(_tempered(p_logits, temperature, "temperature"), axis))
  q = jnp.exp(_log_softmax(_tempered(q_logits, temperature, "temperature"), axis))
  return jnp.sum(_half_abs(p - q), axis=axis)


def log_probs(logits: ArrayLike, labels: ArrayLike, *, axis: int = -1,
              where: ArrayLike | None = None, temperature: ArrayLike = 1.0) -> Array:
  r"""Log-probability of each label under ``softmax(logits / T)``:
  :math:`\log p_y = z_y - \log\sum_c e^{z_c}` (the dense counterpart of
  :func:`jxent.linear_log_probs`; its negative is the integer-label cross-entropy).

  Args:
    logits: ``[..., C]`` (the class axis ``axis``).
    labels: integer class ids, ``logits``' shape without ``axis``.
    axis: the class axis.
    where: optional boolean mask, ``labels``' shape: dropped entries get 0 and no gradient.
    temperature: :math:`T > 0` dividing the logits.

  Returns:
    ``labels``' shape; :math:`-\infty` for a label whose logit is :math:`-\infty`, NaN (value
    and gradient) for a kept label outside ``[0, C)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> jxent.log_probs(jnp.zeros((2, 4)), jnp.array([0, 3]))
  Array([-1.3862944, -1.3862944], dtype=float32)
  """
  logits, axis = _logits(logits, "logits", axis)
  labels = _checks.integer(labels, "labels")
  batch = logits.shape[:axis] + logits.shape[axis + 1:]
  if labels.shape != batch:
    raise ValueError(f"labels must have logits' shape without axis {axis}, i.e. {batch}, got "
                     f"labels.shape={labels.shape}.")
  c = logits.shape[axis]
  logp = _log_softmax(_tempered(logits, temperature, "temperature"), axis)
  keep = jnp.ones(batch, bool)
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape != batch:
      raise ValueError(f"where must be a boolean mask of shape {batch}, got "
                       f"{where.dtype} {where.shape}.")
    keep = where
  bad = keep & ((labels < 0) | (labels >= c))
  y = jnp.expand_dims(jnp.clip(labels, 0, c - 1), axis)
  out = jnp.squeeze(jnp.take_along_axis(logp, y, axis=axis), axis)
  # A kept label outside [0, C): NaN, and NaN gradient (multiplied in, not selected).
  out = out * jnp.where(bad, jnp.nan, 1).astype(out.dtype)
  if where is not None:
    out = jnp.where(where, out, 0)
  return out


def cross_entropy_from_logits(p_logits: ArrayLike, q_logits: ArrayLike, *, axis: int = -1,
                              base: float | None = None) -> Array:
  r""":math:`H(p, q) = -\sum_i p_i \log q_i` for ``p, q = softmax(p_logits), softmax(q_logits)``.

  Args:
    p_logits: logits of the reference distribution ``[..., n, ...]``.
    q_logits: logits of the model, same shape.
    axis: the class axis.
    base: logarithm base (``None`` for nats, ``2`` for bits).

  Returns:
    ``p_logits``' shape without ``axis``; ``+inf`` where ``q`` masks a class
    that ``p`` does not.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> z = jnp.zeros(4)
  >>> float(jxent.cross_entropy_from_logits(z, z, base=2))
  2.0
  """
  p_logits, axis = _logits(p_logits, "p_logits", axis)
  q_logits, _ = _logits(q_logits, "q_logits", axis)
  _checks.same_shape(p_logits, q_logits, "p_logits", "q_logits")
  logp = _log_softmax(p_logits, axis)
  logq = _log_softmax(q_logits, axis)
  return _checks.in_nats_to_base(-jnp.sum(_plogq(logp, logq), axis=axis), base)
