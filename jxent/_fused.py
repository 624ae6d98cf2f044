"""Fused linear + softmax cross-entropy that never holds the [tokens, vocab] logits.

``linear_cross_entropy(h, W, y)`` equals
``softmax_cross_entropy_with_integer_labels(h @ W, y)`` but processes the tokens in
chunks of ``chunk_size`` inside ``lax.scan``: only one ``[chunk, V]`` block of logits
(and of their gradient) exists at a time, and ``dW`` is accumulated in vocabulary
slices so that XLA never allocates a ``[D, V]`` temporary besides the gradient itself.
That is the reference and the XLA:CPU form. Lowered for GPU or TPU, the loss and the
forward method's gradients walk blocks of vocabulary columns for all tokens instead (see
"GPU and TPU" below).

Two ways to get the derivative, both ``jax.custom_jvp`` rules linear in the tangents (so
forward mode, reverse mode by transposition, and higher orders all work):

* ``"forward"`` (Liger's way): with a scalar loss ("mean"/"sum"), the rule computes ``dh``,
  ``dW`` and ``db`` chunk by chunk alongside the loss (the cotangent of a mean is known up to
  one scalar), and the tangent is their inner product with the input tangents; reverse mode
  only scales them. 6·N·D·V flops in all, like the unfused loss. Evaluating the loss
  without a derivative does not pay for it: the primal computes only the loss.
* ``"recompute"`` (Cut Cross-Entropy's way): the forward keeps only the per-token
  logsumexp; the tangent recomputes each chunk's logits in a checkpointed scan, which
  reverse mode transposes. 8·N·D·V flops, but it works for any cotangent, so
  ``reduction="none"`` and a differentiable ``return_lse`` use it.

``method="auto"`` picks ``"forward"`` when it applies. Logits and their gradients are
accumulated in float32 (float64 for float64 inputs) whatever the dtype of ``hidden`` and
``weight``. Tokens laid out over explicit mesh axes are handled data-parallel, each device
on its own tokens inside ``shard_map``.
"""

from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jxent import _checks, _cpu, _pallas
from jxent import _reference as R
from jxent import _stats as S
from jxent._platform import dispatch, explicitly_sharded
from jxent._softmax import class_weights_array

Array = jax.Array

# One [chunk, V] float32 block of logits is held at a time; its gradient is written over it in
# place. The default makes the block about 64 MiB. The dW update h^T dz has the chunk as its inner
# dimension and re-reads all of dW once per chunk, so small chunks lose: measured on XLA:CPU
# (benchmarks/RESULTS.md, two machines), at N=4096, D=512, V=32768 128-token chunks ran 1.0-1.06x
# the unfused time, 256 0.9-0.95x, 512 0.85-0.9x, 1024 only 0.01-0.03 better; at N=8192, D=1024,
# V=65536 128 ran 0.9-1.04x, 256 0.82-0.98x (later, with the rows' reductions in pieces and the
# label's tail: 1.12x, 0.98-0.99x; 512: 0.9x). Scratch is the block plus one [D, slice] dW update:
# 74 MiB (7%) and 76 MiB (1.9%) of the unfused 1 and 4 GiB there; 2048-column slices were as fast as
# 8192 and 24 MiB smaller; 1024 columns as fast again (0.925x against 0.914x at the first size) and
# 9 MiB smaller at the second (1.84% of the unfused scratch against 2.06%). The recompute method's
# tangent takes slices twice as wide (its [chunk, slice] blocks are recomputed logits: 1.22x the
# unfused time against 1.28x).
_TARGET_BLOCK_BYTES = 64 * 2**20
_VOCAB_SLICE = 1024


def _symbolic_dim_error():
  """The error a symbolic dimension raises when made an int (jax.export's own class)."""
  from jax._src.export.shape_poly import InconclusiveDimensionOperation
  return InconclusiveDimensionOperation


def default_chunk_size(num_tokens: int, vocab_size: int) -> int:
  """Tokens per chunk: a power of two with a [chunk, V] float32 block of about 64 MiB."""
  t = _TARGET_BLOCK_BYTES // (4 * vocab_size)
  t = 1 << max(int(np.log2(max(t, 1))), 4)
  return int(min(t, 1024, 1 << int(np.ceil(np.log2(max(num_tokens, 1))))))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["eps", "zl"],
                   meta_fields=["softcap", "layout", "vocab_slice", "acc", "accel_block",
                                "filter_eps", "pieces", "kernels", "stats", "scaled"])
class _Config:
  def __init__(self, eps, zl, softcap, layout, vocab_slice, acc, accel_block=0,
               filter_eps=None, pieces=1, kernels="off", stats=False, scaled=False):
    self.eps, self.zl, self.softcap = eps, zl, softcap
    # return_stats: each token's entropy, argmax and label log-probability from the loss's
    # own pass; token_scaling: each token's loss times its label's probability, held constant.
    self.stats, self.scaled = stats, scaled
    self.layout, self.vocab_slice, self.acc = layout, vocab_slice, acc
    self.accel_block, self.filter_eps = accel_block, filter_eps
    # The filtered tiles' products by the Pallas kernels: "auto" (on cuda), "on" or "off"
    # (read from the context when the loss is traced; part of the configuration, so that a
    # traced rule is not reused across settings).
    self.kernels = kernels
    # Each [T, V] block's row reductions over [T * pieces, V / pieces] pieces (XLA:CPU).
    self.pieces = pieces

  def with_pieces(self, v: int) -> _Config:
    """This configuration with XLA:CPU's row split for a vocabulary of ``v``."""
    out = copy.copy(self)
    out.pieces = _cpu.row_split(v)
    return out


def _logits(h, w, b, cfg):
  if cfg.layout == "dv":
    z = jnp.dot(h, w, preferred_element_type=cfg.acc)
  else:
    z = jnp.dot(h, w.T, preferred_element_type=cfg.acc)
  if b is not None:
    z = z + b.astype(cfg.acc)
  tanh = None
  if cfg.softcap is not None:
    tanh = jnp.tanh(z / cfg.softcap)
    z = cfg.softcap * tanh
  return z, tanh


def _label_logits(h, w, b, y, cfg):
  """The logit of each token's label, [T], from h and the label's weight column alone."""
  y = jnp.clip(y, 0, (w.shape[1] if cfg.layout == "dv" else w.shape[0]) - 1)
  w_y = jnp.take(w, y, axis=1 if cfg.layout == "dv" else 0)
  w_y = w_y.T if cfg.layout == "dv" else w_y
  z_y = jnp.sum(h.astype(cfg.acc) * w_y.astype(cfg.acc), axis=-1)
  if b is not None:
    z_y = z_y + b[y].astype(cfg.acc)
  if cfg.softcap is not None:
    z_y = cfg.softcap * jnp.tanh(z_y / cfg.softcap)
  return z_y


