"""Information quantities against float64 SciPy/NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sp
import scipy.stats as st
from jax.experimental import checkify
from jax.test_util import check_grads

import jxent

RNG = np.random.default_rng(0)


def _probs(shape, zeros=0.0, rng=RNG):
  """Random distributions along the last axis, with a fraction of exact zeros."""
  x = rng.gamma(0.7, size=shape)
  if zeros:
    x = np.where(rng.uniform(size=shape) < zeros, 0.0, x)
    x[..., 0] += 0.1  # no all-zero rows
  return (x / x.sum(-1, keepdims=True)).astype(np.float64)


P = _probs((8, 7), zeros=0.3)
Q = _probs((8, 7))
Q_ZERO = _probs((8, 7), zeros=0.3, rng=np.random.default_rng(1))


def _np_logsoftmax(z):
  z = np.asarray(z, np.float64)
  m = np.max(z, -1, keepdims=True)
  return z - m - np.log(np.sum(np.exp(z - m), -1, keepdims=True))


# ------------------------------------------------------------------ values vs SciPy


@pytest.mark.parametrize("base", [None, 2, 10])
def test_entropy_matches_scipy(base):
  got = jax.jit(lambda p: jxent.entropy(p, base=base))(P.astype(np.float32))
  np.testing.assert_allclose(got, st.entropy(P, base=base, axis=-1), rtol=2e-6, atol=1e-6)


def test_entropy_axis():
  got = jxent.entropy(P.T.astype(np.float32), axis=0)
  np.testing.assert_allclose(got, sp.entr(P).sum(-1), rtol=2e-6)


# Every function that takes ``axis`` or ``base``, in float64: with the class axis first
# (``axis=0`` on transposed inputs) the values and every float argument's gradient under a
# non-uniform cotangent are the default layout's, transposed; with ``base=2`` they are the
# nats' divided by log 2. (The default layout and nats are checked against SciPy/NumPy
# formulas elsewhere in this file and in test_transforms.py.)
_ROWS, _COLS = 4, 6
_AX = dict(p=_probs((_ROWS, _COLS)), q=_probs((_ROWS, _COLS), rng=np.random.default_rng(2)),
           z=RNG.normal(size=(_ROWS, _COLS)) * 2, zq=RNG.normal(size=(_ROWS, _COLS)),
           w=RNG.uniform(0.5, 2.0, size=_COLS))
_AX_Y = RNG.integers(0, _COLS, size=_ROWS)
_AXIS_CASES = {  # name: (function of (float arrays..., **options), its float inputs)
    "entropy": (jxent.entropy, ("p",)),
    "entropy_from_logits": (jxent.entropy_from_logits, ("z",)),
    "cross_entropy": (jxent.cross_entropy, ("p", "q")),
    "cross_entropy_from_logits": (jxent.cross_entropy_from_logits, ("z", "zq")),
    "kl_divergence": (jxent.kl_divergence, ("p", "q")),
    "kl_divergence_from_logits": (
        lambda a, b, **kw: jxent.kl_divergence_from_logits(a, b, temperature=1.5, **kw),
        ("z", "zq")),
    "js_divergence": (jxent.js_divergence, ("p", "q")),
    "js_divergence_from_logits": (
        lambda a, b, **kw: jxent.js_divergence_from_logits(a, b, beta=0.3, temperature=1.5,
                                                           **kw), ("z", "zq")),
    "tv_distance": (jxent.tv_distance, ("p", "q")),
    "tv_distance_from_logits": (
        lambda a, b, **kw: jxent.tv_distance_from_logits(a, b, temperature=1.5, **kw),
        ("z", "zq")),
    "generalized_kl_divergence": (
        lambda a, b, **kw: jxent.generalized_kl_divergence(2 * a, 3 * b, **kw), ("p", "q")),
    "poly_loss_cross_entropy": (
        lambda z, t, **kw: jxent.poly_loss_cross_entropy(z, t, epsilon=-0.7, **kw),
        ("z", "q")),
    "log_probs": (lambda z, **kw: jxent.log_probs(z, _AX_Y, temperature=1.5, **kw), ("z",)),
    "categorical_cross_entropy": (jxent.categorical_cross_entropy, ("p", "q")),
    "softmax_cross_entropy": (
        lambda z, t, **kw: jxent.softmax_cross_entropy(
            z, t, label_smoothing=0.1, z_loss=1e-3, class_weights=jnp.asarray(_AX["w"]), **kw),
        ("z", "q")),
    "grads.softmax_cross_entropy_grad": (jxent.grads.softmax_cross_entropy_grad, ("z", "q")),
}
_BASE_CASES = {n: c for n, c in _AXIS_CASES.items()
               if n not in ("log_probs", "categorical_cross_entropy", "softmax_cross_entropy",
                            "grads.softmax_cross_entropy_grad", "tv_distance",
                            "tv_distance_from_logits", "poly_loss_cross_entropy")}


def _value_and_grads(fn, args, cot, **kw):
  f = lambda *a: fn(*a, **kw)
  grads = jax.grad(lambda c, *a: jnp.sum(c * f(*a)), argnums=tuple(range(1, len(args) + 1)))
  return jax.jit(lambda c, *a: (f(*a), grads(c, *a)))(cot, *args)


@pytest.mark.parametrize("name", sorted(_AXIS_CASES))
def test_axis_moves_values_and_gradients(name):
  fn, keys = _AXIS_CASES[name]
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(_AX[k]) for k in keys)
    shape = jax.eval_shape(fn, *args).shape  # [rows], or the gradient helper's [rows, classes]
    cot = jnp.asarray(1.2 + np.cos(np.arange(np.prod(shape))).reshape(shape))
    out, grads = _value_and_grads(fn, args, cot)
    out_t, grads_t = _value_and_grads(fn, tuple(a.T for a in args), cot.T, axis=0)
    out_t = out_t.T
  np.testing.assert_allclose(out_t, out, rtol=1e-12, atol=1e-15)
  for g_t, g in zip(grads_t, grads):
    assert np.any(np.asarray(g) != 0)
    np.testing.assert_allclose(np.asarray(g_t).T, g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", sorted(_BASE_CASES) + ["self_information", "binary_entropy"])
def test_base_two_divides_values_and_gradients_by_log_two(name):
  if name in ("self_information", "binary_entropy"):
    fn, keys = getattr(jxent, name), ("p",)
  else:
    fn, keys = _BASE_CASES[name]
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(_AX[k]) for k in keys)
    shape = jax.eval_shape(fn, *args).shape
    cot = jnp.asarray(1.2 + np.cos(np.arange(np.prod(shape))).reshape(shape))
    out, grads = _value_and_grads(fn, args, cot)
    bits, grads_2 = _value_and_grads(fn, args, cot, base=2)
  np.testing.assert_allclose(bits, np.asarray(out) / np.log(2), rtol=1e-13, atol=1e-15)
  for g2, g in zip(grads_2, grads):
    assert np.any(np.asarray(g) != 0)
    np.testing.assert_allclose(g2, np.asarray(g) / np.log(2), rtol=1e-13, atol=1e-15)


def test_self_information_values():
  p = np.array([0.7, 0.2, 0.1, 1.0, 0.0])
  got = jxent.self_information(p.astype(np.float32))
  with np.errstate(divide="ignore"):
    np.testing.assert_allclose(got, -np.log(p), rtol=1e-6)
  assert got[-1] == np.inf
  np.testing.assert_allclose(jxent.self_information(0.5, base=2), 1.0)


def test_binary_entropy_matches_reference():
  p = np.concatenate([[0.0, 1.0, 0.5, 1e-30], RNG.uniform(size=20)])
  ref = sp.entr(p) + sp.entr(1 - p)
  np.testing.assert_allclose(jxent.binary_entropy(p.astype(np.float32)), ref, atol=1e-6)
  np.testing.assert_allclose(jxent.binary_entropy(0.5, base=2), 1.0)
  g = jax.grad(lambda p: jxent.binary_entropy(p).sum())(jnp.array([0.0, 1.0, 0.25]))
  np.testing.assert_allclose(g[:2], 0.0)
  np.testing.assert_allclose(g[2], np.log(0.75 / 0.25), rtol=1e-6)


@pytest.mark.parametrize("q", [Q, Q_ZERO], ids=["q_positive", "q_with_zeros"])
def test_kl_matches_rel_entr(q):
  got = jax.jit(jxent.kl_divergence)(P.astype(np.float32), q.astype(np.float32))
  ref = sp.rel_entr(P, q).sum(-1)
  finite = np.isfinite(ref)
  np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[~finite] == np.inf)
  if q is Q_ZERO:
    assert (~finite).any() and finite.any()  # both cases exercised


def test_cross_entropy_and_identity():
  p32, q32 = P.astype(np.float32), Q.astype(np.float32)
  h = jxent.entropy(p32)
  hpq = jxent.cross_entropy(p32, q32)
  d = jxent.kl_divergence(p32, q32)
  ref = -(sp.xlogy(P, Q)).sum(-1)
  np.testing.assert_allclose(hpq, ref, rtol=2e-6)
  np.testing.assert_allclose(hpq - h, d, atol=2e-6)  # D = H(p,q) - H(p)
  assert np.all(np.asarray(d) >= 0)
  assert np.all(np.asarray(h) <= np.log(P.shape[-1]) + 1e-6)
  np.testing.assert_allclose(jxent.kl_divergence(p32, p32), 0.0, atol=1e-6)


def test_cross_entropy_inf_where_q_is_zero():
  p = jnp.array([0.5, 0.5, 0.0])
  assert jxent.cross_entropy(p, jnp.array([1.0, 0.0, 0.0])) == np.inf
  # p_i = 0 terms ignore q_i, even q_i = 0.
  np.testing.assert_allclose(jxent.cross_entropy(p, jnp.array([0.5, 0.5, 0.0])), np.log(2))


def test_js_divergence():
  m = 0.5 * (P + Q)
  ref = 0.5 * (sp.rel_entr(P, m).sum(-1) + sp.rel_entr(Q, m).sum(-1))
  got = jxent.js_divergence(P.astype(np.float32), Q.astype(np.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jxent.js_divergence(Q.astype(np.float32), P.astype(np.float32)),
                             got, rtol=1e-6)
  disjoint = jxent.js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), base=2)
  np.testing.assert_allclose(disjoint, 1.0)


def test_tv_distance():
  ref = 0.5 * np.abs(P - Q).sum(-1)
  tv = jax.jit(jxent.tv_distance)
  got = tv(P.astype(np.float32), Q.astype(np.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # symmetric, to the last bit: the same program with its arguments swapped (an eager call
  # may sum in another order: one ulp apart on a GPU)
  np.testing.assert_array_equal(tv(Q.astype(np.float32), P.astype(np.float32)), got)
  assert np.all(np.asarray(got) <= np.sqrt(sp.rel_entr(P, Q).sum(-1) / 2))  # Pinsker
  assert float(jxent.tv_distance(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))) == 1.0
  assert float(jxent.tv_distance(Q[0], Q[0])) == 0.0
  # no distribution (an entry outside [0, 1], a row without mass): NaN, not a distance
  bad = jxent.tv_distance(jnp.array([[1.5, -0.5], [0.0, 0.0], [0.5, 0.5]]),
                          jnp.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]))
  assert np.all(np.isnan(bad[:2])) and bad[2] == 0
  # the gradient: sign(p - q) / 2 in p, its negative in q, 0 where they agree
  p, q = jnp.array([0.5, 0.2, 0.3]), jnp.array([0.3, 0.2, 0.5])
  g_p, g_q = jax.grad(lambda a, b: 1.7 * jxent.tv_distance(a, b), argnums=(0, 1))(p, q)
  np.testing.assert_allclose(g_p, 1.7 * np.array([0.5, 0.0, -0.5]))
  np.testing.assert_allclose(g_q, -np.asarray(g_p))


def test_generalized_kl_divergence():
  # Unnormalised measures with zeros in p (a term of q alone) and in q where p is 0, against
  # SciPy's elementwise kl_div (x log(x/y) - x + y) in float64.
  rng = np.random.default_rng(3)
  p = 3 * _probs((8, 7), zeros=0.3, rng=rng) * rng.uniform(0.2, 4.0, size=(8, 1))
  q = np.where((p == 0) & (rng.uniform(size=p.shape) < 0.3), 0.0,
               rng.gamma(1.0, size=p.shape))
  f = jax.jit(jxent.generalized_kl_divergence)
  got = f(p.astype(np.float32), q.astype(np.float32))
  np.testing.assert_allclose(got, sp.kl_div(p, q).sum(-1), rtol=2e-6)
  np.testing.assert_allclose(jxent.generalized_kl_divergence(p.astype(np.float32),
                                                             q.astype(np.float32), axis=None),
                             sp.kl_div(p, q), rtol=2e-6, atol=1e-7)
  # Optax's (log q, p) where q > 0; the KL divergence where both are distributions.
  pos = q + (q == 0)
  np.testing.assert_allclose(
      jxent.generalized_kl_divergence(p.astype(np.float32), pos.astype(np.float32)),
      optax.losses.generalized_kl_divergence(jnp.log(pos.astype(np.float32)),
                                             p.astype(np.float32)), rtol=2e-6)
  np.testing.assert_allclose(jxent.generalized_kl_divergence(P, Q),
                             jxent.kl_divergence(P, Q), rtol=1e-6, atol=1e-7)
  # Edges: 0 at p == q and for two zero measures; +inf where p > 0 meets q = 0; NaN for a
  # negative or NaN entry.
  edge = jxent.generalized_kl_divergence(
      jnp.array([[1.0, 2.0], [0.0, 0.0], [1.0, 0.5], [-0.5, 1.0], [jnp.nan, 1.0], [0.0, 1.0]]),
      jnp.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.5], [1.0, 1.0], [1.0, 1.0], [-1.0, 1.0]]))
  np.testing.assert_array_equal(edge[:3], [0.0, 0.0, np.inf])
  assert np.all(np.isnan(edge[3:]))
  # Gradients under a non-uniform cotangent: log(p/q) in p (-log q - 1 where p = 0), 1 - p/q
  # in q; second order by finite differences on positive inputs.
  with jax.enable_x64(True):
    qq = q + 0.1
    cot = np.linspace(0.5, 1.5, 8)[:, None]
    g_p, g_q = jax.grad(lambda a, b: jnp.sum(jnp.asarray(cot[:, 0]) *
                                             jxent.generalized_kl_divergence(a, b)),
                        argnums=(0, 1))(jnp.asarray(p), jnp.asarray(qq))
    safe = np.where(p > 0, p, 1)
    np.testing.assert_allclose(g_p, cot * np.where(p > 0, np.log(safe / qq),
                                                   -np.log(qq) - 1), rtol=1e-12)
    np.testing.assert_allclose(g_q, cot * (1 - p / qq), rtol=1e-12)
    check_grads(jxent.generalized_kl_divergence, (jnp.asarray(p + 0.05), jnp.asarray(qq)),
                order=2, modes=["fwd", "rev"])


def test_tv_distance_from_logits():
  with jax.enable_x64(True):
    t = 1.5
    lp, lq = _np_logsoftmax(Z / t), _np_logsoftmax(Z2 / t)
    p, q = np.exp(lp), np.exp(lq)
    a, b = jnp.asarray(Z), jnp.asarray(Z2)
    cot = jnp.asarray(np.linspace(0.4, 1.6, Z.shape[0]))
    f = jax.jit(lambda a, b: jxent.tv_distance_from_logits(a, b, temperature=t))
    np.testing.assert_allclose(f(a, b), 0.5 * np.abs(p - q).sum(-1), rtol=1e-13)
    g_a, g_b = jax.grad(lambda a, b: jnp.sum(cot * f(a, b)), argnums=(0, 1))(a, b)
    s = np.sign(p - q)
    c = np.asarray(cot)[:, None] / t
    np.testing.assert_allclose(g_b, -0.5 * c * q * (s - np.sum(q * s, -1, keepdims=True)),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(g_a, 0.5 * c * p * (s - np.sum(p * s, -1, keepdims=True)),
                               rtol=1e-12, atol=1e-15)
  # masks and extremes: disjoint supports give 1; |z| = 1e4 stays finite; no distribution
  # (a row of -inf) gives NaN
  z = jnp.array([[0.0, -jnp.inf], [1e4, -1e4], [-jnp.inf, -jnp.inf]])
  zq = jnp.array([[-jnp.inf, 0.0], [-1e4, 1e4], [0.0, 0.0]])
  got = jxent.tv_distance_from_logits(z, zq)
  assert got[0] == 1.0 and got[1] == 1.0 and np.isnan(got[2])
  g = jax.grad(lambda a: jnp.sum(jxent.tv_distance_from_logits(a, zq)[:2]))(z)
  assert np.all(np.isfinite(g[:2]))
  assert jxent.tv_distance_from_logits(jnp.asarray(Z, jnp.bfloat16),
                                       jnp.asarray(Z2, jnp.bfloat16)).dtype == jnp.float32


def test_seed_article_numbers():
  p = jnp.array([0.7, 0.2, 0.1])
  np.testing.assert_allclose(jxent.self_information(p), [0.3567, 1.6094, 2.3026], atol=1e-4)
  np.testing.assert_allclose(jxent.entropy(p), 0.80182, atol=1e-5)


# ------------------------------------------------------------------------- logits


Z = RNG.normal(size=(8, 7)) * 3
Z2 = RNG.normal(size=(8, 7)) * 3


def test_from_logits_match_references():
  lp, lq = _np_logsoftmax(Z), _np_logsoftmax(Z2)
  p, q = np.exp(lp), np.exp(lq)
  z32, z232 = Z.astype(np.float32), Z2.astype(np.float32)
  np.testing.assert_allclose(jxent.entropy_from_logits(z32), st.entropy(p, axis=-1), rtol=2e-5)
  np.testing.assert_allclose(
      jxent.kl_divergence_from_logits(z32, z232), sp.rel_entr(p, q).sum(-1), rtol=2e-5,
      atol=1e-6)
  np.testing.assert_allclose(
      jxent.cross_entropy_from_logits(z32, z232), -(p * lq).sum(-1), rtol=2e-5)
  np.testing.assert_allclose(
      jxent.entropy_from_logits(z32, base=2), st.entropy(p, base=2, axis=-1), rtol=2e-5)


def test_logits_with_masked_entries():
  z = jnp.array([[1.0, -jnp.inf, 2.0, 0.5], [-jnp.inf, -jnp.inf, 3.0, 3.0]])
  ref = st.entropy(np.exp(_np_logsoftmax(np.where(np.isinf(z), -1e30, z))), axis=-1)
  np.testing.assert_allclose(jxent.entropy_from_logits(z), ref, rtol=1e-6)
  g = jax.grad(lambda z: jxent.entropy_from_logits(z).sum())(z)
  assert np.all(np.isfinite(g))
  assert g[0, 1] == 0 and g[1, 0] == 0 and g[1, 1] == 0
  # p masks a class that q keeps: finite; q masks a class p keeps: +inf.
  zq = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -jnp.inf]])
  kl = jxent.kl_divergence_from_logits(z, zq)
  assert np.isfinite(kl[0]) and kl[1] == np.inf
  g = jax.grad(lambda a, b: jxent.kl_divergence_from_logits(a, b)[0], argnums=(0, 1))(z, zq)
  assert all(np.all(np.isfinite(x[0])) for x in g)


def test_logits_extreme_values():
  z = jnp.array([1e4, -1e4, 0.0])
  assert np.isfinite(jxent.entropy_from_logits(z))
  np.testing.assert_allclose(jxent.entropy_from_logits(z), 0.0, atol=1e-6)
  np.testing.assert_allclose(
      jxent.cross_entropy_from_logits(z, jnp.array([0.0, 1e4, 0.0])), 1e4, rtol=1e-6)
  g = jax.grad(lambda z: jxent.kl_divergence_from_logits(z, -z))(z)
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------- gradients


def test_zero_probabilities_give_zero_gradient():
  p = jnp.array([0.0, 0.3, 0.7])
  q = jnp.array([0.0, 0.5, 0.5])
  g_h = jax.grad(jxent.entropy)(p)
  g_p, g_q = jax.grad(jxent.kl_divergence, argnums=(0, 1))(p, q)
  g_ce = jax.grad(jxent.cross_entropy, argnums=1)(p, q)
  for g in (g_h, g_p, g_q, g_ce):
    assert np.all(np.isfinite(g))
    assert g[0] == 0
  # Non-zero entries: d(-p log p)/dp = -log p - 1, d D/dq = -p/q.
  np.testing.assert_allclose(g_h[1:], -np.log([0.3, 0.7]) - 1, rtol=1e-6)
  np.testing.assert_allclose(g_q[1:], -np.array([0.3, 0.7]) / 0.5, rtol=1e-6)


def test_check_grads_probabilities():
  # Float64 finite differences, both modes, to second order, under a non-uniform cotangent;
  # jitted (each derivative program compiled once). The second differences near small
  # probabilities (curvature ~ 1/q) are good to ~1e-5, hence 1e-4.
  with jax.enable_x64(True):
    p = jnp.asarray(_probs((3, 5)))
    q = jnp.asarray(_probs((3, 5), rng=np.random.default_rng(5)))
    cot = jnp.asarray([0.7, 1.3, 1.1])
    for f in (jxent.kl_divergence, jxent.cross_entropy, jxent.js_divergence):
      check_grads(jax.jit(lambda a, b, f=f: jnp.sum(cot * f(a, b))), (p, q), order=2,
                  modes=["fwd", "rev"], eps=1e-4, atol=1e-4, rtol=1e-4)
    check_grads(jax.jit(lambda a: jnp.sum(cot * jxent.entropy(a))), (p,), order=2,
                modes=["fwd", "rev"], eps=1e-4, atol=1e-4, rtol=1e-4)


def test_check_grads_logits_float64():
  with jax.enable_x64(True):
    a, b = jnp.asarray(Z[:3]), jnp.asarray(Z2[:3])
    for f in (jxent.kl_divergence_from_logits, jxent.cross_entropy_from_logits):
      check_grads(jax.jit(lambda a, b, f=f: f(a, b).sum()), (a, b), order=2, modes=["rev"])
    check_grads(jax.jit(lambda a: jxent.entropy_from_logits(a).sum()), (a,), order=2,
                modes=["rev"])
    assert jxent.entropy_from_logits(a).dtype == jnp.float64
    np.testing.assert_allclose(
        jxent.entropy_from_logits(a), st.entropy(np.exp(_np_logsoftmax(Z[:3])), axis=-1),
        rtol=1e-12)


# ------------------------------------------------------------ transformations, dtypes


def test_vmap_matches_batched():
  p, q = P.astype(np.float32), Q.astype(np.float32)
  np.testing.assert_allclose(jax.vmap(jxent.kl_divergence)(p, q), jxent.kl_divergence(p, q),
                             rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(jxent.entropy_from_logits)(Z.astype(np.float32)),
                             jxent.entropy_from_logits(Z.astype(np.float32)), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
  z = jnp.asarray(Z, dtype)
  got = jax.jit(jxent.entropy_from_logits)(z)
  assert got.dtype == jnp.float32
  ref = st.entropy(np.exp(_np_logsoftmax(np.asarray(z.astype(jnp.float32)))), axis=-1)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  p = jnp.asarray(P, dtype)
  np.testing.assert_allclose(jxent.entropy(p), sp.entr(np.asarray(p, np.float64)).sum(-1),
                             rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda z: jxent.entropy_from_logits(z).sum())(z)
  assert g.dtype == dtype


# ----------------------------------------------------------------------- bad input


def test_shape_mismatch_raises_with_shapes():
  with pytest.raises(ValueError, match=r"p.shape=\(8, 7\).*q.shape=\(8, 6\)"):
    jxent.kl_divergence(P, Q[:, :6])
  with pytest.raises(ValueError, match="p_logits"):
    jax.jit(jxent.cross_entropy_from_logits)(Z, Z[:, :3])


def test_axis_out_of_range_raises():
  with pytest.raises(ValueError, match="axis=2 is out of range"):
    jxent.entropy(P, axis=2)
  with pytest.raises(ValueError, match="axis=-3"):
    jax.jit(lambda z: jxent.entropy_from_logits(z, axis=-3))(Z)


def test_non_floating_raises():
  with pytest.raises(TypeError, match="p must be a floating-point array, got dtype int32"):
    jxent.entropy(jnp.array([1, 0], jnp.int32))
  with pytest.raises(TypeError, match="logits"):
    jax.jit(jxent.entropy_from_logits)(jnp.array([1, 2], jnp.int32))


def test_bad_base_raises():
  with pytest.raises(ValueError, match="base"):
    jxent.entropy(P, base=1)
  with pytest.raises(ValueError, match="base"):
    jxent.entropy(P, base=-2)


def test_checkify_reports_invalid_probabilities():
  f = jxent.checked(jxent.kl_divergence)
  err, _ = jax.jit(f)(jnp.array([0.5, 0.7]), jnp.array([0.5, 0.5]))
  with pytest.raises(checkify.JaxRuntimeError, match="does not sum to one"):
    err.throw()
  err, _ = f(jnp.array([-0.5, 1.5]), jnp.array([0.5, 0.5]))
  with pytest.raises(checkify.JaxRuntimeError, match="negative"):
    err.throw()
  err, _ = f(jnp.array([0.5, 0.5]), jnp.array([0.5, 0.5]))
  err.throw()  # valid input: no error
  # Without checkify the check costs nothing and raises nothing.
  assert np.isfinite(jxent.entropy(jnp.array([0.5, 0.7])))


def test_nearly_one_hot_rows_keep_relative_accuracy():
  # The top class 12 .. 30 above the others: log p_top = -log1p(sum_{c != top} e^(z_c - z_top))
  # of -1e-6 .. -1e-13, and an entropy as small, to rtol 1e-6 against float64 (a logsumexp
  # of 1 + rest rounds both to 0 in float32), beside an ordinary row; the gradient of the
  # weighted log-probabilities stays onehot - p off the label to rtol 1e-5.
  z = np.array([[20.0, 0.0, -1.0, 2.0], [30.0, 1.0, 2.0, 3.0], [12.0, 0.0, 0.0, 0.0],
                [1e4 + 14.0, 1e4, 1e4 - 3.0, 1e4 + 1.0], [0.3, 0.1, -0.2, 0.0]], np.float32)
  y = np.array([0, 0, 0, 0, 1])
  zd = z.astype(np.float64)
  logp = zd - sp.logsumexp(zd, axis=1, keepdims=True)
  gap = zd - zd[:, :1]
  gap[:, 0] = -np.inf
  logp[:4, 0] = -np.log1p(np.sum(np.exp(gap[:4]), axis=1))
  p = np.exp(logp)
  ent = -np.sum(p * logp, axis=1)
  cot = np.linspace(0.5, 1.5, 5)
  f = jax.jit(lambda z: jxent.log_probs(z, y))
  np.testing.assert_allclose(f(z), logp[np.arange(5), y], rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jxent.entropy_from_logits)(z), ent, rtol=1e-6)
  g = np.asarray(jax.grad(lambda z: jnp.sum(jnp.asarray(cot, jnp.float32) * f(z)))(z))
  g_want = cot[:, None] * (np.eye(4)[y] - p)
  off = ~np.eye(4, dtype=bool)[y]
  np.testing.assert_allclose(g[off], g_want[off], rtol=1e-5)
