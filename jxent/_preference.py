"""Pairwise preference losses (DPO and its variants, IPO, CPO, SimPO, ORPO) of sequence
log-probabilities.

Each pair has a chosen and a rejected completion. With :math:`c` and :math:`r` their
log-probabilities under the policy (each sequence's sum over its tokens, or its mean), and
:math:`c_\\text{ref}`, :math:`r_\\text{ref}` under a reference policy (0 without one: CPO,
SimPO), DPO's implicit rewards are :math:`\\beta (c - c_\\text{ref})` and :math:`\\beta (r -
r_\\text{ref})`, and its loss is :math:`-\\log \\sigma` of their margin. :func:`preference_loss`
takes the sequences' log-probabilities; :func:`linear_preference_loss` computes them from a
linear head without the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _lmhead as LH
from jxent._lmhead import linear_log_probs

Array = jax.Array

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "discopop", "orpo")


def _log1mexp(x):
  """:math:`\\log(1 - e^x)` for :math:`x \\le 0`, accurate on both sides of -log 2 (-inf at
  0, NaN above)."""
  return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _pair_losses(c, r, rc, rr, loss_type, beta, eps, gamma, tau):
  """Each pair's loss ([...]) from the four log-probabilities (``rc``/``rr`` None: 0)."""
  dc = c if rc is None else c - rc  # log(pi / pi_ref) of the chosen completion
  dr = r if rr is None else r - rr
  ls = jax.nn.log_sigmoid
  x = beta * (dc - dr) - gamma  # the reward margin (SimPO's gamma subtracted)
  if loss_type == "sigmoid":  # DPO; with label_smoothing cDPO; without a reference CPO
    return -(1 - eps) * ls(x) - eps * ls(-x)
  if loss_type == "hinge":
    return jax.nn.relu(1 - x)
  if loss_type == "ipo":
    return (dc - dr - 1 / (2 * beta)) ** 2
  if loss_type == "robust":
    return (-(1 - eps) * ls(x) + eps * ls(-x)) / (1 - 2 * eps)
  if loss_type == "exo_pair":
    return (jax.nn.sigmoid(x) * (ls(x) - jnp.log1p(-eps))
            + jax.nn.sigmoid(-x) * (ls(-x) - jnp.log(eps)))
  if loss_type == "nca_pair":
    return -ls(beta * dc) - 0.5 * ls(-beta * dc) - 0.5 * ls(-beta * dr)
  if loss_type == "bco_pair":
    return -ls(beta * dc) - ls(-beta * dr)
  if loss_type == "sppo_hard":
    return (dc - 0.5 / beta) ** 2 + (dr + 0.5 / beta) ** 2
  if loss_type == "apo_zero":
    return 1 - jax.nn.sigmoid(beta * dc) + jax.nn.sigmoid(beta * dr)
  if loss_type == "apo_down":
    return jax.nn.sigmoid(beta * dc) + 1 - jax.nn.sigmoid(x)
  if loss_type == "discopop":
    # e^{-x} sigma(x / tau) as one exponential: finite where the product is (x -> -inf).
    mod = jax.nn.sigmoid(x / tau)
    return -ls(x) * (1 - mod) + jnp.exp(ls(x / tau) - x)
  # orpo: the log odds ratio of the two completions, log(p / (1 - p)), p = e^c
  log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
  return -beta * ls(log_odds)


def _options(loss_type, beta, label_smoothing, gamma, discopop_tau):
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}.")
  beta = _checks.static_number(beta, "beta")
  eps = _checks.static_number(label_smoothing, "label_smoothing")
  gamma = _checks.static_number(gamma, "gamma")
  tau = _checks.static_number(discopop_tau, "discopop_tau")
  if not beta > 0:
    raise ValueError(f"beta must be positive, got {beta!r}.")
  if loss_type == "exo_pair" and not 0 < eps < 1:
    raise ValueError("loss_type='exo_pair' needs 0 < label_smoothing < 1 (the preference "
                     f"labels' noise; the EXO paper uses 1e-3), got {label_smoothing!r}.")
  if loss_type == "robust" and not 0 <= eps < 0.5:
    raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got "
                     f"{label_smoothing!r}.")
  if loss_type == "sigmoid" and not 0 <= eps <= 0.5:
    raise ValueError(f"label_smoothing (cDPO's flipped-label fraction) must lie in [0, 0.5], "
                     f"got {label_smoothing!r}.")
  if eps != 0 and loss_type not in ("sigmoid", "robust", "exo_pair"):
    raise ValueError(f"label_smoothing applies to loss_type 'sigmoid', 'robust' and "
                     f"'exo_pair', not {loss_type!r}.")
  if gamma != 0 and loss_type not in ("sigmoid", "hinge"):
    raise ValueError(f"gamma (SimPO's target margin) applies to loss_type 'sigmoid' and "
                     f"'hinge', not {loss_type!r}.")
  if not tau > 0:
    raise ValueError(f"discopop_tau must be positive, got {discopop_tau!r}.")
  return beta, eps, gamma, tau


