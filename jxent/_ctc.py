"""Connectionist temporal classification (CTC): the negative log-likelihood of a label
sequence, summed over every alignment of it to the input frames.

For frames ``t = 1..T`` with class distributions ``softmax(z_t)`` (one class the blank) and
labels ``l = (l_1, ..., l_L)``, an alignment is a path ``pi`` of one class per frame that
collapses to ``l`` when repeats are merged and blanks dropped (``B(pi) = l``):

    p(l | z) = sum_{pi : B(pi) = l} prod_t softmax(z_t)[pi_t],   loss = -log p(l | z).

The sum is the forward recursion over the extended labels ``l' = (blank, l_1, blank, ...,
l_L, blank)`` (``S = 2L + 1`` states), in log space with true zeros (``-inf``) for the
states a path cannot reach: a label the input cannot hold gives ``+inf``, not a large finite
number. Each frame's row is shifted to a top of 0 and the shifts summed (compensated).

The derivative is written out, and it is the cross-entropy's with the alignment posterior
as the label:

    d loss / d z_t = softmax(z_t) - gamma_t,   gamma_t[k] = sum_{s : l'_s = k} P(state s at t | l).

The posteriors are passed back from the last frame, each state's split among the states it
came from in the proportions of the forward recursion's own sums at that frame (reverse
mode of the recursion, by hand). Each step uses one frame's ratios, so the float32 gradient
stays within ~4e-5 of float64's over a thousand frames (autodiff of Optax's recursion:
~4e-3; benchmarks/RESULTS.md); alpha_t beta_t / p would be formed from log-probabilities in
the thousands, whose rounding alone is ~1e-4. The ``jax.custom_jvp`` rule's tangent is that
gradient's inner product with the logits' tangent: linear, so forward and reverse mode use
it, and higher orders differentiate the recursions by autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _fused as F
from jxent import _lmhead as LH
from jxent import _stats as S

Array = jax.Array


def _shifted(a: Array, k: int) -> Array:
  """``a`` [B, S] moved ``k`` states on: column ``s`` holds ``a[:, s - k]`` (-inf for s < k)."""
  pad = jnp.full((a.shape[0], k), -jnp.inf, a.dtype)
  return jnp.concatenate([pad, a], axis=1)[:, :a.shape[1]]


def _shifted_back(a: Array, k: int) -> Array:
  """``a`` [B, S] moved ``k`` states back: column ``s`` holds ``a[:, s + k]`` (0 beyond the
  last)."""
  pad = jnp.zeros((a.shape[0], k), a.dtype)
  return jnp.concatenate([a, pad], axis=1)[:, k:]


def _extended(labels: Array, blank_id: int) -> tuple[Array, Array]:
  """(l' [B, 2N + 1]: blanks around and between the labels, whether state s may be entered
  from s - 2 [B, 2N + 1]: a label other than the one before it)."""
  b, n = labels.shape
  ext = jnp.full((b, 2 * n + 1), blank_id, labels.dtype).at[:, 1::2].set(labels)
  differs = jnp.concatenate([jnp.zeros((b, 1), bool), labels[:, 1:] != labels[:, :-1]], 1)
  skip = jnp.zeros((b, 2 * n + 1), bool).at[:, 1::2].set(differs)
  return ext, skip


def _emissions(log_p: Array, ext: Array) -> Array:
  """Each state's log-probability at each frame, time-major: [T, B, S]."""
  return jnp.moveaxis(jnp.take_along_axis(log_p, ext[:, None, :], axis=2), 1, 0)


