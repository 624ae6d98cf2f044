"""Every loss composes with JAX's transformations: forward and reverse mode to second order,
vmap, checkpoint, eval_shape, serialized export (with a symbolic batch), shard_map and
sharded meshes, traced hyperparameters, and gradients in every float argument against
autodiff of an independent float64 formula."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export
from jax.test_util import check_grads

import jxent
from jxent import _fused
from jxent._platform import use_implementation


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


N, C = 6, 5
RNG = np.random.default_rng(3)
Z = RNG.normal(size=(N, C)) * 2
Y = RNG.integers(0, C, size=N)
T = RNG.dirichlet(np.ones(C), size=N)
W = RNG.uniform(0.5, 2.0, size=C)
B = (RNG.uniform(size=(N, C)) < 0.3).astype(np.float64)
KEEP = np.array([True, True, False, True, True, True])

# (name, loss of (logits, float params) -> scalar with non-unit cotangent weights)
COT = RNG.uniform(0.5, 1.5, size=N)
POLICY = dict(old_log_probs=RNG.normal(size=(2, 3)) - 1.5,
              ref_log_probs=RNG.normal(size=(2, 3)) - 1.5, beta=0.1, loss_type="grpo",
              where=KEEP.reshape(2, 3))


def _losses():
  kw = dict(label_smoothing=0.1, z_loss=1e-2)
  return {
      "int": lambda z: jnp.sum(COT * jxent.softmax_cross_entropy_with_integer_labels(
          z, Y, class_weights=W, where=KEEP, **kw)),
      "int-mean": lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, Y, ignore_index=int(Y[0]), reduction="mean", **kw),
      "soft": lambda z: jnp.sum(COT * jxent.softmax_cross_entropy(z, T, class_weights=W, **kw)),
      "soft-sum": lambda z: jxent.softmax_cross_entropy(z, T, where=KEEP, reduction="sum", **kw),
      "bce": lambda z: jnp.sum(COT[:, None] * jxent.sigmoid_binary_cross_entropy(
          z, B, pos_weight=W)),
      "bce-mean": lambda z: jxent.sigmoid_binary_cross_entropy(z, B, where=B < 2,
                                                               reduction="mean"),
      "focal": lambda z: jxent.sigmoid_focal_loss(z, B, alpha=0.3, reduction="sum"),
      "fused-forward": lambda z: jxent.linear_cross_entropy(
          z, jnp.asarray(W[:, None] * np.eye(C, 7)), Y, chunk_size=4, method="forward", **kw),
      "fused-recompute": lambda z: jnp.sum(COT * jxent.linear_cross_entropy(
          z, jnp.asarray(W[:, None] * np.eye(C, 7)), Y, chunk_size=4, reduction="none",
          method="recompute", **kw)),
      # The information quantities and probability-space losses: plain JAX.
      "entropy_from_logits": lambda z: jnp.sum(COT * jxent.entropy_from_logits(z, base=2)),
      "kl_from_logits": lambda z: jnp.sum(COT * jxent.kl_divergence_from_logits(z, 0.5 * z + 1)),
      "ce_from_logits": lambda z: jnp.sum(COT * jxent.cross_entropy_from_logits(z[::-1], z)),
      "entropy": lambda z: jnp.sum(COT * jxent.entropy(jax.nn.softmax(z))),
      "kl": lambda z: jnp.sum(COT * jxent.kl_divergence(jnp.asarray(T), jax.nn.softmax(z))),
      "js": lambda z: jnp.sum(COT * jxent.js_divergence(jnp.asarray(T), jax.nn.softmax(z))),
      "tv_from_logits": lambda z: jnp.sum(COT * jxent.tv_distance_from_logits(
          z, 0.5 * z + 1, temperature=0.7)),
      "fused-dense-kl": lambda z: jxent.linear_topk_kl_divergence(
          z, jnp.asarray(W[:, None] * np.eye(C, 7)), None,
          jax.nn.log_softmax(jnp.asarray(np.eye(N, 7) * 3)), chunk_size=4),
      "fused-tv": lambda z: jnp.sum(COT * jxent.linear_tv_distance(
          z, jnp.asarray(W[:, None] * np.eye(C, 7)), z[::-1], jnp.asarray(np.eye(C, 7)),
          teacher_grad=True, reduction="none", chunk_size=4)),
      # A policy loss (clipped ratio, KL to a reference), dense and from a linear head.
      "policy": lambda z: jxent.policy_loss(
          jnp.take_along_axis(jax.nn.log_softmax(z), Y[:, None], -1).reshape(2, 3),
          COT[:2] - 1, **POLICY),
      "fused-policy": lambda z: jxent.linear_policy_loss(
          z.reshape(2, 3, C), jnp.asarray(W[:, None] * np.eye(C, 7)), Y.reshape(2, 3),
          COT[:2] - 1, chunk_size=4, **POLICY),
      "poly": lambda z: jnp.sum(COT * jxent.poly_loss_cross_entropy(z, T, epsilon=1.5,
                                                                    where=KEEP)),
      "generalized_kl": lambda z: jnp.sum(COT * jxent.generalized_kl_divergence(
          2 * jnp.asarray(T), jnp.exp(0.5 * z))),
      "categorical": lambda z: jxent.categorical_cross_entropy(
          jax.nn.softmax(z), jnp.asarray(T), where=KEEP, reduction="mean"),
      "binary": lambda z: jxent.binary_cross_entropy(jax.nn.sigmoid(z), jnp.asarray(B),
                                                     reduction="sum"),
      "mse": lambda z: jxent.mean_squared_error(jax.nn.sigmoid(z), jnp.asarray(B),
                                                where=B > 0.5),
      "binary_entropy": lambda z: jnp.sum(jxent.binary_entropy(jax.nn.sigmoid(z))),
      # CTC: two sequences of three frames, labels (2, 2) (a repeat) and (1, 4).
      "ctc": lambda z: jnp.sum(COT[:2] * jxent.ctc_loss(
          z.reshape(2, 3, C), jnp.zeros((2, 3)), jnp.array([[2, 2], [1, 4]]),
          jnp.zeros((2, 2)))),
      "self_information": lambda z: jnp.sum(jxent.self_information(jax.nn.sigmoid(z))),
      # NT-Xent: the logits' rows (moved off the origin: scaling them changes nothing) as
      # embeddings, three positive pairs.
      "ntxent": lambda z: jxent.ntxent(z + 1, jnp.array([0, 0, 1, 1, 2, 2]), temperature=0.5),
      # Likelihoods of real values and counts: the mean and log-variance from the logits.
      "gaussian_nll": lambda z: jnp.sum(COT[:, None] * jxent.gaussian_nll_loss(
          z[:, :2], jnp.asarray(T[:, :2]), jnp.exp(z[:, 2:3]), full=True, reduction="none")),
      "poisson_nll": lambda z: jxent.poisson_nll_loss(z, jnp.asarray(3 * T), full=True,
                                                      where=KEEP[:, None]),
  }


LOSSES = _losses()
# The losses with an XLA:CPU form run again in their reference (GPU/TPU) form; the scalar
# reductions ("int-mean", "soft-sum", "bce-mean") there are sums of the same per-example form.
REFERENCE = {"int", "soft", "bce", "focal"}


@pytest.mark.parametrize("name, impl", [(n, "platform") for n in sorted(LOSSES)]
                         + [(n, "reference") for n in sorted(REFERENCE)]
                         # the GPU/TPU form's own rule (the recompute method's tangent is
                         # the reference's; its forward is checked in test_fused)
                         + [("fused-forward", "accelerator")])
def test_all_autodiff_modes_to_second_order(name, impl, monkeypatch):
  # Under jit (each transformation traced once and compiled, not run op by op); a fresh
  # function, so that no compiled program of another implementation is reused.
  loss = LOSSES[name]
  f = jax.jit(lambda z: loss(z))
  z = jnp.asarray(Z)
  if impl == "accelerator":  # vocabulary blocks of 4 columns: one full block and a remainder
    monkeypatch.setattr(_fused, "accelerator_vocab_block", lambda n, v: 4)
  ctx = contextlib.nullcontext() if impl == "platform" else use_implementation(impl)
  with ctx:
    check_grads(f, (z,), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    g = jax.grad(f)(z)
    t = jnp.asarray(RNG.normal(size=z.shape))
    _, jv = jax.jvp(f, (z,), (t,))
    np.testing.assert_allclose(jv, jnp.sum(g * t), rtol=1e-10)
    _, lin = jax.linearize(f, z)
    np.testing.assert_allclose(lin(t), jv, rtol=1e-10)
    np.testing.assert_allclose(jax.jacfwd(f)(z), g, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jax.jacrev(f)(z), g, rtol=1e-10, atol=1e-14)
    h = jax.hessian(f)(z)
    np.testing.assert_allclose(h.reshape(z.size, z.size), h.reshape(z.size, z.size).T,
                               atol=1e-10)
    np.testing.assert_allclose(jax.grad(jax.checkpoint(f))(z), g, rtol=1e-12)
    assert jax.eval_shape(f, z).shape == ()
    zb = jnp.stack([z, -0.5 * z])
    np.testing.assert_allclose(jax.vmap(f)(zb), [f(z), f(-0.5 * z)], rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(zb)[1], jax.grad(f)(-0.5 * z),
                               rtol=1e-10, atol=1e-14)


def _int_ref(z, y, w, eps, zl, keep):
  """Independent float64 formula (PyTorch's weighted, smoothed CE) plus z-loss."""
  lp = jax.nn.log_softmax(z)
  nll = -jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0] * w[y]
  smooth = -jnp.sum(lp * w, axis=-1) / z.shape[-1]
  lse = jax.scipy.special.logsumexp(z, axis=-1)
  return jnp.where(keep, (1 - eps) * nll + eps * smooth + zl * lse**2, 0)


