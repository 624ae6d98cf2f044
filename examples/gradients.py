"""The derivations of ``jxent.grads`` on one concrete example.

Softmax cross-entropy's gradient is y_hat - y; sigmoid BCE's is s - y; MSE on a sigmoid
carries the extra factor s (1 - s), which vanishes when the sigmoid saturates.

    python examples/gradients.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jxent
from jxent import grads


def main(verbose: bool = True) -> dict:
  # The single-label example: frog / mouse / cat, true class "mouse", prediction [0.3, 0.6, 0.1].
  logits = jnp.log(jnp.array([0.3, 0.6, 0.1]))
  label = jnp.array([0.0, 1.0, 0.0])
  autodiff = jax.grad(lambda z: jxent.softmax_cross_entropy(z, label))(logits)
  formula = grads.softmax_cross_entropy_grad(logits, label)
  # The multi-label example: cat / frog / mouse with n-hot [0, 1, 1] and sigmoids [0.1, 0.7, 0.8].
  z = jax.scipy.special.logit(jnp.array([0.1, 0.7, 0.8]))
  y = jnp.array([0.0, 1.0, 1.0])
  bce_autodiff = jax.grad(lambda z: jxent.sigmoid_binary_cross_entropy(z, y, reduction="sum"))(z)
  bce_formula = grads.sigmoid_binary_cross_entropy_grad(z, y)
  mse_autodiff = jax.grad(
      lambda z: 0.5 * jxent.mean_squared_error(jax.nn.sigmoid(z), y, reduction="sum"))(z)
  mse_formula = grads.sigmoid_mse_grad(z, y)
  # A confidently wrong node: z = -6 (s = 0.0025) with y = 1.
  wrong = jnp.array([-6.0])
  ce_wrong = float(grads.sigmoid_binary_cross_entropy_grad(wrong, jnp.ones(1))[0])
  mse_wrong = float(grads.sigmoid_mse_grad(wrong, jnp.ones(1))[0])
  if verbose:
    with np.printoptions(precision=4, suppress=True):  # this printout only
      print("softmax CE, prediction [0.3, 0.6, 0.1], label [0, 1, 0]")
      print(f"  jax.grad          {np.asarray(autodiff)}")
      print(f"  y_hat - y         {np.asarray(formula)}")
      print("sigmoid BCE, prediction [0.1, 0.7, 0.8], label [0, 1, 1]")
      print(f"  jax.grad          {np.asarray(bce_autodiff)}")
      print(f"  s - y             {np.asarray(bce_formula)}")
      print("MSE 1/2 (s - y)^2 on the same sigmoids")
      print(f"  jax.grad          {np.asarray(mse_autodiff)}")
      print(f"  (s - y) s (1 - s) {np.asarray(mse_formula)}")
      print(f"confidently wrong (z = -6, y = 1): CE gradient {ce_wrong:+.4f}, "
            f"MSE gradient {mse_wrong:+.6f} ({abs(ce_wrong / mse_wrong):.0f}x smaller)")
  return {
      "softmax_max_diff": float(jnp.max(jnp.abs(autodiff - formula))),
      "bce_max_diff": float(jnp.max(jnp.abs(bce_autodiff - bce_formula))),
      "mse_max_diff": float(jnp.max(jnp.abs(mse_autodiff - mse_formula))),
      "softmax_grad": np.asarray(formula), "ce_wrong": ce_wrong, "mse_wrong": mse_wrong,
  }


if __name__ == "__main__":
  main()