def _alphas(emit, kept, skip):
  """The forward recursion over [T, B, S] emissions, padded frames skipped, each frame's row
  shifted to a top of 0: (the last frame's row [B, S], the log scale [B] it was shifted by
  in all, and per frame [T, B, S] the shares of each state's probability that came from
  itself, the state before and the one two before)."""
  # Before the first frame: the first blank state with probability 1. Its self-loop and its
  # move to the first label then give the two states a path may start in.
  like = lambda a: F._varying_like(a, emit, kept, skip)  # (inside shard_map)
  alpha0 = like(jnp.full(emit.shape[1:], -jnp.inf, emit.dtype).at[:, 0].set(0))

  def step(carry, xs):
    alpha, scale, lost = carry
    e, k = xs
    terms = (alpha, _shifted(alpha, 1), jnp.where(skip, _shifted(alpha, 2), -jnp.inf))
    m = jax.lax.stop_gradient(S.finite(functools.reduce(jnp.maximum, terms)))  # S.lse_rows
    parts = [jnp.exp(x - m) for x in terms]
    total = functools.reduce(jnp.add, parts)
    empty = total == 0  # no predecessor reached: -inf, shares 0 (NaN stays NaN)
    new = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1, total))) + e
    inv = 1 / jnp.where(empty, 1, total)
    # The row is shifted to a top of 0 and the shift added to the scale, a sum compensated
    # (Kahan) over thousands of frames. A frame that no path passes leaves the row at -inf
    # (likelihood 0), a NaN leaves it NaN.
    c = jnp.max(new, axis=-1)
    c = jnp.where(k & jnp.isfinite(c), c, 0)
    add = c - lost
    summed = scale + add
    lost, scale = (summed - scale) - add, summed
    alpha = jnp.where(k[:, None], new - c[:, None], alpha)
    return (alpha, scale, lost), tuple(p * inv for p in parts)

  zero = like(jnp.zeros(emit.shape[1], emit.dtype))
  # Two frames per loop iteration: on XLA:CPU the forward took 0.65x Optax's time rather than
  # 1.15x at B=8, T=1000, K=256 (python -m benchmarks ctc).
  (alpha, scale, _), shares = jax.lax.scan(step, (alpha0, zero, zero), (emit, kept), unroll=2)
  return alpha, scale, shares


def _ends(label_len: Array, s: int) -> Array:
  """[B, S]: the states a path may end in: the last label and the blank after it."""
  states = jnp.arange(s)[None, :]
  last = 2 * label_len[:, None]
  return (states == last) | ((states == last - 1) & (label_len[:, None] > 0))


def _posteriors(shares, kept, last):
  """[T, B, S]: each state's posterior probability at each frame given the labels, from the
  last frame's (``last`` [B, S]) back: a state's posterior is shared among its predecessors
  at the frame before as the forward recursion's ``shares`` say. Each step uses that frame's
  own ratios, so the posterior keeps float32's resolution over thousands of frames (a
  product alpha beta / p of log-probabilities in the thousands would lose it)."""

  def step(post, xs):
    (s0, s1, s2), k = xs
    prev = post * s0 + _shifted_back(post * s1, 1) + _shifted_back(post * s2, 2)
    # A frame's posteriors sum to one: rescaled, so that rounding cannot drift their mass.
    total = jnp.sum(prev, axis=-1, keepdims=True)
    prev = prev / jnp.where(total > 0, total, 1)
    return jnp.where(k[:, None], prev, post), post

  return jax.lax.scan(step, last, (shares, kept), reverse=True)[1]


def _primal(z, kept, ext, skip, label_len, bad):
  """(log-softmax [B, T, K], ``_alphas``' shares, the posterior of the final states (their
  scaled alphas) [B, S], log p(l | z) [B])."""
  # A bad row's logits are read as 0 (its loss is NaN anyway), so that its recursion cannot
  # put NaN where the other rows' would not.
  log_p = jax.nn.log_softmax(jnp.where(bad[:, None, None], 0, z), axis=-1)
  alpha, scale, shares = _alphas(_emissions(log_p, ext), jnp.moveaxis(kept, 1, 0), skip)
  final = jnp.where(_ends(label_len, alpha.shape[-1]), alpha, -jnp.inf)
  end = S.lse_rows(final)  # -inf: no path ends (its final states' posterior is not used)
  return log_p, shares, final - jnp.where(jnp.isfinite(end), end, 0)[:, None], scale + end


def _loss(log_lik, bad, zero_infinity):
  loss = jnp.where(bad, jnp.nan, -log_lik)
  return jnp.where((log_lik == -jnp.inf) & ~bad, 0, loss) if zero_infinity else loss


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _ctc(z, kept, ext, skip, label_len, bad, zero_infinity):
  """Per-sequence CTC loss [B] of float logits ``z`` [B, T, K] (``kept``: the kept frames
  [B, T]; ``ext``, ``skip``: ``_extended``; ``bad``: rows with a bad label)."""
  return _loss(_primal(z, kept, ext, skip, label_len, bad)[-1], bad, zero_infinity)


