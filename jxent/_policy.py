"""Clipped policy-gradient losses (PPO, GRPO and its variants) on per-token log-probabilities.

Per token, with the probability ratio :math:`r = e^{\\log p - \\log p_\\text{old}}` and an
advantage :math:`A`, PPO's clipped surrogate

.. math:: \\ell = -\\min(r A, \\mathrm{clip}(r, 1 - \\epsilon_\\text{low}, 1 +
   \\epsilon_\\text{high}) A) + \\beta \\left(e^{\\log p_\\text{ref} - \\log p} -
   (\\log p_\\text{ref} - \\log p) - 1\\right),

the last term the "k3" estimate of :math:`\\mathrm{KL}(p \\| p_\\text{ref})`, and one of the
normalisations of GRPO's family (the sum over the tokens with per-token weights). Each
token's loss is a function of its own log-probability (with GSPO's sequence ratio, of its
sequence's): :func:`linear_policy_loss` computes it from a linear head with
:func:`jxent.linear_log_prob_loss` (or whole sequences per block), each block of logits once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _lmhead as LH
from jxent._lmhead import linear_log_prob_loss, linear_log_probs

Array = jax.Array

LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo", "cispo", "sapo", "luspo", "vespo")


def _pair(value, name, zero=False):
  """A static pair of numbers (for non-negative or positive advantages, for negative ones),
  positive (``zero``: non-negative), or an error naming ``name``."""
  try:
    pos, neg = value
  except (TypeError, ValueError):
    raise TypeError(f"{name} must be a pair of numbers (for the advantages' two signs), got "
                    f"{value!r}.") from None
  out = (_checks.static_number(pos, f"{name}[0]"), _checks.static_number(neg, f"{name}[1]"))
  if not (min(out) >= 0 if zero else min(out) > 0):
    raise ValueError(f"{name} must be {'non-negative' if zero else 'positive'}, got "
                     f"{value!r}.")
  return out


class _Options:
  """The static options of the per-token loss (Python numbers and flags)."""

  def __init__(self, loss_type, epsilon_low, epsilon_high, beta, delta, sapo_temperatures,
               bias_corrected_kl, vespo_k=(2.0, 3.0), vespo_lambda=(3.0, 2.0)):
    if loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
    self.loss_type = loss_type
    self.eps_low = _checks.static_number(epsilon_low, "epsilon_low")
    self.eps_high = (self.eps_low if epsilon_high is None
                     else _checks.static_number(epsilon_high, "epsilon_high"))
    if self.eps_low < 0 or self.eps_high < 0:
      raise ValueError(f"epsilon_low and epsilon_high must be >= 0, got {epsilon_low!r} and "
                       f"{epsilon_high!r}.")
    self.beta = _checks.static_number(beta, "beta")
    self.delta = None if delta is None else _checks.static_number(delta, "delta")
    if self.delta is not None and not self.delta > 1:
      raise ValueError(f"delta (the upper clamp of the ratio) must exceed 1, got {delta!r}.")
    if self.delta is not None and loss_type in ("cispo", "sapo", "vespo"):
      raise ValueError(f"delta clamps the clipped objective's ratio; loss_type={loss_type!r} "
                       "has none.")
    self.tau = _pair(sapo_temperatures, "sapo_temperatures")
    self.vespo_k = _pair(vespo_k, "vespo_k", zero=True)
    self.vespo_lambda = _pair(vespo_lambda, "vespo_lambda")
    self.bias_corrected_kl = _checks.static_bool(bias_corrected_kl, "bias_corrected_kl")

  def _key(self):
    return (self.loss_type, self.eps_low, self.eps_high, self.beta, self.delta, self.tau,
            self.bias_corrected_kl, self.vespo_k, self.vespo_lambda)

  # Hashable by value: one per-token function per option set (``_token_fn``'s cache).
  def __hash__(self):
    return hash(self._key())

  def __eq__(self, other):
    return isinstance(other, _Options) and other._key() == self._key()


def _token_loss(lp, adv, old, ref, isw, opts, log_ratio=None, log_w=None):
  """One token's loss (elementwise on arrays too). ``old`` None: the on-policy ratio
  (``stop_gradient(lp)``, r = 1 with r's gradient); ``ref`` None: no KL term; ``isw``
  None: no importance weight; ``log_ratio``: the sequence's (GSPO), else the token's;
  ``log_w``: VESPO's log-weight of the token's sequence (``_vespo_log_w``)."""
  if log_ratio is None:
    log_ratio = lp - (jax.lax.stop_gradient(lp) if old is None else old)
  r = jnp.exp(log_ratio)
  if opts.loss_type == "vespo":  # a gamma-shaped weight of the sequence's ratio, held constant
    pos = adv >= 0
    k = jnp.where(pos, *opts.vespo_k)
    lam = jnp.where(pos, *opts.vespo_lambda)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))  # 1 at w = 1
    loss = -jax.lax.stop_gradient(jnp.where(jnp.isfinite(phi), phi, 0)) * adv * lp
    isw = None  # in the weight already
  elif opts.loss_type == "cispo":  # the ratio clipped above at epsilon_high, held constant
    loss = -jax.lax.stop_gradient(jnp.minimum(r, opts.eps_high)) * adv * lp
  elif opts.loss_type == "sapo":  # a soft gate: (4 / tau) sigmoid(tau (r - 1))
    tau = jnp.where(adv > 0, opts.tau[0], opts.tau[1])
    loss = -adv * (4 / tau) * jax.nn.sigmoid(tau * (r - 1))
  else:
    clipped = jnp.clip(r, 1 - opts.eps_low, 1 + opts.eps_high)
    r1 = r if opts.delta is None else jnp.minimum(r, opts.delta)
    loss = -jnp.minimum(r1 * adv, clipped * adv)
  if isw is not None:
    loss = loss * isw
  if opts.beta != 0:
    d = ref - lp
    kl = jnp.exp(d) - d - 1
    if opts.bias_corrected_kl:
      kl = kl * r
    loss = loss + opts.beta * kl
  return loss


def _optional(rest, has_old, has_ref, has_isw):
  """(old, ref, importance weight), None where absent, from the optional per-token arrays
  ``rest`` in that order (``_setup``'s)."""
  rest = list(rest)
  return tuple(rest.pop(0) if has else None for has in (has_old, has_ref, has_isw))


@functools.lru_cache(maxsize=64)
def _token_fn(opts, has_old, has_ref, has_isw):
  """The per-token loss as a function of (log p, advantage, [old], [ref], [weight]) for
  :func:`jxent.linear_log_prob_loss`: one function per option set (a static argument)."""
  def fn(lp, adv, *rest):
    return _token_loss(lp, adv, *_optional(rest, has_old, has_ref, has_isw), opts)

  return fn


def _sequence_log_ratio(lp, old, mask):
  """GSPO's log-ratio of each sequence, the mean over its kept tokens of log p - log p_old
  (``old`` None: the on-policy ``stop_gradient(lp)``), broadcast to its tokens ([..., T])."""
  old = jax.lax.stop_gradient(lp) if old is None else old
  d = jnp.where(mask, lp - old, 0)
  count = jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1).astype(lp.dtype)
  return jnp.broadcast_to(jnp.sum(d, axis=-1, keepdims=True) / count, lp.shape)


def _vespo_log_w(lp, old, isw, mask):
  """VESPO's (and TRL's ``get_gamma_weights``) log-weight of each sequence, broadcast to its
  tokens: the sum over its kept tokens of log p - log p_old (each clamped to [-20, 20]) and
  of the log importance weights (clamped to [log 1e-8, 20]), the total clamped to
  [log 1e-8, 20]; without derivative."""
  lp, old, isw = jax.lax.stop_gradient((lp, old, isw))
  floor = math.log(1e-8)
  d = jnp.zeros_like(lp) if old is None else jnp.clip(lp - old, -20, 20)
  if isw is not None:
    d = d + jnp.clip(jnp.log(jnp.where(mask, isw, 1)), floor, 20)
  total = jnp.sum(jnp.where(mask, d, 0), axis=-1, keepdims=True)
  return jnp.broadcast_to(jnp.clip(total, floor, 20), lp.shape)


def _sequence_terms(lp, kept, adv, old, ref, isw, opts):
  """The per-token losses [..., T] of a loss that needs whole sequences: VESPO's (its
  sequence weight) or GSPO's (its sequence ratio)."""
  if opts.loss_type == "vespo":
    return _token_loss(lp, adv, old, ref, isw, opts, log_w=_vespo_log_w(lp, old, isw, kept))
  return _token_loss(lp, adv, old, ref, isw, opts, _sequence_log_ratio(lp, old, kept))


@functools.lru_cache(maxsize=64)
def _sequence_fn(opts, has_old, has_ref, has_isw):
  """GSPO's or VESPO's loss of groups of one sequence ([G, T] tokens) for
  :func:`jxent._lmhead.group_loss`, its arguments per token: the advantage, [old], [ref],
  [importance weight], the loss type's token weight."""
  def fn(lp, kept, adv, *rest):
    old, ref, isw = _optional(rest[:-1], has_old, has_ref, has_isw)
    wt = rest[-1]
    loss = _sequence_terms(lp, kept, adv, old, ref, isw, opts)
    return jnp.sum(jnp.where(kept, wt * loss, 0), axis=-1)

  return fn


def _metrics(lp, args, mask, opts, has_old, sequence=False):
  """Liger's and TRL's monitoring numbers over the kept tokens, without derivative: the
  fraction of tokens whose ratio the clip holds (on the side that matters for the
  advantage's sign) and, with a KL term, the mean KL estimate."""
  lp, args = jax.lax.stop_gradient((lp, args))
  adv, rest = args[0], list(args[1:])
  old = rest.pop(0) if has_old else lp
  r = jnp.exp(_sequence_log_ratio(lp, old, mask) if sequence else lp - old)
  if opts.loss_type == "cispo":
    lower, upper = jnp.zeros_like(mask), r > opts.eps_high
  elif opts.loss_type in ("sapo", "vespo"):  # a soft gate, a weight: no clip
    lower = upper = jnp.zeros_like(mask)
  else:
    lower, upper = r < 1 - opts.eps_low, r > 1 + opts.eps_high
  clipped = (lower & (adv < 0)) | (upper & (adv > 0))
  count = jnp.maximum(jnp.sum(mask), 1).astype(lp.dtype)
  out = {"clip_ratio": jnp.sum(clipped & mask) / count}
  if opts.beta != 0:
    d = rest.pop(0) - lp
    kl = jnp.exp(d) - d - 1
    kl = kl * r if opts.bias_corrected_kl else kl
    out["kl"] = jnp.sum(jnp.where(mask, kl, 0)) / count
  return out


def _per_sequence(a, shape, name):
  """``a`` broadcast to the tokens' ``shape`` ([..., T]); an array of the sequences' shape
  ([...]) gets the token axis appended (one value per sequence)."""
  a = _checks.floating(a, name)
  if a.shape == shape[:-1] and a.shape != shape:
    a = a[..., None]
  try:
    return jnp.broadcast_to(a, shape)
  except ValueError:
    raise ValueError(f"{name} must have the sequences' shape {shape[:-1]} or broadcast to the "
                     f"tokens' shape {shape}, got shape {a.shape}.") from None


def _token_weights(mask, loss_type, max_completion_length, num_items_in_batch, acc):
  """Weights [..., T] whose sum with the per-token losses is the loss of ``loss_type``."""
  m = mask.astype(acc)
  num_seqs = math.prod(mask.shape[:-1])
  if loss_type in ("grpo", "sapo"):  # each sequence's mean, then the mean over sequences
    per_seq = jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1)
    return m / per_seq / num_seqs
  if loss_type == "dr_grpo":
    if max_completion_length is None:
      raise ValueError("loss_type='dr_grpo' divides by the number of sequences times "
                       "max_completion_length; give max_completion_length.")
    return m / (num_seqs * _checks.static_number(max_completion_length,
                                                 "max_completion_length"))
  if loss_type == "luspo":  # each token times its sequence's length, over B * T
    return m * jnp.sum(m, axis=-1, keepdims=True) / (num_seqs * mask.shape[-1])
  if loss_type in ("dapo", "cispo", "vespo") and num_items_in_batch is not None:
    return m / jnp.asarray(num_items_in_batch, acc)
  return m / jnp.maximum(jnp.sum(m), 1)  # bnpo (and dapo over this batch's tokens)


