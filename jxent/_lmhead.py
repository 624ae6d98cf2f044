"""Per-token information quantities of a language-model head, without the [N, V] logits.

For hidden states ``h`` ([..., D]), an output projection ``W`` and an optional bias, the
logits of a token are ``z = (h W + b) / T`` (temperature ``T``). Per token this module
computes, one ``[chunk, V]`` block of logits at a time as ``linear_cross_entropy`` does:

* the log-probability of a label, ``log softmax(z)[y] = z_y - lse(z)``;
* the entropy ``H = -sum_v p_v log p_v = lse(z) - E_p[z]``;
* the logsumexp and the argmax (monitoring).

Per token, the differentiable ones are ``jax.custom_jvp`` rules: the log-probability alone
(``_head_log_probs``), the entropy alone (``_head_entropy``), or both (``_head_stats``). Each
primal keeps per token the logsumexp (and the entropy, where it is wanted); its tangent
recomputes the blocks (vocabulary slices outside, token chunks inside, both checkpointed, as
the recompute method of the cross-entropy) and returns, for a tangent ``dz`` of the logits,
one row sum per output:

    d log p_y = dz_y - E_p[dz],   d H = -Cov_p(z, dz) = -E_p[(z - lse + H) dz],

linear in the tangents of ``h``, ``W`` and ``b``: forward mode, reverse mode (JAX's
transpose) and higher orders all work, and reverse mode keeps only the inputs and one or two
numbers per token. The log-probability alone takes the logsumexp as one plain row sum
(``_lse_and_label``), without the entropy's variadic reduction (``python -m benchmarks
lmhead``, row "log_probs/token").

Tokens laid out over explicit mesh axes (``jax.sharding.AxisType.Explicit``) are taken
data-parallel: each function runs inside ``shard_map`` over those axes on each device's own
tokens, and only scalars (a sum, a mean's count) cross devices (``_token_mesh``).

The entropy is formed from ``log s - t / s`` with ``s = sum exp(z - m)`` and
``t = sum exp(z - m) (z - m)`` (``m`` the row's max), and ``log s`` as ``log1p`` of the sum
without the max's own terms (``jxent/_stats.py``): it keeps its relative accuracy when the
distribution is nearly one-hot (no difference of two large numbers, no tail lost next to 1).
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _fused as F
from jxent import _reference as R
from jxent import _stats as S
from jxent._information import plog_p_over_m
from jxent._platform import dispatch, explicitly_sharded
from jxent._stats import TokenStats

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["layout", "vocab_slice", "acc", "temperature", "accel_block"])
class _Config:
  def __init__(self, layout, vocab_slice, acc, temperature, accel_block=0):
    self.layout, self.vocab_slice = layout, vocab_slice
    self.acc, self.temperature, self.accel_block = acc, temperature, accel_block


def _plain(cfg):
  """The cross-entropy module's config for ``h @ W (+ b)`` alone (no cap, no options)."""
  return F._Config(None, None, None, cfg.layout, cfg.vocab_slice, cfg.acc)


def _block_logits(h, w, b, cfg):
  z = F._logits(h, w, b, _plain(cfg))[0]
  return z if cfg.temperature == 1.0 else z * (1.0 / cfg.temperature)


def _tangent_logits(h, w, dh, dw, db, cfg):
  """Tangent of one block's (tempered) logits from the tangents of h, W, b (None: zero);
  None when all three are."""
  plain = _plain(cfg)
  parts = [None if dh is None else F._logits(dh, w, None, plain)[0],
           None if dw is None else F._logits(h, dw, None, plain)[0],
           None if db is None else db.astype(cfg.acc)]
  parts = [a for a in parts if a is not None]
  if not parts:
    return None
  dz = functools.reduce(jnp.add, parts)
  return dz if cfg.temperature == 1.0 else dz * (1.0 / cfg.temperature)


def _forward(h3, w, b, y2, cfg, with_argmax=False):
  """(lse, entropy, label logit[, argmax]), each [n_chunks, T]: token chunks (reference,
  XLA:CPU) or vocabulary blocks over all tokens (GPU, TPU)."""
  return dispatch(h3, w, b, y2, cfg,
                  reference=functools.partial(_chunks_forward, with_argmax=with_argmax),
                  accelerator=functools.partial(_vocab_forward, with_argmax=with_argmax))


def _chunks_forward(h3, w, b, y2, cfg, with_argmax=False):
  def body(_, xs):
    h, y = xs
    lse, ent, z_y, am = S.chunk_stats(_block_logits(h, w, b, cfg), y, with_argmax)
    return None, (lse, ent, z_y, am) if with_argmax else (lse, ent, z_y)

  return jax.lax.scan(body, None, (h3, y2))[1]


@jax.custom_jvp
def _head_stats(h3, w, b, y2, cfg):
  """(lse, entropy, label logit), each [n_chunks, T]."""
  return _forward(h3, w, b, y2, cfg)


def _stats_block_tangent(h, y, valid, res, dh, w, b, dw, db, cfg, start, v):
  """Tangents of (lse, entropy, label logit) of one chunk from the vocabulary slice
  ``start:start + S`` (w, b and their tangents sliced)."""
  del valid, v
  lse, ent = res
  z = _block_logits(h, w, b, cfg)
  zl = z - jnp.where(jnp.isfinite(lse), lse, 0)[:, None]
  p = jnp.exp(zl)
  dz = _tangent_logits(h, w, dh, dw, db, cfg)
  a1 = jnp.sum(p * dz, axis=-1)
  # p (z - lse), 0 where p = 0 (z = -inf): a finite floor, not a select (see _entropy_grad).
  floor = jnp.asarray(jnp.finfo(zl.dtype).min / 4, zl.dtype)
  a2 = jnp.sum(p * jnp.maximum(zl, floor) * dz, axis=-1)
  onehot = (jnp.arange(z.shape[-1]) + start)[None, :] == y[:, None]
  d_zy = jnp.sum(jnp.where(onehot, dz, 0), axis=-1)
  return a1, -(a2 + ent * a1), d_zy


def _stats_tangents(primals, tangents, res, block, outs):
  """The per-token tangents of ``outs`` from ``block`` over the recomputed blocks (residuals
  ``res``), zeros when those of h, W and b are all zero."""
  h3, w, b, y2, cfg = primals
  dh3, dw, db, _, _ = tangents
  dh3 = dh3 if F._nonzero(dh3) else None
  dw = dw if F._nonzero(dw) else None
  db = db if (b is not None and F._nonzero(db)) else None
  if dh3 is None and dw is None and db is None:
    return tuple(jnp.zeros_like(a) for a in outs)
  valid = jnp.ones(y2.shape, bool)
  return tuple(_tangent(h3, y2, valid, res, dh3, w, b, dw, db, cfg, block))


def _head_stats_jvp(primals, tangents):
  out = _forward(*primals)
  return out, _stats_tangents(primals, tangents, out[:2], _stats_block_tangent, out)


_head_stats.defjvp(_head_stats_jvp, symbolic_zeros=True)


def _log_probs_forward(h3, w, b, y2, cfg):
  """(lse, label logit), each [n_chunks, T]: the logsumexp alone where the entropy is not
  wanted (token chunks), or the statistics over vocabulary blocks (GPU, TPU)."""
  def chunks(h3, w, b, y2, cfg):
    body = lambda _, xs: (None, _lse_and_label(_block_logits(xs[0], w, b, cfg), xs[1]))
    return jax.lax.scan(body, None, (h3, y2))[1]

  def vocab(h3, w, b, y2, cfg):
    lse, _, z_y = _vocab_forward(h3, w, b, y2, cfg)
    return lse, z_y

  return dispatch(h3, w, b, y2, cfg, reference=chunks, accelerator=vocab)


@jax.custom_jvp
def _head_log_probs(h3, w, b, y2, cfg):
  """log softmax(z)[y] = z_y - lse, [n_chunks, T]."""
  lse, z_y = _log_probs_forward(h3, w, b, y2, cfg)
  return z_y - lse


def _log_probs_block_tangent(h, y, valid, lse, dh, w, b, dw, db, cfg, start, v):
  """Tangent of one chunk's log p_y from the vocabulary slice ``start:start + S``:
  sum_v (onehot(y) - p)_v dz_v, one row sum."""
  del valid, v
  z = _block_logits(h, w, b, cfg)
  dz = _tangent_logits(h, w, dh, dw, db, cfg)
  return (jnp.sum(_log_prob_grad(z, lse, y - start) * dz, axis=-1),)


def _head_log_probs_jvp(primals, tangents):
  lse, z_y = _log_probs_forward(*primals)
  lp = z_y - lse
  return lp, _stats_tangents(primals, tangents, lse, _log_probs_block_tangent, (lp,))[0]


_head_log_probs.defjvp(_head_log_probs_jvp, symbolic_zeros=True)


@jax.custom_jvp
def _head_entropy(h3, w, b, y2, cfg):
  """The entropy, [n_chunks, T]."""
  return _forward(h3, w, b, y2, cfg)[1]


def _entropy_block_tangent(h, y, valid, res, dh, w, b, dw, db, cfg, start, v):
  """Tangent of one chunk's entropy from the vocabulary slice ``start:start + S``:
  -sum_v p_v (z_v - lse + H) dz_v, one row sum."""
  del y, valid, start, v
  lse, ent = res
  z = _block_logits(h, w, b, cfg)
  dz = _tangent_logits(h, w, dh, dw, db, cfg)
  return (jnp.sum(_entropy_grad(z, lse, ent) * dz, axis=-1),)


def _head_entropy_jvp(primals, tangents):
  lse, ent, _ = _forward(*primals)
  return ent, _stats_tangents(primals, tangents, (lse, ent), _entropy_block_tangent, (ent,))[0]


_head_entropy.defjvp(_head_entropy_jvp, symbolic_zeros=True)


def _tangent(h3, y2, valid, res, dh3, w, b, dw, db, cfg, block):
  """``F._tokens_tangent`` with ``block``: token chunks inside vocabulary slices (reference,
  XLA:CPU), or on GPU/TPU one chunk of all tokens and slices of the accelerator block."""
  return dispatch(h3, y2, valid, res, dh3, w, b, dw, db, cfg,
                  reference=functools.partial(F._tokens_tangent, block=block),
                  accelerator=functools.partial(_vocab_tangent, block=block))


# ------------------------------------------------ GPU and TPU: vocabulary blocks, all tokens
#
# As the fused cross-entropy's accelerator form (jxent/_fused.py): on a GPU, token chunks are
# hundreds of thin products, each re-reading W (the cross-entropy ran 9.9x the unfused time
# so on an H100). There each step takes one block of vocabulary columns for all N tokens
# ([N, block] logits, ~128 MiB in float32). The statistics are gathered online over the
# blocks with jxent/_stats.py's arithmetic (the running top logit is the shift, its own term
# stays out of the running sum, both sums are rescaled when the top moves); the forward
# method's second pass recomputes each block, writes its dW columns once and accumulates dh;
# the per-token tangent walks the same blocks. Tested here against the reference; on an H200
# (bfloat16, N=8192, D=4096, V=128256) the mean log-probability took 0.75x the unfused time,
# the token chunks 9.5x (benchmarks/RESULTS.md).


def _vocab_stats(h, y, w, b, cfg, with_argmax=False):
  """(lse, entropy, label logit[, argmax]), each [N], one [N, block] block at a time."""
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  yc = jnp.clip(y, 0, v - 1)
  like = lambda x: F._varying_like(x, h, w, b, y)
  init = (S.online_init(y.shape, cfg.acc, like), like(jnp.zeros(y.shape, cfg.acc)))

  def block(carry, start, size):
    stats, z_y = carry
    z = _block_logits(h, F._cut(w, start, size, axis), F._cut(b, start, size, 0), cfg)
    inside = (yc >= start) & (yc < start + size)
    got = jnp.take_along_axis(z, jnp.clip(yc - start, 0, size - 1)[:, None], axis=-1)[:, 0]
    return S.online_block(stats, z, start), z_y + jnp.where(inside, got, 0)

  stats, z_y = F._vocab_loop(block, init, v, min(cfg.accel_block, v))
  lse, ent, am = S.online_finish(stats)
  return (lse, ent, z_y, am) if with_argmax else (lse, ent, z_y)


def _vocab_forward(h3, w, b, y2, cfg, with_argmax=False):
  nc, t, d = h3.shape
  out = _vocab_stats(h3.reshape(nc * t, d), y2.reshape(nc * t), w, b, cfg, with_argmax)
  return tuple(a.reshape(nc, t) for a in out)


def _vocab_tangent(h3, y2, valid, res, dh3, w, b, dw, db, cfg, block):
  """``F._tokens_tangent`` over one chunk of all tokens (``h3`` and ``dh3`` may be pytrees:
  a student's and a teacher's head)."""
  nc, t = jax.tree.leaves(h3)[0].shape[:2]
  one = lambda a: jax.tree.map(lambda x: x.reshape((1, nc * t) + x.shape[2:]), a)
  wide = copy.copy(cfg)  # the same quantity (one head's statistics, or a pair's divergence)
  wide.vocab_slice = max(cfg.accel_block // 2, 1)
  out = F._tokens_tangent(one(h3), one(y2), one(valid), one(res), one(dh3), w, b, dw, db,
                          wide, block=block)
  return tuple(a.reshape((nc, t) + a.shape[2:]) for a in out)


def _low_dtype(h, w, acc):
  """The dtype of the gradient products' operands: the inputs' if narrower than ``acc``."""
  low = jnp.result_type(h, w)
  return low if jnp.finfo(low).bits < jnp.finfo(acc).bits else acc


def _grads_init(h, w, b, acc, *refs):
  """Zero (dh in ``acc``, dW, db) for a pass over vocabulary blocks."""
  zeros = lambda a, dtype: F._varying_like(jnp.zeros(a.shape, dtype), *refs)
  return (zeros(h, acc), zeros(w, w.dtype), None if b is None else zeros(b, b.dtype))


def _vocab_block_grads(grads, g, hl, w_j, start, axis, plain, low):
  """(dh, dW, db) moved on by one vocabulary block's gradient in the logits ``g`` ([N, block],
  scaled): dh accumulated, the block's dW columns and db entries written once."""
  dh, dw, db = grads
  dh_j, dw_j = F._block_products(g, hl, w_j, plain, low)
  dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_j.astype(dw.dtype), start, axis)
  if db is not None:
    db = jax.lax.dynamic_update_slice_in_dim(db, jnp.sum(g, axis=0).astype(db.dtype), start, 0)
  return dh + dh_j, dw, db


def _one_head_vocab_grads(h3, w, b, data, scale, cfg, kind, want):
  """``_one_head_grads`` for the log-probabilities (or a loss function of them) and the
  entropy on GPU/TPU: the statistics over vocabulary blocks, then each block again for its
  gradient."""
  nc, t, d = h3.shape
  h = h3.reshape(nc * t, d)
  y, valid = (a.reshape(-1) for a in data[:2])
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  lse, ent, z_y = _vocab_stats(h, y, w, b, cfg)
  _, bad = R.split_labels(y, valid, v)
  fn = isinstance(kind, _TokenFn)
  slope = g_lp = None
  if kind == "log_probs" or fn:
    val = R.poison_rows(jnp.where(valid, z_y - lse, 0), bad)
    if fn:
      lp = val
      val, g_lp, slopes = kind.terms(
          lp, valid, tuple(a.reshape((nc * t,) + a.shape[2:]) for a in data[2]))
      slope = (tuple(a.reshape((nc, t) + a.shape[1:]) for a in slopes), lp.reshape(nc, t))
  else:
    val = jnp.where(valid, ent, 0)
  if not want:
    return val.reshape(nc, t), slope, None
  plain = _plain(cfg)
  low = _low_dtype(h, w, cfg.acc)
  hl = h.astype(low)
  coef = scale.reshape(-1) / cfg.temperature  # z = (h W + b) / T
  coef = coef if g_lp is None else coef * g_lp
  lse_f = S.finite(lse)
  floor = jnp.asarray(jnp.finfo(cfg.acc).min / 4, cfg.acc)
  init = _grads_init(h, w, b, cfg.acc, h, w, b, coef)

  def block(carry, start, size):
    w_j = F._cut(w, start, size, axis)
    z = _block_logits(h, w_j, F._cut(b, start, size, 0), cfg)
    zl = z - lse_f[:, None]
    p = jnp.exp(zl)
    if kind == "log_probs" or fn:
      onehot = (jnp.arange(size) + start)[None, :] == y[:, None]
      g = R.poison_rows(jnp.where(onehot, 1 - p, -p), bad)
    else:
      g = -p * (jnp.maximum(zl, floor) + ent[:, None])
    return _vocab_block_grads(carry, g * coef[:, None], hl, w_j, start, axis, plain, low)

  dh, dw, db = F._vocab_loop(block, init, v, min(cfg.accel_block, v))
  return val.reshape(nc, t), slope, (dh.astype(h3.dtype).reshape(nc, t, d), dw, db)


