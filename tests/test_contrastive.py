"""ntxent against a float64 NumPy formula and Optax: values, gradients in the embeddings and
the temperature, masks, confident pairs, edges and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import jxent

RNG = np.random.default_rng(11)
X = RNG.normal(size=(10, 6))
L = np.array([0, 0, 1, 1, 1, 2, 2, 3, 4, 4])  # pairs, a triple, a singleton (no positive)
KEEP = np.array([True] * 8 + [False, True])


def ntxent_ref(x, labels, tau, keep=None):
  """Per ordered positive pair -log(e^s_ij / (e^s_ij + sum_negatives e^s_ik)), float64."""
  b = len(labels)
  keep = np.ones(b, bool) if keep is None else keep
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  s = u @ u.T / tau
  out = np.zeros((b, b))
  for i in range(b):
    neg = [k for k in range(b) if keep[k] and labels[k] != labels[i]]
    for j in range(b):
      if i != j and keep[i] and keep[j] and labels[i] == labels[j]:
        terms = np.array([s[i, j]] + [s[i, k] for k in neg])
        m = terms.max()
        out[i, j] = -(s[i, j] - m - np.log(np.exp(terms - m).sum()))
  return out


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def test_values_and_gradients_against_float64():
  cot = RNG.uniform(0.5, 1.5, size=(10, 10))
  want = ntxent_ref(X, L, 0.3)
  f = jax.jit(jxent.ntxent, static_argnames="reduction")
  np.testing.assert_allclose(f(X, L, temperature=0.3, reduction="none"), want, rtol=1e-12,
                             atol=1e-15)
  pos = want > 0
  np.testing.assert_allclose(f(X, L, temperature=0.3), want.sum() / pos.sum(), rtol=1e-12)
  np.testing.assert_allclose(f(X, L, temperature=0.3, reduction="sum"), want.sum(), rtol=1e-12)
  np.testing.assert_allclose(f(X, L, temperature=0.3, where=KEEP),
                             ntxent_ref(X, L, 0.3, KEEP).sum() / 10, rtol=1e-12)  # 10 pairs
  # gradients in the embeddings and the temperature, non-unit cotangent, against autodiff of
  # the same formula written in jnp
  def ref(x, tau):
    u = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    s = u @ u.T / tau
    same = L[:, None] == L[None, :]
    neg = jnp.where(same, -jnp.inf, s)
    lse = jax.scipy.special.logsumexp(jnp.concatenate(
        [s[:, :, None], jnp.broadcast_to(neg[:, None, :], (10, 10, 10))], -1), -1)
    return jnp.sum(cot * jnp.where(same & ~np.eye(10, dtype=bool), lse - s, 0))

  mine = lambda x, tau: jnp.sum(cot * jxent.ntxent(x, L, temperature=tau, reduction="none"))
  np.testing.assert_allclose(mine(X, 0.3), ref(X, 0.3), rtol=1e-12)
  for a, b in zip(jax.grad(mine, (0, 1))(X, 0.3), jax.grad(ref, (0, 1))(X, 0.3)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  check_grads(mine, (X, 0.3), order=2, modes=["fwd", "rev"])


def test_matches_optax_and_keeps_confident_pairs():
  l32 = jnp.asarray(L[:8])  # every example has a positive
  with jax.enable_x64(False):
    x32 = jnp.asarray(X[:8], jnp.float32)
    np.testing.assert_allclose(jxent.ntxent(x32, l32), optax.ntxent(x32, l32), rtol=1e-5)
    g = jax.grad(lambda x: jxent.ntxent(x, l32, temperature=0.5))(x32)
    go = jax.grad(lambda x: optax.ntxent(x, l32, temperature=0.5))(x32)
    np.testing.assert_allclose(g, go, rtol=1e-4, atol=1e-6)
    # Confident pairs: each positive at cosine 1, negatives at -1, tau = 0.05: the loss is
    # e^-40 (plus a factor), which Optax's numer - log(denom) rounds to 0.
    e = jnp.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    lab = jnp.array([0, 0, 1, 1])
    want = np.log1p(2 * np.exp(-40.0))  # two negatives at s = -20, the positive at 20
    got = jxent.ntxent(e, lab, temperature=0.05)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(optax.ntxent(e, lab, temperature=0.05)) == 0.0


def test_edges_and_errors():
  # No positive pair: 0 (Optax: NaN); no negatives: the pairs' loss 0.
  assert float(jxent.ntxent(X[:3], np.arange(3))) == 0.0
  assert np.isnan(float(optax.ntxent(jnp.asarray(X[:3]), jnp.arange(3))))
  np.testing.assert_array_equal(jxent.ntxent(X[:3], np.zeros(3, int), reduction="none"), 0)
  # A dropped example's NaN reaches nothing; a kept one's makes the loss NaN.
  xn = X.copy()
  xn[8] = np.nan
  out = jxent.ntxent(xn, L, where=KEEP)
  assert np.isfinite(out)
  g = jax.grad(lambda x: jxent.ntxent(x, L, where=KEEP))(xn)
  assert np.all(np.isfinite(g)) and np.all(g[8] == 0)
  assert np.isnan(jxent.ntxent(xn, L))
  # A zero embedding is clamped as Optax's (cosine 0), not NaN.
  xz = X.copy()
  xz[0] = 0
  assert np.isfinite(jxent.ntxent(xz, L))
  lo = jxent.ntxent(X.astype(jnp.bfloat16), L)
  assert lo.dtype == jnp.float32
  with pytest.raises(ValueError, match=r"embeddings \[B, D\] and labels \[B\].*\(9,\)"):
    jxent.ntxent(X, L[:9])
  with pytest.raises(TypeError, match="labels must be an integer"):
    jxent.ntxent(X, L.astype(float))
  with pytest.raises(ValueError, match=r"where must be a boolean mask of shape \(10,\)"):
    jxent.ntxent(X, L, where=KEEP[:3])
  with pytest.raises(ValueError, match="temperature must be a scalar"):
    jxent.ntxent(X, L, temperature=jnp.ones(2))
  err, _ = jxent.checked(lambda t: jxent.ntxent(X, L, temperature=t))(-1.0)
  with pytest.raises(checkify.JaxRuntimeError, match="temperature must be > 0"):
    err.throw()