def _setup(shape, advantages, old_log_probs, ref_log_probs, importance_weights, where,
           loss_type, epsilon_low, epsilon_high, beta, delta, sapo_temperatures,
           bias_corrected_kl, max_completion_length, num_items_in_batch, level, acc, name,
           vespo_k, vespo_lambda):
  if len(shape) < 1:
    raise ValueError(f"{name} needs tokens laid out as [..., T] (sequences of T tokens), got "
                     f"shape {shape}.")
  opts = _Options(loss_type, epsilon_low, epsilon_high, beta, delta, sapo_temperatures,
                  bias_corrected_kl, vespo_k, vespo_lambda)
  if level not in ("token", "sequence"):
    raise ValueError("importance_sampling_level must be 'token' or 'sequence', got "
                     f"{level!r}.")
  if level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
    raise ValueError("importance_sampling_level='sequence' (GSPO) clips the sequence's ratio; "
                     f"loss_type={loss_type!r} has no such clip.")
  if opts.beta != 0 and ref_log_probs is None:
    raise ValueError(f"beta={beta!r} weighs the KL divergence from a reference policy: give "
                     "ref_log_probs (its log-probabilities of the same tokens).")
  args = [_per_sequence(advantages, shape, "advantages")]
  for a, nm in ((old_log_probs, "old_log_probs"),
                (ref_log_probs if opts.beta != 0 else None, "ref_log_probs"),
                (importance_weights, "importance_weights")):
    if a is not None:
      args.append(_per_sequence(a, shape, nm))
  if where is None:
    mask = jnp.ones(shape, bool)
  else:
    mask = _checks.as_array(where, "where")
    if mask.dtype != jnp.bool_ or mask.shape != shape:
      raise ValueError(f"where must be a boolean array of the tokens' shape {shape}, got "
                       f"{mask.dtype}{list(mask.shape)}.")
  wt = _token_weights(mask, loss_type, max_completion_length, num_items_in_batch, acc)
  fn = _token_fn(opts, old_log_probs is not None, opts.beta != 0,
                 importance_weights is not None)
  return fn, tuple(a.astype(acc) for a in args), mask, wt, opts


