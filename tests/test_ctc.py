"""CTC loss: against a float64 sum over every alignment written here, the gradient against
softmax minus the alignment posterior, Optax, the boundary values and the errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

import jxent


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _brute(z, frame_pad, labels, blank=0):
  """(loss, gradient in z) of one sequence by enumerating every alignment (float64): the
  probability of each path of classes over the kept frames, those that collapse to
  ``labels``, and the posterior gamma_t(k) of the frames' classes among them."""
  kept = frame_pad == 0
  zk = z[kept]
  p = np.exp(zk - zk.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  total, gamma = 0.0, np.zeros_like(p)
  rows = np.arange(len(zk))
  for path in itertools.product(range(z.shape[1]), repeat=len(zk)):
    merged = [a for i, a in enumerate(path) if i == 0 or a != path[i - 1]]
    if [a for a in merged if a != blank] == list(labels):
      prob = np.prod(p[rows, path])
      total += prob
      gamma[rows, path] += prob
  grad = np.zeros_like(z)
  if total == 0:
    return np.inf, grad
  grad[kept] = p - gamma / total  # softmax minus the alignment posterior
  return -np.log(total), grad


RNG = np.random.default_rng(11)
B, T, K, N = 5, 6, 4, 3
Z = RNG.normal(size=(B, T, K)) * 1.5
LABELS = RNG.integers(1, K, size=(B, N))
LABELS[1, 1] = LABELS[1, 0]  # a repeat: needs a blank between
LABELS[4] = [2, 2, 2]  # three repeats need five frames
LABEL_PAD = np.zeros((B, N))
LABEL_PAD[2, 2:] = 1
LABEL_PAD[3, 1:] = 1
LABELS[3, 1:] = -7  # padding may hold anything
FRAME_PAD = np.zeros((B, T))
FRAME_PAD[0, 4:] = 1  # trailing padding
FRAME_PAD[2, 1] = 1  # a padded frame inside: skipped
FRAME_PAD[4, 5:] = 1  # five kept frames for three repeats: exactly enough
COT = np.array([0.5, 1.0, 1.5, 2.0, 2.5])


def _reference():
  out = [_brute(Z[b], FRAME_PAD[b], LABELS[b][LABEL_PAD[b] == 0]) for b in range(B)]
  return np.array([o[0] for o in out]), np.stack([o[1] for o in out])


REF_LOSS, REF_GRAD = _reference()


def _ctc(z, **kw):
  return jxent.ctc_loss(z, FRAME_PAD, LABELS, LABEL_PAD, **kw)


def test_loss_and_gradient_against_every_alignment():
  f = jax.jit(lambda z: _ctc(z))
  np.testing.assert_allclose(f(Z), REF_LOSS, rtol=1e-12)
  assert np.all(np.isfinite(REF_LOSS))
  # The gradient is softmax(z_t) - gamma_t on kept frames, 0 on padded ones.
  g = jax.jit(jax.grad(lambda z: jnp.sum(COT * _ctc(z))))(Z)
  np.testing.assert_allclose(g, COT[:, None, None] * REF_GRAD, atol=1e-12)
  assert np.all(g[0, 4:] == 0) and np.all(g[2, 1] == 0)
  # The soft alignment read off the gradient: each kept frame's posterior sums to one.
  gamma = jax.nn.softmax(Z) - jax.grad(lambda z: jnp.sum(_ctc(z)))(Z)
  np.testing.assert_allclose(jnp.sum(gamma, -1)[FRAME_PAD == 0], 1, rtol=1e-12)


def test_every_autodiff_mode_to_second_order():
  f = jax.jit(lambda z: jnp.sum(COT * _ctc(z)))
  check_grads(f, (Z,), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
  t = RNG.normal(size=Z.shape)
  _, jv = jax.jvp(f, (jnp.asarray(Z),), (jnp.asarray(t),))
  np.testing.assert_allclose(jv, np.sum(COT[:, None, None] * REF_GRAD * t), rtol=1e-10)


def test_reductions_jit_vmap_and_optax():
  np.testing.assert_allclose(_ctc(Z, reduction="sum"), REF_LOSS.sum(), rtol=1e-12)
  np.testing.assert_allclose(_ctc(Z, reduction="mean"), REF_LOSS.mean(), rtol=1e-12)
  # vmap over a second batch axis: each slice as its own call.
  zz = np.stack([Z, -0.5 * Z])
  out = jax.vmap(lambda z: _ctc(z))(zz)
  np.testing.assert_allclose(out[1], _ctc(-0.5 * Z), rtol=1e-12)
  # Optax (right-padded labels; its log-epsilon is far below these paths).
  np.testing.assert_allclose(optax.ctc_loss(Z, FRAME_PAD, np.maximum(LABELS, 0), LABEL_PAD),
                             REF_LOSS, rtol=1e-9)
  # Another blank: the classes relabelled so that 2 is the blank.
  perm = np.array([2, 1, 0, 3])  # class c of the old problem is class perm[c]
  z2 = np.empty_like(Z)
  z2[..., perm] = Z
  y2 = np.where(LABEL_PAD == 0, perm[np.maximum(LABELS, 0)], 0)
  np.testing.assert_allclose(jxent.ctc_loss(z2, FRAME_PAD, y2, LABEL_PAD, blank_id=2),
                             REF_LOSS, rtol=1e-12)


def test_boundaries():
  # No labels: every kept frame is blank. No frames, no labels: probability 1.
  z = jnp.asarray(Z[:2])
  none = np.ones((2, N))
  blank_lp = np.asarray(jax.nn.log_softmax(z)[..., 0])
  fp = np.array([np.zeros(T), np.ones(T)])
  np.testing.assert_allclose(jxent.ctc_loss(z, fp, LABELS[:2], none),
                             [-blank_lp[0].sum(), 0.0], rtol=1e-12)
  # Too few kept frames (three repeats need five): +inf, gradient NaN; zero_infinity: 0, 0.
  short = FRAME_PAD.copy()
  short[4, 4:] = 1
  f = lambda z, **kw: jxent.ctc_loss(z, short, LABELS, LABEL_PAD, **kw)
  loss = f(Z)
  assert loss[4] == np.inf and np.all(np.isfinite(loss[:4]))
  g = jax.grad(lambda z: jnp.sum(f(z)))(Z)
  assert np.all(np.isnan(g[4])) and np.all(np.isfinite(g[:4]))
  _, jv = jax.jvp(f, (jnp.asarray(Z),), (jnp.ones_like(Z),))
  assert np.isnan(jv[4]) and np.all(np.isfinite(jv[:4]))
  loss0 = f(Z, zero_infinity=True)
  np.testing.assert_allclose(loss0[:4], loss[:4], rtol=1e-12)
  assert loss0[4] == 0
  g0 = jax.grad(lambda z: jnp.sum(f(z, zero_infinity=True)))(Z)
  assert np.all(g0[4] == 0) and np.all(np.isfinite(g0))
  # A class masked with -inf logits: finite where the labels avoid it, +inf where one needs it.
  zm = Z.copy()
  zm[..., 3] = -np.inf
  needs = np.any((LABELS == 3) & (LABEL_PAD == 0), axis=1)
  out = jxent.ctc_loss(zm, FRAME_PAD, LABELS, LABEL_PAD)
  assert np.all(np.isinf(out[needs])) and np.all(np.isfinite(out[~needs]))
  g = jax.grad(lambda z: jnp.sum(jnp.where(needs, 0, jxent.ctc_loss(
      z, FRAME_PAD, LABELS, LABEL_PAD, zero_infinity=True))))(zm)
  assert np.all(np.isfinite(g)) and np.all(g[..., 3] == 0)
  # A frame no path can pass (its blank and the one label masked): +inf, not NaN.
  zd = np.array(Z[:2, :4, :3])  # a copy
  zd[0, 1, :2] = -np.inf
  lab, none = np.array([[1], [2]]), np.zeros((2, 1))
  out = jxent.ctc_loss(zd, np.zeros((2, 4)), lab, none)
  assert out[0] == np.inf and np.isfinite(out[1])
  g = jax.grad(lambda z: jnp.sum(jxent.ctc_loss(z, np.zeros((2, 4)), lab, none,
                                                zero_infinity=True)))(zd)
  assert np.all(g[0] == 0) and np.all(np.isfinite(g[1]))
  # Logits of 1e4 (float32): finite, the same as the shifted problem.
  big = (Z + 1e4).astype(np.float32)
  np.testing.assert_allclose(jxent.ctc_loss(big, FRAME_PAD, LABELS, LABEL_PAD), REF_LOSS,
                             rtol=2e-3)
  # bfloat16 logits: float32 out.
  out = jxent.ctc_loss(Z.astype(jnp.bfloat16), FRAME_PAD, LABELS, LABEL_PAD)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, REF_LOSS, rtol=5e-2)
  # A kept label out of range or equal to the blank: NaN for that sequence, value and slope.
  bad = LABELS.copy()
  bad[0, 0], bad[1, 2] = K, 0
  out = jxent.ctc_loss(Z, FRAME_PAD, bad, LABEL_PAD)
  assert np.all(np.isnan(out[:2])) and np.all(np.isfinite(out[2:]))
  g = jax.grad(lambda z: jnp.sum(jxent.ctc_loss(z, FRAME_PAD, bad, LABEL_PAD)))(Z)
  assert np.all(np.isnan(g[:2])) and np.all(np.isfinite(g[2:]))
  # NaN logits stay NaN.
  zn = Z.copy()
  zn[1, 2, 1] = np.nan
  out = jxent.ctc_loss(zn, FRAME_PAD, LABELS, LABEL_PAD)
  assert np.isnan(out[1]) and np.all(np.isfinite(np.delete(out, 1)))


def test_errors_and_value_checks():
  ctc = jxent.ctc_loss
  with pytest.raises(ValueError, match=r"logits must be \[B, T, K\]"):
    ctc(Z[0], FRAME_PAD[0], LABELS[0], LABEL_PAD[0])
  with pytest.raises(ValueError, match=r"logit_paddings must be \[B, T\]"):
    ctc(Z, FRAME_PAD[:, :2], LABELS, LABEL_PAD)
  with pytest.raises(ValueError, match="labels must be"):
    ctc(Z, FRAME_PAD, LABELS[:2], LABEL_PAD[:2])
  with pytest.raises(ValueError, match="label_paddings must have labels' shape"):
    ctc(Z, FRAME_PAD, LABELS, LABEL_PAD[:, :2])
  with pytest.raises(TypeError, match="labels must be an integer array"):
    ctc(Z, FRAME_PAD, LABELS.astype(float), LABEL_PAD)
  with pytest.raises(TypeError, match="logits must be a floating-point array"):
    ctc(LABELS[..., None], FRAME_PAD[:, :N], LABELS, LABEL_PAD)
  with pytest.raises(ValueError, match=r"blank_id must be a static int in \[0, 4\)"):
    ctc(Z, FRAME_PAD, LABELS, LABEL_PAD, blank_id=4)
  with pytest.raises(ValueError, match="reduction must be one of"):
    ctc(Z, FRAME_PAD, LABELS, LABEL_PAD, reduction="batchmean")
  checked = jax.jit(jxent.checked(ctc))
  err, _ = checked(Z, FRAME_PAD, LABELS, LABEL_PAD)
  assert err.get() is None
  bad = LABELS.copy()
  bad[2, 0] = 0
  err, _ = checked(Z, FRAME_PAD, bad, LABEL_PAD)
  assert "equal to blank_id=0" in err.get()
  gap = LABEL_PAD.copy()
  gap[0, 0] = 1
  err, _ = checked(Z, FRAME_PAD, LABELS, gap)
  assert "not right-padded" in err.get()
  with pytest.raises(checkify.JaxRuntimeError):
    err.throw()


def test_float32_gradient_of_long_sequences():
  # 600 frames, 150 labels: log-probabilities of the paths near -1000. The posterior is
  # formed from each frame's own ratios, so float32 keeps ~1e-5 of the float64 gradient
  # (a product alpha beta / p of such numbers would lose ~1e-3).
  rng = np.random.default_rng(5)
  b, t, k, n = 2, 600, 16, 150
  z = rng.normal(size=(b, t, k)) * 2
  y = rng.integers(1, k, size=(b, n))
  fp, lp = np.zeros((b, t)), np.zeros((b, n))
  fp[1, 550:] = 1
  lp[1, 120:] = 1
  g = lambda z: jax.jit(jax.value_and_grad(
      lambda z: jnp.sum(jxent.ctc_loss(z, fp, y, lp) * np.array([1.0, 0.5]))))(z)
  v64, g64 = g(z)
  v32, g32 = g(z.astype(np.float32))
  assert g32.dtype == np.float32
  np.testing.assert_allclose(v32, v64, rtol=1e-6)
  assert np.max(np.abs(g32 - g64)) < 5e-5 * np.max(np.abs(g64))
