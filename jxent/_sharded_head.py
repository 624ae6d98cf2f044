"""Vocab-parallel information quantities of a language-model head (``jxent.sharded``).

Each device of the mesh axis ``axis_name`` holds the columns ``[k V_l, (k + 1) V_l)`` of the
output projection. On its slice it runs the chunked head functions of ``_lmhead`` (one
``[chunk, V_l]`` block of logits at a time, their own derivative rules), which give per token
the slice's logsumexp ``L_k``, the entropy ``H_k`` of the softmax restricted to the slice and
the label's logit. The exact quantities over the whole vocabulary follow from ``[N]``
statistics by the chain rules of a distribution split into parts: with ``pi_k = exp(L_k - L)``
the mass of part k,

    L = log sum_k exp(L_k),   H = sum_k pi_k H_k - sum_k pi_k log pi_k,
    KL(p || q) = sum_k pi^p_k KL(p_k || q_k) + KL(pi^p || pi^q),

(p_k, q_k the distributions restricted to part k). Only ``[N]`` vectors cross devices (max,
sums); the derivatives are JAX's own through the collectives and the local rules, so every
autodiff mode of the local functions carries over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _fused as F
from jxent import _lmhead as L

Array = jax.Array


def _offset(v_local: int, axis_name):
  return jax.lax.axis_index(axis_name) * v_local


def local_vocab(weight, layout):
  if layout not in ("dv", "vd"):
    raise ValueError(f"weight_layout must be 'dv' or 'vd', got {layout!r}.")
  weight = _checks.as_array(weight, "weight")
  if weight.ndim != 2:
    raise ValueError(f"weight must be 2-D (this shard's columns), got shape {weight.shape}.")
  return weight.shape[1] if layout == "dv" else weight.shape[0]


def _global_lse(lse_k, axis_name):
  """(L, pi_k): the logsumexp over the axis and this shard's share of the mass."""
  m = jax.lax.pmax(jax.lax.stop_gradient(lse_k), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0)
  e = jnp.exp(lse_k - m)
  s = jax.lax.psum(e, axis_name)
  return m + jnp.log(s), e / s


def _xlogy_share(pi, log_pi):
  """pi log pi with 0 where pi = 0 (a shard without mass)."""
  return jnp.where(pi > 0, pi * jnp.where(pi > 0, log_pi, 0), 0)


def _local_stats(hidden, weight, labels, bias, layout, where, temperature, chunk_size, name,
                 *, axis_name):
  """Per token, flat [N]: this shard's L_k, H_k and label logit (differentiable), where the
  label falls in this shard (None without labels) and the kept mask; then the unflattening
  function and V_local."""
  v_l = local_vocab(weight, layout)
  local = None
  if labels is not None:
    labels = _checks.integer(labels, "labels")
    local = labels - _offset(v_l, axis_name).astype(labels.dtype)
  clipped = None if local is None else jnp.clip(local, 0, v_l - 1)
  h3, w, b, y2, v2, _, cfg, unflat = L._prepare(hidden, weight, clipped, bias, layout, where,
                                                temperature, chunk_size, name)
  lse, ent, z_y = L._head_stats(h3, w, b, y2, cfg)
  n = int(np.prod(jnp.shape(hidden)[:-1], dtype=np.int64))
  flat = lambda a: a.reshape(-1)[:n]
  kept = flat(v2)
  here = None
  if local is not None:
    lf = local.reshape(-1)
    here = (lf >= 0) & (lf < v_l) & kept
  return flat(lse), flat(ent), flat(z_y), here, kept, unflat, v_l


def poison_out_of_range(out, labels, kept, vocab):
  """``out`` with NaN where a kept label is outside [0, V) (also through the factor, the
  gradient), and the checkify value check; ``labels`` and ``kept`` of ``out``'s shape."""
  bad = kept & ((labels < 0) | (labels >= vocab))
  _checks.value_check(~jnp.any(bad), f"labels out of range [0, {vocab}) for some kept example.")
  return out * jnp.where(bad, jnp.nan, 1).astype(out.dtype)


