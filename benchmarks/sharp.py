"""What the sharp loss costs: integer-label softmax CE in three forms, and Optax.

    python -m benchmarks sharp [--smoke] [--shape 8192x50304]

A confident prediction's loss of 1e-8 rounds to 0 as ``lse - z_y`` in float32 (Optax returns
0); jxent keeps it as ``log1p(tail)``, ``tail = sum_{c != y} exp(z_c - m)``, where the loss is
below 0.5. The reference form (what GPUs and TPUs run) times here in three ways, in one
process, alternating, against Optax; medians of per-repetition ratios, min–max in parentheses:

- "one sum" (what jxent runs): the row's exp-sum taken without the label's term, ``tail``,
  and ``s = exp(z_y - m) + tail``: the sharp loss from one reduction
  (``_reference.int_lse_parts``);
- "two sums" (the form before it): the exp-sum and the sum without the max's terms, two
  reductions of one pass (``_reference.lse_parts``, sharpened);
- "plain": the exp-sum alone, no sharp loss.

On XLA:CPU jxent runs its own form (a one-pass logsumexp and the label's tail behind a
``cond``), so there the three are the same program: run it on an accelerator. Prints a
markdown table (accelerator numbers go into RESULTS.md's accelerator section).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jxent
from benchmarks import _harness as H
from jxent import _reference as R

ONE_SUM = R.int_lse_parts


def _two_sums(z, y):
  m, r = R.lse_parts(z)  # sharpened: the sum without the max's terms beside the exp-sum
  return m, r, R.label_gap(z, y, m), None


def _plain(z, y):
  acc = R.acc_dtype(z.dtype)
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1)).astype(acc)
  m, r = R.finish_parts(z, m, jnp.sum, sharp=False)
  return m, r, R.label_gap(z, y, m), None


PARTS = {"one sum": ONE_SUM, "two sums": _two_sums, "plain": _plain}
VARIANTS = (*PARTS, "Optax")


def _loss(variant: str, grad: bool):
  def loss(z, y):
    if variant == "Optax":
      return jnp.sum(optax.losses.softmax_cross_entropy_with_integer_labels(z, y))
    R.int_lse_parts = PARTS[variant]
    try:  # the swap lasts while the loss is traced
      return jnp.sum(jxent.softmax_cross_entropy_with_integer_labels(z, y))
    finally:
      R.int_lse_parts = ONE_SUM
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
  print("| shape | dtype | pass | one sum ms | one sum / Optax | two sums / Optax "
        "| plain / Optax | one sum / plain | two sums / plain |")
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
            f"{res['one sum']['median_s'] / inner * 1e3:.3f} | {fmt(res['one sum'])} | "
            f"{fmt(res['two sums'])} | {fmt(res['plain'])} | "
            f"{fmt(H.pair(res, 'one sum', 'plain'))} | {fmt(H.pair(res, 'two sums', 'plain'))} |",
            flush=True)


if __name__ == "__main__":
  main()