_ARGS_DOC = r"""
    advantages: float, the sequences' shape ``[...]`` (one advantage per sequence, as
      GRPO's) or the tokens' ``[..., T]`` (per token, as PPO's with GAE).
    old_log_probs: optional float ``[..., T]``: the log-probabilities of the same tokens
      under the policy that sampled them (the ratio's denominator). None: the on-policy
      ratio (:math:`r = 1`, its gradient that of :math:`\log p`).
    ref_log_probs: float ``[..., T]``, the reference policy's log-probabilities; needed when
      ``beta`` is not 0.
    where: optional boolean ``[..., T]``: the completion tokens (the loss mask); the others
      add nothing and get no gradient.
    loss_type: the normalisation (and for ``"cispo"``, ``"sapo"`` and ``"vespo"`` the
      objective), as
      Liger's and TRL's GRPO: ``"dapo"`` (default): the sum over the kept tokens divided by
      their number (or by ``num_items_in_batch``); ``"bnpo"``: the same, always by this
      batch's count; ``"grpo"``: each sequence's mean over its kept tokens, then the mean
      over the sequences; ``"dr_grpo"``: the sum divided by the number of sequences times
      ``max_completion_length``; ``"cispo"``: :math:`-\mathrm{sg}(\min(r,
      \epsilon_\text{high})) A \log p`, normalised as ``"dapo"`` (the clip bound is
      ``epsilon_high`` itself); ``"sapo"``: :math:`-A (4/\tau) \sigma(\tau (r - 1))`, a soft
      gate with ``tau`` from ``sapo_temperatures`` by the advantage's sign, normalised as
      ``"grpo"``; ``"luspo"``: the clipped loss, each token's times its sequence's number of
      kept tokens, divided by the number of sequences times ``T``; ``"vespo"``:
      :math:`-\mathrm{sg}(\phi(w)) A \log p`, normalised as ``"dapo"``, with
      :math:`\phi(w) = e^{\lambda} w^k e^{-\lambda w}` (1 at :math:`w = 1`) of the sequence's
      weight :math:`w`: the product of its kept tokens' ratios and importance weights
      (TRL's ``get_gamma_weights``: each log-ratio clamped to :math:`[-20, 20]`, each log
      importance weight and the total to :math:`[\log 10^{-8}, 20]`), :math:`k` and
      :math:`\lambda` from ``vespo_k`` and ``vespo_lambda`` by the advantage's sign; the
      importance weights enter :math:`w` only. GSPO's sequence ratio:
      ``importance_sampling_level``.
    epsilon_low: the ratio's lower clip, :math:`1 - \epsilon_\text{low}` (static).
    epsilon_high: the upper clip :math:`1 + \epsilon_\text{high}` (DAPO's clip-higher);
      None: ``epsilon_low`` (static).
    beta: the KL penalty's coefficient (static; 0: no reference policy).
    delta: optional upper clamp of the unclipped ratio (INTELLECT-2's two-sided clipping;
      not with ``"cispo"``, ``"sapo"`` or ``"vespo"``).
    sapo_temperatures: ``(tau_pos, tau_neg)`` of ``"sapo"`` (static).
    vespo_k: ``(k for A >= 0, k for A < 0)``, the gamma weight's shapes of ``"vespo"``
      (static; Liger's ``vespo_k_pos``, ``vespo_k_neg``).
    vespo_lambda: ``(lambda for A >= 0, lambda for A < 0)``, its rates (static, positive).
    bias_corrected_kl: multiply the KL estimate by the ratio :math:`r` (DeepSeek-V3.2's
      importance-sampling-corrected KL).
    importance_weights: optional float ``[..., T]`` (or ``[..., 1]``) factors of each token's
      policy term (vLLM's sampling correction, Liger's ``vllm_is_ratio``), not of the KL.
    max_completion_length: the length ``"dr_grpo"`` divides by.
    num_items_in_batch: optional number of kept tokens ``"dapo"``, ``"cispo"`` and
      ``"vespo"`` divide by (the whole generation batch's, when it is split into steps).
    importance_sampling_level: ``"token"`` (default): each token's own ratio; ``"sequence"``
      (GSPO): every token of a sequence takes the sequence's ratio :math:`r = e^{\bar\ell}`,
      :math:`\bar\ell` the mean over its kept tokens of :math:`\log p - \log
      p_\text{old}` (as Liger's and TRL's ``importance_sampling_level``; not with
      ``"cispo"``, ``"sapo"`` or ``"vespo"``; the KL term stays per token, times :math:`r`
      with ``bias_corrected_kl``).
    return_metrics: also return a dict of monitoring numbers over the kept tokens, without
      derivative (Liger's metrics): ``"clip_ratio"``, the fraction of tokens whose ratio is
      clipped on the side the advantage's sign acts on (``"cispo"``: above
      ``epsilon_high``; ``"sapo"``, ``"vespo"``: 0), and with ``beta`` not 0 ``"kl"``, the mean KL
      estimate (times the ratio with ``bias_corrected_kl``)."""


