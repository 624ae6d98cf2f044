"""A Flax NNX MLP on scikit-learn's bundled digits (8x8 "MNIST-like"), trained with Optax on
``jxent.softmax_cross_entropy_with_integer_labels`` with label smoothing.

    python examples/flax_mnist_like.py
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import optax
from _data import digits
from flax import nnx

import jxent


class MLP(nnx.Module):
  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.out = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.hidden(x))))


def main(*, epochs: int = 30, batch_size: int = 64, label_smoothing: float = 0.1,
         seed: int = 0, verbose: bool = True) -> dict:
  x_train, y_train, x_test, y_test = digits()
  model = MLP(x_train.shape[1], 128, 10, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  def loss_fn(model, x, y):
    logits = model(x)
    return jxent.softmax_cross_entropy_with_integer_labels(
        logits, y, label_smoothing=label_smoothing, reduction="mean")

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def evaluate(model, x, y):
    logits = model(x)
    return jnp.mean(jnp.argmax(logits, -1) == y), jxent.softmax_cross_entropy_with_integer_labels(
        logits, y, reduction="mean")

  rng = np.random.default_rng(seed)
  n = len(y_train)
  t0 = time.perf_counter()
  for epoch in range(epochs):
    model.train()
    perm = rng.permutation(n)
    for i in range(0, n - batch_size + 1, batch_size):
      idx = perm[i:i + batch_size]
      loss = train_step(model, optimizer, x_train[idx], y_train[idx])
    if verbose and (epoch + 1) % 10 == 0:
      model.eval()
      acc, test_loss = evaluate(model, x_test, y_test)
      print(f"epoch {epoch + 1:3d}  train loss {float(loss):.4f}  test loss {float(test_loss):.4f}"
            f"  test accuracy {float(acc):.4f}")
  model.eval()
  acc, test_loss = evaluate(model, x_test, y_test)
  result = {"test_accuracy": float(acc), "test_loss": float(test_loss),
            "seconds": time.perf_counter() - t0}
  if verbose:
    print(f"digits MLP with label smoothing {label_smoothing}: test accuracy "
          f"{result['test_accuracy']:.4f} ({result['seconds']:.1f} s)")
  return result


if __name__ == "__main__":
  main()