def _chunk_loss(z, y, valid, cfg, z_y=None):
  """Per-token loss, logsumexp, the loss's slopes in label_smoothing and z_loss, and the
  per-token extras (``_finish_loss``) of one [T, V] block (the integer-label formula,
  max-shifted as in ``_reference``).

  ``z_y`` (the label logits) may be given, so that the block's last reader is the gradient
  and XLA can write the gradient over the logits in place.
  """
  v = z.shape[-1]
  # The row reductions, over cfg.pieces pieces of each row (XLA:CPU: 8x faster than rows of
  # 65536 at once); spread() gives a per-row value to each piece.
  k = cfg.pieces
  zp = z.reshape(-1, v // k)
  fold = (lambda a: a) if k == 1 else (lambda a: a.reshape(-1, k))
  spread = (lambda a: a) if k == 1 else (lambda a: jnp.repeat(a, k))
  row_sum = lambda x: jnp.sum(x, axis=-1) if k == 1 else jnp.sum(fold(jnp.sum(x, axis=-1)), -1)
  m = jnp.max(zp, axis=-1) if k == 1 else jnp.max(fold(jnp.max(zp, axis=-1)), axis=-1)
  m = jax.lax.stop_gradient(m)
  m = jnp.where(jnp.isfinite(m), m, 0)
  r = jnp.log(row_sum(jnp.exp(zp - spread(m)[:, None])))
  yc, bad = R.split_labels(y, valid, v)
  if z_y is None:
    z_y = jnp.take_along_axis(z, yc[:, None], axis=-1)[:, 0]
  # A tiny loss (a confident correct prediction) to its own relative accuracy (R.label_term),
  # the label's logit computed apart (R.label_tail's slack). Not from the exp-sum's own
  # exponentials: XLA:CPU then keeps z - m as a second [T, V] buffer.
  tail = R.label_tail(zp, spread(z_y), R.LABEL_SLACK)
  tail = tail if k == 1 else jnp.sum(fold(tail), axis=-1)
  nll = R.poison_rows(R.label_term(r, m - z_y, tail), bad)
  smooth = None
  if cfg.eps is not None:
    # r + (m - mean z) as a sum of (m/2 - z/2) (2 / V): no overflow at logits near ±3e38.
    smooth = r + row_sum((0.5 * spread(m)[:, None] - 0.5 * zp) * (2 / v))
  ent_am = None
  if cfg.stats:
    # The head statistics' own block form (the row's max as the shift). Measured on
    # XLA:CPU, a form sharing this loss's max and exp-sum (the sums in one variadic
    # reduction, the argmax in row pieces) ran as fast: 0.99x at V = 32768, 1.00x at 65536.
    # The argmax apart: as chunk_stats' first top index, its [T, V] index operands were
    # hoisted out of this scan as two more blocks (200 against 72 MiB of XLA scratch at
    # N=4096, D=512, V=32768).
    _, ent, _, _ = S.chunk_stats(z, yc, with_argmax=False)
    ent_am = (ent, jnp.argmax(z, axis=-1).astype(jnp.int32))
  return _finish_loss(nll, m + r, smooth, valid, cfg, ent_am)


def _finish_loss(nll, lse, smooth, valid, cfg, ent_am=None):
  """(loss, lse, d loss / d label_smoothing, d loss / d z_loss, extras) per token from the
  negative log-likelihood, the logsumexp, (with smoothing) lse - mean logit and (with
  ``cfg.stats``) the entropy and argmax. The extras are a dict: with ``cfg.stats`` the
  statistics (``_STATS``); with ``cfg.scaled`` the factor ``"p"``, each kept token's
  p_y = exp(-nll) held constant, which the loss and its slopes are already multiplied by
  (the gradient's per-token coefficient must be multiplied by it too)."""
  d_eps = d_zl = None
  if cfg.eps is None:
    loss = jnp.where(valid, nll, 0)
  else:
    loss = jnp.where(valid, (1 - cfg.eps) * nll + cfg.eps * smooth, 0)
    d_eps = jnp.where(valid, smooth - nll, 0)
  if cfg.zl is not None:
    loss = loss + jnp.where(valid, cfg.zl * lse * lse, 0)
    d_zl = jnp.where(valid, lse * lse, 0)
  extras = {}
  if cfg.stats:
    extras.update(lse=lse, ent=ent_am[0], am=ent_am[1], nll=nll)
  if cfg.scaled:
    # A kept token with a label outside [0, V) has a NaN nll: its loss stays NaN.
    p = jnp.where(valid, jnp.exp(-jax.lax.stop_gradient(nll)), 0)
    loss, d_eps, d_zl = (None if a is None else a * p for a in (loss, d_eps, d_zl))
    extras["p"] = p
  return loss, lse, d_eps, d_zl, extras


# The per-token statistics of ``return_stats``, as ``_finish_loss``'s extras name them.
_STATS = ("lse", "ent", "am", "nll")


def _stats_of(extras) -> dict:
  return {k: extras[k] for k in _STATS if k in extras}


def _zero_tangents(tree):
  """Zero tangents of outputs that are not differentiated (float0 for integers; zeros_like
  keeps the mesh axes a value varies over inside ``shard_map``)."""
  inexact = lambda a: jnp.issubdtype(a.dtype, jnp.inexact)
  return jax.tree.map(
      lambda a: jnp.zeros_like(a, dtype=None if inexact(a) else jax.dtypes.float0), tree)


def _softmax_coef(lse, valid, g_loss, g_lse, cfg, v):
  """Per token: the coefficient of softmax(z) in the logits' gradient, the label's ``a``
  and the smoothing's uniform ``s`` (None without smoothing)."""
  a = jnp.where(valid, g_loss, 0)
  coef, s = a, None
  if cfg.eps is not None:
    s = a * (cfg.eps / v)
    a = a * (1 - cfg.eps)
    coef = a + s * v
  if cfg.zl is not None:
    coef = coef + jnp.where(valid, 2 * cfg.zl * lse * g_loss, 0)
  if g_lse is not None:
    coef = coef + g_lse
  return coef, a, s


def _chunk_dlogits(z, tanh, lse, y, valid, g_loss, g_lse, cfg, start=0, v=None,
                   label_terms=True):
  """d(sum_i g_i loss_i + g_lse_i lse_i) / d(pre-softcap logits) for one block.

  The block may be the columns ``start:start + z.shape[-1]`` of a vocabulary of ``v``.
  ``label_terms=False`` leaves out the label's -a_i and the smoothing's -s_i (the gradient
  filter adds them apart, ``_label_terms``).
  """
  v = z.shape[-1] if v is None else v
  p = jnp.exp(z - jnp.where(jnp.isfinite(lse), lse, 0)[:, None])
  coef, a, s = _softmax_coef(lse, valid, g_loss, g_lse, cfg, v)
  shift = 0.0 if s is None else s[:, None]
  onehot = (jnp.arange(z.shape[-1]) + start)[None, :] == y[:, None]
  # onehot * a rather than a select against 0: XLA hoists the broadcast 0 out of the scan
  # and keeps it as a [T, V] buffer.
  dz = coef[:, None] * p
  if label_terms:
    dz = dz - onehot.astype(p.dtype) * a[:, None] - shift
  if tanh is not None:
    dz = dz * (1 - tanh * tanh)
  # A kept label outside [0, V) gets a NaN row (a [T] vector broadcast, no [T, V] constant).
  _, bad = R.split_labels(y, valid, v)
  return dz + jnp.where(bad, jnp.nan, 0).astype(dz.dtype)[:, None]


def _accumulate_dw(dw, h, dz, cfg):
  """dw += h^T dz ([D, V]) or dz^T h ([V, D]), one vocabulary slice at a time (the last
  slice may be shorter), so that no [D, V] temporary exists besides dw itself."""
  v = dz.shape[-1]
  step = min(cfg.vocab_slice, v)
  hf = h.astype(cfg.acc)

  def update(dw, start, size):
    dz_j = jax.lax.dynamic_slice_in_dim(dz, start, size, axis=1)
    if cfg.layout == "dv":
      upd = jnp.dot(hf.T, dz_j, preferred_element_type=cfg.acc)
      cur = jax.lax.dynamic_slice_in_dim(dw, start, size, axis=1)
      return jax.lax.dynamic_update_slice_in_dim(dw, cur + upd, start, axis=1)
    upd = jnp.dot(dz_j.T, hf, preferred_element_type=cfg.acc)
    cur = jax.lax.dynamic_slice_in_dim(dw, start, size, axis=0)
    return jax.lax.dynamic_update_slice_in_dim(dw, cur + upd, start, axis=0)

  full = v // step
  dw = jax.lax.fori_loop(0, full, lambda j, dw: update(dw, j * step, step), dw)
  if v % step:
    dw = update(dw, full * step, v % step)
  return dw


def _dh(dz, w, cfg):
  """dz W^T ([T, D]), contracting over V without a transposed copy of W."""
  wf = w.astype(cfg.acc)
  if cfg.layout == "dv":
    return jax.lax.dot_general(dz, wf, (((1,), (1,)), ((), ())), preferred_element_type=cfg.acc)
  return jnp.dot(dz, wf, preferred_element_type=cfg.acc)


# ------------------------------------------------------------------------ gradient filter
#
# With ``gradient_filter=eps`` (Cut Cross-Entropy's ``filter_eps``) a block of logits whose
# softmax entries are all below eps skips its two backward products and contributes nothing;
# a kept block contributes its softmax terms coef_i p_ij. The label and smoothing terms
# (-a_i at y_i, -s_i everywhere) of every block are added once, apart, in O(N·D): a gather of
# the labels' weight rows, a scatter-add into their dW rows, a column sum. The skipped
# softmax terms are each below eps times the token's coefficient. A block is a [T,
# vocab_slice] slice of a token chunk (reference, XLA:CPU) or an [N, vocabulary block] block
# (GPU, TPU).


def _block_products(dz, hl, w_j, cfg, low):
  """dz W_j^T ([T, D]) and h^T dz (the block's dW columns), operands in ``low``."""
  dzl, wl = dz.astype(low), w_j.astype(low)
  if cfg.layout == "dv":
    dh = jax.lax.dot_general(dzl, wl, (((1,), (1,)), ((), ())), preferred_element_type=cfg.acc)
    return dh, jnp.dot(hl.T, dzl, preferred_element_type=cfg.acc)
  return jnp.dot(dzl, wl, preferred_element_type=cfg.acc), jnp.dot(
      dzl.T, hl, preferred_element_type=cfg.acc)


# The accelerator form's blocks hold all N tokens: too coarse to find a block with no entry
# above eps (with unit-variance random logits over V = 256000, p reaches 2^-12 about 4.6
# standard deviations above the mean: a few dozen entries in every [8192, 4096] block; a
# measured run filtering whole blocks was slower than no filter, benchmarks/RESULTS.md).
# There the filter looks at tiles of
# _FILTER_TILE [tokens, classes], as Cut Cross-Entropy's kernel does: when at most
# 1/_FILTER_TILES_KEPT of a block's tiles have an entry of at least eps, only those tiles'
# products are computed (gathered into batched [tile] products, scatter-added into dh and the
# block's dW columns); with more, the whole block's. A loud tile mostly holds one loud entry,
# so smaller tiles compute less, and each computed tile gathers [64, D] of h and of W.
_FILTER_TILE = (64, 64)
_FILTER_TILES_KEPT = 64
# The Pallas kernels (``_pallas_tiles``) cost nothing for a quiet tile and gather nothing for a
# loud one: they take a block with up to 1/_KERNEL_TILES_KEPT of its tiles loud. Measured on
# an H200 (benchmarks/RESULTS.md, run G): with under 1% of the tiles loud they beat XLA's
# gathered products; forced onto blocks with 15% loud, they lost to the whole block's cuBLAS
# products (1.11x the exact time).
_KERNEL_TILES_KEPT = 8


def _filtered_block(dh, hl, z, tanh, lse, y, valid, g, w_j, start, v, cfg, low, bias,
                    tiles=False):
  """(dh + the block's softmax share, its dW columns, its db columns or None) for the logits
  ``z`` of the columns ``start:start + size``: zeros when every softmax entry of the block is
  below ``cfg.filter_eps``, with ``tiles`` only the tiles holding an entry of at least eps when
  they are few; a NaN or a bad label always takes the whole block."""
  lse_f = jnp.where(jnp.isfinite(lse), lse, 0)
  rel = jnp.where(valid[:, None], z - lse_f[:, None], -jnp.inf)  # log softmax, kept tokens
  _, bad = R.split_labels(y, valid, v)
  n, size = z.shape
  d = hl.shape[-1]
  shape = (d, size) if cfg.layout == "dv" else (size, d)
  coef = _softmax_coef(lse, valid, g, None, cfg, v)[0]

  def full(dh):
    dz = _chunk_dlogits(z, tanh, lse, y, valid, g, None, cfg, start, v, label_terms=False)
    dh_j, dw_j = _block_products(dz, hl, w_j, cfg, low)
    return dh + dh_j, dw_j, (jnp.sum(dz, axis=0) if bias else None)

  def zeros(*s):
    return _varying_like(jnp.zeros(s, cfg.acc), dh, hl, w_j, z)

  def skip(dh):
    return dh, zeros(*shape), (zeros(size) if bias else None)

  tb, tv = _FILTER_TILE
  nt, vt = n // tb, size // tv
  if not (tiles and n % tb == 0 and size % tv == 0):
    return _whole_or_none(dh, rel, bad, cfg, full, skip)
  tile_top = jnp.max(rel.reshape(nt, tb, vt, tv), axis=(1, 3))  # [nt, vt]
  loud = ~(jnp.exp(tile_top) < cfg.filter_eps)
  count = jnp.sum(loud)
  any_bad = jnp.any(bad) | jnp.isnan(jnp.max(tile_top))

  def tiled(kernels):
    k = nt * vt // (_KERNEL_TILES_KEPT if kernels else _FILTER_TILES_KEPT)
    if k < 1:
      return lambda dh: _whole_or_none(dh, rel, bad, cfg, full, skip)

    def sparse(dh):
      flat = jnp.nonzero(loud.reshape(-1), size=k, fill_value=0)[0]
      used = jnp.arange(k) < count  # the padding tiles contribute 0
      ti, tj = flat // vt, flat % vt
      zt = z.reshape(nt, tb, vt, tv)[ti, :, tj, :]  # [k, tb, tv]
      rows = ti[:, None] * tb + jnp.arange(tb)[None, :]  # [k, tb]
      dz = _pallas.tile_grad(zt, lse_f[rows], coef[rows], cfg.softcap)
      dz = jnp.where(used[:, None, None], dz, 0)
      ht = hl.reshape(nt, tb, d)[ti]  # [k, tb, d]
      if cfg.layout == "dv":
        wt = jnp.moveaxis(w_j.reshape(d, vt, tv)[:, tj, :], 0, -1)  # [k, tv, d]
      else:
        wt = w_j.reshape(vt, tv, d)[tj]
      dzl = dz.astype(low)
      dh_t = jnp.einsum("kab,kbd->kad", dzl, wt.astype(low), preferred_element_type=cfg.acc)
      dw_t = jnp.einsum("kab,kad->kbd", dzl, ht, preferred_element_type=cfg.acc)
      dh = dh.reshape(nt, tb, d).at[ti].add(dh_t).reshape(n, d)
      dw_j = zeros(vt, tv, d).at[tj].add(dw_t).reshape(size, d)
      db_j = zeros(vt, tv).at[tj].add(jnp.sum(dz, axis=1)).reshape(size) if bias else None
      return dh, (dw_j.T if cfg.layout == "dv" else dw_j), db_j

    if kernels:
      sparse = functools.partial(_pallas_tiles, z=z, lse_f=lse_f, coef=coef, loud=loud, hl=hl,
                                 w_j=w_j, cfg=cfg, low=low, bias=bias, xla=sparse)
    mode = jnp.where(any_bad | (count > k), 2, jnp.where(count == 0, 0, 1))
    return lambda dh: jax.lax.switch(mode, (skip, sparse, full), dh)

  fits = _pallas.d_block(d) is not None
  if cfg.kernels == "auto":  # the kernels where they were measured faster: NVIDIA GPUs
    return jax.lax.platform_dependent(dh, cuda=tiled(fits and _triton_takes(cfg)),
                                      default=tiled(False))
  return tiled(cfg.kernels == "on" and fits)(dh)


def _whole_or_none(dh, rel, bad, cfg, full, skip):
  """The whole block's products, or none when every softmax entry is below eps (a NaN or a
  bad label always takes the whole block)."""
  keep = ~(jnp.exp(jnp.max(rel)) < cfg.filter_eps) | jnp.any(bad)
  return jax.lax.cond(keep, full, skip, dh)


def _pallas_tiles(dh, *, z, lse_f, coef, loud, hl, w_j, cfg, low, bias, xla):
  """``_filtered_block``'s loud tiles through the Pallas kernels (``jxent/_pallas.py``):
  Triton on an NVIDIA GPU (float32 accumulation and tiles of powers of two from 16, as
  Triton's products take; otherwise XLA's gathered products there), interpreted on every
  other platform."""
  def run(interpret):
    return lambda dh: _pallas.filtered_products(
        dh, z, lse_f, coef, loud, hl, w_j, tile=_FILTER_TILE, layout=cfg.layout,
        softcap=cfg.softcap, low=low, bias=bias, interpret=interpret)

  return jax.lax.platform_dependent(dh, cuda=run(False) if _triton_takes(cfg) else xla,
                                    default=run(True))


def _triton_takes(cfg) -> bool:
  """Whether Triton's products take the filter's tiles: float32 accumulation, tile sides
  powers of two from 16."""
  return cfg.acc == jnp.float32 and all(t >= 16 and t & (t - 1) == 0 for t in _FILTER_TILE)


def _label_terms(h, y, valid, g, w, z_y, v, cfg):
  """The label and smoothing terms of the gradient over the whole vocabulary: ``(dh [T, D],
  put)`` where ``put(dw, db)`` adds them to dW and db (a scatter-add of the T label rows and,
  with smoothing, one row broadcast over all classes)."""
  a = jnp.where(valid, g, 0).astype(cfg.acc)
  s = None
  if cfg.eps is not None:
    s = a * (cfg.eps / v)
    a = a * (1 - cfg.eps)
  yc, bad = R.split_labels(y, valid, v)
  c = jnp.where(valid & ~bad, -a, 0)
  if cfg.softcap is not None:  # the cap's slope at the label: 1 - tanh^2, tanh = z_y / cap
    t_y = z_y / cfg.softcap
    c = c * (1 - t_y * t_y)
  axis = 1 if cfg.layout == "dv" else 0
  w_y = jnp.take(w, yc, axis=axis).astype(cfg.acc)
  dh = c[:, None] * (w_y.T if cfg.layout == "dv" else w_y)
  hf = h.astype(cfg.acc)
  if s is not None:  # (smoothing with a softcap is refused up front: not uniform then)
    dh = dh - s[:, None] * jnp.sum(w.astype(cfg.acc), axis=axis)[None, :]
  idx = jnp.where(valid & ~bad, yc, v)  # out of range: dropped by the scatter

  def put(dw, db):
    rows = (c[:, None] * hf).astype(dw.dtype)
    if cfg.layout == "dv":
      dw = dw.at[:, idx].add(rows.T, mode="drop")
    else:
      dw = dw.at[idx].add(rows, mode="drop")
    if s is not None:
      row = jnp.sum(s[:, None] * hf, axis=0)
      dw = dw - (row[:, None] if cfg.layout == "dv" else row[None, :]).astype(dw.dtype)
    if db is not None:
      db = db.at[idx].add(c.astype(db.dtype), mode="drop")
      if s is not None:
        db = db - jnp.sum(s).astype(db.dtype)
    return dw, db

  return dh, put


def _filtered_slices(h, y, valid, g, z, tanh, z_y, lse, w, dw, db, cfg):
  """A token chunk's dh, and dW and db updated: the softmax terms one vocabulary slice at a
  time through ``_filtered_block``, then the label and smoothing terms (the filtered form of
  ``_chunk_dlogits``, ``_dh`` and ``_accumulate_dw``)."""
  v = z.shape[-1]
  axis = 1 if cfg.layout == "dv" else 0
  hf = h.astype(cfg.acc)
  dh0, put = _label_terms(h, y, valid, g, w, z_y, v, cfg)

  def fn(carry, start, size):
    dh, dw, db = carry
    dh, dw_j, db_j = _filtered_block(
        dh, hf, jax.lax.dynamic_slice_in_dim(z, start, size, 1), _cut(tanh, start, size, 1),
        lse, y, valid, g, _cut(w, start, size, axis), start, v, cfg, cfg.acc, db is not None)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, _cut(dw, start, size, axis) + dw_j, start, axis)
    if db is not None:
      db = jax.lax.dynamic_update_slice_in_dim(db, _cut(db, start, size, 0) + db_j, start, 0)
    return dh, dw, db

  dh, dw, db = _vocab_loop(fn, (dh0, dw, db), v, min(cfg.vocab_slice, v))
  dw, db = put(dw, db)
  return dh, dw, db