def vocab_parallel_linear_log_probs(
    hidden: ArrayLike, weight: ArrayLike, labels: ArrayLike, *, axis_name,
    bias: ArrayLike | None = None, weight_layout: str = "dv", where: ArrayLike | None = None,
    temperature: float = 1.0, chunk_size: int | None = None,
    return_entropy: bool = False, shift: int = 0) -> Array | tuple[Array, Array]:
  r""":func:`jxent.linear_log_probs` with the vocabulary split over ``axis_name``; call
  inside ``jax.shard_map``.

  ``log p_y = z_y - L`` with :math:`L = \log \sum_k e^{L_k}` from each shard's logsumexp
  :math:`L_k`; two ``[N]`` all-reduces (max and sum) and one for the label's logit.

  Args:
    hidden: ``[..., D]``, replicated over ``axis_name``.
    weight: this shard's ``[D, V_local]`` (``"dv"``) or ``[V_local, D]`` (``"vd"``).
    labels: global integer ids ``[...]``.
    axis_name: the mesh axis (or axes) the vocabulary is split over.
    bias: this shard's ``[V_local]``, optional.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block of the local function.
    return_entropy: also return the entropy over the whole vocabulary, as
      :func:`vocab_parallel_linear_entropy`, from the same pass over this shard's blocks.
    shift: ``k >= 0``: position ``t`` scored on ``labels[..., t + k]``, outputs
      ``[..., T-k]``, as :func:`jxent.linear_log_probs` (this device's positions: whole
      sequences on each device).

  Returns:
    ``[...]`` log-probabilities over the whole vocabulary (the same on every shard); with
    ``return_entropy``, ``(log_probs, entropy)``.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> log_probs = jax.jit(jax.shard_map(
  ...     lambda h, w, y: jxent.sharded.vocab_parallel_linear_log_probs(
  ...         h, w, y, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))
  >>> w = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])  # [D, V], split over "model"
  >>> [round(v, 4) for v in log_probs(jnp.eye(2), w, jnp.array([0, 3])).tolist()]
  [-0.3408, -0.7437]
  """
  labels, where, _, cut = F.shift_targets(shift, hidden, labels, where, None,
                                          "vocab_parallel_linear_log_probs")
  if cut is not None:
    return F.cut_outputs(vocab_parallel_linear_log_probs(
        hidden, weight, labels, axis_name=axis_name, bias=bias, weight_layout=weight_layout,
        where=where, temperature=temperature, chunk_size=chunk_size,
        return_entropy=return_entropy), cut, True)
  labels = _checks.integer(labels, "labels")
  return_entropy = _checks.static_bool(return_entropy, "return_entropy")
  lse_k, ent_k, z_y, here, kept, unflat, v_l = _local_stats(
      hidden, weight, labels, bias, weight_layout, where, temperature, chunk_size,
      "vocab_parallel_linear_log_probs", axis_name=axis_name)
  lse, pi = _global_lse(lse_k, axis_name)
  z_y = jax.lax.psum(jnp.where(here, z_y, 0), axis_name)
  vocab = v_l * jax.lax.axis_size(axis_name)
  out = poison_out_of_range(jnp.where(kept, z_y - lse, 0), labels.reshape(-1), kept, vocab)
  if return_entropy:
    return unflat(out), unflat(jnp.where(kept, _mixture_entropy(lse_k, ent_k, lse, pi,
                                                                axis_name), 0))
  return unflat(out)


def _mixture_entropy(lse_k, ent_k, lse, pi, axis_name):
  """The entropy over the whole vocabulary from each shard's logsumexp and entropy (the
  chain rule of entropy)."""
  return jax.lax.psum(jnp.where(pi > 0, pi * ent_k, 0) - _xlogy_share(pi, lse_k - lse),
                      axis_name)


