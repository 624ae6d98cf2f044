"""jxent against PyTorch's own outputs on fixed inputs, read from a committed fixture
(tests/fixtures/torch_reference.npz, written by tests/fixtures/make_torch_reference.py), so
PyTorch's semantics are checked in every run without PyTorch installed."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

REF = np.load(Path(__file__).parent / "fixtures" / "torch_reference.npz")
Z, Y, T, W, B = (REF[k] for k in ("z", "y", "t", "w", "b"))
PW, P, COT = REF["pw"], REF["p"], REF["cot"]
Y32 = Y.astype(np.int32)
TOL = dict(rtol=2e-5, atol=2e-6)
OPTS = {"plain": {}, "weighted": {"class_weights": W}, "smooth": {"label_smoothing": 0.15},
        "weighted_smooth": {"class_weights": W, "label_smoothing": 0.15}}


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", list(OPTS))
def test_cross_entropy_values(name, reduction):
  got = jxent.softmax_cross_entropy_with_integer_labels(
      Z, Y32, ignore_index=-100, reduction=reduction, **OPTS[name])
  np.testing.assert_allclose(got, REF[f"ce_int_{name}_{reduction}"], **TOL)
  got = jxent.softmax_cross_entropy(Z, T, reduction=reduction, **OPTS[name])
  np.testing.assert_allclose(got, REF[f"ce_soft_{name}_{reduction}"], **TOL)


@pytest.mark.parametrize("name", ["plain", "weighted_smooth"])
def test_cross_entropy_gradients_with_a_non_uniform_cotangent(name):
  f = lambda z: jnp.sum(COT * jxent.softmax_cross_entropy_with_integer_labels(
      z, Y32, ignore_index=-100, **OPTS[name]))
  np.testing.assert_allclose(jax.grad(f)(Z), REF[f"grad_ce_int_{name}"], **TOL)
  f = lambda z: jnp.sum(COT * jxent.softmax_cross_entropy(z, T, **OPTS[name]))
  np.testing.assert_allclose(jax.grad(f)(Z), REF[f"grad_ce_soft_{name}"], **TOL)
  f = lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, Y32, ignore_index=-100, reduction="mean", **OPTS[name])
  np.testing.assert_allclose(jax.grad(f)(Z), REF[f"grad_ce_int_{name}_mean"], **TOL)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_bce_values(reduction):
  np.testing.assert_allclose(jxent.sigmoid_binary_cross_entropy(Z, B, reduction=reduction),
                             REF[f"bce_{reduction}"], **TOL)
  np.testing.assert_allclose(
      jxent.sigmoid_binary_cross_entropy(Z, B, pos_weight=PW, reduction=reduction),
      REF[f"bce_pw_{reduction}"], **TOL)


def test_sigmoid_bce_gradients_in_logits_and_labels():
  f = lambda z, b: jnp.sum(COT[:, None] * jxent.sigmoid_binary_cross_entropy(z, b,
                                                                              pos_weight=PW))
  gz, gb = jax.grad(f, argnums=(0, 1))(Z, B)
  np.testing.assert_allclose(gz, REF["grad_bce_pw"], **TOL)
  np.testing.assert_allclose(gb, REF["grad_bce_pw_labels"], **TOL)


def test_probability_losses_kl_and_entropy():
  np.testing.assert_allclose(jxent.binary_cross_entropy(P, B), REF["bce_probs"], **TOL)
  np.testing.assert_allclose(jxent.mean_squared_error(P, B), REF["mse"], **TOL)
  q = jax.nn.softmax(Z)
  np.testing.assert_allclose(jnp.sum(jxent.kl_divergence(T, q)) / Z.shape[0],
                             REF["kl_batchmean"], **TOL)
  np.testing.assert_allclose(jxent.entropy_from_logits(Z), REF["entropy"], **TOL)