def _forward_losses(h3, w, b, y2, v2, cfg):
  """Per-token losses, logsumexps, option slopes and extras (``_finish_loss``), [n_chunks, T]:
  token chunks (reference, XLA:CPU) or vocabulary blocks over all tokens (GPU, TPU)."""
  return dispatch(h3, w, b, y2, v2, cfg, reference=_token_chunks_forward,
                  cpu=_cpu_chunks(_token_chunks_forward), accelerator=_vocab_blocks_forward)


def _cpu_chunks(fn):
  """XLA:CPU's form of a token-chunk function: each block's row reductions in pieces
  (``_cpu.row_split``); the same arithmetic otherwise."""

  def cpu(*args):
    *rest, cfg = args
    w = rest[1]
    return fn(*rest, cfg.with_pieces(w.shape[1] if cfg.layout == "dv" else w.shape[0]))

  return cpu


def _token_chunks_forward(h3, w, b, y2, v2, cfg):
  """Scan over token chunks: per-token losses, logsumexps and option slopes, [n_chunks, T]."""

  def body(_, xs):
    h, y, valid = xs
    z, _ = _logits(h, w, b, cfg)
    return None, _chunk_loss(z, y, valid, cfg)

  _, out = jax.lax.scan(body, None, (h3, y2, v2))
  return out


