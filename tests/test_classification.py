"""Losses against float64 NumPy references of PyTorch's formulas, against Optax, and their
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads
from scipy.special import logsumexp

import jxent

N, C = 12, 7
RNG = np.random.default_rng(0)
Z = (RNG.normal(size=(N, C)) * 3).astype(np.float32)
Y = RNG.integers(0, C, size=N).astype(np.int32)
Y_SOFT = RNG.dirichlet(np.ones(C) * 0.5, size=N).astype(np.float32)
W = RNG.uniform(0.2, 2.0, size=C).astype(np.float32)
Y_BIN = (RNG.uniform(size=(N, C)) < 0.4).astype(np.float32)


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def torch_ce_ref(z, y, *, weight=None, ignore_index=None, eps=0.0, z_loss=0.0,
                 reduction="none"):
  """PyTorch F.cross_entropy (class-index targets), written out in float64 NumPy."""
  lp = log_softmax64(z)
  n, c = lp.shape
  w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
  valid = np.ones(n, bool) if ignore_index is None else y != ignore_index
  yc = np.where(valid, y, 0)
  nll = -w[yc] * lp[np.arange(n), yc] * valid
  smooth = -(lp * w).sum(-1) * valid
  lse = logsumexp(np.asarray(z, np.float64), axis=-1)
  per = (1 - eps) * nll + eps / c * smooth + z_loss * lse**2 * valid
  if reduction == "none":
    return per
  if reduction == "sum":
    return per.sum()
  denom = (w[yc] * valid).sum()
  return per.sum() / denom if denom else 0.0


def torch_soft_ce_ref(z, t, *, weight=None, eps=0.0, reduction="none"):
  """PyTorch F.cross_entropy with probability targets, in float64 NumPy."""
  lp = log_softmax64(z)
  c = lp.shape[-1]
  w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
  t = (1 - eps) * np.asarray(t, np.float64) + eps / c
  per = -(w * t * lp).sum(-1)
  return {"none": per, "sum": per.sum(), "mean": per.mean()}[reduction]


def bce_ref(z, y, pos_weight=None):
  z, y = np.asarray(z, np.float64), np.asarray(y, np.float64)
  pw = 1.0 if pos_weight is None else np.asarray(pos_weight, np.float64)
  log_sig = -np.logaddexp(0, -z)
  log_one_minus = -np.logaddexp(0, z)
  return -(pw * y * log_sig + (1 - y) * log_one_minus)


# ------------------------------------------------------------------ integer labels


def test_integer_matches_optax():
  got = jax.jit(jxent.softmax_cross_entropy_with_integer_labels)(Z, Y)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy_with_integer_labels(Z, Y),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, torch_ce_ref(Z, Y), rtol=1e-5)


OPTIONS = [
    dict(),
    dict(weight=W),
    dict(ignore_index=3),
    dict(eps=0.1),
    dict(z_loss=1e-2),
    dict(weight=W, ignore_index=3, eps=0.2),
    dict(weight=W, ignore_index=3, eps=0.2, z_loss=1e-3),
]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_integer_options_match_pytorch_formula(opts, reduction):
  kw = dict(class_weights=opts.get("weight"), ignore_index=opts.get("ignore_index"),
            label_smoothing=opts.get("eps", 0.0), z_loss=opts.get("z_loss", 0.0),
            reduction=reduction)
  f = jax.jit(lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, **kw))
  y = Y.copy()
  y[[0, 5]] = 3  # make sure some labels are ignored when ignore_index=3
  np.testing.assert_allclose(f(Z, y), torch_ce_ref(Z, y, reduction=reduction, **opts),
                             rtol=2e-5, atol=1e-6)


def test_integer_against_torch_when_installed():
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  y = Y.copy()
  y[2] = -100
  zt, yt = torch.tensor(Z), torch.tensor(y, dtype=torch.long)
  wt = torch.tensor(W)
  for red in ("none", "sum", "mean"):
    ref = F.cross_entropy(zt, yt, weight=wt, label_smoothing=0.15, reduction=red)
    got = jxent.softmax_cross_entropy_with_integer_labels(
        Z, y, class_weights=W, label_smoothing=0.15, ignore_index=-100, reduction=red)
    np.testing.assert_allclose(got, ref.numpy(), rtol=2e-5, atol=1e-6)
  zt.requires_grad_(True)
  F.cross_entropy(zt, yt, weight=wt, label_smoothing=0.15).backward()
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, y, class_weights=W, label_smoothing=0.15, ignore_index=-100, reduction="mean"))(Z)
  np.testing.assert_allclose(g, zt.grad.numpy(), rtol=1e-4, atol=1e-6)
  soft_ref = F.cross_entropy(torch.tensor(Z), torch.tensor(Y_SOFT), weight=wt,
                             label_smoothing=0.1)
  np.testing.assert_allclose(
      jxent.softmax_cross_entropy(Z, Y_SOFT, class_weights=W, label_smoothing=0.1,
                                  reduction="mean"), soft_ref.numpy(), rtol=2e-5)


def test_axis_one_like_pytorch():
  z = RNG.normal(size=(3, C, 5)).astype(np.float32)  # [N, C, T]
  y = RNG.integers(0, C, size=(3, 5))
  got = jxent.softmax_cross_entropy_with_integer_labels(z, y, axis=1)
  assert got.shape == (3, 5)
  ref = torch_ce_ref(np.moveaxis(z, 1, -1).reshape(-1, C), y.reshape(-1)).reshape(3, 5)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y, axis=1).sum())(z)
  ref_g = jax.nn.softmax(z, axis=1) - np.moveaxis(np.eye(C)[y], -1, 1)
  np.testing.assert_allclose(g, ref_g, atol=1e-6)


def test_where_per_example_equals_ignore_index():
  mask = Y != 2
  a = jxent.softmax_cross_entropy_with_integer_labels(Z, Y, where=mask, reduction="mean")
  b = jxent.softmax_cross_entropy_with_integer_labels(Z, Y, ignore_index=2, reduction="mean")
  np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(a, torch_ce_ref(Z, Y, ignore_index=2, reduction="mean"), rtol=1e-5)


def test_where_class_mask_matches_optax():
  # Its own generator: drawn from the shared RNG, the mask depended on which tests ran first.
  cmask = np.random.default_rng(3).uniform(size=(N, C)) < 0.7
  cmask[np.arange(N), Y] = True
  onehot = np.eye(C, dtype=np.float32)[Y]
  got_int = jxent.softmax_cross_entropy_with_integer_labels(Z, Y, where=cmask)
  got_soft = jxent.softmax_cross_entropy(Z, onehot, where=cmask)
  ref = optax.softmax_cross_entropy(Z, onehot, where=cmask)
  tol = dict(rtol=1e-5, atol=1e-6)  # float32 lse - z_y: small losses lose digits
  np.testing.assert_allclose(got_int, ref, **tol)
  np.testing.assert_allclose(got_soft, ref, **tol)
  # Smoothing spreads over the kept classes only.
  eps = 0.1
  kept = cmask.sum(-1, keepdims=True)
  t = np.where(cmask, (1 - eps) * onehot + eps / kept, 0)
  lp = log_softmax64(np.where(cmask, Z, -np.inf))
  ref_s = -np.where(cmask, t * np.where(cmask, lp, 0), 0).sum(-1)
  np.testing.assert_allclose(
      jxent.softmax_cross_entropy_with_integer_labels(Z, Y, where=cmask, label_smoothing=eps),
      ref_s, **tol)
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, Y, where=cmask).sum())(Z)
  assert np.all(np.asarray(g)[~cmask] == 0)


def test_ranking_softmax_loss_is_the_soft_loss_with_a_class_mask():
  # Optax's ranking_softmax_loss: relevance labels (times item weights) on the kept items,
  # the mean over lists with a kept item; one list with none.
  rng = np.random.default_rng(5)
  rel = rng.integers(0, 3, size=(N, C)).astype(np.float32)
  items = rng.uniform(size=(N, C)) < 0.7
  items[1] = False
  wt = rng.uniform(0.5, 1.5, size=(N, C)).astype(np.float32)
  for reduction, fn in (("mean", jnp.mean), ("sum", jnp.sum)):
    mine = lambda z: jxent.softmax_cross_entropy(z, np.where(items, rel * wt, 0), where=items,
                                                 reduction=reduction)
    ref = lambda z: optax.losses.ranking_softmax_loss(z, rel, where=items, weights=wt,
                                                      reduce_fn=fn)
    np.testing.assert_allclose(mine(Z), ref(Z), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(mine)(Z), jax.grad(ref)(Z), rtol=1e-5, atol=1e-6)


def test_all_ignored_mean_is_zero_with_zero_gradient():
  y = np.full(N, -100)
  f = lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, y, ignore_index=-100, reduction="mean", class_weights=W)
  assert f(Z) == 0.0
  g = jax.grad(f)(Z)
  assert np.all(g == 0)


# ------------------------------------------------------------------------ soft labels


def test_soft_matches_optax_and_its_label_gradient():
  got = jax.jit(jxent.softmax_cross_entropy)(Z, Y_SOFT)
  np.testing.assert_allclose(got, optax.softmax_cross_entropy(Z, Y_SOFT), rtol=1e-6)
  gy = jax.grad(lambda y: jxent.softmax_cross_entropy(Z, y).sum())(Y_SOFT)
  gy_ref = jax.grad(lambda y: optax.softmax_cross_entropy(Z, y).sum())(Y_SOFT)
  np.testing.assert_allclose(gy, gy_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("opts", [dict(), dict(weight=W), dict(eps=0.3), dict(weight=W, eps=0.1)],
                         ids=lambda o: "-".join(o) or "plain")
def test_soft_options_match_pytorch_formula(opts, reduction):
  got = jxent.softmax_cross_entropy(Z, Y_SOFT, class_weights=opts.get("weight"),
                                    label_smoothing=opts.get("eps", 0.0), reduction=reduction)
  np.testing.assert_allclose(got, torch_soft_ce_ref(Z, Y_SOFT, reduction=reduction, **opts),
                             rtol=2e-5)


def test_soft_where_examples_and_z_loss():
  mask = np.arange(N) % 3 != 0
  got = jxent.softmax_cross_entropy(Z, Y_SOFT, where=mask, z_loss=1e-2, reduction="mean")
  lse = logsumexp(Z.astype(np.float64), axis=-1)
  per = torch_soft_ce_ref(Z, Y_SOFT) + 1e-2 * lse**2
  np.testing.assert_allclose(got, per[mask].mean(), rtol=1e-5)


# -------------------------------------------------------------------- exact gradients


def test_gradient_is_softmax_minus_y():
  gi = jax.jit(jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, Y).sum()))(Z)
  assert np.max(np.abs(gi - (jax.nn.softmax(Z) - np.eye(C)[Y]))) < 1e-6
  gs = jax.grad(lambda z: jxent.softmax_cross_entropy(z, Y_SOFT).sum())(Z)
  assert np.max(np.abs(gs - (jax.nn.softmax(Z) - Y_SOFT))) < 1e-6


def test_weighted_gradient_formula():
  eps = 0.1
  t = ((1 - eps) * np.eye(C)[Y] * W[Y][:, None] + eps / C * W[None, :])
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, Y, class_weights=W, label_smoothing=eps).sum())(Z)
  ref = t.sum(-1, keepdims=True) * jax.nn.softmax(Z) - t
  np.testing.assert_allclose(g, ref, atol=2e-6)


def test_gradients_agree_with_autodiff_of_the_formula():
  def naive(z, y):
    lp = jax.nn.log_softmax(z)
    nll = -W[y] * jnp.take_along_axis(lp, y[:, None], -1)[:, 0]
    smooth = -(lp * W).sum(-1)
    lse = jax.nn.logsumexp(z, -1)
    return ((0.8 * nll + 0.2 / C * smooth + 1e-3 * lse**2) * (y != 3)).sum()

  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, Y, class_weights=W, label_smoothing=0.2, z_loss=1e-3, ignore_index=3,
      reduction="sum"))(Z)
  np.testing.assert_allclose(g, jax.grad(naive)(Z, Y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["integer", "soft", "sigmoid"])
def test_check_grads(kind):
  with jax.enable_x64(True):
    z = jnp.asarray(Z[:4], jnp.float64)
    if kind == "integer":
      f = lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, Y[:4], class_weights=W, label_smoothing=0.1, z_loss=1e-2, reduction="mean")
    elif kind == "soft":
      f = lambda z: jxent.softmax_cross_entropy(
          z, jnp.asarray(Y_SOFT[:4], jnp.float64), label_smoothing=0.1, z_loss=1e-2).sum()
    else:
      f = lambda z: jxent.sigmoid_binary_cross_entropy(
          z, jnp.asarray(Y_BIN[:4], jnp.float64), pos_weight=jnp.asarray(W, jnp.float64)).sum()
    f = jax.jit(f)  # each derivative program compiled once
    check_grads(f, (z,), order=1, modes=["rev"])
    # Second order through the custom backward pass (Hessian-vector products).
    check_grads(jax.jit(jax.grad(f)), (z,), order=1, modes=["rev", "fwd"])


def _large_residuals(f, *args):
  from jax._src.ad_checkpoint import saved_residuals

  return [(r[0].shape, r[1]) for r in saved_residuals(f, *args) if np.prod(r[0].shape) >= N * C]


def test_residuals_are_only_inputs_and_logsumexp():
  for f in (
      lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, Y, label_smoothing=0.1, class_weights=W, z_loss=1e-3, ignore_index=1).sum(),
      lambda z: jxent.softmax_cross_entropy(z, Y_SOFT, label_smoothing=0.1).sum(),
  ):
    big = _large_residuals(f, Z)
    assert len(big) <= 2, big
    assert any("argument" in why for _, why in big)
    # The only [N, C] residual computed by jxent is none: the rest are inputs/constants.
    assert not any("output of" in why for _, why in big), big
  # The naive autodiff version keeps a second [N, C] array (softmax or log-softmax).
  naive = _large_residuals(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, Y).sum(),
                           Z)
  assert any("output of" in why for _, why in naive)


# ------------------------------------------------------------------ extremes, dtypes


def test_masked_logits_finite_loss_zero_grad():
  z = Z.copy()
  z[:, 0] = -np.inf
  y = np.where(Y == 0, 1, Y)
  loss = jxent.softmax_cross_entropy_with_integer_labels(z, y)
  assert np.all(np.isfinite(loss))
  np.testing.assert_allclose(loss, torch_ce_ref(np.where(np.isinf(z), -1e30, z), y), rtol=1e-5)
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y).sum())(z)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[:, 0] == 0)
  onehot = np.eye(C, dtype=np.float32)[y]
  gs = jax.grad(lambda z: jxent.softmax_cross_entropy(z, onehot).sum())(z)
  assert np.all(np.isfinite(gs)) and np.all(np.asarray(gs)[:, 0] == 0)
  assert np.all(np.isfinite(jxent.softmax_cross_entropy(z, onehot)))
  # Optax returns NaN here (0 * -inf); jxent does not.
  assert np.isnan(optax.softmax_cross_entropy(z, onehot)).any()
  # Mass on a masked class: +inf, as the math (and PyTorch) say.
  assert np.all(jxent.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=0.1)
                == np.inf)
  assert np.all(jxent.softmax_cross_entropy_with_integer_labels(z, np.zeros(N, int)) == np.inf)


def test_huge_logits_stay_finite():
  z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], np.float32)
  y = np.array([1, 2])
  loss = jxent.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=0.1, z_loss=1e-4)
  ref = torch_ce_ref(z, y, eps=0.1, z_loss=1e-4)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y).sum())(z)
  np.testing.assert_allclose(g, [[1, -1, 0], [0, 0, 0]], atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
  big = RNG.normal(size=(4, 3000)).astype(np.float32) * 4
  y = RNG.integers(0, 3000, size=4)
  z = jnp.asarray(big, dtype)
  loss = jax.jit(jxent.softmax_cross_entropy_with_integer_labels)(z, y)
  assert loss.dtype == jnp.float32
  ref = torch_ce_ref(np.asarray(z.astype(jnp.float32)), y)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y).sum())(z)
  assert g.dtype == dtype
  # Optax accumulates in the input dtype and is measurably further off.
  opt = np.asarray(optax.softmax_cross_entropy_with_integer_labels(z, y), np.float64)
  assert np.max(np.abs(loss - ref)) < np.max(np.abs(opt - ref))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_long_rows_split_on_cpu_match_reference(monkeypatch, dtype):
  """Rows longer than _CPU_FAST_ROW are reduced in k pieces (here 192 = 3 x 64), a 16-bit
  row through its raw bits; loss and gradient must not change."""
  from jxent import _cpu as C_
  monkeypatch.setattr(C_, "FAST_ROW", 64)
  assert C_.row_split(192) == 3 or jax.default_backend() != "cpu"
  rng = np.random.default_rng(7)
  z = jnp.asarray(rng.normal(size=(6, 192)) * 4, dtype)
  z64 = np.asarray(z.astype(jnp.float32), np.float64)
  y = rng.integers(0, 192, size=6).astype(np.int32)
  t = rng.dirichlet(np.ones(192), size=6).astype(np.float32)
  tol = dict(rtol=1e-5, atol=1e-6)
  f_int = jax.jit(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, y, label_smoothing=0.1).sum())
  np.testing.assert_allclose(f_int(z), torch_ce_ref(z64, y, eps=0.1).sum(), **tol)
  f_soft = jax.jit(lambda z: jxent.softmax_cross_entropy(z, t, reduction="sum"))
  np.testing.assert_allclose(f_soft(z), -(t * log_softmax64(z64)).sum(), **tol)
  keep = np.array([True, False, True, True, False, True])
  t16 = jnp.asarray(t, dtype)  # 16-bit labels take the pieces-before-conversion path
  per = jax.jit(lambda z: jxent.softmax_cross_entropy(z, t16, label_smoothing=0.1, where=keep))
  ts = 0.9 * np.asarray(t16.astype(jnp.float32), np.float64) + 0.1 / 192
  np.testing.assert_allclose(per(z), -(ts * log_softmax64(z64)).sum(-1) * keep, **tol)
  p = np.exp(log_softmax64(z64))
  gi = jax.jit(jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y).sum()))
  want = p - np.eye(192)[y]
  np.testing.assert_allclose(np.asarray(gi(z), np.float64), want,
                             atol=1e-6 if dtype == jnp.float32 else 4e-3)
  gs = jax.jit(jax.grad(f_soft))(z)
  np.testing.assert_allclose(np.asarray(gs, np.float64), p - t,
                             atol=1e-6 if dtype == jnp.float32 else 4e-3)


def _primitives_outside_cond(jaxpr):
  """(primitive, first operand's aval) of a jaxpr's equations and its sub-jaxprs', leaving
  out what runs inside a cond."""
  found = []
  for eqn in jaxpr.eqns:
    found.append((eqn.primitive.name, getattr(eqn.invars[0], "aval", None) if eqn.invars else None))
    if eqn.primitive.name == "cond":
      continue
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _primitives_outside_cond(sub)
  return found


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the one-pass logsumexp is CPU-only")
@pytest.mark.parametrize("split", [False, True], ids=["row", "pieces"])
def test_one_pass_logsumexp_reads_the_logits_once(monkeypatch, split):
  """On CPU the forward's logsumexp is log(sum(exp(z))) with no max pass; the max-shifted
  form exists only in the fallback branch."""
  from jxent import _cpu as C_
  if split:
    monkeypatch.setattr(C_, "FAST_ROW", 64)
  z = jnp.zeros((6, 192), jnp.float32)
  y = jnp.zeros((6,), jnp.int32)
  # The XLA:CPU forwards (the platform dispatcher puts them behind a switch of its own).
  fns = [lambda z: C_.int_ce(z, y, None, None, None, None, None)[0],
         lambda z: C_.soft_ce_total(z, z, None, None, None, None, None),
         lambda z: C_.soft_ce_loss(z, z, None, None, None, None, None),
         lambda z: C_.soft_ce(z, z, None, None, None, None, None)[0]]
  for f in fns:
    found = _primitives_outside_cond(jax.make_jaxpr(f)(z).jaxpr)
    names = [name for name, _ in found]
    assert "cond" in names and "exp" in names
    float_maxes = [aval for name, aval in found
                   if name in ("reduce_max", "max") and jnp.issubdtype(aval.dtype, jnp.floating)]
    assert not float_maxes


@pytest.mark.parametrize("split", [False, True], ids=["row", "pieces"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_one_pass_logsumexp_edges_and_fallback(monkeypatch, dtype, split):
  """Rows at the edges of the one-pass range (logits near 80 and near -40) are computed in
  one pass and stay exact; a batch with a row beyond it (near 150: exp overflows; near -95 or
  -200: the sum underflows; -80s and -88s: a tiny sum missing its subnormal terms) is
  computed max-shifted. Per-example
  and summed losses (the summed soft-label kernel has its own one-pass form) and gradients
  against float64."""
  from jxent import _cpu as C_
  if split:
    monkeypatch.setattr(C_, "FAST_ROW", 64)
  rng = np.random.default_rng(11)
  base = rng.normal(size=(5, 192)) * 2
  tol = dict(rtol=2e-6, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-5, atol=1e-3)
  gtol = 1e-6 if dtype == jnp.float32 else 4e-3
  y = rng.integers(0, 192, size=5).astype(np.int32)
  t = rng.dirichlet(np.ones(192), size=5).astype(np.float32)
  f_int = jax.jit(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y))
  g_int = jax.jit(jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y).sum()))
  f_soft = jax.jit(lambda z: jxent.softmax_cross_entropy(z, t))
  f_soft_sum = jax.jit(lambda z: jxent.softmax_cross_entropy(z, t, reduction="sum"))
  g_soft = jax.jit(jax.grad(lambda z: jxent.softmax_cross_entropy(z, t).sum()))
  # A row of -80s and -88s: its sum is a normal float, but the e^-88 terms (3e-4 of it) are
  # subnormal, which XLA:CPU flushes to zero; only the range check sends it max-shifted.
  flushed = np.where(np.arange(192) % 2 == 0, -80.0, -88.0)
  for shifts, row in (([0.0, 78.0, -40.0, 5.0, -30.0], None),
                      ([0.0, 150.0, 1.0, 2.0, 3.0], None),
                      ([0.0, -95.0, -200.0, 2.0, 3.0], None),
                      ([0.0, 0.0, 1.0, 2.0, 3.0], flushed)):
    z = base + np.asarray(shifts)[:, None]
    if row is not None:
      z[1] = row
    z = jnp.asarray(z, dtype)
    z64 = np.asarray(z.astype(jnp.float32), np.float64)
    lp = log_softmax64(z64)
    np.testing.assert_allclose(f_int(z), -lp[np.arange(5), y], **tol)
    np.testing.assert_allclose(f_soft(z), -(t * lp).sum(-1), **tol)
    np.testing.assert_allclose(f_soft_sum(z), -(t * lp).sum(), **tol)
    p = np.exp(lp)
    np.testing.assert_allclose(np.asarray(g_int(z), np.float64), p - np.eye(192)[y], atol=gtol)
    np.testing.assert_allclose(np.asarray(g_soft(z), np.float64), p - t, atol=gtol)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU fusion structure")
@pytest.mark.parametrize("loss", ["int", "soft", "bce"])
def test_bfloat16_value_and_grad_makes_no_float32_copy_of_the_logits(loss):
  """The backward's float32 conversion must not be shared with the forward's (XLA would
  materialise a float32 [N, C] copy and the forward kernel would lose its fusion: 2.4x
  slower at [4096, 32768]); nor may a broadcast constant be shared."""
  n, c = 64, 1024
  z = jnp.zeros((n, c), jnp.bfloat16)
  fns = {
      "int": (lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean"),
              jnp.zeros((n,), jnp.int32)),
      "soft": (lambda z, y: jxent.softmax_cross_entropy(z, y, reduction="mean"),
               jnp.zeros((n, c), jnp.bfloat16)),
      "bce": (lambda z, y: jxent.sigmoid_binary_cross_entropy(z, y, reduction="mean"),
              jnp.zeros((n, c), jnp.bfloat16)),
  }
  f, y = fns[loss]
  hlo = jax.jit(jax.value_and_grad(f)).lower(z, y).compile().as_text()
  entry = hlo[hlo.index("ENTRY"):]
  copies = [ln for ln in entry.splitlines() if f"= f32[{n},{c}]" in ln]
  assert not copies, copies


def test_vmap_and_jit_compose():
  f = lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=0.1)
  np.testing.assert_allclose(jax.vmap(f)(Z[:, None], Y[:, None])[:, 0], f(Z, Y), rtol=1e-6)
  gv = jax.vmap(jax.grad(lambda z, y: f(z[None], y[None])[0]))(Z, Y)
  np.testing.assert_allclose(gv, jax.grad(lambda z: f(z, Y).sum())(Z), atol=1e-6)
  # Soft labels under vmap, one instance taking the fast path and two the fallback (an
  # overflowing row, an underflowing row): the conds become selects, values must not change.
  zb = np.stack([Z, Z, Z]).copy()
  zb[1, 3] += 150.0
  zb[2, 5] -= 200.0
  want = -(Y_SOFT * log_softmax64(zb)).sum(-1)
  per = jax.jit(jax.vmap(lambda z: jxent.softmax_cross_entropy(z, Y_SOFT)))(zb)
  np.testing.assert_allclose(per, want, rtol=1e-5)
  tot = jax.jit(jax.vmap(lambda z: jxent.softmax_cross_entropy(z, Y_SOFT, reduction="sum")))(zb)
  np.testing.assert_allclose(tot, want.sum(-1), rtol=1e-5)
  b = jax.vmap(lambda z: jxent.sigmoid_binary_cross_entropy(z, Y_BIN[0]))(Z)
  np.testing.assert_allclose(b, bce_ref(Z, np.broadcast_to(Y_BIN[0], Z.shape)), rtol=1e-5)


# ---------------------------------------------------------------------- sigmoid losses


@pytest.mark.parametrize("pos_weight", [None, 3.0, W], ids=["none", "scalar", "vector"])
def test_sigmoid_bce_matches_reference(pos_weight):
  got = jax.jit(lambda z, y: jxent.sigmoid_binary_cross_entropy(z, y, pos_weight=pos_weight))(
      Z, Y_BIN)
  np.testing.assert_allclose(got, bce_ref(Z, Y_BIN, pos_weight), rtol=1e-5, atol=1e-6)
  if pos_weight is None:
    np.testing.assert_allclose(got, optax.sigmoid_binary_cross_entropy(Z, Y_BIN), rtol=1e-5,
                               atol=1e-6)
  g = jax.grad(lambda z: jxent.sigmoid_binary_cross_entropy(
      z, Y_BIN, pos_weight=pos_weight).sum())(Z)
  pw = 1.0 if pos_weight is None else pos_weight
  s = jax.nn.sigmoid(Z)
  np.testing.assert_allclose(g, s * (pw * Y_BIN + 1 - Y_BIN) - pw * Y_BIN, atol=1e-6)
  if pos_weight is None:
    assert np.max(np.abs(g - (s - Y_BIN))) < 1e-6


def test_sigmoid_bce_reductions_and_where():
  mask = RNG.uniform(size=(N, C)) < 0.5
  ref = bce_ref(Z, Y_BIN)
  np.testing.assert_allclose(
      jxent.sigmoid_binary_cross_entropy(Z, Y_BIN, where=mask, reduction="mean"),
      ref[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(
      jxent.sigmoid_binary_cross_entropy(Z, Y_BIN, reduction="sum"), ref.sum(), rtol=1e-5)


def test_sigmoid_bce_extremes():
  z = jnp.array([-jnp.inf, jnp.inf, 1e4, -1e4, -jnp.inf, 1e4])
  y = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
  loss = jxent.sigmoid_binary_cross_entropy(z, y)
  np.testing.assert_allclose(loss, [0, 0, 0, 0, np.inf, 1e4])
  g = jax.grad(lambda z: jxent.sigmoid_binary_cross_entropy(z[:4], y[:4]).sum())(z)
  np.testing.assert_allclose(g[:4], 0.0)
  # The reduced kernels take a select-free fast path and fall back to the exact limits.
  for red in ("sum", "mean"):
    assert jxent.sigmoid_binary_cross_entropy(z[:4], y[:4], reduction=red) == 0
    assert jxent.sigmoid_binary_cross_entropy(z, y, reduction=red) == np.inf
  g = jax.grad(lambda z: jxent.sigmoid_binary_cross_entropy(z[:4], y[:4], reduction="mean"))(z)
  np.testing.assert_allclose(g[:4], 0.0)
  masked = jxent.sigmoid_binary_cross_entropy(
      z, y, where=np.array([True] * 4 + [False] * 2), reduction="mean")
  assert masked == 0


def test_sigmoid_focal_matches_optax():
  for alpha, gamma in [(None, 2.0), (0.25, 2.0), (0.5, 0.5), (None, 0.0)]:
    got = jxent.sigmoid_focal_loss(Z, Y_BIN, alpha=alpha, gamma=gamma)
    ref = optax.sigmoid_focal_loss(Z, Y_BIN, alpha=alpha, gamma=gamma)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  g = jax.grad(lambda z: jxent.sigmoid_focal_loss(z, Y_BIN).sum())(Z)
  g_ref = jax.grad(lambda z: optax.sigmoid_focal_loss(z, Y_BIN).sum())(Z)
  np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------- on probabilities


def test_probability_losses_seed_numbers():
  single = jxent.categorical_cross_entropy(jnp.array([0.3, 0.6, 0.1]), jnp.array([0., 1., 0.]))
  np.testing.assert_allclose(single, -np.log(0.6), rtol=1e-6)
  multi = jxent.binary_cross_entropy(jnp.array([0.1, 0.7, 0.8]), jnp.array([0., 1., 1.]),
                                     reduction="sum")
  np.testing.assert_allclose(multi, -np.log(0.9) - np.log(0.7) - np.log(0.8), rtol=1e-6)
  np.testing.assert_allclose(multi, 0.6852, atol=1e-4)


def test_probability_losses_match_logit_losses():
  p = jax.nn.softmax(Z)
  np.testing.assert_allclose(jxent.categorical_cross_entropy(p, Y_SOFT, reduction="mean"),
                             torch_soft_ce_ref(Z, Y_SOFT, reduction="mean"), rtol=1e-5)
  s = jax.nn.sigmoid(Z / 3)
  np.testing.assert_allclose(jxent.binary_cross_entropy(s, Y_BIN), bce_ref(Z / 3, Y_BIN),
                             rtol=1e-4, atol=1e-6)
  assert jxent.binary_cross_entropy(jnp.array([0.0]), jnp.array([1.0]))[0] == np.inf
  assert jxent.binary_cross_entropy(jnp.array([0.0]), jnp.array([0.0]))[0] == 0


def test_mean_squared_error():
  # Inputs exactly representable in float32, so that a - b has no cancellation error in the
  # float64 reference either (an unlucky draw with a ~ b failed rtol otherwise).
  rng = np.random.default_rng(42)
  a, b = (rng.normal(size=(2, 5, 3)).astype(np.float32).astype(np.float64))
  np.testing.assert_allclose(jxent.mean_squared_error(a, b), ((a - b) ** 2).mean(), rtol=1e-6)
  np.testing.assert_allclose(jxent.mean_squared_error(a, b, reduction="none"), (a - b) ** 2,
                             rtol=1e-6)
  g = jax.grad(lambda a: 0.5 * jxent.mean_squared_error(a, b, reduction="sum"))(a)
  np.testing.assert_allclose(g, a - b, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(optax.squared_error)(a, b).mean(),
                             jxent.mean_squared_error(a, b), rtol=1e-6)


# ------------------------------------------------------------------------- bad input


def test_bad_input_errors():
  f = jxent.softmax_cross_entropy_with_integer_labels
  with pytest.raises(ValueError, match=r"labels.shape=\(5,\) for logits.shape=\(12, 7\)"):
    f(Z, Y[:5])
  with pytest.raises(ValueError, match="labels.shape"):
    jax.jit(f)(Z, Y[:5])
  with pytest.raises(TypeError, match="labels must be an integer array"):
    f(Z, Y.astype(np.float32))
  with pytest.raises(TypeError, match="logits must be floating point, got dtype int32"):
    f(Y[:, None].astype(np.int32), Y)
  with pytest.raises(ValueError, match="reduction must be one of"):
    f(Z, Y, reduction="average")
  with pytest.raises(ValueError, match="label_smoothing must lie in"):
    f(Z, Y, label_smoothing=1.5)
  with pytest.raises(ValueError, match=r"class_weights must have shape \(7,\).*\(6,\)"):
    f(Z, Y, class_weights=W[:6])
  with pytest.raises(ValueError, match="labels must have the same shape as logits"):
    jxent.softmax_cross_entropy(Z, Y_SOFT[:, :3])
  with pytest.raises(TypeError, match="softmax_cross_entropy_with_integer_labels"):
    jxent.softmax_cross_entropy(Z, Y)
  with pytest.raises(ValueError, match=r"pos_weight must be a scalar or have shape \(7,\)"):
    jxent.sigmoid_binary_cross_entropy(Z, Y_BIN, pos_weight=W[:3])
  with pytest.raises(ValueError, match="where"):
    f(Z, Y, where=np.ones((3,), bool))


def test_checkify_reports_out_of_range_labels():
  f = jxent.checked(
      lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, ignore_index=-100))
  err, _ = jax.jit(f)(Z, np.where(np.arange(N) == 0, C, Y))
  with pytest.raises(checkify.JaxRuntimeError, match="out of range"):
    err.throw()
  err, _ = jax.jit(f)(Z, np.where(np.arange(N) == 0, -100, Y))
  err.throw()  # ignored labels may be out of range


def test_soft_reduced_kernel_and_fallbacks_against_float64():
  """The no-gradient kernels (per-example and reduced), the class-mask path and the exact
  fallback for 0 * -inf, each against float64 NumPy."""
  eps, zl = 0.1, 1e-3
  kw = dict(label_smoothing=eps, z_loss=zl, class_weights=W)
  lse = logsumexp(np.asarray(Z, np.float64), axis=-1)
  want = torch_soft_ce_ref(Z, Y_SOFT, weight=W, eps=eps) + zl * lse**2
  mean = jax.jit(lambda z: jxent.softmax_cross_entropy(z, Y_SOFT, reduction="mean", **kw))
  per = jax.jit(lambda z: jxent.softmax_cross_entropy(z, Y_SOFT, **kw))
  np.testing.assert_allclose(per(Z), want, rtol=1e-6)
  np.testing.assert_allclose(mean(Z), want.mean(), rtol=1e-6)
  t = W * ((1 - eps) * np.asarray(Y_SOFT, np.float64) + eps / C)
  p = np.exp(log_softmax64(Z))
  grad = ((t.sum(-1) + 2 * zl * lse)[:, None] * p - t) / N
  np.testing.assert_allclose(jax.grad(mean)(Z), grad, atol=1e-7)
  # A class mask (where with the logits' shape): masked classes leave the softmax; labels
  # without mass there give the finite loss, mass on a masked class gives +inf.
  cmask = np.random.default_rng(5).uniform(size=(N, C)) < 0.7
  cmask[:, 0] = True
  lpm = log_softmax64(np.where(cmask, Z, -np.inf))
  y_m = np.where(cmask, Y_SOFT, 0).astype(np.float32)
  want_m = -np.where(cmask, y_m * np.where(cmask, lpm, 0), 0).sum(-1)
  assert np.all(jxent.softmax_cross_entropy(Z, Y_SOFT, where=cmask)[(~cmask).any(-1)] == np.inf)
  tol = dict(rtol=1e-5, atol=1e-6)  # float32 lse - z_y: the small losses lose digits
  np.testing.assert_allclose(jxent.softmax_cross_entropy(Z, y_m, where=cmask), want_m, **tol)
  np.testing.assert_allclose(
      jxent.softmax_cross_entropy(Z, y_m, where=cmask, reduction="sum"), want_m.sum(), **tol)
  # 0 * -inf in the fast form: the exact fallback gives the finite value ...
  z = Z.copy()
  z[:, 0] = -np.inf
  onehot = np.eye(C, dtype=np.float32)[np.where(Y == 0, 1, Y)]
  lp = log_softmax64(z)
  want_inf = -(onehot * np.where(onehot > 0, lp, 0)).sum(-1)
  np.testing.assert_allclose(jxent.softmax_cross_entropy(z, onehot), want_inf, **tol)
  np.testing.assert_allclose(jxent.softmax_cross_entropy(z, onehot, reduction="sum"),
                             want_inf.sum(), **tol)
  # ... and +inf where the target has mass on the masked class.
  assert np.all(jxent.softmax_cross_entropy(z, Y_SOFT) == np.inf)
  assert jxent.softmax_cross_entropy(z, Y_SOFT, reduction="mean") == np.inf


def test_bfloat16_gradient_values_against_float64():
  # bf16 inputs accumulate in float32 and return bf16 gradients: each entry within one bf16
  # rounding (2^-8 relative) of the float64 gradient of the same (bf16-rounded) inputs.
  zb = jnp.asarray(Z, jnp.bfloat16)
  z64 = np.asarray(zb, np.float64)
  cot = np.linspace(0.5, 1.5, N)
  p = np.exp(z64 - logsumexp(z64, axis=1, keepdims=True))
  tb = jnp.asarray(Y_SOFT, jnp.bfloat16)
  t64 = np.asarray(tb, np.float64)
  cases = [
      (lambda z: jnp.sum(cot * jxent.softmax_cross_entropy_with_integer_labels(
          z, Y, class_weights=W, label_smoothing=0.1)),
       cot[:, None] * (W[Y][:, None] * 0.9 * (p - np.eye(C)[Y])
                       + 0.1 / C * (W.sum() * p - W))),
      (lambda z: jnp.sum(cot * jxent.softmax_cross_entropy(z, tb)),
       cot[:, None] * (p * t64.sum(1, keepdims=True) - t64)),
      (lambda z: jnp.sum(cot[:, None] * jxent.sigmoid_binary_cross_entropy(
          z, jnp.asarray(Y_BIN, jnp.bfloat16))),
       cot[:, None] * (1 / (1 + np.exp(-z64)) - Y_BIN)),
  ]
  for f, want in cases:
    g = jax.grad(f)(zb)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=2**-7, atol=1e-3 * 2**-7)


@pytest.mark.parametrize("impl", ["cpu", "reference", "accelerator"])
def test_confident_correct_labels_keep_relative_accuracy(impl, monkeypatch):
  # A true loss of 1e-8 .. 1e-12 (the label's logit 12 .. 30 above the others): lse - z_y
  # rounds it to 0 in float32 (Optax returns 0). Against log1p(sum_{c != y} e^(z_c - z_y))
  # in float64, to rtol 1e-6, beside ordinary rows, with class weights and a dropped row.
  # The gradient stays p - onehot(y), to float32's absolute resolution: its label entry
  # p_y - 1 rounds at the scale of 1.
  from jxent._platform import use_implementation
  z = np.array([[20.0, 0.0, -1.0, 2.0], [30.0, 1.0, 2.0, 3.0], [12.0, 0.0, 0.0, 0.0],
                [1e4 + 14.0, 1e4, 1e4 - 3.0, 1e4 + 1.0], [0.3, 0.1, -0.2, 0.0],
                [2.0, 3.0, 30.0, 0.0]], np.float32)
  y = np.array([0, 0, 0, 0, 1, 1])
  w = np.array([1.5, 0.5, 1.0, 2.0], np.float32)
  keep = np.array([True, True, True, True, True, False])
  zd = z.astype(np.float64)
  gap = zd - zd[np.arange(6), y][:, None]
  gap[np.arange(6), y] = -np.inf
  want = np.log1p(np.sum(np.exp(gap), axis=1)) * w[y] * keep
  cot = np.linspace(0.5, 1.5, 6)
  # The same with one-hot soft labels: per example (the per-example form, and the forward of
  # the loss with its logsumexp parts under grad) and summed.
  onehot = np.eye(4, dtype=np.float32)[y]
  from jxent import _fused
  monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: min(2, v))
  p = np.exp(zd - logsumexp(zd, axis=1, keepdims=True))
  g_want = (cot * w[y] * keep)[:, None] * (p - np.eye(4)[y])
  with use_implementation(impl):  # XLA:CPU's form, then the reference (GPU, TPU)
    for i, loss in enumerate((
        lambda z, **kw: jxent.softmax_cross_entropy_with_integer_labels(
            z, y, class_weights=w, where=keep, **kw),
        lambda z, **kw: jxent.softmax_cross_entropy(
            z, onehot, class_weights=w, where=keep, **kw),
        # The fused loss with the identity as its head: its logits are z. Token chunks
        # (XLA:CPU, the reference) or vocabulary blocks of 2 classes (GPU, TPU).
        lambda z, reduction="none": jxent.linear_cross_entropy(
            z, jnp.eye(4), y, class_weights=w, where=keep, reduction=reduction,
            chunk_size=4))):
      fused = i == 2
      f = jax.jit(loss)
      got = np.asarray(f(z), np.float64)
      val, g = jax.value_and_grad(lambda z: jnp.sum(jnp.asarray(cot) * f(z)))(z)
      total = jax.jit(lambda z: loss(z, reduction="sum"))(z)
      np.testing.assert_allclose(got, want, rtol=1e-6)
      np.testing.assert_allclose(val, np.sum(cot * want), rtol=1e-6)
      np.testing.assert_allclose(total, want.sum(), rtol=1e-6)
      # The fused loss forms its gradient from the logsumexp as one number, which rounds at
      # the resolution of its magnitude: the row offset by 1e4 to about 2^-10 of p.
      off = np.arange(6) == 3
      np.testing.assert_allclose(g[~off], g_want[~off], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(g[off], g_want[off], atol=2**-10 if fused else 1e-6)


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_saturated_sigmoid_losses_keep_relative_accuracy(impl):
  # BCE and focal where the label agrees with a saturated logit: true losses down to 1e-26
  # (float32 normal range), to rtol 1e-6 against float64 formulas; Optax's BCE does the same.
  from jxent._platform import use_implementation
  z = np.array([9.0, 12.0, 16.0, 20.0, 40.0, -9.0, -16.0, -30.0, 0.5], np.float32)
  y = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0], np.float32)
  margin = np.where(y == 1, z, -z).astype(np.float64)
  bce = np.logaddexp(0, -margin)
  focal = np.where(y == 1, 0.25, 0.75) * (1 / (1 + np.exp(margin))) ** 2 * bce
  with use_implementation(impl):
    got_bce = jax.jit(jxent.sigmoid_binary_cross_entropy)(z, y)
    got_focal = jax.jit(lambda z, y: jxent.sigmoid_focal_loss(z, y, alpha=0.25, gamma=2.0))(z, y)
    total = jax.jit(lambda z, y: jxent.sigmoid_binary_cross_entropy(z, y, reduction="sum"))(z, y)
  np.testing.assert_allclose(got_bce, bce, rtol=1e-6)
  np.testing.assert_allclose(total, bce.sum(), rtol=1e-6)
  ok = focal > np.finfo(np.float32).tiny  # 40 gives 1e-52: below float32's range
  np.testing.assert_allclose(np.asarray(got_focal)[ok], focal[ok], rtol=1e-6)


def test_dense_losses_hold_no_extra_logits_sized_buffer():
  # XLA's scratch for the mean loss and its value_and_grad, [256, 8192] float32 (large
  # enough for XLA:CPU's library fusions): the integer loss none, the soft loss at most one
  # [N, C] buffer (Optax's soft loss: two under value_and_grad). Two reductions sharing a
  # broadcast row statistic made XLA:CPU materialise it as a second one.
  n, c = 256, 8192
  z = jax.ShapeDtypeStruct((n, c), jnp.float32)
  yi = jax.ShapeDtypeStruct((n,), jnp.int32)
  ys = jax.ShapeDtypeStruct((n, c), jnp.float32)
  one, small = n * c * 4, 64 * 1024

  def temp(f, y):
    return tuple(jax.jit(g).lower(z, y).compile().memory_analysis().temp_size_in_bytes
                 for g in (f, jax.value_and_grad(f)))

  assert max(temp(lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y).mean(),
                  yi)) <= small
  assert max(temp(lambda z, y: jxent.softmax_cross_entropy(z, y).mean(), ys)) <= one + small


def _np_poly(z, y, eps, cmask=None):
  """Poly-1 in float64: -sum y log p + eps (1 - sum y p), p the (class-masked) softmax."""
  z = np.asarray(z, np.float64)
  if cmask is not None:
    z = np.where(cmask, z, -np.inf)
  lp = z - logsumexp(z, axis=-1, keepdims=True)
  y = np.asarray(y, np.float64)
  ce = -np.sum(y * np.where(y > 0, lp, 0), -1)
  return ce + eps * (1 - np.sum(y * np.exp(lp), -1))


def test_poly_loss_against_float64_and_optax():
  f = jax.jit(lambda z, y, e: jxent.poly_loss_cross_entropy(z, y, epsilon=e))
  for eps in (2.0, -1.0, 0.0):
    np.testing.assert_allclose(f(Z, Y_SOFT, eps), _np_poly(Z, Y_SOFT, eps), rtol=2e-6)
    np.testing.assert_allclose(f(Z, Y_SOFT, eps), optax.losses.poly_loss_cross_entropy(
        Z, Y_SOFT, epsilon=eps), rtol=2e-6)
  np.testing.assert_allclose(f(Z, Y_SOFT, 0.0), jxent.softmax_cross_entropy(Z, Y_SOFT),
                             rtol=1e-7)
  # Class axis first, reductions, a per-example and a class mask.
  keep = np.arange(N) % 3 != 0
  cmask = RNG.uniform(size=(N, C)) < 0.8
  cmask[:, 0] = True
  y_in = np.where(cmask, Y_SOFT, 0)
  y_in = y_in / y_in.sum(-1, keepdims=True)
  np.testing.assert_allclose(jxent.poly_loss_cross_entropy(Z.T, Y_SOFT.T, axis=0),
                             _np_poly(Z, Y_SOFT, 2.0), rtol=2e-6)
  mean = jxent.poly_loss_cross_entropy(Z, Y_SOFT, where=keep, reduction="mean")
  np.testing.assert_allclose(mean, _np_poly(Z, Y_SOFT, 2.0)[keep].mean(), rtol=2e-6)
  total = jxent.poly_loss_cross_entropy(Z, y_in, where=cmask, reduction="sum")
  np.testing.assert_allclose(total, _np_poly(Z, y_in, 2.0, cmask).sum(), rtol=2e-6)
  # -inf logits where the label is 0: finite, with a finite gradient (Optax: NaN); label mass
  # on such a class: +inf. A confident prediction's loss of 1e-12 keeps its relative accuracy.
  z = jnp.array([[0.0, -jnp.inf, 1.0], [40.0, 0.0, 1.0], [0.0, -jnp.inf, 1.0]])
  y = jnp.array([[0.5, 0.0, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
  got = jxent.poly_loss_cross_entropy(z, y)
  tiny = np.log1p(np.exp(-40.0) + np.exp(-39.0))
  np.testing.assert_allclose(got[:2], [_np_poly(z[:1], y[:1], 2.0)[0], 3 * tiny], rtol=1e-6)
  assert got[2] == np.inf
  assert np.isnan(optax.losses.poly_loss_cross_entropy(z[:1], y[:1])[0])
  assert np.all(np.isfinite(jax.grad(lambda z: jnp.sum(
      jxent.poly_loss_cross_entropy(z, y[:2])))(z[:2])))
  # A dropped example's NaN, and a row without a kept class, reach no gradient.
  zn = np.array(Z[:3])
  zn[1, 0] = np.nan
  g = jax.grad(lambda z: jxent.poly_loss_cross_entropy(
      z, Y_SOFT[:3], where=np.array([True, False, True]), reduction="sum"))(zn)
  assert np.all(g[1] == 0) and np.all(np.isfinite(g))
  none_kept = np.ones((3, C), bool)
  none_kept[1] = False
  g = jax.grad(lambda z: jxent.poly_loss_cross_entropy(z, Y_SOFT[:3], where=none_kept,
                                                       reduction="sum"))(Z[:3])
  assert np.all(g[1] == 0) and np.all(np.isfinite(g))
  # bfloat16 logits accumulate in float32.
  out = jxent.poly_loss_cross_entropy(Z.astype(jnp.bfloat16), Y_SOFT)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _np_poly(Z.astype(jnp.bfloat16).astype(np.float32), Y_SOFT,
                                           2.0), rtol=1e-5)
  with pytest.raises(ValueError, match="epsilon must be a scalar"):
    jxent.poly_loss_cross_entropy(Z, Y_SOFT, epsilon=jnp.ones(N))
  with pytest.raises(TypeError, match="labels must be floating-point"):
    jxent.poly_loss_cross_entropy(Z, Y)


def test_poly_loss_gradients_in_every_argument():
  # Logits, labels and epsilon under a non-uniform cotangent, against the float64 formula
  # differentiated by JAX: d/dz = (sum y) p - y - eps p (y - p_t) for labels that sum to one.
  with jax.enable_x64(True):
    z = jnp.asarray(Z, jnp.float64)
    y = Y_SOFT.astype(np.float64)
    y = jnp.asarray(y / y.sum(-1, keepdims=True))  # summing to one in float64 too
    cot = jnp.asarray(np.linspace(0.5, 1.5, N))
    f = lambda z, y, e: jnp.sum(cot * jxent.poly_loss_cross_entropy(z, y, epsilon=e))

    def ref(z, y, e):
      lp = jax.nn.log_softmax(z)
      return jnp.sum(cot * (-jnp.sum(y * lp, -1) + e * (1 - jnp.sum(y * jnp.exp(lp), -1))))

    args = (z, y, 1.3)
    for a, b in zip(jax.grad(f, argnums=(0, 1, 2))(*args),
                    jax.grad(ref, argnums=(0, 1, 2))(*args)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    p = jax.nn.softmax(z)
    pt = jnp.sum(y * p, -1, keepdims=True)
    np.testing.assert_allclose(jax.grad(f)(*args),
                               cot[:, None] * (p - y - 1.3 * p * (y - pt)), rtol=1e-10,
                               atol=1e-13)
    check_grads(lambda z, e: f(z, y, e), (z, 1.3), order=2, modes=["fwd", "rev"])