def _metrics(c, r, rc, rr, beta, keep):
  """TRL's and Liger's monitoring numbers, means over the kept pairs, without derivative."""
  c, r, rc, rr = jax.lax.stop_gradient((c, r, rc, rr))
  rew_c = beta * (c if rc is None else c - rc)
  rew_r = beta * (r if rr is None else r - rr)
  count = jnp.maximum(jnp.sum(keep), 1).astype(c.dtype)
  mean = lambda a: jnp.sum(jnp.where(keep, a, 0)) / count
  return {"chosen_rewards": mean(rew_c), "rejected_rewards": mean(rew_r),
          "reward_accuracy": mean((rew_c > rew_r).astype(c.dtype)),
          "reward_margin": mean(rew_c - rew_r), "chosen_log_probs": mean(c),
          "rejected_log_probs": mean(r)}


def _mask(where, shape, what):
  """``where`` as a boolean mask of ``shape`` (all True for None); ``what`` names the shape."""
  if where is None:
    return jnp.ones(shape, bool)
  mask = _checks.as_array(where, "where")
  if mask.dtype != jnp.bool_ or mask.shape != shape:
    raise ValueError(f"where must be a boolean array of the {what} shape {shape}, got "
                     f"{mask.dtype}{list(mask.shape)}.")
  return mask


def _broadcast(a, shape, name, what):
  """The float array ``a`` broadcast to ``shape`` (``what`` names it), or a ValueError."""
  a = _checks.floating(a, name)
  try:
    return jnp.broadcast_to(a, shape)
  except ValueError:
    raise ValueError(f"{name} must broadcast to the {what} shape {shape}, got shape "
                     f"{a.shape}.") from None


_ARGS_DOC = r"""
    loss_type: with :math:`x = \beta ((c - c_\text{ref}) - (r - r_\text{ref})) - \gamma`,
      the per-pair loss, as TRL's ``DPOTrainer`` and Liger's ``LigerFusedLinearDPOLoss``:
      ``"sigmoid"`` (default; DPO, and CPO and SimPO without a reference):
      :math:`-(1 - \epsilon) \log \sigma(x) - \epsilon \log \sigma(-x)` (cDPO's label
      smoothing :math:`\epsilon`); ``"hinge"``: :math:`\max(0, 1 - x)`; ``"ipo"``:
      :math:`(\Delta_c - \Delta_r - 1/(2\beta))^2` (IPO takes each sequence's mean
      log-probability); ``"robust"``: :math:`(-(1 - \epsilon) \log \sigma(x) + \epsilon
      \log \sigma(-x)) / (1 - 2\epsilon)`; ``"exo_pair"``: :math:`\mathrm{KL}` of
      :math:`(\sigma(x), \sigma(-x))` from :math:`(1 - \epsilon, \epsilon)`, :math:`0 <
      \epsilon < 1`; ``"nca_pair"``: :math:`-\log \sigma(\beta \Delta_c) - \tfrac12 \log
      \sigma(-\beta \Delta_c) - \tfrac12 \log \sigma(-\beta \Delta_r)`; ``"bco_pair"``:
      :math:`-\log \sigma(\beta \Delta_c) - \log \sigma(-\beta \Delta_r)` (Liger's: without
      TRL's running reward mean); ``"sppo_hard"``: :math:`(\Delta_c - 1/(2\beta))^2 +
      (\Delta_r + 1/(2\beta))^2`; ``"apo_zero"``: :math:`1 - \sigma(\beta \Delta_c) +
      \sigma(\beta \Delta_r)`; ``"apo_down"``: :math:`\sigma(\beta \Delta_c) + 1 -
      \sigma(x)`; ``"discopop"``: :math:`-\log \sigma(x) (1 - \sigma(x/\tau)) + e^{-x}
      \sigma(x/\tau)`; ``"orpo"``: :math:`-\beta \log \sigma(\log \frac{e^c / (1 -
      e^c)}{e^r / (1 - e^r)})`, the odds ratio (no reference; ORPO takes each sequence's mean
      log-probability). Here :math:`\Delta_c = c - c_\text{ref}`, :math:`\Delta_r = r -
      r_\text{ref}`.
    beta: :math:`\beta > 0` (static): the rewards' scale (DPO's KL coefficient; ORPO's
      :math:`\lambda`).
    label_smoothing: :math:`\epsilon` of ``"sigmoid"`` (in [0, 0.5]), ``"robust"`` ([0,
      0.5)) and ``"exo_pair"`` ((0, 1)) (static).
    gamma: SimPO's target margin :math:`\gamma` of ``"sigmoid"`` and ``"hinge"`` (static; 0
      elsewhere).
    discopop_tau: :math:`\tau > 0` of ``"discopop"`` (static).
    reduction: ``"mean"`` (over the kept pairs; 0 without any), ``"sum"`` or ``"none"``
      (each pair's loss, 0 on dropped ones).
    return_metrics: also return a dict of means over the kept pairs, without derivative
      (TRL's logged numbers): ``"chosen_rewards"`` and ``"rejected_rewards"``
      (:math:`\beta \Delta_c`, :math:`\beta \Delta_r`), ``"reward_accuracy"`` (the fraction
      with :math:`\Delta_c > \Delta_r`), ``"reward_margin"``, ``"chosen_log_probs"`` and
      ``"rejected_log_probs"``."""