def _soft_ref(z, t, w, eps, zl):
  lp = jax.nn.log_softmax(z)
  tt = ((1 - eps) * t + eps / z.shape[-1]) * w
  return -jnp.sum(tt * lp, axis=-1) + zl * jax.scipy.special.logsumexp(z, axis=-1) ** 2


def test_gradients_in_every_float_argument_match_the_formula():
  z = jnp.asarray(Z)
  args = (z, jnp.asarray(W), 0.1, 0.01)
  # jitted (the options traced): check_grads then compiles each derivative program once
  # rather than dispatching every operation of every finite difference alone.
  f = jax.jit(lambda z, w, eps, zl: jnp.sum(COT * jxent.softmax_cross_entropy_with_integer_labels(
      z, Y, class_weights=w, label_smoothing=eps, z_loss=zl, where=KEEP)))
  r = lambda z, w, eps, zl: jnp.sum(COT * _int_ref(z, Y, w, eps, zl, KEEP))
  np.testing.assert_allclose(f(*args), r(*args), rtol=1e-12)
  grads = jax.grad(f, argnums=(0, 1, 2, 3))(*args), jax.grad(r, argnums=(0, 1, 2, 3))(*args)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  check_grads(f, args, order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
  # Soft labels: the labels too.
  args = (z, jnp.asarray(T), jnp.asarray(W), 0.1, 0.01)
  f = jax.jit(lambda z, t, w, eps, zl: jnp.sum(COT * jxent.softmax_cross_entropy(
      z, t, class_weights=w, label_smoothing=eps, z_loss=zl)))
  r = lambda z, t, w, eps, zl: jnp.sum(COT * _soft_ref(z, t, w, eps, zl))
  for a, b in zip(jax.grad(f, argnums=range(5))(*args), jax.grad(r, argnums=range(5))(*args)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  check_grads(f, args, order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
  # Sigmoid BCE: logits, labels and pos_weight.
  bce_ref = lambda z, y, pw: jnp.sum(COT[:, None] * (
      pw * y * jax.nn.softplus(-z) + (1 - y) * jax.nn.softplus(z)))
  f = jax.jit(lambda z, y, pw: jnp.sum(COT[:, None] * jxent.sigmoid_binary_cross_entropy(
      z, y, pos_weight=pw)))
  args = (z, jnp.asarray(T), jnp.asarray(W))
  grads = jax.grad(f, argnums=(0, 1, 2))(*args), jax.grad(bce_ref, argnums=(0, 1, 2))(*args)
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
  check_grads(f, args, order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_focal_and_probability_losses_in_every_argument_against_formulas():
  # Sigmoid focal loss with soft labels, alpha, gamma and an elementwise `where`, "mean":
  # alpha_t (1 - p_t)^gamma BCE(z, y) over the kept entries, in logits and labels.
  z, y = jnp.asarray(Z), jnp.asarray(T)
  keep = jnp.asarray(RNG.uniform(size=(N, C)) > 0.3)
  cot = jnp.asarray(RNG.uniform(0.5, 1.5, size=(N, C)))

  def focal_ref(z, y):
    p = jax.nn.sigmoid(z)
    p_t = p * y + (1 - p) * (1 - y)
    a_t = 0.3 * y + 0.7 * (1 - y)
    bce = y * jax.nn.softplus(-z) + (1 - y) * jax.nn.softplus(z)
    return jnp.sum(jnp.where(keep, cot * a_t * (1 - p_t) ** 1.5 * bce, 0)) / jnp.sum(keep)

  f = lambda z, y: jxent.sigmoid_focal_loss(z, y, alpha=0.3, gamma=1.5, where=keep,
                                            reduction="none")
  focal = lambda z, y: jnp.sum(jnp.where(keep, cot * f(z, y), 0)) / jnp.sum(keep)
  np.testing.assert_allclose(focal(z, y), focal_ref(z, y), rtol=1e-12)
  for a, b in zip(jax.grad(focal, (0, 1))(z, y), jax.grad(focal_ref, (0, 1))(z, y)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  mean = jxent.sigmoid_focal_loss(z, y, alpha=0.3, gamma=1.5, where=keep, reduction="mean")
  np.testing.assert_allclose(mean, jnp.sum(jnp.where(keep, f(z, y), 0)) / jnp.sum(keep),
                             rtol=1e-12)
  # binary_cross_entropy on probabilities, interior and boundary points (p = 0 or 1 against
  # the agreeing label: loss 0, slope (1 - y)/(1 - p) - y/p taken with 0 log 0 = 0).
  p = jnp.array([0.0, 1.0, 0.3, 0.9, 0.5])
  t = jnp.array([0.0, 1.0, 0.25, 1.0, 0.0])
  c = jnp.array([0.7, 1.3, 0.9, 1.1, 0.6])
  bce = lambda p, t: jnp.sum(c * jxent.binary_cross_entropy(p, t))
  np.testing.assert_allclose(jxent.binary_cross_entropy(p, t),
                             [0, 0, -(0.25 * np.log(0.3) + 0.75 * np.log(0.7)),
                              -np.log(0.9), -np.log(0.5)], rtol=1e-12)
  gp = jax.grad(bce)(p, t)
  want = c * np.array([1.0, -1.0, 0.75 / 0.7 - 0.25 / 0.3, -1 / 0.9, 1 / 0.5])
  np.testing.assert_allclose(gp, want, rtol=1e-12)
  # In the labels, log(1 - p) - log p wherever 0 < p < 1, hard labels (0, 1) included.
  gt = jax.grad(lambda t: jnp.sum(c[2:] * jxent.binary_cross_entropy(p[2:], t)))(t[2:])
  np.testing.assert_allclose(gt, c[2:] * np.log((1 - p[2:]) / p[2:]), rtol=1e-12)
  # Cross-entropy of distributions: the slope in a target's zero entry is -log q there.
  q = jnp.array([0.2, 0.5, 0.3])
  g = jax.grad(lambda t: jxent.cross_entropy(t, q))(jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_allclose(g, -np.log([0.2, 0.5, 0.3]), rtol=1e-12)


def test_fused_gradients_in_every_argument_match_unfused():
  rng = np.random.default_rng(0)
  h, w, b = rng.normal(size=(7, 4)), rng.normal(size=(4, 9)), rng.normal(size=9)
  y = rng.integers(0, 9, size=7)
  cot = rng.uniform(0.5, 1.5, size=7)
  for method in ("forward", "recompute"):
    f = jax.jit(lambda h, w, b, eps, zl, method=method: jxent.linear_cross_entropy(
        h, w, y, bias=b, label_smoothing=eps, z_loss=zl, chunk_size=3, method=method,
        logit_softcap=4.0))
    r = lambda h, w, b, eps, zl: jxent.softmax_cross_entropy_with_integer_labels(
        4.0 * jnp.tanh((h @ w + b) / 4.0), y, label_smoothing=eps, z_loss=zl, reduction="mean")
    args = (h, w, b, 0.1, 0.01)
    np.testing.assert_allclose(f(*args), r(*args), rtol=1e-12)
    for a, c in zip(jax.grad(f, argnums=range(5))(*args), jax.grad(r, argnums=range(5))(*args)):
      np.testing.assert_allclose(a, c, rtol=1e-9, atol=1e-12)
    t = tuple(rng.normal(size=np.shape(a)) for a in args)
    np.testing.assert_allclose(jax.jvp(f, args, t)[1], jax.jvp(r, args, t)[1], rtol=1e-9)
  fn = jax.jit(lambda h, w: jnp.sum(cot * jxent.linear_cross_entropy(h, w, y, reduction="none",
                                                                     chunk_size=3)))
  check_grads(fn, (h, w), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)


def test_vmap_matches_a_loop():
  f = lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=0.1)
  zb = jnp.asarray(np.stack([Z, -Z, 2 * Z]))
  yb = jnp.asarray(np.stack([Y, Y[::-1], Y]))
  got = jax.vmap(f)(zb, yb)
  for i in range(3):
    np.testing.assert_allclose(got[i], _int_ref(zb[i], yb[i], jnp.ones(C), 0.1, 0.0, True),
                               rtol=1e-12)
  g = jax.vmap(jax.grad(lambda z, y: f(z, y).sum()))(zb, yb)
  for i in range(3):
    want = jax.grad(lambda z: _int_ref(z, yb[i], jnp.ones(C), 0.1, 0.0, True).sum())(zb[i])
    np.testing.assert_allclose(g[i], want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_export_serializes(name):
  f = LOSSES[name]
  z = jnp.asarray(Z)
  exp = export.export(jax.jit(jax.value_and_grad(f)))(z)
  back = export.deserialize(exp.serialize())
  v, g = back.call(z)
  v0, g0 = jax.value_and_grad(f)(z)
  np.testing.assert_allclose(v, v0, rtol=1e-12)
  np.testing.assert_allclose(g, g0, rtol=1e-12)
  # jvp through the exported forward-mode computation.
  exp2 = export.export(jax.jit(lambda z, t: jax.jvp(f, (z,), (t,))))(z, z)
  np.testing.assert_allclose(export.deserialize(exp2.serialize()).call(z, z)[1],
                             jax.jvp(f, (z,), (z,))[1], rtol=1e-12)


def test_export_symbolic_batch_dimension_and_other_platforms():
  (b,) = export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, C), jnp.float32)
  lab = jax.ShapeDtypeStruct((b,), jnp.int32)
  f = jax.jit(jax.value_and_grad(lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(
      z, y, label_smoothing=0.1, reduction="mean")))
  exp = export.export(f, platforms=("cpu", "cuda", "tpu"))(spec, lab)
  back = export.deserialize(exp.serialize())
  z = jnp.asarray(Z, jnp.float32)
  v, g = back.call(z, jnp.asarray(Y, jnp.int32))
  v0, g0 = f(z, jnp.asarray(Y, jnp.int32))
  np.testing.assert_allclose(v, v0, rtol=1e-6)
  np.testing.assert_allclose(g, g0, rtol=1e-6)
  for fn in (lambda z: jxent.softmax_cross_entropy(z, jax.nn.softmax(z), reduction="sum"),
             lambda z: jxent.sigmoid_binary_cross_entropy(z, jax.nn.sigmoid(z))):
    exp = export.export(jax.jit(fn))(jax.ShapeDtypeStruct((b, C), jnp.float32))
    np.testing.assert_allclose(export.deserialize(exp.serialize()).call(z), fn(z), rtol=1e-6,
                               atol=1e-6)


def test_token_stats_export_and_serialize():
  # Functions returning a TokenStats (a named tuple) serialize; the statistics come back.
  h = jnp.asarray(Z[:, :4], jnp.float32)
  w = jnp.asarray(np.linspace(-1, 1, 4 * 7).reshape(4, 7), jnp.float32)
  y = jnp.asarray(Y % 7, jnp.int32)
  for f in (lambda h, w: jxent.linear_token_stats(h, w, y),
            lambda h, w: jxent.linear_cross_entropy(h, w, y, return_stats=True)[1]):
    back = export.deserialize(export.export(jax.jit(f))(h, w).serialize()).call(h, w)
    want = f(h, w)
    assert type(back) is jxent.TokenStats
    for a, b in zip(back, want):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_linear_cross_entropy_with_a_symbolic_token_count_names_n():
  (b,) = export.symbolic_shape("b")
  f = jax.jit(lambda h, y: jxent.linear_cross_entropy(h, jnp.eye(4, 7), y))
  with pytest.raises(ValueError, match="number of tokens N"):
    export.export(f)(jax.ShapeDtypeStruct((b, 4), jnp.float32),
                     jax.ShapeDtypeStruct((b,), jnp.int32))


def test_implementations_agree_with_the_reference():
  """The XLA:CPU forwards against the reference, called directly, on the awkward inputs:
  -inf logits, class masks, dropped rows, rows outside the one-pass range, 16-bit logits."""
  from jxent import _cpu
  from jxent import _reference as R

  rng = np.random.default_rng(9)
  z = rng.normal(size=(8, 12)) * 3
  z[1] += 150          # overflows a one-pass exp-sum
  z[2] -= 200          # underflows it
  z[3, :4] = -np.inf   # masked classes
  y = rng.integers(4, 12, size=8)
  t = rng.dirichlet(np.ones(12), size=8)
  t[3, :4] = 0
  valid = np.array([True, True, True, True, False, True, True, True])
  w = rng.uniform(0.5, 2, size=12)
  cmask = rng.uniform(size=(8, 12)) < 0.8
  cmask[:, 5] = True
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
    zz = jnp.asarray(z, dtype)
    acc = R.acc_dtype(zz.dtype)
    for eps, zl, ww, cm, vv in ((None, None, None, None, None), (0.1, 1e-2, w, None, valid),
                                (0.2, None, None, cmask, valid)):
      args = lambda lab: (R.apply_class_mask(zz, cm), lab,
                          None if vv is None else jnp.asarray(vv),
                          None if ww is None else jnp.asarray(ww, acc),
                          None if eps is None else jnp.asarray(eps, acc), cm,
                          None if zl is None else jnp.asarray(zl, acc))
      tol = dict(rtol=1e-5 if dtype != jnp.float64 else 1e-12, atol=1e-6)
      lab_t = jnp.asarray(np.where(cm, t, 0) if cm is not None else t, dtype)
      for fast, ref, lab in ((_cpu.int_ce, R.int_ce, jnp.asarray(y, jnp.int32)),
                             (_cpu.soft_ce, R.soft_ce, lab_t)):
        got, want = jax.jit(fast)(*args(lab)), jax.jit(ref)(*args(lab))
        lse_got, lse_want = got[1] + got[2], want[1] + want[2]
        np.testing.assert_allclose(got[0], want[0], **tol)
        np.testing.assert_allclose(lse_got, lse_want, **tol)
      soft_want = jax.jit(R.soft_ce)(*args(lab_t))[0]
      np.testing.assert_allclose(jax.jit(_cpu.soft_ce_loss)(*args(lab_t)), soft_want, **tol)
      np.testing.assert_allclose(jax.jit(_cpu.soft_ce_total)(*args(lab_t)), jnp.sum(soft_want),
                                 **tol)
    zb = jnp.asarray(np.clip(z, -1e4, 1e4), dtype)
    bb = jnp.asarray(rng.uniform(size=(8, 12)) < 0.3, dtype)
    keep = jnp.asarray(rng.uniform(size=(8, 12)) < 0.9)
    np.testing.assert_allclose(
        _cpu.bce_total(zb, bb, None, keep),
        jnp.sum(R.bce(zb.astype(R.acc_dtype(zb.dtype)), bb.astype(R.acc_dtype(zb.dtype)), None),
                where=keep), rtol=1e-5)


def test_traced_hyperparameters():
  z = jnp.asarray(Z)
  f = jax.jit(lambda eps, zl: jxent.softmax_cross_entropy_with_integer_labels(
      z, Y, label_smoothing=eps, z_loss=zl, reduction="mean"))
  np.testing.assert_allclose(f(0.1, 0.01), jnp.mean(_int_ref(z, Y, jnp.ones(C), 0.1, 0.01, True)),
                             rtol=1e-12)
  fl = jax.jit(lambda eps: jxent.linear_cross_entropy(z, jnp.eye(C), Y, label_smoothing=eps))
  np.testing.assert_allclose(fl(0.1), jnp.mean(_int_ref(z, Y, jnp.ones(C), 0.1, 0.0, True)),
                             rtol=1e-12)
  with pytest.raises(TypeError, match="logit_softcap"):
    jax.jit(lambda c: jxent.linear_cross_entropy(z, jnp.eye(C), Y, logit_softcap=c))(3.0)


def test_class_mask_entry_points_agree():
  z = jnp.asarray(Z)
  cmask = np.ones((N, C), bool)
  cmask[0] = False                      # a fully masked row: loss 0, gradient 0
  cmask[1, Y[1]] = False                # the label on a masked class: +inf
  onehot = np.eye(C)[Y]
  li = jxent.softmax_cross_entropy_with_integer_labels(z, Y, where=cmask)
  ls = jxent.softmax_cross_entropy(z, jnp.asarray(onehot), where=cmask)
  np.testing.assert_array_equal(li, ls)
  assert li[0] == 0 and li[1] == np.inf
  np.testing.assert_allclose(li[2:], optax.softmax_cross_entropy_with_integer_labels(
      z[2:], Y[2:]), rtol=1e-12)
  keep = np.arange(N) != 1
  gi = jax.grad(lambda z: jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(
      z, Y, where=cmask)[keep]))(z)
  gs = jax.grad(lambda z: jnp.sum(jxent.softmax_cross_entropy(
      z, jnp.asarray(onehot), where=cmask)[keep]))(z)
  np.testing.assert_allclose(gi, gs, atol=1e-15)
  assert np.all(gi[0] == 0)


@pytest.mark.parametrize("offset", [0.0, 100.0, -100.0, 1e4, -1e4, 1e5, -1e5])
def test_float32_accuracy_at_a_common_logit_offset(offset):
  rng = np.random.default_rng(1)
  z64 = rng.normal(size=(16, 50)) * 3 + offset
  y = rng.integers(0, 50, size=16)
  z32 = jnp.asarray(z64, jnp.float32)
  zz = np.asarray(z32, np.float64)       # the float32 inputs, exactly
  lp = zz - zz.max(-1, keepdims=True)
  lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
  want = -lp[np.arange(16), y]
  gwant = np.exp(lp) - np.eye(50)[y]
  err = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b)))
  mine = err(jxent.softmax_cross_entropy_with_integer_labels(z32, y), want)
  opt = err(optax.softmax_cross_entropy_with_integer_labels(z32, y), want)
  # PyTorch's form: log_softmax = (z - max) - log(sum(exp(z - max))), in float32.
  zs = np.asarray(z32) - np.asarray(z32).max(-1, keepdims=True)
  torch_like = -(zs - np.log(np.exp(zs).sum(-1, keepdims=True)))[np.arange(16), y]
  tor = err(torch_like, want)
  assert mine <= 2 * min(opt, tor) + 1e-6, (mine, opt, tor)
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y).sum())(z32)
  go = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).sum())(z32)
  assert err(g, gwant) <= 2 * err(go, gwant) + 1e-6
  invariance = err(jxent.softmax_cross_entropy_with_integer_labels(z32, y),
                   np.asarray(jxent.softmax_cross_entropy_with_integer_labels(
                       jnp.asarray(zz - offset, jnp.float32), y), np.float64))  # exact shift
  assert invariance <= 4e-6


