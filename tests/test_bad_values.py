"""The contract for bad values (README, "Bad values"), function by function:

1. a finite, representable mathematical value comes out as that value (never NaN or inf);
2. an undefined one (NaN input, a kept label outside [0, C), a probability outside [0, 1], a
   distribution with no mass) is NaN, its gradient row NaN, the batch mean NaN; a true
   infinity is +inf;
3. dropped examples contribute exactly 0 to value and gradient, whatever they hold;
4. bad shapes raise at trace time naming the argument;
5. float64 stays float64.

Every case runs eagerly and under jit.
"""

from __future__ import annotations

import functools
import warnings
from functools import partial

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

import jxent
from jxent import _checks

N, C = 4, 5
RNG = np.random.default_rng(17)
Z = RNG.normal(size=(N, C)).astype(np.float32)
Y = np.array([1, 4, 0, 2])
T = RNG.dirichlet(np.ones(C), size=N).astype(np.float32)


def modes(f):
  return [f, jax.jit(f)]


def log_softmax64(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


@functools.cache
def _vocab_parallel(options, checks):
  # One compiled function per set of options (eager shard_map would compile every call) and
  # per value-check state (read when the function is traced).
  del checks
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  return jax.jit(jax.shard_map(
      partial(jxent.sharded.vocab_parallel_cross_entropy, axis_name="model", **dict(options)),
      mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P()))


def vocab_parallel(z, y, **kw):
  return _vocab_parallel(tuple(sorted(kw.items())), _checks._VALUE_CHECKS.get())(z, y)


INT_LOSSES = {
    "dense": lambda z, y, **kw: jxent.softmax_cross_entropy_with_integer_labels(z, y, **kw),
    "fused": lambda z, y, **kw: jxent.linear_cross_entropy(z, jnp.eye(C, dtype=z.dtype), y,
                                                           reduction="none", chunk_size=2, **kw),
    "sharded": vocab_parallel,
}


# ----------------------------------------------------------- 2: labels outside [0, C)


@pytest.mark.parametrize("kind", sorted(INT_LOSSES))
@pytest.mark.parametrize("bad_label", [C, 7, -1, -100])
def test_out_of_range_labels_are_nan_not_another_class(kind, bad_label):
  loss_fn = INT_LOSSES[kind]
  y = Y.copy()
  y[1] = bad_label
  want = -log_softmax64(Z)[np.arange(N), np.clip(y, 0, C - 1)]
  for f in modes(lambda z: loss_fn(z, jnp.asarray(y))):
    loss = np.asarray(f(jnp.asarray(Z)))
    assert np.isnan(loss[1])
    np.testing.assert_allclose(np.delete(loss, 1), np.delete(want, 1), rtol=1e-5)
  g = np.asarray(jax.grad(lambda z: jnp.sum(loss_fn(z, jnp.asarray(y))))(jnp.asarray(Z)))
  assert np.all(np.isnan(g[1])) and np.all(np.isfinite(np.delete(g, 1, axis=0)))
  # The mean cannot pass unnoticed; ignoring the padding value makes it well defined.
  assert np.isnan(np.mean(loss))
  ok = np.asarray(loss_fn(jnp.asarray(Z), jnp.asarray(y), ignore_index=bad_label))
  assert ok[1] == 0 and np.all(np.isfinite(ok))


def test_out_of_range_labels_reduced(impl):
  y = jnp.asarray(np.where(np.arange(N) == 2, -100, Y))
  for red in ("mean", "sum"):
    assert np.isnan(jxent.softmax_cross_entropy_with_integer_labels(Z, y, reduction=red))
    assert np.isnan(jxent.linear_cross_entropy(Z, jnp.eye(C), y, reduction=red))
    g = jax.grad(lambda z, red=red: jxent.softmax_cross_entropy_with_integer_labels(
        z, y, reduction=red))(jnp.asarray(Z))
    assert np.all(np.isnan(g[2])) and np.all(np.isfinite(np.delete(np.asarray(g), 2, 0)))


# --------------------------------------------------------------------- 2: NaN inputs


LOGIT_FNS = {
    "int": lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, jnp.asarray(Y)),
    "soft": lambda z: jxent.softmax_cross_entropy(z, jnp.asarray(T)),
    "soft-sum": lambda z: jxent.softmax_cross_entropy(z, jnp.asarray(T), reduction="sum")[None],
    "entropy_from_logits": jxent.entropy_from_logits,
    "kl_from_logits": lambda z: jxent.kl_divergence_from_logits(z, jnp.asarray(Z)),
    "kl_from_logits_q": lambda z: jxent.kl_divergence_from_logits(jnp.asarray(Z), z),
    "ce_from_logits": lambda z: jxent.cross_entropy_from_logits(z, jnp.asarray(Z)),
    "bce": lambda z: jnp.sum(jxent.sigmoid_binary_cross_entropy(z, jnp.asarray(T)), -1),
    "focal": lambda z: jnp.sum(jxent.sigmoid_focal_loss(z, jnp.asarray(T)), -1),
}