def vocab_parallel_linear_entropy(
    hidden: ArrayLike, weight: ArrayLike, *, axis_name, bias: ArrayLike | None = None,
    weight_layout: str = "dv", where: ArrayLike | None = None, temperature: float = 1.0,
    chunk_size: int | None = None) -> Array:
  r""":func:`jxent.linear_entropy` with the vocabulary split over ``axis_name``; call inside
  ``jax.shard_map``.

  .. math:: H = \sum_k \pi_k H_k - \sum_k \pi_k \log \pi_k, \qquad \pi_k = e^{L_k - L},

  from each shard's logsumexp :math:`L_k` and the entropy :math:`H_k` of the softmax
  restricted to its slice (the chain rule of entropy): ``[N]`` all-reduces only.

  Args:
    hidden: ``[..., D]``, replicated over ``axis_name``.
    weight: this shard's ``[D, V_local]`` (``"dv"``) or ``[V_local, D]`` (``"vd"``).
    axis_name: the mesh axis (or axes) the vocabulary is split over.
    bias: this shard's ``[V_local]``, optional.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block of the local function.

  Returns:
    ``[...]`` entropies over the whole vocabulary, in nats.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> entropy = jax.jit(jax.shard_map(
  ...     lambda h, w: jxent.sharded.vocab_parallel_linear_entropy(h, w, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(), P(None, "model")), out_specs=P()))
  >>> w = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])  # [D, V], split over "model"
  >>> [round(v, 4) for v in entropy(jnp.eye(2), w).tolist()]
  [0.9183, 1.2683]
  """
  lse_k, ent_k, _, _, kept, unflat, _ = _local_stats(
      hidden, weight, None, bias, weight_layout, where, temperature, chunk_size,
      "vocab_parallel_linear_entropy", axis_name=axis_name)
  lse, pi = _global_lse(lse_k, axis_name)
  return unflat(jnp.where(kept, _mixture_entropy(lse_k, ent_k, lse, pi, axis_name), 0))


def vocab_parallel_linear_token_stats(
    hidden: ArrayLike, weight: ArrayLike, labels: ArrayLike | None = None, *, axis_name,
    bias: ArrayLike | None = None, weight_layout: str = "dv", where: ArrayLike | None = None,
    temperature: float = 1.0, chunk_size: int | None = None) -> L.TokenStats:
  """:func:`jxent.linear_token_stats` with the vocabulary split over ``axis_name``; call
  inside ``jax.shard_map``. The argmax is the global index of the largest logit (the
  smallest such index on ties, as ``jnp.argmax``). Not differentiable.

  Args:
    hidden: ``[..., D]``, replicated over ``axis_name``.
    weight: this shard's ``[D, V_local]`` (``"dv"``) or ``[V_local, D]`` (``"vd"``).
    labels: optional global integer ids ``[...]``.
    axis_name: the mesh axis (or axes) the vocabulary is split over.
    bias: this shard's ``[V_local]``, optional.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block of the local function.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> stats = jax.jit(jax.shard_map(
  ...     lambda h, w, y: jxent.sharded.vocab_parallel_linear_token_stats(
  ...         h, w, y, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))
  >>> w = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])  # [D, V], split over "model"
  >>> s = stats(jnp.eye(2), w, jnp.array([0, 3]))
  >>> s.argmax.tolist(), [round(v, 4) for v in s.logsumexp.tolist()]
  ([0, 3], [2.3408, 1.7437])
  """
  hidden, weight, bias = jax.lax.stop_gradient((hidden, weight, bias))
  v_l = local_vocab(weight, weight_layout)
  local_y = None
  if labels is not None:
    labels = _checks.integer(labels, "labels")
    local_y = labels - _offset(v_l, axis_name).astype(labels.dtype)
  # This shard's own statistics in one pass (labels clipped into the slice: their local
  # log-probability is used only where the label is here).
  s = L.linear_token_stats(hidden, weight, None if local_y is None else
                           jnp.clip(local_y, 0, v_l - 1), bias=bias,
                           weight_layout=weight_layout, where=where, temperature=temperature,
                           chunk_size=chunk_size)
  shape = s.logsumexp.shape
  kept = jnp.ones(shape, bool) if where is None else jnp.asarray(where)
  flat = lambda a: a.reshape(-1)
  lse_k, kept = flat(s.logsumexp), flat(kept)
  top = flat(s.argmax)
  zmax = logit_at(hidden, weight, bias, weight_layout, top) / temperature
  lse, ent, am = combine_stats(lse_k, flat(s.entropy), top, zmax, v_l, axis_name)
  keep = lambda a: jnp.where(kept, a, 0).reshape(shape)
  logp = None
  if labels is not None:
    lf = flat(local_y)
    here = (lf >= 0) & (lf < v_l) & kept
    z_y = jax.lax.psum(jnp.where(here, flat(s.label_log_prob) + lse_k, 0), axis_name)
    vocab = v_l * jax.lax.axis_size(axis_name)
    logp = keep(poison_out_of_range(z_y - lse, labels.reshape(-1), kept, vocab))
  return L.TokenStats(keep(lse), keep(ent), keep(am), logp)


