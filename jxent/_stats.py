"""Per-token statistics of blocks of logits: logsumexp, entropy and argmax.

Shared by the language-model head's quantities (``jxent/_lmhead.py``) and the fused
cross-entropy's ``return_stats`` (``jxent/_fused.py``): one ``[T, V]`` block at a time
(``chunk_stats``), or gathered online over blocks of vocabulary columns (``online_init``,
``online_block``, ``online_finish``).

The entropy is formed from ``log s - t / s`` with ``s = sum exp(z - m)`` and
``t = sum exp(z - m) (z - m)`` (``m`` the row's top logit), and ``log s`` as ``log1p`` of the
sum without the top's own terms (one per tie, each exactly 1, summed apart): it keeps its
relative accuracy when the distribution is nearly one-hot (no difference of two large
numbers, no tail lost next to 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class TokenStats(NamedTuple):
  """Per-token statistics of a language-model head (``linear_token_stats``,
  ``linear_cross_entropy(..., return_stats=True)``)."""

  logsumexp: Array
  """``[...]`` :math:`\\log \\sum_v e^{z_v}` of the (tempered) logits."""
  entropy: Array
  """``[...]`` entropy of the softmax, in nats."""
  argmax: Array
  """``[...]`` int32 index of the largest logit (the greedy prediction)."""
  label_log_prob: Array | None
  """``[...]`` :math:`\\log p_y`, or None without labels."""


# A jax.export of a function returning TokenStats serializes (the tree needs a stable name).
jax.export.register_namedtuple_serialization(TokenStats, serialized_name="jxent.TokenStats")


def finite(a):
  return jnp.where(jnp.isfinite(a), a, 0)


def lse_rows(x):
  """log-sum-exp along the last axis: -inf (with a zero derivative, not NaN) where all are
  -inf, NaN where one is NaN. The shift is held constant: ``c + log sum exp(x - c)`` is the
  logsumexp for every constant ``c``, so every derivative of it is exact."""
  m = jax.lax.stop_gradient(finite(jnp.max(x, axis=-1, keepdims=True)))
  s = jnp.sum(jnp.exp(x - m), axis=-1)
  empty = s == 0  # false for NaN
  return jnp.where(empty, -jnp.inf, m[..., 0] + jnp.log(jnp.where(empty, 1, s)))


def row_sums(xs, k=128):
  """Row sums of [T, V] arrays in one variadic reduction (``row_reduce``)."""
  return row_reduce(xs, (jnp.add,) * len(xs), k)


def row_reduce(xs, ops, k=128):
  """Row reductions (``jnp.add``, or ``jnp.minimum`` of integers) of [T, V] arrays in one
  variadic reduction (XLA then fuses their common operands into it rather than keep them as
  [T, V] blocks), in two stages: XLA:CPU adds a variadic reduction's terms one after another,
  and 32768 of them in one float32 running sum lose 1e-5 relative accuracy; sums of k first
  keep it near float32's resolution."""
  t, v = xs[0].shape
  red = lambda a, b: tuple(op(p, q) for op, p, q in zip(ops, a, b))
  init = tuple(np.array(0 if op is jnp.add else np.iinfo(x.dtype).max, x.dtype)
               for op, x in zip(ops, xs))
  full = (v // k) * k
  out = None
  if full:
    parts = jax.lax.reduce(tuple(x[:, :full].reshape(t, full // k, k) for x in xs), init, red,
                           (2,))
    out = tuple((jnp.sum if op is jnp.add else jnp.min)(p, axis=-1) for op, p in zip(ops, parts))
  if v > full:
    last = jax.lax.reduce(tuple(x[:, full:] for x in xs), init, red, (1,))
    out = last if out is None else red(out, last)
  return out


def chunk_stats(z, y, with_argmax=True):
  """(lse, entropy, label logit, argmax or None) of one [T, V] block of logits; with the
  argmax (monitoring), all four are constants to autodiff."""
  # The shift c is the row's max, held constant: lse = c + log s and H = log s - t / s, with
  # s = sum e, e = exp(z - c), t = sum e (z - c), hold for every constant c, so every
  # derivative of them is exact (the custom rules' primals are differentiated by autodiff at
  # second order). The top's terms (e = 1 each: one, or the ties) are summed apart from the
  # rest: log s = log(top) + log1p(rest / top) keeps the tail's mass when it is below float
  # resolution next to 1 (a nearly one-hot row). The masks are constants to autodiff, so the
  # two partial sums are still the full sum's.
  # All sums (and the first top index, the argmax) in one variadic reduction: e then has one
  # consumer, and XLA:CPU fuses the exponentials into it rather than keep them and each
  # operand as [T, V] blocks. No jnp.argmax (a variadic reduction of its own, which took as
  # long as the sums on XLA:CPU), no select against a constant 0 (XLA:CPU hoists a [T, V]
  # broadcast of it out of the scan as one more block of scratch).
  v = z.shape[-1]
  if with_argmax:
    # JAX's derivative of a variadic reduction fails on the index's symbolic zero tangent.
    z = jax.lax.stop_gradient(z)
  mx = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  c = finite(mx)
  zm = z - c[:, None]
  e = jnp.exp(zm)
  top = z == mx[:, None]  # all of a row of -inf (e = 0 there)
  # e (z - c) is 0 where e underflows (z = -inf: 0 log 0 = 0), by a finite floor on z - c.
  floor = jnp.asarray(jnp.finfo(z.dtype).min / 4, z.dtype)
  sums = (e * ~top, e * top, e * jnp.maximum(zm, floor))
  if with_argmax:
    iota = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    rest, ones, t, am = row_reduce(sums + (jnp.where(top, iota, v),), (jnp.add,) * 3
                                   + (jnp.minimum,))
    am = jnp.minimum(am, v - 1)  # a row with NaN has no top: its statistics are NaN
  else:
    (rest, ones, t), am = row_sums(sums), None
  ones = jnp.where(ones > 0, ones, 1)  # a row of -inf: s = 1 (lse 0, entropy 0)
  log_s = jnp.log(ones) + jnp.log1p(rest / ones)
  z_y = jnp.take_along_axis(z, jnp.clip(y, 0, v - 1)[:, None], axis=-1)[:, 0]
  return c + log_s, log_s - t / (ones + rest), z_y, am


# Online over blocks of vocabulary columns: the running top logit is the shift, its own term
# stays out of the running sum, both sums are rescaled when the top moves.


def online_init(shape, dtype, like):
  """The running (top logit, rest, t, argmax) before any block; ``like(x)`` marks a fresh
  array as the inputs' (``_fused._varying_like`` under ``shard_map``)."""
  full = lambda value, dt: like(jnp.full(shape, value, dt))
  return (full(-jnp.inf, dtype), full(0, dtype), full(0, dtype), full(0, jnp.int32))


def online_block(carry, z, start):
  """The running statistics after the block ``z`` of columns ``start:start + size``."""
  m, rest, t, am = carry
  a = jnp.argmax(z, axis=-1)
  top_z = jnp.take_along_axis(z, a[:, None], axis=-1)[:, 0]  # with its gradient
  new = top_z > m  # the top moves into this block
  m_new = jnp.where(new, top_z, m)
  seen = jnp.isfinite(m)
  mf, mf_new = finite(m), finite(m_new)
  # The 1 + rest terms so far, relative to the new shift: all of them, the old top's
  # included, are now among the rest. t = sum e (z - m) moves with its shift.
  shift = jnp.where(seen, mf - mf_new, 0)
  s_old = jnp.where(seen, 1 + rest, 0)
  scale = jnp.exp(shift)
  rest = jnp.where(new, s_old * scale, rest)
  t = jnp.where(new, scale * (t + s_old * shift), t)
  zm = z - mf_new[:, None]
  e = jnp.exp(zm)
  top = (jnp.arange(z.shape[-1])[None, :] == a[:, None]) & new[:, None]
  b_rest, b_t = row_sums((e * ~top, jnp.where(e > 0, e * zm, e)))
  return (m_new, rest + b_rest, t + b_t, jnp.where(new, (start + a).astype(jnp.int32), am))


def online_finish(carry):
  """(lse, entropy, argmax) from the running statistics over all blocks."""
  m, rest, t, am = carry
  log_s = jnp.log1p(rest)
  return finite(m) + log_s, log_s - t / (1 + rest), am