@pytest.mark.parametrize("name", sorted(LOGIT_FNS))
def test_a_nan_logit_gives_nan_not_a_number(name):
  z = Z.copy()
  z[1, 3] = np.nan
  for f in modes(LOGIT_FNS[name]):
    out = np.asarray(f(jnp.asarray(z)))
    if out.shape == (1,):
      assert np.isnan(out[0])
    else:
      assert np.isnan(out[1]) and np.all(np.isfinite(np.delete(out, 1)))


@pytest.mark.parametrize("name", ["int", "soft", "entropy_from_logits"])
def test_a_row_without_mass_is_nan(name):
  z = Z.copy()
  z[2] = -np.inf
  for f in modes(LOGIT_FNS[name]):
    out = np.asarray(f(jnp.asarray(z)))
    assert np.isnan(out[2]) and np.all(np.isfinite(np.delete(out, 2)))


def test_infinite_logits_take_their_limit():
  z = np.array([[np.inf, np.inf, 0.0], [np.inf, 1.0, 2.0]], np.float32)
  for f in modes(jxent.entropy_from_logits):
    np.testing.assert_allclose(f(jnp.asarray(z)), [np.log(2), 0.0], atol=1e-7)


# --------------------------------------------------------- 2: no probability at all


PROB_CASES = [
    ("self_information p=1.5", lambda: jxent.self_information(jnp.array([0.5, 1.5])), [1]),
    ("binary_entropy p=-0.1", lambda: jxent.binary_entropy(jnp.array([0.5, -0.1])), [1]),
    ("binary_cross_entropy p=1.5", lambda: jxent.binary_cross_entropy(
        jnp.array([0.5, 1.5]), jnp.array([1.0, 1.0])), [1]),
    ("binary_cross_entropy label 2", lambda: jxent.binary_cross_entropy(
        jnp.array([0.5, 0.5]), jnp.array([1.0, 2.0])), [1]),
    ("sigmoid_bce label 2", lambda: jxent.sigmoid_binary_cross_entropy(
        jnp.array([0.5, 0.5, 0.5]), jnp.array([1.0, 2.0, -1.0])), [1, 2]),
    ("sigmoid_bce label 2 summed", lambda: jxent.sigmoid_binary_cross_entropy(
        jnp.array([0.5, 0.5]), jnp.array([1.0, 2.0]), reduction="sum")[None], [0]),
    ("focal label -1", lambda: jxent.sigmoid_focal_loss(
        jnp.array([0.5, 0.5]), jnp.array([1.0, -1.0])), [1]),
    ("categorical sums to 3", lambda: jxent.categorical_cross_entropy(
        jnp.array([[0.2, 0.8], [1.0, 2.0]]), jnp.array([[0.0, 1.0], [0.0, 1.0]])), [1]),
    ("categorical NaN prob under zero label", lambda: jxent.categorical_cross_entropy(
        jnp.array([[0.2, 0.8], [jnp.nan, 1.0]]), jnp.array([[0.0, 1.0], [0.0, 1.0]])), [1]),
    ("entropy without mass", lambda: jxent.entropy(jnp.array([[0.5, 0.5], [0.0, 0.0]])), [1]),
    ("entropy entry 1.5", lambda: jxent.entropy(jnp.array([[0.5, 0.5], [1.5, -0.5]])), [1]),
    ("kl negative q", lambda: jxent.kl_divergence(
        jnp.array([[0.5, 0.5], [0.5, 0.5]]), jnp.array([[0.5, 0.5], [1.5, -0.5]])), [1]),
    ("cross_entropy NaN p", lambda: jxent.cross_entropy(
        jnp.array([[0.5, 0.5], [jnp.nan, 0.5]]), jnp.array([[0.5, 0.5], [0.5, 0.5]])), [1]),
    ("js no mass", lambda: jxent.js_divergence(
        jnp.array([[0.5, 0.5], [0.0, 0.0]]), jnp.array([[0.5, 0.5], [0.5, 0.5]])), [1]),
]


