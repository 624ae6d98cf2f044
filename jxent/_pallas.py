"""The gradient filter's tile products as Pallas kernels (Triton on NVIDIA GPUs).

The accelerator form of :func:`jxent.linear_cross_entropy` with ``gradient_filter`` holds one
block of logits ``z`` ([N, S] float32, S vocabulary columns, all tokens) and a flag per
[tb, tv] tile telling whether the tile has a softmax entry of at least eps. Only the loud
tiles' terms of the logits' gradient, ``dz = coef_i exp(z_ij - lse_i)`` (times the softcap's
slope), enter the two products

    dh[N, D]  += dz W_j            (W_j: the block's S rows of W, or its S columns)
    dW_j[S, D] = dz^T h            (and db_j = the column sums of dz, with a bias)

XLA computes them by gathering the loud tiles into batched products and scatter-adding the
results (``_fused._filtered_block``). Here each is a block-sparse product instead: a program
owns one [tb, bd] tile of dh (or one [tv, bd] tile of dW_j), walks the tiles of its token
(or vocabulary) stripe, skips the quiet ones, and for a loud one recomputes that tile's dz
from z and accumulates its product in float32 registers: no gather, no scatter, no float32
[N, S] gradient, nothing written but the outputs. The accumulation over tiles is in float32
(as XLA's), so the result is the XLA form's up to the order of the float32 sums.

The kernels are written for the Triton lowering (``compiler_params``: Triton's); elsewhere
(CPU, the tests) they run in Pallas interpret mode, which evaluates the same kernel body.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_USE = contextvars.ContextVar("jxent_pallas_filter", default=None)


@contextlib.contextmanager
def use_pallas_filter(enabled: bool | None = True):
  """Within this context (at trace time) the accelerator form's filtered tiles take the
  Pallas kernels below (``True``: compiled with Triton when lowered for an NVIDIA GPU,
  interpreted on every other platform) or XLA's gathered products everywhere (``False``).
  ``None``, the default outside any context: the kernels on NVIDIA GPUs, where they were
  measured faster (``benchmarks/RESULTS.md``), and XLA's gathered products elsewhere."""
  token = _USE.set(None if enabled is None else bool(enabled))
  try:
    yield
  finally:
    _USE.reset(token)


def setting() -> str:
  """The context's choice: ``"auto"`` (kernels on cuda only), ``"on"`` or ``"off"``."""
  use = _USE.get()
  return "auto" if use is None else ("on" if use else "off")


def d_block(d: int) -> int | None:
  """Columns of D per program: the largest of 128, 64, 32, 16 dividing ``d`` (Triton's
  products take dimensions of at least 16), or None when none does."""
  for bd in (128, 64, 32, 16):
    if d % bd == 0:
      return bd
  return None


def tile_grad(z, lse, coef, softcap):
  """dz of [..., tb, tv] tiles of capped logits ``z`` (the accumulation dtype) from their
  rows' ``lse`` and ``coef`` [..., tb], without the label terms (the kernels' and XLA's
  gathered tiles' common formula)."""
  dz = coef[..., None] * jnp.exp(z - lse[..., None])
  if softcap is not None:  # the cap's slope from the capped logit: tanh = z / cap
    t = z * (1 / softcap)
    dz = dz * (1 - t * t)
  return dz


def _dh_kernel(z_ref, lse_ref, coef_ref, loud_ref, w_ref, dh_in_ref, dh_ref, *, tb, tv, bd,
               vt, layout, softcap, low):
  i, k = pl.program_id(0), pl.program_id(1)
  rows, dcols = pl.ds(i * tb, tb), pl.ds(k * bd, bd)
  lse, coef = lse_ref[rows], coef_ref[rows]

  def tile(j, carry):
    def add(carry):
      acc, count = carry
      cols = pl.ds(j * tv, tv)
      g = tile_grad(z_ref[rows, cols], lse, coef, softcap).astype(low)
      if layout == "vd":  # W_j [S, D]: its [tv, bd] tile
        wt = w_ref[cols, dcols].astype(low)
      else:  # W_j [D, S]
        wt = w_ref[dcols, cols].astype(low).T
      return acc + jnp.dot(g, wt, preferred_element_type=acc.dtype), count + 1

    return jax.lax.cond(loud_ref[i, j] != 0, add, lambda c: c, carry)

  acc, count = jax.lax.fori_loop(0, vt, tile, (jnp.zeros((tb, bd), dh_ref.dtype), 0))

  # dh's buffer is the input's (aliased): a stripe without a loud tile leaves it as it is.
  @pl.when(count > 0)
  def _():
    dh_ref[rows, dcols] = dh_in_ref[rows, dcols] + acc


