"""Vocab-parallel cross-entropy over a JAX device mesh (Megatron-style), on ``jax.shard_map``.

When the vocabulary is split across the devices of a mesh axis (tensor parallelism), each
device holds a ``[..., V_local]`` slice of the logits (or a ``[D, V_local]`` slice of the
output projection). Gathering the full logits to compute the loss costs ``N * V`` of memory
and communication; the functions here compute the exact loss from the shards with three
small all-reduces of ``[N]``-sized statistics: the max, the sum of exponentials, and the
label's logit (plus the sum of logits when label smoothing is on). Gradients come from JAX's
own autodiff of ``shard_map`` and its collectives, so they are exact under ``jax.grad`` and
``jax.jit``; the gradient with respect to replicated hidden states is summed over the axis by
``shard_map``'s transpose (an ``[N, D]`` all-reduce), never an ``N * V`` one.

Shard ``k`` of the axis holds vocabulary ids ``[k * V_local, (k + 1) * V_local)``.

Recipe (a ``("data", "model")`` mesh, batch on "data", vocabulary on "model")::

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    loss_fn = jxent.sharded.make_vocab_parallel_loss(mesh, label_smoothing=0.1)
    logits = jax.device_put(logits, NamedSharding(mesh, P("data", "model")))
    labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
    loss = jax.jit(loss_fn)(logits, labels)           # [N] per-example, sharded on "data"

Several hosts: call ``jax.distributed.initialize(...)`` in every process first; the mesh
then spans all processes' devices and nothing else changes (README.md).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _reference as R
from jxent._fused import cut_outputs, linear_cross_entropy, shift_targets
from jxent._sharded_head import (
  combine_stats,
  local_vocab,
  logit_at,
  vocab_parallel_linear_entropy,
  vocab_parallel_linear_js_divergence,
  vocab_parallel_linear_kl_divergence,
  vocab_parallel_linear_log_probs,
  vocab_parallel_linear_token_stats,
)
from jxent._sharded_head import poison_out_of_range as _poison_out_of_range
from jxent._softmax import class_weights_array
from jxent._stats import TokenStats

# A mesh axis name, or several (as shard_map and lax collectives accept).
AxisName = Hashable | tuple[Hashable, ...]

__all__ = [
    "make_vocab_parallel_loss",
    "vocab_parallel_cross_entropy",
    "vocab_parallel_linear_cross_entropy",
    "vocab_parallel_linear_entropy",
    "vocab_parallel_linear_js_divergence",
    "vocab_parallel_linear_kl_divergence",
    "vocab_parallel_linear_log_probs",
    "vocab_parallel_linear_token_stats",
]


def _shard_offset(v_local: int, axis_name):
  return jax.lax.axis_index(axis_name) * v_local


def _kept(labels, ignore_index, where):
  """The examples kept: not ``ignore_index`` and in ``where`` (a boolean mask of ``labels``'
  shape)."""
  kept = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape != labels.shape:
      raise ValueError(f"where must be a boolean mask of labels' shape {labels.shape}, got "
                       f"{where.dtype} {where.shape}.")
    kept = kept & where
  return kept


def _class_weights(class_weights, v_local, acc, here, local, axis_name):
  """This shard's class weights ``[V_local]``, the label's weight ``c_y`` and the weights'
  total over the vocabulary (``(None,) * 3`` without them)."""
  if class_weights is None:
    return None, None, None
  cw = class_weights_array(class_weights, v_local, acc)
  c_y = jax.lax.psum(jnp.where(here, cw[jnp.clip(local, 0, v_local - 1)], 0), axis_name)
  return cw, c_y, jax.lax.psum(jnp.sum(cw), axis_name)


def _combine(lse_local, z_y, valid, opts, *, axis_name, vocab_size, tail_local=None,
             sum_z_local=None, c_y=None, c_sum=None, scaled=False):
  """Per example, from per-shard statistics and the label's logit ``z_y`` (all-reduced by the
  caller), with [N] all-reduces only: the loss (0 where not ``valid``), the logsumexp over
  the vocabulary and ``-log p_y`` (0 where not ``valid``). ``tail_local``: this shard's part
  of the label's tail (``_reference.label_tail``), so that a tiny loss keeps its relative
  accuracy. ``sum_z_local``: this shard's sum of logits for the smoothing term, each times
  its class weight when ``c_y`` (the label's weight) and ``c_sum`` (the weights' total) are
  given. ``scaled``: the loss times ``p_y``, held constant (``token_scaling``)."""
  m = jax.lax.pmax(jax.lax.stop_gradient(lse_local), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0)
  r = jnp.log(jax.lax.psum(jnp.exp(lse_local - m), axis_name))
  lse = m + r
  tail = None if tail_local is None else jax.lax.psum(tail_local, axis_name)
  nll = R.label_term(r, m - z_y, tail)
  loss = nll if c_y is None else c_y * nll
  eps, zl = opts.label_smoothing, opts.z_loss
  if eps is not None:
    sum_z = jax.lax.psum(sum_z_local, axis_name)
    if c_sum is None:
      smooth = r + (m - sum_z / vocab_size)
    else:  # (1 / V) sum_v c_v (lse - z_v)
      smooth = (c_sum * r + (c_sum * m - sum_z)) / vocab_size
    loss = (1 - eps) * loss + eps * smooth
  if zl is not None:
    loss = loss + zl * lse * lse
  nll = jnp.where(valid, nll, 0)
  if scaled:
    loss = loss * jnp.exp(-jax.lax.stop_gradient(nll))
  return jnp.where(valid, loss, 0), lse, nll


def vocab_parallel_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, axis_name: AxisName,
                                 where: ArrayLike | None = None,
                                 ignore_index: int | None = None,
                                 label_smoothing: ArrayLike = 0.0,
                                 class_weights: ArrayLike | None = None,
                                 z_loss: ArrayLike = 0.0,
                                 reduction: str = "none") -> jax.Array:
  r"""Softmax cross-entropy from this device's vocabulary shard; call inside ``jax.shard_map``.

  Equals ``softmax_cross_entropy_with_integer_labels`` on the full logits, a confident
  correct prediction's tiny loss to its own relative accuracy included. Only ``[N]``
  statistics cross devices.

  Args:
    logits: ``[..., V_local]``, this shard's slice of the vocabulary (float; bf16 is
      accumulated in f32).
    labels: global integer ids ``[...]`` (the same on every shard of ``axis_name``).
    axis_name: the mesh axis the vocabulary is split over.
    where: optional boolean ``[...]`` mask of the examples to keep (labels' shape).
    ignore_index: ids whose examples are ignored (loss 0, gradient 0).
    label_smoothing: :math:`\varepsilon` over the full vocabulary ``V = V_local * shards``.
    class_weights: optional ``[V_local]``, this shard's slice of the ``[V]`` class weights
      (PyTorch's ``weight``), with the unsharded loss's semantics: "mean" divides by
      :math:`\sum_i c_{y_i}` over kept examples.
    z_loss: coefficient of :math:`\mathrm{logsumexp}^2`.
    reduction: ``"none"`` (per-example, the same on every shard of the axis), ``"sum"`` or
      ``"mean"`` over this device's kept examples.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> loss = jax.jit(jax.shard_map(
  ...     lambda z, y: jxent.sharded.vocab_parallel_cross_entropy(z, y, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P()))
  >>> z = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])
  >>> [round(v, 4) for v in loss(z, jnp.array([0, 3])).tolist()]  # as on the whole logits
  [0.3408, 0.7437]
  """
  _checks.reduction(reduction)
  z = _checks.floating(logits, "logits")
  acc = R.acc_dtype(z.dtype)
  opts = _checks.CEOptions.make(label_smoothing, z_loss, z.dtype)
  labels = _checks.integer(labels, "labels")
  if labels.shape != z.shape[:-1]:
    raise ValueError(f"labels must have logits' shape without the vocabulary axis, "
                     f"{z.shape[:-1]}, got labels.shape={labels.shape}.")
  v_local = z.shape[-1]
  vocab = v_local * jax.lax.axis_size(axis_name)
  valid = _kept(labels, ignore_index, where)
  _checks.check_logits(z.reshape(-1, v_local), valid.reshape(-1), "logits (this shard)")
  z = jnp.where(valid[..., None], z, 0)  # dropped rows reach no gradient, whatever they hold
  local = labels - _shard_offset(v_local, axis_name)
  here = (local >= 0) & (local < v_local) & valid
  cw, c_y, c_sum = _class_weights(class_weights, v_local, acc, here, local, axis_name)
  lse_local = _local_lse(z)
  picked = jnp.take_along_axis(z, jnp.clip(local, 0, v_local - 1)[..., None], axis=-1)[..., 0]
  z_y = jax.lax.psum(jnp.where(here, picked, 0), axis_name)
  # The label's tail relative to its logit, on this shard's classes (one more [N] sum).
  tail_local = R.label_tail(z.reshape(-1, v_local), z_y.reshape(-1)).reshape(z_y.shape)
  sum_z_local = None
  if opts.label_smoothing is not None:
    sum_z_local = (jnp.sum(z, axis=-1) if cw is None
                   else jnp.dot(z, cw, preferred_element_type=acc))
  loss = _combine(lse_local, z_y, valid, opts, axis_name=axis_name, vocab_size=vocab,
                  tail_local=tail_local, sum_z_local=sum_z_local, c_y=c_y, c_sum=c_sum)[0]
  count = jnp.sum(valid) if c_y is None else jnp.sum(jnp.where(valid, c_y, 0))
  return _checks.reduce(_poison_out_of_range(loss, labels, valid, vocab), reduction, count)


def _local_lse(z):
  """This shard's logsumexp; ``-inf`` with a zero (not NaN) gradient for a shard whose
  logits are all ``-inf``."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  m = jnp.where(jnp.isfinite(m), m, 0)
  s = jnp.sum(jnp.exp(z - m[..., None]), axis=-1)
  has_mass = s > 0
  return jnp.where(has_mass, m + jnp.log(jnp.where(has_mass, s, 1)), -jnp.inf)