@_checks.options_doc(_ARGS_DOC)
def policy_loss(
    log_probs: ArrayLike,
    advantages: ArrayLike,
    *,
    old_log_probs: ArrayLike | None = None,
    ref_log_probs: ArrayLike | None = None,
    where: ArrayLike | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    delta: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo_k: tuple[float, float] = (2.0, 3.0),
    vespo_lambda: tuple[float, float] = (3.0, 2.0),
    bias_corrected_kl: bool = False,
    importance_weights: ArrayLike | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: ArrayLike | None = None,
    importance_sampling_level: str = "token",
    return_metrics: bool = False,
) -> Array | tuple[Array, dict]:
  r"""The clipped policy-gradient loss (PPO, GRPO, DAPO, Dr. GRPO, CISPO, SAPO, LUSPO, VESPO,
  GSPO) of per-token log-probabilities.

  .. math:: L = \sum_{i,t} w_{i,t} \Big[-\min\big(r A, \mathrm{clip}(r, 1 -
     \epsilon_\text{low}, 1 + \epsilon_\text{high}) A\big) + \beta \big(e^{\log
     p_\text{ref} - \log p} - (\log p_\text{ref} - \log p) - 1\big)\Big]_{i,t},
     \qquad r = e^{\log p - \log p_\text{old}},

  with the weights :math:`w` of ``loss_type``. The same loss as Liger's
  ``LigerFusedLinearGRPOLoss`` and TRL's ``GRPOTrainer`` (token-level importance sampling).
  From the logits of a linear head, :func:`linear_policy_loss` computes it without them.

  Args:
    log_probs: float ``[..., T]``: each sampled token's log-probability under the policy
      being trained (e.g. :func:`jxent.log_probs` of its logits), the only argument the loss
      is usually differentiated in (every argument is differentiable).<<options>>

  Returns:
    The scalar loss (float32, float64 for float64 inputs); 0 without kept tokens. With
    ``return_metrics``, ``(loss, metrics)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> lp = jnp.log(jnp.array([[0.5, 0.25], [0.5, 0.5]]))
  >>> adv = jnp.array([1.0, -1.0])  # one advantage per sequence
  >>> float(jxent.policy_loss(lp, adv))  # on-policy: the mean of -A, r = 1
  0.0
  >>> old = jnp.log(jnp.array([[0.25, 0.25], [0.5, 0.5]]))  # token 0: r = 2, clipped to 1.2
  >>> round(float(jxent.policy_loss(lp, adv, old_log_probs=old)), 6)  # (-1.2 - 1 + 1 + 1) / 4
  -0.05
  """
  lp = _checks.floating(log_probs, "log_probs")
  fn, args, mask, wt, opts = _setup(
      lp.shape, advantages, old_log_probs, ref_log_probs, importance_weights, where,
      loss_type, epsilon_low, epsilon_high, beta, delta, sapo_temperatures, bias_corrected_kl,
      max_completion_length, num_items_in_batch, importance_sampling_level, lp.dtype,
      "policy_loss", vespo_k, vespo_lambda)
  sequence = importance_sampling_level == "sequence"
  loss = _dense_loss(lp, args, mask, wt, opts, fn, old_log_probs is not None,
                     importance_weights is not None, sequence)
  if not _checks.static_bool(return_metrics, "return_metrics"):
    return loss
  safe = lambda a: jnp.where(mask, a, 0)
  return loss, _metrics(safe(lp), tuple(map(safe, args)), mask, opts,
                        old_log_probs is not None, sequence)


