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
from jxent._fused import linear_cross_entropy
from jxent._sharded_head import poison_out_of_range as _poison_out_of_range
from jxent._sharded_head import (
    vocab_parallel_linear_entropy,
    vocab_parallel_linear_js_divergence,
    vocab_parallel_linear_kl_divergence,
    vocab_parallel_linear_log_probs,
    vocab_parallel_linear_token_stats,
)

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


def _valid_mask(labels, ignore_index):
  if ignore_index is None:
    return jnp.ones(labels.shape, bool)
  return labels != ignore_index


def _combine(lse_local, z_y, sum_z_local, valid, opts, *, axis_name, vocab_size,
             tail_local=None):
  """Per-example loss from per-shard statistics and the label's logit ``z_y`` (all-reduced
  by the caller): [N] all-reduces only. ``tail_local``: this shard's part of the label's
  tail (``_reference.label_tail``), so that a tiny loss keeps its relative accuracy."""
  m = jax.lax.pmax(jax.lax.stop_gradient(lse_local), axis_name)
  m = jnp.where(jnp.isfinite(m), m, 0)
  r = jnp.log(jax.lax.psum(jnp.exp(lse_local - m), axis_name))
  lse = m + r
  tail = None if tail_local is None else jax.lax.psum(tail_local, axis_name)
  loss = R.label_term(r, m - z_y, tail)
  eps, zl = opts.label_smoothing, opts.z_loss
  if eps is not None:
    sum_z = jax.lax.psum(sum_z_local, axis_name)
    loss = (1 - eps) * loss + eps * (r + (m - sum_z / vocab_size))
  if zl is not None:
    loss = loss + zl * lse * lse
  return jnp.where(valid, loss, 0)