@pytest.mark.parametrize("case", PROB_CASES, ids=[c[0] for c in PROB_CASES])
def test_no_probability_gives_nan(case):
  _, fn, bad = case
  for f in modes(fn):
    out = np.asarray(f())
    assert np.all(np.isnan(out[bad])), out
    assert np.all(np.isfinite(np.delete(out, bad))), out


def test_true_infinities_stay_infinite(impl):
  assert jxent.self_information(jnp.array(0.0)) == np.inf
  assert jxent.kl_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])) == np.inf
  assert jxent.binary_cross_entropy(jnp.array([0.0]), jnp.array([1.0]))[0] == np.inf
  z = Z.copy()
  z[0, Y[0]] = -np.inf
  assert jxent.softmax_cross_entropy_with_integer_labels(z, Y)[0] == np.inf


# ------------------------------------------------------------- 3: dropped examples


def _dropped_cases():
  keep = np.array([True, False, True, True])
  y_ign = np.where(keep, Y, -100)
  h = jnp.asarray(Z)
  return {
      "int where": lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, Y, where=keep, label_smoothing=0.1, z_loss=1e-3),
      "int ignore_index": lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, y_ign, ignore_index=-100, class_weights=jnp.ones(C), label_smoothing=0.1),
      "int mean": lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, y_ign, ignore_index=-100, reduction="mean")[None],
      "soft where": lambda z: jxent.softmax_cross_entropy(z, T, where=keep, z_loss=1e-3),
      "soft mean": lambda z: jxent.softmax_cross_entropy(z, T, where=keep,
                                                         reduction="mean")[None],
      "bce where": lambda z: jnp.sum(jxent.sigmoid_binary_cross_entropy(
          z, T, where=keep[:, None]), -1),
      "bce mean": lambda z: jxent.sigmoid_binary_cross_entropy(
          z, T, where=jnp.broadcast_to(keep[:, None], z.shape), reduction="mean")[None],
      "focal where": lambda z: jnp.sum(jxent.sigmoid_focal_loss(z, T, where=keep[:, None]), -1),
      "mse where": lambda z: jnp.sum(jxent.mean_squared_error(
          z, T, where=keep[:, None], reduction="none"), -1),
      # On probabilities: the test's base array is softmax(Z) or sigmoid(Z) for these.
      "categorical where": lambda p: jxent.categorical_cross_entropy(p, T, where=keep),
      "binary where": lambda p: jnp.sum(jxent.binary_cross_entropy(
          p, T, where=keep[:, None]), -1),
      "fused": lambda z: jxent.linear_cross_entropy(z, jnp.eye(C), y_ign, ignore_index=-100,
                                                    reduction="none", chunk_size=2),
      "fused mean": lambda z: jxent.linear_cross_entropy(z, jnp.eye(C), y_ign,
                                                         ignore_index=-100)[None],
      "sharded": lambda z: vocab_parallel(z, jnp.asarray(y_ign), ignore_index=-100),
      "fused bias": lambda z: jxent.linear_cross_entropy(h, jnp.eye(C), y_ign,
                                                         ignore_index=-100,
                                                         bias=z[0], reduction="none"),
  }