def _dense_loss(lp, args, mask, wt, opts, fn, has_old, has_isw, sequence):
  """The loss of per-token log-probabilities ``lp``; ``fn`` the per-token loss of
  ``_token_fn``, or with ``sequence`` GSPO's ratio of each sequence (VESPO: its weight)."""
  # Dropped tokens' inputs are replaced before the loss: whatever they hold (-inf, NaN)
  # reaches neither the value nor a gradient.
  safe = lambda a: jnp.where(mask, a, 0)
  lp, args = safe(lp), tuple(map(safe, args))
  if sequence or opts.loss_type == "vespo":
    old, ref, isw = _optional(args[1:], has_old, opts.beta != 0, has_isw)
    loss = _sequence_terms(lp, mask, args[0], old, ref, isw, opts)
  else:
    loss = fn(lp, *args)
  return jnp.sum(jnp.where(mask, wt * loss, 0))


@_checks.options_doc(_ARGS_DOC)
def linear_policy_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    advantages: ArrayLike,
    *,
    old_log_probs: ArrayLike | None = None,
    ref_log_probs: ArrayLike | None = None,
    where: ArrayLike | None = None,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    delta: float | None = None,
    sapo_temperatures: tuple[float, float] = (1.0, 1.05),
    vespo_k: tuple[float, float] = (2.0, 3.0),
    vespo_lambda: tuple[float, float] = (3.0, 2.0),
    bias_corrected_kl: bool = False,
    importance_weights: ArrayLike | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: ArrayLike | None = None,
    importance_sampling_level: str = "token",
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_metrics: bool = False,
) -> Array | tuple[Array, dict]:
  r""":func:`policy_loss` of ``log softmax((hidden @ weight + bias) / T)`` at ``labels``,
  without the logits (Liger's ``LigerFusedLinearGRPOLoss``).

  Each token's loss is a function of its own log-probability, so its gradient in the logits,
  :math:`w\, \ell'(\log p_y)\, (\mathrm{onehot}(y) - p) / T`, is formed beside the value one
  block of logits at a time (:func:`linear_log_prob_loss`): each block is computed once (the
  unfused computation's 6 N·D·V flops). With GSPO's sequence ratio or VESPO's sequence weight
  each chunk of tokens holds whole sequences, and the same holds; a sequence longer than a
  block is a chunk of its own, whose blocks are computed twice (for the log-probabilities,
  then for the gradient: 8 N·D·V flops, one block of memory), and tokens over an explicit
  mesh take the per-token log-probabilities (8 N·D·V flops). The reference policy's
  log-probabilities come from its own head without gradient (``linear_log_probs(ref_h,
  ref_W, labels)``: one forward pass), as the old policy's come from the rollout.

  Args:
    hidden: ``[..., T, D]`` activations of the sampled sequences (bf16 and f16 are
      accumulated in float32).
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: integer ``[..., T]``, the sampled tokens.<<options>>
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    temperature: :math:`T > 0` of the policy's softmax, a Python number (the sampling
      temperature).
    chunk_size: tokens per block on CPU (default ~64 MiB of float32 logits); on GPU and TPU
      vocabulary blocks of all tokens.

  Returns:
    The scalar loss, differentiable with respect to ``hidden``, ``weight``, ``bias`` and the
    per-token arrays, in every autodiff mode. With ``return_metrics``, ``(loss, metrics)``,
    the metrics also holding ``"log_probs"``: the ``[..., T]`` log-probabilities of the
    sampled tokens (0 on dropped ones) from the loss's own pass, for the next step's
    ``old_log_probs`` or for logging.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((2, 3, 4)); w = jnp.zeros((4, 8)); y = jnp.zeros((2, 3), int)
  >>> float(jxent.linear_policy_loss(h, w, y, jnp.array([1.0, 3.0])))  # -mean advantage
  -2.0
  """
  labels = _checks.as_array(labels, "labels")
  h = _checks.as_array(hidden, "hidden")
  acc = jnp.float64 if jnp.float64 in (h.dtype, jnp.result_type(weight)) else jnp.float32
  fn, args, mask, wt, opts = _setup(
      labels.shape, advantages, old_log_probs, ref_log_probs, importance_weights, where,
      loss_type, epsilon_low, epsilon_high, beta, delta, sapo_temperatures, bias_corrected_kl,
      max_completion_length, num_items_in_batch, importance_sampling_level, acc,
      "linear_policy_loss", vespo_k, vespo_lambda)
  return_metrics = _checks.static_bool(return_metrics, "return_metrics")
  has_old = old_log_probs is not None
  sequence = importance_sampling_level == "sequence"
  whole = sequence or opts.loss_type == "vespo"  # a loss that needs whole sequences
  seq_len = labels.shape[-1]
  common = dict(bias=bias, weight_layout=weight_layout, where=mask, temperature=temperature,
                chunk_size=chunk_size)
  if not whole:
    loss, lp = linear_log_prob_loss(h, weight, labels, fn, args, weights=wt, reduction="sum",
                                    return_log_probs=True, **common)
  elif LH.groups_fit(h, weight, weight_layout, seq_len, labels, where, *args):
    # Whole sequences per token chunk: each sequence's ratio (or weight), and so every
    # token's slope, from its chunk's own pass (each block of logits once; a sequence longer
    # than a block in blocks, each computed twice).
    sfn = _sequence_fn(opts, has_old, opts.beta != 0, importance_weights is not None)
    loss, lp = LH.group_loss(h, weight, labels, sfn, seq_len, args + (wt,), **common)
  else:  # tokens over a mesh: the per-token log-probabilities
    lp = linear_log_probs(h, weight, labels, **common)
    loss = _dense_loss(lp, args, mask, wt, opts, fn, has_old, importance_weights is not None,
                       True)
    lp = jax.lax.stop_gradient(lp)
  if not return_metrics:
    return loss
  safe = lambda a: jnp.where(mask, a, 0)
  metrics = _metrics(lp, tuple(map(safe, args)), mask, opts, has_old, sequence)
  return loss, {**metrics, "log_probs": lp}