def vocab_parallel_linear_cross_entropy(
    hidden: ArrayLike, weight: ArrayLike, labels: ArrayLike, *, axis_name: AxisName,
    bias: ArrayLike | None = None, weight_layout: str = "dv", ignore_index: int | None = None,
    where: ArrayLike | None = None, label_smoothing: ArrayLike = 0.0, z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None, reduction: str = "none", chunk_size: int | None = None,
    weights: ArrayLike | None = None, class_weights: ArrayLike | None = None,
    return_lse: bool = False, return_stats: bool = False,
    token_scaling: bool = False, shift: int = 0) -> jax.Array | tuple:
  r""":func:`jxent.linear_cross_entropy` with the vocabulary split over ``axis_name``; call
  inside ``jax.shard_map``.

  Neither the full logits nor this shard's ``[N, V_local]`` block beyond one chunk is held:
  each shard runs the chunked fused loss on its slice (which returns its per-token
  logsumexp and the label's loss there), and only ``[N]`` statistics are all-reduced. With
  label smoothing the sum of all logits is ``hidden @ weight.sum(1)``, an ``[N]`` vector
  (with ``logit_softcap``, each shard's fused loss sums its capped logits; the label's
  capped logit is then ``h . w_y``, one gathered column per token).

  Args:
    hidden: ``[..., D]``, replicated over ``axis_name``.
    weight: this shard's ``[D, V_local]`` (``"dv"``) or ``[V_local, D]`` (``"vd"``).
    labels: global integer ids ``[...]``.
    axis_name: the mesh axis (or axes) the vocabulary is split over.
    bias: this shard's ``[V_local]``, optional.
    weight_layout: ``"dv"`` or ``"vd"``.
    ignore_index, where, label_smoothing, z_loss: as in :func:`vocab_parallel_cross_entropy`.
    logit_softcap: ``c > 0`` or None, as :func:`jxent.linear_cross_entropy`.
    reduction: ``"none"`` (per token, the same on every shard of the axis), ``"sum"`` or
      ``"mean"`` over this device's kept tokens.
    chunk_size: tokens per chunk of the fused kernel.
    weights: optional float ``[...]`` per-token weights, as :func:`jxent.linear_cross_entropy`.
    class_weights: optional ``[V_local]``, this shard's slice of the class weights, as
      :func:`vocab_parallel_cross_entropy` (not with ``label_smoothing`` and
      ``logit_softcap`` together, as unsharded).
    return_lse: also return the logsumexp over the whole vocabulary ``[...]``
      (differentiable; 0 on dropped tokens).
    return_stats: also return a :class:`jxent.TokenStats` over the whole vocabulary, as
      :func:`jxent.linear_cross_entropy` (``argmax`` a global id; not differentiable).
    token_scaling: each kept token's loss times its label's probability over the whole
      vocabulary, held constant, as :func:`jxent.linear_cross_entropy`.
    shift: ``k >= 0``: position ``t`` scored on ``labels[..., t + k]``, per-position
      outputs ``[..., T-k]``, as :func:`jxent.linear_cross_entropy`. The positions are this
      device's: lay whole sequences ``[B, T]`` on each device (the batch over the data
      axis, not ``T``).

  Returns:
    The loss, then the logsumexp if ``return_lse``, then the statistics if
    ``return_stats``. The loss takes the recompute method (``method`` and
    ``gradient_filter`` of the unsharded loss need the whole vocabulary in one place).

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> from jax.sharding import AxisType, PartitionSpec as P
  >>> mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Auto,))  # e.g. (8,)
  >>> loss = jax.jit(jax.shard_map(
  ...     lambda h, w, y: jxent.sharded.vocab_parallel_linear_cross_entropy(
  ...         h, w, y, axis_name="model"),
  ...     mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))
  >>> w = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])  # [D, V], split over "model"
  >>> [round(v, 4) for v in loss(jnp.eye(2), w, jnp.array([0, 3])).tolist()]
  [0.3408, 0.7437]
  """
  _checks.reduction(reduction)
  labels, where, weights, cut = shift_targets(shift, hidden, labels, where, weights,
                                              "vocab_parallel_linear_cross_entropy")
  if cut is not None:
    return cut_outputs(vocab_parallel_linear_cross_entropy(
        hidden, weight, labels, axis_name=axis_name, bias=bias, weight_layout=weight_layout,
        ignore_index=ignore_index, where=where, label_smoothing=label_smoothing,
        z_loss=z_loss, logit_softcap=logit_softcap, reduction=reduction,
        chunk_size=chunk_size, weights=weights, class_weights=class_weights,
        return_lse=return_lse, return_stats=return_stats, token_scaling=token_scaling),
        cut, reduction == "none")
  return_lse = _checks.static_bool(return_lse, "return_lse")
  return_stats = _checks.static_bool(return_stats, "return_stats")
  token_scaling = _checks.static_bool(token_scaling, "token_scaling")
  labels = _checks.integer(labels, "labels")
  hidden = _checks.as_array(hidden, "hidden")
  weight = _checks.as_array(weight, "weight")
  acc = jnp.float64 if jnp.float64 in (hidden.dtype, weight.dtype) else jnp.float32
  opts = _checks.CEOptions.make(label_smoothing, z_loss, acc)
  v_local = local_vocab(weight, weight_layout)
  vocab = v_local * jax.lax.axis_size(axis_name)
  if labels.shape != hidden.shape[:-1]:
    raise ValueError(f"labels must have hidden's shape without D, {hidden.shape[:-1]}, got "
                     f"labels.shape={labels.shape}.")
  cap = None
  if logit_softcap is not None:
    cap = _checks.static_number(logit_softcap, "logit_softcap")
  # With a softcap the smoothing's sum of logits is not linear in h: each shard's fused loss
  # with smoothing 1 gives it (lse_k - sum_k / V_local).
  capped_sum = cap is not None and opts.label_smoothing is not None
  if capped_sum and class_weights is not None:
    raise ValueError("vocab_parallel_linear_cross_entropy with class_weights, label_smoothing "
                     "and logit_softcap together is not supported: the smoothing term needs "
                     "the class-weighted sum of the capped logits, which is not linear in h.")
  valid = _kept(labels, ignore_index, where)
  hidden = jnp.where(valid[..., None], hidden, 0)  # dropped tokens reach no gradient
  local = labels - _shard_offset(v_local, axis_name)
  here = (local >= 0) & (local < v_local) & valid
  y_local = jnp.clip(local, 0, v_local - 1)
  cw, c_y, c_sum = _class_weights(class_weights, v_local, acc, here, local, axis_name)
  # Per kept token: this shard's loss with the label clipped into the slice (lse_local - z_y
  # where the label is here), its logsumexp, and its statistics.
  local_loss, lse_local, *local_stats = linear_cross_entropy(
      hidden, weight, y_local, bias=bias, weight_layout=weight_layout, where=valid,
      label_smoothing=1.0 if capped_sum else 0.0, logit_softcap=cap, reduction="none",
      return_lse=True, return_stats=return_stats, chunk_size=chunk_size, method="recompute")
  if capped_sum:
    z_y = logit_at(hidden, weight, bias, weight_layout, y_local.reshape(-1), cap)
    z_y = jax.lax.psum(jnp.where(here, z_y.reshape(here.shape), 0), axis_name)
    sum_z_local, tail_local = v_local * (lse_local - local_loss), None
  else:
    z_y = jax.lax.psum(jnp.where(here, lse_local - local_loss, 0), axis_name)
    # The label's tail (R.label_tail) per shard: on the label's shard from its own loss (a
    # tiny one kept to its relative accuracy there), elsewhere the shard's mass relative to
    # the label, exp(lse_local - z_y) (below 1 on every shard wherever the tail is used).
    tail_local = jnp.where(here, jnp.expm1(jnp.where(here, local_loss, 0)),
                           jnp.exp(jnp.minimum(lse_local - z_y, 0)))
    sum_z_local = None
    if opts.label_smoothing is not None:
      # sum_v c_v z_v = h . (W c) + b . c (c = 1 without class weights)
      w_acc = weight.astype(acc)
      if weight_layout == "dv":
        wc = jnp.sum(w_acc, axis=1) if cw is None else jnp.dot(w_acc, cw)
      else:
        wc = jnp.sum(w_acc, axis=0) if cw is None else jnp.dot(cw, w_acc)
      sum_z_local = jnp.dot(hidden, wc, preferred_element_type=acc)
      if bias is not None:
        b = jnp.asarray(bias).astype(acc)
        sum_z_local = sum_z_local + (jnp.sum(b) if cw is None else jnp.dot(b, cw))
  loss, lse, nll = _combine(lse_local, z_y, valid, opts, axis_name=axis_name,
                            vocab_size=vocab, tail_local=tail_local, sum_z_local=sum_z_local,
                            c_y=c_y, c_sum=c_sum, scaled=token_scaling)
  count = valid.astype(acc) if c_y is None else jnp.where(valid, c_y, 0)
  if weights is not None:
    wt = _checks.floating(weights, "weights")
    if wt.shape != labels.shape:
      raise ValueError(f"weights must have hidden's shape without D, i.e. {labels.shape}, "
                       f"got weights.shape={wt.shape}.")
    wt = jnp.where(valid, wt.astype(acc), 0)
    loss, count = loss * wt, count * wt
  poison = lambda a: _poison_out_of_range(a, labels, valid, vocab)
  outs = (_checks.reduce(poison(loss), reduction, jnp.sum(count)),)
  if return_lse:
    outs += (jnp.where(valid, lse, 0),)
  if return_stats:
    st, hw = jax.lax.stop_gradient((local_stats[0], (hidden, weight, bias)))
    flat = lambda a: a.reshape(-1)
    top = flat(st.argmax)
    zmax = logit_at(*hw, weight_layout, top, cap)
    g_lse, g_ent, g_am = combine_stats(flat(st.logsumexp), flat(st.entropy), top, zmax,
                                       v_local, axis_name)
    keep = lambda a: jnp.where(valid, a.reshape(valid.shape), 0)
    logp = jax.lax.stop_gradient(poison(-nll))
    outs += (TokenStats(keep(g_lse), keep(g_ent), keep(g_am), keep(logp)),)
  return outs if len(outs) > 1 else outs[0]