DROPPED = _dropped_cases()


@pytest.mark.parametrize("name", sorted(DROPPED))
@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_dropped_examples_contribute_exactly_zero(name, poison):
  base = {"categorical where": np.asarray(jax.nn.softmax(Z)),
          "binary where": np.asarray(jax.nn.sigmoid(Z))}.get(name, Z)
  z = base.copy()
  z[1] = poison
  f = DROPPED[name]
  clean = base.copy()
  clean[1] = 0.5
  for fn in modes(f):
    out = np.asarray(fn(jnp.asarray(z)))
    ref = np.asarray(fn(jnp.asarray(clean)))
    assert np.all(np.isfinite(out)), out
    np.testing.assert_allclose(out, ref, rtol=1e-6)
  cot = jnp.asarray(np.linspace(0.5, 1.5, out.shape[0]))
  g = np.asarray(jax.grad(lambda z: jnp.sum(cot * f(z)))(jnp.asarray(z)))
  g_clean = np.asarray(jax.grad(lambda z: jnp.sum(cot * f(z)))(jnp.asarray(clean)))
  assert np.all(np.isfinite(g)), g
  if name != "fused bias":
    assert np.all(g[1] == 0)
  np.testing.assert_allclose(g, g_clean, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------- 1: extremes stay finite


def test_extreme_logits_with_smoothing_are_finite(impl):
  z = np.array([[3e38, -3e38], [-3e38, -3e38]], np.float32)
  y = np.array([0, 1])
  # (1 - eps) * 0 + eps * (lse - mean z) = 0.1 * 3e38; a uniform row gives log 2.
  want = np.array([0.1 * 3e38, np.log(2)])
  for f in modes(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z, y, label_smoothing=0.1)):
    np.testing.assert_allclose(f(jnp.asarray(z)), want, rtol=1e-6)
  onehot = np.eye(2, dtype=np.float32)[y]
  for f in modes(lambda z: jxent.softmax_cross_entropy(z, onehot, label_smoothing=0.1)):
    np.testing.assert_allclose(f(jnp.asarray(z)), want, rtol=1e-6)
  for f in modes(lambda z: jxent.linear_cross_entropy(z, jnp.eye(2), y, label_smoothing=0.1,
                                                      reduction="none")):
    np.testing.assert_allclose(f(jnp.asarray(z)), want, rtol=1e-6)
  for f in modes(jxent.entropy_from_logits):
    np.testing.assert_allclose(f(jnp.asarray(z)), [0.0, np.log(2)], atol=1e-7)


# ------------------------------------------------------------- 4: trace-time errors