def combine_stats(lse_k, ent_k, top_k, zmax_k, v_l, axis_name):
  """The whole vocabulary's (logsumexp, entropy, argmax) per token from each shard's
  logsumexp, entropy, argmax (local index) and the logit there: the argmax is the largest of
  the shards' maxima, the smallest global index among ties (as ``jnp.argmax``)."""
  lse, pi = _global_lse(lse_k, axis_name)
  ent = _mixture_entropy(lse_k, ent_k, lse, pi, axis_name)
  best = jax.lax.pmax(zmax_k, axis_name)
  big = jnp.iinfo(jnp.int32).max
  idx = jnp.where(zmax_k == best, top_k + _offset(v_l, axis_name), big).astype(jnp.int32)
  return lse, ent, jax.lax.pmin(idx, axis_name)


def logit_at(hidden, weight, bias, layout, index, softcap=None):
  """The (capped) logit of this shard's column ``index`` [N] per token, [N] (accumulated in
  float32, or float64): the fused loss's label logit, one gathered column of the weight per
  token, differentiable."""
  h = hidden.reshape(-1, hidden.shape[-1])
  acc = jnp.float64 if jnp.float64 in (h.dtype, weight.dtype) else jnp.float32
  cfg = F._Config(None, None, softcap, layout, F._VOCAB_SLICE, acc)
  return F._label_logits(h, weight, None if bias is None else jnp.asarray(bias), index, cfg)


def _check_pair(student_hidden, teacher_hidden, student_weight, teacher_weight, layout):
  vs, vt = local_vocab(student_weight, layout), local_vocab(teacher_weight, layout)
  if vs != vt:
    raise ValueError(f"student and teacher must share the vocabulary slice, got V_local={vs} "
                     f"and {vt}.")
  hs = jnp.shape(student_hidden)
  ht = jnp.shape(teacher_hidden)
  if hs[:-1] != ht[:-1]:
    raise ValueError(f"student_hidden and teacher_hidden must have the same tokens, got "
                     f"student_hidden.shape={hs} and teacher_hidden.shape={ht}.")


def _two_heads(hs, ws, bs, ht, wt, bt, layout, where, temperature, teacher_grad, reduction,
               chunk_size, name, axis_name):
  """The distillation forms' common part: checks, the teacher under stop_gradient unless
  ``teacher_grad``, and per token each head's (log pi_k, pi_k) on this shard."""
  _checks.reduction(reduction)
  _check_pair(hs, ht, ws, wt, layout)
  if not teacher_grad:
    ht, wt, bt = jax.lax.stop_gradient((ht, wt, bt))
  ls_k, _, _, _, kept, unflat, _ = _local_stats(hs, ws, None, bs, layout, where, temperature,
                                                chunk_size, name, axis_name=axis_name)
  lt_k = _local_stats(ht, wt, None, bt, layout, where, temperature, chunk_size, name,
                      axis_name=axis_name)[0]
  ls, pi_s = _global_lse(ls_k, axis_name)
  lt, pi_t = _global_lse(lt_k, axis_name)
  return (hs, ws, bs, ht, wt, bt), (ls_k - ls, pi_s), (lt_k - lt, pi_t), kept, unflat


