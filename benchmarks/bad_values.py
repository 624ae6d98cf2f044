"""jxent, Optax and PyTorch (when installed) on the same bad or extreme inputs.

    python -m benchmarks bad_values

Prints a markdown table of what each library returns and writes it to benchmarks/RESULTS.md
(section "bad_values"); the README's "Bad values" table is this output. Nothing here is timed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from benchmarks import _harness as H


def _fmt(x) -> str:
  if isinstance(x, str):
    return x
  a = np.asarray(x, np.float64).ravel()
  parts = []
  for v in a:
    if np.isnan(v):
      parts.append("NaN")
    elif np.isinf(v):
      parts.append("+inf" if v > 0 else "-inf")
    else:
      parts.append(f"{v:.4g}")
  return ", ".join(parts)


def _try(fn):
  try:
    return _fmt(fn())
  except Exception as e:  # noqa: BLE001 - the table reports what each library does
    return f"error ({type(e).__name__})"


def _torch():
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return None, None
  return torch, F


def cases():
  torch, F = _torch()
  t = (lambda a, **kw: torch.tensor(np.asarray(a), **kw)) if torch else None
  z = np.array([[1.0, 2.0, 0.5, -1.0, 0.0]], np.float32)
  rows = []

  def row(name, jx, op=None, th=None):
    rows.append((name, _try(jx), _try(op) if op else "—",
                 (_try(th) if th else "—") if torch else "not installed"))

  row("CE, label 7 with C = 5 (not ignored)",
      lambda: jxent.softmax_cross_entropy_with_integer_labels(z, jnp.array([7])),
      lambda: optax.softmax_cross_entropy_with_integer_labels(z, jnp.array([7])),
      lambda: F.cross_entropy(t(z), t([7])))
  zz = np.tile(z, (2, 1))
  row("CE mean, padding label -100 without ignore_index",
      lambda: jxent.softmax_cross_entropy_with_integer_labels(zz, jnp.array([1, -100]),
                                                              reduction="mean"),
      lambda: optax.softmax_cross_entropy_with_integer_labels(zz, jnp.array([1, -100])).mean(),
      lambda: F.cross_entropy(t(zz), t([1, -100]), ignore_index=-1))
  row("CE mean, label -100 ignored",
      lambda: jxent.softmax_cross_entropy_with_integer_labels(
          zz, jnp.array([1, -100]), ignore_index=-100, reduction="mean"),
      None,
      lambda: F.cross_entropy(t(zz), t([1, -100]), ignore_index=-100))
  zn = z.copy()
  zn[0, 2] = np.nan
  row("CE, a NaN logit",
      lambda: jxent.softmax_cross_entropy_with_integer_labels(zn, jnp.array([1])),
      lambda: optax.softmax_cross_entropy_with_integer_labels(zn, jnp.array([1])),
      lambda: F.cross_entropy(t(zn), t([1])))
  zi = z.copy()
  zi[0, 3] = -np.inf
  onehot = np.eye(5, dtype=np.float32)[[1]]
  row("soft CE, -inf logit (masked class) where the label is 0",
      lambda: jxent.softmax_cross_entropy(zi, onehot),
      lambda: optax.softmax_cross_entropy(zi, onehot),
      lambda: F.cross_entropy(t(zi), t(onehot)))
  row("soft CE, label mass on a -inf logit",
      lambda: jxent.softmax_cross_entropy(zi, np.eye(5, dtype=np.float32)[[3]]),
      lambda: optax.softmax_cross_entropy(zi, np.eye(5, dtype=np.float32)[[3]]),
      lambda: F.cross_entropy(t(zi), t(np.eye(5, dtype=np.float32)[[3]])))
  cm = np.zeros((1, 5), bool)
  row("CE, every class of the row masked by `where`",
      lambda: jxent.softmax_cross_entropy_with_integer_labels(z, jnp.array([1]), where=cm),
      lambda: optax.softmax_cross_entropy_with_integer_labels(z, jnp.array([1]), where=cm))

  def ignored_nan_grad_jx():
    zg = np.stack([z[0], np.full(5, np.nan, np.float32)])
    return jax.grad(lambda v: jxent.softmax_cross_entropy_with_integer_labels(
        v, jnp.array([1, -100]), ignore_index=-100, reduction="mean"))(zg)[1, 0]

  def ignored_nan_grad_op():
    zg = np.stack([z[0], np.full(5, np.nan, np.float32)])
    return jax.grad(lambda v: jnp.sum(jnp.where(
        jnp.array([True, False]), optax.softmax_cross_entropy_with_integer_labels(
            v, jnp.array([1, 0])), 0)))(zg)[1, 0]

  def ignored_nan_grad_th():
    zg = t(np.stack([z[0], np.full(5, np.nan, np.float32)])).requires_grad_(True)
    F.cross_entropy(zg, t([1, -100]), ignore_index=-100).backward()
    return zg.grad[1, 0].item()

  row("gradient of an ignored example whose logits are NaN", ignored_nan_grad_jx,
      ignored_nan_grad_op, ignored_nan_grad_th)
  big = np.array([[3e38, -3e38]], np.float32)
  row("CE with label smoothing 0.1 at logits ±3e38 (true 3e37)",
      lambda: jxent.softmax_cross_entropy_with_integer_labels(big, jnp.array([0]),
                                                              label_smoothing=0.1),
      lambda: optax.softmax_cross_entropy(big, optax.smooth_labels(jnp.eye(2)[jnp.array([0])],
                                                                   0.1)),
      lambda: F.cross_entropy(t(big), t([0]), label_smoothing=0.1))
  row("sigmoid BCE, label 2",
      lambda: jxent.sigmoid_binary_cross_entropy(jnp.array([0.5]), jnp.array([2.0])),
      lambda: optax.sigmoid_binary_cross_entropy(jnp.array([0.5]), jnp.array([2.0])),
      lambda: F.binary_cross_entropy_with_logits(t([0.5]), t([2.0])))
  row("sigmoid BCE at z = 16, y = 1 (true 1.125e-07)",
      lambda: jxent.sigmoid_binary_cross_entropy(jnp.array([16.0]), jnp.array([1.0])),
      lambda: optax.sigmoid_binary_cross_entropy(jnp.array([16.0]), jnp.array([1.0])),
      lambda: F.binary_cross_entropy_with_logits(t([16.0]), t([1.0])))
  row("BCE on probabilities, p = 1.5",
      lambda: jxent.binary_cross_entropy(jnp.array([1.5]), jnp.array([1.0])),
      None,
      lambda: F.binary_cross_entropy(t([1.5]), t([1.0])))
  row("BCE on probabilities, p = 0, y = 1",
      lambda: jxent.binary_cross_entropy(jnp.array([0.0]), jnp.array([1.0])),
      None,
      lambda: F.binary_cross_entropy(t([0.0]), t([1.0])))
  row("KL(p‖q) with q summing to 3",
      lambda: jxent.kl_divergence(jnp.array([0.5, 0.5]), jnp.array([1.0, 2.0])),
      lambda: optax.kl_divergence(jnp.log(jnp.array([1.0, 2.0])), jnp.array([0.5, 0.5])),
      lambda: F.kl_div(t(np.log([1.0, 2.0])), t([0.5, 0.5]), reduction="sum"))
  row("entropy of softmax([+inf, +inf, 0]) (limit log 2 = 0.6931)",
      lambda: jxent.entropy_from_logits(jnp.array([np.inf, np.inf, 0.0])),
      lambda: -jnp.sum(jax.nn.softmax(jnp.array([np.inf, np.inf, 0.0]))
                       * jax.nn.log_softmax(jnp.array([np.inf, np.inf, 0.0]))),
      lambda: torch.distributions.Categorical(logits=t([np.inf, np.inf, 0.0])).entropy())
  return rows


def table(rows) -> str:
  lines = ["| input | jxent | Optax | PyTorch |", "|---|---|---|---|"]
  lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--no-write", action="store_true", help="print only")
  args = p.parse_args(argv)
  md = table(cases())
  torch, _ = _torch()
  versions = f"jax {jax.__version__}, optax {optax.__version__}" + (
      f", torch {torch.__version__}" if torch else "")
  text = ("## Bad values: jxent, Optax and PyTorch on the same inputs\n\n"
          f"`python -m benchmarks bad_values` ({versions}); Optax's column uses its closest "
          "function (— where it has none).\n\n" + md)
  print(text)
  if not args.no_write:
    H.write_section("bad_values", text)


if __name__ == "__main__":
  main()