# ------------------------------------------- a scalar quantity of one head: the forward method
#
# With a "mean" or "sum" reduction the cotangent of every token is known up to one number
# (its weight), so, as for the distillation losses below, the tangent rule forms each chunk's
# gradient in the (tempered) logits beside the value and turns it into dh, dW, db at once: the
# logits are computed once (the unfused computation's 6 N·D·V flops), not again in the
# tangent (the per-token rule's 8). The tangent is the gradients' inner product with the
# input tangents: linear, so reverse mode scales the saved gradients.


def _topk_value(lse, lse_rest, z_i, lpt):
  """The top-k KL per token from the student's logsumexps (all classes; outside the k) and
  its logits at the k classes, given the teacher's k log-probabilities ([..., k])."""
  k = lpt.shape[-1]
  p = jnp.exp(lpt)
  top = jnp.sum(jnp.where(p > 0, p * (lpt - (z_i - lse[..., None])), 0), axis=-1)
  # A missing mass within the rounding of a sum of k probabilities is no mass (k = V).
  r = 1 - jnp.sum(p, axis=-1)
  r = jnp.where(r > k * jnp.finfo(lpt.dtype).eps, r, 0)
  rest = jnp.where(r > 0, r * (jnp.log(jnp.where(r > 0, r, 1)) - (lse_rest - lse)), 0)
  return top + rest


class _TokenFn:
  """The one-head kind of :func:`linear_log_prob_loss`: a function of each token's label
  log-probability and its per-token arguments, applied token by token (``jax.vmap`` over
  scalars, so the loss of one token cannot read another's). Hashable by the function, so
  that it is a static argument of the custom rule."""

  def __init__(self, fn):
    self.fn = fn

  def __hash__(self):
    return hash(self.fn)

  def __eq__(self, other):
    return type(other) is _TokenFn and other.fn == self.fn

  def terms(self, lp, valid, args):
    """(values, their slopes in log p, their slopes in each argument), each [T], 0 on
    dropped tokens (there the function sees log p = 0 and its value is discarded)."""
    val, vjp = jax.vjp(jax.vmap(self.fn), *_held(valid, lp, *args))
    if jnp.shape(val) != lp.shape or not jnp.issubdtype(val.dtype, jnp.floating):
      raise ValueError("linear_log_prob_loss's loss_fn must map scalars (a log-probability "
                       "and one entry of each token argument) to one float scalar; applied "
                       f"to a chunk of {lp.shape[0]} tokens it gave {jax.typeof(val)}.")
    g_lp, *slopes = vjp(jnp.ones_like(val))
    return _kept_terms(valid, lp.dtype, val, g_lp, slopes)


def _held(valid, *arrays):
  """The arrays with dropped tokens' entries held constant: a derivative that is singular
  there (log(-lp) at lp = 0) then reaches no gradient, not even as 0 * inf."""
  return [jnp.where(_trailing(valid, a), a, jax.lax.stop_gradient(a)) for a in arrays]


def _kept_terms(valid, dtype, val, g_lp, slopes):
  keep = lambda a: jnp.where(_trailing(valid, a), a, 0).astype(dtype)
  return keep(val), keep(g_lp), tuple(keep(s) for s in slopes)


class _GroupFn(_TokenFn):
  """A loss of whole groups of ``length`` consecutive tokens (the sequences of a pair, or
  one sequence): ``fn(log_p [G, length], kept [G, length], *args [G, length, ...])`` gives
  each group's loss [G], 0 for a group it drops. Every chunk holds whole groups, so the
  slope of each token's log-probability is known in the chunk's own pass, as a per-token
  loss's is. A group's loss is spread over its kept tokens (their sum is the loss). A chunk
  of one group longer than a block is taken in ``pieces`` blocks (``_split_group_chunk``)."""

  def __init__(self, fn, length, pieces=1):
    super().__init__(fn)
    self.length, self.pieces = int(length), int(pieces)

  def __hash__(self):
    return hash((self.fn, self.length, self.pieces))

  def __eq__(self, other):
    return (isinstance(other, _GroupFn) and other.fn == self.fn
            and (other.length, other.pieces) == (self.length, self.pieces))

  def terms(self, lp, valid, args):
    group = lambda a: a.reshape((-1, self.length) + a.shape[1:])
    kept = group(valid)
    loss, vjp = jax.vjp(lambda lp, *a: self.fn(group(lp), kept, *map(group, a)),
                        *_held(valid, lp, *args))
    if loss.shape != kept.shape[:1] or not jnp.issubdtype(loss.dtype, jnp.floating):
      raise ValueError(f"a group loss must give one float per group of {self.length} tokens "
                       f"({kept.shape[0]} here), got {jax.typeof(loss)}.")
    g_lp, *slopes = vjp(jnp.ones_like(loss))
    count = jnp.maximum(jnp.sum(kept, axis=-1), 1).astype(loss.dtype)
    val = ((loss / count)[:, None] * kept).reshape(-1)
    return _kept_terms(valid, lp.dtype, val, g_lp, slopes)


def _trailing(a, like):
  """``a`` ([tokens...]) with ones appended to its shape up to ``like``'s rank."""
  return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def _one_head_chunk(z, data, kind, want):
  """(value [T], its gradient in the (tempered) logits [T, V] or None, the slopes of the value
  in the per-token data: top-k: in the teacher's log-probabilities [T, k]; a loss function
  (``_TokenFn``): (in each of its arguments, [T]; the label log-probabilities it was given))
  of one chunk of kept or dropped tokens."""
  if kind in _DENSE:
    return _dense_terms(z, S.lse_rows(z), *data, want, kind == "dense+t")
  if kind == "topk":
    idx, lpt, valid = data
    zr = _masked_topk(z, idx, 0)
    lse, lse_rest, z_i = S.lse_rows(z), S.lse_rows(zr), _take_topk(z, idx, 0)
    val, vjp = jax.vjp(_topk_value, lse, lse_rest, z_i, lpt)
    g_lse, g_rest, g_zi, slope = vjp(jnp.ones_like(val))
    val = jnp.where(valid, val, 0)
    if not want:
      return val, None, slope
    # d lse / dz = q, d lse_rest / dz = q restricted to the other classes and renormalised.
    q = jnp.exp(z - S.finite(lse)[:, None])
    q_rest = jnp.exp(zr - S.finite(lse_rest)[:, None])
    g = g_lse[:, None] * q + g_rest[:, None] * q_rest
    g = g.at[jnp.arange(z.shape[0])[:, None], idx].add(g_zi)
    return val, g, slope
  y, valid = data[:2]
  fn = isinstance(kind, _TokenFn)
  if kind == "log_probs" or fn:
    lse, z_y = _lse_and_label(z, y)
    _, bad = R.split_labels(y, valid, z.shape[-1])
    val = R.poison_rows(jnp.where(valid, z_y - lse, 0), bad)
    slope = g_lp = None
    if fn:  # the loss of log p: its slope in log p scales log p's gradient
      lp = val
      val, g_lp, slopes = kind.terms(lp, valid, data[2])
      slope = (slopes, lp)
    if not want:
      return val, None, slope
    g = _log_prob_grad(z, lse, y, bad)
    return val, g if g_lp is None else g * g_lp[:, None], slope
  lse, ent, _, _ = S.chunk_stats(z, y, with_argmax=False)
  val = jnp.where(valid, ent, 0)  # entropy
  return val, _entropy_grad(z, lse, ent) if want else None, None


def _one_head_grads(h3, w, b, data, scale, cfg, kind, want):
  """Per-token values [n_chunks, T], top-k slopes, and when ``want`` the gradients
  (dh [n_chunks, T, D], dW, db) of ``sum_i scale_i value_i``: token chunks (reference,
  XLA:CPU) or vocabulary blocks over all tokens (GPU, TPU)."""
  ref = functools.partial(_one_head_chunk_grads, kind=kind, want=want)
  accel = (functools.partial(_topk_vocab_grads, want=want) if kind == "topk" else
           functools.partial(_dense_vocab_grads, kind=kind, want=want) if kind in _DENSE else
           functools.partial(_one_head_vocab_grads, kind=kind, want=want))
  return dispatch(h3, w, b, data, scale, cfg, reference=ref, accelerator=accel)


def _one_head_chunk_grads(h3, w, b, data, scale, cfg, kind, want):
  refs = (h3, w, scale)
  dw0 = F._varying_like(jnp.zeros(w.shape, cfg.acc), *refs) if want else None
  db0 = (F._varying_like(jnp.zeros(b.shape, cfg.acc), *refs)
         if want and b is not None else None)
  plain = _plain(cfg)
  fetch = lambda d: d
  if kind in _DENSE:  # the target's rows of each chunk, taken from it unpadded (no copy)
    lt, v2 = data
    n, t = lt.shape[0], v2.shape[1]
    if n < t:  # one chunk, larger than the target
      lt = jnp.pad(lt, ((0, t - n), (0, 0)))
    data = (jnp.arange(v2.shape[0]), v2)
    # Each chunk's rows sliced from the target as given (a padded copy would be the size of
    # the logits). The last chunk of a ragged N (its default chunk divides N where it can)
    # takes the last t rows, moved so that row r is the chunk's token r. (XLA:CPU still
    # converts a 16-bit target to one float32 copy for the loop: keep a CPU target in
    # float32.)
    def fetch(d):
      start = jnp.minimum(d[0] * t, max(n, t) - t)
      rows = jax.lax.dynamic_slice_in_dim(lt, start, t, 0)
      if n % t:  # only the last chunk moves its rows
        shift = start - d[0] * t
        rows = jax.lax.cond(shift == 0, lambda r: r, lambda r: jnp.roll(r, shift, axis=0),
                            rows)
      return rows, d[1]

  def body(carry, xs):
    h, d, sc = xs
    if getattr(kind, "pieces", 1) > 1:
      return _split_group_chunk(carry, h, d, sc, w, b, cfg, kind, want)
    val, g, slope = _one_head_chunk(_block_logits(h, w, b, cfg), fetch(d), kind, want)
    if not want:
      return carry, (val, slope, None)
    g = g * (sc / cfg.temperature)[:, None]  # z = (h W + b) / T
    dw, db = carry
    dh = F._dh(g, w, plain).astype(h.dtype)
    dw = F._accumulate_dw(dw, h, g, plain)
    db = None if db is None else db + jnp.sum(g, axis=0)
    return (dw, db), (val, slope, dh)

  (dw, db), (val, slope, dh) = jax.lax.scan(body, (dw0, db0), (h3, data, scale))
  if kind == "dense+t":  # [n_chunks, T, V] -> the target's [N, V]
    slope = slope.reshape(-1, slope.shape[-1])[:n]
  grads = None
  if want:
    grads = (dh, dw.astype(w.dtype), None if db is None else db.astype(b.dtype))
  return val, slope, grads