@_ctc.defjvp
def _ctc_jvp(zero_infinity, primals, tangents):
  z, kept, ext, skip, label_len, bad = primals
  dz = tangents[0]
  log_p, shares, final, log_lik = _primal(z, kept, ext, skip, label_len, bad)
  impossible = log_lik == -jnp.inf
  last = jnp.exp(jnp.where(impossible[:, None], -jnp.inf, final))
  post = _posteriors(shares, jnp.moveaxis(kept, 1, 0), last)
  # Each state's posterior summed into its class (gamma, the transpose of the gather).
  _, to_classes = jax.vjp(lambda lp: _emissions(lp, ext), log_p)
  grad = jnp.where(kept[..., None], jnp.exp(log_p) - to_classes(post)[0], 0)
  # An impossible alignment's loss is +inf: its slope is NaN (undefined), or 0 with
  # zero_infinity; a bad label's is NaN.
  undefined = bad | impossible if not zero_infinity else bad
  grad = jnp.where(undefined[:, None, None], jnp.nan,
                   jnp.where(impossible[:, None, None], 0, grad)).astype(z.dtype)
  return _loss(log_lik, bad, zero_infinity), jnp.sum(grad * dz, axis=(1, 2))


def ctc_loss(
    logits: ArrayLike,
    logit_paddings: ArrayLike,
    labels: ArrayLike,
    label_paddings: ArrayLike,
    *,
    blank_id: int = 0,
    zero_infinity: bool = False,
    reduction: str = "none",
) -> Array:
  r"""Connectionist temporal classification loss (Graves et al., 2006).

  .. math::
    \ell = -\log \sum_{\pi:\, \mathcal{B}(\pi) = l}\ \prod_{t} \mathrm{softmax}(z_t)_{\pi_t},

  the negative log-likelihood of the labels :math:`l` summed over every alignment
  :math:`\pi` (one class per kept frame) that collapses to them when repeats are merged and
  blanks dropped (:math:`\mathcal{B}`): the forward recursion over the blank-extended labels,
  in log space. Its gradient is the cross-entropy's with the alignment posterior as target,
  :math:`\partial \ell / \partial z_t = \mathrm{softmax}(z_t) - \gamma_t`, where
  :math:`\gamma_t(k)` is the probability, given the labels, that frame :math:`t` emits
  :math:`k`; so ``softmax(z) - jax.grad(...)`` reads the soft alignment off. That gradient is
  written out (the forward and backward recursions), in a rule linear in the logits'
  tangent: differentiable in ``logits`` in every autodiff mode and order.

  Args:
    logits: ``[B, T, K]`` unnormalised log-probabilities of ``K`` classes, one of them the
      blank (log-probabilities are valid logits); bf16 and f16 are accumulated in float32.
      For other batch shapes, ``jax.vmap``. Sequences laid out over explicit mesh axes
      (``jax.sharding.AxisType.Explicit``) are taken data-parallel (each device its own, in
      ``shard_map``; only a sum and a count cross devices).
    logit_paddings: ``[B, T]``, nonzero (1) on padded frames, 0 on kept ones, as Optax;
      padded frames are skipped wherever they are.
    labels: integer ``[B, N]`` label ids in ``[0, K)``, none equal to ``blank_id``.
    label_paddings: ``[B, N]``, nonzero (1) on padding after each sequence's labels
      (right-padded: the labels of sequence ``b`` are the first ``N - sum(padding)``).
    blank_id: the blank's class (a static ``int`` in ``[0, K)``).
    zero_infinity: give an impossible alignment (an infinite loss) loss 0 and gradient 0, as
      PyTorch's option; by default its loss is :math:`+\infty` and its gradient NaN.
    reduction: ``"none"`` (``[B]``), ``"sum"`` or ``"mean"`` over the sequences. PyTorch's
      ``"mean"`` divides each loss by its label count first:
      ``jnp.mean(loss / jnp.maximum(label_count, 1))`` of ``reduction="none"``.

  Returns:
    ``[B]`` losses (float32, float64 for float64 logits), or their reduction: :math:`\ge 0`;
    :math:`+\infty` where no alignment has positive probability (more labels and repeats
    than kept frames, or a needed class with logit :math:`-\infty`); 0 for no labels and no
    kept frames; NaN for a sequence with a kept label outside ``[0, K)`` or equal to
    ``blank_id`` (also in its gradient). Optax's ``ctc_loss`` gives such sequences a large
    finite loss (its ``log_epsilon``); value checks (:func:`jxent.checked`) also report the
    labels and a padding that is not right-padded.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> z = jnp.zeros((1, 2, 3))  # two frames, uniform over {blank, 1, 2}
  >>> # "1" is aligned by (1, 1), (blank, 1), (1, blank): probability 3/9.
  >>> jxent.ctc_loss(z, jnp.zeros((1, 2)), jnp.array([[1]]), jnp.zeros((1, 1)))
  Array([1.0986123], dtype=float32)
  """
  _checks.reduction(reduction)
  zero_infinity = _checks.static_bool(zero_infinity, "zero_infinity")
  if LH._on_mesh(logits, logit_paddings, labels, label_paddings):
    # Sequences laid out over explicit mesh axes: each device takes its own (shard_map), and
    # only a sum and a count cross devices.
    local = lambda t, _, r: ctc_loss(t["z"], t["fp"], t["y"], t["lp"], blank_id=blank_id,
                                     zero_infinity=zero_infinity, reduction=r)
    seqs = dict(z=logits, fp=logit_paddings, y=labels, lp=label_paddings)
    return LH._token_mesh("ctc_loss", local, seqs, {}, reduction=reduction,
                          kept=jnp.ones(jnp.shape(labels)[:1], bool))
  z = _checks.floating(logits, "logits")
  if z.ndim != 3:
    raise ValueError(f"logits must be [B, T, K] (batch, frames, classes), got shape {z.shape}; "
                     "for other batch shapes use jax.vmap.")
  b, t, k = z.shape
  if k == 0:
    raise ValueError(f"logits has no classes (logits.shape={z.shape}).")
  if not isinstance(blank_id, int) or isinstance(blank_id, bool) or not 0 <= blank_id < k:
    raise ValueError(f"blank_id must be a static int in [0, {k}) (K = logits.shape[-1]), "
                     f"got {blank_id!r}.")
  y = _checks.integer(labels, "labels")
  if y.ndim != 2 or y.shape[0] != b:
    raise ValueError(f"labels must be [B, N] with logits' B = {b}, got labels.shape={y.shape} "
                     f"(logits.shape={z.shape}).")
  frame_pad = _checks.as_array(logit_paddings, "logit_paddings")
  if frame_pad.shape != (b, t):
    raise ValueError(f"logit_paddings must be [B, T] = {(b, t)} (logits.shape={z.shape}), got "
                     f"logit_paddings.shape={frame_pad.shape}.")
  label_pad = _checks.as_array(label_paddings, "label_paddings")
  if label_pad.shape != y.shape:
    raise ValueError(f"label_paddings must have labels' shape {y.shape}, got "
                     f"label_paddings.shape={label_pad.shape}.")
  label_kept = label_pad == 0
  label_len = jnp.sum(label_kept, axis=1, dtype=jnp.int32)
  bad_label = label_kept & ((y < 0) | (y >= k) | (y == blank_id))
  _checks.value_check(~jnp.any(bad_label),
                      f"labels out of range [0, {k}) or equal to blank_id={blank_id} for some "
                      "kept label.")
  _checks.value_check(jnp.all(label_kept[:, :-1] | ~label_kept[:, 1:]),
                      "label_paddings is not right-padded (a kept label after padding).")
  bad = jnp.any(bad_label, axis=1)
  ext, skip = _extended(jnp.clip(y, 0, k - 1), blank_id)
  loss = _ctc(z, frame_pad == 0, ext, skip, label_len, bad, zero_infinity)
  return _checks.reduce(loss, reduction)