@_checks.options_doc(_ARGS_DOC)
def preference_loss(
    chosen_log_probs: ArrayLike,
    rejected_log_probs: ArrayLike,
    *,
    ref_chosen_log_probs: ArrayLike | None = None,
    ref_rejected_log_probs: ArrayLike | None = None,
    where: ArrayLike | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> Array | tuple[Array, dict]:
  r"""The pairwise preference loss (DPO and its variants, CPO, SimPO, IPO, ORPO) of the
  sequences' log-probabilities.

  .. math:: \ell = -\log \sigma\big(\beta ((c - c_\text{ref}) - (r - r_\text{ref})) -
     \gamma\big)

  for the default ``"sigmoid"`` (DPO), with :math:`c` and :math:`r` the log-probabilities of
  a pair's chosen and rejected completions under the policy being trained and
  :math:`c_\text{ref}`, :math:`r_\text{ref}` under the reference policy (0 when not given:
  CPO; with :math:`\gamma` and mean log-probabilities, SimPO). Computed in log space
  (``log_sigmoid``): finite for any finite margin; the limits :math:`c \to -\infty` give
  ``inf`` where the loss grows without bound. From a linear head,
  :func:`linear_preference_loss` computes :math:`c` and :math:`r` without the logits.

  Args:
    chosen_log_probs: float ``[...]``, one per pair: the chosen completion's
      log-probability (the sum of its tokens' log-probabilities, or their mean for
      ``"ipo"``, ``"orpo"`` and SimPO). Every argument is differentiable.
    rejected_log_probs: float ``[...]``, the same shape, for the rejected completion.
    ref_chosen_log_probs: optional float ``[...]`` (broadcast), the reference policy's; None:
      0 (reference-free).
    ref_rejected_log_probs: optional, the same for the rejected completions.
    where: optional boolean ``[...]``: the pairs to keep.<<options>>

  Returns:
    The loss (float32, float64 for float64 inputs), or ``(loss, metrics)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> c, r = jnp.array([-5.0, -8.0]), jnp.array([-9.0, -6.0])
  >>> loss = jxent.preference_loss(c, r, beta=0.5, reduction="none")  # margins 2 and -1
  >>> [round(float(v), 4) for v in loss]  # -log sigmoid(2), -log sigmoid(-1)
  [0.1269, 1.3133]
  """
  c = _checks.floating(chosen_log_probs, "chosen_log_probs")
  r = _checks.floating(rejected_log_probs, "rejected_log_probs")
  _checks.same_shape(c, r, "chosen_log_probs", "rejected_log_probs")
  refs = [None if a is None else _broadcast(a, c.shape, name, "pairs'")
          for a, name in ((ref_chosen_log_probs, "ref_chosen_log_probs"),
                          (ref_rejected_log_probs, "ref_rejected_log_probs"))]
  dtype = jnp.result_type(c, r, *(a for a in refs if a is not None))
  c, r = c.astype(dtype), r.astype(dtype)
  rc, rr = (None if a is None else a.astype(dtype) for a in refs)
  return _loss(c, r, rc, rr, where, loss_type, beta, label_smoothing, gamma, discopop_tau,
               reduction, return_metrics)


def _loss(c, r, rc, rr, where, loss_type, beta, label_smoothing, gamma, discopop_tau,
          reduction, return_metrics, extra=None):
  beta, eps, gamma, tau = _options(loss_type, beta, label_smoothing, gamma, discopop_tau)
  reduction = _checks.reduction(reduction)
  return_metrics = _checks.static_bool(return_metrics, "return_metrics")
  if loss_type == "orpo" and (rc is not None or rr is not None):
    raise ValueError(_ORPO_REF)
  keep = _mask(where, c.shape, "pairs'")
  # Dropped pairs' inputs replaced first: whatever they hold reaches no value or gradient.
  safe = lambda a: None if a is None else jnp.where(keep, a, -1.0)
  losses = jnp.where(keep, _pair_losses(safe(c), safe(r), safe(rc), safe(rr), loss_type,
                                        beta, eps, gamma, tau), 0)
  loss = _checks.reduce(losses, reduction, jnp.sum(keep))
  if not return_metrics:
    return loss
  metrics = _metrics(safe(c), safe(r), safe(rc), safe(rr), beta, keep)
  return loss, {**metrics, **(extra or {})}


def _head_sequences(hidden, weight, labels, where, ref_log_probs, average, bias, weight_layout,
                    temperature, chunk_size):
  """(the tokens' log-probabilities [..., T] (0 on dropped ones), the kept tokens, the
  sequences' log-probabilities [...], the reference's [...] or None) from a linear head."""
  mask = _mask(where, labels.shape, "labels'")
  lp = linear_log_probs(hidden, weight, labels, bias=bias, weight_layout=weight_layout,
                        where=mask, temperature=temperature, chunk_size=chunk_size)
  seq = _sequence_log_probs(lp, mask, average)
  ref, per_seq = _ref_tokens(ref_log_probs, labels.shape)
  if ref is not None:
    ref = _ref_sequences(ref, mask, average, per_seq).astype(seq.dtype)
  return lp, mask, seq, ref


def _sequence_log_probs(lp, mask, average):
  """Each sequence's sum of its kept tokens' log-probabilities ([..., T] -> [...]), or with
  ``average`` their mean (0 for a sequence without kept tokens)."""
  total = jnp.sum(jnp.where(mask, lp, 0), axis=-1)
  if not average:
    return total
  count = jnp.sum(mask, axis=-1)
  return total / jnp.maximum(count, 1).astype(total.dtype)


@_checks.options_doc(_ARGS_DOC)
def linear_preference_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    ref_log_probs: ArrayLike | None = None,
    where: ArrayLike | None = None,
    average_log_prob: bool = False,
    nll_weight: float = 0.0,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.0,
    discopop_tau: float = 0.05,
    reduction: str = "mean",
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_metrics: bool = False,
) -> Array | tuple[Array, dict]:
  r""":func:`preference_loss` of the sequences' log-probabilities under ``softmax((hidden @
  weight + bias) / T)``, without the logits (Liger's ``LigerFusedLinearDPOLoss``,
  ``…CPOLoss``, ``…SimPOLoss``, ``…ORPOLoss``).

  The chosen and rejected completions are stacked on a leading axis of 2: ``hidden[0]``
  holds the chosen ones, ``hidden[1]`` the rejected ones of the same pairs (Liger's and
  TRL's concatenated batch ``[2B, T, D]``, chosen first, is ``h.reshape(2, B, T, D)``). A
  sequence's log-probability is the sum of its kept tokens' (their mean with
  ``average_log_prob``), computed one block of logits at a time. A pair's loss depends on
  both whole sequences, so each block of tokens holds whole pairs (as many as fit in
  ``chunk_size`` tokens): the slope of every token's log-probability is then known in its
  block's own pass, and the gradient is formed beside the value, each block once (the
  unfused computation's 6 N·D·V flops), in every autodiff mode. A pair longer than a block
  is taken in blocks, each computed twice (for the log-probabilities, then for the
  gradient: 8 N·D·V flops, one block of memory); ``reduction="none"`` and tokens over an
  explicit mesh take the per-token :func:`linear_log_probs` instead, whose derivative
  computes the blocks again (8 N·D·V flops, O(N) memory).

  .. math:: L = \mathrm{reduce}_\text{pairs}\, \ell(c, r, c_\text{ref}, r_\text{ref}) +
     \lambda_\text{nll} \cdot \frac{-\sum_{t \in \text{chosen}} \log p_{y_t}}
     {|\text{chosen tokens}|}

  (the second term: CPO's and ORPO's negative log-likelihood of the chosen completions, the
  mean over their kept tokens, as Liger's ``compute_nll_loss``).

  Args:
    hidden: ``[2, ..., T, D]`` activations (chosen, then rejected; bf16 and f16 accumulated
      in float32).
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: integer ``[2, ..., T]`` completion tokens.
    ref_log_probs: optional float, the reference policy's log-probabilities of the same
      tokens, ``[2, ..., T]`` (aggregated as the policy's, with the same mask) or per
      sequence ``[2, ...]`` (as given), e.g. ``linear_log_probs(ref_h, ref_W, labels)``
      without gradient. None: reference-free (CPO, SimPO, ORPO).
    where: optional boolean ``[2, ..., T]``: the completion tokens (the prompt and padding
      dropped); a pair is dropped from the loss where either sequence has no kept token.
    average_log_prob: each sequence's mean log-probability instead of its sum (IPO, SimPO,
      ORPO; static).
    nll_weight: :math:`\lambda_\text{nll}` (static; 0: no term; not with
      ``reduction="none"``).<<options>>
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    temperature: :math:`T > 0` of the softmax (static).
    chunk_size: tokens per block on CPU (default ~64 MiB of float32 logits), holding whole
      pairs (a longer pair in blocks); on GPU and TPU vocabulary blocks of all tokens.

  Returns:
    The loss, differentiable with respect to ``hidden``, ``weight``, ``bias`` and
    ``ref_log_probs`` in every autodiff mode. With ``return_metrics``, ``(loss, metrics)``,
    the metrics also holding ``"nll"`` (the chosen tokens' mean negative log-likelihood).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.zeros((2, 3, 5, 4)); w = jnp.zeros((4, 8)); y = jnp.zeros((2, 3, 5), int)
  >>> round(float(jxent.linear_preference_loss(h, w, y)), 6)  # equal rewards: log 2
  0.693147
  """
  labels = _checks.integer(labels, "labels")
  if labels.ndim < 2 or labels.shape[0] != 2:
    raise ValueError("linear_preference_loss takes the chosen and the rejected completions "
                     "stacked on a leading axis of 2: labels [2, ..., T], got shape "
                     f"{labels.shape}.")
  average = _checks.static_bool(average_log_prob, "average_log_prob")
  reduction = _checks.reduction(reduction)
  nll_weight = _checks.static_number(nll_weight, "nll_weight")
  if nll_weight != 0 and reduction == "none":
    raise ValueError("nll_weight adds one number (the chosen tokens' mean negative "
                     "log-likelihood) to the loss; with reduction='none' (per pair) take it "
                     "from return_metrics' 'nll' instead.")
  length = 2 * labels.shape[-1]
  if reduction == "none" or not LH.groups_fit(hidden, weight, weight_layout, length, labels,
                                            where, ref_log_probs):
    lp, mask, seq, ref = _head_sequences(hidden, weight, labels, where, ref_log_probs,
                                         average, bias, weight_layout, temperature,
                                         chunk_size)
    keep = jnp.all(jnp.any(mask, axis=-1), axis=0)
    nll = _chosen_nll(lp, mask)
    out = _loss(seq[0], seq[1], None if ref is None else ref[0],
                None if ref is None else ref[1], keep, loss_type, beta, label_smoothing,
                gamma, discopop_tau, reduction, return_metrics,
                extra={"nll": jax.lax.stop_gradient(nll)})
    loss, metrics = out if return_metrics else (out, None)
    if nll_weight != 0:
      loss = loss + nll_weight * nll
    return (loss, metrics) if return_metrics else loss
  # Each pair's two sequences side by side ([..., 2, T]), so that token chunks hold whole
  # pairs and each block of logits is computed once.
  opts = _options(loss_type, beta, label_smoothing, gamma, discopop_tau)
  return_metrics = _checks.static_bool(return_metrics, "return_metrics")
  if loss_type == "orpo" and ref_log_probs is not None:
    raise ValueError(_ORPO_REF)
  mask = _mask(where, labels.shape, "labels'")
  ref, per_seq = _ref_tokens(ref_log_probs, labels.shape)
  keep = jnp.all(jnp.any(mask, axis=-1), axis=0)
  acc = _acc(hidden, weight)
  inv_pairs = jnp.asarray(1 / jnp.maximum(jnp.sum(keep), 1) if reduction == "mean" else 1,
                          acc)
  inv_chosen = (1 / jnp.maximum(jnp.sum(mask[0]), 1)).astype(acc)
  pairs = lambda a: jnp.moveaxis(a, 0, -2)
  args = ([] if ref is None else [pairs(ref)]) + [
      jnp.broadcast_to(inv_pairs, labels.shape), jnp.broadcast_to(inv_chosen, labels.shape)]
  fn = _pair_group_fn(loss_type, *opts, average, nll_weight, length, ref is not None,
                      per_seq)
  loss, lp = LH.group_loss(jnp.moveaxis(_checks.as_array(hidden, "hidden"), 0, -3), weight,
                           pairs(labels), fn, length, args, bias=bias,
                           weight_layout=weight_layout, where=pairs(mask),
                           temperature=temperature, chunk_size=chunk_size)
  if not return_metrics:
    return loss
  lp = jnp.moveaxis(lp, -2, 0)
  seq = _sequence_log_probs(lp, mask, average)
  rs = None if ref is None else _ref_sequences(ref, mask, average, per_seq)
  nll = _chosen_nll(lp, mask)
  safe = lambda a: None if a is None else jnp.where(keep, a, -1.0)
  metrics = _metrics(safe(seq[0]), safe(seq[1]), safe(None if rs is None else rs[0]),
                     safe(None if rs is None else rs[1]), opts[0], keep)
  return loss, {**metrics, "nll": nll}


