"""linear_cross_entropy against the unfused loss on h @ W: values and gradients, every option."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jxent
from jxent import _fused, _pallas
from jxent._platform import use_implementation

N, D, V = 37, 16, 50  # N is not a multiple of the chunk size
K = jax.random.split(jax.random.PRNGKey(0), 5)
H = jax.random.normal(K[0], (N, D))
W = jax.random.normal(K[1], (D, V)) * 0.4
B = jax.random.normal(K[2], (V,)) * 0.1
Y = jax.random.randint(K[3], (N,), 0, V).at[jnp.array([3, 11])].set(-100)
MASK = jax.random.uniform(K[4], (N,)) > 0.2


def naive(h, w, b, *, layout="dv", softcap=None, **kw):
  z = (h @ w if layout == "dv" else h @ w.T) + (0 if b is None else b)
  if softcap is not None:
    z = softcap * jnp.tanh(z / softcap)
  return jxent.softmax_cross_entropy_with_integer_labels(z, Y, **kw)


def rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))


CASES = {
    "plain": dict(),
    "ignore": dict(ignore_index=-100),
    "smooth": dict(ignore_index=-100, label_smoothing=0.2),
    "zloss": dict(ignore_index=-100, z_loss=1e-2),
    "softcap": dict(ignore_index=-100, softcap=3.0),
    "all": dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, where=MASK),
}


@pytest.mark.parametrize("method", ["forward", "recompute"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_scalar_loss_and_grads_match_unfused(case, reduction, method, impl):
  opts = dict(CASES[case])
  softcap = opts.pop("softcap", None)
  y = jnp.clip(Y, 0, V - 1) if "ignore_index" not in opts else Y

  def fused(h, w, b):
    return jxent.linear_cross_entropy(h, w, y, bias=b, logit_softcap=softcap, chunk_size=8,
                                      reduction=reduction, method=method, **opts)

  def ref(h, w, b):
    z = h @ w + b
    if softcap is not None:
      z = softcap * jnp.tanh(z / softcap)
    return jxent.softmax_cross_entropy_with_integer_labels(z, y, reduction=reduction, **opts)

  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(H, W, B)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2))(H, W, B)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0]))
  for g, r in zip(got[1], want[1]):
    assert rel(g, r) < 1e-5


def test_none_reduction_and_vd_layout_with_weighted_cotangent(impl):
  wt = W.T  # [V, D], a tied embedding table
  f = lambda h, w: jxent.linear_cross_entropy(h, w, Y, weight_layout="vd", ignore_index=-100,
                                              label_smoothing=0.1, reduction="none", chunk_size=8)
  r = lambda h, w: naive(h, w, None, layout="vd", ignore_index=-100, label_smoothing=0.1)
  np.testing.assert_allclose(f(H, wt), r(H, wt), rtol=1e-5, atol=1e-6)
  c = jnp.linspace(0.1, 2.0, N)
  g = jax.grad(lambda h, w: (f(h, w) * c).sum(), argnums=(0, 1))(H, wt)
  gr = jax.grad(lambda h, w: (r(h, w) * c).sum(), argnums=(0, 1))(H, wt)
  assert rel(g[0], gr[0]) < 1e-5 and rel(g[1], gr[1]) < 1e-5


def test_return_lse_is_differentiable(impl):
  def f(h, w):
    loss, lse = jxent.linear_cross_entropy(h, w, Y, ignore_index=-100, return_lse=True,
                                           chunk_size=8)
    return loss + 0.3 * jnp.sum(lse**2)

  def r(h, w):
    z = h @ w
    return (jxent.softmax_cross_entropy_with_integer_labels(z, Y, ignore_index=-100,
                                                            reduction="mean")
            + 0.3 * jnp.sum(jax.nn.logsumexp(z, -1) ** 2))

  np.testing.assert_allclose(f(H, W), r(H, W), rtol=1e-5)
  g, gr = jax.grad(f, argnums=(0, 1))(H, W), jax.grad(r, argnums=(0, 1))(H, W)
  assert rel(g[0], gr[0]) < 1e-5 and rel(g[1], gr[1]) < 1e-5


def test_batched_hidden_shape_and_default_chunk():
  h = H[:36].reshape(4, 9, D)
  y = jnp.clip(Y[:36], 0, V - 1).reshape(4, 9)
  got = jxent.linear_cross_entropy(h, W, y, reduction="none")
  want = jxent.softmax_cross_entropy_with_integer_labels(h @ W, y)
  assert got.shape == (4, 9)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_accumulates_in_float32(impl):
  h, w = H.astype(jnp.bfloat16), W.astype(jnp.bfloat16)
  y = jnp.clip(Y, 0, V - 1)
  got = jxent.linear_cross_entropy(h, w, y, chunk_size=8)
  ref = lambda h, w: jxent.softmax_cross_entropy_with_integer_labels(
      h.astype(jnp.float32) @ w.astype(jnp.float32), y, reduction="mean")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref(h, w), rtol=1e-5)
  dh, dw = jax.grad(lambda h, w: jxent.linear_cross_entropy(h, w, y, chunk_size=8),
                    argnums=(0, 1))(h, w)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  # The gradients in bf16 (the accelerator form also multiplies in bf16): within bf16's
  # rounding of the float32 gradient of the same bf16 inputs.
  rh, rw = jax.grad(ref, argnums=(0, 1))(h, w)
  assert rel(dh.astype(jnp.float32), rh) < 2e-2 and rel(dw.astype(jnp.float32), rw) < 2e-2


def test_all_ignored_mean_is_zero(impl):
  y = jnp.full((N,), -100)
  f = lambda h: jxent.linear_cross_entropy(h, W, y, ignore_index=-100, chunk_size=8)
  assert f(H) == 0
  assert np.all(jax.grad(f)(H) == 0)


@pytest.mark.parametrize("reduction,shift", [("mean", 1), ("none", 3)])
def test_shift_is_the_loss_of_sliced_inputs(reduction, shift, impl):
  # [4, 9] positions; position t is scored on labels[..., t + shift] (Cut Cross-Entropy's
  # shift): the loss of hidden[:, :-shift] on labels[:, shift:], whose mask and weights move
  # with the labels.
  h, y = H[:36].reshape(4, 9, D), Y[:36].reshape(4, 9)
  m, tw = MASK[:36].reshape(4, 9), jnp.linspace(0.2, 1.9, 36).reshape(4, 9)
  cot = jnp.linspace(0.3, 1.3, 4 * (9 - shift)).reshape(4, 9 - shift)
  opts = dict(ignore_index=-100, label_smoothing=0.1, reduction=reduction)
  tail = lambda a: a[:, shift:]

  def fused(h, w, b, tw):
    out, lse = jxent.linear_cross_entropy(h, w, y, bias=b, where=m, weights=tw, shift=shift,
                                          chunk_size=8, return_lse=True, **opts)
    return jnp.sum(cot * out) + jnp.sum(cot * lse ** 2) if reduction == "none" else (
        2.3 * out + jnp.sum(cot * lse ** 2))

  def ref(h, w, b, tw):
    z = h[:, :-shift] @ w + b
    per = jxent.softmax_cross_entropy_with_integer_labels(
        z, tail(y), ignore_index=-100, label_smoothing=0.1, where=tail(m)) * tail(tw)
    keep = tail(m) & (tail(y) != -100)
    lse = jax.nn.logsumexp(z, -1)
    if reduction == "none":
      return jnp.sum(cot * per) + jnp.sum(cot * lse ** 2)
    return 2.3 * jnp.sum(per) / jnp.sum(jnp.where(keep, tail(tw), 0)) + jnp.sum(cot * lse ** 2)

  got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2, 3)))(h, W, B, tw)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(h, W, B, tw)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0]))
  for g, r in zip(got[1], want[1]):
    assert rel(g, r) < 1e-5
  assert np.all(got[1][0][:, -shift:] == 0)  # the last positions take no part
  assert np.all(got[1][3][:, :shift] == 0)  # nor do the first labels' weights

  out, stats = jxent.linear_cross_entropy(h, W, y, where=m, shift=shift, return_stats=True,
                                          **opts)
  assert stats.argmax.shape == (4, 9 - shift)
  np.testing.assert_array_equal(stats.argmax, jnp.argmax(h[:, :-shift] @ W, -1)
                                * (tail(m) & (tail(y) != -100)))
  lp, ent = jxent.linear_log_probs(h, W, y, where=m & (y != -100), shift=shift,
                                   return_entropy=True)
  np.testing.assert_allclose(lp, jxent.log_probs(h[:, :-shift] @ W, jnp.clip(tail(y), 0))
                             * (tail(m) & (tail(y) != -100)), rtol=1e-5, atol=1e-6)
  assert ent.shape == (4, 9 - shift)
  total = jxent.linear_log_probs(h, W, y, where=m & (y != -100), shift=shift, reduction="sum")
  np.testing.assert_allclose(total, jnp.sum(lp), rtol=1e-5)

  with pytest.raises(ValueError, match=r"shift must be in \[0, T\) for T=9"):
    jxent.linear_cross_entropy(h, W, y, shift=9)
  with pytest.raises(TypeError, match="shift must be a Python int"):
    jxent.linear_cross_entropy(h, W, y, shift=1.0)
  with pytest.raises(ValueError, match=r"where must have labels' shape \(4, 9\)"):
    jxent.linear_log_probs(h, W, y, where=m[:2], shift=1)


CPU_SCRATCH = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="scratch bounds of XLA:CPU's buffer assignment")


@CPU_SCRATCH
def test_scratch_memory_is_one_block_plus_one_dw_slice():
  # Blocks of 2 MiB: XLA:CPU's fusions then keep apart what smaller ones would not (a
  # broadcast constant in the label's tail made a second block-sized buffer).
  n, d, v = 512, 64, 8192
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jnp.zeros(n, jnp.int32)

  def temp(f):
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile() \
        .memory_analysis().temp_size_in_bytes

  unfused = temp(lambda h, w: jxent.softmax_cross_entropy_with_integer_labels(
      h @ w, y, reduction="mean"))
  t, vs = 64, _fused._VOCAB_SLICE
  fused = temp(lambda h, w: jxent.linear_cross_entropy(h, w, y, chunk_size=t))
  assert unfused >= n * v * 4  # at least one [N, V] logits-sized buffer
  # One [t, V] block (the gradient is written over the logits in place), the [D, slice] dW
  # update, the [D, slice] of dW it adds to, and the [t, slice] column slice it reads; a
  # second block would not fit.
  block, dw_slice = t * v * 4, (2 * d + t) * vs * 4
  assert fused <= block + dw_slice + 128 * 1024 < 2 * block + dw_slice
  # The loss alone: one block.
  alone = jax.jit(lambda h, w: jxent.linear_cross_entropy(h, w, y, chunk_size=t)).lower(
      h, w).compile().memory_analysis().temp_size_in_bytes
  assert alone <= block + 128 * 1024
  # The unfused loss keeps a single [N, V] buffer (its gradient written in place of the logits).
  assert fused < unfused / 4


@pytest.mark.parametrize("method", ["forward", "recompute"])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_ragged_vocabulary_slices(monkeypatch, layout, method, impl):
  # V = 50 in slices of 16 (forward method's dW accumulation; three full slices and a
  # remainder of 2 columns) or 32 (recompute method's tangent; one and a remainder of 18).
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 16)
  w = W if layout == "dv" else W.T
  cot = jnp.linspace(0.2, 1.7, N)
  opts = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-2)
  scalar = method == "forward"

  def f(h, w, b):
    out = jxent.linear_cross_entropy(h, w, Y, bias=b, weight_layout=layout, chunk_size=8,
                                     logit_softcap=4.0, method=method,
                                     reduction="sum" if scalar else "none", **opts)
    return 0.7 * out if scalar else jnp.sum(cot * out)

  def g(h, w, b):
    z = 4.0 * jnp.tanh(((h @ w if layout == "dv" else h @ w.T) + b) / 4.0)
    out = jxent.softmax_cross_entropy_with_integer_labels(z, Y, **opts)
    return 0.7 * jnp.sum(out) if scalar else jnp.sum(cot * out)

  got = jax.grad(f, argnums=(0, 1, 2))(H, w, B)
  want = jax.grad(g, argnums=(0, 1, 2))(H, w, B)
  for a, b in zip(got, want):
    assert rel(a, b) < 1e-5
  t = (jnp.cos(H), jnp.sin(w), jnp.cos(B))
  assert abs(jax.jvp(f, (H, w, B), t)[1] - jax.jvp(g, (H, w, B), t)[1]) <= 1e-5 * abs(
      jax.jvp(g, (H, w, B), t)[1])


@CPU_SCRATCH
def test_recompute_scratch_is_blocks_not_weight_sized(monkeypatch):
  # The recompute method's reverse pass keeps the inputs and lse and adds into dW one
  # vocabulary slice at a time: no [D, V] temporary (per chunk, or a stacked copy of W).
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 128)  # the tangent's slices: 256 columns
  n, d, v, t, s = 512, 64, 4096, 32, 256
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jnp.zeros(n, jnp.int32)
  cot = jnp.linspace(0.5, 1.5, n)
  f = lambda h, w: jnp.sum(cot * jxent.linear_cross_entropy(
      h, w, y, chunk_size=t, reduction="none", method="recompute"))
  temp = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).compile() \
      .memory_analysis().temp_size_in_bytes
  # The forward's [t, V] block, a [N, D] cotangent, a few [D, slice] and [t, slice] pieces;
  # a [D, V] temporary per chunk (what JAX's transpose of a whole-W tangent allocates) would
  # not fit.
  assert temp <= t * v * 4 + n * d * 4 + 4 * d * s * 4 + 8 * t * s * 4 + 64 * 1024
  assert temp < t * v * 4 + d * v * 4


def test_default_chunk_size():
  assert _fused.default_chunk_size(4096, 32768) == 512
  assert _fused.default_chunk_size(8192, 65536) == 256
  assert _fused.default_chunk_size(10, 50) == 16


def test_bad_input():
  y = jnp.clip(Y, 0, V - 1)
  with pytest.raises(ValueError, match=r"hidden's last dimension \(16\)"):
    jxent.linear_cross_entropy(H, W.T, y)
  with pytest.raises(ValueError, match="labels must have hidden's shape"):
    jxent.linear_cross_entropy(H, W, y[:5])
  with pytest.raises(TypeError, match="labels must be an integer"):
    jxent.linear_cross_entropy(H, W, y.astype(jnp.float32))
  with pytest.raises(ValueError, match="method='forward' needs a scalar loss"):
    jxent.linear_cross_entropy(H, W, y, reduction="none", method="forward")
  with pytest.raises(ValueError, match=r"bias must have shape \(50,\)"):
    jxent.linear_cross_entropy(H, W, y, bias=B[:3])
  err, _ = jxent.checked(lambda h: jxent.linear_cross_entropy(h, W, y.at[0].set(V)))(H)
  with pytest.raises(checkify.JaxRuntimeError, match="out of range"):
    err.throw()


@pytest.mark.parametrize("method", ["forward", "recompute"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_token_weights(reduction, method, impl):
  if method == "forward" and reduction == "none":
    pytest.skip("the forward method needs a scalar loss")
  tw = jnp.linspace(0.1, 2.0, N) * (jnp.arange(N) % 5 != 0)  # some zero weights
  cot = jnp.linspace(0.3, 1.3, N)
  keep = MASK & (Y != -100)

  def fused(h, w, b, tw):
    out = jxent.linear_cross_entropy(h, w, Y, bias=b, ignore_index=-100, where=MASK,
                                     label_smoothing=0.1, chunk_size=8, weights=tw,
                                     reduction=reduction, method=method)
    return jnp.sum(cot * out) if reduction == "none" else 1.7 * out

  def ref(h, w, b, tw):
    per = jxent.softmax_cross_entropy_with_integer_labels(
        h @ w + b, Y, ignore_index=-100, where=MASK, label_smoothing=0.1) * tw
    if reduction == "none":
      return jnp.sum(cot * per)
    total = jnp.sum(per)
    return 1.7 * (total if reduction == "sum" else total / jnp.sum(jnp.where(keep, tw, 0)))

  got = jax.value_and_grad(fused, argnums=(0, 1, 2, 3))(H, W, B, tw)
  want = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(H, W, B, tw)
  assert abs(float(got[0]) - float(want[0])) <= 1e-5 * abs(float(want[0]))
  for g, r in zip(got[1], want[1]):
    assert rel(g, r) < 1e-5
  with pytest.raises(ValueError, match=r"weights must have hidden's shape.*\(3,\)"):
    jxent.linear_cross_entropy(H, W, Y, weights=tw[:3])


@pytest.mark.parametrize("options", ["plain", "smooth_zloss"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_weights_against_float64_formula(options, reduction):
  # PyTorch's weighted (and smoothed) cross-entropy written out in float64, independently of
  # jxent: (1 - eps) c_y (lse - z_y) + eps / V sum_v c_v (lse - z_v) + zl lse^2 per kept token;
  # "mean" divides by sum_i c_{y_i} (times the per-token weights). Gradients in h, W, b, the
  # class weights, the per-token weights and (when on) the smoothing and z-loss coefficients,
  # under a non-uniform cotangent, with "vd" layout.
  smooth = options == "smooth_zloss"
  with jax.enable_x64(True):
    h, w, b = (x.astype(jnp.float64) for x in (H, W.T, B))
    cw = jnp.linspace(0.2, 2.0, V, dtype=jnp.float64)
    tw = jnp.linspace(0.5, 1.5, N, dtype=jnp.float64)
    keep = MASK & (Y != -100)
    cot = jnp.linspace(0.3, 1.3, N, dtype=jnp.float64)
    eps0, zl0 = (0.15, 2e-3) if smooth else (0.0, 0.0)

    def fused(h, w, b, cw, tw, eps, zl):
      out = jxent.linear_cross_entropy(
          h, w, Y, bias=b, weight_layout="vd", ignore_index=-100, where=MASK,
          class_weights=cw, weights=tw, label_smoothing=eps if smooth else 0.0,
          z_loss=zl if smooth else 0.0, reduction=reduction, chunk_size=8)
      return jnp.sum(cot * out) if reduction == "none" else 1.7 * out

    def ref(h, w, b, cw, tw, eps, zl):
      z = h @ w.T + b
      lse = jnp.log(jnp.sum(jnp.exp(z - z.max(1, keepdims=True)), 1)) + z.max(1)
      y = jnp.clip(Y, 0, V - 1)
      nlp = lse[:, None] - z  # -log p, [N, V]
      per = ((1 - eps) * cw[y] * nlp[jnp.arange(N), y] + eps / V * (nlp @ cw)
             + zl * lse ** 2)
      per = jnp.where(keep, per * tw, 0)
      if reduction == "none":
        return jnp.sum(cot * per)
      return 1.7 * jnp.sum(per) / jnp.sum(jnp.where(keep, cw[y] * tw, 0))

    args = (h, w, b, cw, tw, jnp.float64(eps0), jnp.float64(zl0))
    argn = tuple(range(7 if smooth else 5))
    got = jax.value_and_grad(fused, argn)(*args)
    want = jax.value_and_grad(ref, argn)(*args)
    assert abs(float(got[0]) - float(want[0])) <= 1e-12 * abs(float(want[0]))
    for i, (g, r) in enumerate(zip(got[1], want[1])):
      assert rel(g, r) < 1e-11, i
  with pytest.raises(ValueError, match=r"class_weights must have shape \(50,\)"):
    jxent.linear_cross_entropy(H, W, Y, class_weights=jnp.ones(3))
  with pytest.raises(ValueError, match="method='forward' with class_weights"):
    jxent.linear_cross_entropy(H, W, Y, class_weights=jnp.ones(V), z_loss=1e-3,
                               method="forward")
  with pytest.raises(ValueError, match=r"weights must have hidden's shape.*\(37,\)"):
    jxent.linear_cross_entropy(H, W, Y, class_weights=jnp.ones(V), z_loss=1e-3,
                               weights=jnp.ones(3))
  with pytest.raises(ValueError, match="logit_softcap together is not supported"):
    jxent.linear_cross_entropy(H, W, Y, class_weights=jnp.ones(V), label_smoothing=0.1,
                               logit_softcap=5.0)


FILTER_CASES = {
    "plain": dict(),
    "options": dict(ignore_index=-100, where=MASK, label_smoothing=0.2, z_loss=1e-2),
    "softcap": dict(ignore_index=-100, logit_softcap=4.0),
}


def _filter_terms(p, keep, eps, rows, tile=None, frac=None, padded=N):
  """Which softmax terms coef_i p_ij the filtered gradient keeps ([N, V] booleans), and how
  many blocks took the tiled form: blocks of the token ranges ``rows`` x 16 columns; a block
  with every kept-token entry below eps drops all; with ``tile`` (tb, tv), a block whose
  ``padded`` tokens and columns split into tiles keeps only the tiles with an entry of at
  least eps when they are at most 1/frac of its tiles (all of them when more)."""
  out = np.ones(p.shape, bool)
  pk = np.where(keep[:, None], p, 0)
  tiled = 0
  for r in rows:
    for c0 in range(0, V, 16):
      cols = np.arange(c0, min(c0 + 16, V))
      if tile is not None:
        tb, tv = tile
        nt, vt = padded // tb, len(cols) // tv
        k = nt * vt // frac
        if padded % tb == 0 and len(cols) % tv == 0 and k >= 1:
          loud = [(i, j) for i in range(nt) for j in range(vt)
                  if pk[i * tb:(i + 1) * tb, c0 + j * tv:c0 + (j + 1) * tv].max() >= eps]
          if len(loud) <= k:
            tiled += 0 < len(loud)
            for i in range(nt):
              for j in range(vt):
                if (i, j) not in loud:
                  out[i * tb:(i + 1) * tb, c0 + j * tv:c0 + (j + 1) * tv] = False
          continue
      blk = np.ix_(r, cols)
      if pk[blk].max() < eps:
        out[blk] = False
  return out, tiled


def _check_filter(case, layout, all_tokens, pick_eps, **tiles):
  """The filtered gradient against the float64 formula (see the test below)."""
  opts = dict(FILTER_CASES[case])
  softcap = opts.pop("logit_softcap", None)
  with jax.enable_x64(True):
    h, w, b = (np.asarray(x, np.float64) for x in (H, W, B))
    b = b.copy()
    b[16:32] -= 12.0
    b[32:48] -= 7.0
    y = np.asarray(Y).copy()
    y[[0, 5]] = [20, 30]
    y = y if "ignore_index" in opts else np.clip(y, 0, V - 1)
    tw = np.linspace(0.5, 1.5, N)
    wl = w if layout == "dv" else w.T
    keep = np.ones(N, bool) if "where" not in opts else np.asarray(MASK).copy()
    if "ignore_index" in opts:
      keep &= y != -100
    yc = np.clip(y, 0, V - 1)
    pre = h @ w + b
    z = pre if softcap is None else softcap * np.tanh(pre / softcap)
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    p = np.exp(z - lse[:, None])
    eps_f = pick_eps(np.where(keep[:, None], p, 0))

    def loss_fn(h, w, b, **kw):
      return 0.7 * jxent.linear_cross_entropy(
          h, w, jnp.asarray(y), bias=b, weight_layout=layout, chunk_size=8,
          logit_softcap=softcap, weights=jnp.asarray(tw), reduction="sum", **opts, **kw)

    args = (jnp.asarray(h), jnp.asarray(wl), jnp.asarray(b))
    got = jax.value_and_grad(functools.partial(loss_fn, gradient_filter=eps_f),
                             argnums=(0, 1, 2))(*args)
    exact = jax.grad(loss_fn, argnums=(0, 1, 2))(*args)

    es, zl = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0)
    g = 0.7 * tw * keep
    nll = lse - z[np.arange(N), yc]
    per = (1 - es) * nll + es * (lse - z.mean(1)) + zl * lse**2
    loss = np.sum(g * per)
    a, s = g * (1 - es), g * es / V
    rows = [np.arange(N)] if all_tokens else [
        np.arange(i, min(i + 8, N)) for i in range(0, N, 8)]
    kept, tiled = _filter_terms(p, keep, eps_f, rows, padded=-(-N // 8) * 8, **tiles)
    assert not kept.all()
    coefp = np.where(kept, (a + s * V + 2 * zl * lse * g)[:, None] * p, 0)
    onehot = np.arange(V)[None, :] == yc[:, None]
    dz = coefp - a[:, None] * onehot - s[:, None]
    if softcap is not None:
      dz = dz * (1 - np.tanh(pre / softcap) ** 2)
    hz = np.where(keep[:, None], h, 0)
    want = (dz @ w.T, hz.T @ dz, dz.sum(0))
    want = (want[0], want[1] if layout == "dv" else want[1].T, want[2])
    assert abs(float(got[0]) - loss) <= 1e-12 * abs(loss)
    for gg, ww, ex in zip(got[1], want, exact):
      assert rel(gg, jnp.asarray(ww)) < 1e-10
      assert rel(ex, jnp.asarray(ww)) > 1e-8  # the dropped terms are visible
  return tiled


@pytest.mark.parametrize("case,layout", [("plain", "dv"), ("options", "vd"),
                                         ("softcap", "dv"), ("softcap", "vd")])
def test_gradient_filter_against_float64_formula(monkeypatch, case, layout, impl):
  # The filtered gradient written out in float64 with NumPy: the exact dz = coef p - a onehot
  # - s (times the softcap's slope), with coef p set to 0 in every block whose softmax entries
  # (kept tokens) are all below eps. Blocks: 8-token chunks x 16 columns on CPU, all tokens x
  # 16 columns in the accelerator form. Columns 16-31 and 32-47 are made quiet by their bias,
  # labels 20 and 30 fall in them; eps is 0.7x the largest softmax entry of columns 32-47, so
  # that one of their blocks is just kept (a threshold off by 2x fails). Non-uniform per-token
  # weights and a factor 0.7 make the cotangent; value, dh, dW and db at 1e-10.
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 16)
  monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: min(16, v))
  all_tokens = impl == "accelerator" or jax.default_backend() != "cpu"  # GPU/TPU: blocks
  _check_filter(case, layout, all_tokens, lambda pk: 0.7 * float(pk[:, 32:48].max()))


@pytest.mark.parametrize("case,layout,quiet,kernels", [
    ("plain", "dv", "three_tiles", False), ("options", "vd", "three_tiles", False),
    ("softcap", "dv", "three_tiles", False), ("softcap", "vd", "three_tiles", False),
    ("options", "dv", "none", False), ("options", "dv", "three_tiles", True),
    ("softcap", "vd", "three_tiles", True)])
def test_gradient_filter_tiles(monkeypatch, case, layout, quiet, kernels):
  # The accelerator form's tiles, here 4 tokens x 8 columns, a block taking the tiled form
  # when at most 20 // 6 = 3 of its 20 tiles have an entry of at least eps. eps between the
  # third and fourth largest tile maxima of the quiet columns 16-31 (exactly three tiles
  # computed there), or above all of them (none: the block contributes no softmax term).
  # ``kernels``: the tiles' products by the Pallas kernels (interpreted here) instead of
  # XLA's gathered products.
  monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: min(16, v))
  monkeypatch.setattr(_fused, "_FILTER_TILE", (4, 8))
  # The kernels' share of loud tiles is their own (the other form's made too small to tile).
  monkeypatch.setattr(_fused, "_FILTER_TILES_KEPT", 1000 if kernels else 6)
  monkeypatch.setattr(_fused, "_KERNEL_TILES_KEPT", 6 if kernels else 1000)

  def pick(pk):
    q = np.pad(pk[:, 16:32], ((0, 3), (0, 0)))  # 40 tokens: 10 x 2 tiles
    tops = np.sort(q.reshape(10, 4, 2, 8).max(axis=(1, 3)).ravel())[::-1]
    return float(np.sqrt(tops[2] * tops[3]) if quiet == "three_tiles" else 2 * tops[0])

  with use_implementation("accelerator"), _pallas.use_pallas_filter(kernels):
    tiled = _check_filter(case, layout, True, pick, tile=(4, 8), frac=6)
  assert tiled == (quiet == "three_tiles")


def test_gradient_filter_options(impl):
  f = lambda h, w, eps: jxent.linear_cross_entropy(h, w, Y, ignore_index=-100,
                                                   gradient_filter=eps)
  exact = jax.grad(f, argnums=(0, 1))(H, W, None)
  # A threshold no softmax entry is below skips nothing: the exact gradient (and the loss).
  tiny = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)(H, W, 1e-30)
  assert float(tiny[0]) == pytest.approx(float(f(H, W, None)), rel=1e-6)
  for a, b in zip(tiny[1], exact):
    assert rel(a, b) < 1e-5
  # With class weights (per-token weights c_y) and under jvp as well.
  cw = jnp.linspace(0.5, 1.5, V)
  t = (jnp.cos(H), jnp.sin(W))
  fw = lambda h, w: jxent.linear_cross_entropy(h, w, Y, ignore_index=-100, class_weights=cw,
                                               gradient_filter=1e-30)
  ref = lambda h, w: jxent.linear_cross_entropy(h, w, Y, ignore_index=-100, class_weights=cw)
  out, tan = jax.jvp(fw, (H, W), t)
  out_r, tan_r = jax.jvp(ref, (H, W), t)
  assert float(tan) == pytest.approx(float(tan_r), rel=1e-5)
  for kw, msg in [(dict(reduction="none"), "needs the forward method"),
                  (dict(return_lse=True), "needs the forward method"),
                  (dict(method="recompute"), "needs the forward method"),
                  (dict(label_smoothing=0.1, logit_softcap=3.0), "label_smoothing and "
                   "logit_softcap"),
                  (dict(class_weights=cw, z_loss=1e-3), "gradient_filter with class_weights")]:
    with pytest.raises(ValueError, match=msg):
      jxent.linear_cross_entropy(H, W, jnp.clip(Y, 0, V - 1), gradient_filter=1e-3, **kw)
  for bad in (0.0, 1.0, -1e-3):
    with pytest.raises(ValueError, match=r"gradient_filter must be in \(0, 1\)"):
      jxent.linear_cross_entropy(H, W, jnp.clip(Y, 0, V - 1), gradient_filter=bad)
  with pytest.raises(TypeError, match="gradient_filter must be a static"):
    jax.jit(lambda e: jxent.linear_cross_entropy(H, W, jnp.clip(Y, 0, V - 1),
                                                 gradient_filter=e))(1e-3)


def test_confident_labels_through_a_real_head(impl):
  # A true loss of 1e-9 per token from h @ W (D = 256): the label's logit computed apart
  # (h . w_y) differs from its entry of the block's product by rounding, so the label's own
  # term must not enter the tail beside it (it made a loss of 1e-9 come out near log 2).
  # Against float64 to rtol 1e-4 (the logits' own float32 rounding at |z| ~ 30), per token
  # and summed, token chunks and vocabulary blocks (of 16 classes: the label's block and the
  # others).
  rng = np.random.default_rng(3)
  n, d, v = 24, 256, 64
  h = rng.standard_normal((n, d)).astype(np.float32)
  w = (rng.standard_normal((d, v)) * 0.01).astype(np.float32)
  y = rng.integers(0, v, n)
  for i in range(n):
    w[:, y[i]] += h[i] * (28.0 / (h[i] @ h[i]))
  z = h.astype(np.float64) @ w.astype(np.float64)
  gap = z - z[np.arange(n), y][:, None]
  gap[np.arange(n), y] = -np.inf
  want = np.log1p(np.sum(np.exp(gap), axis=1))
  assert want.max() < 1e-7
  got = jax.jit(lambda h, w: jxent.linear_cross_entropy(h, w, y, reduction="none",
                                                        chunk_size=8))(h, w)
  total, _ = jax.jit(jax.value_and_grad(
      lambda h, w: jxent.linear_cross_entropy(h, w, y, reduction="sum", chunk_size=8)))(h, w)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4)
  np.testing.assert_allclose(float(total), want.sum(), rtol=1e-4)


def _pieces_head(monkeypatch, seed):
  """h [24, 16], W [16, 256], labels: XLA:CPU cuts V = 256 into 4 row pieces (rows of 64
  allowed). Token 0 is confident: its label's weight column gets 30 h_0 / |h_0|^2, which
  lifts that logit by 30 (a loss near 1e-8)."""
  from jxent import _cpu
  monkeypatch.setattr(_cpu, "FAST_ROW", 64)
  rng = np.random.default_rng(seed)
  n, d, v = 24, 16, 256
  h = rng.standard_normal((n, d)).astype(np.float32)
  w = (rng.standard_normal((d, v)) * 0.5).astype(np.float32)
  y = rng.integers(0, v, n).astype(np.int32)
  w[:, y[0]] += h[0] * (30.0 / (h[0] @ h[0]))
  return h, w, y


@pytest.mark.parametrize("method", ["forward", "recompute"])
@pytest.mark.parametrize("options", ["plain", "smooth_zloss"])
def test_cpu_row_pieces_match_the_reference(monkeypatch, options, method):
  # XLA:CPU reduces each block's rows in pieces (_cpu.row_split); with rows of 64 entries
  # allowed, V = 256 is cut into 4. Against the reference's whole rows (the sums in another
  # order: rtol 1e-5): per-token loss and lse, the summed loss and its gradients, and the
  # gradients of a weighted per-token loss, with a dropped token. Token 0 is confident (a
  # loss of about 6e-8, from its tail): plain, against float64 to rtol 1e-4.
  from jxent import _cpu
  h, w, y = _pieces_head(monkeypatch, seed=5)
  n, v = len(y), w.shape[1]
  y[5] = -100
  kw = dict(ignore_index=-100, chunk_size=8)
  if options == "smooth_zloss":
    kw.update(label_smoothing=0.1, z_loss=1e-3)
  cot = jnp.linspace(0.5, 1.5, n)

  def run(impl):
    with use_implementation(impl):
      per_token = jax.jit(lambda h, w: jxent.linear_cross_entropy(
          h, w, y, reduction="none", return_lse=True, **kw))(h, w)
      total = jax.jit(jax.value_and_grad(lambda h, w: jxent.linear_cross_entropy(
          h, w, y, reduction="sum", method=method, **kw), argnums=(0, 1)))(h, w)
      weighted = jax.jit(jax.grad(lambda h, w: jnp.sum(cot * jxent.linear_cross_entropy(
          h, w, y, reduction="none", **kw)), argnums=(0, 1)))(h, w)
    return per_token, total, weighted

  got, want = run("cpu"), run("reference")
  assert _cpu.row_split(v) == 4
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if options == "plain":
    z = h.astype(np.float64) @ w.astype(np.float64)
    nll0 = np.log1p(np.sum(np.exp(np.delete(z[0], y[0]) - z[0, y[0]])))
    assert nll0 < 1e-6  # lse - z_y rounds at lse's resolution, ~2e-6 here
    np.testing.assert_allclose(float(got[0][0][0]), nll0, rtol=1e-4)


def np_head(h, w, b, y, *, eps=0.0, zl=0.0, cap=None, cw=None):
  """float64 NumPy, written out apart from jxent: per token the loss
  (1 - eps) c_y (-log p_y) + eps / V sum_v c_v (-log p_v) + zl lse^2 (c = 1 without class
  weights), its gradient in the pre-cap logits, and the statistics (lse, entropy, argmax,
  log p_y)."""
  h, w, b = (np.asarray(a, np.float64) for a in (h, w, b))
  u = h @ w + b
  z = u if cap is None else cap * np.tanh(u / cap)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[:, 0]
  lp = z - lse[:, None]
  p = np.exp(lp)
  n, v = z.shape
  yc = np.clip(np.asarray(y), 0, v - 1)
  c = np.ones(v) if cw is None else np.asarray(cw, np.float64)
  nll = -lp[np.arange(n), yc]
  loss = (1 - eps) * c[yc] * nll + eps / v * (-lp @ c) + zl * lse**2
  onehot = np.eye(v)[yc]
  dz = ((1 - eps) * c[yc][:, None] * (p - onehot) + eps / v * (c.sum() * p - c)
        + 2 * zl * lse[:, None] * p)
  if cap is not None:
    dz = dz * (1 - np.tanh(u / cap) ** 2)
  ent = -(p * lp).sum(-1)
  return loss, dz, (lse, ent, z.argmax(-1), -nll)


STATS_CASES = {
    "plain": dict(),
    "options": dict(ignore_index=-100, where=MASK, label_smoothing=0.1, z_loss=1e-2,
                    logit_softcap=4.0),
}


@pytest.mark.parametrize("method", ["forward", "recompute"])
@pytest.mark.parametrize("case", list(STATS_CASES))
def test_return_stats_and_token_scaling_against_float64(case, method, impl):
  # token_scaling multiplies each kept token's loss by p_y held constant: the value
  # sum_i c_i p_i loss_i and the gradient sum_i c_i p_i d loss_i. The statistics come from the
  # same pass; they equal a float64 NumPy head on kept tokens and are 0 on dropped ones.
  opts = dict(STATS_CASES[case])
  y = Y if "ignore_index" in opts else jnp.clip(Y, 0, V - 1)
  keep = np.ones(N, bool) if case == "plain" else np.asarray(MASK & (Y != -100))
  cot = np.linspace(0.3, 1.3, N)
  mean = method == "forward"

  def fused(h, w, b):
    out, stats = jxent.linear_cross_entropy(
        h, w, y, bias=b, chunk_size=8, method=method, reduction="mean" if mean else "none",
        return_stats=True, token_scaling=True, **opts)
    return (1.7 * out if mean else jnp.sum(jnp.asarray(cot, jnp.float32) * out)), stats

  (val, stats), grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True))(
      H, W, B)
  loss, dz, want_stats = np_head(H, W, B, y, eps=opts.get("label_smoothing", 0.0),
                                 zl=opts.get("z_loss", 0.0), cap=opts.get("logit_softcap"))
  q = np.exp(want_stats[3])  # p_y
  g = np.where(keep, (1.7 / keep.sum() if mean else cot) * q, 0)
  assert float(val) == pytest.approx(float(np.sum(g * loss)), rel=1e-5)
  dzs = g[:, None] * dz
  want = (dzs @ np.asarray(W, np.float64).T, np.asarray(H, np.float64).T @ dzs, dzs.sum(0))
  for i, (a, r) in enumerate(zip(grads, want)):
    assert rel(a, r) < 1e-5, i
  for name, a, r in zip(stats._fields, stats, want_stats):
    a = np.asarray(a)
    assert a.shape == (N,) and not np.any(a[~keep]), name
    if name == "argmax":
      assert a.dtype == np.int32 and np.array_equal(a[keep], r[keep])
    else:
      assert rel(a[keep], r[keep]) < 1e-5, name


def test_return_stats_outputs_and_transformations(impl):
  f = lambda h, w, **kw: jxent.linear_cross_entropy(h, w, Y, ignore_index=-100, chunk_size=8,
                                                    **kw)
  plain = f(H, W)
  stats = jxent.linear_token_stats(H, W, jnp.clip(Y, 0, V - 1), where=Y != -100)
  out, got = f(H, W, return_stats=True)
  assert float(out) == float(plain)
  for name, a, r in zip(got._fields, got, stats):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6, err_msg=name)
  # With return_lse: (loss, lse, stats); the gradient filter changes no statistic.
  per, lse, got2 = f(H, W, reduction="none", return_lse=True, return_stats=True)
  np.testing.assert_allclose(per, f(H, W, reduction="none"), rtol=1e-6)
  np.testing.assert_allclose(lse, f(H, W, reduction="none", return_lse=True)[1], rtol=1e-6)
  got3 = f(H, W, return_stats=True, gradient_filter=1e-3)[1]
  for other in (got2, got3):
    for a, b in zip(got, other):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  # Forward mode: the loss's tangent is the plain loss's, the statistics have none.
  t = (jnp.cos(H), jnp.sin(W))
  (o, s), (do, ds) = jax.jvp(lambda h, w: f(h, w, return_stats=True), (H, W), t)
  assert float(do) == pytest.approx(float(jax.jvp(f, (H, W), t)[1]), rel=1e-5)
  assert not np.any(np.asarray(ds.entropy)) and not np.any(np.asarray(ds.logsumexp))
  # vmap over two token sets equals each alone.
  hs = jnp.stack([H, H[::-1]])
  vo, vs = jax.vmap(lambda h: f(h, W, return_stats=True))(hs)
  for i in range(2):
    o, s = f(hs[i], W, return_stats=True)
    assert float(vo[i]) == pytest.approx(float(o), rel=1e-6)
    np.testing.assert_array_equal(vs.argmax[i], s.argmax)
  for bad in ("yes", 1, None):
    with pytest.raises(TypeError, match="return_stats must be a Python bool"):
      f(H, W, return_stats=bad)
  with pytest.raises(TypeError, match="token_scaling must be a Python bool"):
    f(H, W, token_scaling=1.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_scaling_with_class_weights_against_float64(reduction):
  # Class weights with smoothing and z-loss (the per-token NLL and logsumexp form), and
  # without (per-token weights c_y, the forward method): scaled by p_y, the mean divided by
  # sum_i c_{y_i} over kept tokens as without scaling.
  cw = jnp.linspace(0.2, 2.0, V)
  keep = np.asarray(MASK & (Y != -100))
  cot = np.linspace(0.3, 1.3, N)
  for eps, zl in ((0.15, 2e-3), (0.0, 0.0)):
    def fused(h, w, b):
      out, stats = jxent.linear_cross_entropy(
          h, w, Y, bias=b, ignore_index=-100, where=MASK, class_weights=cw,
          label_smoothing=eps, z_loss=zl, reduction=reduction, chunk_size=8,
          return_stats=True, token_scaling=True)
      return (out if reduction == "mean" else jnp.sum(jnp.asarray(cot, jnp.float32) * out),
              stats)

    (val, stats), grads = jax.value_and_grad(fused, argnums=(0, 1, 2), has_aux=True)(H, W, B)
    loss, dz, want_stats = np_head(H, W, B, Y, eps=eps, zl=zl, cw=cw)
    yc = np.clip(np.asarray(Y), 0, V - 1)
    q = np.exp(want_stats[3])
    denom = np.sum(np.where(keep, np.asarray(cw)[yc], 0))
    g = np.where(keep, (1 / denom if reduction == "mean" else cot) * q, 0)
    assert float(val) == pytest.approx(float(np.sum(g * loss)), rel=1e-5)
    dzs = g[:, None] * dz
    want = (dzs @ np.asarray(W, np.float64).T, np.asarray(H, np.float64).T @ dzs, dzs.sum(0))
    for i, (a, r) in enumerate(zip(grads, want)):
      assert rel(a, r) < 1e-5, (eps, i)
    np.testing.assert_allclose(np.asarray(stats.entropy)[keep], want_stats[1][keep], rtol=1e-5)


@pytest.mark.parametrize("form", ["cpu", "reference", "accelerator"])
def test_return_stats_in_row_pieces_ties_and_nearly_one_hot(monkeypatch, form):
  # XLA:CPU's rows in 4 pieces (rows of 64 allowed, V = 256), the reference's whole rows, the
  # accelerator's blocks of 64 columns. Token 3's top logit is tied between columns 70 and 130
  # (two pieces, two blocks): argmax 70, the first. Token 0 is nearly one-hot: an entropy of
  # below 1e-6, to relative accuracy. Against float64 NumPy, element by element.
  monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: min(64, v))
  h, w, y = _pieces_head(monkeypatch, seed=7)
  v = w.shape[1]
  w[:, 70] += h[3] * (9.0 / (h[3] @ h[3]))
  w[:, 130] = w[:, 70]
  with use_implementation(form):
    (_, stats), grads = jax.jit(jax.value_and_grad(
        lambda h, w: jxent.linear_cross_entropy(h, w, y, chunk_size=8, return_stats=True),
        argnums=(0, 1), has_aux=True))(h, w)
  _, _, want = np_head(h, w, np.zeros(v, np.float32), y)
  assert want[2][3] == 70 and np.float32(h[3] @ w[:, 130]) == np.float32(h[3] @ w[:, 70])
  assert 1e-10 < want[1][0] < 1e-6
  np.testing.assert_array_equal(stats.argmax, want[2])
  # atol 1e-14: token 6 happens to be nearly one-hot as well (4e-12, a logit gap of ~28,
  # whose float32 rounding alone moves it by 5e-4 relative); token 0 still needs 2e-6.
  for name, i in (("logsumexp", 0), ("entropy", 1), ("label_log_prob", 3)):
    np.testing.assert_allclose(getattr(stats, name), want[i], rtol=1e-5, atol=1e-14,
                               err_msg=name)


@pytest.mark.parametrize("method", ["forward", "recompute"])
def test_token_scaling_second_order_in_float64(method):
  # Hessian-vector products (forward over reverse) of the scaled loss, p_y held constant at
  # every order, against the same loss on the logits in float64; the statistics ride along.
  with jax.enable_x64(True):
    h, w, b = (x.astype(jnp.float64) for x in (H, W, B))
    y = jnp.clip(Y, 0, V - 1)

    def fused(h, w, b):
      return jxent.linear_cross_entropy(h, w, y, bias=b, chunk_size=8, method=method,
                                        z_loss=1e-2, return_stats=True,
                                        token_scaling=True)[0]

    def ref(h, w, b):
      z = h @ w + b
      lse = jax.nn.logsumexp(z, axis=-1)
      nll = lse - z[jnp.arange(N), y]
      return jnp.mean(jax.lax.stop_gradient(jnp.exp(-nll)) * (nll + 1e-2 * lse**2))

    t = (jnp.cos(h), jnp.sin(w), jnp.cos(b))
    hvp = lambda f: jax.jvp(jax.grad(f, argnums=(0, 1, 2)), (h, w, b), t)[1]
    for a, r in zip(hvp(fused), hvp(ref)):
      assert rel(a, r) < 1e-11
