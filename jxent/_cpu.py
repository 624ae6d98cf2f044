"""XLA:CPU implementations of the loss forwards (``jxent/_platform.py`` chooses them).

Same values as ``jxent/_reference.py`` (the tests compare them), written for how XLA:CPU
compiles: it makes the row max of a logsumexp a separate full read of the logits, hands
fused exp-reductions to YNNPACK only for rows of at most 32768 entries, loses a fused
reduction's vectorisation to a select, and shares (and so materialises) a float32 conversion
of 16-bit inputs between two consumers. Each trick below names what it measured (a 2-core
x86 CPU, jax 0.10; ``python -m benchmarks losses`` and ``floors``). None of them is assumed
to help elsewhere: other platforms run the reference.

Only forwards live here. Derivatives are the same on every platform (``jxent/_softmax.py``
and ``jxent/_sigmoid.py``), so nothing in this file is ever differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jxent import _reference as R
from jxent._platform import explicitly_sharded

Array = jax.Array

# XLA:CPU hands fused exp-reductions to YNNPACK, which is fast (~0.2 ns/element) for rows of at
# most 32768 entries and several times slower above that (jax 0.10). Longer rows are reduced as
# ``[N * k, C / k]`` pieces and the k partial results combined per row (8x at N=8192, C=50304).
FAST_ROW = 32768


def row_split(num_classes: int, x: Array | None = None) -> int:
  """The number k of equal pieces to cut a row into (1: no split)."""
  if num_classes <= FAST_ROW or (x is not None and explicitly_sharded(x)):
    return 1
  for k in range(2, num_classes // 64 + 1):
    if num_classes % k == 0 and num_classes // k <= FAST_ROW:
      return k
  return 1


def split_rows(z: Array, k: int) -> Array:
  """``[N, C]`` -> ``[N * k, C / k]``. A 16-bit array is reshaped as its raw bits: otherwise
  XLA:CPU moves the float32 conversion that follows in front of the reshape, converts back
  for the max, and the fused kernel ran 4.7x slower (bfloat16 [8192, 50304]: 681 -> 143 ms)."""
  n, c = z.shape
  if z.dtype.itemsize != 2:
    return z.reshape(n * k, c // k)
  bits = jax.lax.bitcast_convert_type(z, jnp.uint16).reshape(n * k, c // k)
  return jax.lax.bitcast_convert_type(bits, z.dtype)


def unshared(x: Array) -> Array:
  """``x`` behind an optimization barrier if it is 16-bit. Otherwise XLA:CPU shares one float32
  conversion of ``x`` between two fused kernels and materialises it (bfloat16 [4096, 32768]
  integer-label forward+backward: 425 ms against 178 ms with the barrier)."""
  return jax.lax.optimization_barrier(x) if x.dtype.itemsize == 2 else x


def one_pass_floor(acc) -> float:
  """The least row sum of exp(z) that the one-pass logsumexp accepts: sqrt(tiny)."""
  return float(np.sqrt(np.finfo(acc).tiny))


def shifted_parts(z: Array, k: int, acc) -> tuple[Array, Array]:
  """``(m, r)`` as ``_reference.lse_parts``, from k pieces per row, written so that XLA:CPU
  fuses it: the max runs in the input dtype (exact), the float32 conversion happens inside
  the exp-sum pass, and there is no select."""
  n, c = z.shape
  if k == 1:
    return R.finish_parts(z, jnp.max(z, axis=-1).astype(acc), jnp.sum)
  pieces = split_rows(z, k)
  m_raw = jnp.max(jnp.max(pieces, axis=-1).reshape(n, k), axis=-1).astype(acc)
  m = jnp.where(jnp.isfinite(m_raw), m_raw, 0)
  s = jnp.sum(jnp.exp(pieces.astype(acc) - jnp.repeat(m, k)[:, None]), axis=-1)
  r = jnp.log(jnp.sum(s.reshape(n, k), axis=-1))
  return m, jnp.where(m_raw == jnp.inf, jnp.nan, r)


def lse_parts(z: Array) -> tuple[Array, Array]:
  """``(m, r)`` with one read of the logits where possible.

  ``log(sum(exp(z)))`` with no shift (m = 0) is accepted when every row's sum is finite and
  at least sqrt(tiny) (float32: logits below about 88, a logsumexp above about -43): then it
  is as accurate as the shifted form, and the terms it flushes to zero weigh less than
  C * 1e-19 of it. Otherwise the batch is recomputed max-shifted behind a ``cond``. The
  integer-label float32 forward at [4096, 32768] went from 58 to 32 ms. Long rows are summed
  in pieces behind an optimization barrier (without it XLA merged the two sums back into one
  slow long-row reduction: 564 against 99 ms at [8192, 50304])."""
  n, c = z.shape
  acc = R.acc_dtype(z.dtype)
  k = row_split(c, z)
  if explicitly_sharded(z):
    return shifted_parts(z, k, acc)
  if k == 1:
    s = jnp.sum(jnp.exp(z.astype(acc)), axis=-1)
  else:
    pieces = jax.lax.optimization_barrier(split_rows(z, k))
    s = jnp.sum(jnp.sum(jnp.exp(pieces.astype(acc)), axis=-1).reshape(n, k), axis=-1)
  in_range = jnp.all((s >= one_pass_floor(acc)) & (s <= jnp.finfo(acc).max))  # NaN: False
  return jax.lax.cond(in_range, lambda: (jnp.zeros((n,), acc), jnp.log(s)),
                      lambda: shifted_parts(z, k, acc))


def take_label_logit(z: Array, y: Array) -> Array:
  """z[i, y_i]. For 16-bit logits the gather runs on the raw bits: a plain gather lets XLA
  share one float32 conversion of all of ``z`` between the gather and the exp-sum pass and
  materialise it (several times slower)."""
  if z.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(z, jnp.uint16)
    picked = jnp.take_along_axis(bits, y[:, None], axis=-1)[:, 0]
    return jax.lax.bitcast_convert_type(picked, z.dtype)
  return jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------ integer labels


def label_tail(zm: Array, y: Array, acc) -> Array:
  """``sum_{c != y} exp(z_c - z_y)`` (``_reference.label_term``) where it is used (the label
  strictly above every other logit), as ``sum_c frac(exp(z_c - z_y))``, the label's own term
  exp(0) = 1 having no fractional part and every other term below 1. Arithmetic only, so
  XLA:CPU keeps the exp-sum fused: masking the label's column (a compare, a select, or a
  scatter of -inf) made the pass 4-5x slower (f32 [4096, 32768]: 180-200 ms against 53 ms;
  the bare exp-sum 41 ms). Rows elsewhere may get any value (NaN where a term overflows):
  they are not used."""
  n, c = zm.shape
  k = row_split(c, zm)
  z_y = take_label_logit(zm, y).astype(acc)
  pieces, shift = (zm, z_y) if k == 1 else (split_rows(zm, k), jnp.repeat(z_y, k))
  e = jnp.exp(pieces.astype(acc) - shift[:, None])
  return jnp.sum(jnp.sum(e - jnp.floor(e), axis=-1).reshape(n, k), axis=-1)


def int_ce(zm, y, valid, w, eps, cmask, zl):
  """``(loss, m, r)`` as ``_reference.int_ce``: one read for the logsumexp and the label's
  logit; with smoothing the sum over classes is select-free, redone masked only where it
  meets 0 * -inf."""
  n, c = zm.shape
  m, r = lse_parts(zm)
  acc = m.dtype
  yc, bad = R.split_labels(y, valid, c)
  gap_y = m - take_label_logit(zm, yc).astype(acc)
  # The label's term to relative accuracy where it is tiny (R.label_term): one more read of
  # the logits, only when some row's loss is that small.
  tail = jax.lax.cond(jnp.any(r + gap_y < R._SMALL_LOSS),
                      lambda: label_tail(zm, yc, acc), lambda: jnp.zeros_like(r))
  if eps is None:
    return R.int_loss_from_parts(zm, y, valid, w, None, cmask, zl, m, r, gap_y=gap_y,
                                 tail=tail), m, r
  a, s, v = R.int_target_parts(yc, valid, w, eps, cmask, c, acc)
  # s sum_c v_c (m - z_c) as 2 sum_c (s v_c) (m/2 - z_c/2), as the reference (no overflow).
  half = 0.5 * m[:, None] - 0.5 * unshared(zm).astype(acc)
  if v is None:
    v_sum, vd = jnp.asarray(c, acc), 2 * jnp.sum(s[:, None] * half, axis=-1)
  else:
    sv = jnp.broadcast_to(s[:, None] * v, half.shape)
    v_sum = jnp.sum(v, axis=-1) if v.ndim == 2 else jnp.sum(v)
    vd = 2 * jnp.sum(sv * half, axis=-1)  # NaN only for v_c = 0 at z_c = -inf: redone masked
    vd = jax.lax.cond(jnp.any(jnp.isnan(vd)),
                      lambda: 2 * jnp.sum(R.masked_mul(sv, half), axis=-1), lambda: vd)
  vd = jnp.where(s != 0, vd, 0)  # dropped rows: 0 whatever their logits hold
  loss = R.masked_mul(a, R.label_term(r, gap_y, tail)) + R.masked_mul(s * v_sum, r) + vd
  return R.poison_rows(R.add_z_loss(loss, zl, valid, m, r), bad), m, r


# --------------------------------------------------------------------------- soft labels


def _soft_pieces_cross(z, y, valid, w, eps, m, r, k):
  """sum_c t_c (r + m - z_c) per row from ``[N * k, C / k]`` pieces of z and y. 16-bit pieces
  are cut before either is converted and kept apart by an optimization barrier: XLA otherwise
  folds the cut into the float32 conversion (bfloat16 [8192, 50304]: 1,161 -> 115 ms)."""
  n, c = z.shape
  zp, yp = split_rows(z, k), split_rows(y, k)
  if z.dtype.itemsize == 2 or y.dtype.itemsize == 2:
    zp, yp = jax.lax.optimization_barrier((zp, yp))
  acc = m.dtype
  tp = yp.astype(acc)
  if eps is not None:
    tp = (1 - eps) * tp + eps / c
  if w is not None:
    tp = tp * split_rows(jnp.broadcast_to(w.astype(acc), (n, c)), k)
  if valid is not None:
    tp = tp * jnp.repeat(valid, k)[:, None]
  gap = jnp.repeat(r, k)[:, None] + (jnp.repeat(m, k)[:, None] - zp.astype(acc))
  return jnp.sum(jnp.sum(tp * gap, axis=-1).reshape(n, k), axis=-1)


def sharp_parts(z: Array, k: int, acc) -> tuple[Array, Array]:
  """``(m, r)`` as ``_reference.lse_parts``, r sharp where small (``_reference.sharpen``):
  max-shifted, the rest as ``sum_c frac(exp(z_c - m))`` (the max's term exp(0) = 1 has no
  fractional part, every other term is below 1; where one rounds to 1, r >= log 2 and the
  rest is not used). Arithmetic only, so that XLA:CPU fuses both sums into one pass."""
  n, c = z.shape
  pieces = z if k == 1 else split_rows(z, k)
  m_raw = jnp.max(jnp.max(pieces, axis=-1).reshape(n, k), axis=-1).astype(acc)
  m = jnp.where(jnp.isfinite(m_raw), m_raw, 0)
  shift = (m if k == 1 else jnp.repeat(m, k))[:, None]
  s = jnp.sum(jnp.sum(jnp.exp(pieces.astype(acc) - shift), axis=-1).reshape(n, k), axis=-1)
  # The same exponentials spelled z + (-m): XLA:CPU otherwise materialises the broadcast
  # shift the two sums share as an [N, C] buffer.
  e = jnp.exp(pieces.astype(acc) + (-shift))
  rest = jnp.sum(R.frac_sum(e).reshape(n, k), axis=-1)
  r = R.sharpen(jnp.log(s), rest)
  return m, jnp.where(m_raw == jnp.inf, jnp.nan, r)


def _kept(x: Array, valid: Array | None) -> Array:
  return x if valid is None else x & valid


def _soft_cross(z, y, valid, w, eps, m, r, k):
  """sum_c t_c (r + m - z_c) per row, select-free (NaN where t_c = 0 meets z_c = -inf)."""
  if k > 1:  # long rows: the one reduction over whole rows ran 2.6x slower (f32 [8192, 50304])
    return _soft_pieces_cross(z, y, valid, w, eps, m, r, k)
  # One reduction: sum_c t_c (r + (m - z_c)). Two (sum t and sum t d) made XLA materialise
  # the float32 conversion of 16-bit labels for both.
  t = R.soft_target(y, valid, w, eps, None, m.dtype)
  d = m[:, None] - unshared(z).astype(m.dtype)
  return jnp.sum(t * (r[:, None] + d), axis=-1)


def soft_ce(zm, y, valid, w, eps, cmask, zl):
  """``(loss, m, r)`` as ``_reference.soft_ce``. The cross term has no select, so that XLA:CPU
  fuses it with the exp-sum (a select there cost 4-7x); a non-finite result is recomputed
  exactly. A class mask meets 0 * -inf by construction and takes the reference."""
  if cmask is not None:
    return R.soft_ce(zm, y, valid, w, eps, cmask, zl)
  n, c = zm.shape
  m, r = lse_parts(zm)
  k = row_split(c, zm)
  loss = _soft_cross(zm, y, valid, w, eps, m, r, k)
  # A loss below 0.5 from the one-pass logsumexp (m = 0) is r - z_y rounded at the scale of
  # lse (a confident prediction's 1e-8 becomes 0 or 1e-6): then the batch again, max-shifted
  # with a sharp r, where a one-hot target's loss is r alone (two more reads of the logits).
  def sharp():
    m2, r2 = sharp_parts(zm, k, m.dtype)
    return _soft_cross(zm, y, valid, w, eps, m2, r2, k), m2, r2
  loss, m, r = jax.lax.cond(jnp.any(_kept(loss < R._SMALL_LOSS, valid)), sharp,
                            lambda: (loss, m, r))
  # Non-finite only where t_c = 0 meets z_c = -inf, where m - z_c overflows (logits near
  # ±3e38), or where the loss is truly +inf: then, and only then, the exact form.
  loss = jax.lax.cond(
      jnp.all(jnp.isfinite(loss)),
      lambda: loss,
      lambda: R.soft_loss_from_parts(zm, y, valid, w, eps, None, None, m, r))
  return R.add_z_loss(loss, zl, valid, m, r), m, r


def _poison_below_range(lse: Array) -> Array:
  """``lse`` where it is at least log(sqrt(tiny)) (the one-pass range), -inf below it, NaN for
  NaN. Arithmetic only: a compare or select here cost the whole kernel's fusion (5x slower
  at [8192, 50304])."""
  lo = float(np.log(one_pass_floor(lse.dtype)))
  return lse + (1 - jnp.exp((lo - jnp.minimum(lse, lo)) * 1e30))


def _soft_in_one_kernel(z, y, valid, w, eps, zl):
  """Per-example soft-label losses (no class mask) as one select-free expression over whole
  rows, which XLA:CPU fuses into a single kernel with the logsumexp and the z-loss. float32
  and float64 logits take the logsumexp in one pass with rows outside its range poisoned to
  -inf (11% faster than with the max pass); 16-bit logits keep the max pass, which reads half
  the bytes. Callers recompute non-finite results."""
  acc = R.acc_dtype(z.dtype)
  if z.dtype.itemsize > 2:
    m = jnp.zeros(z.shape[:1], acc)
    r = _poison_below_range(jnp.log(jnp.sum(jnp.exp(z.astype(acc)), axis=-1)))
  else:
    # Max-shifted without shifted_parts' select for a +inf max (a select here cost the
    # kernel its fusion: bfloat16 [8192, 50304] 206 -> 1,590 ms); a +inf logit makes the
    # loss non-finite, and the caller's exact recomputation gives NaN.
    m = jnp.max(z, axis=-1).astype(acc)
    m = jnp.where(jnp.isfinite(m), m, 0)
    r = jnp.log(jnp.sum(jnp.exp(z.astype(acc) - m[:, None]), axis=-1))
  t = R.soft_target(y, valid, w, eps, None, acc)
  per = jnp.sum(t * ((m + r)[:, None] - z.astype(acc)), axis=-1)
  if zl is None:
    return per
  return per + zl * (m + r) ** 2 * (1 if valid is None else valid)


def soft_ce_loss(zm, y, valid, w, eps, cmask, zl):
  """Per-example soft-label losses without the logsumexp parts (no gradient): one fused
  kernel for rows of at most ``FAST_ROW`` classes, recomputed by ``soft_ce`` where any loss
  is non-finite (it also gives a true +inf) or below 0.5 (its sharp form)."""
  if cmask is not None or row_split(zm.shape[-1], zm) > 1 or explicitly_sharded(zm):
    return soft_ce(zm, y, valid, w, eps, cmask, zl)[0]
  per = _soft_in_one_kernel(zm, y, valid, w, eps, zl)
  small = _kept(per < R._SMALL_LOSS, valid)
  return jax.lax.cond(jnp.all(jnp.isfinite(per)) & ~jnp.any(small), lambda: per,
                      lambda: soft_ce(zm, y, valid, w, eps, cmask, zl)[0])


def soft_ce_total(zm, y, valid, w, eps, cmask, zl):
  """sum_i loss_i (no gradient). The logsumexp, cross term and sum over examples form one
  select-free expression that XLA:CPU compiles into one vectorised kernel ending in the
  scalar (1.2x faster than the per-example forward at V=50304). A non-finite total is
  recomputed exactly."""
  if cmask is not None or explicitly_sharded(zm):
    return jnp.sum(soft_ce(zm, y, valid, w, eps, cmask, zl)[0])
  total = jnp.sum(_soft_in_one_kernel(zm, y, valid, w, eps, zl))
  # A total below 0.5 per row may hold rows whose tiny losses round at the scale of their
  # logsumexp (``soft_ce``): then the per-row form.
  kept = zm.shape[0] if valid is None else jnp.sum(valid)
  return jax.lax.cond(jnp.isfinite(total) & (total >= R._SMALL_LOSS * kept),
                      lambda: total,
                      lambda: jnp.sum(soft_ce(zm, y, valid, w, eps, cmask, zl)[0]))


# ------------------------------------------------------------------------- sigmoid BCE


def bce_total(z, y, pw, keep):
  """Sum of the elementwise BCE over kept entries. The fast form has no select (5x on a
  fused reduction) and is exact for finite z; a non-finite total (infinite logits, or NaN/inf
  in masked-out entries) is recomputed with the limits at ±inf."""
  up = lambda x: x.astype(R.acc_dtype(x.dtype))
  fast = R.bce_terms(up(z), up(y), pw)
  total = jnp.sum(fast if keep is None else fast * keep)
  # The fallback converts the raw inputs itself: a converted array handed to a cond branch
  # would be materialised.
  return jax.lax.cond(jnp.isfinite(total), lambda: total,
                      lambda: jnp.sum(R.bce(up(z), up(y), pw), where=keep))