_ORPO_REF = ("loss_type='orpo' (the odds ratio) has no reference policy; give no reference "
             "log-probabilities.")


def _chosen_nll(lp, mask):
  """The chosen completions' tokens' mean negative log-likelihood ([2, ..., T] inputs)."""
  return -_checks.mean_of(jnp.sum(jnp.where(mask[0], lp[0], 0)), jnp.sum(mask[0]))


def _acc(hidden, weight):
  return (jnp.float64 if jnp.float64 in (jnp.result_type(hidden), jnp.result_type(weight))
          else jnp.float32)


def _ref_tokens(ref_log_probs, shape):
  """(the reference's log-probabilities broadcast to the tokens' ``shape``, whether they were
  given per sequence), or (None, False)."""
  if ref_log_probs is None:
    return None, False
  ref = _checks.floating(ref_log_probs, "ref_log_probs")
  if ref.shape == shape:
    return ref, False
  if ref.shape != shape[:-1]:
    raise ValueError(f"ref_log_probs must have the labels' shape {shape} (per token) or the "
                     f"sequences' {shape[:-1]}, got shape {ref.shape}.")
  return jnp.broadcast_to(ref[..., None], shape), True


def _ref_sequences(ref, mask, average, per_seq):
  """The reference's sequence log-probabilities from its per-token array: one given per
  sequence (broadcast) is its kept tokens' mean, so that its slope reaches it whole."""
  return _sequence_log_probs(ref, mask, average or per_seq)


