"""Reference implementations: each quantity once, in plain JAX, exact and masked.

These are the forms the docstrings' formulas state. They run on every platform that has no
faster implementation (``jxent/_platform.py``), and the tests compare every faster one with
them. Logits come as a ``[N, C]`` view; ``valid`` ``[N]`` drops examples, ``cmask``
``[N, C]`` removes classes (their logits count as ``-inf``). Accumulation is in float32 for
16-bit inputs and float64 for float64.

The logsumexp of a row is kept as two parts, ``lse = m + r`` with ``m`` the row max (a
constant shift, without derivative) and ``r = log(sum(exp(z - m)))``. Losses are formed from
``r`` and the exact differences ``m - z_c``, so that a common logit offset (logits near
``1e4``) costs no accuracy: ``lse - z_y`` rounded at the magnitude of ``lse`` would.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jxent._platform import explicitly_sharded

Array = jax.Array


def take_weights(w: Array, y: Array) -> Array:
  """``w[y]``; for labels laid out over an explicit mesh axis the result keeps their layout."""
  if explicitly_sharded(y):
    return w.at[y].get(out_sharding=jax.typeof(y).sharding)
  return w[y]


def acc_dtype(dtype) -> jnp.dtype:
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def masked_mul(a: Array, b: Array) -> Array:
  """a * b, but 0 wherever a == 0 (so 0 * inf is 0, not NaN)."""
  return jnp.where(a != 0, a * b, 0)


def apply_class_mask(z: Array, cmask: Array | None) -> Array:
  return z if cmask is None else jnp.where(cmask, z, -jnp.inf)


def lse_parts(z: Array) -> tuple[Array, Array]:
  """``(m, r)`` per row with ``logsumexp(z) = m + r``: m the row max (0 where it is not
  finite), r the log-sum-exp of ``z - m``. A row of ``-inf`` gives ``r = -inf``; a NaN or a
  ``+inf`` anywhere in a row gives ``r = NaN`` (no finite logits give such a distribution).
  r keeps its relative accuracy where it is small (``sharpen``).
  """
  acc = acc_dtype(z.dtype)
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1)).astype(acc)
  return finish_parts(z, m, jnp.sum, sharp=True)


# Below this (< log 2) r and a label's loss take the forms that keep their relative accuracy.
_SMALL_LOSS = 0.5


def sharpen(r: Array, rest: Array) -> Array:
  """``r = log(s)``, ``s = sum_c exp(z_c - m)``, as ``log1p(rest)`` where it is in
  ``[0, 0.5)``; ``rest`` is the sum without the terms at the max. There the max is unique
  (two terms of 1 make r >= log 2), so s = 1 + rest exactly, while ``1 + rest`` rounds to 1
  and r to 0 once rest is below float resolution (a nearly one-hot row: float32 loses a
  confident prediction's loss of 1e-8 that way)."""
  return same_value_where((r >= 0) & (r < _SMALL_LOSS), jnp.log1p(rest), r)


@jax.custom_jvp
def same_value_where(cond: Array, alt: Array, x: Array) -> Array:
  """``where(cond, alt, x)`` where ``alt`` is another form of the same value as ``x``, to better
  relative accuracy (``sharpen``, ``label_term``): differentiated as ``x`` (to every order),
  so that autodiff does not go through ``alt``'s terms, which would cost a second pass over
  the logits and keep [N, C] buffers for it."""
  return jnp.where(cond, alt, x)


@same_value_where.defjvp
def _same_value_where_jvp(primals, tangents):
  cond, alt, x = primals
  return same_value_where(cond, alt, x), tangents[2]


def finish_parts(z: Array, m: Array, row_sum, sharp: bool = False) -> tuple[Array, Array]:
  """``(m, r)`` from the raw row max: the shift made finite, r NaN for a ``+inf`` max;
  ``sharp``: r to relative accuracy where it is small (``sharpen``; one more masked sum)."""
  pos_inf = m == jnp.inf
  m = jnp.where(jnp.isfinite(m), m, 0)
  d = z.astype(m.dtype) - m[:, None]
  e = jnp.exp(d)
  r = jnp.log(row_sum(e, axis=-1))
  if sharp:  # a NaN d keeps its NaN term: the row stays NaN
    r = sharpen(r, row_sum(jnp.where(d == 0, 0, e), axis=-1))
  return m, jnp.where(pos_inf, jnp.nan, r)


def softmax_from_parts(z: Array, m: Array, r: Array) -> Array:
  """softmax(z) = exp(z - m - r) in the accumulation dtype; 0 on a row without mass."""
  r = jnp.where(jnp.isfinite(r), r, 0)
  return jnp.exp((z.astype(m.dtype) - m[:, None]) - r[:, None])


# ---------------------------------------------------------------- softmax cross-entropy


def int_target_parts(y, valid, w, eps, cmask, num_classes: int, acc):
  """Target ``t_ic = a_i [c == y_i] + s_i v_ic`` as ``(a [N], s [N] | None, v)`` with v None
  (all ones), ``[C]`` or ``[N, C]``. Smoothing spreads over the classes a class mask keeps."""
  a = jnp.ones(y.shape, acc) if valid is None else valid.astype(acc)
  if w is not None:
    a = a * take_weights(w.astype(acc), y)
  if eps is None:
    return a, None, None
  a = a * (1 - eps)
  v = None if w is None else w.astype(acc)
  if cmask is None:
    c_eff = jnp.asarray(num_classes, acc)
  else:
    v = cmask.astype(acc) if v is None else v[None, :] * cmask
    c_eff = jnp.maximum(jnp.sum(cmask, axis=-1), 1).astype(acc)
  s = eps / c_eff * (jnp.ones(y.shape, acc) if valid is None else valid.astype(acc))
  return a, s, v


def v_sum(v, num_classes: int, acc):
  if v is None:
    return jnp.asarray(num_classes, acc)
  return jnp.sum(v, axis=-1) if v.ndim == 2 else jnp.sum(v)


def label_gap(zm: Array, y: Array, m: Array) -> Array:
  """``m - z_y`` per row (``+inf`` where the label's logit is masked)."""
  z_y = jnp.take_along_axis(zm, y[:, None], axis=-1)[:, 0]
  return m - z_y.astype(m.dtype)


def label_term(r: Array, gap_y: Array, tail: Array | None) -> Array:
  """``-log p_y = r + (m - z_y)`` per row. Where that is small and ``r`` comes from a form
  without the max (XLA:CPU's one-pass logsumexp: m = 0, r = lse), ``r - z_y`` cancels and
  rounds a confident prediction's loss of 1e-8 to 0; there it is ``log1p(tail)``,
  ``tail = sum_{c != y} exp(z_c - z_y)``, the same value to float resolution relative to
  itself. A loss below log 2 puts the label strictly above every other logit (p_y > 1/2).
  ``tail`` None: the plain sum (exact where r is sharp, ``sharpen``, and m the max: z_y = m
  there)."""
  plain = r + gap_y
  if tail is None:
    return plain
  small = plain < _SMALL_LOSS  # False for NaN and +inf: those stay as they are
  return same_value_where(small, jnp.log1p(tail), plain)


def frac_sum(e: Array) -> Array:
  """``sum_c frac(e_c)`` per row of exponentials at most 1, taken relative to one entry of the
  row (the max: ``_cpu.sharp_parts``; the label: ``label_tail``): the sum without that
  entry's own term exp(0) = 1 (no fractional part; every other term is below 1, and where
  one rounds to 1 the row's loss is at least log 2 and the sum is not used). Arithmetic only
  (no select, which XLA:CPU's fused reductions pay for)."""
  return jnp.sum(e - jnp.floor(e), axis=-1)


def label_tail(z: Array, z_y: Array, slack: float = 0.0) -> Array:
  """``sum_{c != y} exp(z_c - z_y)`` per row where the label is strictly above every other
  logit, the only rows that use it (``label_term``), as ``sum_c frac(exp(min(z_c - z_y, 0)))``:
  the label's own term exp(0) = 1 has no fractional part, every other term is below 1.
  Relative to the label's logit, so blocks of classes add up with no rescaling; arithmetic
  only (no select, which XLA:CPU's fused reductions pay for).

  ``slack``: ``z_y`` is a copy computed apart (the fused loss's ``h . w_y`` beside the
  block's product), which rounds differently from the row's own entry; were that entry
  below it, its term would be nearly 1 and enter the sum. The terms are then taken relative
  to ``z_y - slack`` (the label's entry, within slack of z_y, gives exp(0) = 1) and the sum
  scaled back by ``exp(-slack)``, exactly. A class within slack of the label drops out as
  well, but then ``p_y <= 1 / (1 + exp(-slack))``, below ``exp(-0.5)`` for slack up to 0.45:
  the loss is above 0.5 and the tail not used."""
  # min(z, z_y) - z_y rather than min(z - z_y, 0): XLA:CPU materialises the broadcast 0 as
  # a block-sized buffer.
  shift = (z_y - slack)[:, None]
  e = jnp.exp(jnp.minimum(z, shift) - shift)
  tail = frac_sum(e)
  return tail if slack == 0 else tail * math.exp(-slack)


# The slack of a label logit computed apart (``label_tail``): far above any rounding of a
# logit, and small enough that no row using the tail has another class that close.
LABEL_SLACK = 0.25


def split_labels(y: Array, valid: Array | None, num_classes: int):
  """``(y clipped into [0, C), bad [N])``: bad marks kept labels outside ``[0, C)``, whose
  loss and gradient row are NaN (no class to take the loss of)."""
  inside = (y >= 0) & (y < num_classes)
  bad = ~inside if valid is None else valid & ~inside
  return jnp.clip(y, 0, num_classes - 1), bad


def poison_rows(x: Array, bad: Array) -> Array:
  """``x`` with the rows ``bad`` marks set to NaN ([N] or [N, C]). An [N, C] array gets an
  added [N] column of 0 or NaN, not a select against a broadcast constant (which XLA:CPU
  materialises, and which costs a fused kernel its fusion)."""
  if x.ndim == 1:
    return jnp.where(bad, jnp.nan, x)
  return x + jnp.where(bad, jnp.nan, 0).astype(x.dtype)[:, None]


def int_loss_from_parts(zm, y, valid, w, eps, cmask, zl, m, r, gap_y=None, tail=None):
  """Integer-label loss per row from the logsumexp parts:
  ``a (r + m - z_y) + s (sum_c v_c r + sum_c v_c (m - z_c)) + zl lse^2`` on kept rows; NaN
  for a kept label outside ``[0, C)``; with ``tail`` (``_cpu.label_tail``) the label's term keeps
  its relative accuracy where it is tiny (``label_term``)."""
  n, c = zm.shape
  acc = m.dtype
  y, bad = split_labels(y, valid, c)
  a, s, v = int_target_parts(y, valid, w, eps, cmask, c, acc)
  if gap_y is None:
    gap_y = label_gap(zm, y, m)
  loss = masked_mul(a, label_term(r, gap_y, tail))
  if s is not None:
    # s sum_c v_c (m - z_c) as 2 sum_c (s v_c) (m/2 - z_c/2): the halves cannot overflow where
    # the loss itself is finite (logits near ±3e38).
    sv = s[:, None] if v is None else s[:, None] * v
    half = 0.5 * m[:, None] - 0.5 * zm.astype(acc)
    vd = 2 * jnp.sum(masked_mul(jnp.broadcast_to(sv, half.shape), half), axis=-1)
    loss = loss + masked_mul(s * v_sum(v, c, acc), r) + vd
  return poison_rows(add_z_loss(loss, zl, valid, m, r), bad)


def add_z_loss(loss, zl, valid, m, r):
  if zl is None:
    return loss
  lse = m + r
  term = masked_mul(jnp.broadcast_to(zl, lse.shape).astype(lse.dtype), lse * lse)
  return loss + (term if valid is None else jnp.where(valid, term, 0))


def int_lse_parts(z: Array, y: Array) -> tuple[Array, Array, Array, Array]:
  """``(m, r, gap_y, tail)`` of rows with labels ``y`` (in range): ``lse_parts``'s m and r
  (not sharpened), ``m - z_y`` and ``tail = sum_{c != y} exp(z_c - m)``, from one sum
  (``s = exp(z_y - m) + tail``). Where the label's loss ``r + m - z_y`` is below log 2 the
  label is the row's unique max, so ``tail`` is the sum of ``label_term`` that keeps the loss
  to relative accuracy: the sharp loss from one reduction, not ``lse_parts``'s two."""
  acc = acc_dtype(z.dtype)
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1)).astype(acc)
  pos_inf = m == jnp.inf
  m = jnp.where(jnp.isfinite(m), m, 0)
  gap_y = label_gap(z, y, m)
  e = jnp.exp(z.astype(acc) - m[:, None])
  col = jax.lax.broadcasted_iota(y.dtype, z.shape, z.ndim - 1)
  tail = jnp.sum(jnp.where(col == y[:, None], 0, e), axis=-1)
  r = jnp.log(jnp.exp(-gap_y) + tail)  # a NaN in the row is in one of the two terms
  return m, jnp.where(pos_inf, jnp.nan, r), gap_y, tail