def _varying(a) -> set:
  """The mesh axes a value varies over inside ``shard_map`` (empty outside)."""
  t = jax.typeof(a)
  mat = getattr(t, "manual_axis_type", None)  # jax >= 0.10
  if mat is not None:
    return set(mat.varying)
  return set(getattr(t, "vma", ()))


def _varying_like(x, *refs):
  """Inside ``shard_map``, marks a fresh scan carry as varying over every mesh axis that the
  inputs vary over, so that its type matches the carry the body returns (a no-op outside)."""
  vma = set()
  for r in refs:
    if r is not None:
      vma |= _varying(r)
  missing = tuple(sorted(vma - _varying(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _grads(h3, w, b, y2, v2, g_loss, cfg):
  """Losses, option slopes, the gradients dh, dW, db of ``sum_i g_i loss_i`` and the
  statistics (``_stats_of``): token chunks (reference, XLA:CPU) or vocabulary blocks over
  all tokens (GPU, TPU)."""
  return dispatch(h3, w, b, y2, v2, g_loss, cfg, reference=_token_chunks_grads,
                  cpu=_cpu_chunks(_token_chunks_grads), accelerator=_vocab_blocks_grads)


def _token_chunks_grads(h3, w, b, y2, v2, g_loss, cfg):
  """Scan over token chunks computing losses, option slopes and the gradients dh, dW, db of
  ``sum_i g_i loss_i``."""
  refs = (h3, w, b, y2, v2, g_loss)
  dw0 = _varying_like(jnp.zeros(w.shape, cfg.acc), *refs)
  db0 = None if b is None else _varying_like(jnp.zeros(b.shape, cfg.acc), *refs)

  def body(carry, xs):
    dw, db = carry
    h, y, valid, gl = xs
    # Dropped tokens' hidden rows are replaced by 0, so that whatever they hold (NaN, inf)
    # reaches no gradient (dW sums over all tokens); their loss is 0 either way.
    h = jnp.where(valid[:, None], h, 0)
    z, tanh = _logits(h, w, b, cfg)
    z_y = _label_logits(h, w, b, y, cfg)
    loss, lse, d_eps, d_zl, extras = _chunk_loss(z, y, valid, cfg, z_y)
    if cfg.scaled:
      gl = gl * extras["p"]
    stats = _stats_of(extras)
    if cfg.filter_eps is not None:
      dh, dw, db = _filtered_slices(h, y, valid, gl, z, tanh, z_y, lse, w, dw, db, cfg)
      return (dw, db), (loss, d_eps, d_zl, dh.astype(h.dtype), stats)
    dz = _chunk_dlogits(z, tanh, lse, y, valid, gl, None, cfg)
    dh = _dh(dz, w, cfg).astype(h.dtype)
    dw = _accumulate_dw(dw, h, dz, cfg)
    if db is not None:
      db = db + jnp.sum(dz, axis=0)
    return (dw, db), (loss, d_eps, d_zl, dh, stats)

  (dw, db), (loss, d_eps, d_zl, dh, stats) = jax.lax.scan(body, (dw0, db0),
                                                          (h3, y2, v2, g_loss))
  return (loss, d_eps, d_zl, dh, dw.astype(w.dtype), None if db is None else db.astype(b.dtype),
          stats)


# ------------------------------------------------ GPU and TPU: vocabulary blocks, all tokens
#
# Token chunks of ~64 MiB suit XLA:CPU (a few cores, caches), but on an accelerator they are
# hundreds of thin matrix products each re-reading all of W and of an f32 dW: measured on an
# H100 (benchmarks/RESULTS.md) the token-chunked form ran 9.9x the unfused time at N=8192,
# D=2304, V=256000. There each step instead takes one block of vocabulary columns for all
# tokens ([N, vocab_block] logits, ~128 MiB in float32): pass 1 keeps a running logsumexp per
# token; pass 2 recomputes the block, and its dW columns are complete after one step (written
# once, in W's dtype: no float32 [D, V] accumulator), while dh ([N, D], float32) accumulates.
# The two backward products take the logits' gradient in the inputs' dtype (bfloat16 inputs:
# bfloat16 tensor-core products with float32 accumulation, as Cut Cross-Entropy and Liger do).
# 8·N·D·V flops, like the recompute method.
_ACCEL_BLOCK_BYTES = 128 * 2**20


def accelerator_vocab_block(num_tokens: int, vocab_size: int) -> int:
  """Vocabulary columns per block on GPU/TPU: a multiple of 128 with [N, block] float32
  logits of about ``_ACCEL_BLOCK_BYTES`` (at least 128 columns, at most V)."""
  cols = _ACCEL_BLOCK_BYTES // (4 * max(num_tokens, 1))
  cols = max(128, (cols // 128) * 128)
  return int(min(cols, vocab_size))


def _vocab_loop(fn, carry, v, step):
  """``carry = fn(carry, start, size)`` over the blocks ``[start, start + size)`` of a
  vocabulary of ``v`` columns: full blocks of ``step`` in a scan, then the remainder."""
  full = v // step
  if full:
    carry = jax.lax.scan(lambda c, j: (fn(c, j * step, step), None), carry,
                         jnp.arange(full))[0]
  if v % step:
    carry = fn(carry, full * step, v % step)
  return carry


def _cut(a, start, size, axis):
  return None if a is None else jax.lax.dynamic_slice_in_dim(a, start, size, axis)


def _flat_tokens(h3, y2, v2):
  """[n_chunks, T, ...] -> [N, ...] (free reshapes)."""
  nc, t, d = h3.shape
  return h3.reshape(nc * t, d), y2.reshape(nc * t), v2.reshape(nc * t)


def _vocab_blocks_forward(h3, w, b, y2, v2, cfg):
  """Per-token losses, logsumexps and option slopes as ``_token_chunks_forward``."""
  nc, t, _ = h3.shape
  out = _vocab_pass1(*_flat_tokens(h3, y2, v2), w, b, cfg)
  return jax.tree.map(lambda a: a.reshape(nc, t), out)


def _vocab_pass1(h, y, valid, w, b, cfg):
  """Pass 1: running max, sum of exponentials and (with smoothing) sum of logits per token
  over vocabulary blocks; then the per-token losses, [N]."""
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  yc, bad = R.split_labels(y, valid, v)
  z_y = _label_logits(h, w, b, yc, cfg)
  refs = (h, w, b, y, valid, z_y)
  like = lambda x: _varying_like(x, *refs)
  init = (like(jnp.full(y.shape, -jnp.inf, cfg.acc)), like(jnp.zeros(y.shape, cfg.acc)),
          like(jnp.zeros(y.shape, cfg.acc)),
          None if cfg.eps is None else like(jnp.zeros(y.shape, cfg.acc)),
          S.online_init(y.shape, cfg.acc, like) if cfg.stats else None)

  def block(carry, start, size):
    m, s, tail, sz, st = carry
    z, _ = _logits(h, _cut(w, start, size, axis), _cut(b, start, size, 0), cfg)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(z, axis=-1)))
    m_new_f = jnp.where(jnp.isfinite(m_new), m_new, 0)
    m_f = jnp.where(jnp.isfinite(m), m, 0)
    s = s * jnp.exp(jnp.where(jnp.isfinite(m), m_f - m_new_f, -jnp.inf)) + jnp.sum(
        jnp.exp(z - m_new_f[:, None]), axis=-1)
    # Relative to the label's logit (computed apart: R.label_tail's slack), no rescaling.
    tail = tail + R.label_tail(z, z_y, R.LABEL_SLACK)
    if sz is not None:  # sum of (z - z_y) / V: mean logit relative to the label's, each
      # term scaled before the difference (no overflow at logits near ±3e38)
      sz = sz + jnp.sum(z * (1 / v) - (z_y * (1 / v))[:, None], axis=-1)
    if st is not None:  # return_stats: entropy and argmax gathered online
      st = S.online_block(st, z, start)
    return m_new, s, tail, sz, st

  m, s, tail, sz, st = _vocab_loop(block, init, v, min(cfg.accel_block, v))
  m = jnp.where(jnp.isfinite(m), m, 0)
  r = jnp.log(s)
  nll = R.poison_rows(R.label_term(r, m - z_y, tail), bad)
  smooth = None if sz is None else nll - sz  # lse - mean z
  ent_am = None if st is None else S.online_finish(st)[1:]
  return _finish_loss(nll, m + r, smooth, valid, cfg, ent_am)


def _vocab_blocks_grads(h3, w, b, y2, v2, g_loss, cfg):
  """Pass 1 (``_vocab_blocks_forward``), then pass 2 over the same blocks: each block's
  logits recomputed, dW and db columns written once, dh accumulated in float32."""
  nc, t, d = h3.shape
  h, y, valid = _flat_tokens(h3, y2, v2)
  # Dropped tokens' hidden rows are replaced by 0, so that whatever they hold (NaN, inf)
  # reaches no gradient (dW sums over all tokens); their loss is 0 either way.
  h = jnp.where(valid[:, None], h, 0)
  loss, lse, d_eps, d_zl, extras = _vocab_pass1(h, y, valid, w, b, cfg)
  g = g_loss.reshape(-1)
  if cfg.scaled:
    g = g * extras["p"]
  v = w.shape[1] if cfg.layout == "dv" else w.shape[0]
  axis = 1 if cfg.layout == "dv" else 0
  low = jnp.result_type(h, w)
  low = low if jnp.finfo(low).bits < jnp.finfo(cfg.acc).bits else cfg.acc
  hl = h.astype(low)
  refs = (h, w, b, y, valid, g)
  init = (_varying_like(jnp.zeros(h.shape, cfg.acc), *refs),
          _varying_like(jnp.zeros(w.shape, w.dtype), *refs),
          None if b is None else _varying_like(jnp.zeros(b.shape, b.dtype), *refs))
  put = None
  if cfg.filter_eps is not None:  # the label and smoothing terms, apart from the blocks
    z_y = None
    if cfg.softcap is not None:
      z_y = _label_logits(h, w, b, R.split_labels(y, valid, v)[0], cfg)
    dh0, put = _label_terms(h, y, valid, g, w, z_y, v, cfg)
    init = (_varying_like(dh0, *refs),) + init[1:]

  def block(carry, start, size):
    dh, dw, db = carry
    w_j = _cut(w, start, size, axis)
    z, tanh = _logits(h, w_j, _cut(b, start, size, 0), cfg)
    if cfg.filter_eps is not None:
      dh, dw_j, db_j = _filtered_block(dh, hl, z, tanh, lse, y, valid, g, w_j, start, v, cfg,
                                       low, db is not None, tiles=True)
    else:
      dz = _chunk_dlogits(z, tanh, lse, y, valid, g, None, cfg, start, v)
      dh_j, dw_j = _block_products(dz, hl, w_j, cfg, low)
      dh = dh + dh_j
      db_j = None if db is None else jnp.sum(dz, axis=0)
    dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_j.astype(w.dtype), start, axis)
    if db is not None:
      db = jax.lax.dynamic_update_slice_in_dim(db, db_j.astype(b.dtype), start, 0)
    return dh, dw, db

  dh, dw, db = _vocab_loop(block, init, v, min(cfg.accel_block, v))
  if put is not None:
    dw, db = put(dw, db)
  loss, d_eps, d_zl, stats = jax.tree.map(lambda a: a.reshape(nc, t),
                                          (loss, d_eps, d_zl, _stats_of(extras)))
  return loss, d_eps, d_zl, dh.astype(h3.dtype).reshape(nc, t, d), dw, db, stats


_nonzero = _checks.nonzero_tangent


def _dot(a, b) -> jax.Array:
  return jnp.sum(a.astype(jnp.result_type(a, b)) * b.astype(jnp.result_type(a, b)))


def _option_tangent(cfg, dcfg, d_eps, d_zl):
  """Per-token tangent from label_smoothing and z_loss (their slopes times their tangents)."""
  out = 0.0
  if cfg.eps is not None and _nonzero(dcfg.eps):
    out = out + d_eps * dcfg.eps
  if cfg.zl is not None and _nonzero(dcfg.zl):
    out = out + d_zl * dcfg.zl
  return out


# ---------------------------------------------------------------- "forward" (scalar loss)
#
# With a scalar loss the cotangent is known up to one number, so the forward of the tangent
# rule computes the full gradients chunk by chunk (Liger's way) and the tangent is their inner
# product with the input tangents: linear, and transposed by JAX into a scaling of the saved
# gradients. Evaluated without differentiation, the loss pays for no gradient.


@jax.custom_jvp
def _fused_sum(h3, w, b, y2, v2, scale, cfg):
  """(sum of the losses times ``scale``, the statistics: ``_stats_of``)."""
  loss, _, _, _, extras = _forward_losses(h3, w, b, y2, v2, cfg)
  return jnp.sum(loss * scale), _stats_of(extras)


@_fused_sum.defjvp
def _fused_sum_jvp(primals, tangents):
  h3, w, b, y2, v2, scale, cfg = primals
  dh3, dw_t, db_t, _, _, dscale, dcfg = tangents
  loss, d_eps, d_zl, dh, dw, db, stats = _grads(h3, w, b, y2, v2, scale, cfg)
  out = jnp.sum(loss * scale)
  tangent = jnp.zeros((), out.dtype)
  if _nonzero(dscale):  # per-token weights (and a mean's weighted denominator)
    tangent = tangent + jnp.sum(loss * dscale)
  if _nonzero(dh3):
    tangent = tangent + _dot(dh, dh3)
  if _nonzero(dw_t):
    tangent = tangent + _dot(dw, dw_t)
  if b is not None and _nonzero(db_t):
    tangent = tangent + _dot(db, db_t)
  tangent = tangent + jnp.sum(scale * _option_tangent(cfg, dcfg, d_eps, d_zl))
  return (out, stats), (tangent.astype(out.dtype), _zero_tangents(stats))


_fused_sum.defjvp(_fused_sum_jvp, symbolic_zeros=True)


# ------------------------------------------------------------- "recompute" (any cotangent)
#
# Cut Cross-Entropy's way: the forward keeps the per-token logsumexp; the tangent recomputes
# each chunk's logits inside a checkpointed scan body, so that reverse mode (its transpose)
# keeps only the inputs and lse and recomputes the block again.


@jax.custom_jvp
def _fused_tokens(h3, w, b, y2, v2, cfg):
  """Per-token (losses, logsumexps, statistics: ``_stats_of``), [n_chunks, T]."""
  loss, lse, _, _, extras = _forward_losses(h3, w, b, y2, v2, cfg)
  return loss, lse, _stats_of(extras)


def _block_tangent(h, y, valid, lse, dh, w, b, dw, db, cfg, start, v):
  """(d loss, d lse) of one chunk of tokens, from the vocabulary slice ``start:start + S``
  of the weight (w, b, and their tangents dw, db, all sliced), for tangents dh, dW, db."""
  z, tanh = _logits(h, w, b, cfg)
  ones = jnp.ones(lse.shape, cfg.acc)
  # Dropped tokens: 0, whatever their logits hold (their lse keeps its own tangent below).
  g = jnp.where(valid[:, None],
                _chunk_dlogits(z, None, lse, y, valid, ones, None, cfg, start, v), 0)
  p = jnp.exp(z - jnp.where(jnp.isfinite(lse), lse, 0)[:, None])
  plain = _Config(None, None, None, cfg.layout, 0, cfg.acc)  # h @ W alone: linear pieces
  dzb = jnp.zeros(z.shape, cfg.acc)
  if dh is not None:
    dzb = dzb + _logits(dh, w, None, plain)[0]
  if dw is not None:
    dzb = dzb + _logits(h, dw, None, plain)[0]
  if db is not None:
    dzb = dzb + db.astype(cfg.acc)
  if tanh is not None:
    dzb = dzb * (1 - tanh * tanh)
  return jnp.sum(g * dzb, axis=-1), jnp.sum(p * dzb, axis=-1)


def _tokens_tangent(h3, y2, v2, lse, dh3, w, b, dw, db, cfg, block=None):
  """(d loss, d lse), [n_chunks, T], one vocabulary slice at a time (outer loop) and one
  chunk of tokens at a time (inner scan), both checkpointed.

  With the slices outside, the tangent is linear in dW through one slice per step, so its
  transpose (reverse mode) adds h^T(.) into each slice of the weight's cotangent in place:
  no [D, V] temporary per chunk of tokens, and the residuals are the inputs and lse alone.

  ``block`` (default ``_block_tangent``) computes one chunk's tangents from one slice; the
  per-token residuals ``lse`` may be any pytree of [n_chunks, T] arrays, and the tangents
  any tuple of [T] arrays that add up over the slices. ``h3``, ``w``, ``b`` and their
  tangents may be pytrees (e.g. a student's and a teacher's head over one vocabulary).
  """
  block = _block_tangent if block is None else block
  w0 = jax.tree.leaves(w)[0]  # w may be a pytree of weights (several heads, one vocabulary)
  v = w0.shape[1] if cfg.layout == "dv" else w0.shape[0]
  step = min(2 * cfg.vocab_slice, v)
  axis = 1 if cfg.layout == "dv" else 0

  def chunks(start, size, w, b, dw, db):
    # The slices are taken inside the checkpoint: its residuals are then the whole
    # (loop-invariant) inputs, not a stacked copy of the weight, one slice per step.
    cut = lambda a, ax: jax.tree.map(
        lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, ax), a)
    w_j, b_j, dw_j, db_j = cut(w, axis), cut(b, 0), cut(dw, axis), cut(db, 0)

    def body(_, xs):
      h, y, valid, res, dh = xs
      return None, block(h, y, valid, res, dh, w_j, b_j, dw_j, db_j, cfg, start, v)
    return jax.lax.scan(jax.checkpoint(body), None, (h3, y2, v2, lse, dh3))[1]

  def one_slice(start, size):
    return jax.checkpoint(chunks, static_argnums=(1,))(start, size, w, b, dw, db)

  # The per-slice tangents are stacked ([slices, n_chunks, T], small) and summed after the
  # loop rather than carried: a carry would need the inputs' varying mesh axes under
  # shard_map.
  full = v // step
  out = jax.lax.scan(lambda _, j: (None, one_slice(j * step, step)), None,
                     jnp.arange(full))[1]
  out = jax.tree.map(lambda a: jnp.sum(a, axis=0), out)
  if v % step:
    out = jax.tree.map(jnp.add, out, one_slice(full * step, v % step))
  return out


def _fused_tokens_jvp(primals, tangents):
  h3, w, b, y2, v2, cfg = primals
  dh3, dw_t, db_t, _, _, dcfg = tangents
  loss, lse, d_eps, d_zl, extras = _forward_losses(h3, w, b, y2, v2, cfg)
  stats = _stats_of(extras)
  dloss = jnp.zeros_like(loss) + _option_tangent(cfg, dcfg, d_eps, d_zl)
  dlse = jnp.zeros_like(lse)
  dh3 = dh3 if _nonzero(dh3) else None
  dw_t = dw_t if _nonzero(dw_t) else None
  db_t = db_t if (b is not None and _nonzero(db_t)) else None
  if dh3 is not None or dw_t is not None or db_t is not None:
    dl, ds = _tokens_tangent(h3, y2, v2, lse, dh3, w, b, dw_t, db_t, cfg)
    dloss, dlse = dloss + (dl * extras["p"] if cfg.scaled else dl), dlse + ds
  return (loss, lse, stats), (dloss, dlse, _zero_tangents(stats))


_fused_tokens.defjvp(_fused_tokens_jvp, symbolic_zeros=True)


# ------------------------------------------------------------------------------ public


def check_head(hidden, weight, labels, bias, weight_layout):
  """Trace-time checks of a linear head's inputs; returns them as arrays and V."""
  if weight_layout not in ("dv", "vd"):
    raise ValueError(f"weight_layout must be 'dv' or 'vd', got {weight_layout!r}.")
  hidden = _checks.as_array(hidden, "hidden")
  weight = _checks.as_array(weight, "weight")
  for name, x in (("hidden", hidden), ("weight", weight)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
  if hidden.ndim < 1 or weight.ndim != 2:
    raise ValueError(f"hidden must be [..., D] and weight 2-D, got hidden.shape={hidden.shape}"
                     f" and weight.shape={weight.shape}.")
  d = hidden.shape[-1]
  d_w, v = weight.shape if weight_layout == "dv" else weight.shape[::-1]
  if v == 0:
    raise ValueError(f"weight has an empty vocabulary (V = 0): weight.shape={weight.shape}.")
  if d_w != d:
    raise ValueError(
        f"hidden's last dimension ({d}) must match weight's D for weight_layout="
        f"{weight_layout!r}, got hidden.shape={hidden.shape} and weight.shape={weight.shape}.")
  batch_shape = hidden.shape[:-1]
  if labels is not None:
    labels = _checks.integer(labels, "labels")
    if labels.shape != batch_shape:
      raise ValueError(f"labels must have hidden's shape without D, i.e. {batch_shape}, got "
                       f"labels.shape={labels.shape}.")
  if bias is not None:
    bias = jnp.asarray(bias)
    if bias.shape != (v,):
      raise ValueError(f"bias must have shape ({v},), got bias.shape={bias.shape}.")
  return hidden, weight, labels, bias, v


def shift_targets(shift, hidden, labels, where, weights, name):
  """Next-token alignment without moving ``hidden``: position ``t`` (on labels' last axis)
  takes ``labels[..., t + k]`` as its target, with that target's ``where`` and ``weights``,
  and the last ``k`` positions are dropped. Returns ``(labels, where, weights, cut)``;
  ``cut`` keeps a per-position output's first ``T - k`` positions (None for ``k = 0``)."""
  if not isinstance(shift, (bool, int, np.bool_, np.integer)):
    raise TypeError(f"shift must be a Python int (it fixes the outputs' shape), got {shift!r}.")
  k = int(shift)
  if k == 0:
    return labels, where, weights, None
  labels = _checks.integer(labels, "labels")
  batch_shape = jnp.shape(hidden)[:-1]
  if labels.ndim < 1 or labels.shape != batch_shape:
    raise ValueError(f"{name} with shift needs labels [..., T] of hidden's shape without D, "
                     f"got hidden.shape={jnp.shape(hidden)} and labels.shape={labels.shape}.")
  t = labels.shape[-1]
  if not 0 < k < t:
    raise ValueError(f"shift must be in [0, T) for T={t} positions on labels' last axis, got "
                     f"shift={k}.")
  widths = [(0, 0)] * (labels.ndim - 1) + [(0, k)]
  ahead = lambda a, fill: jnp.pad(a[..., k:], widths, constant_values=fill)
  for arg, x in (("where", where), ("weights", weights)):
    if x is not None and jnp.shape(x) != batch_shape:
      raise ValueError(f"{arg} must have labels' shape {batch_shape}, got "
                       f"{arg}.shape={jnp.shape(x)}.")
  if where is None:
    where = jnp.ones_like(labels, dtype=bool)
  elif jnp.asarray(where).dtype != jnp.bool_:
    raise ValueError(f"where must be a boolean mask, got dtype {jnp.asarray(where).dtype}.")
  where = ahead(jnp.asarray(where), False)
  if weights is not None:
    weights = ahead(_checks.floating(weights, "weights"), 0)
  return ahead(labels, 0), where, weights, lambda a: a[..., :t - k]


def cut_outputs(outs, cut, per_position):
  """A shifted call's outputs: every per-position array cut to ``T - k`` positions (the
  first output only if ``per_position``; later ones, the logsumexp and statistics, always)."""
  if not isinstance(outs, tuple):
    return cut(outs) if per_position else outs
  first = cut(outs[0]) if per_position else outs[0]
  return (first,) + tuple(jax.tree.map(cut, o) for o in outs[1:])


def chunk_tokens(hidden, labels, where, ignore_index, v, chunk_size, name):
  """Flattens the tokens and cuts them into chunks (the last padded with dropped tokens):
  ``(h3 [n_chunks, T, D], y2 [n_chunks, T] int32, v2 [n_chunks, T] kept, N, T)``. Labels
  may be None (all 0). A kept label outside [0, V) is a value check (checkify)."""
  batch_shape = hidden.shape[:-1]
  d = hidden.shape[-1]
  try:
    n = int(np.prod([int(s) for s in batch_shape], dtype=np.int64))
  except (TypeError, jax.errors.ConcretizationTypeError, _symbolic_dim_error()) as e:
    raise ValueError(
        f"{name} needs a static number of tokens N to cut it into chunks, got "
        f"hidden.shape={hidden.shape} with a symbolic token dimension; export it for a fixed N "
        "(or use the dense function on the logits).") from e
  h2 = hidden.reshape(n, d)
  y = jnp.zeros(n, jnp.int32) if labels is None else labels.reshape(n)
  valid = jnp.ones(n, bool)
  if ignore_index is not None:
    valid = valid & (y != ignore_index)
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape != batch_shape:
      raise ValueError(f"where must be a boolean mask of shape {batch_shape}, got "
                       f"{where.dtype} {where.shape}.")
    valid = valid & where.reshape(n)
  if labels is not None:
    _checks.value_check(jnp.all(~valid | ((y >= 0) & (y < v))),
                         f"labels out of range [0, {v}) for some kept token.")
  _checks.check_logits(h2, valid, "hidden")
  y = y.astype(jnp.int32)  # a kept label outside [0, V) gives NaN

  t = default_chunk_size(n, v) if chunk_size is None else int(chunk_size)
  if t <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size!r}.")
  n_chunks = -(-n // t)
  pad = n_chunks * t - n
  if pad:
    h2 = jnp.pad(h2, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad))
    valid = jnp.pad(valid, (0, pad))
  return h2.reshape(n_chunks, t, d), y.reshape(n_chunks, t), valid.reshape(n_chunks, t), n, t


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    return_lse: bool = False,
    method: str = "auto",
    weights: ArrayLike | None = None,
    class_weights: ArrayLike | None = None,
    gradient_filter: float | None = None,
    return_stats: bool = False,
    token_scaling: bool = False,
    shift: int = 0,
) -> jax.Array | tuple:
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
    weight_layout: ``"dv"`` or ``"vd"``. On XLA:CPU, ``"vd"`` costs one transposed copy
      of the weight in scratch (the CPU dot wants the weight's D leading; measured with
      ``memory_analysis()``: 8% of the unfused scratch at N=8192, D=1024, V=65536 against
      under 2% for ``"dv"``).
    ignore_index: label value whose tokens are ignored (loss 0, gradient 0, not counted).
    where: boolean ``[...]`` mask of tokens to keep.
    label_smoothing: :math:`\varepsilon` in [0, 1].
    z_loss: coefficient of :math:`\mathrm{logsumexp}^2` per token.
    logit_softcap: ``c > 0`` or None.
    reduction: ``"mean"`` (over kept tokens; 0 if none), ``"sum"`` or ``"none"``.
    chunk_size: tokens per chunk; default: a ``[chunk, V]`` float32 block of ~64 MiB. On
      GPU and TPU the loss and the forward method's gradients take blocks of vocabulary
      columns for all tokens instead (``[N, block]`` float32 logits of ~128 MiB; their
      backward products in the inputs' dtype, float32-accumulated), and ``chunk_size``
      applies to the recompute method's derivative only.
    return_lse: also return the per-token logsumexp ``[...]`` (differentiable).
    method: ``"auto"``, ``"forward"`` (gradients computed in the forward pass; scalar
      reductions only) or ``"recompute"``.
    weights: optional float ``[...]`` per-token weights :math:`w_i` (differentiable):
      ``"none"`` returns :math:`w_i \ell_i`, ``"sum"`` :math:`\sum_i w_i \ell_i` and
      ``"mean"`` :math:`\sum_i w_i \ell_i / \sum_i w_i` over kept tokens (0 if that sum is
      0), as PyTorch's class weights divide.
    class_weights: optional float ``[V]`` weights :math:`c_v` (differentiable), with the
      dense loss's semantics (PyTorch's ``weight``): per token
      :math:`(1-\varepsilon) c_y (-\log p_y) + \tfrac{\varepsilon}{V} \sum_v c_v (-\log p_v)
      + z_{\text{loss}} \mathrm{lse}^2`, and ``"mean"`` divides by :math:`\sum_i c_{y_i}`
      over kept tokens (times ``weights`` when both are given). Without smoothing and z-loss
      they are per-token weights :math:`c_{y_i}` (every method); with either, the loss is
      formed from the per-token NLL and logsumexp (the recompute method; ``"forward"``
      raises) and, with
      smoothing, :math:`\sum_v c_v z_v = h \cdot (W c) + b \cdot c`, which
      ``logit_softcap`` would make non-linear (that combination raises).
    gradient_filter: None (exact gradients) or ``eps`` in (0, 1): an approximate gradient
      that skips the backward products of every block of logits whose softmax entries are
      all below ``eps`` (Cut Cross-Entropy's ``filter_eps``; its default for bfloat16 is
      ``2**-12``). Such a block keeps its label and smoothing terms exactly and drops its
      softmax terms, each under ``eps`` times the token's cotangent. Blocks are
      ``[chunk_size, 1024]`` on CPU; on GPU/TPU ``[64, 64]`` tiles of each ``[N, vocabulary
      block]`` block, the block computing only its tiles with an entry of at least ``eps``
      when they are at most 1/64 of its tiles (on NVIDIA GPUs, Pallas kernels: 1/8), and all
      of them otherwise. The loss is exact; every derivative mode uses the filtered
      gradient. It pays only where such entries are rare (measured with random logits,
      benchmarks/RESULTS.md: on an H200 with the kernels 0.81-0.83x the exact time at
      V = 256000, 0.98-1.05x Cut Cross-Entropy's filtered time; 1.06-1.09x the exact time
      at V = 128256, where no block qualified). Needs the forward
      method (a ``"mean"`` or ``"sum"`` loss, no ``return_lse``); not with
      ``label_smoothing`` and ``logit_softcap`` together.
    return_stats: also return a :class:`TokenStats` of ``[...]`` arrays from the loss's own
      pass over the blocks (no second matrix product): ``logsumexp``, ``entropy`` (of the
      softmax of the capped logits), ``argmax`` (int32, the greedy prediction: accuracy is
      ``stats.argmax == labels`` over kept tokens) and ``label_log_prob``
      (:math:`\log p_y`; NaN for a kept label outside ``[0, V)``), as
      :func:`linear_token_stats` computes them; 0 on dropped tokens. Every method, the
      forward method and ``gradient_filter`` included (Liger's ``return_token_accuracy``,
      ``return_predicted_tokens``; its ``return_z_loss`` is ``z_loss * logsumexp**2``). Not
      differentiable (zero derivatives; ``return_lse`` gives a differentiable logsumexp).
    token_scaling: multiply each kept token's loss (every term of it) by its label's
      probability :math:`p_y = \mathrm{softmax}(z)_y`, held constant
      (``stop_gradient``): per token :math:`\mathrm{sg}(p_y)\,\ell`, whose gradient is
      :math:`p_y` times the token's own (Liger's ``use_token_scaling``; with no other
      option, the loss :math:`-\mathrm{sg}(p_y) \log p_y` of Dynamic Fine-Tuning). The
      factor is part of the loss, not a weight: ``"mean"`` still divides by the number of
      kept tokens (or the weights' sum). Every method.
    shift: ``k >= 0`` (a Python int; ``True`` is 1): next-token prediction without slicing
      ``hidden``. The position ``t`` of ``hidden [..., T, D]`` is scored on
      ``labels[..., t + k]``, so the loss is that of ``hidden[..., :T-k, :]`` on
      ``labels[..., k:]``, the last ``k`` positions taking no part (no loss, no gradient).
      ``ignore_index``, ``where`` and ``weights`` belong to the labels (the targets) and
      move with them. Per-position outputs (``"none"``, ``return_lse``, ``return_stats``)
      are ``[..., T-k]``. Cut Cross-Entropy's ``shift``.

  Returns:
    The loss (scalar, or ``[...]`` for ``"none"``), then the logsumexp if ``return_lse``,
    then the :class:`TokenStats` if ``return_stats``.
    A label's loss keeps its relative accuracy where it is tiny (a confident correct
    prediction: 1e-8, not 0). The gradient is formed from the logsumexp as one number:
    at logits offset by a large constant (1e4) it rounds at that magnitude's resolution
    (float32: about 2^-10 of each probability there; the dense losses keep the offset
    apart).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((6, 4)); w = jnp.zeros((4, 10)); y = jnp.arange(6)
  >>> float(jxent.linear_cross_entropy(h, w, y))  # uniform over 10 classes  # doctest: +ELLIPSIS
  2.302585...
  >>> h, w = jnp.eye(4), 3 * jnp.eye(4)  # token i's top class is i
  >>> loss, stats = jxent.linear_cross_entropy(h, w, jnp.array([0, 1, 2, 0]),
  ...                                          return_stats=True)
  >>> stats.argmax
  Array([0, 1, 2, 3], dtype=int32)
  """
  _checks.reduction(reduction)
  labels, where, weights, cut = shift_targets(shift, hidden, labels, where, weights,
                                              "linear_cross_entropy")
  if cut is not None:
    outs = linear_cross_entropy(
        hidden, weight, labels, bias=bias, weight_layout=weight_layout,
        ignore_index=ignore_index, where=where, label_smoothing=label_smoothing, z_loss=z_loss,
        logit_softcap=logit_softcap, reduction=reduction, chunk_size=chunk_size,
        return_lse=return_lse, method=method, weights=weights, class_weights=class_weights,
        gradient_filter=gradient_filter, return_stats=return_stats,
        token_scaling=token_scaling)
    return cut_outputs(outs, cut, reduction == "none")
  if method not in ("auto", "forward", "recompute"):
    raise ValueError(f"method must be 'auto', 'forward' or 'recompute', got {method!r}.")
  return_stats = _checks.static_bool(return_stats, "return_stats")
  token_scaling = _checks.static_bool(token_scaling, "token_scaling")
  hidden, weight, labels, bias, v = check_head(hidden, weight, labels, bias, weight_layout)
  softcap = None
  if logit_softcap is not None:
    softcap = _checks.static_number(logit_softcap, "logit_softcap")
    if not softcap > 0:
      raise ValueError(f"logit_softcap must be positive, got {logit_softcap!r}.")
  acc = jnp.float64 if jnp.float64 in (hidden.dtype, weight.dtype) else jnp.float32
  opts = _checks.CEOptions.make(label_smoothing, z_loss, acc)
  filter_eps = _filter_eps(gradient_filter, opts, softcap, method, reduction, return_lse)

  if class_weights is not None:
    return _with_class_weights(
        hidden, weight, labels, class_weights, opts, v, acc, bias=bias,
        weight_layout=weight_layout, ignore_index=ignore_index, where=where,
        logit_softcap=logit_softcap, reduction=reduction, chunk_size=chunk_size,
        return_lse=return_lse, method=method, weights=weights, gradient_filter=filter_eps,
        return_stats=return_stats, token_scaling=token_scaling)

  if explicitly_sharded(hidden) or explicitly_sharded(labels):
    if filter_eps is not None:
      raise ValueError("gradient_filter is not supported with tokens laid out over an "
                       "explicit mesh (each device's loss there is per token); call "
                       "linear_cross_entropy inside shard_map instead.")
    return _data_parallel(
        hidden, weight, labels, bias=bias, weight_layout=weight_layout,
        ignore_index=ignore_index, where=where, label_smoothing=label_smoothing, z_loss=z_loss,
        logit_softcap=logit_softcap, reduction=reduction, chunk_size=chunk_size,
        return_lse=return_lse, method=method, weights=weights, return_stats=return_stats,
        token_scaling=token_scaling)

  batch_shape = hidden.shape[:-1]
  h3, y2, v2, n, t = chunk_tokens(hidden, labels, where, ignore_index, v, chunk_size,
                                  "linear_cross_entropy")
  n_chunks = h3.shape[0]
  valid = v2.reshape(-1)

  cfg = _Config(opts.label_smoothing, opts.z_loss, softcap, weight_layout, _VOCAB_SLICE, acc,
                accelerator_vocab_block(n_chunks * t, v), filter_eps,
                kernels=_pallas.setting() if filter_eps is not None else "off",
                stats=return_stats, scaled=token_scaling)
  count = jnp.sum(valid).astype(acc)

  scalar = reduction in ("mean", "sum") and not return_lse
  if method == "forward" and not scalar:
    raise ValueError("method='forward' needs a scalar loss: reduction 'mean' or 'sum' and "
                     "return_lse=False.")
  wt = None
  if weights is not None:
    wt = _checks.floating(weights, "weights")
    if wt.shape != batch_shape:
      raise ValueError(f"weights must have hidden's shape without D, i.e. {batch_shape}, got "
                       f"weights.shape={wt.shape}.")
    wt = jnp.where(valid[:n], wt.reshape(n).astype(acc), 0)
    count = jnp.sum(wt)
  if scalar and method != "recompute":
    if wt is None:
      scale = jnp.ones((n_chunks, t), acc)
    else:
      scale = jnp.pad(wt, (0, n_chunks * t - n)).reshape(n_chunks, t)
    if reduction == "mean":
      scale = scale / jnp.where(count == 0, 1, count)
    out, st = _fused_sum(h3, weight, bias, y2, v2, scale, cfg)
    return (out, _token_stats(st, valid, n, batch_shape)) if return_stats else out

  loss, lse, st = _fused_tokens(h3, weight, bias, y2, v2, cfg)
  loss = loss.reshape(-1)[:n]
  if wt is not None:
    loss = loss * wt
  out = _checks.reduce(loss, reduction, count)
  if reduction == "none":
    out = out.reshape(batch_shape)
  outs = (out,)
  if return_lse:
    outs += (lse.reshape(-1)[:n].reshape(batch_shape),)
  if return_stats:
    outs += (_token_stats(st, valid, n, batch_shape),)
  return outs if len(outs) > 1 else out


def _token_stats(st, valid, n, batch_shape) -> S.TokenStats:
  """``return_stats``'s :class:`TokenStats` from the per-token statistics ([n_chunks, T]):
  0 on dropped tokens, as ``linear_token_stats``."""
  keep = lambda a: jnp.where(valid[:n], a.reshape(-1)[:n], 0).reshape(batch_shape)
  return S.TokenStats(keep(st["lse"]), keep(st["ent"]), keep(st["am"]), keep(-st["nll"]))


def _filter_eps(gradient_filter, opts, softcap, method, reduction, return_lse):
  """The checked ``gradient_filter`` (a Python float or None)."""
  if gradient_filter is None:
    return None
  eps = _checks.static_number(gradient_filter, "gradient_filter")
  if not 0 < eps < 1:
    raise ValueError(f"gradient_filter must be in (0, 1) or None, got {gradient_filter!r}.")
  if method == "recompute" or reduction == "none" or return_lse:
    raise ValueError("gradient_filter needs the forward method: reduction 'mean' or 'sum', "
                     "return_lse=False and method 'auto' or 'forward'.")
  if opts.label_smoothing is not None and softcap is not None:
    raise ValueError("gradient_filter with label_smoothing and logit_softcap together is not "
                     "supported (the smoothing term of a skipped block is then not uniform).")
  return float(eps)


def _with_class_weights(hidden, weight, labels, class_weights, opts, v, acc, *, bias,
                        weight_layout, ignore_index, where, logit_softcap, reduction,
                        chunk_size, return_lse, method, weights, gradient_filter,
                        return_stats, token_scaling):
  """``linear_cross_entropy`` with ``class_weights``, from the unweighted fused loss."""
  cw = class_weights_array(class_weights, v, acc)  # the dense loss's check and dtype
  if weights is not None and jnp.shape(weights) != labels.shape:
    raise ValueError(f"weights must have hidden's shape without D, i.e. {labels.shape}, got "
                     f"weights.shape={jnp.shape(weights)}.")
  keep = jnp.ones(labels.shape, bool) if where is None else jnp.asarray(where)
  if ignore_index is not None:
    keep = keep & (labels != ignore_index)
  c_y = jnp.where(keep, R.take_weights(cw, jnp.clip(labels, 0, v - 1)), 0)
  tw = c_y if weights is None else c_y * _checks.floating(weights, "weights").astype(acc)
  common = dict(bias=bias, weight_layout=weight_layout, ignore_index=ignore_index,
                where=where, logit_softcap=logit_softcap, chunk_size=chunk_size,
                return_stats=return_stats)
  eps, zl = opts.label_smoothing, opts.z_loss
  if eps is None and zl is None:
    # The class weights are then per-token weights c_y, and the mean divides by their sum.
    return linear_cross_entropy(hidden, weight, labels, reduction=reduction,
                                return_lse=return_lse, method=method, weights=tw,
                                gradient_filter=gradient_filter, token_scaling=token_scaling,
                                **common)
  if gradient_filter is not None:
    raise ValueError("gradient_filter with class_weights needs label_smoothing=0 and "
                     "z_loss=0 (with either, the loss takes the recompute method).")
  if eps is not None and logit_softcap is not None:
    raise ValueError("linear_cross_entropy with class_weights, label_smoothing and "
                     "logit_softcap together is not supported: the smoothing term needs the "
                     "class-weighted sum of the capped logits, which is not linear in h.")
  if method == "forward":
    raise ValueError("method='forward' with class_weights needs label_smoothing=0 and "
                     "z_loss=0 (with either, the loss is formed from the per-token NLL and "
                     "logsumexp of the recompute method).")
  nll, lse, *stats = linear_cross_entropy(hidden, weight, labels, reduction="none",
                                          return_lse=True, method="recompute", **common)
  loss = nll * c_y if eps is None else (1 - eps) * c_y * nll
  if eps is not None:
    # (eps / V) sum_v c_v (lse - z_v), with sum_v c_v z_v = h . (W c) + b . c.
    wc = (jnp.dot(weight.astype(acc), cw) if weight_layout == "dv"
          else jnp.dot(cw, weight.astype(acc)))
    s_z = jnp.dot(jnp.where(keep[..., None], hidden, 0).astype(acc), wc)
    if bias is not None:
      s_z = s_z + jnp.dot(jnp.asarray(bias).astype(acc), cw)
    loss = loss + jnp.where(keep, (eps / v) * (jnp.sum(cw) * lse - s_z), 0)
  if zl is not None:
    loss = loss + jnp.where(keep, zl * lse * lse, 0)
  if token_scaling:  # p_y held constant (nll is 0 on dropped tokens: a factor of 1)
    loss = loss * jnp.exp(-jax.lax.stop_gradient(nll))
  if weights is not None:
    loss = loss * _checks.floating(weights, "weights").astype(acc)
  outs = (_checks.reduce(loss, reduction, jnp.sum(tw)),) + ((lse,) if return_lse else ())
  outs += tuple(stats)
  return outs if len(outs) > 1 else outs[0]


def _data_parallel(hidden, weight, labels, *, where, reduction, return_lse, weights,
                   return_stats, **options):
  """``linear_cross_entropy`` of tokens laid out over explicit mesh axes: each device runs the
  chunked loss on its own tokens inside ``shard_map`` and only the scalar sum and count (for
  "mean"/"sum") cross devices. The weight and bias must be replicated."""
  mesh = jax.typeof(hidden).sharding.mesh if explicitly_sharded(hidden) else \
      jax.typeof(labels).sharding.mesh
  h_spec = jax.typeof(hidden).sharding.spec
  batch = tuple(h_spec)[:hidden.ndim - 1] + (None,) * (hidden.ndim - 1 - len(tuple(h_spec)))
  if tuple(h_spec)[hidden.ndim - 1:hidden.ndim] not in ((), (None,)):
    raise ValueError(f"hidden may be sharded over its token axes only, got spec {h_spec}.")
  for name, x in (("weight", weight), ("bias", options.get("bias"))):
    if x is not None and explicitly_sharded(x):
      raise ValueError(f"linear_cross_entropy needs {name} replicated, got spec "
                       f"{jax.typeof(x).sharding.spec}; for a vocabulary split over devices use "
                       "jxent.sharded.vocab_parallel_linear_cross_entropy.")
  axes = tuple(a for p in batch if p is not None for a in (p if isinstance(p, tuple) else (p,)))
  tok = P(*batch)
  bias = options.pop("bias")
  mask = None if where is None else jnp.asarray(where)

  def local(h, w, y, b, m, tw):
    per = linear_cross_entropy(h, w, y, bias=b, where=m, reduction="none",
                               return_lse=return_lse, weights=tw, return_stats=return_stats,
                               **options)
    if reduction == "none":
      return per
    stats = (per[-1],) if return_stats else ()
    per = per[0] if (return_lse or return_stats) else per
    keep = jnp.ones(y.shape, bool) if m is None else m
    if options.get("ignore_index") is not None:
      keep = keep & (y != options["ignore_index"])
    total = jax.lax.psum(jnp.sum(per), axes)
    kept = keep.astype(total.dtype) if tw is None else jnp.where(keep, tw, 0).astype(total.dtype)
    count = jax.lax.psum(jnp.sum(kept), axes)
    out = total if reduction == "sum" else _checks.mean_of(total, count)
    return (out,) + stats if stats else out

  out_specs = tok if reduction == "none" else P()
  if return_lse:
    out_specs = (tok, tok) if reduction == "none" else P()
    if reduction != "none":
      raise ValueError("return_lse with tokens sharded over a mesh needs reduction='none'.")
  if return_stats:
    specs = out_specs if isinstance(out_specs, tuple) else (out_specs,)
    out_specs = specs + (S.TokenStats(tok, tok, tok, tok),)
  tw = None if weights is None else jnp.asarray(weights)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(*batch, None), P(), tok, P(),
                                                  None if mask is None else tok,
                                                  None if tw is None else tok),
                     out_specs=out_specs)
  return fn(hidden, weight, labels, bias, mask, tw)