def test_value_checks_do_not_break_serialization():
  f = jax.jit(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, Y))
  export.deserialize(export.export(f)(jnp.asarray(Z)).serialize())
  err, _ = jxent.checked(jxent.softmax_cross_entropy_with_integer_labels)(
      jnp.asarray(Z), jnp.asarray(np.where(np.arange(N) == 0, C, Y)))
  assert "out of range" in str(err.get())


def test_information_quantities_in_every_argument_against_numpy_formulas():
  # Values and gradients (non-uniform cotangents) of the information functions against
  # formulas written here in NumPy/JAX float64, options included: temperature (traced, also
  # differentiated), beta, base, where, reductions.
  z, z2 = jnp.asarray(Z), jnp.asarray(RNG.normal(size=(N, C)))
  p, q = jax.nn.softmax(z), jax.nn.softmax(z2)
  t = jnp.asarray(T)
  cot = jnp.asarray(COT)
  temp = 0.7

  def lsm(x, tau):
    x = x / tau
    return x - jax.scipy.special.logsumexp(x, axis=-1, keepdims=True)

  def kl_ref(zp, zq, tau):
    lp, lq = lsm(zp, tau), lsm(zq, tau)
    return jnp.sum(cot * jnp.sum(jnp.exp(lp) * (lp - lq), -1))

  def js_ref(zp, zq, tau, beta=0.3):
    lp, lq = lsm(zp, tau), lsm(zq, tau)
    m = beta * jnp.exp(lp) + (1 - beta) * jnp.exp(lq)
    return jnp.sum(cot * (beta * jnp.sum(jnp.exp(lp) * (lp - jnp.log(m)), -1)
                          + (1 - beta) * jnp.sum(jnp.exp(lq) * (lq - jnp.log(m)), -1)))

  def tv_ref(zp, zq, tau):
    return jnp.sum(cot * 0.5 * jnp.sum(jnp.abs(jnp.exp(lsm(zp, tau)) - jnp.exp(lsm(zq, tau))),
                                       -1))

  def lp_ref(zz, tau):
    return jnp.sum(cot * jnp.where(KEEP, lsm(zz, tau)[jnp.arange(N), Y], 0))

  pairs = {
      "kl_from_logits": (lambda a, b, tau: jnp.sum(cot * jxent.kl_divergence_from_logits(
          a, b, temperature=tau)), kl_ref, (z, z2, temp)),
      "js_from_logits": (lambda a, b, tau: jnp.sum(cot * jxent.js_divergence_from_logits(
          a, b, beta=0.3, temperature=tau)), js_ref, (z, z2, temp)),
      "tv_from_logits": (lambda a, b, tau: jnp.sum(cot * jxent.tv_distance_from_logits(
          a, b, temperature=tau)), tv_ref, (z, z2, temp)),
      "tv": (lambda a, b: jnp.sum(cot * jxent.tv_distance(a, b)),
             lambda a, b: jnp.sum(cot * 0.5 * jnp.sum(jnp.abs(a - b), -1)), (p, q)),
      "generalized_kl": (lambda a, b: jnp.sum(cot * jxent.generalized_kl_divergence(a, b)),
                         lambda a, b: jnp.sum(cot * jnp.sum(a * jnp.log(a / b) - a + b, -1)),
                         (2 * p, 3 * q)),
      "poly": (lambda a, b, e: jnp.sum(cot * jxent.poly_loss_cross_entropy(a, b, epsilon=e)),
               lambda a, b, e: jnp.sum(cot * (-jnp.sum(b * lsm(a, 1.0), -1) + e * (
                   1 - jnp.sum(b * jnp.exp(lsm(a, 1.0)), -1)))), (z, t, 1.7)),
      "log_probs": (lambda a, tau: jnp.sum(cot * jxent.log_probs(
          a, jnp.asarray(Y), where=KEEP, temperature=tau)), lp_ref, (z, temp)),
      "entropy_bits": (lambda a: jnp.sum(cot * jxent.entropy(a, base=2)),
                       lambda a: jnp.sum(cot * -jnp.sum(a * jnp.log2(a), -1)), (p,)),
      "js": (lambda a, b: jnp.sum(cot * jxent.js_divergence(a, b)),
             lambda a, b: jnp.sum(cot * (0.5 * jnp.sum(a * jnp.log(2 * a / (a + b)), -1)
                                         + 0.5 * jnp.sum(b * jnp.log(2 * b / (a + b)), -1))),
             (p, q)),
      "binary_entropy": (lambda a: jnp.sum(cot[:, None] * jxent.binary_entropy(a)),
                         lambda a: jnp.sum(cot[:, None] * -(a * jnp.log(a) + (1 - a)
                                                            * jnp.log(1 - a))), (q,)),
      "self_information_bits": (lambda a: jnp.sum(cot[:, None] * jxent.self_information(
          a, base=2)), lambda a: jnp.sum(cot[:, None] * -jnp.log2(a)), (q,)),
      "categorical_mean": (lambda a, b: jxent.categorical_cross_entropy(
          a, b, where=KEEP, reduction="mean"),
          lambda a, b: jnp.sum(jnp.where(KEEP, -jnp.sum(b * jnp.log(a), -1), 0)) / KEEP.sum(),
          (q, t)),
      "mse_where": (lambda a, b: jxent.mean_squared_error(a, b, where=jnp.asarray(B) > 0.5),
                    lambda a, b: jnp.sum(jnp.where(jnp.asarray(B) > 0.5, (a - b) ** 2, 0))
                    / jnp.sum(jnp.asarray(B) > 0.5), (q, p)),
      # every argument of the likelihoods: mean, target, variance; log-rate, count
      "gaussian_nll": (lambda a, b, c: jnp.sum(cot[:, None] * jxent.gaussian_nll_loss(
          a, b, c, full=True, reduction="none")),
          lambda a, b, c: jnp.sum(cot[:, None] * (0.5 * jnp.log(2 * np.pi * c)
                                                  + (b - a) ** 2 / (2 * c))), (z, t, 2 * q)),
      "poisson_nll": (lambda a, b: jnp.sum(cot[:, None] * jxent.poisson_nll_loss(
          a, b, full=True, reduction="none")),
          lambda a, b: jnp.sum(cot[:, None] * (jnp.exp(a) - b * a
                                               + jax.scipy.special.gammaln(b + 1))),
          (z, 3 * t)),
  }
  for name, (f, ref, args) in pairs.items():
    np.testing.assert_allclose(f(*args), ref(*args), rtol=1e-12, err_msg=name)
    argn = tuple(range(len(args)))
    for i, (a, b) in enumerate(zip(jax.grad(f, argn)(*args), jax.grad(ref, argn)(*args))):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13, err_msg=f"{name} d{i}")
