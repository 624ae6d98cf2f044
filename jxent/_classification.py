"""Classification losses with exact, hand-written gradients.

The softmax cross-entropy kernels are ``jax.custom_vjp`` functions on a
``[N, C]`` view of the logits. Their backward pass keeps only the inputs and
the per-example logsumexp ``[N]`` as residuals and writes the gradient in one
elementwise pass::

    d loss_i / d z_ic = (sum_c t_ic + 2 z_loss lse_i) softmax(z_i)_c - t_ic

where ``t`` is the (smoothed, weighted, masked) target. Without class weights
or z-loss this is exactly ``softmax(z) - y``. Sigmoid BCE's gradient is
``sigmoid(z) - y`` (``sigmoid(z) (1 + (pw - 1) y) - pw y`` with ``pos_weight``).

Inputs in bfloat16/float16 are accumulated in float32; losses come back in
float32 and gradients in the dtype of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jxent import _checks
from jxent._information import _xlogy

Array = jax.Array


# --------------------------------------------------------------------------- helpers


# XLA:CPU hands fused exp-reductions to YNNPACK, which is fast (~0.2 ns/element) for rows of at
# most 32768 entries and about 7x slower above that (jax 0.10; benchmarks/RESULTS.md). For longer
# rows jxent reduces ``[N * k, C / k]`` pieces and combines the k partial results per row.
_CPU_FAST_ROW = 32768


def _explicitly_sharded(x: Array) -> bool:
  """True for arrays laid out over an explicit mesh axis, which a free reshape may not cut."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and any(p is not None for p in spec)