@functools.lru_cache(maxsize=64)
def _pair_group_fn(loss_type, beta, eps, gamma, tau, average, nll_weight, length, has_ref,
                   ref_per_seq):
  """The loss of groups of a pair's two sequences ([G, 2T] tokens, chosen first) for
  :func:`jxent._lmhead.group_loss`, its arguments per token: [the reference's
  log-probabilities,] 1 / the kept pairs (or 1), 1 / the kept chosen tokens."""
  t = length // 2

  def fn(lp, kept, *args):
    args = list(args)
    ref = args.pop(0) if has_ref else None
    inv_pairs, inv_chosen = (a[:, 0] for a in args)
    split = lambda a: a.reshape(a.shape[0], 2, t)
    lp, kept = split(lp), split(kept)
    seq = _sequence_log_probs(lp, kept, average)
    rs = None if ref is None else _ref_sequences(split(ref), kept, average, ref_per_seq)
    keep = jnp.all(jnp.any(kept, axis=-1), axis=-1)
    safe = lambda a: jnp.where(keep, a, -1.0)
    losses = _pair_losses(safe(seq[:, 0]), safe(seq[:, 1]),
                          None if rs is None else safe(rs[:, 0]),
                          None if rs is None else safe(rs[:, 1]), loss_type, beta, eps, gamma,
                          tau)
    losses = jnp.where(keep, losses, 0) * inv_pairs
    if nll_weight != 0:  # the chosen tokens' share of their mean negative log-likelihood
      losses = losses - nll_weight * inv_chosen * jnp.sum(
          jnp.where(kept[:, 0], lp[:, 0], 0), axis=-1)
    return losses

  return fn


