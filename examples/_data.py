"""scikit-learn's bundled digits (no download), standardised, with a fixed 75/25 split."""

import numpy as np
from sklearn.datasets import load_digits


def digits(seed: int = 0):
  d = load_digits()
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(d.target))
  x, y = d.data[perm].astype(np.float64), d.target[perm].astype(np.int32)
  cut = int(0.75 * len(y))
  mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-8
  x = ((x - mu) / sd).astype(np.float32)
  return x[:cut], y[:cut], x[cut:], y[cut:]