def _dw_kernel(z_ref, lse_ref, coef_ref, loud_ref, h_ref, *out_refs, tb, tv, bd, nt, layout,
               softcap, low, bias):
  dw_ref = out_refs[0]
  j, k = pl.program_id(0), pl.program_id(1)
  cols, dcols = pl.ds(j * tv, tv), pl.ds(k * bd, bd)

  def tile(i, carry):
    def add(carry):
      acc, db = carry
      rows = pl.ds(i * tb, tb)
      g = tile_grad(z_ref[rows, cols], lse_ref[rows], coef_ref[rows], softcap)
      acc = acc + jnp.dot(g.astype(low).T, h_ref[rows, dcols].astype(low),
                          preferred_element_type=acc.dtype)
      return acc, (db + jnp.sum(g, axis=0) if bias else db)

    return jax.lax.cond(loud_ref[i, j] != 0, add, lambda c: c, carry)

  init = (jnp.zeros((tv, bd), dw_ref.dtype), jnp.zeros((tv,), dw_ref.dtype))
  acc, db = jax.lax.fori_loop(0, nt, tile, init)
  if layout == "vd":
    dw_ref[cols, dcols] = acc
  else:
    dw_ref[dcols, cols] = acc.T
  if bias:
    db_ref = out_refs[1]

    @pl.when(k == 0)
    def _():
      db_ref[cols] = db


def _params():
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=4, num_stages=2)


def filtered_products(dh, z, lse, coef, loud, hl, w_j, *, tile, layout, softcap, low, bias,
                      interpret):
  """``(dh + dz W_j, dW_j, db_j or None)`` from the loud tiles of the block ``z``.

  dh: [N, D] and z: [N, S] (the block's capped logits) in the accumulation dtype (float32;
  float64 with float64 inputs); lse, coef: [N] in it too (lse finite: 0 where it is not);
  loud: [N / tb, S / tv] booleans; hl: [N, D] hidden rows in the products' dtype ``low``;
  w_j: the block's weights, [S, D] (``layout="vd"``) or [D, S]. dW_j comes in W_j's layout
  and db_j (``bias``, [S]) in the accumulation dtype.
  """
  n, s = z.shape
  acc = dh.dtype
  d = hl.shape[-1]
  tb, tv = tile
  nt, vt = n // tb, s // tv
  bd = d_block(d)
  loud = loud.astype(jnp.int32)
  kw = dict(tb=tb, tv=tv, bd=bd, layout=layout, softcap=softcap, low=low)
  extra = {} if interpret else dict(compiler_params=_params())
  dh = pl.pallas_call(
      functools.partial(_dh_kernel, vt=vt, **kw),
      out_shape=jax.ShapeDtypeStruct(dh.shape, acc), grid=(nt, d // bd),
      input_output_aliases={5: 0}, interpret=interpret, name="jxent_filtered_dh",
      **extra)(z, lse, coef, loud, w_j, dh)
  dw_shape = (s, d) if layout == "vd" else (d, s)
  outs = [jax.ShapeDtypeStruct(dw_shape, acc)]
  if bias:
    outs.append(jax.ShapeDtypeStruct((s,), acc))
  res = pl.pallas_call(
      functools.partial(_dw_kernel, nt=nt, bias=bias, **kw),
      out_shape=tuple(outs), grid=(vt, d // bd), interpret=interpret,
      name="jxent_filtered_dw", **extra)(z, lse, coef, loud, hl)
  return dh, res[0], (res[1] if bias else None)
