"""Softmax cross-entropy with exact, hand-written derivatives in every autodiff mode.

Each loss is a ``jax.custom_jvp`` kernel on a ``[N, C]`` view of the logits. Its forward is
chosen per platform (``jxent/_platform.py``: the reference of ``jxent/_reference.py``, or
XLA:CPU's fast form from ``jxent/_cpu.py``); its derivative is written once, here, for
every platform. The tangent rule is linear in the tangents::

    d loss_i = sum_c G_ic dz_ic + (terms in d labels, d class_weights, d label_smoothing,
                                   d z_loss),
    G_ic = (sum_c t_ic + 2 z_loss lse_i) softmax(z_i)_c - t_ic,

with ``t`` the (smoothed, weighted, masked) target: exactly ``softmax(z) - y`` in the plain
case. It is evaluated inside ``jax.checkpoint``, so reverse mode (which transposes it) keeps
only the inputs and the per-example logsumexp parts ``[N]`` and writes the gradient
``g_i G_ic`` in one elementwise pass over recomputed ``softmax(z)``. Forward mode (``jvp``,
``jacfwd``, ``linearize``) evaluates it directly, and higher orders differentiate it like
any JAX code: the kernel also returns the logsumexp parts, whose own rule gives
``d lse = sum_c softmax(z)_c dz_c``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent import _checks, _cpu
from jxent import _reference as R
from jxent._platform import dispatch

Array = jax.Array


_nonzero = _checks.nonzero_tangent


def _instantiate(t, x):
  if x is None:
    return None
  return jnp.zeros_like(x) if isinstance(t, SymbolicZero) else t


# ------------------------------------------------------------------ tangent terms


def _int_target_dense(y, valid, w, eps, cmask, num_classes, acc):
  """``(a, s, v, sum_c t_c)``: the integer target's parts (``_reference.int_target_parts``)
  and its total mass per row, the coefficient of softmax(z) in G."""
  a, s, v = R.int_target_parts(y, valid, w, eps, cmask, num_classes, acc)
  total = a
  if s is not None:
    total = total + s * R.v_sum(v, num_classes, acc)
  return a, s, v, total


def _grad_coefficients(kind, zm, y, valid, w, eps, cmask, zl, m, r, tsum=None):
  """G = coef p - t as a function of the logits: ``d loss / d zm`` per entry (``tsum``: a
  soft target's row sums, when already known)."""
  n, c = zm.shape
  acc = m.dtype
  p = R.softmax_from_parts(zm, m, r)
  bad = None
  if kind == "int":
    y, bad = R.split_labels(y, valid, c)
    a, s, v, coef = _int_target_dense(y, valid, w, eps, cmask, c, acc)
    onehot = jnp.arange(c)[None, :] == y[:, None]
    t = jnp.where(onehot, a[:, None], 0)
    if s is not None:
      t = t + s[:, None] * (1 if v is None else v)
  else:
    t = R.soft_target(y, valid, w, eps, cmask, acc)
    coef = jnp.sum(t, axis=-1) if tsum is None else tsum
  if zl is not None:
    slope = 2 * zl * jnp.where(jnp.isfinite(r), m + r, 0)
    coef = coef + (slope if valid is None else jnp.where(valid, slope, 0))
  g = coef[:, None] * p - t
  # A kept row without a distribution (all logits -inf) or with a label outside [0, C) gets
  # a NaN row; dropped rows get exactly 0, whatever their logits hold (NaN and inf included).
  undefined = ~(r > -jnp.inf)  # no mass (r = -inf), or a NaN / +inf logit (r = NaN)
  g = R.poison_rows(g, undefined if bad is None else undefined | bad)
  return g if valid is None else jnp.where(valid[:, None], g, 0)


def _dloss_dz(kind, zm, y, valid, w, eps, cmask, zl, m, r, dz, tsum=None):
  g = _grad_coefficients(kind, zm, y, valid, w, eps, cmask, zl, m, r, tsum)
  return jnp.sum(g * dz.astype(g.dtype), axis=-1)


def _target_sums(y, valid, w, eps, cmask, m):
  """A soft target's row sums, the coefficient of softmax(z) in G, for the tangent rule to
  take outside its checkpoint: the forward loss has the same sum (one pass over the labels
  for both; measured on a GPU, the checkpoint's own recomputation was a second pass over the
  [N, C] labels), and reverse mode keeps it as an [N] residual."""
  return jnp.sum(R.soft_target(y, valid, w, eps, cmask, m.dtype), axis=-1)


def _target_sums_cpu(y, valid, w, eps, cmask, m):
  """The row sums on XLA:CPU, behind a barrier: shared with the forward's fused reduction,
  the 16-bit labels' float32 conversion would be materialised as an [N, C] copy."""
  return _target_sums(jax.lax.optimization_barrier(y), valid, w, eps, cmask, m)


def _dr_dz(zm, m, r, dz):
  p = R.softmax_from_parts(zm, m, r)
  return jnp.sum(p * dz.astype(p.dtype), axis=-1)


def _dloss_dparams(kind, primals, tangents, m, r):
  """The loss's tangent from labels (soft), class weights, smoothing and z-loss, at fixed
  logits: these enter only through the target t and the z-loss term."""
  zm, y, valid, w, eps, cmask, zl = primals
  _, dy, _, dw, deps, _, dzl = tangents
  acc = m.dtype
  out = jnp.zeros(m.shape, acc)
  if kind == "soft" and (_nonzero(dy) or _nonzero(dw) or _nonzero(deps)):
    target = lambda y, w, eps: R.soft_target(y, valid, w, eps, cmask, acc)
    _, dt = jax.jvp(target, (y, w, eps),
                    (_instantiate(dy, y), _instantiate(dw, w), _instantiate(deps, eps)))
    # d loss / d t_c = lse - z_c; taken as 0 on a masked class (-inf logit), where it is +inf,
    # and on dropped rows (whatever their logits hold).
    drop = zm == -jnp.inf
    if valid is not None:
      drop = drop | ~valid[:, None]
    gap = jnp.where(drop, 0, r[:, None] + (m[:, None] - zm.astype(acc)))
    out = out + jnp.sum(dt * gap, axis=-1)
  if kind == "int" and (_nonzero(dw) or _nonzero(deps)):
    f = lambda w, eps: R.int_loss_from_parts(zm, y, valid, w, eps, cmask, None, m, r)
    out = out + jax.jvp(f, (w, eps), (_instantiate(dw, w), _instantiate(deps, eps)))[1]
  if _nonzero(dzl):
    lse2 = (m + r) ** 2
    out = out + (dzl * lse2 if valid is None else jnp.where(valid, dzl * lse2, 0))
  return out


# ----------------------------------------------------------------------- the kernels


def _make_kernels(kind, reference, cpu_stats, cpu_loss, cpu_total):
  """(stats, loss, total) custom_jvp kernels over ``(zm, y, valid, w, eps, cmask, zl)``:
  ``stats`` returns ``(loss [N], m [N], r [N])``, ``loss`` the per-example losses and
  ``total`` their sum. The three share one derivative; ``loss`` and ``total`` have faster
  forwards where the logsumexp parts are not needed."""

  @jax.custom_jvp
  def stats(*args):
    return dispatch(reference=lambda: reference(*args), cpu=lambda: cpu_stats(*args))

  @jax.custom_jvp
  def loss(*args):
    return dispatch(reference=lambda: reference(*args)[0], cpu=lambda: cpu_loss(*args))

  @jax.custom_jvp
  def total(*args):
    return dispatch(reference=lambda: jnp.sum(reference(*args)[0]),
                    cpu=lambda: cpu_total(*args))

  def loss_tangent(primals, tangents):
    out, m, r = stats(*primals)
    dz = tangents[0]
    dloss = _dloss_dparams(kind, primals, tangents, m, r)
    if _nonzero(dz):
      zm, y, valid, w, eps, cmask, zl = primals
      tsum = None
      if kind == "soft":
        tsum = dispatch(y, valid, w, eps, cmask, m, reference=_target_sums,
                        cpu=_target_sums_cpu)
      dloss = dloss + jax.checkpoint(_dloss_dz, static_argnums=(0,))(
          kind, zm, y, valid, w, eps, cmask, zl, m, r, dz, tsum)
    return (out, m, r), dloss

  def stats_rule(primals, tangents):
    (out, m, r), dloss = loss_tangent(primals, tangents)
    dz = tangents[0]
    dr = jnp.zeros_like(r)
    if _nonzero(dz):
      dr = jax.checkpoint(_dr_dz)(primals[0], m, r, dz)
    return (out, m, r), (dloss, jnp.zeros_like(m), dr)

  def loss_rule(primals, tangents):
    (out, _, _), dloss = loss_tangent(primals, tangents)
    return out, dloss

  def total_rule(primals, tangents):
    (out, _, _), dloss = loss_tangent(primals, tangents)
    return jnp.sum(out), jnp.sum(dloss)

  stats.defjvp(stats_rule, symbolic_zeros=True)
  loss.defjvp(loss_rule, symbolic_zeros=True)
  total.defjvp(total_rule, symbolic_zeros=True)
  return stats, loss, total


def _cpu_int_loss(*args):
  return _cpu.int_ce(*args)[0]


def _cpu_int_total(*args):
  return jnp.sum(_cpu.int_ce(*args)[0])


int_stats, int_loss, int_total = _make_kernels(
    "int", R.int_ce, _cpu.int_ce, _cpu_int_loss, _cpu_int_total)
soft_stats, soft_loss, soft_total = _make_kernels(
    "soft", R.soft_ce, _cpu.soft_ce, _cpu.soft_ce_loss, _cpu.soft_ce_total)


# ------------------------------------------------------------------------ arguments


def flatten_logits(logits, axis: int, name: str = "logits"):
  """Checks ``logits`` and returns a ``[N, C]`` view, the batch shape and the axis."""
  logits = _checks.as_array(logits, name)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise TypeError(
        f"{name} must be floating point, got dtype {logits.dtype} with shape {logits.shape}."
    )
  axis = _checks.class_axis(logits, axis, name)
  if axis != logits.ndim - 1:
    logits = jnp.moveaxis(logits, axis, -1)
  batch_shape = logits.shape[:-1]
  return logits.reshape(-1, logits.shape[-1]), batch_shape, axis


def move_class_axis(x: Array, axis: int) -> Array:
  return x if axis == x.ndim - 1 else jnp.moveaxis(x, axis, -1)


def split_where(where, logits_shape, batch_shape, axis: int):
  """Interprets ``where`` by rank: ``(example_mask [N] | None, class_mask [N, C] | None)``."""
  if where is None:
    return None, None
  where = _checks.as_array(where, "where")
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
    where = move_class_axis(where, axis)
    return None, where.reshape(-1, where.shape[-1])
  raise ValueError(
      f"where must have the per-example shape {batch_shape} (masks examples) or the logits' "
      f"shape {logits_shape} (masks classes), got where.shape={where.shape}."
  )


def class_weights_array(class_weights, num_classes: int, acc):
  if class_weights is None:
    return None
  w = _checks.floating(class_weights, "class_weights")
  if w.shape != (num_classes,):
    raise ValueError(
        f"class_weights must have shape ({num_classes},) (one weight per class), got "
        f"class_weights.shape={w.shape}."
    )
  return w.astype(acc)


def _masks(valid, cmask):
  """A row whose classes are all masked out is dropped (loss 0, gradient 0, as Optax)."""
  if cmask is not None:
    any_kept = jnp.any(cmask, axis=-1)
    valid = any_kept if valid is None else valid & any_kept
  return valid


def _kernel_args(z, y, valid, cmask, class_weights, label_smoothing, z_loss):
  """The kernels' ``(zm, y, valid, w, eps, cmask, zl)``, shared by both softmax losses."""
  acc = R.acc_dtype(z.dtype)
  valid = _masks(valid, cmask)
  w = class_weights_array(class_weights, z.shape[-1], acc)
  opts = _checks.CEOptions.make(label_smoothing, z_loss, acc)
  zm = R.apply_class_mask(z, cmask)
  _checks.check_logits(zm, valid, "logits")
  return zm, y, valid, w, opts.label_smoothing, cmask, opts.z_loss


def _soft_label_args(logits, labels, axis, where):
  """Checked ``(z [N, C], y [N, C], batch_shape, example_mask, class_mask)`` of a loss with
  probability labels."""
  logits = _checks.as_array(logits, "logits")
  z, batch_shape, axis = flatten_logits(logits, axis)
  labels = _checks.as_array(labels, "labels")
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
  y = move_class_axis(labels, axis).reshape(z.shape)
  valid, cmask = split_where(where, jnp.shape(logits), batch_shape, axis)
  return z, y, batch_shape, valid, cmask


# ---------------------------------------------------------------------- public losses


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: ArrayLike = 0.0,
    reduction: str = "none",
) -> Array:
  r"""Softmax cross-entropy with probability (one-hot or soft) labels.

  Per example, with :math:`t = ((1-\varepsilon) y + \varepsilon / C) \odot w`:

  .. math:: \ell = -\sum_c t_c \log \mathrm{softmax}(z)_c + z_{\text{loss}} \cdot
     \mathrm{logsumexp}(z)^2

  and :math:`\partial \ell / \partial z = (\sum_c t_c)\,\mathrm{softmax}(z) - t`
  (plus the z-loss term), a hand-written rule valid in every autodiff mode:
  exactly ``softmax(z) - y`` in the plain case. Labels, class weights,
  smoothing and z-loss are differentiable too.

  Args:
    logits: ``[..., C, ...]`` unnormalised log-probabilities, floating point.
      ``-inf`` entries mask classes out.
    labels: probabilities with the shape of ``logits`` (rows summing to one
      along ``axis``).
    axis: the class axis.
    where: boolean mask. With the per-example shape (``logits.ndim - 1``) it
      drops examples: they get loss 0, gradient 0, and leave the mean's
      denominator. With the logits' shape it removes classes from the softmax
      (like Optax's ``where``); smoothing then spreads over the kept classes, a
      row with no kept class is dropped, and label mass on a removed class
      gives ``+inf``.
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    class_weights: ``[C]`` per-class weights :math:`w` (as PyTorch's ``weight``).
    z_loss: coefficient of :math:`\mathrm{logsumexp}(z)^2` (PaLM/T5X).
    reduction: ``"none"`` (per-example losses, the batch shape), ``"sum"`` or
      ``"mean"`` (over kept examples, as PyTorch for soft labels; 0 if none).

  Returns:
    Per-example losses (``logits``' shape without ``axis``) or a scalar,
    float32 for 16-bit logits. ``+inf`` where the target puts mass on a class
    whose logit is ``-inf``. A one-hot target's loss keeps its relative accuracy where
    it is tiny (a confident correct prediction: 1e-8, not 0 as ``lse - z_y`` rounds it);
    on XLA:CPU that costs two more reads of the logits in a batch with a kept example's
    loss below 0.5.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> logits = jnp.log(jnp.array([[0.3, 0.6, 0.1]]))
  >>> jxent.softmax_cross_entropy(logits, jnp.array([[0., 1., 0.]])).round(4)
  Array([0.5108], dtype=float32)
  """
  _checks.reduction(reduction)
  z, y, batch_shape, valid, cmask = _soft_label_args(logits, labels, axis, where)
  args = _kernel_args(z, y, valid, cmask, class_weights, label_smoothing, z_loss)
  if reduction == "none":
    return soft_loss(*args).reshape(batch_shape)
  total = soft_total(*args)
  if reduction == "sum":
    return total
  valid = args[2]
  return _checks.mean_of(total, z.shape[0] if valid is None else jnp.sum(valid))


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: ArrayLike = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: ArrayLike = 0.0,
    reduction: str = "none",
) -> Array:
  r"""Softmax cross-entropy with integer class labels, with PyTorch's ``F.cross_entropy`` semantics.

  Per example, with label :math:`y`, weights :math:`w` and smoothing :math:`\varepsilon`:

  .. math:: \ell = (1-\varepsilon) w_y (-\log p_y)
     + \tfrac{\varepsilon}{C}\sum_c w_c (-\log p_c) + z_{\text{loss}}\,\mathrm{lse}(z)^2

  The gradient (a hand-written rule valid in every autodiff mode) is
  :math:`(\sum_c t_c)\,p - t`; ``softmax(z) - onehot(y)`` in the plain case.
  Reverse mode keeps only the logits, labels and the per-example logsumexp.

  Args:
    logits: ``[..., C, ...]`` floating point; ``-inf`` entries mask classes out.
    labels: integer class ids with ``logits``' shape without ``axis`` (so
      ``axis=1`` on ``[N, C, T]`` logits takes ``[N, T]`` labels, as PyTorch).
    axis: the class axis.
    where: boolean mask, per-example shape (drops examples, like
      ``ignore_index``) or the logits' shape (removes classes from the softmax;
      a row with no kept class is dropped, a label on a removed class gives
      ``+inf``, as with :func:`softmax_cross_entropy`).
    ignore_index: examples whose label equals it get loss 0 and gradient 0 and
      leave the mean's denominator (PyTorch uses -100).
    label_smoothing: :math:`\varepsilon \in [0, 1]`.
    class_weights: ``[C]`` weights; ``"none"`` returns weighted per-example
      losses and ``"mean"`` divides by :math:`\sum_i w_{y_i}` over kept examples.
    z_loss: coefficient of :math:`\mathrm{logsumexp}(z)^2`.
    reduction: ``"none"``, ``"sum"`` or ``"mean"``. A mean over no kept
      example is 0 (PyTorch returns NaN).

  Returns:
    Per-example losses or a scalar, float32 for 16-bit logits. The label's term keeps its
    relative accuracy where it is tiny (a confident correct prediction: ``-log p_y`` of
    1e-8 is 1e-8 to float resolution, not 0 as ``lse - z_y`` rounds it); on XLA:CPU that
    costs one more read of the logits in a batch that has such an example. The smoothing
    and z-loss terms are accurate relative to the loss's scale.

  Labels outside ``[0, C)`` that are not ignored are reported by
  :func:`jxent.checked`.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> logits = jnp.log(jnp.array([[0.3, 0.6, 0.1]]))
  >>> jxent.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1])).round(4)
  Array([0.5108], dtype=float32)
  """
  _checks.reduction(reduction)
  logits = _checks.as_array(logits, "logits")
  z, batch_shape, axis = flatten_logits(logits, axis)
  labels = _checks.integer(labels, "labels")
  if labels.shape != batch_shape:
    raise ValueError(
        f"labels must have logits' shape without axis {axis}, i.e. {batch_shape}, got "
        f"labels.shape={labels.shape} for logits.shape={jnp.shape(logits)}."
    )
  num_classes = z.shape[-1]
  y = labels.reshape(-1)
  valid, cmask = split_where(where, jnp.shape(logits), batch_shape, axis)
  if ignore_index is not None:
    keep = y != ignore_index
    valid = keep if valid is None else valid & keep
  valid = _masks(valid, cmask)
  in_range = (y >= 0) & (y < num_classes)
  _checks.value_check(
      jnp.all(in_range | (~valid if valid is not None else False)),
      f"labels out of range [0, {num_classes}) for some kept example.",
  )
  y = y.astype(jnp.int32)  # out-of-range kept labels give NaN in the kernels
  args = _kernel_args(z, y, valid, cmask, class_weights, label_smoothing, z_loss)
  if reduction == "none":
    return int_loss(*args).reshape(batch_shape)
  total = int_total(*args)
  if reduction == "sum":
    return total
  valid, w = args[2], args[3]
  if w is not None:
    wy = R.take_weights(w, jnp.clip(y, 0, num_classes - 1))
    return _checks.mean_of(total, jnp.sum(wy if valid is None else jnp.where(valid, wy, 0)))
  return _checks.mean_of(total, z.shape[0] if valid is None else jnp.sum(valid))


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: ArrayLike = 2.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    reduction: str = "none",
) -> Array:
  r"""Poly-1 loss (Leng et al., 2022): softmax cross-entropy plus
  :math:`\varepsilon (1 - p_t)`, the first term of its expansion in :math:`(1 - p_t)`.

  Per example, with :math:`p = \mathrm{softmax}(z)` and :math:`p_t = \sum_c y_c p_c`:

  .. math:: \ell = -\sum_c y_c \log p_c + \varepsilon\,(1 - p_t)

  (``optax.losses.poly_loss_cross_entropy``). Both terms come from one log-softmax;
  :math:`1 - p_t` is taken as
  :math:`\sum_c y_c (1 - p_c)` with :math:`1 - p_c = -\operatorname{expm1}(\log p_c)`, so a
  confident prediction's :math:`1 - p_t` of 1e-8 keeps its relative accuracy (the same for
  labels that sum to one; ``1 - p_t`` would round it to 0).

  Args:
    logits: ``[..., C, ...]`` floating point; ``-inf`` entries mask classes out.
    labels: probabilities with the shape of ``logits`` (one-hot or soft).
    epsilon: the coefficient :math:`\varepsilon`, a scalar (differentiable: the slope is
      :math:`1 - p_t`). 2 is Optax's default; 0 gives the cross-entropy, and -1 removes
      the leading term :math:`(1 - p_t)` of the cross-entropy's expansion
      :math:`\sum_j (1 - p_t)^j / j`.
    axis: the class axis.
    where: boolean mask, per-example shape (drops examples: loss 0, gradient 0, out of the
      mean) or the logits' shape (removes classes from the softmax), as
      :func:`softmax_cross_entropy`.
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over kept examples; 0 if none).

  Returns:
    Per-example losses or a scalar, float32 for 16-bit logits; ``+inf`` where the labels put
    mass on a class whose logit is ``-inf``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> logits = jnp.log(jnp.array([[0.3, 0.6, 0.1]]))
  >>> jxent.poly_loss_cross_entropy(logits, jnp.array([[0., 1., 0.]])).round(4)
  Array([1.3108], dtype=float32)
  """
  _checks.reduction(reduction)
  z, y, batch_shape, valid, cmask = _soft_label_args(logits, labels, axis, where)
  eps = _checks.floating(epsilon, "epsilon")
  if eps.ndim != 0:
    raise ValueError(f"epsilon must be a scalar, got epsilon.shape={eps.shape}.")
  valid = _masks(valid, cmask)
  zm = R.apply_class_mask(z, cmask)
  _checks.check_logits(zm, valid, "logits")
  # Both terms from one log-softmax, r sharp: the top class's log p (and 1 - p there) keeps
  # its relative accuracy.
  yf = y.astype(R.acc_dtype(z.dtype))
  if valid is not None:  # a dropped row's values (NaN, a row without a kept class) reach
    # neither the loss nor a gradient: its logits and labels are replaced by 0
    zm = jnp.where(valid[:, None], zm, 0)
    yf = jnp.where(valid[:, None], yf, 0)
  m, r = R.lse_parts(zm)
  log_p = (zm.astype(m.dtype) - m[:, None]) - jnp.where(jnp.isfinite(r), r, 0)[:, None]
  ce = -jnp.sum(R.masked_mul(yf, log_p), axis=-1)  # 0 * -inf is 0: a masked class's label 0
  # sum_c y_c (1 - p_c) is 1 - p_t in value (labels sum to one); as a function of the labels
  # the term is 1 - sum_c y_c p_c, whose slope in y_c is -p_c: the row sum's own slope is
  # taken out (a term that is 0 in value).
  y_sum = jnp.sum(yf, axis=-1)
  one_minus = (jnp.sum(R.masked_mul(yf, -jnp.expm1(log_p)), axis=-1)
               - (y_sum - jax.lax.stop_gradient(y_sum)))
  loss = ce + eps.astype(m.dtype) * one_minus
  if valid is not None:
    loss = jnp.where(valid, loss, 0)
  if reduction == "none":
    return loss.reshape(batch_shape)
  if reduction == "sum":
    return jnp.sum(loss)
  return _checks.mean_of(jnp.sum(loss), z.shape[0] if valid is None else jnp.sum(valid))
