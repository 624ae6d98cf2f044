"""linear_log_probs, linear_entropy, linear_token_stats against float64 references on h @ W."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent
from jxent import _fused

N, D, V = 37, 16, 50  # N is not a multiple of the chunk (8)
RNG = np.random.default_rng(7)
H = RNG.normal(size=(N, D)).astype(np.float32)
W = (RNG.normal(size=(D, V)) * 0.5).astype(np.float32)
B = (RNG.normal(size=V) * 0.3).astype(np.float32)
Y = RNG.integers(0, V, size=N)
MASK = RNG.uniform(size=N) > 0.25
COT = RNG.uniform(0.3, 1.7, size=N)  # non-uniform cotangent
TEMP = 0.7


def ref_log_softmax(h, w, b, layout, temp):
  """float64, in plain JAX (differentiable) and independent of jxent."""
  w = w if layout == "dv" else w.T
  z = (h @ w + (0 if b is None else b)) / temp
  return jax.nn.log_softmax(z, axis=-1)


def ref_log_probs(h, w, b, layout="dv", temp=TEMP, mask=MASK):
  lp = jnp.take_along_axis(ref_log_softmax(h, w, b, layout, temp), jnp.asarray(Y)[:, None],
                           axis=-1)[:, 0]
  return jnp.where(mask, lp, 0)


def ref_entropy(h, w, b, layout="dv", temp=TEMP, mask=MASK):
  lp = ref_log_softmax(h, w, b, layout, temp)
  return jnp.where(mask, -jnp.sum(jnp.exp(lp) * lp, axis=-1), 0)


def fused_log_probs(h, w, b, layout="dv", temp=TEMP, **kw):
  return jxent.linear_log_probs(h, w, Y, bias=b, weight_layout=layout, where=MASK,
                                temperature=temp, chunk_size=8, **kw)


def fused_entropy(h, w, b, layout="dv", temp=TEMP, **kw):
  return jxent.linear_entropy(h, w, bias=b, weight_layout=layout, where=MASK,
                              temperature=temp, chunk_size=8, **kw)


PAIRS = {"log_probs": (fused_log_probs, ref_log_probs),
         "entropy": (fused_entropy, ref_entropy)}


def f64(*xs):
  return [None if x is None else jnp.asarray(np.asarray(x, np.float64)) for x in xs]


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-300))


# The GPU/TPU form (impl "accelerator") on one layout per quantity (suite time).
@pytest.mark.parametrize("name,layout,impl", [
    ("log_probs", "dv", "platform"), ("log_probs", "vd", "platform"),
    ("entropy", "dv", "platform"), ("entropy", "vd", "platform"),
    ("log_probs", "vd", "accelerator"), ("entropy", "dv", "accelerator")], indirect=["impl"])
def test_values_and_gradients_against_float64(name, layout, impl, monkeypatch):
  # Vocabulary slices of 16 (the tangent walks 32 columns at a time): one full slice of 32
  # and a remainder of 18.
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 16)
  fused, ref = PAIRS[name]
  w = W if layout == "dv" else W.T
  got = jax.jit(lambda h, w, b: fused(h, w, b, layout))(H, w, B)
  with jax.enable_x64(True):
    h64, w64, b64 = f64(H, w, B)
    want = ref(h64, w64, b64, layout)
    cot = jnp.asarray(COT)
    g_want = jax.grad(lambda *a: jnp.sum(cot * ref(*a, layout)), argnums=(0, 1, 2))(
        h64, w64, b64)
    t = f64(np.cos(H), np.sin(w), np.cos(B))
    jv_want = jax.jvp(lambda *a: ref(*a, layout), (h64, w64, b64), tuple(t))[1]
  assert got.dtype == jnp.float32
  assert rel(got, want) < 1e-5
  assert np.all(np.asarray(got)[~MASK] == 0)
  g = jax.jit(jax.grad(lambda h, w, b: jnp.sum(jnp.asarray(COT, jnp.float32) * fused(
      h, w, b, layout)), argnums=(0, 1, 2)))(H, w, B)
  for a, b in zip(g, g_want):
    assert rel(a, b) < 1e-5
  assert np.all(np.asarray(g[0])[~MASK] == 0)  # dropped tokens: no gradient
  jv = jax.jvp(lambda h, w, b: fused(h, w, b, layout), (H, w, B),
               tuple(np.asarray(x, np.float32) for x in t))[1]
  assert rel(jv, jv_want) < 1e-5


TOKEN_W = RNG.uniform(0.2, 2.0, size=N)  # per-token weights


@pytest.mark.parametrize("impl", ["platform", "accelerator"], indirect=True)
def test_log_probs_with_entropy_from_one_pass(impl, monkeypatch):
  # return_entropy: both outputs against float64, their gradients under non-uniform
  # cotangents on both at once (every argument, the token weights too), a forward tangent;
  # the same numbers as the two functions; one pass of the head statistics each way.
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 16)
  cot2 = RNG.uniform(0.5, 1.5, size=N)

  def both(h, w, b, tw):
    return fused_log_probs(h, w, b, "vd", weights=tw, return_entropy=True)

  def objective(f):
    return lambda *a: sum(jnp.sum(jnp.asarray(c, x.dtype) * x) for c, x in
                          zip((COT, cot2), f(*a)))

  args = (H, W.T, B, TOKEN_W.astype(np.float32))
  lp, ent = jax.jit(both)(*args)
  with jax.enable_x64(True):
    a64 = f64(*args)

    def ref(h, w, b, tw):
      return ref_log_probs(h, w, b, "vd") * tw, ref_entropy(h, w, b, "vd")

    want = ref(*a64)
    g_want = jax.grad(objective(ref), argnums=(0, 1, 2, 3))(*a64)
    t = f64(*(np.cos(x) for x in args))
    jv_want = jax.jvp(ref, tuple(a64), tuple(t))[1]
  assert rel(lp, want[0]) < 1e-5 and rel(ent, want[1]) < 1e-5
  np.testing.assert_allclose(ent, fused_entropy(H, W.T, B, "vd"), rtol=1e-6)
  np.testing.assert_allclose(lp, fused_log_probs(H, W.T, B, "vd", weights=args[3]),
                             rtol=1e-6)
  g = jax.jit(jax.grad(objective(both), argnums=(0, 1, 2, 3)))(*args)
  for name, a, b in zip(["h", "w", "b", "weights"], g, g_want):
    assert rel(a, b) < 1e-5, name
  jv = jax.jvp(both, args, tuple(np.asarray(x, np.float32) for x in t))[1]
  for a, b in zip(jv, jv_want):
    assert rel(a, b) < 1e-5
  # Half the loops over the blocks of the two functions' (each way: the values', the
  # derivative's).
  def two(h, w, b, tw):
    return (fused_log_probs(h, w, b, "vd", weights=tw), fused_entropy(h, w, b, "vd"))

  def loops(f):
    text = str(jax.make_jaxpr(jax.grad(objective(f), argnums=(0, 1)))(*args))
    return text.count("scan[") + text.count("while[")

  assert 0 < 2 * loops(both) <= loops(two), (loops(both), loops(two))
  with pytest.raises(ValueError, match="return_entropy needs reduction='none'"):
    jxent.linear_log_probs(H, W, Y, reduction="mean", return_entropy=True)


@pytest.mark.parametrize("name,reduction,impl", [
    ("log_probs", "sum", "platform"), ("log_probs", "mean", "platform"),
    ("entropy", "sum", "platform"), ("entropy", "mean", "platform"),
    ("log_probs", "mean", "accelerator"), ("entropy", "sum", "accelerator")],
    indirect=["impl"])
def test_scalar_reductions_against_float64(name, reduction, impl):
  # "sum" and "mean" take the forward method (gradients formed with the values): value and
  # gradient in h, W, b and the weights, a non-unit factor, the "vd" layout, a tangent.
  fused, ref = PAIRS[name]
  wt = TOKEN_W.astype(np.float32)

  def reduce_ref(v, w):
    w = jnp.where(MASK, w, 0)
    total = jnp.sum(v * w)
    return 1.7 * (total if reduction == "sum" else total / jnp.sum(w))

  f = jax.jit(lambda h, w, b, tw: 1.7 * fused(h, w, b, "vd", weights=tw, reduction=reduction))
  args = (H, W.T, B, wt)
  with jax.enable_x64(True):
    a64 = f64(*args)
    r = lambda h, w, b, tw: reduce_ref(ref(h, w, b, "vd"), tw)
    want = r(*a64)
    g_want = jax.grad(r, argnums=(0, 1, 2, 3))(*a64)
    t = f64(np.cos(H), np.sin(W.T), np.cos(B), np.sin(TOKEN_W))
    jv_want = jax.jvp(r, tuple(a64), tuple(t))[1]
  assert rel(f(*args), want) < 1e-5
  for a, b in zip(jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args), g_want):
    assert rel(a, b) < 1e-5
  jv = jax.jvp(f, args, tuple(np.asarray(x, np.float32) for x in t))[1]
  assert rel(jv, jv_want) < 1e-5
  # "none" with weights: each token's value times its weight.
  got = fused(H, W.T, B, "vd", weights=wt)
  with jax.enable_x64(True):
    assert rel(got, ref(*f64(H, W.T, B), "vd") * TOKEN_W) < 1e-5
  # Without weights: the kept tokens alone (the mean over their count), value and gradient.
  g = jax.jit(jax.value_and_grad(lambda h: fused(h, W.T, B, "vd", reduction=reduction)))(H)
  with jax.enable_x64(True):
    r = lambda h: reduce_ref(ref(h, *f64(W.T, B), "vd"), np.ones(N))
    want = jax.value_and_grad(r)(f64(H)[0])
  assert rel(1.7 * g[0], want[0]) < 1e-5 and rel(1.7 * g[1], want[1]) < 1e-5


def test_scalar_reduction_second_order_and_bad_labels():
  with jax.enable_x64(True):
    args = tuple(f64(H[:10], W[:, :12], B[:12]))
    mask = MASK[:10]
    f = lambda h, w, b: jxent.linear_entropy(h, w, bias=b, where=mask, temperature=TEMP,
                                             reduction="mean", chunk_size=4)
    r = lambda h, w, b: jnp.sum(ref_entropy(h, w, b, mask=mask)) / np.sum(mask)
    f = jax.jit(f)  # each derivative program compiled once
    # First order against finite differences; second order against the exact formula below.
    check_grads(f, args, order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    t = tuple(jnp.cos(a) for a in args)
    hvp = lambda fn: jax.jvp(jax.grad(fn, argnums=(0, 1, 2)), args, t)[1]
    for a, b in zip(hvp(f), hvp(r)):
      assert rel(a, b) < 1e-12
  y = np.array([0, 5, V, 7])  # a label outside [0, V): value and gradient NaN
  g_fn = jax.value_and_grad(lambda h: jxent.linear_log_probs(h, W, y, reduction="sum"))
  val, g = g_fn(H[:4])
  assert np.isnan(val) and np.all(np.isnan(np.asarray(g)[2]))
  with pytest.raises(ValueError, match=r"weights must have hidden's shape.*\(3,\)"):
    jxent.linear_entropy(H, W, weights=TOKEN_W[:3], reduction="sum")
  with pytest.raises(ValueError, match="reduction"):
    jxent.linear_entropy(H, W, reduction="average")


# One at temperature 1: there (on XLA:CPU) the logits' max is exactly one of the logits, the
# case where a shift taken under stop_gradient loses the top term's second derivative.
@pytest.mark.parametrize("name,temp", [("log_probs", TEMP), ("entropy", 1.0)])
def test_every_autodiff_mode_to_second_order_in_float64(name, temp, impl):
  # First order against finite differences in both modes; first and second order (gradient,
  # jvp, Hessian-vector product) against the exact dense float64 formula.
  with jax.enable_x64(True):
    args = tuple(f64(H[:10], W[:, :12], B[:12]))
    mask, cot = MASK[:10], jnp.asarray(COT[:10])
    y = Y[:10] % 12
    if name == "log_probs":
      f = lambda h, w, b: jnp.sum(cot * jxent.linear_log_probs(
          h, w, y, bias=b, where=mask, temperature=temp, chunk_size=4))
      r = lambda h, w, b: jnp.sum(cot * jnp.where(mask, jnp.take_along_axis(
          ref_log_softmax(h, w, b, "dv", temp), jnp.asarray(y)[:, None], axis=-1)[:, 0], 0))
    else:
      f = lambda h, w, b: jnp.sum(cot * jxent.linear_entropy(
          h, w, bias=b, where=mask, temperature=temp, chunk_size=4))
      r = lambda h, w, b: jnp.sum(cot * ref_entropy(h, w, b, temp=temp, mask=mask))
    f = jax.jit(f)  # each derivative program compiled once
    check_grads(f, args, order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    t = tuple(jnp.cos(a) for a in args)
    for a, b in zip(jax.grad(f, argnums=(0, 1, 2))(*args), jax.grad(r, argnums=(0, 1, 2))(*args)):
      assert rel(a, b) < 1e-12
    assert rel(jax.jvp(f, args, t)[1], jax.jvp(r, args, t)[1]) < 1e-12
    hvp = lambda fn: jax.jvp(jax.grad(fn, argnums=(0, 1, 2)), args, t)[1]
    for a, b in zip(hvp(f), hvp(r)):
      assert rel(a, b) < 1e-12


def test_bfloat16_inputs_accumulate_in_float32():
  hb, wb, bb = (jnp.asarray(x, jnp.bfloat16) for x in (H, W, B))
  up = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
  for name, (fused, ref) in PAIRS.items():
    got = fused(hb, wb, bb)
    with jax.enable_x64(True):
      want = ref(*f64(up(hb), up(wb), up(bb)))
    assert got.dtype == jnp.float32, name
    assert rel(got, want) < 1e-5, name
    g = jax.grad(lambda h: jnp.sum(fused(h, wb, bb)))(hb)
    with jax.enable_x64(True):
      g_want = jax.grad(lambda h: jnp.sum(ref(h, *f64(up(wb), up(bb)))))(f64(up(hb))[0])
    assert g.dtype == jnp.bfloat16
    assert rel(g.astype(jnp.float32), g_want) < 1e-2, name  # bf16 rounding of the output
  # A sum of log-probabilities: at T = 1 minus the fused cross-entropy, at T != 1 (16-bit
  # inputs, where h / T would round) the statistics' blocks; value and gradient in W.
  for temp in (1.0, TEMP):
    f = lambda w: fused_log_probs(hb, w, bb, temp=temp, reduction="sum")
    got, g = jax.jit(jax.value_and_grad(f))(wb)
    with jax.enable_x64(True):
      r = lambda w: jnp.sum(ref_log_probs(*f64(up(hb)), w, *f64(up(bb)), temp=temp))
      want, g_want = jax.value_and_grad(r)(f64(up(wb))[0])
    assert rel(got, want) < 1e-5, temp
    assert rel(g.astype(jnp.float32), g_want) < 1e-2, temp


@pytest.mark.parametrize("top", [0, V - 5])  # in the first block; in the last (moving)
def test_entropy_keeps_relative_accuracy_when_nearly_one_hot(top, impl):
  # One logit 30 above the 49 others: with r = 49 e^-30, H = log(1 + r) + 30 r / (1 + r)
  # ~ 1.4e-10, far below float32's resolution of log V. A difference lse - E[z] loses it,
  # and so does -sum p log p from a float64 log_softmax (log p of the top class is a
  # difference at the scale of 30): the reference is the closed form.
  h = np.eye(4, D, dtype=np.float32) * 30.0
  w = np.roll(np.eye(D, V, dtype=np.float32), top, axis=1)  # token i's top class: i + top
  r = (V - 1) * np.exp(-30.0)
  want = np.log1p(r) + 30.0 * r / (1.0 + r)
  got = jxent.linear_entropy(h, w)
  assert 1e-10 < want < 1e-9
  assert rel(got, np.full(4, want)) < 1e-5


def test_ties_for_the_top_within_and_across_blocks(impl):
  # The top logit at classes 3, 5, 20 and 40: within the first 16-column block and in two
  # later ones (the accelerator form's running top must not move, nor drop a tied term).
  w = (RNG.normal(size=(1, V)) * 0.3).astype(np.float32)
  w[0, [3, 5, 20, 40]] = 2.0
  h = np.array([[1.0], [2.5], [0.5]], np.float32)
  y = np.array([20, 7, 3])
  cot = np.array([0.7, 1.3, 1.1])
  with jax.enable_x64(True):
    lp64 = np.asarray(ref_log_softmax(*f64(h, w), None, "dv", 1.0))
  s = jxent.linear_token_stats(h, w, y)
  np.testing.assert_array_equal(s.argmax, [3, 3, 3])
  assert rel(s.entropy, -np.sum(np.exp(lp64) * lp64, axis=-1)) < 1e-5
  assert rel(s.label_log_prob, lp64[np.arange(3), y]) < 1e-5
  for fn, ref in ((lambda h, w: jxent.linear_log_probs(h, w, y),
                   lambda h, w: ref_log_softmax(h, w, None, "dv", 1.0)[np.arange(3), y]),
                  (lambda h, w: jxent.linear_entropy(h, w),
                   lambda h, w: -jnp.sum(jnp.exp(ref_log_softmax(h, w, None, "dv", 1.0))
                                         * ref_log_softmax(h, w, None, "dv", 1.0), -1))):
    g = jax.grad(lambda h, w: jnp.sum(jnp.asarray(cot, jnp.float32) * fn(h, w)),
                 argnums=(0, 1))(h, w)
    with jax.enable_x64(True):
      g_want = jax.grad(lambda h, w: jnp.sum(cot * ref(h, w)), argnums=(0, 1))(*f64(h, w))
    for a, b in zip(g, g_want):
      assert rel(a, b) < 1e-5


def test_masked_classes_and_bad_labels(impl):
  b = np.zeros(V, np.float32)
  b[:3] = -np.inf  # classes 0-2 can never be predicted
  y = np.array([0, 5, V, 7])
  h = H[:4]
  lp = jxent.linear_log_probs(h, W, y, bias=b)
  assert lp[0] == -np.inf and np.isnan(lp[2])  # a masked label; a label outside [0, V)
  with jax.enable_x64(True):
    full = ref_log_softmax(*f64(h, W, b), "dv", 1.0)
  np.testing.assert_allclose(np.asarray(lp)[[1, 3]], np.asarray(full)[[1, 3], [5, 7]],
                             rtol=1e-5)
  ent = jxent.linear_entropy(h, W, bias=b)
  assert np.all(np.isfinite(ent))  # 0 log 0 = 0 for the masked classes
  with jax.enable_x64(True):
    p = jnp.exp(full)
    want = -jnp.sum(jnp.where(p > 0, p * full, 0), axis=-1)
  np.testing.assert_allclose(ent, want, rtol=1e-5)
  g = jax.grad(lambda h: jnp.sum(jxent.linear_entropy(h, W, bias=b)))(h)
  assert np.all(np.isfinite(g))


def test_token_stats_one_pass_and_not_differentiable(impl):
  y = np.where(MASK, Y, 0)
  s = jxent.linear_token_stats(H.reshape(1, N, D), W, y.reshape(1, N), bias=B,
                               where=MASK.reshape(1, N), temperature=TEMP, chunk_size=8)
  assert s.logsumexp.shape == (1, N) and s.argmax.dtype == jnp.int32
  with jax.enable_x64(True):
    z = (np.asarray(H, np.float64) @ W + B) / TEMP
    lse = np.asarray(jax.nn.logsumexp(z, axis=-1))
    lp = z - lse[:, None]
    ent = -np.sum(np.exp(lp) * lp, axis=-1)
  keep = MASK
  assert rel(s.logsumexp[0][keep], lse[keep]) < 1e-6
  assert rel(s.entropy[0][keep], ent[keep]) < 1e-5
  np.testing.assert_array_equal(s.argmax[0][keep], np.argmax(z, axis=-1)[keep])
  assert rel(s.label_log_prob[0][keep], lp[np.arange(N), y][keep]) < 1e-5
  for a in (s.logsumexp, s.entropy, s.argmax, s.label_log_prob):
    assert np.all(np.asarray(a)[0][~keep] == 0)
  assert jxent.linear_token_stats(H, W).label_log_prob is None
  g = jax.grad(lambda h: jnp.sum(jxent.linear_token_stats(h, W, Y).entropy))(H)
  assert np.all(g == 0)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="temperature must be positive"):
    jxent.linear_entropy(H, W, temperature=0.0)
  with pytest.raises(ValueError, match=r"labels must have hidden's shape.*labels.shape=\(3,\)"):
    jxent.linear_log_probs(H, W, Y[:3])
  with pytest.raises(ValueError, match="weight_layout"):
    jxent.linear_entropy(H, W, weight_layout="dd")
  with pytest.raises(ValueError, match=r"must match weight's D.*weight.shape=\(50, 16\)"):
    jxent.linear_entropy(H, W.T)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU buffer assignment")
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("name", ["log_probs", "entropy"])
def test_scratch_is_blocks_not_logits(name, reduction):
  n, d, v = 1024, 32, 4096
  h = jax.ShapeDtypeStruct((n, d), jnp.float32)
  w = jax.ShapeDtypeStruct((d, v), jnp.float32)
  y = jnp.zeros(n, jnp.int32)
  if name == "log_probs":
    fused = lambda h, w: jnp.sum(jxent.linear_log_probs(h, w, y, chunk_size=64,
                                                        reduction=reduction))
    dense = lambda h, w: jnp.sum(jax.nn.log_softmax(h @ w)[jnp.arange(n), y])
  else:
    fused = lambda h, w: jnp.sum(jxent.linear_entropy(h, w, chunk_size=64,
                                                      reduction=reduction))
    dense = lambda h, w: jnp.sum(-jnp.sum(jax.nn.softmax(h @ w) * jax.nn.log_softmax(h @ w),
                                          axis=-1))
  scratch = lambda f: jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, w).compile(
  ).memory_analysis().temp_size_in_bytes
  # The unfused gradient holds [N, V] float32 logits (16 MiB, 16 blocks of [64, V]) and
  # more; the fused one a few [64, V] blocks of the forward pass and [64, 2048] ones of the
  # derivative, nothing of size N x V.
  block = 64 * v * 4
  fused_b, dense_b = scratch(fused), scratch(dense)
  assert fused_b <= 6 * block and fused_b < dense_b / 3, (fused_b, dense_b)


# ------------------------------------------------------------ dense counterparts


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


ZP = RNG.normal(size=(6, 9)).astype(np.float32) * 2
ZQ = RNG.normal(size=(6, 9)).astype(np.float32) * 2


def np_kl(lp, lq):
  p = np.exp(lp)
  return np.sum(np.where(p > 0, p * (lp - lq), 0), -1)


def np_js(zp, zq, beta, temp):
  lp, lq = np_log_softmax(zp / temp), np_log_softmax(zq / temp)
  lm = np.log(beta * np.exp(lp) + (1 - beta) * np.exp(lq))
  return beta * np_kl(lp, lm) + (1 - beta) * np_kl(lq, lm)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_js_divergence_from_logits_against_numpy(beta):
  got = jxent.js_divergence_from_logits(ZP, ZQ, beta=beta, temperature=TEMP)
  np.testing.assert_allclose(got, np_js(ZP, ZQ, beta, TEMP), rtol=1e-5)
  # gradient in both arguments, non-uniform cotangent, against a float64 JAX formula
  cot = np.linspace(0.5, 1.5, 6)

  def ref(zp, zq):
    lp, lq = jax.nn.log_softmax(zp / TEMP), jax.nn.log_softmax(zq / TEMP)
    lm = jnp.logaddexp(np.log(beta) + lp, np.log1p(-beta) + lq)
    js = (beta * jnp.sum(jnp.exp(lp) * (lp - lm), -1)
          + (1 - beta) * jnp.sum(jnp.exp(lq) * (lq - lm), -1))
    return jnp.sum(cot * js)

  g = jax.grad(lambda a, b: jnp.sum(jnp.asarray(cot, jnp.float32) * jxent.js_divergence_from_logits(
      a, b, beta=beta, temperature=TEMP)), argnums=(0, 1))(ZP, ZQ)
  with jax.enable_x64(True):
    g_want = jax.grad(ref, argnums=(0, 1))(*f64(ZP, ZQ))
  for a, b in zip(g, g_want):
    assert rel(a, b) < 1e-5


def test_js_limits_and_end_points():
  kl_pq = np_kl(np_log_softmax(ZP), np_log_softmax(ZQ))
  kl_qp = np_kl(np_log_softmax(ZQ), np_log_softmax(ZP))
  with jax.enable_x64(True):
    zp, zq = f64(ZP, ZQ)
    # JS_b / b = D(p||q) + O(b sum p^2 / q): b = 1e-9 leaves it under 1e-5 here.
    small = np.asarray(jxent.js_divergence_from_logits(zp, zq, beta=1e-9))
    large = np.asarray(jxent.js_divergence_from_logits(zp, zq, beta=1 - 1e-9))
  np.testing.assert_allclose(small / 1e-9, kl_pq, rtol=1e-5)
  np.testing.assert_allclose(large / (1 - (1 - 1e-9)), kl_qp, rtol=1e-5)
  np.testing.assert_allclose(jxent.js_divergence_from_logits(ZP, ZQ, beta=0.0), kl_pq, rtol=1e-5)
  np.testing.assert_allclose(jxent.js_divergence_from_logits(ZP, ZQ, beta=1.0), kl_qp, rtol=1e-5)
  sym = jxent.js_divergence_from_logits(ZP, ZQ)
  np.testing.assert_allclose(sym, jxent.js_divergence_from_logits(ZQ, ZP), rtol=1e-6)
  assert np.all((np.asarray(sym) >= 0) & (np.asarray(sym) <= np.log(2)))
  with pytest.raises(ValueError, match="beta must be in"):
    jxent.js_divergence_from_logits(ZP, ZQ, beta=1.5)


def test_kl_from_logits_with_temperature_and_dense_log_probs():
  got = jxent.kl_divergence_from_logits(ZP, ZQ, temperature=2.5)
  np.testing.assert_allclose(got, np_kl(np_log_softmax(ZP / 2.5), np_log_softmax(ZQ / 2.5)),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="temperature must be positive"):
    jxent.kl_divergence_from_logits(ZP, ZQ, temperature=-1.0)
  y = np.array([0, 3, 8, 9, 2, -1])
  keep = np.array([True, True, True, True, False, False])
  lp = jxent.log_probs(ZP, y, temperature=TEMP, where=keep)
  want = np_log_softmax(ZP / TEMP)[np.arange(6), np.clip(y, 0, 8)]
  np.testing.assert_allclose(np.asarray(lp)[:3], want[:3], rtol=1e-5)
  assert np.isnan(lp[3]) and np.all(np.asarray(lp)[4:] == 0)  # out of range; dropped
  # the dense and the fused log-probabilities agree
  z = H @ W + B
  np.testing.assert_allclose(
      jxent.log_probs(z, Y, temperature=TEMP, where=MASK),
      jxent.linear_log_probs(H, W, Y, bias=B, temperature=TEMP, where=MASK), rtol=1e-5,
      atol=1e-6)
  g = jax.grad(lambda z: jnp.sum(jnp.asarray(COT[:6], jnp.float32) * jxent.log_probs(
      z, y, where=keep)))(ZP)
  with jax.enable_x64(True):
    lsm = jax.nn.log_softmax(f64(ZP)[0])
    onehot = np.eye(9)[np.clip(y, 0, 8)] * keep[:, None]
    g_want = (COT[:6, None] * keep[:, None]) * (onehot - np.exp(np.asarray(lsm)))
  ok = np.arange(6) != 3
  np.testing.assert_allclose(np.asarray(g)[ok], g_want[ok], rtol=1e-5, atol=1e-7)
  assert np.all(np.isnan(g[3]))  # the kept label outside [0, C): NaN, loudly


# ------------------------------------------------------------ distillation, two heads

DT = 12  # the teacher's width differs from the student's (D = 16)
HT = RNG.normal(size=(N, DT)).astype(np.float32)
WT = (RNG.normal(size=(DT, V)) * 0.6).astype(np.float32)
BT = (RNG.normal(size=V) * 0.3).astype(np.float32)


def ref_pair(hs, ws, bs, ht, wt, bt, kind, beta, layout="dv", temp=TEMP, mask=MASK):
  """float64 per-token divergence from the dense logits, plain JAX."""
  lq = ref_log_softmax(hs, ws, bs, layout, temp)
  lp = ref_log_softmax(ht, wt, bt, layout, temp)
  p, q = jnp.exp(lp), jnp.exp(lq)
  if kind == "forward":
    out = jnp.sum(p * (lp - lq), -1)
  elif kind == "reverse":
    out = jnp.sum(q * (lq - lp), -1)
  elif kind == "tv":
    out = 0.5 * jnp.sum(jnp.abs(p - q), -1)
  else:
    lm = jnp.log(beta * p + (1 - beta) * q)
    out = beta * jnp.sum(p * (lp - lm), -1) + (1 - beta) * jnp.sum(q * (lq - lm), -1)
  return jnp.where(mask, out, 0)


def fused_pair(hs, ws, bs, ht, wt, bt, kind, beta, layout="dv", **kw):
  common = dict(student_bias=bs, teacher_bias=bt, weight_layout=layout, where=MASK,
                temperature=TEMP, chunk_size=8, **kw)
  return divergence(kind, beta, hs, ws, ht, wt, **common)


def divergence(kind, beta, hs, ws, ht, wt, **kw):
  """The fused KL (``kind`` its direction), JS or total variation distance."""
  if kind == "js":
    return jxent.linear_js_divergence(hs, ws, ht, wt, beta=beta, **kw)
  if kind == "tv":
    return jxent.linear_tv_distance(hs, ws, ht, wt, **kw)
  return jxent.linear_kl_divergence(hs, ws, ht, wt, direction=kind, **kw)


@pytest.mark.parametrize("kind, beta, layout, impl", [
    # JS on this platform: test_distillation_every_autodiff_mode_in_float64 (float64, every
    # mode). The reverse KL's GPU/TPU path (its gradients after the terms' pass) is JS's.
    ("forward", None, "dv", "platform"), ("reverse", None, "vd", "platform"),
    ("forward", None, "vd", "accelerator"), ("js", 0.3, "vd", "accelerator"),
    ("tv", None, "dv", "platform"), ("tv", None, "vd", "accelerator")],
    indirect=["impl"])
def test_distillation_values_and_gradients_against_float64(kind, beta, layout, impl,
                                                           monkeypatch):
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 16)  # one slice of 32 and one of 18
  ws, wt = (W, WT) if layout == "dv" else (W.T, WT.T)
  args = (H, ws, B, HT, wt, BT)
  none = lambda *a: fused_pair(*a, kind, beta, layout, reduction="none", teacher_grad=True)
  got = jax.jit(none)(*args)
  with jax.enable_x64(True):
    a64 = f64(*args)
    want = ref_pair(*a64, kind, beta, layout)
    cot = jnp.asarray(COT)
    g_want = jax.grad(lambda *a: jnp.sum(cot * ref_pair(*a, kind, beta, layout)),
                      argnums=tuple(range(6)))(*a64)
    t = f64(*(np.cos(x) for x in args))
    jv_want = jax.jvp(lambda *a: ref_pair(*a, kind, beta, layout), tuple(a64), tuple(t))[1]
  want = np.asarray(want)
  assert rel(got, want) < 1e-5
  g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.asarray(COT, jnp.float32) * none(*a)),
                       argnums=tuple(range(6))))(*args)
  for name, a, b in zip(["hs", "ws", "bs", "ht", "wt", "bt"], g, g_want):
    assert rel(a, b) < 1e-5, name
  jv = jax.jit(lambda a, t: jax.jvp(none, a, t)[1])(
      args, tuple(np.cos(x).astype(np.float32) for x in args))
  assert rel(jv, jv_want) < 1e-5
  # the teacher's side has no gradient by default; reductions over kept tokens
  g0 = jax.jit(jax.grad(lambda *a: fused_pair(*a, kind, beta, layout), argnums=(0, 3, 4)))(
      *args)
  assert rel(g0[0], jax.jit(jax.grad(lambda h: jnp.sum(none(h, *args[1:])) / MASK.sum()))(
      H)) < 1e-5
  assert np.all(g0[1] == 0) and np.all(g0[2] == 0)
  np.testing.assert_allclose(fused_pair(*args, kind, beta, layout), np.sum(want) / MASK.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(fused_pair(*args, kind, beta, layout, reduction="sum"),
                             np.sum(want), rtol=1e-5)
  # The scalar reductions' own rule (gradients formed with the divergence): every argument,
  # the teacher's too, under a factor 1.7, and a forward-mode tangent.
  mean = lambda *a: 1.7 * fused_pair(*a, kind, beta, layout, teacher_grad=True)
  with jax.enable_x64(True):
    ref_mean = lambda *a: 1.7 * jnp.sum(ref_pair(*a, kind, beta, layout)) / MASK.sum()
    gm_want = jax.grad(ref_mean, argnums=tuple(range(6)))(*a64)
    jm_want = jax.jvp(ref_mean, tuple(a64), tuple(t))[1]
  gm = jax.jit(jax.grad(mean, argnums=tuple(range(6))))(*args)
  for name, a, b in zip(["hs", "ws", "bs", "ht", "wt", "bt"], gm, gm_want):
    assert rel(a, b) < 1e-5, name
  # The teacher's side alone (the student's inputs constant: its gradients not formed).
  gt = jax.jit(jax.grad(lambda ht, wt, bt: mean(H, ws, B, ht, wt, bt), argnums=(0, 1, 2)))(
      *args[3:])
  for name, a, b in zip(["ht", "wt", "bt"], gt, gm_want[3:]):
    assert rel(a, b) < 1e-5, name
  jm = jax.jvp(mean, args, tuple(np.cos(x).astype(np.float32) for x in args))[1]
  # One number summed from terms of both signs (sum |g t| is ~200x the result here): float32
  # resolves it relative to the terms, so that is the scale of the tolerance.
  terms = sum(float(np.sum(np.abs(np.asarray(a) * np.asarray(b)))) for a, b in zip(gm_want, t))
  assert abs(float(jm) - float(jm_want)) < 1e-5 * terms


@pytest.mark.parametrize("kind, impl", [("forward", "platform"), ("reverse", "platform"),
                                        ("js", "platform"), ("js", "accelerator"),
                                        ("tv", "platform")],
                         indirect=["impl"])
def test_distillation_every_autodiff_mode_in_float64(kind, impl):
  # First order against finite differences in both modes; second order (Hessian-vector
  # products, forward over reverse) against the exact dense float64 formula.
  with jax.enable_x64(True):
    args = tuple(f64(H[:10], W[:, :12], B[:12], HT[:10], WT[:, :12]))
    bt = f64(BT[:12])[0]
    mask, cot = MASK[:10], jnp.asarray(COT[:10])

    def f(hs, ws, bs, ht, wt):
      kw = dict(student_bias=bs, teacher_bias=bt, where=mask, temperature=TEMP,
                teacher_grad=True, reduction="none", chunk_size=4)
      return jnp.sum(cot * divergence(kind, 0.3, hs, ws, ht, wt, **kw))

    def r(hs, ws, bs, ht, wt):
      return jnp.sum(cot * ref_pair(hs, ws, bs, ht, wt, bt, kind, 0.3, mask=mask))

    def f_mean(hs, ws, bs, ht, wt):  # a scalar reduction: the forward method's rule
      kw = dict(student_bias=bs, teacher_bias=bt, where=mask, temperature=TEMP,
                teacher_grad=True, chunk_size=4)
      return 0.7 * divergence(kind, 0.3, hs, ws, ht, wt, **kw)

    def r_mean(hs, ws, bs, ht, wt):
      return 0.7 * jnp.sum(ref_pair(hs, ws, bs, ht, wt, bt, kind, 0.3, mask=mask)) / mask.sum()

    f, f_mean = jax.jit(f), jax.jit(f_mean)  # each derivative program compiled once
    check_grads(f, args, order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    t = tuple(jnp.cos(a) for a in args)
    # The scalar rule to second order for JS and the total variation (whose gradients have
    # the most terms); the KL directions' scalar rule is checked in every argument at first
    # order above.
    for fn, ref in ((f, r), (f_mean, r_mean)) if kind in ("js", "tv") else ((f, r),):
      for a, b in zip(jax.grad(fn, argnums=tuple(range(5)))(*args),
                      jax.grad(ref, argnums=tuple(range(5)))(*args)):
        assert rel(a, b) < 1e-12
      assert rel(jax.jvp(fn, args, t)[1], jax.jvp(ref, args, t)[1]) < 1e-12
      hvp = lambda g: jax.jvp(jax.grad(g, argnums=tuple(range(5))), args, t)[1]
      for a, b in zip(hvp(fn), hvp(ref)):
        assert rel(a, b) < 1e-12


def test_distillation_edge_values_and_errors(impl):
  same = jxent.linear_js_divergence(H, W, H, W, reduction="none")
  assert np.all(np.asarray(same) == 0)  # exactly 0, not -1e-8
  b = np.zeros(V, np.float32)
  b[0] = -np.inf  # the student masks class 0, which the teacher does not
  fwd = jxent.linear_kl_divergence(H, W, HT, WT, student_bias=b, reduction="none")
  assert np.all(np.isinf(fwd))
  js = jxent.linear_js_divergence(H, W, HT, WT, student_bias=b, reduction="none")
  assert np.all(np.isfinite(js)) and np.all(np.asarray(js) <= np.log(2))
  np.testing.assert_allclose(  # the end points are the KLs
      jxent.linear_js_divergence(H, W, HT, WT, beta=0.0),
      jxent.linear_kl_divergence(H, W, HT, WT), rtol=1e-6)
  np.testing.assert_allclose(
      jxent.linear_js_divergence(H, W, HT, WT, beta=1.0),
      jxent.linear_kl_divergence(H, W, HT, WT, direction="reverse"), rtol=1e-6)
  # The total variation: exactly 0 for the same head, 1 > TV > 0 with the masked class,
  # below Pinsker's bound sqrt(KL / 2) per token, and the dense function on the logits.
  assert np.all(np.asarray(jxent.linear_tv_distance(H, W, H, W, reduction="none")) == 0)
  tv = np.asarray(jxent.linear_tv_distance(H, W, HT, WT, student_bias=b, reduction="none"))
  assert np.all((tv > 0) & (tv < 1))
  kl = np.asarray(jxent.linear_kl_divergence(H, W, HT, WT, reduction="none"))
  assert np.all(np.asarray(jxent.linear_tv_distance(H, W, HT, WT, reduction="none"))
                <= np.sqrt(kl / 2))
  np.testing.assert_allclose(tv, jxent.tv_distance_from_logits(HT @ WT, H @ W + b), rtol=1e-5)
  with pytest.raises(ValueError, match=r"share the vocabulary.*V=50.*V=49"):
    jxent.linear_kl_divergence(H, W, HT, WT[:, :49])
  with pytest.raises(ValueError, match="same tokens"):
    jxent.linear_kl_divergence(H, W, HT[:5], WT)
  with pytest.raises(ValueError, match="direction"):
    jxent.linear_kl_divergence(H, W, HT, WT, direction="both")


# ------------------------------------------------------------ distillation from top-k

K = 5
TEACHER_LP = np_log_softmax((HT.astype(np.float64) @ WT + BT) / TEMP)  # [N, V] full teacher
TOPK = np.argsort(-TEACHER_LP, axis=-1)[:, :K]                # [N, K]
TOPK_LP = np.take_along_axis(TEACHER_LP, TOPK, axis=-1)       # [N, K]


def ref_topk(h, w, b, layout="dv", idx=TOPK, lpt=TOPK_LP):
  """float64 KL over the k classes and "any other class", from dense student logits."""
  lq = ref_log_softmax(h, w, b, layout, TEMP)
  lq_i = jnp.take_along_axis(lq, jnp.asarray(idx), axis=-1)
  others = np.ones(lq.shape, bool)
  others[np.arange(lq.shape[0])[:, None], idx] = False
  lq_rest = jax.nn.logsumexp(jnp.where(others, lq, -jnp.inf), axis=-1)
  p = jnp.exp(lpt)
  r = 1 - jnp.sum(p, -1)
  out = jnp.sum(p * (lpt - lq_i), -1) + r * (jnp.log(r) - lq_rest)
  return jnp.where(MASK, out, 0)


# ------------------------------------------------- distillation with the labels' loss

_KINDS = {"kl": "forward", "reverse_kl": "reverse", "js": "js", "tv": "tv"}
Y_HARD = np.where(np.arange(N) % 9 == 4, -100, Y)  # some ignored tokens


def ref_distill(hs, ws, bs, ht, wt, bt, divergence, beta, hard, soft, layout="dv"):
  """float64 per-token hard_weight * CE(student at T = 1) + soft_weight * divergence."""
  keep = MASK & (Y_HARD != -100)
  lq1 = ref_log_softmax(hs, ws, bs, layout, 1.0)
  ce = -jnp.take_along_axis(lq1, jnp.asarray(np.clip(Y_HARD, 0, V - 1))[:, None], -1)[:, 0]
  d = ref_pair(hs, ws, bs, ht, wt, bt, _KINDS[divergence], beta, layout, mask=keep)
  return jnp.where(keep, hard * ce + soft * d, 0)


def fused_distill(hs, ws, bs, ht, wt, bt, divergence, beta, hard, soft, layout="dv", **kw):
  return jxent.linear_distillation_loss(
      hs, ws, ht, wt, Y_HARD, divergence=divergence, beta=beta, hard_weight=hard,
      soft_weight=soft, temperature=TEMP, ignore_index=-100, student_bias=bs, teacher_bias=bt,
      weight_layout=layout, where=MASK, chunk_size=8, **kw)


# Each divergence once, both layouts and both implementations (suite time); JS on this
# platform: test_distillation_with_labels_second_order_and_one_pass.
@pytest.mark.parametrize("divergence, layout, impl", [
    ("kl", "dv", "platform"), ("reverse_kl", "vd", "accelerator"),
    ("js", "dv", "accelerator"), ("tv", "vd", "platform")], indirect=["impl"])
def test_distillation_with_labels_against_float64(divergence, layout, impl):
  # Every reduction, values and gradients in every argument (the teacher's with
  # teacher_grad) under a non-uniform cotangent, ignored and masked tokens, T != 1 for the
  # divergence and T = 1 for the labels' term.
  ws, wt = (W, WT) if layout == "dv" else (W.T, WT.T)
  args = (H, ws, B, HT, wt, BT)
  opts = (divergence, 0.3, 0.6, 1.3, layout)
  keep = MASK & (Y_HARD != -100)
  with jax.enable_x64(True):
    a64 = f64(*args)
    want = np.asarray(ref_distill(*a64, *opts))
    cot = jnp.asarray(COT)
    g_want = jax.grad(lambda *a: jnp.sum(cot * ref_distill(*a, *opts)),
                      argnums=tuple(range(6)))(*a64)
    gm_want = jax.grad(lambda *a: 1.7 * jnp.sum(ref_distill(*a, *opts)) / keep.sum(),
                       argnums=tuple(range(6)))(*a64)
  for reduction, value in (("none", want), ("sum", want.sum()),
                           ("mean", want.sum() / keep.sum())):
    got = jax.jit(lambda *a: fused_distill(*a, *opts, reduction=reduction))(*args)
    assert rel(got, value) < 1e-5, reduction
  none = lambda *a: fused_distill(*a, *opts, reduction="none", teacher_grad=True)
  g = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.asarray(COT, jnp.float32) * none(*a)),
                       argnums=tuple(range(6))))(*args)
  mean = lambda *a: 1.7 * fused_distill(*a, *opts, teacher_grad=True)
  gm = jax.jit(jax.grad(mean, argnums=tuple(range(6))))(*args)
  for name, a, b, c, d in zip(["hs", "ws", "bs", "ht", "wt", "bt"], g, g_want, gm, gm_want):
    assert rel(a, b) < 1e-5, name
    assert rel(c, d) < 1e-5, name
  # The teacher has no gradient by default; the labels' term alone is the cross-entropy.
  g0 = jax.jit(jax.grad(lambda *a: fused_distill(*a, *opts), argnums=(3, 4, 5)))(*args)
  assert all(np.all(x == 0) for x in g0)
  ce = jxent.linear_cross_entropy(H, ws, jnp.asarray(Y_HARD), bias=B, weight_layout=layout,
                                  where=MASK, ignore_index=-100)
  np.testing.assert_allclose(fused_distill(*args, divergence, 0.3, 1.0, 0.0, layout), ce,
                             rtol=1e-5)


@pytest.mark.parametrize("impl", ["platform", "accelerator"], indirect=True)
def test_distillation_with_labels_second_order_and_one_pass(impl):
  # float64: the scalar rule's Hessian-vector products against the dense formula; the
  # labels' term shares the divergence's loops (a derivative of the combined loss has as
  # many as that of the divergence alone, fewer than the two functions called apart).
  with jax.enable_x64(True):
    args = tuple(f64(H[:10], W[:, :12], B[:12]))
    ht, wt, bt = f64(HT[:10], WT[:, :12], BT[:12])
    y = jnp.asarray(np.where(np.arange(10) == 3, -100, Y[:10] % 12))
    keep = MASK[:10] & (np.asarray(y) != -100)

    def f(hs, ws, bs):
      return jxent.linear_distillation_loss(
          hs, ws, ht, wt, y, divergence="js", beta=0.3, hard_weight=0.4, soft_weight=0.9,
          temperature=TEMP, ignore_index=-100, student_bias=bs, teacher_bias=bt,
          where=MASK[:10], chunk_size=4)

    def r(hs, ws, bs):
      lq1 = ref_log_softmax(hs, ws, bs, "dv", 1.0)
      ce = -jnp.take_along_axis(lq1, jnp.clip(y, 0, 11)[:, None], -1)[:, 0]
      d = ref_pair(hs, ws, bs, ht, wt, bt, "js", 0.3, mask=keep)
      return jnp.sum(jnp.where(keep, 0.4 * ce + 0.9 * d, 0)) / keep.sum()

    f = jax.jit(f)
    t = tuple(jnp.cos(a) for a in args)
    for a, b in zip(jax.grad(f, argnums=(0, 1, 2))(*args), jax.grad(r, argnums=(0, 1, 2))(*args)):
      assert rel(a, b) < 1e-12
    hvp = lambda g: jax.jvp(jax.grad(g, argnums=(0, 1, 2)), args, t)[1]
    for a, b in zip(hvp(f), hvp(r)):
      assert rel(a, b) < 1e-12
    check_grads(f, args, order=1, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)

    def loops(fn):
      jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(*args)
      return str(jaxpr).count("scan[") + str(jaxpr).count("while[")

    alone = lambda hs, ws, bs: jxent.linear_js_divergence(
        hs, ws, ht, wt, beta=0.3, student_bias=bs, teacher_bias=bt, temperature=TEMP,
        where=MASK[:10], chunk_size=4)
    apart = lambda hs, ws, bs: alone(hs, ws, bs) + jxent.linear_cross_entropy(
        hs, ws, y, bias=bs, where=MASK[:10], ignore_index=-100, chunk_size=4)
    assert loops(f) == loops(alone) < loops(apart)


def test_distillation_with_labels_edges_and_errors():
  hs, ws, ht, wt = H[:6], W, HT[:6], WT
  y = jnp.asarray(Y[:6]).at[2].set(V)  # a kept label outside [0, V): NaN, loudly
  for reduction in ("mean", "none"):
    out = np.asarray(jxent.linear_distillation_loss(hs, ws, ht, wt, y, reduction=reduction))
    assert np.isnan(out).any() if reduction == "mean" else (
        np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, 2))))
  g = jax.grad(lambda h: jxent.linear_distillation_loss(h, ws, ht, wt, y, reduction="sum"))(hs)
  assert np.all(np.isnan(g[2])) and np.all(np.isfinite(np.delete(np.asarray(g), 2, 0)))
  # hard_weight 0: the divergence alone, scaled.
  np.testing.assert_allclose(
      jxent.linear_distillation_loss(hs, ws, ht, wt, y, hard_weight=0.0, soft_weight=2.0),
      2 * jxent.linear_kl_divergence(hs, ws, ht, wt), rtol=1e-6)
  with pytest.raises(ValueError, match="divergence must be one of"):
    jxent.linear_distillation_loss(hs, ws, ht, wt, y, divergence="kld")
  with pytest.raises(ValueError, match="beta must be in"):
    jxent.linear_distillation_loss(hs, ws, ht, wt, y, divergence="js", beta=1.5)
  # JS's end points are the KL divergences (Liger's beta of its JSD loss).
  ok = jnp.asarray(Y[:6])
  for beta, direction in ((0.0, "kl"), (1.0, "reverse_kl")):
    np.testing.assert_allclose(
        jxent.linear_distillation_loss(hs, ws, ht, wt, ok, divergence="js", beta=beta),
        jxent.linear_distillation_loss(hs, ws, ht, wt, ok, divergence=direction), rtol=1e-6)
  with pytest.raises(ValueError, match="labels must have the tokens' shape"):
    jxent.linear_distillation_loss(hs, ws, ht, wt, y[:5])
  with pytest.raises(TypeError, match="labels"):
    jxent.linear_distillation_loss(hs, ws, ht, wt, jnp.zeros(6))


@pytest.mark.parametrize("layout, impl", [("dv", "platform"), ("vd", "platform"),
                                          ("vd", "accelerator")], indirect=["impl"])
def test_topk_kl_values_and_gradients_against_float64(layout, impl, monkeypatch):
  monkeypatch.setattr(_fused, "_VOCAB_SLICE", 16)
  w = W if layout == "dv" else W.T
  f = lambda h, w, b: jxent.linear_topk_kl_divergence(
      h, w, TOPK, TOPK_LP.astype(np.float32), student_bias=b, weight_layout=layout,
      where=MASK, temperature=TEMP, reduction="none", chunk_size=8)
  got = jax.jit(f)(H, w, B)
  with jax.enable_x64(True):
    a64 = f64(H, w, B)
    want = np.asarray(ref_topk(*a64, layout))
    cot = jnp.asarray(COT)
    g_want = jax.grad(lambda *a: jnp.sum(cot * ref_topk(*a, layout)), argnums=(0, 1, 2))(*a64)
    t = f64(np.cos(H), np.sin(w), np.cos(B))
    jv_want = jax.jvp(lambda *a: ref_topk(*a, layout), tuple(a64), tuple(t))[1]
  assert rel(got, want) < 1e-5
  assert np.all(np.asarray(got) >= -1e-7)
  g = jax.grad(lambda *a: jnp.sum(jnp.asarray(COT, jnp.float32) * f(*a)),
               argnums=(0, 1, 2))(H, w, B)
  for a, b in zip(g, g_want):
    assert rel(a, b) < 1e-5
  jv = jax.jvp(f, (H, w, B), tuple(np.asarray(x, np.float32) for x in t))[1]
  assert rel(jv, jv_want) < 1e-5


@pytest.mark.parametrize("reduction, impl", [("sum", "platform"), ("mean", "platform"),
                                             ("mean", "accelerator")], indirect=["impl"])
def test_topk_kl_scalar_reductions_against_float64(reduction, impl):
  # The forward method: gradients in h, W, b and in the teacher's log-probabilities.
  f = jax.jit(lambda h, w, b, lpt: 1.7 * jxent.linear_topk_kl_divergence(
      h, w, TOPK, lpt, student_bias=b, where=MASK, temperature=TEMP, reduction=reduction,
      chunk_size=8))
  args = (H, W, B, TOPK_LP.astype(np.float32))
  with jax.enable_x64(True):
    a64 = f64(*args)
    den = 1.0 if reduction == "sum" else np.sum(MASK)
    r = lambda h, w, b, lpt: 1.7 * jnp.sum(ref_topk(h, w, b, lpt=lpt)) / den
    want = r(*a64)
    g_want = jax.grad(r, argnums=(0, 1, 2, 3))(*a64)
  assert rel(f(*args), want) < 1e-5
  for a, b in zip(jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args), g_want):
    assert rel(a, b) < 1e-5


@pytest.mark.parametrize("reduction, layout", [("mean", "dv"), ("sum", "vd")])
def test_dense_teacher_against_float64(reduction, layout, impl):
  # teacher_indices=None: every class's log-probability given ([N, V] soft labels, with
  # classes the teacher rules out at -inf and a mass of 0.9): the forward method's values and
  # gradients in h, W, b and the target, second order, and the top-k form at k = V.
  lt = TEACHER_LP + np.log(0.9)
  lt[:, :4] = -np.inf
  lt = (lt - np.log(np.exp(lt).sum(-1, keepdims=True) / 0.9)).astype(np.float32)
  w = W if layout == "dv" else W.T
  f = jax.jit(lambda h, w, b, lt: 1.7 * jxent.linear_topk_kl_divergence(
      h, w, None, lt, student_bias=b, weight_layout=layout, where=MASK, temperature=TEMP,
      reduction=reduction, chunk_size=8))
  args = (H, w, B, lt)

  def ref(h, w, b, lt):
    lp = jax.nn.log_softmax(((h @ w if layout == "dv" else h @ w.T) + b) / TEMP)
    q = jnp.exp(lt)
    kl = jnp.sum(jnp.where(q > 0, q * (lt - jnp.where(q > 0, lp, 0)), 0), -1)
    return 1.7 * jnp.sum(jnp.where(MASK, kl, 0)) / (1.0 if reduction == "sum" else MASK.sum())

  with jax.enable_x64(True):
    a64 = f64(*args)
    want = ref(*a64)
    g_want = jax.grad(ref, argnums=(0, 1, 2, 3))(*a64)
  assert rel(f(*args), want) < 1e-5
  g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*args)
  for a, b in zip(g[:3], g_want[:3]):
    assert rel(a, b) < 1e-5
  kept = np.isfinite(lt)  # a ruled-out class: no slope (autodiff of the formula: NaN there)
  assert rel(np.where(kept, g[3], 0), np.where(kept, g_want[3], 0)) < 1e-5
  assert np.all(np.asarray(g[3])[~kept] == 0)
  # The default chunk (one, larger than N here) and a bfloat16 target (its own rounding).
  one = lambda lt: jxent.linear_topk_kl_divergence(H, w, None, lt, student_bias=B,
                                                   weight_layout=layout, where=MASK,
                                                   temperature=TEMP, reduction=reduction)
  np.testing.assert_allclose(1.7 * one(lt), f(*args), rtol=1e-5)
  lt16 = jnp.asarray(lt, jnp.bfloat16)
  np.testing.assert_allclose(one(lt16), one(np.asarray(lt16, np.float32)), rtol=1e-6)
  # A dropped token's target may hold anything (NaN): it reaches neither value nor gradient.
  bad = lt.copy()
  bad[np.flatnonzero(~MASK)[0]] = np.nan
  np.testing.assert_array_equal(f(H, w, B, bad), f(*args))
  assert all(np.all(np.isfinite(a)) for a in jax.grad(f, argnums=(0, 1, 2))(H, w, B, bad))
  # A kept token's NaN is NaN, loudly (not a class of no mass).
  bad = lt.copy()
  bad[np.flatnonzero(MASK)[0], 7] = np.nan
  assert np.isnan(f(H, w, B, bad))
  with jax.enable_x64(True):
    check_grads(lambda h, w: jxent.linear_topk_kl_divergence(
        h, w, None, f64(lt)[0], weight_layout=layout, where=MASK, temperature=TEMP,
        reduction=reduction, chunk_size=8), f64(H, w), order=2, modes=["fwd", "rev"])
  if impl == "platform":  # a whole distribution: the top-k form's numbers with all V indices
    whole = lt - np.float32(np.log(0.9))
    idx = np.broadcast_to(np.arange(V), (N, V))
    topk = jxent.linear_topk_kl_divergence(H, w, idx, np.maximum(whole, -1e30), student_bias=B,
                                           weight_layout=layout, where=MASK,
                                           temperature=TEMP, reduction="none")
    np.testing.assert_allclose(1.7 * jnp.sum(topk) / (1 if reduction == "sum" else MASK.sum()),
                               f(H, w, B, whole), rtol=1e-5)
  with pytest.raises(ValueError, match=r"teacher_log_probs must be \[..., V\] = \(37, 50\)"):
    jxent.linear_topk_kl_divergence(H, W, None, lt[:, :5])
  with pytest.raises(ValueError, match="needs reduction 'mean' or 'sum'"):
    jxent.linear_topk_kl_divergence(H, W, None, lt, reduction="none")


def test_topk_kl_bounds_and_full_vocabulary(impl):
  with jax.enable_x64(True):
    hs, ws, bs = f64(H, W, B)
    full_kl = np.asarray(jxent.kl_divergence_from_logits(
        (f64(HT)[0] @ f64(WT)[0] + f64(BT)[0]), hs @ ws + bs, temperature=TEMP))
    for k in (1, 5, 20) if impl == "platform" else ():  # the GPU/TPU form: k = V below
      idx = np.argsort(-TEACHER_LP, axis=-1)[:, :k]
      lpt = np.take_along_axis(TEACHER_LP, idx, axis=-1)
      got = np.asarray(jxent.linear_topk_kl_divergence(
          hs, ws, idx, lpt, student_bias=bs, temperature=TEMP, reduction="none",
          chunk_size=8))
      assert np.all(got >= 0) and np.all(got <= full_kl * (1 + 1e-12))  # coarse-graining
    idx = np.argsort(-TEACHER_LP, axis=-1)  # k = V: the full KL
    got = jxent.linear_topk_kl_divergence(
        hs, ws, idx, np.take_along_axis(TEACHER_LP, idx, axis=-1), student_bias=bs,
        temperature=TEMP, reduction="none", chunk_size=8)
    np.testing.assert_allclose(got, full_kl, rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match=r"teacher_indices and teacher_log_probs must be"):
    jxent.linear_topk_kl_divergence(H, W, TOPK[:3], TOPK_LP[:3])


def test_log_prob_loss_of_a_row_of_minus_inf_agrees_with_the_per_token_values():
  # Every class ruled out (bias -inf): the label's log-probability is -inf in both paths (the
  # forward method's logsumexp of such a row is taken as 0, as the per-token path's).
  h, w, y = np.ones((3, 2), np.float32), np.zeros((2, 4), np.float32), np.array([0, 1, 2])
  b = np.full(4, -np.inf, np.float32)
  np.testing.assert_array_equal(jxent.linear_log_probs(h, w, y, bias=b), [-np.inf] * 3)
  assert jxent.linear_log_prob_loss(h, w, y, lambda lp: -lp, bias=b, reduction="sum") == np.inf
