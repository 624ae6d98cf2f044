"""Fused linear + softmax cross-entropy that never holds the [tokens, vocab] logits.

``linear_cross_entropy(h, W, y)`` equals
``softmax_cross_entropy_with_integer_labels(h @ W, y)`` but processes the tokens in
chunks of ``chunk_size`` inside ``lax.scan``: only one ``[chunk, V]`` block of logits
(and of their gradient) exists at a time, and ``dW`` is accumulated in vocabulary
slices so that XLA never allocates a ``[D, V]`` temporary besides the gradient itself.

Two ways to get the gradient, both plain JAX with ``jax.custom_vjp``:

* ``"forward"`` (Liger's way): with a scalar loss ("mean"/"sum"), the forward pass
  already computes ``dh``, ``dW`` and ``db`` chunk by chunk (the cotangent of a mean
  is known up to one scalar), and the backward pass only scales them. 6·N·D·V flops
  in all, like the unfused loss. Evaluating the loss without a gradient does not pay
  for it: the primal computes only the loss.
* ``"recompute"`` (Cut Cross-Entropy's way): the forward keeps only the per-token
  logsumexp; the backward recomputes each chunk's logits. 8·N·D·V flops, but it works
  for any cotangent, so ``reduction="none"`` and a differentiable ``return_lse`` use it.

``method="auto"`` picks ``"forward"`` when it applies. Logits and their gradients are
accumulated in float32 whatever the dtype of ``hidden`` and ``weight``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from jxent import _checks

Array = jax.Array

# One [chunk, V] float32 block of logits is held at a time; its gradient is written over it in
# place. The default makes the block about 64 MiB. The dW update h^T dz has the chunk as its
# inner dimension and re-reads all of dW once per chunk, so small chunks lose: measured on
# XLA:CPU (benchmarks/RESULTS.md, two machines), at N=4096, D=512, V=32768 128-token chunks
# ran 1.0-1.06x the unfused time, 256 0.9-0.95x, 512 0.85-0.9x, 1024 only 0.01-0.03 better;
# at N=8192, D=1024, V=65536 128 ran 0.9-1.04x, 256 0.82-0.98x. Scratch is the block plus
# one [D, slice] dW update: 74 MiB (7%) and 76 MiB (1.9%) of the unfused 1 and 4 GiB there;
# 2048-column slices were as fast as 8192 and 24 MiB smaller.
_TARGET_BLOCK_BYTES = 64 * 2**20
_VOCAB_SLICE = 2048


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
  """Tokens per chunk: a power of two with a [chunk, V] float32 block of about 64 MiB."""
  t = _TARGET_BLOCK_BYTES // (4 * vocab_size)
  t = 1 << max(int(np.log2(max(t, 1))), 4)
  return int(min(t, 1024, 1 << int(np.ceil(np.log2(max(num_tokens, 1))))))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["eps", "zl"],
                   meta_fields=["softcap", "layout", "vocab_slice"])
class _Config:
  def __init__(self, eps, zl, softcap, layout, vocab_slice):
    self.eps, self.zl, self.softcap = eps, zl, softcap
    self.layout, self.vocab_slice = layout, vocab_slice


def _logits(h, w, b, cfg):
  if cfg.layout == "dv":
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)
  else:
    z = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
  if b is not None:
    z = z + b.astype(jnp.float32)
  tanh = None
  if cfg.softcap is not None:
    tanh = jnp.tanh(z / cfg.softcap)
    z = cfg.softcap * tanh
  return z, tanh


def _label_logits(h, w, b, y, cfg):
  """The logit of each token's label, [T], from h and the label's weight column alone."""
  w_y = jnp.take(w, y, axis=1 if cfg.layout == "dv" else 0)
  w_y = w_y.T if cfg.layout == "dv" else w_y
  z_y = jnp.sum(h.astype(jnp.float32) * w_y.astype(jnp.float32), axis=-1)
  if b is not None:
    z_y = z_y + b[y].astype(jnp.float32)
  if cfg.softcap is not None:
    z_y = cfg.softcap * jnp.tanh(z_y / cfg.softcap)
  return z_y


def _chunk_loss(z, y, valid, cfg, z_y=None):
  """Per-token loss and logsumexp of one [T, V] block (same formula as the integer kernel).

  ``z_y`` (the label logits) may be given, so that the block's last reader is the gradient
  and XLA can write the gradient over the logits in place.
  """
  v = z.shape[-1]
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  lse = m + jnp.log(jnp.sum(jnp.exp(z - m[:, None]), axis=-1))
  if z_y is None:
    z_y = jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
  a = valid.astype(jnp.float32)
  if cfg.eps is not None:
    a = a * (1 - cfg.eps)
  loss = jnp.where(a != 0, a * (lse - z_y), 0)
  if cfg.eps is not None:
    s = valid * (cfg.eps / v)
    loss = loss + jnp.where(s != 0, s * (v * lse - jnp.sum(z, axis=-1)), 0)
  if cfg.zl is not None:
    loss = loss + jnp.where(valid, cfg.zl * lse * lse, 0)
  return loss, lse


def _chunk_dlogits(z, tanh, lse, y, valid, g_loss, g_lse, cfg):
  """d(sum_i g_i loss_i + g_lse_i lse_i) / d(pre-softcap logits) for one block."""
  v = z.shape[-1]
  p = jnp.exp(z - lse[:, None])
  a = valid.astype(jnp.float32) * g_loss
  coef = a
  shift = 0.0
  if cfg.eps is not None:
    a = a * (1 - cfg.eps)
    s = valid * g_loss * (cfg.eps / v)
    coef = a + s * v
    shift = s[:, None]
  if cfg.zl is not None:
    coef = coef + jnp.where(valid, 2 * cfg.zl * lse * g_loss, 0)
  if g_lse is not None:
    coef = coef + g_lse
  onehot = jnp.arange(v)[None, :] == y[:, None]
  dz = coef[:, None] * p - jnp.where(onehot, a[:, None], 0) - shift
  if tanh is not None:
    dz = dz * (1 - tanh * tanh)
  return dz


def _accumulate_dw(dw, h, dz, cfg):
  """dw += h^T dz ([D, V]) or dz^T h ([V, D]), one vocabulary slice at a time (the last
  slice may be shorter), so that no [D, V] temporary exists besides dw itself."""
  v = dz.shape[-1]
  step = min(cfg.vocab_slice, v)
  hf = h.astype(jnp.float32)

  def update(dw, start, size):
    dz_j = jax.lax.dynamic_slice_in_dim(dz, start, size, axis=1)
    if cfg.layout == "dv":
      upd = jnp.dot(hf.T, dz_j, preferred_element_type=jnp.float32)
      cur = jax.lax.dynamic_slice_in_dim(dw, start, size, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(dw, cur + upd, start, axis=1)
    upd = jnp.dot(dz_j.T, hf, preferred_element_type=jnp.float32)
    cur = jax.lax.dynamic_slice_in_dim(dw, start, size, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(dw, cur + upd, start, axis=0)

  full = v // step
  dw = jax.lax.fori_loop(0, full, lambda j, dw: update(dw, j * step, step), dw)
  if v % step:
    dw = update(dw, full * step, v % step)
  return dw


def _dh(dz, w, cfg):
  wf = w.astype(jnp.float32)
  if cfg.layout == "dv":
    return jnp.dot(dz, wf.T, preferred_element_type=jnp.float32)
  return jnp.dot(dz, wf, preferred_element_type=jnp.float32)


def _forward_losses(h3, w, b, y2, v2, cfg):
  """Scan over token chunks: per-token losses and logsumexps, [n_chunks, T] each."""

  def body(_, xs):
    h, y, valid = xs
    z, _ = _logits(h, w, b, cfg)
    return None, _chunk_loss(z, y, valid, cfg)

  _, (loss, lse) = jax.lax.scan(body, None, (h3, y2, v2))
  return loss, lse


def _varying(a) -> set:
  """The mesh axes a value varies over inside ``shard_map`` (empty outside)."""
  t = jax.typeof(a)
  mat = getattr(t, "manual_axis_type", None)  # jax >= 0.10
  if mat is not None:
    return set(mat.varying)
  return set(getattr(t, "vma", ()))


def _sum_like(ct, primal):
  """Sums a cotangent over the mesh axes its primal is invariant over (inside ``shard_map``:
  e.g. dL/dh over the vocabulary axis for hidden states replicated across it)."""
  if ct is None:
    return None
  extra = tuple(sorted(_varying(ct) - _varying(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def _varying_like(x, *refs):
  """Inside ``shard_map``, marks a fresh scan carry as varying over every mesh axis that the
  inputs vary over, so that its type matches the carry the body returns (a no-op outside)."""
  vma = set()
  for r in refs:
    if r is not None:
      vma |= _varying(r)
  missing = tuple(sorted(vma - _varying(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _grads(h3, w, b, y2, v2, g_loss, g_lse, cfg, lse=None):
  """Scan over token chunks computing losses (if ``lse`` is None) and dh, dW, db."""
  refs = (h3, w, b, y2, v2, g_loss, g_lse, lse)
  dw0 = _varying_like(jnp.zeros(w.shape, jnp.float32), *refs)
  db0 = None if b is None else _varying_like(jnp.zeros(b.shape, jnp.float32), *refs)

  def body(carry, xs):
    dw, db = carry
    h, y, valid, gl, gs, lse_c = xs
    z, tanh = _logits(h, w, b, cfg)
    if lse_c is None:
      loss, lse_c = _chunk_loss(z, y, valid, cfg, _label_logits(h, w, b, y, cfg))
    else:
      loss = None
    dz = _chunk_dlogits(z, tanh, lse_c, y, valid, gl, gs, cfg)
    dh = _dh(dz, w, cfg).astype(h.dtype)
    dw = _accumulate_dw(dw, h, dz, cfg)
    if db is not None:
      db = db + jnp.sum(dz, axis=0)
    return (dw, db), (loss, dh)

  (dw, db), (loss, dh) = jax.lax.scan(body, (dw0, db0), (h3, y2, v2, g_loss, g_lse, lse))
  return loss, dh, dw.astype(w.dtype), None if db is None else db.astype(b.dtype)


# ---------------------------------------------------------------- "forward" (scalar loss)


@jax.custom_vjp
def _fused_sum(h3, w, b, y2, v2, scale, cfg):
  loss, _ = _forward_losses(h3, w, b, y2, v2, cfg)
  return jnp.sum(loss * scale)


def _fused_sum_fwd(h3, w, b, y2, v2, scale, cfg):
  loss, dh, dw, db = _grads(h3, w, b, y2, v2, scale, None, cfg)
  dh, dw, db = _sum_like(dh, h3), _sum_like(dw, w), _sum_like(db, b)
  return jnp.sum(loss * scale), (dh, dw, db, y2, v2, scale, cfg)


def _fused_sum_bwd(res, g):
  dh, dw, db, y2, v2, scale, cfg = res
  zeros = jax.tree.map(jnp.zeros_like, cfg)
  dh = (g * dh.astype(jnp.float32)).astype(dh.dtype)
  dw = (g * dw.astype(jnp.float32)).astype(dw.dtype)
  db = None if db is None else (g * db.astype(jnp.float32)).astype(db.dtype)
  return dh, dw, db, None, None, jnp.zeros_like(scale), zeros


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)


# ------------------------------------------------------------- "recompute" (any cotangent)


@jax.custom_vjp
def _fused_tokens(h3, w, b, y2, v2, cfg):
  return _forward_losses(h3, w, b, y2, v2, cfg)


def _fused_tokens_fwd(h3, w, b, y2, v2, cfg):
  loss, lse = _forward_losses(h3, w, b, y2, v2, cfg)
  return (loss, lse), (h3, w, b, y2, v2, cfg, lse)


def _fused_tokens_bwd(res, g):
  h3, w, b, y2, v2, cfg, lse = res
  g_loss, g_lse = g
  _, dh, dw, db = _grads(h3, w, b, y2, v2, g_loss, g_lse, cfg, lse=lse)
  zeros = jax.tree.map(jnp.zeros_like, cfg)
  return _sum_like(dh, h3), _sum_like(dw, w), _sum_like(db, b), None, None, zeros


_fused_tokens.defvjp(_fused_tokens_fwd, _fused_tokens_bwd)


# ------------------------------------------------------------------------------ public


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    weight_layout: str = "dv",
    ignore_index: int | None = None,
    where=None,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    return_lse: bool = False,
    method: str = "auto",
):
  r"""Cross-entropy of ``hidden @ weight (+ bias)`` without materialising the logits.

  Same value and gradients (with respect to ``hidden``, ``weight`` and ``bias``) as
  ``softmax_cross_entropy_with_integer_labels(logits, labels, ...)`` with
  ``logits = softcap(hidden @ weight + bias)``, but only a ``[chunk_size, V]`` block
  of logits exists at a time. With ``logit_softcap`` ``c`` the logits are
  :math:`c \tanh(z / c)` (Gemma 2).

  Args:
    hidden: ``[..., D]`` activations (any float dtype; bf16 is accumulated in f32).
    weight: ``[D, V]`` (``weight_layout="dv"``, Flax ``Dense`` kernel) or ``[V, D]``
      (``weight_layout="vd"``, a tied embedding table).
    labels: integer ``[...]`` token ids, the shape of ``hidden`` without ``D``.
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    ignore_index: label value whose tokens are ignored (loss 0, gradient 0, not counted).
    where: boolean ``[...]`` mask of tokens to keep.
    label_smoothing: :math:`\varepsilon` in [0, 1].
    z_loss: coefficient of :math:`\mathrm{logsumexp}^2` per token.
    logit_softcap: ``c > 0`` or None.
    reduction: ``"mean"`` (over kept tokens; 0 if none), ``"sum"`` or ``"none"``.
    chunk_size: tokens per chunk; default: a ``[chunk, V]`` float32 block of ~64 MiB.
    return_lse: also return the per-token logsumexp ``[...]`` (differentiable).
    method: ``"auto"``, ``"forward"`` (gradients computed in the forward pass; scalar
      reductions only) or ``"recompute"``.

  Returns:
    The loss (scalar, or ``[...]`` for ``"none"``), and the logsumexp if ``return_lse``.

  >>> import jxent
  >>> h = jnp.ones((6, 4)); w = jnp.zeros((4, 10)); y = jnp.arange(6)
  >>> float(jxent.linear_cross_entropy(h, w, y))  # uniform over 10 classes  # doctest: +ELLIPSIS
  2.302585...
  """
  _checks.reduction(reduction)
  if weight_layout not in ("dv", "vd"):
    raise ValueError(f"weight_layout must be 'dv' or 'vd', got {weight_layout!r}.")
  if method not in ("auto", "forward", "recompute"):
    raise ValueError(f"method must be 'auto', 'forward' or 'recompute', got {method!r}.")
  hidden = jnp.asarray(hidden)
  weight = jnp.asarray(weight)
  for name, x in (("hidden", hidden), ("weight", weight)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
  if hidden.ndim < 1 or weight.ndim != 2:
    raise ValueError(f"hidden must be [..., D] and weight 2-D, got hidden.shape={hidden.shape}"
                     f" and weight.shape={weight.shape}.")
  d = hidden.shape[-1]
  d_w, v = weight.shape if weight_layout == "dv" else weight.shape[::-1]
  if d_w != d:
    raise ValueError(
        f"hidden's last dimension ({d}) must match weight's D for weight_layout="
        f"{weight_layout!r}, got hidden.shape={hidden.shape} and weight.shape={weight.shape}.")
  labels = _checks.integer(labels, "labels")
  batch_shape = hidden.shape[:-1]
  if labels.shape != batch_shape:
    raise ValueError(f"labels must have hidden's shape without D, i.e. {batch_shape}, got "
                     f"labels.shape={labels.shape}.")
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (v,):
      raise ValueError(f"bias must have shape ({v},), got bias.shape={bias.shape}.")
  if logit_softcap is not None and not float(logit_softcap) > 0:
    raise ValueError(f"logit_softcap must be positive, got {logit_softcap!r}.")
  _checks.concrete_scalar(label_smoothing, "label_smoothing", 0.0, 1.0)
  _checks.concrete_scalar(z_loss, "z_loss", 0.0, float("inf"))

  n = int(np.prod(batch_shape, dtype=np.int64))
  h2 = hidden.reshape(n, d)
  y = labels.reshape(n)
  valid = jnp.ones(n, bool)
  if ignore_index is not None:
    valid = valid & (y != ignore_index)
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape != batch_shape:
      raise ValueError(f"where must be a boolean mask of shape {batch_shape}, got "
                       f"{where.dtype} {where.shape}.")
    valid = valid & where.reshape(n)
  checkify.debug_check(jnp.all(~valid | ((y >= 0) & (y < v))),
                       f"labels out of range [0, {v}) for some kept token.")
  y = jnp.clip(y, 0, v - 1).astype(jnp.int32)

  t = default_chunk_size(n, v) if chunk_size is None else int(chunk_size)
  if t <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size!r}.")
  n_chunks = -(-n // t)
  pad = n_chunks * t - n
  if pad:
    h2 = jnp.pad(h2, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    valid = jnp.pad(valid, (0, pad))
  h3 = h2.reshape(n_chunks, t, d)
  y2, v2 = y.reshape(n_chunks, t), valid.reshape(n_chunks, t)

  eps = None if (isinstance(label_smoothing, (int, float)) and label_smoothing == 0) else (
      jnp.asarray(label_smoothing, jnp.float32))
  zl = None if (isinstance(z_loss, (int, float)) and z_loss == 0) else (
      jnp.asarray(z_loss, jnp.float32))
  cfg = _Config(eps, zl, None if logit_softcap is None else float(logit_softcap),
                weight_layout, _VOCAB_SLICE)
  count = jnp.sum(valid).astype(jnp.float32)

  scalar = reduction in ("mean", "sum") and not return_lse
  if method == "forward" and not scalar:
    raise ValueError("method='forward' needs a scalar loss: reduction 'mean' or 'sum' and "
                     "return_lse=False.")
  if scalar and method != "recompute":
    scale = jnp.ones((n_chunks, t), jnp.float32)
    if reduction == "mean":
      scale = scale / jnp.maximum(count, 1)
    return _fused_sum(h3, weight, bias, y2, v2, scale, cfg)

  loss, lse = _fused_tokens(h3, weight, bias, y2, v2, cfg)
  loss = loss.reshape(-1)[:n]
  out = _checks.reduce(loss, reduction, count)
  if reduction == "none":
    out = out.reshape(batch_shape)
  if return_lse:
    return out, lse.reshape(-1)[:n].reshape(batch_shape)
  return out
