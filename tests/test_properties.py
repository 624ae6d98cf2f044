"""Properties that must hold for any input, checked with Hypothesis on a fixed shape (the
jitted functions compile once): information inequalities and identities, invariances of the
softmax cross-entropy, the gradient's row sum, and the fused loss against the unfused one.
(Sharded = unsharded is a property of the 8-device worker, tests/_sharded_worker.py.)"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent

N, C = 4, 6
SETTINGS = settings(max_examples=40, deadline=None)
finite = st.floats(-30, 30, allow_nan=False, width=32)
logits = hnp.arrays(np.float32, (N, C), elements=finite)
labels = hnp.arrays(np.int32, (N,), elements=st.integers(0, C - 1))


@st.composite
def distributions(draw, zeros=True):
  """Rows of a [N, C] probability table, some entries exactly 0 when ``zeros``."""
  z = draw(hnp.arrays(np.float64, (N, C), elements=st.floats(-8, 8)))
  if zeros:
    z = np.where(draw(hnp.arrays(np.bool_, (N, C))), -np.inf, z)
    z[:, 0] = np.maximum(z[:, 0], 0)  # at least one outcome with mass
  p = np.exp(z - z.max(axis=1, keepdims=True))
  return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


kl = jax.jit(jxent.kl_divergence)
ce = jax.jit(jxent.cross_entropy)
ent = jax.jit(jxent.entropy)
js = jax.jit(jxent.js_divergence)
int_ce = jax.jit(lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(
    z, y, label_smoothing=0.1))
soft_ce = jax.jit(jxent.softmax_cross_entropy)
int_grad = jax.jit(jax.grad(lambda z, y: jnp.sum(jnp.linspace(0.5, 2.0, N) *
                                                 jxent.softmax_cross_entropy_with_integer_labels(
                                                     z, y, label_smoothing=0.1))))


@SETTINGS
@given(distributions(), distributions(zeros=False))
def test_kl_is_nonnegative_and_is_cross_entropy_minus_entropy(p, q):
  d = np.asarray(kl(p, q))
  assert np.all(d >= -1e-6)
  np.testing.assert_allclose(d, np.asarray(ce(p, q)) - np.asarray(ent(p)), atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(kl(p, p)), 0, atol=1e-6)


@SETTINGS
@given(distributions(), distributions())
def test_js_lies_between_zero_and_log2_and_is_symmetric(p, q):
  d = np.asarray(js(p, q))
  assert np.all(d >= -1e-6) and np.all(d <= np.log(2) + 1e-6)
  np.testing.assert_allclose(d, np.asarray(js(q, p)), atol=1e-6)


@SETTINGS
@given(logits, labels, st.floats(-1e4, 1e4, width=32))
def test_softmax_ce_is_invariant_to_a_common_logit_shift(z, y, c):
  # Exact shift in float32: z + c rounded would change the logits themselves, so the shift
  # is applied to logits that are multiples of a power of two large enough to absorb it.
  z = np.round(z * 4) / 4
  c = np.float32(np.round(c))
  np.testing.assert_allclose(np.asarray(int_ce(z + c, y)), np.asarray(int_ce(z, y)),
                             rtol=1e-5, atol=1e-5)
  t = jax.nn.softmax(jnp.asarray(z[::-1]))
  np.testing.assert_allclose(np.asarray(soft_ce(z + c, t)), np.asarray(soft_ce(z, t)),
                             rtol=1e-5, atol=1e-5)


@SETTINGS
@given(logits, labels, st.permutations(range(C)), st.permutations(range(N)))
def test_softmax_ce_is_permutation_equivariant(z, y, classes, examples):
  classes, examples = np.asarray(classes), np.asarray(examples)
  inverse = np.argsort(classes)
  base = np.asarray(int_ce(z, y))
  # Relabelling the classes consistently leaves every loss unchanged ...
  np.testing.assert_allclose(np.asarray(int_ce(z[:, classes], inverse[y])), base,
                             rtol=1e-5, atol=1e-6)
  # ... and reordering the examples reorders the losses.
  np.testing.assert_allclose(np.asarray(int_ce(z[examples], y[examples])), base[examples],
                             rtol=1e-6, atol=1e-6)


@SETTINGS
@given(logits, labels)
def test_gradient_rows_sum_to_zero_and_equal_weighted_softmax_minus_target(z, y):
  g = np.asarray(int_grad(z, y), np.float64)
  np.testing.assert_allclose(g.sum(axis=1), 0, atol=1e-5)
  z64 = z.astype(np.float64)
  p = np.exp(z64 - z64.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  t = 0.9 * np.eye(C)[y] + 0.1 / C
  np.testing.assert_allclose(g, np.linspace(0.5, 2.0, N)[:, None] * (p - t), atol=2e-6)


D, V = 5, 11
fused = jax.jit(lambda h, w, y: jxent.linear_cross_entropy(h, w, y, reduction="none",
                                                           chunk_size=3))
unfused = jax.jit(lambda h, w, y: jxent.softmax_cross_entropy_with_integer_labels(h @ w, y))


@SETTINGS
@given(hnp.arrays(np.float32, (N, D), elements=st.floats(-3, 3, width=32)),
       hnp.arrays(np.float32, (D, V), elements=st.floats(-3, 3, width=32)),
       hnp.arrays(np.int32, (N,), elements=st.integers(0, V - 1)))
def test_fused_equals_unfused(h, w, y):
  np.testing.assert_allclose(np.asarray(fused(h, w, y)), np.asarray(unfused(h, w, y)),
                             rtol=1e-5, atol=1e-5)