# ------------------------------------------------------------------------------------ KTO


def _kto_options(beta, desirable_weight, undesirable_weight):
  beta = _checks.static_number(beta, "beta")
  if not beta > 0:
    raise ValueError(f"beta must be positive, got {beta!r}.")
  wd = _checks.static_number(desirable_weight, "desirable_weight")
  wu = _checks.static_number(undesirable_weight, "undesirable_weight")
  if wd < 0 or wu < 0:
    raise ValueError(f"desirable_weight and undesirable_weight must be >= 0, got {wd!r} and "
                     f"{wu!r}.")
  return beta, wd, wu


def _kto_losses(s, ref, kl, preferred, keep, beta, wd, wu):
  """Each kept sequence's KTO loss ([...]), 0 on the others; (the losses, log(pi / pi_ref))."""
  safe = lambda a: None if a is None else jnp.where(keep, a, -1.0)
  s, ref = safe(s), safe(ref)
  lr = s if ref is None else s - ref  # log(pi / pi_ref)
  d = lr if kl is None else lr - jnp.where(keep, kl, 0)
  # 1 - sigmoid(beta d) as sigmoid(-beta d): no cancellation where the loss is small.
  losses = jnp.where(preferred, wd * jax.nn.sigmoid(-beta * d),
                     wu * jax.nn.sigmoid(beta * d))
  return jnp.where(keep, losses, 0), lr


def _kto_metrics(s, lr, preferred, keep, beta):
  lr, s = jax.lax.stop_gradient((lr, s))
  mean = lambda a, m: jnp.sum(jnp.where(m, a, 0)) / jnp.maximum(jnp.sum(m), 1).astype(a.dtype)
  good, bad = keep & preferred, keep & ~preferred
  return {"chosen_rewards": mean(beta * lr, good), "rejected_rewards": mean(beta * lr, bad),
          "chosen_log_probs": mean(s, good), "rejected_log_probs": mean(s, bad)}


def _kto(s, ref, kl, preferred, keep, beta, desirable_weight, undesirable_weight, reduction,
         return_metrics):
  """KTO's loss of the sequences' log-probabilities ``s`` ([...]) and its metrics."""
  beta, wd, wu = _kto_options(beta, desirable_weight, undesirable_weight)
  reduction = _checks.reduction(reduction)
  return_metrics = _checks.static_bool(return_metrics, "return_metrics")
  losses, lr = _kto_losses(s, ref, kl, preferred, keep, beta, wd, wu)
  loss = _checks.reduce(losses, reduction, jnp.sum(keep))
  if not return_metrics:
    return loss
  return loss, _kto_metrics(jnp.where(keep, s, -1.0), lr, preferred, keep, beta)


