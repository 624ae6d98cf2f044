"""The walk-throughs behind ``python -m jxent demo`` and ``python -m jxent grads``.

Every number printed here is computed by jxent at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jxent
from jxent import grads


def _row(*cells, widths=(28, 12, 12)):
  return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))


def information_tour() -> dict:
  """Prints the information quantities of the seed example and returns them."""
  events = ["computer boots normally", "computer fails to boot", "computer explodes"]
  p = jnp.array([0.7, 0.2, 0.1])
  q = jnp.array([0.5, 0.3, 0.2])
  info = jxent.self_information(p)
  h = jxent.entropy(p)
  h_bits = jxent.entropy(p, base=2)
  d = jxent.kl_divergence(p, q)
  hpq = jxent.cross_entropy(p, q)

  print("1. Self-information I(x) = -log p(x)  (nats)")
  print("   " + _row("event", "p(x)", "I(x)"))
  for name, pi, ii in zip(events, np.asarray(p), np.asarray(info)):
    print("   " + _row(name, f"{pi:.1f}", f"{ii:.2f}"))
  rounded = float(np.sum(np.asarray(p) * np.round(np.asarray(info), 2)))
  print("\n2. Entropy H(p) = -sum p log p, the expected information")
  print(f"   H(p) = {float(h):.4f} nats = {float(h_bits):.4f} bits"
        f"   (by hand with rounded terms: 0.7*0.36 + 0.2*1.61 + 0.1*2.30 = {rounded:.3f})")
  print(f"   upper bound log n = {np.log(3):.4f} nats (uniform p); binary entropy of a fair coin"
        f" = {float(jxent.binary_entropy(jnp.array(0.5), base=2)):.1f} bit")
  print("\n3. KL divergence and cross-entropy, q = [0.5, 0.3, 0.2]")
  print(f"   D(p||q) = sum p log(p/q) = {float(d):.4f} nats")
  print(f"   H(p,q)  = -sum p log q   = {float(hpq):.4f} nats")
  print(f"   H(p,q) - H(p) = {float(hpq - h):.4f}  = D(p||q): "
        f"{'checked' if abs(float(hpq - h - d)) < 1e-6 else 'MISMATCH'}"
        f" (|difference| = {abs(float(hpq - h - d)):.1e})")
  print(f"   JS(p, q) = {float(jxent.js_divergence(p, q, base=2)):.4f} bits (symmetric, <= 1 bit)")

  # Single-label: the frog/mouse/cat example, label = class 1, prediction [0.3, 0.6, 0.1].
  pred = jnp.array([0.3, 0.6, 0.1])
  label = jnp.array([0.0, 1.0, 0.0])
  single = jxent.categorical_cross_entropy(pred, label)
  single_logits = jxent.softmax_cross_entropy_with_integer_labels(
      jnp.log(pred)[None], jnp.array([1])
  )[0]
  print("\n4. Single-label loss (softmax): label [0, 1, 0], prediction [0.3, 0.6, 0.1]")
  print(f"   -sum y log y_hat = -log 0.6 = {float(single):.4f}"
        f"   (from logits log(pred): {float(single_logits):.4f})")

  # Multi-label: cat/frog/mouse with n-hot label [0, 1, 1], sigmoid outputs [0.1, 0.7, 0.8].
  mpred = jnp.array([0.1, 0.7, 0.8])
  mlabel = jnp.array([0.0, 1.0, 1.0])
  per_node = jxent.binary_cross_entropy(mpred, mlabel)
  multi = jnp.sum(per_node)
  multi_logits = jxent.sigmoid_binary_cross_entropy(
      jax.scipy.special.logit(mpred), mlabel, reduction="sum"
  )
  print("\n5. Multi-label loss (sigmoid): label [0, 1, 1], prediction [0.1, 0.7, 0.8]")
  print("   per node: " + ", ".join(f"{float(v):.4f}" for v in per_node)
        + "  (-log 0.9, -log 0.7, -log 0.8)")
  print(f"   sum = {float(multi):.4f}   (from logits: {float(multi_logits):.4f})")
  return {
      "self_information": np.asarray(info),
      "entropy": float(h),
      "entropy_bits": float(h_bits),
      "kl": float(d),
      "cross_entropy": float(hpq),
      "single_label_loss": float(single),
      "multi_label_loss": float(multi),
  }


def gradient_tour(*, num_examples: int = 256, num_classes: int = 10, seed: int = 0,
                  verbose: bool = True) -> dict:
  """Checks each closed-form gradient of :mod:`jxent.grads` against ``jax.grad``.

  Returns the max absolute differences, keyed by derivation.
  """
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  z = 3 * jax.random.normal(k1, (num_examples, num_classes))
  y_int = jax.random.randint(k2, (num_examples,), 0, num_classes)
  y_soft = jax.nn.softmax(2 * jax.random.normal(k3, (num_examples, num_classes)))
  y_bin = (jax.random.uniform(k3, (num_examples, num_classes)) < 0.3).astype(jnp.float32)

  def diff(a, b):
    return float(jnp.max(jnp.abs(a - b)))

  results = {}
  g = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y_int).sum())(z)
  results["softmax CE, integer labels: softmax(z) - onehot(y)"] = diff(
      g, grads.softmax_cross_entropy_grad(z, jax.nn.one_hot(y_int, num_classes)))
  g = jax.grad(lambda z: jxent.softmax_cross_entropy(z, y_soft).sum())(z)
  results["softmax CE, soft labels: softmax(z) - y"] = diff(
      g, grads.softmax_cross_entropy_grad(z, y_soft))
  g = jax.grad(lambda z: jxent.sigmoid_binary_cross_entropy(z, y_bin).sum())(z)
  results["sigmoid BCE: sigmoid(z) - y"] = diff(
      g, grads.sigmoid_binary_cross_entropy_grad(z, y_bin))
  g = jax.grad(
      lambda z: 0.5 * jxent.mean_squared_error(jax.nn.sigmoid(z), y_bin, reduction="sum"))(z)
  results["MSE on sigmoid: (s - y) s (1 - s)"] = diff(g, grads.sigmoid_mse_grad(z, y_bin))
  h = jax.hessian(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
      z[None], y_int[:1])[0])(z[0])
  results["softmax CE Hessian: diag(p) - p p^T"] = diff(
      h, grads.softmax_cross_entropy_hessian(z[0]))

  if verbose:
    print(f"Closed-form gradients against jax.grad of jxent's losses "
          f"({num_examples} x {num_classes} random logits, float32):")
    for name, d in results.items():
      print(f"   {name:<52s} max |jax.grad - formula| = {d:.1e}")
    s = jax.nn.sigmoid(jnp.array([-8.0, -4.0, 0.0]))
    print("\n   Why MSE on a sigmoid learns slowly: for y = 1 and logits z = -8, -4, 0")
    ce = grads.sigmoid_binary_cross_entropy_grad(jnp.array([-8.0, -4.0, 0.0]), jnp.ones(3))
    mse = grads.sigmoid_mse_grad(jnp.array([-8.0, -4.0, 0.0]), jnp.ones(3))
    for zi, si, c, m in zip([-8, -4, 0], np.asarray(s), np.asarray(ce), np.asarray(mse)):
      print(f"   z = {zi:>3}: sigmoid = {si:.4f}   CE grad = {c:+.4f}   MSE grad = {m:+.6f}"
            f"   (ratio {m / c:.1e})")
    print("   The confidently wrong prediction gets the *smallest* MSE gradient: the sigmoid'"
          " factor s(1-s) vanishes.")
  return results