def _row_split(num_classes: int, x: Array | None = None) -> int:
  """The number k of equal pieces to cut a row into on CPU (1: no split)."""
  if num_classes <= _CPU_FAST_ROW or jax.default_backend() != "cpu":
    return 1
  if x is not None and _explicitly_sharded(x):
    return 1
  for k in range(2, num_classes // 64 + 1):
    if num_classes % k == 0 and num_classes // k <= _CPU_FAST_ROW:
      return k
  return 1


def _split_rows(z: Array, k: int) -> Array:
  """``[N, C]`` -> ``[N * k, C / k]``. A 16-bit array is reshaped as its raw bits: otherwise
  XLA:CPU moves the float32 conversion that follows in front of the reshape, converts back
  for the max, and the fused kernel ran 4.7x slower (bfloat16 [8192, 50304]: 681 -> 143 ms)."""
  n, c = z.shape
  if z.dtype.itemsize != 2:
    return z.reshape(n * k, c // k)
  bits = jax.lax.bitcast_convert_type(z, jnp.uint16).reshape(n * k, c // k)
  return jax.lax.bitcast_convert_type(bits, z.dtype)


def _cross_term(t: Array, z: Array, lse: Array) -> Array:
  """sum_c t_c (lse - z_c) per row. Long rows on CPU are cut into ``[N * k, C / k]``
  pieces (see ``_CPU_FAST_ROW``): at N=8192, C=50304 that measured 8x faster."""
  n, c = z.shape
  k = _row_split(c, z)
  z = _unshared(z)  # its own float32 conversion, not the logsumexp's (see _unshared)
  if k == 1:
    return jnp.sum(t * (lse[:, None] - z.astype(lse.dtype)), axis=-1)
  return _cross_pieces(t.reshape(n * k, c // k), _split_rows(z, k).astype(lse.dtype), lse, k)


def _cross_pieces(tp: Array, zp: Array, lse: Array, k: int) -> Array:
  """sum_c t_c (lse - z_c) per row, from ``[N * k, C / k]`` pieces of t and (float) z."""
  part = jnp.sum(tp * (jnp.repeat(lse, k)[:, None] - zp), axis=-1)
  return jnp.sum(part.reshape(-1, k), axis=-1)


def _soft_cross_term(z, y, valid, w, eps, lse) -> Array:
  """sum_c t_c (lse - z_c) per row with t the soft target (see ``_soft_target``; no class
  mask).

  Long 16-bit rows on CPU are cut into pieces before either array is converted, behind an
  optimization barrier: XLA otherwise folds the cut into the float32 conversion, and the
  pass over the pieces ran 10x slower (bfloat16 [8192, 50304]: 1,161 -> 115 ms). Class
  weights take the general path."""
  n, c = z.shape
  k = _row_split(c, z)
  if k == 1 or z.dtype.itemsize != 2 or w is not None:
    return _cross_term(_soft_target(y, valid, w, eps, None), z, lse)
  zp, yp = jax.lax.optimization_barrier((z.reshape(n * k, c // k), y.reshape(n * k, c // k)))
  tp = yp.astype(lse.dtype)
  if eps is not None:
    tp = (1 - eps) * tp + eps / c
  if valid is not None:
    tp = tp * jnp.repeat(valid, k)[:, None]
  return _cross_pieces(tp, zp.astype(lse.dtype), lse, k)


def _logsumexp(z: Array, cmask: Array | None = None) -> Array:
  """Row logsumexp of a ``[N, C]`` array (classes outside ``cmask`` count as -inf),
  accumulated in float32 (float64 for float64).

  On CPU it takes one pass: ``log(sum(exp(z)))`` with no shift, accepted when every row's
  sum is finite and at least sqrt(tiny) (in float32: logits below about 88 and a logsumexp
  above about -43). Then the unshifted sum is as accurate as the shifted one (it even skips
  the rounding of z - m), and the terms it flushes to zero weigh less than C * 1e-19 of it.
  Otherwise the whole batch is recomputed the usual way, ``m + log(sum(exp(z - m)))`` with
  m the row max, which is also what other backends get (their compilers fuse the max into
  the exp-sum kernel; XLA:CPU makes it a separate full read of the logits). The integer-label
  float32 forward at [4096, 32768] went from 58 to 32 ms on a 2-core CPU (an A/B run). Under
  ``vmap`` the ``cond`` becomes a select and both forms are computed (correct, slower). A
  row whose logits are all -inf has no distribution and gets NaN (harmless where the example
  is ignored or masked out).
  """
  n, c = z.shape
  acc = _acc_dtype(z.dtype)
  k = _row_split(c, z)
  shifted = lambda: _shifted_logsumexp(_apply_class_mask(z, cmask), k, acc)
  if not _one_pass_here(z):
    return shifted()
  if k == 1:
    s = jnp.sum(jnp.exp(_apply_class_mask(z, cmask).astype(acc)), axis=-1)
  else:
    # The barrier keeps XLA from merging the two sums back into one over the long row.
    pieces = jax.lax.optimization_barrier(_split_rows(z, k))
    if cmask is not None:
      pieces = jnp.where(cmask.reshape(n * k, c // k), pieces, -jnp.inf)
    s = jnp.sum(jnp.sum(jnp.exp(pieces.astype(acc)), axis=-1).reshape(n, k), axis=-1)
  in_range = jnp.all((s >= _one_pass_floor(acc)) & (s <= jnp.finfo(acc).max))  # NaN: False
  return jax.lax.cond(in_range, lambda: jnp.log(s), shifted)


def _one_pass_here(z: Array) -> bool:
  """Whether the logsumexp of ``z`` skips the max pass: on CPU, unless ``z`` is laid out
  over a mesh axis (other compilers fuse the max into the exp-sum kernel anyway)."""
  return jax.default_backend() == "cpu" and not _explicitly_sharded(z)


def _one_pass_floor(acc) -> float:
  """The least row sum of exp(z) that the one-pass logsumexp accepts: sqrt(tiny)."""
  return float(np.sqrt(np.finfo(acc).tiny))


def _shifted_logsumexp(z: Array, k: int, acc) -> Array:
  """``m + log(sum(exp(z - m)))`` per row with m the row max, from k pieces per row.

  Written so that XLA:CPU fuses it into vectorised kernels: the max runs in the input dtype
  (exact), the float32 conversion happens inside the exp-sum pass, and there is no select.
  """
  n, c = z.shape
  if k == 1:
    m = jax.lax.stop_gradient(jnp.max(z, axis=-1)).astype(acc)
    return m + jnp.log(jnp.sum(jnp.exp(z.astype(acc) - m[:, None]), axis=-1))
  pieces = _split_rows(z, k)
  m = jnp.max(jnp.max(pieces, axis=-1).reshape(n, k), axis=-1).astype(acc)
  s = jnp.sum(jnp.exp(pieces.astype(acc) - jnp.repeat(m, k)[:, None]), axis=-1)
  return m + jnp.log(jnp.sum(s.reshape(n, k), axis=-1))


def _acc_dtype(dtype) -> jnp.dtype:
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _unshared(x: Array) -> Array:
  """``x`` behind an optimization barrier if it is 16-bit; used on a backward pass's inputs.

  Otherwise XLA:CPU shares one float32 conversion of ``x`` between the forward's fused
  kernel and the backward's, materialises it, and the forward kernel no longer fuses the
  conversion: bfloat16 [4096, 32768] integer-label forward+backward took 425 ms against
  282 ms in float32, and 178 ms with the barrier."""
  return jax.lax.optimization_barrier(x) if x.dtype.itemsize == 2 else x


def _softmax_from_lse(z: Array, lse: Array) -> Array:
  """softmax(z) from its logsumexp, in the dtype of ``lse`` (the backward passes' kernel)."""
  lse = jnp.where(jnp.isfinite(lse), lse, 0)
  return jnp.exp(_unshared(z).astype(lse.dtype) - lse[:, None])


def _masked_mul(a: Array, b: Array) -> Array:
  """a * b, but 0 wherever a == 0 (so 0 * inf is 0, not NaN)."""
  return jnp.where(a != 0, a * b, 0)


def _add_z_loss(loss, zl, valid, lse):
  """loss + z_loss * lse^2 on kept examples (the PaLM / T5X auxiliary loss)."""
  if zl is None:
    return loss
  zl_i = zl if valid is None else zl * valid
  return loss + _masked_mul(zl_i, lse * lse)


def _z_loss_slope(zl, valid, lse):
  """d(z_loss * lse^2)/d lse on kept examples; multiplies softmax(z) in the gradient."""
  zl_i = zl if valid is None else zl * valid
  return 2 * zl_i * jnp.where(jnp.isfinite(lse), lse, 0)


def _apply_class_mask(z: Array, cmask: Array | None) -> Array:
  return z if cmask is None else jnp.where(cmask, z, -jnp.inf)


def _flatten_logits(logits, axis: int, name: str = "logits"):
  """Checks ``logits`` and returns a ``[N, C]`` view plus the batch shape."""
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be floating point, got dtype {logits.dtype} with shape {logits.shape}."
    )
  if logits.ndim == 0:
    raise ValueError(f"{name} must have at least one dimension (the classes), got a scalar.")
  axis = _checks.canonical_axis(axis, logits.ndim, name)
  if axis != logits.ndim - 1:
    logits = jnp.moveaxis(logits, axis, -1)
  batch_shape = logits.shape[:-1]
  return logits.reshape(-1, logits.shape[-1]), batch_shape, axis


def _move_class_axis(x: Array, axis: int) -> Array:
  return x if axis == x.ndim - 1 else jnp.moveaxis(x, axis, -1)


def _split_where(where, logits_shape, batch_shape, axis: int):
  """Interprets ``where`` by rank: per-example mask or per-class mask.

  Returns ``(example_mask [N] | None, class_mask [N, C] | None)``.
  """
  if where is None:
    return None, None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
  ndim = len(logits_shape)
  if where.ndim == ndim - 1:
    try:
      where = jnp.broadcast_to(where, batch_shape)
    except ValueError as e:
      raise ValueError(
          f"where with rank {where.ndim} masks examples and must broadcast to the per-example "
          f"shape {batch_shape}, got where.shape={where.shape}."
      ) from e
    return where.reshape(-1), None
  if where.ndim == ndim:
    try:
      where = jnp.broadcast_to(where, logits_shape)
    except ValueError as e:
      raise ValueError(
          f"where with rank {where.ndim} masks classes and must broadcast to logits.shape="
          f"{logits_shape}, got where.shape={where.shape}."
      ) from e
    where = _move_class_axis(where, axis)
    return None, where.reshape(-1, where.shape[-1])
  raise ValueError(
      f"where must have the per-example shape {batch_shape} (masks examples) or the logits' "
      f"shape {logits_shape} (masks classes), got where.shape={where.shape}."
  )


def _class_weights(class_weights, num_classes: int):
  if class_weights is None:
    return None
  w = _checks.floating(class_weights, "class_weights")
  if w.shape != (num_classes,):
    raise ValueError(
        f"class_weights must have shape ({num_classes},) (one weight per class), got "
        f"class_weights.shape={w.shape}."
    )
  return w.astype(jnp.float32) if w.dtype != jnp.float64 else w


def _smoothing(label_smoothing):
  _checks.concrete_scalar(label_smoothing, "label_smoothing", 0.0, 1.0)
  if isinstance(label_smoothing, (int, float)) and label_smoothing == 0:
    return None
  return jnp.asarray(label_smoothing, jnp.float32)


def _z_loss(z_loss):
  _checks.concrete_scalar(z_loss, "z_loss", 0.0, float("inf"))
  if isinstance(z_loss, (int, float)) and z_loss == 0:
    return None
  return jnp.asarray(z_loss, jnp.float32)


def _finish(losses: Array, batch_shape, reduction: str, denominator: Array) -> Array:
  if reduction == "none":
    return losses.reshape(batch_shape)
  return _checks.reduce(losses, reduction, denominator)


# ------------------------------------------------------------------ integer-label kernel


def _take_label_logit(z: Array, y: Array) -> Array:
  """z[i, y_i]. For 16-bit logits the gather runs on the raw bits: a plain gather lets XLA
  share one float32 conversion of all of ``z`` between the gather and the exp-sum pass and
  materialise it (several times slower on XLA:CPU)."""
  if z.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(z, jnp.uint16)
    picked = jnp.take_along_axis(bits, y[:, None], axis=-1)[:, 0]
    return jax.lax.bitcast_convert_type(picked, z.dtype)
  return jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]


def _int_target_parts(y, valid, w, eps, cmask, num_classes):
  """Target t_ic = a_i [c == y_i] + s_i v_ic, as (a [N], s [N] | None, v [C]|[N,C] | None)."""
  a = jnp.ones(y.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
  if w is not None:
    a = a * w[y]
  s = None
  v = w
  if cmask is not None:
    v = cmask.astype(jnp.float32) if w is None else w[None, :] * cmask
  if eps is not None:
    a = a * (1 - eps)
    if cmask is None:
      c_eff = jnp.float32(num_classes)
    else:
      c_eff = jnp.maximum(jnp.sum(cmask, axis=-1), 1).astype(jnp.float32)
    s = eps / c_eff * (jnp.ones(y.shape, jnp.float32) if valid is None else valid)
  return a, s, v


@jax.custom_vjp
def _int_ce(z, y, valid, w, eps, cmask, zl):
  return _int_ce_fwd(z, y, valid, w, eps, cmask, zl)[0]


def _int_ce_fwd(z, y, valid, w, eps, cmask, zl):
  num_classes = z.shape[-1]
  zm = _apply_class_mask(z, cmask)
  lse = _logsumexp(z, cmask)
  a, s, v = _int_target_parts(y, valid, w, eps, cmask, num_classes)
  z_y = _take_label_logit(zm, y).astype(lse.dtype)
  loss = _masked_mul(a, lse - z_y)
  if s is not None:
    zf = _unshared(zm).astype(lse.dtype)
    if v is None:
      v_sum, vz = jnp.float32(num_classes), jnp.sum(zf, axis=-1)
    else:
      v2 = v if v.ndim == 2 else v[None, :]
      v_sum = jnp.sum(v2, axis=-1)
      vz = jnp.sum(v2 * zf, axis=-1)  # NaN only for v_c = 0 at z_c = -inf: redone masked
      vz = jax.lax.cond(
          jnp.any(jnp.isnan(vz)),
          lambda: jnp.sum(_masked_mul(jnp.broadcast_to(v2, zf.shape), zf), axis=-1),
          lambda: vz,
      )
    loss = loss + _masked_mul(s, v_sum * lse - vz)
  return _add_z_loss(loss, zl, valid, lse), (z, y, valid, w, eps, cmask, zl, lse)


def _int_ce_bwd(res, g):
  z, y, valid, w, eps, cmask, zl, lse = res
  num_classes = z.shape[-1]
  p = _softmax_from_lse(_apply_class_mask(z, cmask), lse)
  a, s, v = _int_target_parts(y, valid, w, eps, cmask, num_classes)
  coef = a
  smooth = 0.0
  if s is not None:
    if v is None:
      coef = coef + s * num_classes
      smooth = s[:, None]
    else:
      v2 = v if v.ndim == 2 else v[None, :]
      coef = coef + s * jnp.sum(v2, axis=-1)
      smooth = s[:, None] * v2
  if zl is not None:
    coef = coef + _z_loss_slope(zl, valid, lse)
  onehot = jnp.arange(num_classes)[None, :] == y[:, None]
  grad = coef[:, None] * p - jnp.where(onehot, a[:, None], 0) - smooth
  grad = (g[:, None] * grad).astype(z.dtype)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)
  return (grad, None, None, zeros(w), zeros(eps), None, zeros(zl))


_int_ce.defvjp(_int_ce_fwd, _int_ce_bwd)


# --------------------------------------------------------------------- soft-label kernel


def _soft_target(y, valid, w, eps, cmask):
  t = y.astype(jnp.float32) if y.dtype != jnp.float64 else y
  if eps is not None:
    if cmask is None:
      t = (1 - eps) * t + eps / y.shape[-1]
    else:
      c_eff = jnp.maximum(jnp.sum(cmask, axis=-1, keepdims=True), 1)
      t = (1 - eps) * t + eps / c_eff
  if w is not None:
    t = t * w[None, :]
  if cmask is not None:
    t = t * cmask
  if valid is not None:
    t = t * valid[:, None]
  return t


@jax.custom_vjp
def _soft_ce(z, y, valid, w, eps, cmask, zl):
  """Per-example soft-label losses. Evaluated on its own (no gradient) with rows of at most
  ``_CPU_FAST_ROW`` classes, one fused kernel (``_soft_ce_in_one_kernel``): the forward
  below hands lse to the backward, and split by a ``cond`` after the logsumexp it measured
  10-20% slower at [4096, 32768]. A class mask goes to the forward directly. Non-finite
  losses (0 * -inf at -inf logits, rows outside the one-pass range, including +inf from an
  overflowing exp-sum) are recomputed by the forward, which also gives a true +inf (target
  mass on a -inf logit)."""
  if _row_split(z.shape[-1], z) > 1 or cmask is not None:
    return _soft_ce_fwd(z, y, valid, w, eps, cmask, zl)[0]
  per = _soft_ce_in_one_kernel(z, y, valid, w, eps, zl)
  return jax.lax.cond(
      jnp.all(jnp.isfinite(per)),
      lambda: per,
      lambda: _soft_ce_fwd(z, y, valid, w, eps, cmask, zl)[0],
  )


def _soft_ce_fwd(z, y, valid, w, eps, cmask, zl):
  zm = _apply_class_mask(z, cmask)
  lse = _logsumexp(z, cmask)
  # sum_c t_c (lse - z_c) with no select in the [N, C] pass, so that XLA:CPU fuses it with the
  # logsumexp into one vectorised kernel (a select there costs 4-7x). It is NaN only where
  # t_c = 0 meets z_c = -inf (0 * inf) or a row has no finite logit; then, and only then,
  # the masked form is computed instead. The fallback closes over the raw inputs only (a
  # converted array passed into a cond branch would be materialised; recomputing lse there
  # keeps lse from becoming a second output of the fused kernel, which costs a pass).
  # A class mask puts t_c = 0 on z_c = -inf by construction, so it takes the masked form
  # directly rather than a NaN pass first.
  if cmask is not None:
    t = _soft_target(y, valid, w, eps, cmask)
    loss = jnp.sum(_masked_mul(t, lse[:, None] - zm.astype(lse.dtype)), axis=-1)
  else:
    loss = _soft_cross_term(z, y, valid, w, eps, lse)
    loss = jax.lax.cond(
        jnp.any(jnp.isnan(loss)),
        lambda: _masked_cross_term(z, y, valid, w, eps),
        lambda: loss,
    )
  return _add_z_loss(loss, zl, valid, lse), (z, y, valid, w, eps, cmask, zl, lse)


def _masked_cross_term(z, y, valid, w, eps):
  """The exact form of ``_cross_term``: terms with t_c = 0 contribute 0 whatever z_c is."""
  lse = _logsumexp(z)
  t = _soft_target(y, valid, w, eps, None)
  return jnp.sum(_masked_mul(t, lse[:, None] - z.astype(lse.dtype)), axis=-1)


def _soft_ce_bwd(res, g):
  z, y, valid, w, eps, cmask, zl, lse = res
  z, y = _unshared(z), _unshared(y)
  zm = _apply_class_mask(z, cmask)
  zf = zm.astype(lse.dtype)
  p = _softmax_from_lse(zm, lse)
  t = _soft_target(y, valid, w, eps, cmask)
  coef = jnp.sum(t, axis=-1)
  if zl is not None:
    coef = coef + _z_loss_slope(zl, valid, lse)
  grad_z = (g[:, None] * (coef[:, None] * p - t)).astype(z.dtype)
  # d loss / d y_c = (1 - eps) w_c (lse - z_c) on kept entries: labels are differentiable,
  # as in optax (e.g. for learned soft targets); XLA drops this under jit when unused.
  dt = jnp.ones_like(t) if w is None else jnp.broadcast_to(w[None, :], t.shape)
  if eps is not None:
    dt = dt * (1 - eps)
  keep = jnp.ones(t.shape, bool)
  if cmask is not None:
    keep = keep & cmask
  if valid is not None:
    keep = keep & valid[:, None]
  grad_y = jnp.where(keep, g[:, None] * dt * (lse[:, None] - zf), 0).astype(y.dtype)
  zeros = lambda x: None if x is None else jnp.zeros_like(x)
  return (grad_z, grad_y, None, zeros(w), zeros(eps), None, zeros(zl))


_soft_ce.defvjp(_soft_ce_fwd, _soft_ce_bwd)


@jax.custom_vjp
def _soft_ce_total(z, y, valid, w, eps, cmask, zl):
  """sum_i loss_i for the "sum"/"mean" reductions.

  Evaluated on its own (no gradient), the logsumexp, the cross term and the sum over
  examples form one select-free expression over whole rows, which XLA:CPU compiles into a
  single vectorised kernel ending in the scalar (what Optax's mean-reduced loss gets; 1.2x
  faster than the per-example forward at V=50304, whose rows are cut into pieces). A
  non-finite total (a row outside the one-pass range, 0 * -inf at -inf logits, or a true
  +inf) is recomputed exactly; a class mask, which always meets 0 * -inf, goes there directly.
  Under differentiation the per-example kernel runs instead: it must hand lse to the
  backward pass, and a kernel with two outputs loses that fusion.
  """
  if cmask is not None:
    return jnp.sum(_soft_ce_fwd(z, y, valid, w, eps, cmask, zl)[0])
  total = jnp.sum(_soft_ce_in_one_kernel(z, y, valid, w, eps, zl))
  return jax.lax.cond(
      jnp.isfinite(total),
      lambda: total,
      lambda: jnp.sum(_soft_ce_fwd(z, y, valid, w, eps, cmask, zl)[0]),
  )


def _soft_ce_in_one_kernel(z, y, valid, w, eps, zl):
  """Per-example losses (no class mask) as one select-free expression over whole rows, which
  XLA:CPU fuses into a single kernel (logsumexp, cross term and z-loss, row tile by row
  tile). On CPU,
  float32 and float64 logits take the logsumexp in one pass (see ``_logsumexp``; 11% faster
  than with the max pass in an A/B at both benchmark sizes) with rows outside its range
  poisoned to -inf (their losses come out non-finite); 16-bit logits keep the max pass,
  which reads half the bytes (dropping it measured no faster). Callers recompute
  non-finite results exactly."""
  acc = _acc_dtype(z.dtype)
  if z.dtype.itemsize > 2 and _one_pass_here(z):
    lse = _poison_below_range(jnp.log(jnp.sum(jnp.exp(z.astype(acc)), axis=-1)))
  else:
    lse = _shifted_logsumexp(z, 1, acc)
  t = _soft_target(y, valid, w, eps, None)
  per = jnp.sum(t * (lse[:, None] - z.astype(acc)), axis=-1)
  return _add_z_loss(per, zl, valid, lse)


def _poison_below_range(lse: Array) -> Array:
  """``lse`` where it is at least log(sqrt(tiny)) (the one-pass range of ``_logsumexp``),
  -inf below it, NaN for NaN. Arithmetic only: a compare or select here cost XLA:CPU the
  fusion of the whole kernel (5x slower at [8192, 50304])."""
  lo = float(np.log(_one_pass_floor(lse.dtype)))
  return lse + (1 - jnp.exp((lo - jnp.minimum(lse, lo)) * 1e30))


def _soft_ce_total_fwd(z, y, valid, w, eps, cmask, zl):
  losses, res = _soft_ce_fwd(z, y, valid, w, eps, cmask, zl)
  return jnp.sum(losses), res


def _soft_ce_total_bwd(res, g):
  n = res[0].shape[0]
  return _soft_ce_bwd(res, jnp.full((n,), g, dtype=res[-1].dtype))


_soft_ce_total.defvjp(_soft_ce_total_fwd, _soft_ce_total_bwd)


# ------------------------------------------------------------------------ public losses


def softmax_cross_entropy(
    logits,
    labels,
    *,
    axis: int = -1,
    where=None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    reduction: str = "none",
) -> Array:
  r"""Softmax cross-entropy with probability (one-hot or soft) labels.

  Per example, with :math:`t = ((1-\varepsilon) y + \varepsilon / C) \odot w`:

  .. math:: \ell = -\sum_c t_c \log \mathrm{softmax}(z)_c + z_{\text{loss}} \cdot
     \mathrm{logsumexp}(z)^2

  and :math:`\partial \ell / \partial z = (\sum_c t_c)\,\mathrm{softmax}(z) - t`
  (plus the z-loss term), computed by a custom VJP: exactly
  ``softmax(z) - y`` in the plain case.

  Args:
    logits: ``[..., C, ...]`` unnormalised log-probabilities, floating point.
      ``-inf`` entries mask classes out.
    labels: probabilities with the shape of ``logits`` (rows summing to one
      along ``axis``). Differentiable, as in Optax.
    axis: the class axis.
    where: boolean mask. With the per-example shape (``logits.ndim - 1``) it
      drops examples: they get loss 0, gradient 0, and leave the mean's
      denominator. With the logits' shape it removes classes from the softmax
      (like Optax's ``where``); smoothing then spreads over the kept classes.
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    class_weights: ``[C]`` per-class weights :math:`w` (as PyTorch's ``weight``).
    z_loss: coefficient of :math:`\mathrm{logsumexp}(z)^2` (PaLM/T5X).
    reduction: ``"none"`` (per-example losses, the batch shape), ``"sum"`` or
      ``"mean"`` (over kept examples, as PyTorch for soft labels; 0 if none).

  Returns:
    Per-example losses (``logits``' shape without ``axis``) or a scalar.
    ``+inf`` where the target puts mass on a class whose logit is ``-inf``
    (e.g. label smoothing over a masked class).

  >>> import jxent
  >>> logits = jnp.log(jnp.array([[0.3, 0.6, 0.1]]))
  >>> jxent.softmax_cross_entropy(logits, jnp.array([[0., 1., 0.]])).round(4)
  Array([0.5108], dtype=float32)
  """
  _checks.reduction(reduction)
  z, batch_shape, axis = _flatten_logits(logits, axis)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    raise TypeError(
        f"labels must be floating-point probabilities with logits' shape {jnp.shape(logits)}, "
        f"got dtype {labels.dtype}; for class ids use "
        "softmax_cross_entropy_with_integer_labels."
    )
  if labels.shape != jnp.shape(logits):
    raise ValueError(
        f"labels must have the same shape as logits, got labels.shape={labels.shape} and "
        f"logits.shape={jnp.shape(logits)}."
    )
  _checks.check_probabilities(labels, axis, "labels")
  y = _move_class_axis(labels, axis).reshape(z.shape)
  valid, cmask = _split_where(where, jnp.shape(logits), batch_shape, axis)
  w = _class_weights(class_weights, z.shape[-1])
  eps = _smoothing(label_smoothing)
  zl = _z_loss(z_loss)
  if reduction == "none":
    return _soft_ce(z, y, valid, w, eps, cmask, zl).reshape(batch_shape)
  total = _soft_ce_total(z, y, valid, w, eps, cmask, zl)
  if reduction == "sum":
    return total
  denom = z.shape[0] if valid is None else jnp.sum(valid)
  return total / jnp.maximum(denom, 1).astype(total.dtype)


def softmax_cross_entropy_with_integer_labels(
    logits,
    labels,
    *,
    axis: int = -1,
    where=None,
    ignore_index: int | None = None,
    label_smoothing=0.0,
    class_weights=None,
    z_loss=0.0,
    reduction: str = "none",
) -> Array:
  r"""Softmax cross-entropy with integer class ids, PyTorch's ``F.cross_entropy`` semantics.

  Per example, with label :math:`y`, weights :math:`w` and smoothing :math:`\varepsilon`:

  .. math:: \ell = (1-\varepsilon) w_y (-\log p_y)
     + \tfrac{\varepsilon}{C}\sum_c w_c (-\log p_c) + z_{\text{loss}}\,\mathrm{lse}(z)^2

  The gradient (custom VJP) is :math:`(\sum_c t_c)\,p - t`; ``softmax(z) - onehot(y)``
  in the plain case. Only the logits, labels and the per-example logsumexp are
  kept for the backward pass.

  Args:
    logits: ``[..., C, ...]`` floating point; ``-inf`` entries mask classes out.
    labels: integer class ids with ``logits``' shape without ``axis`` (so
      ``axis=1`` on ``[N, C, T]`` logits takes ``[N, T]`` labels, as PyTorch).
    axis: the class axis.
    where: boolean mask, per-example shape (drops examples, like
      ``ignore_index``) or the logits' shape (removes classes from the softmax).
    ignore_index: examples whose label equals it get loss 0 and gradient 0 and
      leave the mean's denominator (PyTorch uses -100).
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    class_weights: ``[C]`` weights; ``"none"`` returns weighted per-example
      losses and ``"mean"`` divides by :math:`\sum_i w_{y_i}` over kept examples.
    z_loss: coefficient of :math:`\mathrm{logsumexp}(z)^2`.
    reduction: ``"none"``, ``"sum"`` or ``"mean"``. A mean over no kept
      example is 0 (PyTorch returns NaN).

  Returns:
    Per-example losses or a scalar, float32 for 16-bit logits.

  Labels outside ``[0, C)`` that are not ignored are reported by
  ``checkify.checkify(f, errors=checkify.user_checks)``.

  >>> import jxent
  >>> logits = jnp.log(jnp.array([[0.3, 0.6, 0.1]]))
  >>> jxent.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1])).round(4)
  Array([0.5108], dtype=float32)
  """
  _checks.reduction(reduction)
  z, batch_shape, axis = _flatten_logits(logits, axis)
  labels = _checks.integer(labels, "labels")
  if labels.shape != batch_shape:
    raise ValueError(
        f"labels must have logits' shape without axis {axis}, i.e. {batch_shape}, got "
        f"labels.shape={labels.shape} for logits.shape={jnp.shape(logits)}."
    )
  num_classes = z.shape[-1]
  y = labels.reshape(-1)
  valid, cmask = _split_where(where, jnp.shape(logits), batch_shape, axis)
  if ignore_index is not None:
    keep = y != ignore_index
    valid = keep if valid is None else valid & keep
  in_range = (y >= 0) & (y < num_classes)
  checkify.debug_check(
      jnp.all(in_range | (~valid if valid is not None else False)),
      f"labels out of range [0, {num_classes}) for some kept example.",
  )
  y = jnp.clip(y, 0, num_classes - 1).astype(jnp.int32)
  w = _class_weights(class_weights, num_classes)
  eps = _smoothing(label_smoothing)
  zl = _z_loss(z_loss)
  losses = _int_ce(z, y, valid, w, eps, cmask, zl)
  if w is not None:
    wy = w[y] if valid is None else jnp.where(valid, w[y], 0)
    denom = jnp.sum(wy)
  else:
    denom = None if valid is None else jnp.sum(valid)
  return _finish(losses, batch_shape, reduction, denom)


# ------------------------------------------------------------------------ sigmoid losses


def _softplus(z: Array) -> Array:
  """log(1 + e^z) = max(z, 0) + log1p(e^-|z|): exact at ±inf, and several times faster on
  XLA:CPU than ``jax.nn.softplus`` (whose NaN handling blocks vectorisation)."""
  return jnp.maximum(z, 0) + jnp.log1p(jnp.exp(-jnp.abs(z)))


def _bce_terms(zf, yf, pw, exact: bool):
  """pw y softplus(-z) + (1 - y) softplus(z) = softplus(z) + y ((pw - 1) softplus(z) - pw z).

  The fast form has no select (a select keeps XLA:CPU from vectorising a fused reduction,
  about 5x slower) and no [N, C] constant (a broadcast 1 that XLA shares with the backward's
  sigmoid is materialised, a 4-byte write and read per entry); it is exact for finite z.
  ``exact=True`` adds the limits at z = ±inf (0 or +inf), where the fast form gives NaN.
  """
  sp = _softplus(zf)
  if pw is None:
    loss = sp - yf * zf
  else:
    loss = sp + yf * ((pw - 1) * sp - pw * zf)
  if exact:
    at_inf = jnp.where(zf > 0, jnp.where(yf == 1, 0.0, jnp.inf),
                       jnp.where(yf == 0, 0.0, jnp.inf))
    loss = jnp.where(jnp.isinf(zf), at_inf.astype(loss.dtype), loss)
  return loss


@jax.custom_vjp
def _sigmoid_bce(z, y, pw):
  return _sigmoid_bce_fwd(z, y, pw)[0]


def _sigmoid_bce_fwd(z, y, pw):
  return _bce_terms(_checks.upcast(z), _checks.upcast(y), pw, exact=True), (z, y, pw)


def _bce_grads(z, y, pw, g):
  zf, yf = _checks.upcast(_unshared(z)), _checks.upcast(_unshared(y))
  if pw is None:
    dz = jax.nn.sigmoid(zf) - yf
    dy = -zf
  else:
    dz = jax.nn.sigmoid(zf) * (pw * yf + 1 - yf) - pw * yf
    dy = (pw - 1) * _softplus(zf) - pw * zf
  return (g * dz).astype(z.dtype), (g * dy).astype(y.dtype)


def _sigmoid_bce_bwd(res, g):
  z, y, pw = res
  dz, dy = _bce_grads(z, y, pw, g)
  return dz, dy, None if pw is None else jnp.zeros_like(pw)


_sigmoid_bce.defvjp(_sigmoid_bce_fwd, _sigmoid_bce_bwd)


@jax.custom_vjp
def _sigmoid_bce_sum(z, y, pw, keep):
  """Sum of the elementwise BCE over kept entries, for the "sum"/"mean" reductions."""
  return _sigmoid_bce_sum_fwd(z, y, pw, keep)[0]


def _sigmoid_bce_sum_fwd(z, y, pw, keep):
  fast = _bce_terms(_checks.upcast(z), _checks.upcast(y), pw, exact=False)
  total = jnp.sum(fast if keep is None else fast * keep)
  # Only infinite logits (or masked-out NaN/inf entries) make the fast sum non-finite. The
  # fallback converts the raw inputs itself (a converted array passed in would be materialised).
  total = jax.lax.cond(
      jnp.isfinite(total),
      lambda: total,
      lambda: jnp.sum(_bce_terms(_checks.upcast(z), _checks.upcast(y), pw, exact=True),
                      where=keep),
  )
  return total, (z, y, pw, keep)


def _sigmoid_bce_sum_bwd(res, g):
  z, y, pw, keep = res
  scale = g if keep is None else g * keep
  dz, dy = _bce_grads(z, y, pw, scale)
  return dz, dy, None if pw is None else jnp.zeros_like(pw), None


_sigmoid_bce_sum.defvjp(_sigmoid_bce_sum_fwd, _sigmoid_bce_sum_bwd)


def _elementwise_where(where, shape):
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
  try:
    return jnp.broadcast_to(where, shape)
  except ValueError as e:
    raise ValueError(f"where.shape={where.shape} does not broadcast to {shape}.") from e


def _elementwise_finish(losses, where, reduction):
  if where is not None:
    losses = jnp.where(where, losses, 0)
  return _checks.reduce(losses, reduction, None if where is None else jnp.sum(where))


def _logits_and_targets(logits, labels, name_l="logits", name_t="labels"):
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(f"{name_l} must be floating point, got dtype {logits.dtype}.")
  if not jnp.issubdtype(labels.dtype, jnp.floating):
    labels = labels.astype(jnp.result_type(logits.dtype, jnp.float32))
  _checks.same_shape(logits, labels, name_l, name_t)
  return logits, labels


def sigmoid_binary_cross_entropy(
    logits, labels, *, pos_weight=None, where=None, reduction: str = "none"
) -> Array:
  r"""Sigmoid (binary / multi-label) cross-entropy, elementwise.

  Each entry is an independent Bernoulli node (multi-label, n-hot targets):

  .. math:: \ell = -[\,w_+ y \log\sigma(z) + (1-y)\log(1-\sigma(z))\,]
     = w_+ y\,\mathrm{softplus}(-z) + (1-y)\,\mathrm{softplus}(z)

  and :math:`\partial\ell/\partial z = \sigma(z) - y` for :math:`w_+ = 1`
  (custom VJP). Stable for any logit, ``±1e4`` and ``±inf`` included
  (``z = -inf, y = 0`` gives 0; ``z = -inf, y = 1`` gives ``+inf``).

  Args:
    logits: ``[..., C]`` floating point.
    labels: targets in [0, 1] with the same shape (integer 0/1 accepted).
    pos_weight: PyTorch's ``pos_weight``: a scalar or ``[C]`` weight of the
      positive term (broadcast along the last axis).
    where: boolean mask broadcastable to ``logits``; masked entries give 0 and
      leave the mean's denominator.
    reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"`` (over kept
      entries, as PyTorch's mean over all elements).

  >>> import jxent
  >>> z = jax.scipy.special.logit(jnp.array([0.1, 0.7, 0.8]))
  >>> float(jxent.sigmoid_binary_cross_entropy(z, jnp.array([0., 1., 1.]), reduction="sum"))
  ... # doctest: +ELLIPSIS
  0.685...
  """
  _checks.reduction(reduction)
  logits, labels = _logits_and_targets(logits, labels)
  pw = None
  if pos_weight is not None:
    pw = _checks.floating(pos_weight, "pos_weight")
    last = logits.shape[-1] if logits.ndim else 1
    if pw.ndim > 1 or (pw.ndim == 1 and pw.shape[0] not in (1, last)):
      raise ValueError(
          f"pos_weight must be a scalar or have shape ({last},) (one weight per label), got "
          f"pos_weight.shape={pw.shape}."
      )
  _checks.check_unit_interval(labels, "labels")
  where = _elementwise_where(where, logits.shape)
  if reduction == "none":
    return _elementwise_finish(_sigmoid_bce(logits, labels, pw), where, reduction)
  total = _sigmoid_bce_sum(logits, labels, pw, where)
  if reduction == "sum":
    return total
  count = logits.size if where is None else jnp.sum(where)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def sigmoid_focal_loss(
    logits, labels, *, alpha=None, gamma=2.0, where=None, reduction: str = "none"
) -> Array:
  r"""Focal loss (Lin et al. 2017) on sigmoid outputs, elementwise.

  .. math:: \ell = \alpha_t (1 - p_t)^\gamma \cdot \mathrm{BCE}(z, y),\quad
     1 - p_t = y\,\sigma(-z) + (1-y)\,\sigma(z)

  with :math:`\alpha_t = \alpha y + (1-\alpha)(1-y)` when ``alpha`` is given.
  ``1 - p_t`` is computed from logits directly, so it keeps full precision
  where :math:`p_t \to 1`. Matches ``optax.losses.sigmoid_focal_loss``.

  Args:
    logits: floating point, any shape.
    labels: targets in [0, 1], same shape.
    alpha: optional weight of the positive class in [0, 1].
    gamma: focusing exponent (0 gives BCE).
    where: boolean mask broadcastable to ``logits``.
    reduction: ``"none"``, ``"sum"`` or ``"mean"``.

  >>> import jxent
  >>> jxent.sigmoid_focal_loss(jnp.array([0.0]), jnp.array([1.0]), gamma=0.0).round(4)
  Array([0.6931], dtype=float32)
  """
  _checks.reduction(reduction)
  logits, labels = _logits_and_targets(logits, labels)
  _checks.concrete_scalar(gamma, "gamma", 0.0, float("inf"))
  if alpha is not None:
    _checks.concrete_scalar(alpha, "alpha", 0.0, 1.0)
  ce = _sigmoid_bce(logits, labels, None)
  zf, yf = _checks.upcast(logits), _checks.upcast(labels)
  one_minus_pt = yf * jax.nn.sigmoid(-zf) + (1 - yf) * jax.nn.sigmoid(zf)
  losses = ce * one_minus_pt**gamma
  if alpha is not None:
    losses = (alpha * yf + (1 - alpha) * (1 - yf)) * losses
  return _elementwise_finish(losses, _elementwise_where(where, logits.shape), reduction)


# ------------------------------------------------------------------- on probabilities


def categorical_cross_entropy(
    probs, labels, *, axis: int = -1, where=None, reduction: str = "none"
) -> Array:
  r"""The textbook single-label loss on probabilities: :math:`-\sum_c y_c \log \hat y_c`.

  For training from logits prefer :func:`softmax_cross_entropy` (log space,
  exact gradient). Terms with :math:`y_c = 0` contribute nothing (also when
  :math:`\hat y_c = 0`); :math:`y_c > 0` with :math:`\hat y_c = 0` gives ``+inf``.

  Args:
    probs: predicted probabilities ``[..., C, ...]``.
    labels: target probabilities, same shape.
    axis: the class axis.
    where: per-example mask (``probs.ndim - 1``) or class mask (``probs``' shape).
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over kept examples).

  >>> import jxent
  >>> jxent.categorical_cross_entropy(jnp.array([0.3, 0.6, 0.1]), jnp.array([0., 1., 0.]))
  ... # doctest: +ELLIPSIS
  Array(0.5108..., dtype=float32)
  """
  _checks.reduction(reduction)
  probs = _checks.floating(probs, "probs")
  labels = _checks.floating(labels, "labels")
  _checks.same_shape(probs, labels, "probs", "labels")
  axis = _checks.canonical_axis(axis, probs.ndim, "probs")
  _checks.check_probabilities(probs, axis, "probs")
  terms = -_xlogy(labels, probs)
  batch_shape = probs.shape[:axis] + probs.shape[axis + 1 :]
  if where is not None:
    where = jnp.asarray(where)
    if where.ndim == probs.ndim:
      terms = jnp.where(jnp.broadcast_to(where, probs.shape), terms, 0)
      where = None
  losses = jnp.sum(terms, axis=axis)
  if where is not None:
    where = _elementwise_where(where, batch_shape)
  return _elementwise_finish(losses, where, reduction)


def binary_cross_entropy(probs, labels, *, where=None, reduction: str = "none") -> Array:
  r"""Elementwise binary cross-entropy on probabilities: :math:`-y\log\hat y-(1-y)\log(1-\hat y)`.

  The multi-label textbook formula; for training prefer
  :func:`sigmoid_binary_cross_entropy` on logits. PyTorch clamps the logs at
  -100; jxent returns the true value, ``+inf`` where :math:`\hat y` is 0 or 1
  against a target that disagrees, and 0 for the terms whose weight is 0.

  Args:
    probs: predicted probabilities in [0, 1], any shape.
    labels: targets in [0, 1], same shape.
    where: boolean mask broadcastable to ``probs``.
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over kept entries).

  >>> import jxent
  >>> float(jxent.binary_cross_entropy(jnp.array([0.1, 0.7, 0.8]), jnp.array([0., 1., 1.]),
  ...                                  reduction="sum"))  # doctest: +ELLIPSIS
  0.685...
  """
  _checks.reduction(reduction)
  probs = _checks.floating(probs, "probs")
  labels = _checks.floating(labels, "labels")
  _checks.same_shape(probs, labels, "probs", "labels")
  _checks.check_unit_interval(probs, "probs")
  losses = -(_xlogy(labels, probs) + _xlogy(1 - labels, 1 - probs))
  return _elementwise_finish(losses, _elementwise_where(where, probs.shape), reduction)


def mean_squared_error(predictions, targets, *, where=None, reduction: str = "mean") -> Array:
  r"""Squared error :math:`(\hat y - y)^2`, averaged by default.

  ``reduction="mean"`` gives :math:`\frac1m\sum (y-\hat y)^2`; the
  :math:`\frac{1}{2m}\sum` convention of many textbooks is
  ``0.5 * mean_squared_error(...)``, whose gradient is :math:`\hat y - y`.

  Args:
    predictions: floating point, any shape.
    targets: same shape.
    where: boolean mask broadcastable to ``predictions``.
    reduction: ``"mean"`` (default, over kept entries), ``"sum"`` or ``"none"``.

  >>> import jxent
  >>> float(jxent.mean_squared_error(jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])))
  2.5
  """
  _checks.reduction(reduction)
  predictions = _checks.floating(predictions, "predictions")
  targets = _checks.floating(targets, "targets")
  _checks.same_shape(predictions, targets, "predictions", "targets")
  losses = (predictions - targets) ** 2
  return _elementwise_finish(losses, _elementwise_where(where, predictions.shape), reduction)