@functools.lru_cache(maxsize=64)
def _kto_group_fn(beta, wd, wu, average, has_ref, ref_per_seq, has_kl):
  """KTO's loss of groups of one sequence ([G, T] tokens) for
  :func:`jxent._lmhead.group_loss`, its arguments per token: [the reference's
  log-probabilities,] [the KL point,] preferred (1 or 0), 1 / the kept sequences (or 1)."""

  def fn(lp, kept, *args):
    args = list(args)
    ref = args.pop(0) if has_ref else None
    kl = args.pop(0) if has_kl else None
    pref, inv = args
    s = _sequence_log_probs(lp, kept, average)
    rs = None if ref is None else _ref_sequences(ref, kept, average, ref_per_seq)
    kl = None if kl is None else _sequence_log_probs(kl, kept, True)  # one per sequence
    keep = jnp.any(kept, axis=-1)
    preferred = jnp.max(jnp.where(kept, pref, 0), axis=-1) > 0.5
    losses, _ = _kto_losses(s, rs, kl, preferred, keep, beta, wd, wu)
    return losses * inv[:, 0]

  return fn


def _kto_inputs(shape, preferred, kl, where, dtype):
  preferred = _checks.as_array(preferred, "preferred")
  if preferred.dtype != jnp.bool_ or preferred.shape != shape:
    raise ValueError(f"preferred must be a boolean array of the sequences' shape {shape} "
                     f"(True: a desirable completion), got {preferred.dtype}"
                     f"{list(preferred.shape)}.")
  if kl is not None:
    kl = _broadcast(kl, shape, "kl", "sequences'").astype(dtype)
  return preferred, kl, _mask(where, shape, "sequences'")


_KTO_DOC = r"""
    kl: optional float, a scalar or ``[...]``: KTO's reference point :math:`z_0`, an estimate
      of :math:`\mathrm{KL}(\pi \| \pi_\text{ref})` (TRL's: the clamped mean log-ratio of
      mismatched completions, without gradient; the caller decides whether it carries one).
      None: 0.
    beta: :math:`\beta > 0` (static).
    desirable_weight: :math:`\lambda_D \ge 0`, the desirable completions' weight (static).
    undesirable_weight: :math:`\lambda_U \ge 0`, the undesirable ones' (static).
    reduction: ``"mean"`` (over the kept sequences; 0 without any), ``"sum"`` or ``"none"``.
    return_metrics: also return a dict of means without derivative: ``"chosen_rewards"`` and
      ``"rejected_rewards"`` (:math:`\beta (s - s_\text{ref})` over the desirable and the
      undesirable kept sequences), ``"chosen_log_probs"`` and ``"rejected_log_probs"``."""