def vocab_parallel_cross_entropy(logits: ArrayLike, labels: ArrayLike, *, axis_name: AxisName,
                                 ignore_index: int | None = None,
                                 label_smoothing: ArrayLike = 0.0, z_loss: ArrayLike = 0.0,
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
    ignore_index: ids whose examples are ignored (loss 0, gradient 0).
    label_smoothing: :math:`\varepsilon` over the full vocabulary ``V = V_local * shards``.
    z_loss: coefficient of :math:`\mathrm{logsumexp}^2`.
    reduction: ``"none"`` (per-example, the same on every shard of the axis), ``"sum"`` or
      ``"mean"`` over this device's kept examples.
  """
  _checks.reduction(reduction)
  z = _checks.floating(logits, "logits")
  opts = _checks.CEOptions.make(label_smoothing, z_loss, z.dtype)
  labels = _checks.integer(labels, "labels")
  if labels.shape != z.shape[:-1]:
    raise ValueError(f"labels must have logits' shape without the vocabulary axis, "
                     f"{z.shape[:-1]}, got labels.shape={labels.shape}.")
  v_local = z.shape[-1]
  vocab = v_local * jax.lax.axis_size(axis_name)
  valid = _valid_mask(labels, ignore_index)
  _checks.check_logits(z.reshape(-1, v_local), valid.reshape(-1), "logits (this shard)")
  z = jnp.where(valid[..., None], z, 0)  # dropped rows reach no gradient, whatever they hold
  local = labels - _shard_offset(v_local, axis_name)
  here = (local >= 0) & (local < v_local) & valid
  lse_local = _local_lse(z)
  picked = jnp.take_along_axis(z, jnp.clip(local, 0, v_local - 1)[..., None], axis=-1)[..., 0]
  z_y = jax.lax.psum(jnp.where(here, picked, 0), axis_name)
  # The label's tail relative to its logit, on this shard's classes (one more [N] sum).
  tail_local = R.label_tail(z.reshape(-1, v_local), z_y.reshape(-1)).reshape(z_y.shape)
  sum_z_local = jnp.sum(z, axis=-1) if opts.label_smoothing is not None else None
  loss = _combine(lse_local, z_y, sum_z_local, valid, opts, axis_name=axis_name,
                  vocab_size=vocab, tail_local=tail_local)
  return _checks.reduce(_poison_out_of_range(loss, labels, valid, vocab), reduction,
                        jnp.sum(valid))


def _local_lse(z):
  """This shard's logsumexp; ``-inf`` with a zero (not NaN) gradient for a shard whose
  logits are all ``-inf``."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  m = jnp.where(jnp.isfinite(m), m, 0)
  s = jnp.sum(jnp.exp(z - m[..., None]), axis=-1)
  has_mass = s > 0
  return jnp.where(has_mass, m + jnp.log(jnp.where(has_mass, s, 1)), -jnp.inf)


def vocab_parallel_linear_cross_entropy(hidden: ArrayLike, weight: ArrayLike,
                                        labels: ArrayLike, *, axis_name: AxisName,
                                        ignore_index: int | None = None,
                                        label_smoothing: ArrayLike = 0.0,
                                        z_loss: ArrayLike = 0.0, reduction: str = "none",
                                        chunk_size: int | None = None) -> jax.Array:
  r"""Cross-entropy of ``hidden @ weight`` with ``weight`` ``[D, V_local]`` split over
  ``axis_name``, built on :func:`jxent.linear_cross_entropy`; call inside ``jax.shard_map``.

  Neither the full logits nor this shard's ``[N, V_local]`` block beyond one chunk is held:
  each shard runs the chunked fused kernel on its slice (which returns its per-token
  logsumexp and label logit), and only ``[N]`` statistics are all-reduced. With label
  smoothing the sum of all logits is ``hidden @ weight.sum(1)``, an ``[N]`` vector.

  Args:
    hidden: ``[..., D]``, replicated over ``axis_name``.
    weight: ``[D, V_local]``, this shard's columns.
    labels: global integer ids ``[...]``.
    axis_name, ignore_index, label_smoothing, z_loss, reduction: as in
      :func:`vocab_parallel_cross_entropy`.
    chunk_size: tokens per chunk of the fused kernel.
  """
  _checks.reduction(reduction)
  labels = _checks.integer(labels, "labels")
  hidden = _checks.as_array(hidden, "hidden")
  weight = _checks.as_array(weight, "weight")
  acc = jnp.float64 if jnp.float64 in (hidden.dtype, weight.dtype) else jnp.float32
  opts = _checks.CEOptions.make(label_smoothing, z_loss, acc)
  v_local = weight.shape[1]
  vocab = v_local * jax.lax.axis_size(axis_name)
  valid = _valid_mask(labels, ignore_index)
  hidden = jnp.where(valid[..., None], hidden, 0)  # dropped tokens reach no gradient
  local = labels - _shard_offset(v_local, axis_name)
  here = (local >= 0) & (local < v_local) & valid
  # Per-token local loss (lse_local - z_y on this shard's tokens, 0 elsewhere) and lse_local.
  local_loss, lse_local = linear_cross_entropy(
      hidden, weight, jnp.clip(local, 0, v_local - 1), where=here, reduction="none",
      return_lse=True, chunk_size=chunk_size, method="recompute")
  z_y = jax.lax.psum(jnp.where(here, lse_local - local_loss, 0), axis_name)
  # The label's tail (R.label_tail) per shard: on the label's shard from its own loss (a
  # tiny one kept to its relative accuracy there), elsewhere the shard's mass relative to the
  # label, exp(lse_local - z_y) (below 1 on every shard wherever the tail is used).
  tail_local = jnp.where(here, jnp.expm1(local_loss),
                         jnp.exp(jnp.minimum(lse_local - z_y, 0)))
  sum_z_local = None
  if opts.label_smoothing is not None:
    sum_z_local = jnp.dot(hidden, jnp.sum(weight, axis=1), preferred_element_type=acc)
  loss = _combine(lse_local, z_y, sum_z_local, valid, opts, axis_name=axis_name,
                  vocab_size=vocab, tail_local=tail_local)
  return _checks.reduce(_poison_out_of_range(loss, labels, valid, vocab), reduction,
                        jnp.sum(valid))


def make_vocab_parallel_loss(mesh: jax.sharding.Mesh, *, data_axis: str = "data",
                             model_axis: str = "model", linear: bool = False,
                             **options: Any) -> Callable[..., jax.Array]:
  """The common case as a function of global arrays: batch on ``data_axis``, vocab on
  ``model_axis``.

  Returns ``loss_fn(logits, labels)`` (``logits`` ``[N, V]`` sharded ``P(data, model)``),
  or with ``linear=True`` ``loss_fn(hidden, weight, labels)`` (``hidden`` ``[N, D]``
  sharded ``P(data)``, ``weight`` ``[D, V]`` sharded ``P(None, model)``). The result is the
  per-example loss ``[N]`` sharded on ``data_axis``; take ``.mean()`` (or pass reduction
  through your own code) for training. ``options`` go to the loss (``ignore_index``,
  ``label_smoothing``, ``z_loss``, and ``chunk_size`` for ``linear``).
  """
  if "reduction" in options:
    raise ValueError("make_vocab_parallel_loss returns per-example losses; reduce them "
                     "outside (e.g. .mean()).")
  if linear:
    specs = (P(data_axis), P(None, model_axis), P(data_axis))

    def body(h, w, y):
      return vocab_parallel_linear_cross_entropy(h, w, y, axis_name=model_axis, **options)
  else:
    specs = (P(data_axis, model_axis), P(data_axis))

    def body(z, y):
      return vocab_parallel_cross_entropy(z, y, axis_name=model_axis, **options)

  inner = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P(data_axis))

  explicit = all(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))

  @jax.jit
  def loss_fn(*args):
    # Lay the arguments out as the specs say (a no-op when they already are): resharded on an
    # Explicit mesh, constrained on an Auto (or classic) one.
    lay = jax.reshard if explicit else jax.lax.with_sharding_constraint
    args = [lay(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]
    return inner(*args)

  return loss_fn