def make_vocab_parallel_loss(mesh: jax.sharding.Mesh, *, data_axis: str = "data",
                             model_axis: str = "model", linear: bool = False,
                             **options: Any) -> Callable[..., jax.Array]:
  """The common case as a function of global arrays: batch on ``data_axis``, vocab on
  ``model_axis``.

  Returns ``loss_fn(logits, labels)`` (``logits`` ``[N, V]`` sharded ``P(data, model)``),
  or with ``linear=True`` ``loss_fn(hidden, weight, labels)`` (``hidden`` ``[N, D]``
  sharded ``P(data)``, ``weight`` ``[D, V]`` sharded ``P(None, model)``). The result is the
  per-example loss ``[N]`` sharded on ``data_axis``; take ``.mean()`` (or pass reduction
  through your own code) for training. ``options`` go to the loss: ``ignore_index``,
  ``label_smoothing``, ``z_loss``, and for ``linear`` ``chunk_size``, ``logit_softcap``,
  ``weight_layout`` (``"vd"``: ``weight`` ``[V, D]`` sharded ``P(model)``),
  ``token_scaling``, ``return_lse`` and ``return_stats`` (their ``[N]`` outputs follow the
  loss, sharded on ``data_axis``). Per-token or per-class arrays (``where``, ``weights``,
  ``bias``, ``class_weights``) need their own layout: call the loss inside your own
  ``jax.shard_map``.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> mesh = jax.make_mesh((1, 1), ("data", "model"))  # e.g. (2, 4) on 8 devices
  >>> loss_fn = jxent.sharded.make_vocab_parallel_loss(mesh, label_smoothing=0.1)
  >>> z = jnp.array([[2., 0., 0., 0.], [0., 0., 0., 1.]])
  >>> [round(v, 4) for v in loss_fn(z, jnp.array([0, 3])).tolist()]
  [0.4908, 0.8187]
  """
  if "reduction" in options:
    raise ValueError("make_vocab_parallel_loss returns per-example losses; reduce them "
                     "outside (e.g. .mean()).")
  if options.get("shift"):
    raise ValueError("make_vocab_parallel_loss takes flat [N] tokens over the data axis, so "
                     "shift (positions along sequences) has no sequences to move along: call "
                     "vocab_parallel_linear_cross_entropy(..., shift=k) inside your own "
                     "jax.shard_map, each device holding whole sequences [B, T].")
  arrays = sorted({"where", "weights", "bias", "class_weights"} & set(options))
  if arrays:
    raise ValueError(f"make_vocab_parallel_loss does not take {', '.join(arrays)}: arrays "
                     "need their own layout over the mesh; call the vocab-parallel loss "
                     "inside your own jax.shard_map.")
  extra = ()
  if linear:
    extra = (P(data_axis),) * bool(options.get("return_lse"))
    if options.get("return_stats"):
      extra += (TokenStats(*(P(data_axis),) * 4),)
  if linear:
    w_spec = P(model_axis) if options.get("weight_layout") == "vd" else P(None, model_axis)
    specs = (P(data_axis), w_spec, P(data_axis))

    def body(h, w, y):
      return vocab_parallel_linear_cross_entropy(h, w, y, axis_name=model_axis, **options)
  else:
    specs = (P(data_axis, model_axis), P(data_axis))

    def body(z, y):
      return vocab_parallel_cross_entropy(z, y, axis_name=model_axis, **options)

  inner = jax.shard_map(body, mesh=mesh, in_specs=specs,
                       out_specs=(P(data_axis),) + extra if extra else P(data_axis))

  explicit = all(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

  @jax.jit
  def loss_fn(*args):
    # Lay the arguments out as the specs say (a no-op when they already are): resharded on an
    # Explicit mesh, constrained on an Auto (or classic) one.
    lay = jax.reshard if explicit else jax.lax.with_sharding_constraint
    args = [lay(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    return inner(*args)

  return loss_fn