def vocab_parallel_linear_kl_divergence(
    student_hidden: ArrayLike, student_weight: ArrayLike, teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike, *, axis_name, student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None, weight_layout: str = "dv",
    where: ArrayLike | None = None, temperature: float = 1.0, direction: str = "forward",
    teacher_grad: bool = False, reduction: str = "mean",
    chunk_size: int | None = None) -> Array:
  r""":func:`jxent.linear_kl_divergence` with the vocabulary split over ``axis_name`` (both
  heads the same way); call inside ``jax.shard_map``.

  By the chain rule of the KL divergence over the shards,

  .. math:: D(p\|q) = \sum_k \pi^p_k D(p_k\|q_k) + \sum_k \pi^p_k \log(\pi^p_k / \pi^q_k),

  with :math:`p_k, q_k` the distributions restricted to shard k (the local fused KL) and
  :math:`\pi_k` their shards' masses (from the local logsumexps): ``[N]`` all-reduces only.
  Each shard passes over its slice of both heads three times (the divergence and the two
  logsumexps, each with its own derivative rule).

  Args:
    student_hidden, teacher_hidden: ``[..., D_s]`` and ``[..., D_t]``, replicated over
      ``axis_name``.
    student_weight, teacher_weight: this shard's slices of the two projections.
    axis_name: the mesh axis (or axes) the vocabulary is split over.
    student_bias: this shard's ``[V_local]``, optional.
    teacher_bias: this shard's ``[V_local]``, optional.
    weight_layout: ``"dv"`` or ``"vd"`` (both heads).
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    direction: ``"forward"`` (:math:`D(p\|q)`) or ``"reverse"`` (:math:`D(q\|p)`).
    teacher_grad: differentiate the teacher's inputs too.
    reduction: ``"mean"`` (over this device's kept tokens), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block of the local functions.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> kl = jax.jit(jax.shard_map(
  ...     lambda hs, ws, ht, wt: jxent.sharded.vocab_parallel_linear_kl_divergence(
  ...         hs, ws, ht, wt, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")),
  ...     out_specs=P()))
  >>> ws = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])  # the student's [D, V]
  >>> round(float(kl(jnp.eye(2), ws, jnp.eye(2), jnp.zeros((2, 4)))), 4)  # uniform teacher
  0.2809
  """
  if direction not in ("forward", "reverse"):
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}.")
  heads, (log_s, pi_s), (log_t, pi_t), kept, unflat = _two_heads(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
      teacher_bias, weight_layout, where, temperature, teacher_grad, reduction, chunk_size,
      "vocab_parallel_linear_kl_divergence", axis_name)
  hs, ws, bs, ht, wt, bt = heads
  kl_k = L.linear_kl_divergence(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt,
                                direction=direction, teacher_grad=True,
                                reduction="none", weight_layout=weight_layout, where=where,
                                temperature=temperature, chunk_size=chunk_size).reshape(-1)
  if direction == "forward":
    pi, log_a, log_b = pi_t, log_t, log_s
  else:
    pi, log_a, log_b = pi_s, log_s, log_t
  part = jnp.where(pi > 0, pi * kl_k, 0) + _xlogy_share(pi, log_a - jnp.where(pi > 0, log_b, 0))
  kl = jnp.where(kept, jax.lax.psum(part, axis_name), 0)
  out = _checks.reduce(kl, reduction, jnp.sum(kept).astype(kl.dtype))
  return unflat(out) if reduction == "none" else out