@pytest.mark.parametrize("fn, match", [
    (lambda: jxent.softmax_cross_entropy_with_integer_labels(jnp.zeros((3, 0)),
                                                             jnp.zeros(3, int)), "logits"),
    (lambda: jxent.softmax_cross_entropy(jnp.zeros((3, 0)), jnp.zeros((3, 0))), "logits"),
    (lambda: jxent.entropy_from_logits(jnp.zeros((3, 0))), "logits"),
    (lambda: jxent.linear_cross_entropy(jnp.zeros((3, 4)), jnp.zeros((4, 0)),
                                        jnp.zeros(3, int)), "weight"),
    (lambda: jxent.softmax_cross_entropy_with_integer_labels([[0.0, 1.0]], [[0]]), "labels"),
    (lambda: jxent.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "labels"),
    (lambda: jax.jit(lambda c: jxent.linear_cross_entropy(
        jnp.zeros((2, 3)), jnp.zeros((3, 4)), jnp.zeros(2, int), logit_softcap=c))(1.0),
     "logit_softcap"),
])
def test_errors_name_the_argument(fn, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fn()


def test_lists_and_numpy_are_accepted_without_warnings():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    a = jxent.softmax_cross_entropy_with_integer_labels([[0.0, 1.0], [2.0, 0.5]], [1, 0])
    b = jxent.softmax_cross_entropy([[0.0, 1.0]], [[0.0, 1.0]], where=[True])
    c = jxent.sigmoid_binary_cross_entropy([0.0, 1.0], [0, 1], where=[True, False])
    d = jxent.linear_cross_entropy(np.ones((2, 3)), np.ones((3, 4)), [0, 3])
    e = jxent.entropy([0.5, 0.5])
  for x in (a, b, c, d, e):
    assert np.all(np.isfinite(x))


# --------------------------------------------------------------------- 5: float64


def test_float64_in_float64_out_everywhere(impl):
  with jax.enable_x64(True):
    z = jnp.asarray(RNG.normal(size=(N, C)))
    y = jnp.asarray(Y)
    lp = log_softmax64(z)
    want = -(0.9 * lp[np.arange(N), Y] + 0.1 * lp.mean(-1))
    lse = np.log(np.exp(np.asarray(z)).sum(-1))
    want = want + 1e-3 * lse**2
    outs = {
        "dense": jxent.softmax_cross_entropy_with_integer_labels(
            z, y, label_smoothing=0.1, z_loss=1e-3),
        "soft": jxent.softmax_cross_entropy(z, jnp.eye(C)[y], label_smoothing=0.1, z_loss=1e-3),
        "fused": jxent.linear_cross_entropy(z, jnp.eye(C), y, label_smoothing=0.1, z_loss=1e-3,
                                            reduction="none"),
        "sharded": vocab_parallel(z, y, label_smoothing=0.1, z_loss=1e-3),
    }
    for name, out in outs.items():
      assert out.dtype == jnp.float64, name
      np.testing.assert_allclose(out, want, rtol=1e-13, err_msg=name)
    g = jax.grad(lambda h: jxent.linear_cross_entropy(h, jnp.eye(C), y))(z)
    assert g.dtype == jnp.float64


# ------------------------------------------------- points 1-3 as a Hypothesis property


@st.composite
def _batches(draw):
  n = draw(st.integers(1, 4))
  c = draw(st.integers(1, 6))
  special = st.sampled_from([np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-40, 1e4, -1e4])
  finite = st.floats(-30, 30, width=32)
  z = draw(hnp.arrays(np.float32, (n, c), elements=st.one_of(finite, finite, finite, special)))
  y = draw(hnp.arrays(np.int64, (n,), elements=st.integers(-2, c + 1)))
  keep = draw(hnp.arrays(np.bool_, (n,)))
  return z, y, keep


def _expected(z, y, keep):
  """float64 reference per row: 0 dropped; NaN undefined; +inf, or the value."""
  n, c = z.shape
  out = np.zeros(n)
  for i in range(n):
    row = z[i].astype(np.float64)
    if not keep[i]:
      continue
    if not 0 <= y[i] < c or np.isnan(row).any() or np.all(row == -np.inf):
      out[i] = np.nan
      continue
    if np.isposinf(row).any():  # no finite logits give this distribution: undefined
      out[i] = np.nan
      continue
    if row[y[i]] == -np.inf:
      out[i] = np.inf
      continue
    m = row.max()
    out[i] = m - row[y[i]] + np.log(np.sum(np.exp(row - m)))
  return out


# Jitted: one program per shape (at most 24 of them), not every operation dispatched alone.
_int_loss = jax.jit(lambda z, y, keep: jxent.softmax_cross_entropy_with_integer_labels(
    z, y, where=keep))
_int_loss_grad = jax.jit(jax.grad(lambda z, y, keep: jnp.sum(_int_loss(z, y, keep))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_batches())
def test_property_integer_labels_against_float64(batch):
  z, y, keep = batch
  want = _expected(z, y, keep)
  got = np.asarray(_int_loss(jnp.asarray(z), jnp.asarray(y, jnp.int32), jnp.asarray(keep)),
                   np.float64)
  for i in range(z.shape[0]):
    if np.isnan(want[i]):
      assert np.isnan(got[i]), (z[i], y[i], got[i])
    elif np.isinf(want[i]) or want[i] > np.finfo(np.float32).max:  # not representable
      assert got[i] == np.inf, (z[i], y[i], got[i])
    else:
      assert np.isfinite(got[i]), (z[i], y[i], got[i])
      np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5 * max(1.0, abs(want[i])))
  g = np.asarray(_int_loss_grad(jnp.asarray(z), jnp.asarray(y, jnp.int32), jnp.asarray(keep)))
  assert np.all(g[~keep] == 0)
  fine = keep & np.isfinite(want) & np.all(np.isfinite(z), axis=1)
  assert np.all(np.isfinite(g[fine]))
  assert np.all(np.isnan(g[keep & np.isnan(want)]))


# ------------------------------------------- checkify reports every value problem


@pytest.mark.parametrize("fn, args, match", [
    (jxent.softmax_cross_entropy_with_integer_labels, (Z, np.array([0, 1, 7, 2])),
     "labels out of range"),
    (jxent.softmax_cross_entropy_with_integer_labels,
     (np.where(np.arange(C) == 2, np.nan, Z).astype(np.float32), Y), "logits contain NaN"),
    (jxent.softmax_cross_entropy_with_integer_labels,
     (np.where(np.arange(N)[:, None] == 1, -np.inf, Z).astype(np.float32), Y), "all -inf"),
    (jxent.softmax_cross_entropy, (Z, -T), "labels has negative"),
    (jxent.softmax_cross_entropy, (np.where(np.arange(C) == 0, np.nan, Z).astype(np.float32), T),
     "logits contain NaN"),
    (lambda h, y: jxent.linear_cross_entropy(h, jnp.eye(C), y), (Z, np.array([0, 1, 9, 2])),
     "labels out of range"),
    (lambda h, y: jxent.linear_cross_entropy(h, jnp.eye(C), y),
     (np.where(np.arange(C) == 0, np.nan, Z).astype(np.float32), Y), "hidden contain NaN"),
    (lambda z, y: vocab_parallel(z, y), (Z, np.array([0, 1, 9, 2])), "labels out of range"),
    (lambda z, y: vocab_parallel(z, y),
     (np.where(np.arange(C) == 0, np.nan, Z).astype(np.float32), Y), "logits"),
    (jxent.sigmoid_binary_cross_entropy, (Z, 2 * T), "labels has entries outside"),
    (jxent.sigmoid_binary_cross_entropy, (np.where(np.arange(C) == 0, np.nan, Z).astype(
        np.float32), T), "logits contain NaN"),
    (jxent.binary_cross_entropy, (np.full(3, 1.5, np.float32), np.ones(3, np.float32)),
     "probs has entries outside"),
    (jxent.entropy, (np.array([0.5, 0.7], np.float32),), "does not sum to one"),
    (jxent.kl_divergence, (np.array([0.5, 0.5], np.float32), np.array([1.5, -0.5], np.float32)),
     "q has negative"),
])
def test_checked_reports_each_value_problem_naming_the_argument(fn, args, match):
  err, _ = jax.jit(jxent.checked(fn))(*args)
  assert err.get() is not None and match in err.get(), err.get()


def test_checked_is_silent_on_good_inputs():
  for fn, args in ((jxent.softmax_cross_entropy_with_integer_labels, (Z, Y)),
                   (jxent.softmax_cross_entropy, (Z, T)),
                   (lambda h, y: jxent.linear_cross_entropy(h, jnp.eye(C), y), (Z, Y)),
                   (lambda z, y: vocab_parallel(z, y), (Z, Y)),
                   (jxent.sigmoid_binary_cross_entropy, (Z, T))):
    err, _ = jax.jit(jxent.checked(fn))(*args)
    assert err.get() is None, err.get()
