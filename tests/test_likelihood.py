"""gaussian_nll_loss and poisson_nll_loss against float64 SciPy and NumPy formulas: values,
slopes in every argument, PyTorch's clamps and Stirling term, the boundaries, the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sp
import scipy.stats as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jxent

RNG = np.random.default_rng(7)
MU = RNG.normal(size=(4, 6))
Y = MU + RNG.normal(size=(4, 6)) * 1.5
VAR = RNG.uniform(0.2, 3.0, size=(4, 1))  # one variance per row, broadcast over 6
COT = RNG.uniform(0.5, 1.5, size=(4, 6))
KEEP = RNG.uniform(size=(4, 6)) > 0.25


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def test_gaussian_is_scipy_log_density_in_every_reduction():
  want = -st.norm.logpdf(Y, MU, np.sqrt(VAR))
  f = jax.jit(jxent.gaussian_nll_loss, static_argnames=("full", "reduction"))
  np.testing.assert_allclose(f(MU, Y, VAR, full=True, reduction="none"), want, rtol=1e-13)
  np.testing.assert_allclose(f(MU, Y, VAR, reduction="none"),
                             want - 0.5 * np.log(2 * np.pi), rtol=1e-13)
  np.testing.assert_allclose(f(MU, Y, VAR, full=True, reduction="sum"), want.sum(), rtol=1e-13)
  got = jxent.gaussian_nll_loss(MU, Y, VAR, full=True, where=KEEP)
  np.testing.assert_allclose(got, want[KEEP].mean(), rtol=1e-13)
  # At unit variance: half the squared error (MSE is this likelihood's loss).
  np.testing.assert_allclose(jxent.gaussian_nll_loss(MU, Y, np.ones(1)),
                             0.5 * jxent.mean_squared_error(MU, Y), rtol=1e-13)


def test_gaussian_slopes_in_every_argument_with_a_cotangent():
  def f(mu, y, var):
    return jnp.sum(COT * jxent.gaussian_nll_loss(mu, y, var, reduction="none", where=KEEP))

  g = jax.jit(jax.grad(f, (0, 1, 2)))(MU, Y, VAR)
  r = Y - MU
  c = COT * KEEP
  np.testing.assert_allclose(g[0], -c * r / VAR, rtol=1e-12)
  np.testing.assert_allclose(g[1], c * r / VAR, rtol=1e-12)
  np.testing.assert_allclose(g[2], np.sum(c * 0.5 * (1 / VAR - r**2 / VAR**2), 1,
                                          keepdims=True), rtol=1e-12)
  check_grads(f, (MU, Y, VAR), order=2, modes=["fwd", "rev"])


def test_gaussian_beta_nll_and_pytorch_clamp():
  # beta: the loss times sg(var)^beta; the mean's slope (mu - y) / var^(1 - beta).
  beta = 0.5
  f = lambda mu, var: jnp.sum(COT * jxent.gaussian_nll_loss(mu, Y, var, beta=beta,
                                                            reduction="none"))
  plain = jxent.gaussian_nll_loss(MU, Y, VAR, reduction="none")
  np.testing.assert_allclose(f(MU, VAR), np.sum(COT * plain * VAR**beta), rtol=1e-13)
  gm, gv = jax.grad(f, (0, 1))(MU, VAR)
  np.testing.assert_allclose(gm, COT * (MU - Y) / VAR ** (1 - beta), rtol=1e-12)
  np.testing.assert_allclose(gv, np.sum(COT * 0.5 * (1 / VAR - (Y - MU) ** 2 / VAR**2)
                                        * VAR**beta, 1, keepdims=True), rtol=1e-12)
  # eps: PyTorch's value at max(var, eps), its slope in var as if unclamped.
  var = np.array([[1e-9], [0.5], [2e-7], [3.0]])
  eps = 1e-6
  vc = np.maximum(var, eps)
  h = lambda var: jnp.sum(COT * jxent.gaussian_nll_loss(MU, Y, var, eps=eps, reduction="none"))
  np.testing.assert_allclose(h(var), np.sum(COT * 0.5 * (np.log(vc) + (Y - MU) ** 2 / vc)),
                             rtol=1e-13)
  np.testing.assert_allclose(jax.grad(h)(var), np.sum(
      COT * 0.5 * (1 / vc - (Y - MU) ** 2 / vc**2), 1, keepdims=True), rtol=1e-12)


def test_gaussian_boundaries_and_errors():
  mu, y = jnp.array([0.0, 1.0, 0.0, 0.0]), jnp.array([1.0, 1.0, 0.0, jnp.nan])
  var = jnp.array([0.0, 0.0, -1.0, 1.0])
  out = jxent.gaussian_nll_loss(mu, y, var, reduction="none")
  np.testing.assert_array_equal(out[:2], [np.inf, -np.inf])  # degenerate density
  assert np.isnan(out[2]) and np.isnan(out[3])  # negative variance; NaN target
  assert np.isnan(jxent.gaussian_nll_loss(mu, y, var, eps=1e-6, reduction="none")[2])
  g = jax.grad(lambda m: jnp.sum(jxent.gaussian_nll_loss(m, y, var, reduction="none")))(mu)
  assert np.all(np.isnan(g[:2]))  # an infinite loss has no slope
  # a dropped entry: 0 and no gradient, whatever it holds
  keep = jnp.array([False, True, True, True])
  gv = jax.grad(lambda v: jxent.gaussian_nll_loss(mu[:2], y[:2], v, where=keep[:2],
                                                  reduction="sum"))(jnp.array([0.0, 2.0]))
  np.testing.assert_allclose(gv, [0.0, 0.25], rtol=1e-15)
  # 16-bit inputs computed in float32
  lo = jxent.gaussian_nll_loss(MU.astype(jnp.bfloat16), Y.astype(jnp.bfloat16),
                               VAR.astype(jnp.bfloat16))
  assert lo.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"variances.shape=\(4,\) does not broadcast to "
                                       r"predictions' shape \(4, 6\).*variances\[\.\.\., None\]"):
    jxent.gaussian_nll_loss(MU, Y, VAR[:, 0])
  with pytest.raises(ValueError, match="predictions and targets"):
    jxent.gaussian_nll_loss(MU, Y[:, :3], VAR)
  with pytest.raises(ValueError, match="eps must be >= 0"):
    jxent.gaussian_nll_loss(MU, Y, VAR, eps=-1.0)
  with pytest.raises(ValueError, match="reduction"):
    jxent.gaussian_nll_loss(MU, Y, VAR, reduction="batchmean")
  err, _ = jxent.checked(lambda v: jxent.gaussian_nll_loss(MU, Y, v))(-VAR)
  with pytest.raises(checkify.JaxRuntimeError, match="variances has negative entries"):
    err.throw()


K = RNG.poisson(3.0, size=(4, 6)).astype(np.float64)
LOG_RATE = RNG.normal(size=(4, 6)) + 1.0


def test_poisson_is_scipy_log_pmf_and_pytorch_formulas():
  want = -st.poisson.logpmf(K, np.exp(LOG_RATE))
  f = jax.jit(jxent.poisson_nll_loss, static_argnames=("full", "reduction", "log_input"))
  np.testing.assert_allclose(f(LOG_RATE, K, full=True, reduction="none"), want, rtol=1e-12)
  # PyTorch's default: exp(x) - k x, the mean over entries.
  np.testing.assert_allclose(f(LOG_RATE, K), np.mean(np.exp(LOG_RATE) - K * LOG_RATE),
                             rtol=1e-13)
  # From rates, with PyTorch's eps inside the log.
  rate = np.exp(LOG_RATE)
  np.testing.assert_allclose(
      jxent.poisson_nll_loss(rate, K, log_input=False, eps=1e-8, reduction="none"),
      rate - K * np.log(rate + 1e-8), rtol=1e-12)
  np.testing.assert_allclose(
      jxent.poisson_nll_loss(rate, K, log_input=False, full=True, where=KEEP),
      np.mean(want[KEEP]), rtol=1e-12)
  # PyTorch's full=True adds Stirling's approximation for k > 1; jxent the exact log k!.
  stirling = np.where(K > 1, K * np.log(np.maximum(K, 1)) - K
                      + 0.5 * np.log(2 * np.pi * np.maximum(K, 1)), 0)
  term = (f(LOG_RATE, K, full=True, reduction="none")
          - f(LOG_RATE, K, full=False, reduction="none"))  # jxent's full term
  np.testing.assert_allclose(term, sp.gammaln(K + 1), rtol=1e-12, atol=1e-12)
  gap = np.asarray(term) - stirling  # PyTorch's falls short by under 1/(12k), 0 for k <= 1
  assert np.all((gap >= 0) & (gap <= 1 / (12 * np.maximum(K, 1)) + 1e-12))
  assert np.any(gap > 1e-3)


def test_poisson_slopes_in_every_argument_with_a_cotangent():
  def f(x, k):
    return jnp.sum(COT * jxent.poisson_nll_loss(x, k, full=True, where=KEEP, reduction="none"))

  gx, gk = jax.jit(jax.grad(f, (0, 1)))(LOG_RATE, K)
  c = COT * KEEP
  np.testing.assert_allclose(gx, c * (np.exp(LOG_RATE) - K), rtol=1e-12)
  np.testing.assert_allclose(gk, c * (-LOG_RATE + sp.digamma(K + 1)), rtol=1e-12)
  check_grads(f, (LOG_RATE, K + 0.5), order=2, modes=["fwd", "rev"])
  rate = np.exp(LOG_RATE)
  g = jax.grad(lambda r: jnp.sum(COT * jxent.poisson_nll_loss(r, K, log_input=False,
                                                              reduction="none")))(rate)
  np.testing.assert_allclose(g, COT * (1 - K / rate), rtol=1e-12)


def test_poisson_boundaries_and_errors():
  x = jnp.array([-jnp.inf, -jnp.inf, 800.0, 0.0, 0.0])
  k = jnp.array([0.0, 2.0, 1.0, -1.0, jnp.nan])
  out = jxent.poisson_nll_loss(x, k, full=True, reduction="none")
  # a zero count at rate 0 costs nothing; a positive one +inf; an overflowing rate +inf
  np.testing.assert_array_equal(out[:3], [0.0, np.inf, np.inf])
  assert np.isnan(out[3]) and np.isnan(out[4])
  gx = jax.grad(lambda x: jxent.poisson_nll_loss(x, k[:1], reduction="sum"))(x[:1])
  np.testing.assert_array_equal(gx, [0.0])  # exp(-inf) - 0
  # jvp in the log-rate alone at (k = 0, x = -inf): 0, not 0 * -inf
  _, t = jax.jvp(lambda x: jxent.poisson_nll_loss(x, k[:1], reduction="sum"), (x[:1],),
                 (jnp.ones(1),))
  assert float(t) == 0.0
  rate = jnp.array([0.0, 0.0, 2.0, -1.0])
  out = jxent.poisson_nll_loss(rate, jnp.array([0.0, 3.0, 0.0, 1.0]), log_input=False,
                               reduction="none")
  np.testing.assert_array_equal(out[:3], [0.0, np.inf, 2.0])
  assert np.isnan(out[3])
  # A very negative log-rate keeps k x exactly (no exp underflow to log 0).
  np.testing.assert_allclose(jxent.poisson_nll_loss(jnp.array([-200.0]), jnp.array([2.0]),
                                                    reduction="sum"), 400.0, rtol=1e-15)
  with pytest.raises(ValueError, match="inputs and targets"):
    jxent.poisson_nll_loss(LOG_RATE, K[:2])
  with pytest.raises(TypeError, match="log_input must be a Python bool"):
    jxent.poisson_nll_loss(LOG_RATE, K, log_input=1)
  for bad, kw, msg in ((-K - 1, {}, "targets has negative entries"),
                       (K, dict(log_input=False), "inputs has negative rates")):
    err, _ = jxent.checked(lambda x, kw=kw, bad=bad: jxent.poisson_nll_loss(x, bad, **kw))(
        -np.exp(LOG_RATE))
    with pytest.raises(checkify.JaxRuntimeError, match=msg):
      err.throw()