@_checks.options_doc(_KTO_DOC)
def kto_loss(
    log_probs: ArrayLike,
    preferred: ArrayLike,
    *,
    ref_log_probs: ArrayLike | None = None,
    kl: ArrayLike | None = None,
    where: ArrayLike | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> Array | tuple[Array, dict]:
  r"""Kahneman–Tversky optimisation (KTO): an unpaired preference loss of the sequences'
  log-probabilities.

  .. math:: \ell = \begin{cases} \lambda_D \big(1 - \sigma(\beta (\Delta - z_0))\big) &
     \text{desirable} \\ \lambda_U \big(1 - \sigma(\beta (z_0 - \Delta))\big) &
     \text{undesirable} \end{cases}, \qquad \Delta = s - s_\text{ref},

  with :math:`s` and :math:`s_\text{ref}` a completion's log-probability under the policy and
  the reference policy and :math:`z_0` the KL reference point (as TRL's ``KTOTrainer`` and
  Liger's ``LigerFusedLinearKTOLoss``). Each loss lies in :math:`[0, \lambda]`; computed as
  :math:`\sigma(\mp\beta(\Delta - z_0))`, without the cancellation of :math:`1 - \sigma`.
  From a linear head, :func:`linear_kto_loss`.

  Args:
    log_probs: float ``[...]``, each completion's log-probability (the sum, or the mean, of
      its tokens'). Every float argument is differentiable.
    preferred: boolean ``[...]``: True for a desirable completion, False for an undesirable
      one.
    ref_log_probs: optional float ``[...]``, the reference policy's; None: 0.
    where: optional boolean ``[...]``: the sequences to keep.<<options>>

  Returns:
    The loss (float32, float64 for float64 inputs), or ``(loss, metrics)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> s = jnp.array([-4.0, -4.0]); ref = jnp.array([-6.0, -6.0])  # both 2 nats likelier
  >>> out = jxent.kto_loss(s, jnp.array([True, False]), ref_log_probs=ref, beta=1.0,
  ...                      reduction="none")
  >>> [round(float(v), 4) for v in out]  # sigmoid(-2): good; sigmoid(2): bad
  [0.1192, 0.8808]
  """
  s = _checks.floating(log_probs, "log_probs")
  ref = (None if ref_log_probs is None
         else _broadcast(ref_log_probs, s.shape, "ref_log_probs", "log_probs'"))
  dtype = s.dtype if ref is None else jnp.result_type(s, ref)
  preferred, kl, keep = _kto_inputs(s.shape, preferred, kl, where, dtype)
  return _kto(s.astype(dtype), None if ref is None else ref.astype(dtype), kl, preferred, keep,
              beta, desirable_weight, undesirable_weight, reduction, return_metrics)


@_checks.options_doc(_KTO_DOC)
def linear_kto_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    preferred: ArrayLike,
    *,
    ref_log_probs: ArrayLike | None = None,
    kl: ArrayLike | None = None,
    where: ArrayLike | None = None,
    average_log_prob: bool = False,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reduction: str = "mean",
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_metrics: bool = False,
) -> Array | tuple[Array, dict]:
  r""":func:`kto_loss` of the sequences' log-probabilities under ``softmax((hidden @ weight +
  bias) / T)``, without the logits (Liger's ``LigerFusedLinearKTOLoss``).

  A sequence's log-probability is the sum of its kept tokens' (their mean with
  ``average_log_prob``), one block of logits at a time; a sequence without kept tokens is
  dropped. As for :func:`linear_preference_loss`, each block holds whole sequences, so its
  gradient is formed in its own pass (each block once; a sequence longer than a block is
  taken in blocks, each computed twice), unless ``reduction="none"`` or the tokens lie over
  an explicit mesh.

  Args:
    hidden: ``[..., T, D]`` activations of the completions (bf16 and f16 accumulated in
      float32).
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: integer ``[..., T]`` completion tokens.
    preferred: boolean ``[...]``, one per completion: True if desirable.
    ref_log_probs: optional float ``[..., T]`` (aggregated as the policy's) or ``[...]`` (as
      given): the reference policy's log-probabilities; None: 0.
    where: optional boolean ``[..., T]``: the completion tokens.
    average_log_prob: each sequence's mean log-probability instead of its sum
      (static).<<options>>
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    temperature: :math:`T > 0` of the softmax (static).
    chunk_size: tokens per block on CPU (default ~64 MiB of float32 logits), holding whole
      sequences (a longer sequence in blocks); on GPU and TPU vocabulary blocks of all
      tokens.

  Returns:
    The loss, differentiable with respect to ``hidden``, ``weight``, ``bias``,
    ``ref_log_probs`` and ``kl`` in every autodiff mode; with ``return_metrics``, ``(loss,
    metrics)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.zeros((2, 5, 4)); w = jnp.zeros((4, 8)); y = jnp.zeros((2, 5), int)
  >>> float(jxent.linear_kto_loss(h, w, y, jnp.array([True, False])))  # Delta = 0: 1/2
  0.5
  """
  labels = _checks.integer(labels, "labels")
  if labels.ndim < 1:
    raise ValueError(f"linear_kto_loss needs tokens laid out as [..., T], got labels of shape "
                     f"{labels.shape}.")
  average = _checks.static_bool(average_log_prob, "average_log_prob")
  reduction = _checks.reduction(reduction)
  if reduction == "none" or not LH.groups_fit(hidden, weight, weight_layout, labels.shape[-1],
                                            labels, where, ref_log_probs, kl):
    _, mask, seq, ref = _head_sequences(hidden, weight, labels, where, ref_log_probs, average,
                                        bias, weight_layout, temperature, chunk_size)
    preferred, kl, _ = _kto_inputs(seq.shape, preferred, kl, None, seq.dtype)
    return _kto(seq, ref, kl, preferred, jnp.any(mask, axis=-1), beta, desirable_weight,
                undesirable_weight, reduction, return_metrics)
  # Whole sequences in each token chunk: each block of logits computed once.
  opts = _kto_options(beta, desirable_weight, undesirable_weight)
  return_metrics = _checks.static_bool(return_metrics, "return_metrics")
  mask = _mask(where, labels.shape, "labels'")
  ref, per_seq = _ref_tokens(ref_log_probs, labels.shape)
  acc = _acc(hidden, weight)
  preferred, kl, _ = _kto_inputs(labels.shape[:-1], preferred, kl, None, acc)
  keep = jnp.any(mask, axis=-1)
  inv = jnp.asarray(1 / jnp.maximum(jnp.sum(keep), 1) if reduction == "mean" else 1, acc)
  tokens = lambda a: jnp.broadcast_to(jnp.asarray(a, acc)[..., None], labels.shape)
  args = (([] if ref is None else [ref]) + ([] if kl is None else [tokens(kl)])
          + [tokens(preferred), jnp.broadcast_to(inv, labels.shape)])
  fn = _kto_group_fn(*opts, average, ref is not None, per_seq, kl is not None)
  loss, lp = LH.group_loss(hidden, weight, labels, fn, labels.shape[-1], args, bias=bias,
                           weight_layout=weight_layout, where=mask, temperature=temperature,
                           chunk_size=chunk_size)
  if not return_metrics:
    return loss
  s = _sequence_log_probs(lp, mask, average)
  lr = s if ref is None else s - _ref_sequences(ref, mask, average, per_seq)
  return loss, _kto_metrics(jnp.where(keep, s, -1.0), jnp.where(keep, lr, 0), preferred, keep,
                            opts[0])
