"""Multi-label (n-hot) classification with ``jxent.sigmoid_binary_cross_entropy``.

Each digit image gets three independent labels: {even, >= 5, prime}. One sigmoid node per
label; the loss is the sum over nodes of -y log s - (1 - y) log(1 - s) (averaged here).

    python examples/multilabel.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _data import digits

import jxent

LABELS = ("even", ">=5", "prime")


def n_hot(digits: np.ndarray) -> np.ndarray:
  return np.stack([digits % 2 == 0, digits >= 5, np.isin(digits, [2, 3, 5, 7])],
                  axis=-1).astype(np.float32)


def main(*, steps: int = 400, hidden: int = 64, seed: int = 0, verbose: bool = True) -> dict:
  x_train, y_train, x_test, y_test = digits()
  ytr, yte = n_hot(y_train), n_hot(y_test)
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  d = x_train.shape[1]
  params = {
      "w1": jax.random.normal(k1, (d, hidden)) * (2 / d) ** 0.5, "b1": jnp.zeros(hidden),
      "w2": jax.random.normal(k2, (hidden, 3)) * (1 / hidden) ** 0.5, "b2": jnp.zeros(3),
  }

  def logits_fn(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  def loss_fn(p, x, y):
    return jxent.sigmoid_binary_cross_entropy(logits_fn(p, x), y, reduction="mean")

  opt = optax.adam(1e-2)

  @jax.jit
  def fit(params):
    def step(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, x_train, ytr)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), None, steps)
    return p, losses

  params, losses = fit(params)
  pred = np.asarray(logits_fn(params, x_test) > 0)
  per_label = (pred == yte.astype(bool)).mean(0)
  exact = (pred == yte.astype(bool)).all(-1).mean()
  result = {"per_label_accuracy": dict(zip(LABELS, map(float, per_label))),
            "exact_match": float(exact), "final_train_loss": float(losses[-1])}
  if verbose:
    print(f"train loss {float(losses[0]):.4f} -> {float(losses[-1]):.4f} over {steps} steps")
    for name, acc in result["per_label_accuracy"].items():
      print(f"  test accuracy for label {name:<6s} {acc:.4f}")
    print(f"  all three labels right: {exact:.4f}")
  return result


if __name__ == "__main__":
  main()
