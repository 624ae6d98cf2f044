"""What the sharp logsumexp costs: integer-label softmax CE with and without it, and Optax.

    python -m benchmarks sharp [--smoke] [--shape 8192x50304]

The reference form (what GPUs and TPUs run) takes ``r = log1p(rest)`` where r is below 0.5,
``rest`` the row's exp-sum without the max's term: a second sum in the same pass, which
keeps a confident prediction's loss of 1e-8 (float32 rounds ``log(1 + rest)`` to 0). Here the
same loss is timed with that sum ("sharp", what jxent runs) and without it ("plain", the
reference's ``lse_parts`` swapped for the unsharpened one while tracing) and with both sums
in one variadic reduction ("variadic", a candidate for the reference: one read of the
logits however a compiler treats two reductions of one operand), against Optax, in one
process, alternating; medians of per-repetition ratios, min–max in parentheses. On
XLA:CPU jxent runs its own form (a one-pass logsumexp and the label's tail behind a
``cond``), so there the three are the same program: run it on an accelerator.
Prints a markdown table (accelerator numbers go into RESULTS.md's accelerator section).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from benchmarks import _harness as H
from jxent import _reference as R

SHARP_LSE = R.lse_parts


def _plain_lse(z):
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1)).astype(R.acc_dtype(z.dtype))
  return R.finish_parts(z, m, jnp.sum, sharp=False)


def _variadic_lse(z):
  """The sharp form with its two sums in one variadic reduction: one read of the logits
  whatever the compiler makes of two reductions of one operand (a candidate, measured
  here before it replaces the reference's)."""
  acc = R.acc_dtype(z.dtype)
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1)).astype(acc)
  pos_inf = m == jnp.inf
  m = jnp.where(jnp.isfinite(m), m, 0)
  d = z.astype(acc) - m[:, None]
  e = jnp.exp(d)
  zero = np.array(0, acc)
  s, rest = jax.lax.reduce((e, jnp.where(d == 0, 0, e)), (zero, zero),
                           lambda a, b: (a[0] + b[0], a[1] + b[1]), (1,))
  return m, jnp.where(pos_inf, jnp.nan, R.sharpen(jnp.log(s), rest))


LSE = {"sharp": SHARP_LSE, "plain": _plain_lse, "variadic": _variadic_lse}
VARIANTS = (*LSE, "Optax")


def _loss(variant: str, grad: bool):
  def loss(z, y):
    if variant == "Optax":
      return jnp.sum(optax.losses.softmax_cross_entropy_with_integer_labels(z, y))
    R.lse_parts = LSE[variant]
    try:  # the swap lasts while the loss is traced
      return jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(z, y))
    finally:
      R.lse_parts = SHARP_LSE
  return jax.jit(jax.value_and_grad(loss) if grad else loss)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks sharp", description=__doc__.split(
      "\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, few repetitions")
  p.add_argument("--shape", default="8192x50304", help="N x C (default 8192x50304)")
  args = p.parse_args(argv)
  n, c = (64, 1000) if args.smoke else tuple(map(int, args.shape.split("x")))
  reps, inner = (3, 2) if args.smoke else (9, 10)
  command = " ".join(["python -m benchmarks sharp", *(argv or [])])
  print(f"{H.machine()}; `{command}`\n")
  print("| shape | dtype | pass | sharp ms | sharp / Optax | plain / Optax | variadic / Optax "
        "| sharp / plain | variadic / plain |")
  print("|---|---|---|---:|---:|---:|---:|---:|---:|")
  for dt in (jnp.bfloat16, jnp.float32):
    z = (jax.random.normal(jax.random.key(0), (n, c)) * 3).astype(dt)
    y = jax.random.randint(jax.random.key(1), (n,), 0, c)
    for grad in (False, True):
      fs = {v: _loss(v, grad) for v in VARIANTS}

      def calls(f):
        def go():
          for _ in range(inner):
            out = f(z, y)
          jax.block_until_ready(out)
        return go

      res = H.time_side_by_side({k: calls(f) for k, f in fs.items()}, reference="Optax",
                                reps=reps)
      fmt = lambda r: f"{r['ratio']:.2f} ({r['lo']:.2f}–{r['hi']:.2f})"
      print(f"| [{n}, {c}] | {jnp.dtype(dt).name} | {'fwd+bwd' if grad else 'fwd'} | "
            f"{res['sharp']['median_s'] / inner * 1e3:.3f} | {fmt(res['sharp'])} | "
            f"{fmt(res['plain'])} | {fmt(res['variadic'])} | {fmt(H.pair(res, 'sharp', 'plain'))} "
            f"| {fmt(H.pair(res, 'variadic', 'plain'))} |", flush=True)


if __name__ == "__main__":
  main()
