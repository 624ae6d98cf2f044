"""jxent.grads: each closed form against jax.grad of the jxent loss it describes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
from jxent import grads

RNG = np.random.default_rng(3)
Z = (RNG.normal(size=(16, 6)) * 4).astype(np.float32)
Y = RNG.integers(0, 6, size=16)
Y_SOFT = RNG.dirichlet(np.ones(6), size=16).astype(np.float32)
Y_BIN = (RNG.uniform(size=(16, 6)) < 0.5).astype(np.float32)


def test_softmax_grad_formula():
  g = jax.grad(lambda z: jxent.softmax_cross_entropy(z, Y_SOFT).sum())(Z)
  assert np.max(np.abs(g - grads.softmax_cross_entropy_grad(Z, Y_SOFT))) < 1e-6
  # The closed form itself: softmax minus the target, rows summing to zero.
  np.testing.assert_allclose(grads.softmax_cross_entropy_grad(Z, Y_SOFT).sum(-1), 0, atol=1e-6)


def test_sigmoid_bce_grad_formula():
  g = jax.grad(lambda z: jxent.sigmoid_binary_cross_entropy(z, Y_BIN).sum())(Z)
  assert np.max(np.abs(g - grads.sigmoid_binary_cross_entropy_grad(Z, Y_BIN))) < 1e-6


def test_sigmoid_mse_grad_formula_and_vanishing():
  g = jax.grad(lambda z: 0.5 * jxent.mean_squared_error(
      jax.nn.sigmoid(z), Y_BIN, reduction="sum"))(Z)
  np.testing.assert_allclose(g, grads.sigmoid_mse_grad(Z, Y_BIN), atol=1e-7)
  # Confidently wrong (z = -20 with y = 1): CE still pushes with ~1, MSE with ~2e-9.
  z, y = jnp.array([-20.0]), jnp.array([1.0])
  assert abs(float(grads.sigmoid_binary_cross_entropy_grad(z, y)[0]) + 1) < 1e-6
  assert abs(float(grads.sigmoid_mse_grad(z, y)[0])) < 1e-8


def test_hessian_formula():
  for i in range(3):
    h = jax.hessian(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
        z[None], Y[i:i + 1])[0])(Z[i])
    np.testing.assert_allclose(h, grads.softmax_cross_entropy_hessian(Z[i]), atol=1e-6)
  assert np.all(np.linalg.eigvalsh(np.asarray(grads.softmax_cross_entropy_hessian(Z[0]))) > -1e-7)
  with pytest.raises(ValueError, match="one example"):
    grads.softmax_cross_entropy_hessian(Z)

