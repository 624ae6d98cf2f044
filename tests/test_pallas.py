"""The gradient filter's Pallas kernels (jxent/_pallas.py): interpreted on CPU, compiled with
Triton on an NVIDIA GPU, against a float64 NumPy formula; and their Triton lowering, checked
from a CPU host."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent import _fused, _pallas
from jxent._platform import use_implementation

N, S, D = 192, 192, 64  # 3 x 3 tiles of 64; D in one [*, 64] slice
TILE = (64, 64)
ON_GPU = jax.default_backend() == "gpu"


def _inputs(low):
  k = jax.random.split(jax.random.key(7), 6)
  z = jax.random.normal(k[0], (N, S)) * 2
  lse = jax.random.normal(k[1], (N,)) + 4
  coef = jax.random.uniform(k[2], (N,), minval=-1.0, maxval=2.0).at[5].set(0.0)
  loud = jnp.array([[1, 0, 1], [0, 0, 0], [0, 1, 1]], bool)  # token tile 1: no loud tile
  h = jax.random.normal(k[3], (N, D)).astype(low)
  w = (jax.random.normal(k[4], (S, D)) * 0.3).astype(low)
  dh0 = jax.random.normal(k[5], (N, D))
  return z, lse, coef, loud, h, w, dh0


def _want(z, lse, coef, loud, h, w, dh0, softcap):
  z, lse, coef, h, w, dh0 = (np.asarray(a, np.float64) for a in (z, lse, coef, h, w, dh0))
  g = coef[:, None] * np.exp(z - lse[:, None])
  if softcap is not None:
    g = g * (1 - (z / softcap) ** 2)
  g = g * np.kron(np.asarray(loud), np.ones(TILE))  # quiet tiles contribute nothing
  return dh0 + g @ w, g.T @ h, g.sum(0)


@pytest.mark.parametrize("layout,softcap,bias,low", [
    ("vd", None, True, jnp.float32), ("dv", 3.0, False, jnp.float32),
    ("vd", 3.0, True, jnp.bfloat16), ("dv", None, True, jnp.bfloat16)])
def test_kernels_against_float64_formula(layout, softcap, bias, low):
  # dh + dz W_j, dz^T h and the column sums of dz over the loud tiles only (token 5 has coef
  # 0; the middle token tile has no loud tile, its dh rows stay dh0's), for both layouts of
  # W_j, with and without the softcap's slope, float32 and bfloat16 product operands.
  # Interpreted on CPU, compiled on an NVIDIA GPU.
  z, lse, coef, loud, h, w, dh0 = _inputs(low)
  if softcap is not None:
    z = softcap * jnp.tanh(z / softcap)
  w_j = w if layout == "vd" else w.T
  f = jax.jit(functools.partial(_pallas.filtered_products, tile=TILE, layout=layout,
                                softcap=softcap, low=low, bias=bias, interpret=not ON_GPU))
  dh, dw, db = f(dh0, z, lse, coef, loud, h, w_j)
  want_dh, want_dw, want_db = _want(z, lse, coef, loud, h, w, dh0, softcap)
  # bfloat16 operands: dz rounded to 8 bits before its products, as XLA's gathered form does
  tol = 1e-5 if low == jnp.float32 else 2e-2
  scale = lambda a: np.abs(a).max()
  assert np.abs(np.asarray(dh) - want_dh).max() <= tol * scale(want_dh)
  dw = np.asarray(dw if layout == "vd" else dw.T)
  assert np.abs(dw - want_dw).max() <= tol * scale(want_dw)
  assert (db is None) == (not bias)
  if bias:
    assert np.abs(np.asarray(db) - want_db).max() <= 1e-5 * scale(want_db)
  np.testing.assert_array_equal(dh[64:128], dh0[64:128])


def test_fused_loss_through_the_kernels_matches_the_gathered_tiles(monkeypatch):
  # The whole filtered loss (accelerator form, blocks of 128 columns, 64 x 64 tiles, bias,
  # masked tokens, smoothing) with the kernels against XLA's gathered products: the same
  # tiles are computed, so value and gradients agree to float32 rounding.
  monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: min(128, v))
  monkeypatch.setattr(_fused, "_FILTER_TILES_KEPT", 4)
  monkeypatch.setattr(_fused, "_KERNEL_TILES_KEPT", 4)  # both forms tile the same blocks
  k = jax.random.split(jax.random.key(3), 4)
  n, d, v = 128, 32, 384
  h = jax.random.normal(k[0], (n, d))
  w = jax.random.normal(k[1], (v, d)) * 0.5
  b = jax.random.normal(k[2], (v,)).at[128:256].add(-9.0)  # a quiet middle block
  y = jax.random.randint(k[3], (n,), 0, v).at[7].set(-100)
  # Loud tiles per block (2 x 2 tiles each): the middle block has one, at most 4 // 4, and
  # takes the tiled form (the kernels); the others have all four and take the whole block.
  z = np.asarray(h @ w.T + b, np.float64)
  p = np.exp(z - np.log(np.exp(z).sum(1, keepdims=True)))
  p[7] = 0  # the dropped token
  tops = p.reshape(2, 64, 3, 2, 64).max(axis=(1, 4))  # [token tile, block, vocabulary tile]
  assert [int(np.sum(tops[:, j] >= 2e-3)) for j in range(3)] == [4, 1, 4]

  def loss(h, w, b):
    return jxent.linear_cross_entropy(h, w, y, bias=b, weight_layout="vd", ignore_index=-100,
                                      label_smoothing=0.1, gradient_filter=2e-3)

  def run(kernels):
    with use_implementation("accelerator"), _pallas.use_pallas_filter(kernels):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(h, w, b)

  got, want = run(True), run(False)
  exact = jax.grad(lambda *a: jxent.linear_cross_entropy(
      *a[:2], y, bias=a[2], weight_layout="vd", ignore_index=-100, label_smoothing=0.1),
      argnums=(0, 1, 2))(h, w, b)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  for g, x, e in zip(got[1], want[1], exact):
    scale = float(jnp.max(jnp.abs(x)))
    assert float(jnp.max(jnp.abs(g - x))) <= 1e-5 * scale
    assert float(jnp.max(jnp.abs(g - e))) > 1e-5 * scale  # some tiles were left out


@pytest.mark.skipif(ON_GPU, reason="the lowering is checked from a host without a GPU")
def test_kernels_lower_to_triton_from_a_cpu_host(monkeypatch):
  # Lowered for "cuda" (Triton), which needs no GPU: every op of both kernels has a Triton
  # lowering, and the filtered loss's program calls them (two Triton custom calls).
  monkeypatch.setattr(_fused, "_KERNEL_TILES_KEPT", 4)  # 6 tiles: the tiled form may run
  z, lse, coef, loud, h, w, dh0 = _inputs(jnp.bfloat16)
  for layout in ("vd", "dv"):
    f = functools.partial(_pallas.filtered_products, tile=TILE, layout=layout, softcap=3.0,
                          low=jnp.bfloat16, bias=True, interpret=False)
    w_j = w if layout == "vd" else w.T
    text = jax.jit(f).trace(dh0, z, lse, coef, loud, h, w_j).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2

  def loss(h, w):
    return jxent.linear_cross_entropy(h, w, jnp.arange(N) % S, weight_layout="vd",
                                      gradient_filter=2**-12)

  def lowered(platform, setting):
    with use_implementation("accelerator"), _pallas.use_pallas_filter(setting):
      return jax.jit(jax.grad(loss, argnums=(0, 1))).trace(h, w).lower(
          lowering_platforms=(platform,)).as_text()

  # On by default for cuda (where they were measured faster), and when asked for.
  assert lowered("cuda", None).count("xla.gpu.triton") == 2
  assert lowered("cuda", True).count("xla.gpu.triton") == 2
  assert "xla.gpu.triton" not in lowered("cuda", False)  # XLA's gathered products
  # Elsewhere the default is XLA's gathered products: no kernel, not even interpreted (the
  # interpreter's grid loops are while loops; XLA's form has the two of the vocabulary scans).
  loops = lowered("cpu", False).count("stablehlo.while")
  assert lowered("cpu", None).count("stablehlo.while") == loops
  assert lowered("cpu", True).count("stablehlo.while") > loops