def int_ce(zm, y, valid, w, eps, cmask, zl):
  """``(loss, m, r)`` for integer labels; ``zm`` has the class mask applied already."""
  m, r, gap_y, tail = int_lse_parts(zm, split_labels(y, valid, zm.shape[-1])[0])
  loss = int_loss_from_parts(zm, y, valid, w, eps, cmask, zl, m, r, gap_y=gap_y, tail=tail)
  return loss, m, r


def soft_target(y, valid, w, eps, cmask, acc):
  """``t = ((1 - eps) y + eps / C') w`` on kept rows (C' the classes a class mask keeps)."""
  t = y.astype(acc)
  if eps is not None:
    if cmask is None:
      t = (1 - eps) * t + eps / y.shape[-1]
    else:
      c_eff = jnp.maximum(jnp.sum(cmask, axis=-1, keepdims=True), 1).astype(acc)
      t = (1 - eps) * t + eps / c_eff * cmask
  if w is not None:
    t = t * w.astype(acc)[None, :]
  if valid is not None:
    t = t * valid[:, None]
  return t


def soft_loss_from_parts(zm, y, valid, w, eps, cmask, zl, m, r):
  """``sum_c t_c (r + m - z_c) + zl lse^2``; terms with ``t_c = 0`` are 0 whatever z_c is."""
  t = soft_target(y, valid, w, eps, cmask, m.dtype)
  half = 0.5 * m[:, None] - 0.5 * zm.astype(m.dtype)  # (m - z) / 2: no overflow at ±3e38
  loss = masked_mul(jnp.sum(t, axis=-1), r) + 2 * jnp.sum(masked_mul(t, half), axis=-1)
  return add_z_loss(loss, zl, valid, m, r)