def _split_group_chunk(carry, h, d, sc, w, b, cfg, kind, want):
  """``_one_head_chunk_grads``'s step for a chunk of one group longer than a block, in
  ``kind.pieces`` blocks: the log-probabilities of each block (its logits then dropped), the
  group's slopes, then each block's gradient from its logits computed again. One block of
  logits at a time, at 8 N·D·V flops (the per-token log-probabilities' count; a block that
  held the whole group took 6, at the group's length of memory). (Holding the last block's
  logits for its gradient saves a block's product, but XLA:CPU then computed the blocks of
  both passes before either's gradient: two blocks at once.)"""
  y, valid, args = d
  t, s = h.shape[0], kind.pieces
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  sub = -(-t // s)
  pad = lambda a: jnp.pad(a, [(0, s * sub - t)] + [(0, 0)] * (a.ndim - 1)).reshape(
      (s, sub) + a.shape[1:])
  hs, ys = pad(h), pad(y)

  _, (lse, z_y) = jax.lax.scan(
      lambda c, xs: (c, _lse_and_label(_block_logits(xs[0], w, b, cfg), xs[1])), None,
      (hs, ys))
  _, bad = R.split_labels(y, valid, v)
  lp = R.poison_rows(jnp.where(valid, (z_y - lse).reshape(-1)[:t], 0), bad)
  val, g_lp, slopes = kind.terms(lp, valid, args)
  if not want:
    return carry, (val, (slopes, lp), None)
  coef = pad(g_lp * (sc / cfg.temperature))  # z = (h W + b) / T
  plain = _plain(cfg)

  def step(grads, xs):
    hb, yb, lb, bb, cb = xs
    dw, db = grads
    g = _log_prob_grad(_block_logits(hb, w, b, cfg), lb, yb, bb) * cb[:, None]
    dw = F._accumulate_dw(dw, hb, g, plain)
    db = None if db is None else db + jnp.sum(g, axis=0)
    return (dw, db), F._dh(g, w, plain).astype(h.dtype)

  carry, dh = jax.lax.scan(step, carry, (hs, ys, lse, pad(bad), coef))
  return carry, (val, (slopes, lp), dh.reshape(-1, h.shape[-1])[:t])


def _lse_and_label(z, y):
  """(logsumexp, label logit) of one block of logits for the log-probabilities: the
  logsumexp alone, one plain row sum, not S.chunk_stats's variadic reduction of the
  entropy's sums (with its argmax and a select on the block, XLA:CPU then kept a second
  [T, V] block), so that the gradient takes the logits' buffer.
  A row of -inf has lse 0, as chunk_stats gives it (its label's log-probability -inf, as the
  per-token path's, not -inf - -inf)."""
  lse = S.lse_rows(z)
  return (jnp.where(lse == -jnp.inf, 0, lse),
          jnp.take_along_axis(z, jnp.clip(y, 0, z.shape[-1] - 1)[:, None], axis=-1)[:, 0])


def _log_prob_grad(z, lse, y, bad=None):
  """d log p_y / dz = onehot(y) - p for one block of logits (NaN rows where ``bad``)."""
  p = jnp.exp(z - S.finite(lse)[:, None])
  onehot = jnp.arange(z.shape[-1])[None, :] == y[:, None]
  g = jnp.where(onehot, 1 - p, -p)
  return g if bad is None else R.poison_rows(g, bad)


def _entropy_grad(z, lse, ent):
  """dH / dz = -p (log p + H) for one block of logits, log p clamped to a finite floor so
  that p = 0 (z = -inf) gives 0 (0 log 0 = 0) and p enters one product: XLA then fuses the
  whole gradient into one elementwise pass (a select would keep p as one more [T, V]
  block)."""
  zl = z - S.finite(lse)[:, None]
  floor = jnp.asarray(jnp.finfo(zl.dtype).min / 4, zl.dtype)
  return -jnp.exp(zl) * (jnp.maximum(zl, floor) + ent[:, None])


@functools.partial(jax.custom_jvp, nondiff_argnums=(6,))
def _one_head_sum(h3, w, b, data, scale, cfg, kind):
  """``sum(scale * value)`` over [n_chunks, T] tokens (scale 0 on dropped ones): the forward
  method's custom rule; ``data`` holds (labels, kept), (labels, kept, a loss function's
  per-token arguments) or (top-k indices, log-probs, kept). Returns (that sum, for a loss
  function the label log-probabilities it was given [n_chunks, T] (not differentiated), else
  None)."""
  val, slope, _ = _one_head_grads(h3, w, b, data, scale, cfg, kind, False)
  return jnp.sum(val * scale), _aux(kind, slope)


def _aux(kind, slope):
  return slope[1] if isinstance(kind, _TokenFn) else None


def _one_head_sum_jvp(kind, primals, tangents):
  h3, w, b, data, scale, cfg = primals
  dh3, dw, db, ddata, dscale, _ = tangents
  nz = F._nonzero
  want = nz(dh3) or nz(dw) or (b is not None and nz(db))
  if kind == "dense" and nz(ddata[0]):  # the target's slope ([N, V]) only when asked for
    kind = "dense+t"
  val, slope, grads = _one_head_grads(h3, w, b, data, scale, cfg, kind, want)
  out = jnp.sum(val * scale)
  tangent = jnp.zeros((), out.dtype)
  if nz(dscale):  # per-token weights (and a mean's weighted denominator)
    tangent = tangent + jnp.sum(val * dscale)
  if kind == "topk" and nz(ddata[1]):
    tangent = tangent + jnp.sum(scale[..., None] * slope * ddata[1])
  if kind == "dense+t":
    n = ddata[0].shape[0]
    tangent = tangent + jnp.sum(scale.reshape(-1)[:n, None] * slope * ddata[0])
  if isinstance(kind, _TokenFn):  # the loss function's per-token arguments
    for s, da in zip(slope[0], ddata[2]):
      if nz(da):
        tangent = tangent + jnp.sum(_trailing(scale, s) * s * da)
  if want:
    gh, gw, gb = grads
    if nz(dh3):
      tangent = tangent + F._dot(gh, dh3)
    if nz(dw):
      tangent = tangent + F._dot(gw, dw)
    if b is not None and nz(db):
      tangent = tangent + F._dot(gb, db)
  aux = _aux(kind, slope)
  return (out, aux), (tangent.astype(out.dtype), F._zero_tangents(aux))


_one_head_sum.defjvp(_one_head_sum_jvp, symbolic_zeros=True)


# The forward method's default chunk: the default divided by about the number of [chunk, V]
# blocks it holds at once, so that its scratch stays near one ~64 MiB block (XLA:CPU's
# buffers, measured with `python -m benchmarks lmhead`, benchmarks/RESULTS.md): the entropy
# and the log-probabilities (and the losses of them) hold one (the logits, overwritten by
# their gradient), the top-k KL three (the masked copy and the scatter-add), a two-head
# divergence both heads' blocks, a dense target three (its rows' exponentials, the logits,
# the value's terms).
_FORWARD_METHOD_DIVISOR = {"entropy": 1, "log_probs": 1, "topk": 2, "pair": 2, "dense": 2}


def _forward_method_chunk(hidden_shape, v, kind):
  """The forward method's default chunk for ``kind``; None for a symbolic N (chunk_tokens
  then says what is wrong)."""
  try:
    num = int(np.prod([int(s) for s in hidden_shape[:-1]], dtype=np.int64))
  except (TypeError, jax.errors.ConcretizationTypeError, F._symbolic_dim_error()):
    return None
  return max(F.default_chunk_size(num, v) // _FORWARD_METHOD_DIVISOR[kind], 16)


def _num_tokens(hidden):
  return int(np.prod(jnp.shape(hidden)[:-1], dtype=np.int64))


def _token_weights(weights, batch, v2, n, acc):
  """Per-token weights [n_chunks, T] (0 on dropped and padding tokens), or None."""
  if weights is None:
    return None
  wt = _checks.floating(weights, "weights")
  if wt.shape != batch:
    raise ValueError(f"weights must have hidden's shape without D, i.e. {batch}, got "
                     f"weights.shape={wt.shape}.")
  wt = jnp.pad(wt.reshape(n).astype(acc), (0, v2.size - n)).reshape(v2.shape)
  return jnp.where(v2, wt, 0)


def _reduce_tokens(kind, h3, w, b, data, v2, wt, cfg, reduction, per_token, unflat,
                   with_aux=False):
  """The reduction of a one-head quantity: the forward method for "mean" and "sum" (with
  per-token weights ``wt``), else ``per_token()`` (flat [n_chunks * T], 0 on dropped tokens)
  times the weights. ``with_aux`` (a loss function): also the label log-probabilities it was
  given, without derivative (``per_token()`` then returns the pair)."""
  if reduction == "none":
    out, aux = per_token() if with_aux else (per_token(), None)
    out = unflat(out if wt is None else out * wt.reshape(-1))
  else:
    scale = v2.astype(cfg.acc) if wt is None else wt
    if reduction == "mean":
      total = jnp.sum(scale)
      scale = scale / jnp.where(total == 0, 1, total)
    out, aux = _one_head_sum(h3, w, b, data, scale, cfg, kind)
  if not with_aux:
    return out
  return out, unflat(jax.lax.stop_gradient(aux).reshape(-1))


def _prepare(hidden, weight, labels, bias, weight_layout, where, temperature, chunk_size,
             name, reduction="none", kind=None):
  _checks.reduction(reduction)
  hidden, weight, labels, bias, v = F.check_head(hidden, weight, labels, bias, weight_layout)
  temperature = _checks.static_number(temperature, "temperature")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}.")
  if reduction != "none" and chunk_size is None:
    chunk_size = _forward_method_chunk(hidden.shape, v, kind)
  h3, y2, v2, n, _ = F.chunk_tokens(hidden, labels, where, None, v, chunk_size, name)
  # Dropped tokens' hidden rows are replaced by 0: whatever they hold (NaN, inf) reaches
  # neither their (zeroed) outputs' tangents nor the weight's gradient.
  h3 = jnp.where(v2[..., None], h3, 0)
  acc = jnp.float64 if jnp.float64 in (hidden.dtype, weight.dtype) else jnp.float32
  cfg = _Config(weight_layout, F._VOCAB_SLICE, acc, float(temperature),
                F.accelerator_vocab_block(h3.shape[0] * h3.shape[1], v))
  unflat = lambda a: a.reshape(-1)[:n].reshape(hidden.shape[:-1])
  return h3, weight, bias, y2, v2, v, cfg, unflat


def _wide(*xs) -> bool:
  """Every array given (None skipped) has at least 32-bit floats."""
  return all(x is None or jnp.finfo(jnp.result_type(x)).bits >= 32 for x in xs)


def _label_log_probs(lp, y2, v2, v):
  """Flat [N]: the log-probabilities ``lp`` ([n_chunks, T]) on kept tokens, 0 on dropped
  ones, NaN for a kept label outside [0, V)."""
  _, bad = R.split_labels(y2, v2, v)
  return R.poison_rows(jnp.where(v2, lp, 0).reshape(-1), bad.reshape(-1))


def linear_log_probs(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    weights: ArrayLike | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
    return_entropy: bool = False,
    shift: int = 0,
) -> Array | tuple[Array, Array]:
  r"""Log-probability of each token's label under ``softmax((hidden @ weight + bias) / T)``.

  .. math:: \log p_y = z_y - \log \sum_v e^{z_v}, \qquad z = (h W + b) / T,

  computed one ``[chunk_size, V]`` block of logits at a time (the ``[N, V]`` logits are never
  held, nor their gradient): the log-likelihood of sampled tokens for policy-gradient losses
  (REINFORCE, PPO, GRPO). Differentiable with respect to ``hidden``, ``weight`` and ``bias``
  in every autodiff mode; the gradient of :math:`\log p_y` in the logits is
  :math:`(\mathrm{onehot}(y) - p) / T`.

  Args:
    hidden: ``[..., D]`` activations (bf16 and f16 are accumulated in float32).
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: integer ``[...]`` token ids (``hidden``'s shape without D).
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]``: tokens to keep; dropped tokens get 0 and no gradient.
    temperature: :math:`T > 0`, a Python number (static).
    weights: optional float ``[...]`` per-token weights :math:`w_i` (differentiable), e.g.
      advantages: ``"none"`` returns :math:`w_i \log p_{y_i}`, ``"sum"``
      :math:`\sum_i w_i \log p_{y_i}` and ``"mean"`` that sum over :math:`\sum_i w_i` (kept
      tokens; 0 if the sum is 0), as :func:`linear_cross_entropy`'s weights. For a mean over
      the tokens with signed weights (advantages), take ``"sum"`` and divide by the count.
    reduction: ``"none"`` (per token), ``"sum"`` or ``"mean"`` (over kept tokens). A sum or
      mean forms the gradients with the values, chunk by chunk (each block of logits is
      computed once, as in the unfused computation), in every autodiff mode; per-token
      values take any cotangent, so their derivative computes the blocks again.
    chunk_size: tokens per block on CPU; default: a ``[chunk, V]`` float32 block of ~64 MiB
      (``"sum"`` and ``"mean"``, but for 16-bit inputs at ``T != 1``, are minus
      :func:`linear_cross_entropy` of ``h / T``, ``b / T``, with its chunks). On GPU and TPU
      the blocks are vocabulary columns of all tokens instead (~128 MiB of float32 logits;
      ``chunk_size`` unused).
    return_entropy: also return the per-token entropy of the same softmax, as
      :func:`linear_entropy` (not weighted), from the same pass over the blocks: both
      differentiable, the derivative of the pair one pass again (a policy-gradient loss
      with an entropy bonus; verl's and Liger's fused linear log-probs with entropy). Two
      separate calls take two passes each way. Needs ``reduction="none"``.
    shift: ``k >= 0``: position ``t`` is scored on ``labels[..., t + k]`` (with that
      label's ``where`` and ``weights``), the last ``k`` positions dropped, without slicing
      ``hidden``; per-position outputs are ``[..., T-k]``, as
      :func:`linear_cross_entropy`'s ``shift`` (the log-likelihood of a sequence's own next
      tokens from ``labels = input_ids``, ``shift=1``).

  Returns:
    ``[...]`` log-probabilities (float32, float64 for float64 inputs), or their reduction:
    :math:`\le 0`, :math:`-\infty` where the label's logit is :math:`-\infty` (a masked
    class), NaN for a kept label outside ``[0, V)`` (also in the gradient of a sum or mean).
    With ``return_entropy``, ``(log_probs, entropy)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.zeros((2, 4))
  >>> jxent.linear_log_probs(h, w, jnp.array([0, 1, 3]))  # uniform: log(1/4)
  Array([-1.3862944, -1.3862944, -1.3862944], dtype=float32)
  """
  labels, where, weights, cut = F.shift_targets(shift, hidden, labels, where, weights,
                                                "linear_log_probs")
  if cut is not None:
    outs = linear_log_probs(hidden, weight, labels, bias=bias, weight_layout=weight_layout,
                            where=where, temperature=temperature, weights=weights,
                            reduction=reduction, chunk_size=chunk_size,
                            return_entropy=return_entropy)
    return F.cut_outputs(outs, cut, reduction == "none")
  if _checks.static_bool(return_entropy, "return_entropy") and reduction != "none":
    raise ValueError("return_entropy needs reduction='none' (the per-token log-probabilities "
                     f"and entropies of one pass), got reduction={reduction!r}; reduce them "
                     "outside.")
  if _on_mesh(hidden, labels, where, weights):
    tw = None if weights is None else _checks.floating(weights, "weights")
    local = lambda t, sh, r: linear_log_probs(
        t["h"], sh["w"], t["y"], bias=sh["b"], weight_layout=weight_layout, where=t["m"],
        temperature=temperature, weights=t["tw"], reduction=r, chunk_size=chunk_size,
        return_entropy=return_entropy)
    return _token_mesh("linear_log_probs", local, dict(h=hidden, y=labels, m=where, tw=tw),
                       dict(w=weight, b=bias), reduction=_checks.reduction(reduction),
                       kept=_kept(jnp.shape(hidden)[:-1], where), weights=tw)
  h3, w, b, y2, v2, v, cfg, unflat = _prepare(hidden, weight, labels, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_log_probs", reduction,
                                              "log_probs")
  if reduction != "none" and (cfg.temperature == 1.0 or _wide(hidden, bias)):
    # A sum or mean of log p_y is minus the fused cross-entropy of z = (h / T) W + b / T: its
    # token chunks (XLA:CPU, 0.93x the unfused time at 7% of its scratch at N=4096, D=512,
    # V=32768, where this module's statistics ran 1.03x at 4%), its vocabulary blocks on
    # GPU/TPU, and a confident label's log-probability to its relative accuracy. Scaling h
    # and b by 1/T is exact to their own rounding in 32 bits or more (not in 16).
    s = 1.0 / cfg.temperature
    scale = (lambda a: a) if s == 1.0 else (lambda a: None if a is None else a * s)
    return -F.linear_cross_entropy(
        scale(jnp.asarray(hidden)), weight, labels, bias=scale(bias),
        weight_layout=weight_layout, where=where, weights=weights, reduction=reduction,
        chunk_size=chunk_size)
  wt = _token_weights(weights, jnp.shape(hidden)[:-1], v2, _num_tokens(hidden), cfg.acc)
  if return_entropy:
    lse, ent, z_y = _head_stats(h3, w, b, y2, cfg)
    lp = _label_log_probs(z_y - lse, y2, v2, v)
    return (unflat(lp if wt is None else lp * wt.reshape(-1)),
            unflat(jnp.where(v2, ent, 0).reshape(-1)))

  def per_token():
    return _label_log_probs(_head_log_probs(h3, w, b, y2, cfg), y2, v2, v)

  return _reduce_tokens("log_probs", h3, w, b, (y2, v2), v2, wt, cfg, reduction, per_token,
                        unflat)


def linear_log_prob_loss(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    loss_fn,
    token_args: tuple = (),
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    weights: ArrayLike | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    return_log_probs: bool = False,
) -> Array | tuple[Array, Array]:
  r"""A loss of each token's label log-probability, :math:`\ell(\log p_{y_i}, a_i)`, fused.

  .. math:: L = \sum_i w_i\, \ell(\log p_{y_i}, a_{i,1}, \dots, a_{i,k}), \qquad
     \log p_y = \log \mathrm{softmax}((h W + b) / T)_y,

  one ``[chunk_size, V]`` block of logits at a time. ``loss_fn`` sees one token: a scalar
  log-probability and one scalar of each array in ``token_args`` (it is applied with
  ``jax.vmap`` over the tokens), e.g. a clipped policy-gradient objective of the probability
  ratio :math:`e^{\log p - \log p_\text{old}}` and an advantage
  (:func:`linear_policy_loss` is one). Its gradient in the logits is
  :math:`w_i\, \ell'(\log p_{y_i})\, (\mathrm{onehot}(y_i) - p_i) / T`: with ``"mean"`` or
  ``"sum"`` it is formed beside the value, chunk by chunk, so each block of logits is computed
  once (6 N·D·V flops, as the unfused computation; per-token log-probabilities of
  :func:`linear_log_probs` followed by the loss take any cotangent, and their derivative
  computes the blocks again: 8 N·D·V). Differentiable with respect to ``hidden``, ``weight``,
  ``bias``, ``weights`` and ``token_args`` in every autodiff mode, to any order ``loss_fn``
  allows.

  Args:
    hidden: ``[..., D]`` activations (bf16 and f16 are accumulated in float32).
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: integer ``[...]`` token ids (``hidden``'s shape without D).
    loss_fn: ``loss_fn(log_prob, *args) -> loss``, scalars in, one float scalar out; pure
      and written with ``jax.numpy``. Float values it closes over (a traced coefficient)
      are found with ``jax.closure_convert`` and handed to each token like ``token_args``
      (differentiable; each is copied per token, so close over small values only).
    token_args: a tuple of float arrays broadcastable to ``labels``' shape, each token's
      extra arguments of ``loss_fn`` (taken in the accumulation dtype: float32, float64 for
      float64 inputs).
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]``: tokens to keep; a dropped token adds nothing and gets
      no gradient (``loss_fn`` is evaluated there at log p = 0 and its value discarded).
    temperature: :math:`T > 0`, a Python number (static).
    weights: optional float ``[...]`` per-token weights :math:`w_i` (1 by default), as
      :func:`linear_log_probs`'s: ``"mean"`` divides by their sum over kept tokens.
    reduction: ``"mean"`` (over kept tokens; 0 if none), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block on CPU; default: a ``[chunk, V]`` float32 block of ~64 MiB.
      On GPU and TPU the blocks are vocabulary columns of all tokens instead (~128 MiB of
      float32 logits; ``chunk_size`` unused).
    return_log_probs: also return the ``[...]`` label log-probabilities ``loss_fn`` was
      given (0 on dropped tokens), from the same pass, without derivative (monitoring: a
      policy's ratio, clip fraction or KL estimate).

  Returns:
    The reduced loss, or ``[...]`` per-token losses (0 on dropped tokens) for ``"none"``,
    in float32 (float64 for float64 inputs); with ``return_log_probs``,
    ``(loss, log_probs)``. A kept label outside ``[0, V)`` gives the token a
    log-probability of NaN, which ``loss_fn`` passes on.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.zeros((2, 4)); y = jnp.array([0, 1, 3])
  >>> adv = jnp.array([1.0, -1.0, 2.0])
  >>> # -advantage * log p (REINFORCE), summed: (1 - 1 + 2) * log 4
  >>> float(jxent.linear_log_prob_loss(h, w, y, lambda lp, a: -a * lp, (adv,),
  ...                                  reduction="sum"))  # doctest: +ELLIPSIS
  2.77258...
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
  return_log_probs = _checks.static_bool(return_log_probs, "return_log_probs")
  if not isinstance(token_args, (tuple, list)):
    raise TypeError("token_args must be a tuple of arrays (each token's extra arguments of "
                    f"loss_fn), got {type(token_args).__name__}.")
  hidden = _checks.as_array(hidden, "hidden")
  weight = _checks.as_array(weight, "weight")
  acc = jnp.float64 if jnp.float64 in (hidden.dtype, weight.dtype) else jnp.float32
  batch = hidden.shape[:-1]
  args = []
  for i, a in enumerate(token_args):
    a = _checks.floating(a, f"token_args[{i}]")
    try:
      args.append(jnp.broadcast_to(a, batch).astype(acc))
    except ValueError:
      raise ValueError(f"token_args[{i}] must broadcast to labels' shape {batch}, got shape "
                       f"{a.shape}.") from None
  # Float values the function closes over become arguments of each token (broadcast), so
  # that they are inputs of the custom rule (a traced one would otherwise leak from it).
  fn, consts = jax.closure_convert(loss_fn, jnp.zeros((), acc),
                                   *(jnp.zeros((), acc) for _ in args))
  fn = fn if consts else loss_fn  # the caller's function: the same rule on every call
  args = tuple(args) + tuple(jnp.broadcast_to(c, batch + jnp.shape(c)) for c in consts)
  if _on_mesh(hidden, labels, where, weights, *args):
    tw = None if weights is None else _checks.floating(weights, "weights")
    local = lambda t, sh, r: _log_prob_loss(
        t["h"], sh["w"], t["y"], fn, t["args"], bias=sh["b"], weight_layout=weight_layout,
        where=t["m"], temperature=temperature, weights=t["tw"], reduction=r,
        chunk_size=chunk_size)
    out, lp = _token_mesh("linear_log_prob_loss", local,
                          dict(h=hidden, y=labels, m=where, tw=tw, args=args),
                          dict(w=weight, b=bias), reduction=_checks.reduction(reduction),
                          kept=_kept(batch, where), weights=tw, with_aux=True)
  else:
    out, lp = _log_prob_loss(hidden, weight, labels, fn, args, bias=bias,
                             weight_layout=weight_layout, where=where, temperature=temperature,
                             weights=weights, reduction=reduction, chunk_size=chunk_size)
  return (out, lp) if return_log_probs else out


def _log_prob_loss(hidden, weight, labels, fn, args, *, bias, weight_layout, where,
                   temperature, weights, reduction, chunk_size):
  """(loss, label log-probabilities) of :func:`linear_log_prob_loss` on one device, ``args``
  broadcast to the tokens' shape (``[...]`` and each argument's own trailing shape)."""
  h3, w, b, y2, v2, v, cfg, unflat = _prepare(hidden, weight, labels, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_log_prob_loss", reduction,
                                              "log_probs")
  batch, n = jnp.shape(hidden)[:-1], _num_tokens(hidden)
  pad = lambda a: jnp.pad(a.reshape((n,) + a.shape[len(batch):]),
                          [(0, v2.size - n)] + [(0, 0)] * (a.ndim - len(batch)))
  args = tuple(pad(a).reshape(v2.shape + a.shape[len(batch):]) for a in args)
  kind = _TokenFn(fn)
  wt = _token_weights(weights, batch, v2, n, cfg.acc)

  def per_token():
    lp = _label_log_probs(_head_log_probs(h3, w, b, y2, cfg), y2, v2, v)
    flat = tuple(a.reshape((v2.size,) + a.shape[2:]) for a in args)
    return kind.terms(lp, v2.reshape(-1), flat)[0], lp

  return _reduce_tokens(kind, h3, w, b, (y2, v2, args), v2, wt, cfg, reduction, per_token,
                        unflat, with_aux=True)


def groups_fit(hidden, weight, weight_layout, length, *tokens) -> bool:
  """Whether :func:`group_loss` takes the tokens: one device's (none of ``hidden`` and
  ``tokens`` over an explicit mesh) and a concrete number of them."""
  shape, wshape = jnp.shape(hidden), jnp.shape(weight)
  if len(wshape) != 2 or weight_layout not in ("dv", "vd") or _on_mesh(hidden, *tokens):
    return False
  v = wshape[1 if weight_layout == "dv" else 0]
  return _forward_method_chunk(shape, v, "log_probs") is not None


def group_loss(hidden, weight, labels, fn, length, args, *, bias, weight_layout, where,
               temperature, chunk_size):
  """(the sum over groups of ``fn``'s losses, the tokens' label log-probabilities without
  derivative): a loss of whole groups of ``length`` consecutive tokens of ``hidden``'s
  flattened tokens (``_GroupFn``). A block of logits takes ``chunk_size`` tokens at most (or
  the default): a token chunk holds as many whole groups as fit, each block of logits
  computed once; a group longer than that is a chunk of its own, in blocks, each computed
  twice (``_split_group_chunk``). ``args`` are float arrays of the tokens' shape."""
  hidden = _checks.as_array(hidden, "hidden")
  n = _num_tokens(hidden)
  if n % length:
    raise ValueError(f"{n} tokens are not whole groups of {length}.")
  if chunk_size is None:
    v = jnp.shape(weight)[1 if weight_layout == "dv" else 0]
    chunk_size = _forward_method_chunk(hidden.shape, v, "log_probs")
  elif int(chunk_size) <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size!r}.")
  block = min(int(chunk_size), n)
  pieces = 1 if length <= block else -(-length // block)
  chunk = (block // length) * length if pieces == 1 else length
  h3, w, b, y2, v2, v, cfg, unflat = _prepare(hidden, weight, labels, bias, weight_layout,
                                              where, temperature, chunk, "group_loss",
                                              "sum", "log_probs")
  args = tuple(jnp.pad(a.reshape(n), (0, v2.size - n)).reshape(v2.shape) for a in args)
  out, lp = _one_head_sum(h3, w, b, (y2, v2, args), v2.astype(cfg.acc), cfg,
                          _GroupFn(fn, length, pieces))
  return out, unflat(jax.lax.stop_gradient(lp).reshape(-1))


def _on_mesh(*arrays) -> bool:
  """Whether any of the token arrays is laid out over an explicit mesh axis."""
  return any(isinstance(a, jax.Array) and explicitly_sharded(a)
             for a in jax.tree.leaves(arrays))


def _token_mesh(name, local, tokens, shared, *, reduction, kept, weights=None,
                with_aux=False):
  """``local(tokens, shared, reduction)`` of tokens laid out over explicit mesh axes: inside
  ``shard_map`` over those axes each device takes its own tokens (a sum formed with its
  gradients, as on one device) and only scalars cross devices: the sums, and for "mean" the
  kept tokens' count (or their ``weights``' sum). ``tokens`` and ``shared`` are dicts of
  arrays, tuples of them, or None; the tokens' axes lead every token array; shared arrays
  (weights, biases) must be replicated. ``with_aux``: ``local`` returns (output, per-token
  arrays), the second laid out as the tokens."""
  P = jax.sharding.PartitionSpec
  batch_ndim = kept.ndim
  first = next(a for a in tokens.values() if a is not None and explicitly_sharded(a))
  sharding = jax.typeof(first).sharding
  spec = tuple(sharding.spec)[:batch_ndim]
  batch = spec + (None,) * (batch_ndim - len(spec))
  for key, a in ((k, x) for k, v in tokens.items() for x in jax.tree.leaves(v)):
    if explicitly_sharded(a) and any(
        p is not None for p in tuple(jax.typeof(a).sharding.spec)[batch_ndim:]):
      raise ValueError(f"{name}: {key} may be laid out over the mesh along its token axes "
                       f"only, got spec {jax.typeof(a).sharding.spec}.")
  for key, a in shared.items():
    if a is not None and explicitly_sharded(a):
      raise ValueError(f"{name} needs {key} replicated over the mesh, got spec "
                       f"{jax.typeof(a).sharding.spec}; lay out the tokens over it instead "
                       "(jxent.sharded has the vocab-parallel functions).")
  axes = tuple(a for p in batch if p is not None for a in (p if isinstance(p, tuple) else (p,)))
  tok = P(*batch)
  on = lambda a: jax.tree.map(lambda x: jax.sharding.reshard(x, tok), a)

  def body(tokens, shared, kept, weights):
    out = local(tokens, shared, "sum" if reduction == "mean" else reduction)
    out, aux = out if with_aux else (out, None)
    if reduction != "none":
      total = jax.lax.psum(out, axes)
      if reduction == "mean":
        w = kept if weights is None else jnp.where(kept, weights, 0)
        total = _checks.mean_of(total, jax.lax.psum(jnp.sum(w.astype(total.dtype)), axes))
      out = total
    return (out, aux) if with_aux else out

  spec_of = lambda d, s: {k: None if a is None else s for k, a in d.items()}
  out_spec = tok if reduction == "none" else P()
  run = jax.shard_map(body, mesh=sharding.mesh,
                      in_specs=(spec_of(tokens, tok), spec_of(shared, P()), tok,
                                None if weights is None else tok),
                      out_specs=(out_spec, tok) if with_aux else out_spec)
  return run(on(tokens), shared, on(kept), on(weights))


def _kept(batch, where, labels=None, ignore_index=None):
  """The kept tokens ([...] bool) of ``where`` and ``ignore_index``, for a mean's count."""
  keep = jnp.ones(batch, bool) if where is None else _checks.as_array(where, "where")
  if keep.shape != tuple(batch) or keep.dtype != jnp.bool_:
    raise ValueError(f"where must be a boolean array of the tokens' shape {tuple(batch)}, "
                     f"got {keep.dtype}{list(keep.shape)}.")
  if labels is not None and ignore_index is not None:
    keep = keep & (labels != ignore_index)
  return keep


def linear_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    weights: ArrayLike | None = None,
    reduction: str = "none",
    chunk_size: int | None = None,
) -> Array:
  r"""Entropy of ``softmax((hidden @ weight + bias) / T)`` per token, in nats.

  .. math:: H = -\sum_v p_v \log p_v = \log \sum_v e^{z_v} - \mathbb{E}_p[z],
     \qquad z = (h W + b) / T,

  one ``[chunk_size, V]`` block of logits at a time: the policy's entropy (an entropy bonus
  or regulariser) without the ``[N, V]`` logits. Differentiable with respect to ``hidden``,
  ``weight`` and ``bias`` in every autodiff mode; in the logits,
  :math:`\partial H / \partial z_v = -p_v (\log p_v + H) / T`.

  Args:
    hidden: ``[..., D]`` activations.
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]``: tokens to keep; dropped tokens get 0 and no gradient.
    temperature: :math:`T > 0`, a Python number (static).
    weights: optional float ``[...]`` per-token weights, as :func:`linear_log_probs`.
    reduction: ``"none"`` (per token), ``"sum"`` or ``"mean"`` (over kept tokens; the
      gradients formed with the values, as :func:`linear_log_probs`): an entropy bonus is
      ``linear_entropy(h, W, reduction="mean")``.
    chunk_size: tokens per block on CPU; default: a ``[chunk, V]`` float32 block of ~64 MiB.
      On GPU and TPU the blocks are vocabulary columns of all tokens instead (~128 MiB of
      float32 logits; ``chunk_size`` unused).

  Returns:
    ``[...]`` entropies in :math:`[0, \log V]`, or their reduction (classes with logit
    :math:`-\infty` count as probability 0, :math:`0 \log 0 = 0`). Relative accuracy holds
    for nearly one-hot distributions (the entropy is not a difference of two large numbers).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((2, 2)); w = jnp.zeros((2, 4))
  >>> jxent.linear_entropy(h, w)  # uniform over 4: log 4
  Array([1.3862944, 1.3862944], dtype=float32)
  """
  if _on_mesh(hidden, where, weights):
    tw = None if weights is None else _checks.floating(weights, "weights")
    local = lambda t, sh, r: linear_entropy(
        t["h"], sh["w"], bias=sh["b"], weight_layout=weight_layout, where=t["m"],
        temperature=temperature, weights=t["tw"], reduction=r, chunk_size=chunk_size)
    return _token_mesh("linear_entropy", local, dict(h=hidden, m=where, tw=tw),
                       dict(w=weight, b=bias), reduction=_checks.reduction(reduction),
                       kept=_kept(jnp.shape(hidden)[:-1], where), weights=tw)
  h3, w, b, y2, v2, _, cfg, unflat = _prepare(hidden, weight, None, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_entropy", reduction,
                                              "entropy")
  wt = _token_weights(weights, jnp.shape(hidden)[:-1], v2, _num_tokens(hidden), cfg.acc)

  def per_token():
    return jnp.where(v2, _head_entropy(h3, w, b, y2, cfg), 0).reshape(-1)

  return _reduce_tokens("entropy", h3, w, b, (y2, v2), v2, wt, cfg, reduction, per_token,
                        unflat)


def linear_token_stats(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TokenStats:
  r"""Logsumexp, entropy, argmax and (with labels) label log-probability per token, in one
  pass over ``[chunk_size, V]`` blocks of ``(hidden @ weight + bias) / T``: monitoring
  without the ``[N, V]`` logits (accuracy is ``stats.argmax == labels``).

  Not differentiable: the inputs are taken under ``jax.lax.stop_gradient`` (use
  :func:`linear_log_probs`, :func:`linear_entropy` or :func:`linear_cross_entropy` for
  gradients). Dropped tokens (``where`` False) get 0 everywhere (argmax 0).

  Args:
    hidden: ``[..., D]`` activations.
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: optional integer ``[...]`` token ids.
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block on CPU; default: a ``[chunk, V]`` float32 block of ~64 MiB.
      On GPU and TPU the blocks are vocabulary columns of all tokens instead (~128 MiB of
      float32 logits; ``chunk_size`` unused).

  Returns:
    A :class:`TokenStats` of ``[...]`` arrays.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.array([[1.0, 0.0], [0.0, 1.0]]); w = jnp.array([[2.0, 0.0], [0.0, 3.0]])
  >>> s = jxent.linear_token_stats(h, w, jnp.array([0, 0]))
  >>> s.argmax
  Array([0, 1], dtype=int32)
  """
  if _on_mesh(hidden, labels, where):
    local = lambda t, sh, r: linear_token_stats(
        t["h"], sh["w"], t["y"], bias=sh["b"], weight_layout=weight_layout, where=t["m"],
        temperature=temperature, chunk_size=chunk_size)
    return _token_mesh("linear_token_stats", local, dict(h=hidden, y=labels, m=where),
                       dict(w=weight, b=bias), reduction="none",
                       kept=_kept(jnp.shape(hidden)[:-1], where))
  h3, w, b, y2, v2, v, cfg, unflat = _prepare(hidden, weight, labels, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_token_stats")
  h3, w, b = jax.lax.stop_gradient((h3, w, b))
  lse, ent, z_y, am = _forward(h3, w, b, y2, cfg, with_argmax=True)
  keep = lambda a: unflat(jnp.where(v2, a, 0))
  logp = None
  if labels is not None:
    logp = unflat(_label_log_probs(z_y - lse, y2, v2, v))
  return TokenStats(keep(lse), keep(ent), keep(am), logp)


# ------------------------------------------------------------------ distillation (two heads)
#
# Per token, with the teacher's distribution p = softmax(z_t / T) and the student's
# q = softmax(z_s / T) over one vocabulary, one [chunk, V] block of each head's logits at a
# time. The derivative rule keeps the two logsumexps and the divergence(s) per token; its
# tangent recomputes both heads' blocks, one vocabulary slice of both weights at a time.
# For tangents dz_s, dz_t of the (tempered) logits:
#
#   forward KL(p||q):  d = sum (q - p) dz_s + sum p (log p - log q - KL) dz_t
#   reverse KL(q||p):  d = sum q (log q - log p - KL) dz_s + sum (p - q) dz_t
#   JS_beta:           d = (1 - beta) [sum q (log q - log m) dz_s - KL(q||m) sum q dz_s]
#                        + beta [sum p (log p - log m) dz_t - KL(p||m) sum p dz_t],
#   m = beta p + (1 - beta) q.


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["layout", "vocab_slice", "acc", "temperature", "kind", "beta",
                                "accel_block"])
class _PairConfig:
  def __init__(self, layout, vocab_slice, acc, temperature, kind, beta, accel_block=0):
    self.layout, self.vocab_slice, self.acc = layout, vocab_slice, acc
    self.temperature, self.kind, self.beta = temperature, kind, beta
    self.accel_block = accel_block


def _xlogx_diff(p, lp, lq):
  """p (lp - lq), 0 where p == 0 (whatever lq is)."""
  return jnp.where(p > 0, p * (lp - jnp.where(p > 0, lq, 0)), 0)


def _block_log_softmax(z):
  """log softmax of a [T, V] block; an all -inf row gives NaN (no distribution)."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0)
  return z - m - jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True))


# The number of per-token parts of each divergence (their sums over all classes).
_PARTS = {"forward": 1, "reverse": 1, "js": 2, "tv": 3}


def _pair_terms(lp, lq, cfg, beta):
  """The per-class terms of the divergence's parts from a block of the teacher's (lp) and
  the student's (lq) log-probabilities: (p log p/q,) for the forward KL, (q log q/p,) for
  the reverse, (p log p/m, q log q/m) for JS (``beta`` a number or [T, 1]), and for the
  total variation (|p - q| / 2, p s, q s) with s = sign(p - q) (the last two for the
  gradients)."""
  p, q = jnp.exp(lp), jnp.exp(lq)
  if cfg.kind == "forward":
    return (_xlogx_diff(p, lp, lq),)
  if cfg.kind == "reverse":
    return (_xlogx_diff(q, lq, lp),)
  if cfg.kind == "tv":
    s = jnp.sign(p - q)
    return 0.5 * s * (p - q), p * s, q * s
  return plog_p_over_m(lp, lq, beta), plog_p_over_m(lq, lp, 1 - beta)


def _pair_combine(parts, cfg, beta):
  """The divergence per token from its parts' sums over all classes."""
  return parts[0] if cfg.kind != "js" else beta * parts[0] + (1 - beta) * parts[1]


def _pair_terms_grads(lp, lq, terms, parts, cfg, beta, want_s, want_t):
  """(G_s, G_t): the gradients of the per-token divergence in the student's and the
  teacher's (tempered) logits over one block (None where not wanted), from the block's
  log-probabilities and terms and the parts' sums over all classes ([T]; needed only by
  the gradients that scale a distribution by its own divergence)."""
  p, q = jnp.exp(lp), jnp.exp(lq)
  col = lambda i: parts[i][:, None]
  gs = gt = None
  if cfg.kind == "forward":
    gs = q - p if want_s else None
    gt = terms[0] - p * col(0) if want_t else None
  elif cfg.kind == "reverse":
    gs = terms[0] - q * col(0) if want_s else None
    gt = p - q if want_t else None
  elif cfg.kind == "tv":  # d/dz of |p - q| / 2 through each softmax: r (s - E_r[s]) / 2
    gs = -0.5 * (terms[2] - q * col(2)) if want_s else None
    gt = 0.5 * (terms[1] - p * col(1)) if want_t else None
  else:
    gs = (1 - beta) * (terms[1] - q * col(1)) if want_s else None
    gt = beta * (terms[0] - p * col(0)) if want_t else None
  return gs, gt


def _pair_needs_parts(cfg, want):
  """Whether the wanted gradients need the divergence's parts before their block."""
  want_s, want_t = want
  return (cfg.kind in ("js", "tv") or (cfg.kind == "forward" and want_t)
          or (cfg.kind == "reverse" and want_s))


def _pair_res(lse_s, lse_t, parts, cfg, beta):
  """The per-token tangent's residuals: both logsumexps, the KL or JS's parts and beta, or
  the total variation's two expectations of the sign."""
  if cfg.kind == "tv":
    return lse_s, lse_t, parts[1:]
  return lse_s, lse_t, (parts[0] if cfg.kind != "js" else (*parts, beta))


def _pair_chunk(zs, zt, cfg, beta=None):
  """(divergence, residuals) per token of one full [T, V] block of each head; for the JS
  divergence ``beta`` may be given per token ([T], instead of ``cfg.beta``)."""
  lq = _block_log_softmax(zs)
  lp = _block_log_softmax(zt)
  lse_s = zs[:, 0] - lq[:, 0]
  lse_t = zt[:, 0] - lp[:, 0]
  b = None
  if cfg.kind == "js":
    b = jnp.full(lse_s.shape, cfg.beta, cfg.acc) if beta is None else beta
  terms = _pair_terms(lp, lq, cfg, None if b is None else b[:, None])
  parts = tuple(jnp.sum(x, axis=-1) for x in terms)
  return _pair_combine(parts, cfg, b), _pair_res(lse_s, lse_t, parts, cfg, b)


def _pair_forward(h3, w, b, cfg, beta3=None):
  """(divergence, residuals), each [n_chunks, T]: token chunks (reference, XLA:CPU) or
  vocabulary blocks over all tokens (GPU, TPU)."""
  return dispatch(h3, w, b, cfg, beta3, reference=_pair_chunks_forward,
                  accelerator=_pair_vocab_forward)


def _pair_chunks_forward(h3, w, b, cfg, beta3=None):
  (hs3, ht3), (ws, wt), (bs, bt) = h3, w, b

  def body(_, xs):
    hs, ht, beta = xs
    zs = _block_logits(hs, ws, bs, cfg)
    zt = _block_logits(ht, wt, bt, cfg)
    return None, _pair_chunk(zs, zt, cfg, beta)

  return jax.lax.scan(body, None, (hs3, ht3, beta3))[1]


@jax.custom_jvp
def _pair_divergence(h3, w, b, cfg, beta3=None):
  """Per-token divergence [n_chunks, T]; ``beta3`` ([n_chunks, T]) gives the JS divergence a
  weight per token (differentiable: d JS_beta / d beta = KL(p||m) - KL(q||m))."""
  return _pair_forward(h3, w, b, cfg, beta3)[0]


def _pair_block_tangent(h, y, valid, res, dh, w, b, dw, db, cfg, start, v):
  del y, valid, start, v
  (hs, ht), (ws, wt), (bs, bt) = h, w, b
  (dhs, dht), (dws, dwt), (dbs, dbt) = dh, dw, db
  lse_s, lse_t, val = res
  zs = _block_logits(hs, ws, bs, cfg)
  zt = _block_logits(ht, wt, bt, cfg)
  lq = zs - jnp.where(jnp.isfinite(lse_s), lse_s, 0)[:, None]
  lp = zt - jnp.where(jnp.isfinite(lse_t), lse_t, 0)[:, None]
  p, q = jnp.exp(lp), jnp.exp(lq)

  dzs = _tangent_logits(hs, ws, dhs, dws, dbs, cfg)
  dzt = _tangent_logits(ht, wt, dht, dwt, dbt, cfg)
  out = jnp.zeros(lse_s.shape, cfg.acc)
  if cfg.kind == "forward":
    if dzs is not None:
      out = out + jnp.sum((q - p) * dzs, axis=-1)
    if dzt is not None:
      out = out + jnp.sum(_xlogx_diff(p, lp, lq) * dzt - p * val[:, None] * dzt, axis=-1)
  elif cfg.kind == "reverse":
    if dzs is not None:
      out = out + jnp.sum(_xlogx_diff(q, lq, lp) * dzs - q * val[:, None] * dzs, axis=-1)
    if dzt is not None:
      out = out + jnp.sum((p - q) * dzt, axis=-1)
  elif cfg.kind == "tv":
    s = jnp.sign(p - q)
    e_p, e_q = (e[:, None] for e in val)
    if dzs is not None:
      out = out - 0.5 * jnp.sum(q * (s - e_q) * dzs, axis=-1)
    if dzt is not None:
      out = out + 0.5 * jnp.sum(p * (s - e_p) * dzt, axis=-1)
  else:
    kl_pm, kl_qm, beta = val
    kl_pm, kl_qm, beta = kl_pm[:, None], kl_qm[:, None], beta[:, None]
    if dzs is not None:
      out = out + (1 - beta[:, 0]) * jnp.sum(
          (plog_p_over_m(lq, lp, 1 - beta) - q * kl_qm) * dzs, axis=-1)
    if dzt is not None:
      out = out + beta[:, 0] * jnp.sum(
          (plog_p_over_m(lp, lq, beta) - p * kl_pm) * dzt, axis=-1)
  return (out,)


def _pair_divergence_jvp(primals, tangents):
  h3, w, b, cfg, beta3 = primals
  dh3, dw, db, _, dbeta3 = tangents
  val, res = _pair_forward(h3, w, b, cfg, beta3)
  d_beta = None
  if beta3 is not None and F._nonzero(dbeta3):
    kl_pm, kl_qm, _ = res[2]
    d_beta = (kl_pm - kl_qm) * dbeta3
  nz = lambda t, x=True: t if (x and F._nonzero(t)) else None
  dh3 = tuple(nz(t) for t in dh3)
  dw = tuple(nz(t) for t in dw)
  db = tuple(nz(t, x is not None) for t, x in zip(db, b))
  if all(t is None for t in dh3 + dw + db):
    return val, jnp.zeros_like(val) if d_beta is None else d_beta
  nc, t = val.shape
  dummy = jnp.zeros((nc, t), jnp.int32)
  (out,) = _tangent(h3, dummy, dummy == 0, res, dh3, w, b, dw, db, cfg, _pair_block_tangent)
  return val, out if d_beta is None else out + d_beta


_pair_divergence.defjvp(_pair_divergence_jvp, symbolic_zeros=True)


# ------------------------------------------------- a scalar divergence: the forward method
#
# With a "mean" or "sum" reduction the cotangent is known up to one number, so the tangent
# rule computes the gradients in both heads' logits alongside the divergence, chunk by chunk,
# and turns them into dh, dW, db at once (fused linear cross-entropy's "forward" method): the
# logits are computed once, not again in the tangent. The tangent is the gradients' inner
# product with the input tangents (linear; reverse mode scales the saved gradients). Only the
# heads whose inputs have a tangent get gradients (the teacher's, only with teacher_grad).


def _pair_logit_grads(zs, zt, cfg, want_s, want_t):
  """(divergence [T], G_s, G_t, lq): the per-token divergence of one block of each head, its
  gradients in the (tempered) logits (None where not wanted) and the student's
  log-probabilities."""
  lq = _block_log_softmax(zs)
  lp = _block_log_softmax(zt)
  terms = _pair_terms(lp, lq, cfg, cfg.beta)
  parts = tuple(jnp.sum(x, axis=-1) for x in terms)
  return (_pair_combine(parts, cfg, cfg.beta),
          *_pair_terms_grads(lp, lq, terms, parts, cfg, cfg.beta, want_s, want_t), lq)


def _hard_terms(lq1, y, start, v, want):
  """The hard (label) term of one block of the student's log-probabilities at temperature 1:
  (its share of -log q_y per token [T], its gradient q - onehot(y) in the untempered logits
  or None). ``start``: the block's first class; a kept label outside ``[0, v)`` makes its row
  NaN."""
  cols = jnp.arange(lq1.shape[-1]) + start
  onehot = cols[None, :] == jnp.clip(y, 0, v - 1)[:, None]
  nll = -jnp.sum(jnp.where(onehot, lq1, 0), axis=-1)
  g = jnp.exp(lq1) - onehot if want else None
  return nll, g


def _student_log_probs_at_one(zs, lq, cfg):
  """The student's block log-probabilities at temperature 1 from its tempered logits ``zs``
  (their own log-probabilities ``lq`` when T = 1)."""
  return lq if cfg.temperature == 1.0 else _block_log_softmax(zs * cfg.temperature)


def _pair_grads(h3, w, b, scale, cfg, want, hard=None):
  """Per-token divergences [n_chunks, T], the hard term's per-token -log q_y at temperature 1
  (None without ``hard``) and, for each wanted head, the gradients (dh [n_chunks, T, D], dW,
  db) of ``sum_i scale_i divergence_i (+ sum_i hscale_i (-log q_{y_i}))``: token chunks
  (reference, XLA:CPU) or vocabulary blocks over all tokens (GPU, TPU). ``hard``: None or
  ``(labels, hscale, bad)``, each [n_chunks, T]."""
  return dispatch(h3, w, b, scale, cfg, hard,
                  reference=functools.partial(_pair_chunk_grads, want=want),
                  accelerator=functools.partial(_pair_vocab_grads, want=want))


def _pair_chunk_grads(h3, w, b, scale, cfg, hard, want):
  (hs3, ht3), ws_wt, bs_bt = h3, w, b
  refs = (hs3, ht3, *ws_wt, scale)
  carry0 = tuple(
      (F._varying_like(jnp.zeros(w_i.shape, cfg.acc), *refs),
       None if b_i is None else F._varying_like(jnp.zeros(b_i.shape, cfg.acc), *refs))
      if want_i else None for want_i, w_i, b_i in zip(want, ws_wt, bs_bt))
  plain = _plain(cfg)
  v = ws_wt[0].shape[1] if cfg.layout == "dv" else ws_wt[0].shape[0]
  zeros = jnp.zeros(scale.shape, scale.dtype)
  y3, hsc3, bad3 = hard if hard is not None else (zeros.astype(jnp.int32), zeros, zeros > 0)

  def body(carry, xs):
    hs, ht, sc, y, hsc, bad = xs
    hh = (hs, ht)
    zs = _block_logits(hs, ws_wt[0], bs_bt[0], cfg)
    zt = _block_logits(ht, ws_wt[1], bs_bt[1], cfg)
    val, gs, gt, lq = _pair_logit_grads(zs, zt, cfg, *want)
    hval = g_hard = None
    if hard is not None:
      hval, g_hard = _hard_terms(_student_log_probs_at_one(zs, lq, cfg), y, 0, v, want[0])
      hval = R.poison_rows(hval, bad)
    new, dhs = [], []
    for i, g in enumerate((gs, gt)):
      if g is None:
        new.append(None)
        dhs.append(None)
        continue
      g = g * (sc / cfg.temperature)[:, None]  # z = (h W + b) / T
      if i == 0 and g_hard is not None:  # the hard term: in the untempered logits
        g = g + R.poison_rows(g_hard * hsc[:, None], bad)
      dw, db = carry[i]
      dhs.append(F._dh(g, ws_wt[i], plain).astype(hh[i].dtype))
      dw = F._accumulate_dw(dw, hh[i], g, plain)
      new.append((dw, None if db is None else db + jnp.sum(g, axis=0)))
    return tuple(new), (val, hval, tuple(dhs))

  carry, (val, hval, dhs) = jax.lax.scan(body, carry0, (hs3, ht3, scale, y3, hsc3, bad3))
  grads = tuple(
      None if c is None else (dh, c[0].astype(w_i.dtype),
                              None if c[1] is None else c[1].astype(b_i.dtype))
      for c, dh, w_i, b_i in zip(carry, dhs, ws_wt, bs_bt))
  return val, hval, grads


@jax.custom_jvp
def _pair_sum(h3, w, b, scale, cfg, hard=None):
  """``sum(scale * divergence)`` of the two heads, [n_chunks, T] scale (0 on dropped
  tokens), plus ``sum(hscale * -log q_y)`` (the student's label term at temperature 1) with
  ``hard = (labels, hscale, bad)``: the forward method's custom rule."""
  if hard is None:
    return jnp.sum(_pair_forward(h3, w, b, cfg)[0] * scale)
  val, hval, _ = _pair_grads(h3, w, b, scale, cfg, (False, False), hard)
  return jnp.sum(val * scale) + jnp.sum(R.masked_mul(hard[1], hval))


def _pair_sum_jvp(primals, tangents):
  h3, w, b, scale, cfg, hard = primals
  dh3, dw, db = tangents[:3]  # the scales come from the masks, the labels are integers
  nz = F._nonzero
  want = tuple(nz(dh3[i]) or nz(dw[i]) or (b[i] is not None and nz(db[i])) for i in (0, 1))
  val, hval, grads = _pair_grads(h3, w, b, scale, cfg, want, hard)
  out = jnp.sum(val * scale)
  if hard is not None:
    out = out + jnp.sum(R.masked_mul(hard[1], hval))
  tangent = jnp.zeros((), out.dtype)
  for i in (0, 1):
    if grads[i] is None:
      continue
    gh, gw, gb = grads[i]
    if nz(dh3[i]):
      tangent = tangent + F._dot(gh, dh3[i])
    if nz(dw[i]):
      tangent = tangent + F._dot(gw, dw[i])
    if b[i] is not None and nz(db[i]):
      tangent = tangent + F._dot(gb, db[i])
  return out, tangent.astype(out.dtype)


_pair_sum.defjvp(_pair_sum_jvp, symbolic_zeros=True)


# ------------------------------------ GPU and TPU: a pair's divergence over vocabulary blocks
#
# As the head statistics above: each step takes one block of vocabulary columns of both heads
# for all N tokens. The divergence's terms need both log-normalisers, so the first pass
# gathers the two logsumexps online, a second sums the terms; the forward method's
# gradients go with that second pass where they need no sum over all classes (the forward
# KL's student, the reverse KL's teacher), else with a third. Each pass computes both heads'
# logits again (the unfused computation holds them).


def _online_lse(m, s, z):
  """The running (max, sum of exp(z - max)) per row moved on by one [N, block] block."""
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  mf = S.finite(m_new)
  return m_new, s * jnp.exp(m - mf) + jnp.sum(jnp.exp(z - mf[:, None]), axis=-1)


def _pair_vocab_lse(h, w, b, cfg, at_one=False):
  """Both heads' logsumexps ([N] each) over vocabulary blocks; a head's row of -inf gives
  -inf (its log-probabilities are then NaN: no distribution, as the reference's).
  ``at_one``: also the student's at temperature 1 (its hard term), a third [N]."""
  v = w[0].shape[1] if cfg.layout == "dv" else w[0].shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  refs = (*h, *w)
  full = lambda x: F._varying_like(jnp.full(h[0].shape[:1], x, cfg.acc), *refs)
  init = (full(-jnp.inf), full(0)) * (3 if at_one else 2)

  def block(carry, start, size):
    out = ()
    for i in (0, 1):
      z = _block_logits(h[i], F._cut(w[i], start, size, axis), F._cut(b[i], start, size, 0),
                        cfg)
      out += _online_lse(*carry[2 * i:2 * i + 2], z)
      if i == 0 and at_one:
        one = _online_lse(*carry[4:6], z * cfg.temperature)
    return out + (one if at_one else ())

  out = F._vocab_loop(block, init, v, min(cfg.accel_block, v))
  return tuple(S.finite(out[k]) + jnp.log(out[k + 1]) for k in range(0, len(out), 2))


def _pair_vocab_logprobs(h, w, b, lse, start, size, cfg):
  """(lp, lq): one block of the teacher's and the student's log-probabilities."""
  axis = 1 if cfg.layout == "dv" else 0
  zs, zt = (_block_logits(h[i], F._cut(w[i], start, size, axis), F._cut(b[i], start, size, 0),
                          cfg) for i in (0, 1))
  return zt - lse[1][:, None], zs - lse[0][:, None]


def _pair_vocab_parts(h, w, b, lse, cfg, beta):
  """The divergence's parts per token ([N] each), summed over vocabulary blocks."""
  v = w[0].shape[1] if cfg.layout == "dv" else w[0].shape[0]
  init = tuple(F._varying_like(jnp.zeros(h[0].shape[:1], cfg.acc), *h, *w)
               for _ in range(_PARTS[cfg.kind]))

  def block(carry, start, size):
    lp, lq = _pair_vocab_logprobs(h, w, b, lse, start, size, cfg)
    return tuple(c + jnp.sum(x, axis=-1) for c, x in zip(carry, _pair_terms(lp, lq, cfg, beta)))

  return F._vocab_loop(block, init, v, min(cfg.accel_block, v))


def _pair_vocab_forward(h3, w, b, cfg, beta3=None):
  """``_pair_chunks_forward`` on GPU/TPU: (divergence, residuals), [n_chunks, T]."""
  nc, t = h3[0].shape[:2]
  h = tuple(x.reshape(nc * t, -1) for x in h3)
  lse = _pair_vocab_lse(h, w, b, cfg)[:2]
  beta = None
  if cfg.kind == "js":
    beta = (jnp.full((nc * t,), cfg.beta, cfg.acc) if beta3 is None
            else beta3.reshape(nc * t).astype(cfg.acc))
  parts = _pair_vocab_parts(h, w, b, lse, cfg, None if beta is None else beta[:, None])
  out = _pair_combine(parts, cfg, beta), _pair_res(*lse, parts, cfg, beta)
  return jax.tree.map(lambda a: a.reshape(nc, t), out)


def _pair_vocab_grads(h3, w, b, scale, cfg, hard, want):
  """``_pair_chunk_grads`` on GPU/TPU: the logsumexps, the parts when the gradients need
  them, then each block again for its gradients (its dW columns written once). The hard
  term's value comes from the student's logsumexp at temperature 1 and its label's logit
  (one weight column per token), its gradient with the student's blocks."""
  nc, t = h3[0].shape[:2]
  h = tuple(x.reshape(nc * t, -1) for x in h3)
  v = w[0].shape[1] if cfg.layout == "dv" else w[0].shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  at_one = hard is not None and cfg.temperature != 1.0
  lse_all = _pair_vocab_lse(h, w, b, cfg, at_one)
  lse = lse_all[:2]
  hval = None
  if hard is not None:
    y, hsc, bad = (a.reshape(-1) for a in hard)
    lse1 = lse_all[2] if at_one else lse[0]
    z_y = F._label_logits(h[0], w[0], b[0], jnp.clip(y, 0, v - 1), _plain(cfg))
    hval = R.poison_rows(lse1 - z_y, bad)
  known = None
  if _pair_needs_parts(cfg, want) or not any(want):
    known = _pair_vocab_parts(h, w, b, lse, cfg, cfg.beta)
  if not any(want):
    return (_pair_combine(known, cfg, cfg.beta).reshape(nc, t),
            None if hval is None else hval.reshape(nc, t), (None, None))
  plain = _plain(cfg)
  coef = scale.reshape(-1) / cfg.temperature  # z = (h W + b) / T
  lows = [_low_dtype(h_i, w_i, cfg.acc) for h_i, w_i in zip(h, w)]
  hls = [h_i.astype(low) for h_i, low in zip(h, lows)]
  refs = (*h, *w, coef)
  heads = tuple(_grads_init(h_i, w_i, b_i, cfg.acc, *refs) if want_i else None
                for want_i, h_i, w_i, b_i in zip(want, h, w, b))
  sums = () if known is not None else tuple(
      F._varying_like(jnp.zeros(coef.shape, cfg.acc), *refs) for _ in range(_PARTS[cfg.kind]))

  def block(carry, start, size):
    heads, sums = carry
    lp, lq = _pair_vocab_logprobs(h, w, b, lse, start, size, cfg)
    terms = _pair_terms(lp, lq, cfg, cfg.beta)
    if known is None:
      sums = tuple(c + jnp.sum(x, axis=-1) for c, x in zip(sums, terms))
    gs = _pair_terms_grads(lp, lq, terms, known, cfg, cfg.beta, *want)
    new = []
    for i, g in enumerate(gs):
      if g is None:
        new.append(None)
        continue
      g = g * coef[:, None]
      if i == 0 and hard is not None:  # the hard term, in the untempered logits
        lq1 = (lq if not at_one else
               cfg.temperature * (lq + lse[0][:, None]) - lse_all[2][:, None])
        g = g + R.poison_rows(_hard_terms(lq1, y, start, v, True)[1] * hsc[:, None], bad)
      new.append(_vocab_block_grads(heads[i], g, hls[i], F._cut(w[i], start, size, axis),
                                    start, axis, plain, lows[i]))
    return tuple(new), sums

  heads, sums = F._vocab_loop(block, (heads, sums), v, min(cfg.accel_block, v))
  val = _pair_combine(known if known is not None else sums, cfg, cfg.beta)
  grads = tuple(None if g is None else (g[0].astype(h3[i].dtype).reshape(h3[i].shape), g[1],
                                        g[2]) for i, g in enumerate(heads))
  return val.reshape(nc, t), None if hval is None else hval.reshape(nc, t), grads


def _distill(kind, beta, student_hidden, student_weight, teacher_hidden, teacher_weight, *,
             student_bias, teacher_bias, weight_layout, where, temperature, teacher_grad,
             reduction, chunk_size, name, beta_tokens=None, labels=None, ignore_index=None,
             hard_weight=0.0, soft_weight=1.0):
  """The two-head divergence per token, reduced; ``beta_tokens`` ([...], the tokens' shape)
  gives the JS divergence one weight per token (kind "js"). With ``labels``: ``soft_weight``
  times the divergence plus ``hard_weight`` times the student's cross-entropy at temperature
  1, over the tokens ``where`` and ``ignore_index`` keep (a scalar reduction: from the same
  pass over the blocks)."""
  _checks.reduction(reduction)
  if _on_mesh(student_hidden, teacher_hidden, labels, where, beta_tokens):
    local = lambda t, sh, r: _distill(
        kind, beta, t["hs"], sh["ws"], t["ht"], sh["wt"], student_bias=sh["bs"],
        teacher_bias=sh["bt"], weight_layout=weight_layout, where=t["m"],
        temperature=temperature, teacher_grad=teacher_grad, reduction=r,
        chunk_size=chunk_size, name=name, beta_tokens=t["beta"], labels=t["y"],
        ignore_index=ignore_index, hard_weight=hard_weight, soft_weight=soft_weight)
    y = None if labels is None else _checks.as_array(labels, "labels")
    return _token_mesh(name, local, dict(hs=student_hidden, ht=teacher_hidden, y=y, m=where,
                                         beta=beta_tokens),
                       dict(ws=student_weight, wt=teacher_weight, bs=student_bias,
                            bt=teacher_bias), reduction=reduction,
                       kept=_kept(jnp.shape(student_hidden)[:-1], where, y, ignore_index))
  hs, ws, _, bs, v = F.check_head(student_hidden, student_weight, None, student_bias,
                                  weight_layout)
  ht, wt, _, bt, vt = F.check_head(teacher_hidden, teacher_weight, None, teacher_bias,
                                   weight_layout)
  if vt != v:
    raise ValueError(f"student and teacher must share the vocabulary, got V={v} "
                     f"(student_weight.shape={ws.shape}) and V={vt} "
                     f"(teacher_weight.shape={wt.shape}).")
  if hs.shape[:-1] != ht.shape[:-1]:
    raise ValueError(f"student_hidden and teacher_hidden must have the same tokens, got "
                     f"student_hidden.shape={hs.shape} and teacher_hidden.shape={ht.shape}.")
  temperature = _checks.static_number(temperature, "temperature")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}.")
  if not teacher_grad:
    ht, wt, bt = jax.lax.stop_gradient((ht, wt, bt))
  scalar = reduction != "none" and beta_tokens is None  # the forward method
  if scalar and chunk_size is None:
    chunk_size = _forward_method_chunk(hs.shape, v, "pair")
  if labels is not None:
    labels = _checks.integer(labels, "labels")
    if labels.shape != hs.shape[:-1]:
      raise ValueError(f"labels must have the tokens' shape {hs.shape[:-1]}, got "
                       f"labels.shape={labels.shape}.")
  hs3, y2, v2, n, t = F.chunk_tokens(hs, labels, where, ignore_index, v, chunk_size, name)
  ht3, _, _, _, _ = F.chunk_tokens(ht, None, where, None, v, t, name)
  hs3 = jnp.where(v2[..., None], hs3, 0)
  ht3 = jnp.where(v2[..., None], ht3, 0)
  dts = (hs.dtype, ws.dtype, ht.dtype, wt.dtype)
  acc = jnp.float64 if jnp.float64 in dts else jnp.float32
  # On GPU/TPU each step holds a block of both heads' logits: half the one-head block each
  # (still a multiple of 128 columns).
  block = F.accelerator_vocab_block(hs3.shape[0] * t, v)
  block = block // 256 * 128 if block >= 256 else block
  cfg = _PairConfig(weight_layout, F._VOCAB_SLICE, acc, float(temperature), kind, beta, block)
  beta3 = None
  if beta_tokens is not None:
    beta3 = jnp.pad(beta_tokens.reshape(-1).astype(acc), (0, hs3.shape[0] * t - n))
    beta3 = beta3.reshape(hs3.shape[0], t)
  if scalar:
    count = jnp.sum(v2).astype(acc)
    scale = v2.astype(acc)
    if reduction == "mean":
      scale = scale / jnp.where(count == 0, 1, count)
    hard = None
    if labels is not None and hard_weight != 0:
      hard = (y2, hard_weight * scale, v2 & R.split_labels(y2, v2, v)[1])
    return _pair_sum((hs3, ht3), (ws, wt), (bs, bt), soft_weight * scale, cfg, hard)
  val = _pair_divergence((hs3, ht3), (ws, wt), (bs, bt), cfg, beta3)
  if labels is not None:  # per token: the divergence and the student's own log-probabilities
    val = soft_weight * val
    if hard_weight != 0:
      lp = linear_log_probs(student_hidden, student_weight, labels, bias=student_bias,
                            weight_layout=weight_layout, where=v2.reshape(-1)[:n].reshape(
                                hs.shape[:-1]))
      val = val - hard_weight * jnp.pad(lp.reshape(-1), (0, v2.size - n)).reshape(val.shape)
  val = jnp.where(v2, val, 0).reshape(-1)[:n]
  count = jnp.sum(v2).astype(acc)
  out = _checks.reduce(val, reduction, count)
  return out.reshape(hs.shape[:-1]) if reduction == "none" else out


def linear_kl_divergence(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    *,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
    teacher_grad: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Array:
  r"""KL divergence between a teacher's and a student's next-token distributions, per token,
  from both heads one ``[chunk_size, V]`` block at a time (neither head's logits are held).

  With :math:`p = \mathrm{softmax}((h_t W_t + b_t)/T)` (teacher) and
  :math:`q = \mathrm{softmax}((h_s W_s + b_s)/T)` (student):
  ``direction="forward"`` gives :math:`D(p\|q) = \sum_v p_v (\log p_v - \log q_v)`
  (the usual distillation loss), ``"reverse"`` gives :math:`D(q\|p)` (mode-seeking, as in
  on-policy distillation). The student's gradient in its logits is :math:`(q - p)/T` for the
  forward KL. No :math:`T^2` factor is applied (multiply the loss for Hinton's scaling).

  Args:
    student_hidden: ``[..., D_s]``.
    student_weight: ``[D_s, V]`` (``weight_layout="dv"``) or ``[V, D_s]`` (``"vd"``).
    teacher_hidden: ``[..., D_t]``, the same tokens (``D_t`` may differ from ``D_s``).
    teacher_weight: ``[D_t, V]`` or ``[V, D_t]``, the same vocabulary.
    student_bias, teacher_bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"`` (both heads).
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    direction: ``"forward"`` or ``"reverse"``.
    teacher_grad: differentiate the teacher's inputs too (default: the teacher's side is
      under ``stop_gradient``).
    reduction: ``"mean"`` (over kept tokens; 0 if none), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block on CPU; default: a ``[chunk, V]`` float32 block of ~64 MiB
      (~32 MiB with a "mean" or "sum" reduction, whose derivative forms the gradients
      alongside the divergence: the forward method, each block of logits computed once).
      On GPU and TPU the blocks are vocabulary columns of all tokens instead (~64 MiB of
      float32 logits per head; ``chunk_size`` unused).

  Returns:
    The divergence (scalar, or ``[...]`` for ``"none"``), :math:`\ge 0`; :math:`+\infty`
    where the student masks (logit :math:`-\infty`) a class the teacher does not.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.arange(8.0).reshape(2, 4)
  >>> float(jxent.linear_kl_divergence(h, w, h, w))  # the same head: 0
  0.0
  """
  if direction not in ("forward", "reverse"):
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}.")
  return _distill(direction, None, student_hidden, student_weight, teacher_hidden,
                  teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                  weight_layout=weight_layout, where=where, temperature=temperature,
                  teacher_grad=teacher_grad, reduction=reduction, chunk_size=chunk_size,
                  name="linear_kl_divergence")


def linear_js_divergence(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    *,
    beta: float = 0.5,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    teacher_grad: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Array:
  r"""Generalised Jensen–Shannon divergence between a teacher's (:math:`p`) and a student's
  (:math:`q`) next-token distributions, from both heads one ``[chunk_size, V]`` block at a
  time:

  .. math:: \mathrm{JS}_\beta = \beta D(p\|m) + (1-\beta) D(q\|m),
     \qquad m = \beta p + (1-\beta) q,

  as :func:`jxent.js_divergence_from_logits` on the two heads' logits (divided by
  :math:`T`): ``beta=0.5`` is the symmetric JS divergence in :math:`[0, \log 2]`; ``beta=0``
  and ``beta=1`` give the forward and reverse KL (Liger's ``jsd_beta`` end points).

  Args:
    student_hidden, student_weight, teacher_hidden, teacher_weight: as
      :func:`linear_kl_divergence`.
    beta: :math:`\beta \in [0, 1]`, a Python number (static).
    student_bias, teacher_bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"`` (both heads).
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    teacher_grad: differentiate the teacher's inputs too.
    reduction: ``"mean"`` (over kept tokens), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block on CPU; default and GPU/TPU blocks as
      :func:`linear_kl_divergence`.

  Returns:
    The divergence (scalar, or ``[...]`` for ``"none"``), finite for ``0 < beta < 1``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.arange(8.0).reshape(2, 4)
  >>> float(jxent.linear_js_divergence(h, w, h, w))
  0.0
  """
  beta = _checks.static_number(beta, "beta")
  if not 0 <= beta <= 1:
    raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
  kind = "forward" if beta == 0 else "reverse" if beta == 1 else "js"
  return _distill(kind, beta, student_hidden, student_weight, teacher_hidden,
                  teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                  weight_layout=weight_layout, where=where, temperature=temperature,
                  teacher_grad=teacher_grad, reduction=reduction, chunk_size=chunk_size,
                  name="linear_js_divergence")


def linear_tv_distance(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    *,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    teacher_grad: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Array:
  r"""Total variation distance between a teacher's (:math:`p`) and a student's (:math:`q`)
  next-token distributions, :math:`\tfrac12 \sum_v |p_v - q_v|` per token, from both heads
  one ``[chunk_size, V]`` block at a time (neither head's logits are held): Liger's
  ``LigerTVDLoss`` from the heads, as :func:`jxent.tv_distance_from_logits` on their logits
  (divided by :math:`T`).

  The student's gradient in its logits is :math:`-\tfrac12\, q \odot (s - \sum_v q_v s_v)/T`
  with :math:`s = \operatorname{sign}(p - q)`, 0 where :math:`p_v = q_v` (the middle of the
  subdifferential at the kink, as :func:`jxent.tv_distance`). The two expectations of
  :math:`s` are summed with the distance, so on CPU the derivative needs no pass before its
  blocks; on GPU/TPU the vocabulary blocks take one more pass for them. A class whose
  :math:`p_v` and :math:`q_v` agree to the rounding of the logits (float32: a relative gap
  near 1e-6) can take either sign, so two float32 computations of the gradient (this one and
  the unfused one) may differ there by :math:`q_v/T`; the value does not jump.

  Args:
    student_hidden, student_weight, teacher_hidden, teacher_weight: as
      :func:`linear_kl_divergence`.
    student_bias, teacher_bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"`` (both heads).
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    teacher_grad: differentiate the teacher's inputs too.
    reduction: ``"mean"`` (over kept tokens; 0 if none), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block on CPU; default and GPU/TPU blocks as
      :func:`linear_kl_divergence`.

  Returns:
    The distance (scalar, or ``[...]`` for ``"none"``), in :math:`[0, 1]` per token,
    finite whatever the masks (1 for disjoint supports).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.arange(8.0).reshape(2, 4)
  >>> float(jxent.linear_tv_distance(h, w, h, w))
  0.0
  """
  return _distill("tv", None, student_hidden, student_weight, teacher_hidden,
                  teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
                  weight_layout=weight_layout, where=where, temperature=temperature,
                  teacher_grad=teacher_grad, reduction=reduction, chunk_size=chunk_size,
                  name="linear_tv_distance")


_DIVERGENCES = {"kl": "forward", "reverse_kl": "reverse", "js": "js", "tv": "tv"}


def linear_distillation_loss(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    labels: ArrayLike,
    *,
    divergence: str = "kl",
    beta: float = 0.5,
    hard_weight: float = 0.5,
    soft_weight: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int | None = None,
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    teacher_grad: bool = False,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Array:
  r"""Distillation with the labels' loss beside it, from both heads without their logits:

  .. math:: \ell = w_{\text{hard}}\,(-\log q^{(1)}_y)
     + w_{\text{soft}}\,\mathcal{D}\big(\mathrm{softmax}(z_t/T),
     \mathrm{softmax}(z_s/T)\big)

  per token, :math:`q^{(1)} = \mathrm{softmax}(z_s)` the student's distribution at
  temperature 1 and :math:`\mathcal{D}` the forward KL (``"kl"``), the reverse KL
  (``"reverse_kl"``), the JS divergence with ``beta`` (``"js"``) or the total variation
  (``"tv"``), as :func:`linear_kl_divergence`, :func:`linear_js_divergence` and
  :func:`linear_tv_distance` compute them (Liger's fused linear distillation losses with
  ``weight_hard_loss`` and ``weight_soft_loss``; no :math:`T^2` factor). With a ``"mean"`` or
  ``"sum"`` reduction the label's term and its gradient come from the same pass over the
  blocks as the divergence's: the student's logits are computed as often as for the
  divergence alone (on GPU/TPU, with :math:`T \ne 1`, its first pass gathers one more
  logsumexp), instead of again for a separate cross-entropy.

  Args:
    student_hidden, student_weight, teacher_hidden, teacher_weight: as
      :func:`linear_kl_divergence`.
    labels: integer ``[...]`` (the tokens' shape), the hard targets.
    divergence: ``"kl"``, ``"reverse_kl"``, ``"js"`` or ``"tv"``.
    beta: the JS divergence's :math:`\beta \in [0, 1]` (``"js"`` only; 0 and 1 give the
      forward and the reverse KL, as Liger's ``beta`` of its JSD loss).
    hard_weight, soft_weight: the two terms' weights (Python numbers).
    temperature: :math:`T > 0` of the divergence (static); the label's term is at 1.
    ignore_index: tokens whose label equals it are dropped from both terms.
    student_bias, teacher_bias, weight_layout, where, teacher_grad, chunk_size: as
      :func:`linear_kl_divergence`; ``where`` drops tokens from both terms.
    reduction: ``"mean"`` (over kept tokens; 0 if none), ``"sum"`` or ``"none"`` (per token:
      the divergence and :func:`linear_log_probs`, each its own pass).

  Returns:
    The loss (scalar, or ``[...]`` for ``"none"``, 0 on dropped tokens). NaN for a kept
    label outside ``[0, V)``; :math:`+\infty` where the student masks the label's class or,
    for the KL divergences, a class the other distribution keeps.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.log(jnp.array([[1.0, 2.0, 1.0]] * 2)) / 2
  >>> y = jnp.array([1, 1, 0])
  >>> loss = jxent.linear_distillation_loss(h, w, h, w, y)  # the same head: CE / 2 only
  >>> round(float(loss), 4)  # (2 log 2 + log 4) / 3 / 2
  0.4621
  """
  if divergence not in _DIVERGENCES:
    raise ValueError(f"divergence must be one of {tuple(_DIVERGENCES)}, got {divergence!r}.")
  for value, what in ((hard_weight, "hard_weight"), (soft_weight, "soft_weight")):
    _checks.static_number(value, what)
  kind = _DIVERGENCES[divergence]
  if kind == "js":  # the end points are the two KL divergences, as linear_js_divergence's
    beta = _checks.static_number(beta, "beta")
    if not 0 <= beta <= 1:
      raise ValueError(f"beta must be in [0, 1], got {beta!r}.")
    kind = "forward" if beta == 0 else "reverse" if beta == 1 else "js"
  return _distill(kind, beta if kind == "js" else None, student_hidden, student_weight,
                  teacher_hidden, teacher_weight, student_bias=student_bias,
                  teacher_bias=teacher_bias, weight_layout=weight_layout, where=where,
                  temperature=temperature, teacher_grad=teacher_grad, reduction=reduction,
                  chunk_size=chunk_size, name="linear_distillation_loss", labels=labels,
                  ignore_index=ignore_index, hard_weight=float(hard_weight),
                  soft_weight=float(soft_weight))


# ------------------------------------------------- distillation from a teacher's top-k
#
# The teacher is given as, per token, k class indices I and their log-probabilities under the
# teacher's full distribution. The missing mass r = 1 - sum_I p_i goes to one more outcome,
# "any other class", whose student probability is q_rest = sum_{v not in I} q_v: the loss is
# the KL divergence between the two (k+1)-outcome distributions,
#
#   KL_k = sum_I p_i (log p_i - log q_i) + r (log r - log q_rest),
#
# which is 0 exactly when the student matches the teacher on I and on the rest's total, never
# exceeds the full KL (coarse-graining), and equals it for k = V. One blockwise pass gives
# lse, lse_rest = log sum_{v not in I} exp(z_v) (the top-k columns set to -inf in each block)
# and the k logits z_i (gathered from the blocks: no [N, k, D] gather of W's columns).


def _masked_topk(z, idx, start):
  """z with the columns idx (absolute vocabulary ids, [T, k]) of this block set to -inf."""
  size = z.shape[-1]
  rel = jnp.where((idx >= start) & (idx < start + size), idx - start, size)
  rows = jnp.arange(z.shape[0])[:, None]
  return z.at[rows, rel].set(-jnp.inf, mode="drop")


def _take_topk(z, idx, start):
  """[T, k]: z at the absolute columns idx that fall in this block, 0 elsewhere."""
  size = z.shape[-1]
  inside = (idx >= start) & (idx < start + size)
  got = jnp.take_along_axis(z, jnp.clip(idx - start, 0, size - 1), axis=-1)
  return jnp.where(inside, got, 0)


def _rest_forward(h3, w, b, idx3, cfg):
  """(lse, lse outside the k, logits at the k): token chunks (reference, XLA:CPU) or
  vocabulary blocks over all tokens (GPU, TPU)."""
  return dispatch(h3, w, b, idx3, cfg, reference=_rest_chunks_forward,
                  accelerator=_rest_vocab_forward)


def _rest_chunks_forward(h3, w, b, idx3, cfg):
  def body(_, xs):
    h, idx = xs
    z = _block_logits(h, w, b, cfg)
    return None, (S.lse_rows(z), S.lse_rows(_masked_topk(z, idx, 0)), _take_topk(z, idx, 0))

  return jax.lax.scan(body, None, (h3, idx3))[1]


@jax.custom_jvp
def _lse_and_rest(h3, w, b, idx3, cfg):
  """Per token: logsumexp of all logits, of those outside the token's k indices, and the
  logits at the k indices ([n_chunks, T, k], gathered from the blocks)."""
  return _rest_forward(h3, w, b, idx3, cfg)


def _rest_block_tangent(h, y, valid, res, dh, w, b, dw, db, cfg, start, v):
  del valid, v
  idx = y  # the token's k indices ride in the labels' slot
  lse, lse_rest = res
  z = _block_logits(h, w, b, cfg)
  finite = lambda a: jnp.where(jnp.isfinite(a), a, 0)[:, None]
  p = jnp.exp(z - finite(lse))
  p_rest = jnp.exp(_masked_topk(z, idx, start) - finite(lse_rest))
  dz = _tangent_logits(h, w, dh, dw, db, cfg)
  return jnp.sum(p * dz, axis=-1), jnp.sum(p_rest * dz, axis=-1), _take_topk(dz, idx, start)


def _lse_and_rest_jvp(primals, tangents):
  h3, w, b, idx3, cfg = primals
  dh3, dw, db, _, _ = tangents
  primal = _rest_forward(h3, w, b, idx3, cfg)
  dh3 = dh3 if F._nonzero(dh3) else None
  dw = dw if F._nonzero(dw) else None
  db = db if (b is not None and F._nonzero(db)) else None
  if dh3 is None and dw is None and db is None:
    return primal, tuple(jnp.zeros_like(a) for a in primal)
  valid = jnp.ones(idx3.shape[:2], bool)
  out = _tangent(h3, idx3, valid, primal[:2], dh3, w, b, dw, db, cfg, _rest_block_tangent)
  return primal, tuple(out)


_lse_and_rest.defjvp(_lse_and_rest_jvp, symbolic_zeros=True)


# GPU and TPU: the top-k KL over vocabulary blocks of all tokens. Both logsumexps (all classes;
# outside each token's k) are gathered online, the k logits picked up in the blocks that hold
# them; the forward method's second pass forms each block's gradient from them.


def _topk_vocab_stats(h, idx, w, b, cfg):
  """(lse, lse outside the k [N], logits at the k [N, k]) over vocabulary blocks."""
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  refs = (h, w, idx)
  full = lambda x: F._varying_like(jnp.full(h.shape[:1], x, cfg.acc), *refs)
  init = (full(-jnp.inf), full(0), full(-jnp.inf), full(0),
          F._varying_like(jnp.zeros(idx.shape, cfg.acc), *refs))

  def block(carry, start, size):
    m, s, m_r, s_r, z_i = carry
    z = _block_logits(h, F._cut(w, start, size, axis), F._cut(b, start, size, 0), cfg)
    return (*_online_lse(m, s, z), *_online_lse(m_r, s_r, _masked_topk(z, idx, start)),
            z_i + _take_topk(z, idx, start))

  m, s, m_r, s_r, z_i = F._vocab_loop(block, init, v, min(cfg.accel_block, v))
  return S.finite(m) + jnp.log(s), S.finite(m_r) + jnp.log(s_r), z_i


def _rest_vocab_forward(h3, w, b, idx3, cfg):
  nc, t, d = h3.shape
  lse, lse_rest, z_i = _topk_vocab_stats(h3.reshape(nc * t, d), idx3.reshape(nc * t, -1), w,
                                         b, cfg)
  return lse.reshape(nc, t), lse_rest.reshape(nc, t), z_i.reshape(idx3.shape)


def _topk_vocab_grads(h3, w, b, data, scale, cfg, want):
  """``_one_head_chunk_grads`` of the top-k KL on GPU/TPU: the statistics over vocabulary
  blocks, then each block again for its gradient (its dW columns written once)."""
  nc, t, d = h3.shape
  idx3, lpt3, valid3 = data
  h, idx, lpt = h3.reshape(nc * t, d), idx3.reshape(nc * t, -1), lpt3.reshape(nc * t, -1)
  lse, lse_rest, z_i = _topk_vocab_stats(h, idx, w, b, cfg)
  val, vjp = jax.vjp(_topk_value, lse, lse_rest, z_i, lpt)
  g_lse, g_rest, g_zi, slope = vjp(jnp.ones_like(val))
  val = jnp.where(valid3.reshape(-1), val, 0).reshape(nc, t)
  slope = slope.reshape(lpt3.shape)
  if not want:
    return val, slope, None
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  plain = _plain(cfg)
  low = _low_dtype(h, w, cfg.acc)
  hl = h.astype(low)
  coef = scale.reshape(-1) / cfg.temperature  # z = (h W + b) / T
  lse_f, rest_f = S.finite(lse)[:, None], S.finite(lse_rest)[:, None]
  rows = jnp.arange(h.shape[0])[:, None]
  init = _grads_init(h, w, b, cfg.acc, h, w, b, coef)

  def block(carry, start, size):
    w_j = F._cut(w, start, size, axis)
    z = _block_logits(h, w_j, F._cut(b, start, size, 0), cfg)
    # d lse / dz = q, d lse_rest / dz = q restricted to the other classes and renormalised.
    g = g_lse[:, None] * jnp.exp(z - lse_f)
    g = g + g_rest[:, None] * jnp.exp(_masked_topk(z, idx, start) - rest_f)
    inside = (idx >= start) & (idx < start + size)
    g = g.at[rows, jnp.where(inside, idx - start, size)].add(g_zi, mode="drop")
    return _vocab_block_grads(carry, g * coef[:, None], hl, w_j, start, axis, plain, low)

  dh, dw, db = F._vocab_loop(block, init, v, min(cfg.accel_block, v))
  return val, slope, (dh.astype(h3.dtype).reshape(nc, t, d), dw, db)


# A dense target (top-k with k = V, every class's log-probability given): per token
# D(q || p) = sum_v q_v (log q_v - log p_v), q = exp(lt) (not renormalised), with the gradient
# Q p - q in the student's tempered logits (Q = sum_v q_v) and the slope q (log q - log p + 1)
# in lt; a "mean" or "sum" only (the forward method), as Liger's fused linear KL divergence.
_DENSE = ("dense", "dense+t")  # "dense+t": also the slope in lt ([T, V], when its tangent is)


def _dense_terms(z, lse, lt, valid, want, teacher, q_total=None):
  """(the sum over these columns of q (lt - log p) [T], the gradient Q p - q in z or None, the
  slope in lt or None) for one block of columns of z and lt ([T, size]) with the student's
  logsumexp ``lse`` over all columns and Q = ``q_total`` (default: the block's own sum: all
  columns). Dropped tokens: 0, 0, 0."""
  lt = jnp.where(valid[:, None], lt.astype(z.dtype), -jnp.inf)  # q = 0 on dropped tokens
  q = jnp.exp(lt)
  pos = q > 0
  lp = z - S.finite(lse)[:, None]
  # q (0 there) rather than a constant 0 where q = 0: XLA:CPU hoists a [T, V] broadcast of a
  # constant out of the loop and keeps it as one more block.
  val = jnp.sum(jnp.where(pos, q * (lt - lp), q), axis=-1)
  if q_total is None:
    q_total = jnp.sum(q, axis=-1)
  g = q_total[:, None] * jnp.exp(lp) - q if want else None
  slope = jnp.where(pos, q * (lt - lp + 1), q) if teacher else None
  return val, g, slope


def _dense_vocab_grads(h3, w, b, data, scale, cfg, kind, want):
  """``_one_head_chunk_grads`` of a dense target on GPU/TPU: the logsumexp over vocabulary
  blocks, then each block again for its terms and gradient (its dW columns written once)."""
  nc, t, d = h3.shape
  lt, valid3 = data  # lt: the unpadded [N, V] target
  n, v = lt.shape
  axis = 1 if cfg.layout == "dv" else 0
  h, valid = h3.reshape(nc * t, d)[:n], valid3.reshape(-1)[:n]
  scale = scale.reshape(-1)[:n]
  refs = (h, w, lt, scale)
  full = lambda x: F._varying_like(jnp.full(h.shape[:1], x, cfg.acc), *refs)
  step = min(cfg.accel_block, v)

  def stats(carry, start, size):
    z = _block_logits(h, F._cut(w, start, size, axis), F._cut(b, start, size, 0), cfg)
    return _online_lse(*carry, z)

  m, total = F._vocab_loop(stats, (full(-jnp.inf), full(0)), v, step)
  lse = S.finite(m) + jnp.log(total)
  q_total = jnp.sum(jnp.exp(jnp.where(valid[:, None], lt.astype(cfg.acc), -jnp.inf)), axis=-1)
  teacher = kind == "dense+t"
  plain = _plain(cfg)
  low = _low_dtype(h, w, cfg.acc)
  hl = h.astype(low)
  coef = scale / cfg.temperature  # z = (h W + b) / T
  grads = _grads_init(h, w, b, cfg.acc, *refs) if want else None
  slope = F._varying_like(jnp.zeros(lt.shape, cfg.acc), *refs) if teacher else None

  def block(carry, start, size):
    val, grads, slope = carry
    w_j = F._cut(w, start, size, axis)
    z = _block_logits(h, w_j, F._cut(b, start, size, 0), cfg)
    val_j, g, slope_j = _dense_terms(z, lse, F._cut(lt, start, size, 1), valid, want, teacher,
                                     q_total)
    if want:
      grads = _vocab_block_grads(grads, g * coef[:, None], hl, w_j, start, axis, plain, low)
    if teacher:
      slope = jax.lax.dynamic_update_slice_in_dim(slope, slope_j, start, 1)
    return val + val_j, grads, slope

  val, grads, slope = F._vocab_loop(block, (full(0), grads, slope), v, step)
  tokens = lambda a: jnp.pad(a, [(0, nc * t - n)] + [(0, 0)] * (a.ndim - 1)).reshape(
      (nc, t) + a.shape[1:])
  if grads is not None:
    dh, dw, db = grads
    grads = (tokens(dh.astype(h3.dtype)), dw, db)
  return tokens(val), slope, grads


def linear_topk_kl_divergence(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_indices: ArrayLike | None,
    teacher_log_probs: ArrayLike,
    *,
    student_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Array:
  r"""KL divergence from a teacher given only by its top-k log-probabilities (offline
  distillation) to a student head, one ``[chunk_size, V]`` block at a time.

  With the teacher's classes :math:`I` (``k`` per token), their log-probabilities
  :math:`\log p_i` under the teacher's full distribution, the missing mass
  :math:`r = 1 - \sum_{i \in I} p_i`, and the student's :math:`q = \mathrm{softmax}(
  (h W + b) / T)` with :math:`q_{\mathrm{rest}} = \sum_{v \notin I} q_v`:

  .. math:: \mathrm{KL}_k = \sum_{i \in I} p_i (\log p_i - \log q_i)
     + r (\log r - \log q_{\mathrm{rest}}),

  the KL divergence between the two distributions over :math:`k + 1` outcomes (the top-k
  classes and "any other class"). It is 0 when the student matches the teacher on the top-k
  classes and on the rest's total mass, never exceeds the full :math:`D(p\|q)`, and equals it
  for :math:`k = V`. A missing mass within the rounding of the sum of :math:`k`
  probabilities (:math:`r \le k\varepsilon`) is taken as :math:`r = 0`.
  Differentiable with respect to the student's ``hidden``, ``weight`` and ``bias`` and the
  teacher's log-probabilities; a ``"mean"`` or ``"sum"`` forms the gradients with the values
  (the forward method, as :func:`linear_log_probs`).

  With ``teacher_indices=None`` the teacher is dense: ``teacher_log_probs`` ``[..., V]``
  gives every class (soft labels cached as data; Liger's fused linear KL divergence), and the
  divergence is :math:`\sum_v p_v (\log p_v - \log q_v)` as given (not renormalised; its
  gradient in the student's logits :math:`(\sum_v p_v)\, q - p`), each block of logits
  computed once beside the same block of the target. A ``"mean"`` or ``"sum"`` only.

  Args:
    student_hidden: ``[..., D]``.
    student_weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    teacher_indices: integer ``[..., k]`` distinct class ids per token, or None: all ``V``
      classes in order (a dense teacher).
    teacher_log_probs: ``[..., k]`` the teacher's log-probabilities of those classes
      (``[..., V]`` for a dense teacher; :math:`-\infty` for a class it rules out).
    student_bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0` dividing the student's logits (the teacher's log-probs are
      used as given).
    reduction: ``"mean"`` (over kept tokens), ``"sum"`` or ``"none"``.
    chunk_size: tokens per block on CPU; default as :func:`linear_kl_divergence`. On GPU
      and TPU the blocks are vocabulary columns of all tokens instead (~128 MiB of float32
      logits; ``chunk_size`` unused).

  Returns:
    The divergence (scalar, or ``[...]`` for ``"none"``), :math:`\ge 0`.

  >>> import jax, jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((2, 3)); w = jnp.zeros((3, 5))  # the student: uniform over 5
  >>> idx = jnp.array([[0, 1], [2, 3]]); lp = jnp.log(jnp.full((2, 2), 0.2))
  >>> round(float(jxent.linear_topk_kl_divergence(h, w, idx, lp)), 6)  # teacher uniform too
  0.0
  >>> dense = jnp.log(jnp.array([[0.5, 0.5, 0.0, 0.0, 0.0]] * 2))  # all V classes
  >>> round(float(jxent.linear_topk_kl_divergence(h, w, None, dense)), 4)  # log(0.5 / 0.2)
  0.9163
  """
  _checks.reduction(reduction)
  if _on_mesh(student_hidden, teacher_indices, teacher_log_probs, where):
    local = lambda t, sh, r: linear_topk_kl_divergence(
        t["h"], sh["w"], t["idx"], t["lpt"], student_bias=sh["b"],
        weight_layout=weight_layout, where=t["m"], temperature=temperature, reduction=r,
        chunk_size=chunk_size)
    return _token_mesh("linear_topk_kl_divergence", local,
                       dict(h=student_hidden, idx=teacher_indices, lpt=teacher_log_probs,
                            m=where),
                       dict(w=student_weight, b=student_bias), reduction=reduction,
                       kept=_kept(jnp.shape(student_hidden)[:-1], where))
  hs, ws, _, bs, v = F.check_head(student_hidden, student_weight, None, student_bias,
                                  weight_layout)
  batch = hs.shape[:-1]
  temperature = _checks.static_number(temperature, "temperature")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}.")
  dense = teacher_indices is None
  if dense:
    # Kept in its dtype (a 16-bit target upcast here would be a copy the size of the logits).
    lpt = _checks.as_array(teacher_log_probs, "teacher_log_probs")
    if not jnp.issubdtype(lpt.dtype, jnp.floating):
      raise TypeError(f"teacher_log_probs must be a floating-point array, got dtype "
                      f"{lpt.dtype}.")
    if lpt.shape != batch + (v,):
      raise ValueError(
          f"with teacher_indices=None, teacher_log_probs must be [..., V] = {batch + (v,)} "
          f"(every class), got teacher_log_probs.shape={lpt.shape}.")
    if reduction == "none":
      raise ValueError("a dense teacher (teacher_indices=None) needs reduction 'mean' or "
                       "'sum' (its gradients formed with the values); got reduction='none'.")
  else:
    idx = _checks.integer(teacher_indices, "teacher_indices")
    lpt = _checks.floating(teacher_log_probs, "teacher_log_probs")
    if idx.ndim != len(batch) + 1 or idx.shape[:-1] != batch or lpt.shape != idx.shape:
      raise ValueError(
          f"teacher_indices and teacher_log_probs must be [..., k] with hidden's tokens "
          f"{batch}, got teacher_indices.shape={idx.shape}, teacher_log_probs.shape="
          f"{lpt.shape} and student_hidden.shape={hs.shape}.")
    _checks.value_check(jnp.all((idx >= 0) & (idx < v)),
                         f"teacher_indices out of range [0, {v}).")
  if reduction != "none" and chunk_size is None:
    chunk_size = _forward_method_chunk(hs.shape, v, "dense" if dense else "topk")
    if dense:  # a chunk that divides N (down to half the default): no ragged last chunk
      n = _num_tokens(hs)
      chunk_size = next((c for c in range(chunk_size, chunk_size // 2, -1) if n % c == 0),
                        chunk_size)
  h3, _, v2, n, t = F.chunk_tokens(hs, None, where, None, v, chunk_size,
                                   "linear_topk_kl_divergence")
  h3 = jnp.where(v2[..., None], h3, 0)
  acc = jnp.float64 if jnp.float64 in (hs.dtype, ws.dtype) else jnp.float32
  cfg = _Config(weight_layout, F._VOCAB_SLICE, acc, float(temperature),
                F.accelerator_vocab_block(h3.shape[0] * t, v))
  if dense:  # each chunk or block takes the target's rows or columns: no padded copy
    return _reduce_tokens("dense", h3, ws, bs, (lpt.reshape(n, v), v2), v2, None, cfg,
                          reduction, None, None)
  k = idx.shape[-1]
  pad = h3.shape[0] * t - n
  idx3 = jnp.pad(idx.reshape(n, k).astype(jnp.int32), ((0, pad), (0, 0))).reshape(
      h3.shape[0], t, k)
  lpt3 = jnp.pad(lpt.reshape(n, k).astype(acc), ((0, pad), (0, 0))).reshape(idx3.shape)

  def per_token():
    lse, lse_rest, z_i = _lse_and_rest(h3, ws, bs, idx3, cfg)
    return jnp.where(v2, _topk_value(lse, lse_rest, z_i, lpt3), 0).reshape(-1)

  unflat = lambda a: a[:n].reshape(batch)
  return _reduce_tokens("topk", h3, ws, bs, (idx3, lpt3, v2), v2, None, cfg, reduction,
                        per_token, unflat)