def vocab_parallel_linear_js_divergence(
    student_hidden: ArrayLike, student_weight: ArrayLike, teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike, *, axis_name, beta: float = 0.5,
    student_bias: ArrayLike | None = None, teacher_bias: ArrayLike | None = None,
    weight_layout: str = "dv", where: ArrayLike | None = None, temperature: float = 1.0,
    teacher_grad: bool = False, reduction: str = "mean",
    chunk_size: int | None = None) -> Array:
  r""":func:`jxent.linear_js_divergence` with the vocabulary split over ``axis_name``; call
  inside ``jax.shard_map``.

  With :math:`\mu_k = \beta \pi^p_k + (1-\beta) \pi^q_k` the mixture's mass on shard k and
  :math:`\beta_k = \beta \pi^p_k / \mu_k`, the mixture restricted to shard k is the
  :math:`\beta_k`-mixture of :math:`p_k` and :math:`q_k`, and

  .. math:: \mathrm{JS}_\beta(p, q) = \sum_k \mu_k \mathrm{JS}_{\beta_k}(p_k, q_k)
     + \mathrm{JS}_\beta(\pi^p, \pi^q),

  the local divergence taking a weight per token (differentiable in it): ``[N]``
  all-reduces only. ``beta=0`` and ``beta=1`` give the forward and reverse KL
  (:func:`vocab_parallel_linear_kl_divergence`).

  Args:
    student_hidden: ``[..., D_s]``, replicated over ``axis_name``.
    student_weight: this shard's slice of the student's projection.
    teacher_hidden: ``[..., D_t]``, replicated over ``axis_name``.
    teacher_weight: this shard's slice of the teacher's projection.
    axis_name: the mesh axis (or axes) the vocabulary is split over.
    beta: :math:`\beta \in [0, 1]`, a Python number (static).
    student_bias: this shard's ``[V_local]``, optional.
    teacher_bias: this shard's ``[V_local]``, optional.
    weight_layout: ``"dv"`` or ``"vd"`` (both heads).
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    teacher_grad: differentiate the teacher's inputs too.
    reduction: ``"mean"`` (over this device's kept tokens), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block of the local functions.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> js = jax.jit(jax.shard_map(
  ...     lambda hs, ws, ht, wt: jxent.sharded.vocab_parallel_linear_js_divergence(
  ...         hs, ws, ht, wt, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(), P(None, "model"), P(), P(None, "model")),
  ...     out_specs=P()))
  >>> ws = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])  # the student's [D, V]
  >>> round(float(js(jnp.eye(2), ws, jnp.eye(2), jnp.zeros((2, 4)))), 4)  # uniform teacher
  0.0693
  """
  beta = _checks.static_number(beta, "beta")
  if not 0 <= beta <= 1:
    raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
  pair = dict(student_bias=student_bias, teacher_bias=teacher_bias,
              weight_layout=weight_layout, where=where, temperature=temperature,
              teacher_grad=teacher_grad, reduction=reduction, chunk_size=chunk_size)
  if beta in (0, 1):
    return vocab_parallel_linear_kl_divergence(
        student_hidden, student_weight, teacher_hidden, teacher_weight, axis_name=axis_name,
        direction="forward" if beta == 0 else "reverse", **pair)
  name = "vocab_parallel_linear_js_divergence"
  heads, (log_s, pi_s), (log_t, pi_t), kept, unflat = _two_heads(
      student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
      teacher_bias, weight_layout, where, temperature, teacher_grad, reduction, chunk_size,
      name, axis_name)
  mu = beta * pi_t + (1 - beta) * pi_s
  log_mu = jnp.logaddexp(np.log(beta) + log_t, np.log1p(-beta) + log_s)
  beta_k = jnp.where(mu > 0, beta * pi_t / jnp.where(mu > 0, mu, 1), beta)
  student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, \
      teacher_bias = heads
  shape = jnp.shape(student_hidden)[:-1]
  js_k = L._distill(
      "js", None, student_hidden, student_weight, teacher_hidden, teacher_weight,
      student_bias=student_bias, teacher_bias=teacher_bias, weight_layout=weight_layout,
      where=where, temperature=temperature, teacher_grad=True, reduction="none",
      chunk_size=chunk_size, name=name, beta_tokens=beta_k.reshape(shape)).reshape(-1)
  part = (jnp.where(mu > 0, mu * js_k, 0)
          + beta * _xlogy_share(pi_t, log_t - jnp.where(pi_t > 0, log_mu, 0))
          + (1 - beta) * _xlogy_share(pi_s, log_s - jnp.where(pi_s > 0, log_mu, 0)))
  js = jnp.where(kept, jax.lax.psum(part, axis_name), 0)
  out = _checks.reduce(js, reduction, jnp.sum(kept).astype(js.dtype))
  return unflat(out) if reduction == "none" else out


__all__ = [
    "vocab_parallel_linear_entropy",
    "vocab_parallel_linear_js_divergence",
    "vocab_parallel_linear_kl_divergence",
    "vocab_parallel_linear_log_probs",
    "vocab_parallel_linear_token_stats",
]