def soft_ce(zm, y, valid, w, eps, cmask, zl):
  m, r = lse_parts(zm)
  return soft_loss_from_parts(zm, y, valid, w, eps, cmask, zl, m, r), m, r


# ------------------------------------------------------------------------- sigmoid BCE


def softplus(z: Array) -> Array:
  """log(1 + e^z) = max(z, 0) + log1p(e^-|z|): exact at ±inf."""
  return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def label_poison(y: Array) -> Array:
  """0 for a label in [0, 1], NaN outside it (or for NaN): ``s - s`` with
  ``s = sqrt(y - y^2)``, since ``y - y^2 >= 0`` exactly on [0, 1]. Arithmetic only and with
  no constant: a select or clamp in XLA:CPU's fused reductions costs their vectorisation,
  and a broadcast constant shared by two passes is materialised."""
  s = jnp.sqrt(y - y * y)
  return s - s


def bce_terms(z, y, pw):
  """``pw y softplus(-z) + (1 - y) softplus(z)`` for finite z, as
  ``pw y (relu(-z) + l) + (1 - y) (relu(z) + l)`` with ``l = log1p(e^-|z|)``: both terms are
  non-negative, so the loss keeps its relative accuracy where it is tiny (at z = 16, y = 1
  it is l = 1.1e-7; ``softplus(z) - y z`` would round it to 0 in float32)."""
  tail = jnp.log1p(jnp.exp(-jnp.abs(z)))
  pos = jnp.maximum(-z, 0) + tail
  if pw is not None:
    pos = pw * pos
  neg = jnp.maximum(z, 0) + tail
  # (neg - y neg) rather than (1 - y) neg: the same value (exactly 0 at y = 1) without an
  # [N, C] constant 1, which XLA:CPU shares between passes and materialises. A label outside
  # [0, 1] gives NaN.
  return y * pos + (neg - y * neg) + label_poison(y)


def bce(z, y, pw):
  """Elementwise BCE from logits (``bce_terms``) with the limits at z = ±inf (0 or +inf)."""
  loss = bce_terms(z, y, pw)
  at_inf = jnp.where(z > 0, jnp.where(y == 1, 0.0, jnp.inf), jnp.where(y == 0, 0.0, jnp.inf))
  return jnp.where(jnp.isinf(z), at_inf.astype(loss.dtype) + label_poison(y), loss)
