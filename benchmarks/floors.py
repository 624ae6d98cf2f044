"""What bounds a forward on this CPU: reading the logits, or the transcendentals?

    python -m benchmarks floors [--reps 7]

For each size and dtype of the losses benchmark, times in one process, alternating:
a bare read of the logits (``jnp.sum`` accumulated in float32), a bare exp-sum (one
``exp`` per entry in float32, the least arithmetic a logsumexp needs), a bare softplus-sum
(``log1p(exp(-|z|))``, the least a sigmoid BCE needs), and jxent's integer-label CE and
sigmoid BCE forwards. The compute floors sum over the whole array: XLA:CPU's per-row exp-sums
were several times slower than a whole-array sum at C = 50304, so a per-row form would not
be a floor. Writes the "floors" section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jxent
from benchmarks import _harness as H
from benchmarks.losses import SIZES


def variants(y, t):
  f32 = lambda z: z.astype(jnp.float32)
  return {
      "read": jax.jit(lambda z: jnp.sum(z, axis=-1, dtype=jnp.float32)),
      "exp-sum": jax.jit(lambda z: jnp.sum(jnp.exp(f32(z)))),
      "softplus-sum": jax.jit(lambda z: jnp.sum(jnp.log1p(jnp.exp(-jnp.abs(f32(z)))))),
      "jxent CE fwd": jax.jit(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
          z, y, reduction="mean")),
      "jxent BCE fwd": jax.jit(lambda z: jxent.sigmoid_binary_cross_entropy(
          z, t, reduction="mean")),
  }


def run(reps):
  lines = [
      "## What bounds a forward: read floor against compute floors (CPU)",
      "",
      f"Machine: {H.machine()}. `python -m benchmarks floors`; median of {reps} repetitions "
      "after warm-up, alternating; 'x read' is the median per-repetition ratio to the bare "
      "read (one `jnp.sum` pass over the logits, per row, in float32), and the last two "
      "columns the median (min–max) per-repetition ratio of each forward to its floor, all "
      "from the same alternating run. exp-sum: "
      "`sum(exp(float32(z)))` over the whole array, one exp per entry and no shift, the least "
      "a logsumexp computes (z = 2 N(0, 1) cannot overflow); softplus-sum: "
      "`sum(log1p(exp(-|z|)))`, the least a sigmoid BCE computes (BCE also reads its [N, C] "
      "labels). Both are summed over the whole array: XLA:CPU's per-row exp-sums ran several "
      "times slower at C = 50304, so they would not be floors.",
      "",
      "| [N, C] | dtype | read ms | exp-sum ms | softplus-sum ms | jxent CE fwd ms "
      "| jxent BCE fwd ms | exp-sum x read | softplus-sum x read | CE fwd / exp-sum "
      "| BCE fwd / softplus-sum |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for n, c in SIZES:
    for dtype in ("float32", "bfloat16"):
      kz, ky, kt = jax.random.split(jax.random.PRNGKey(0), 3)
      z = (2 * jax.random.normal(kz, (n, c))).astype(dtype)
      y = jax.random.randint(ky, (n,), 0, c)
      t = (jax.random.uniform(kt, (n, c)) < 0.05).astype(dtype)
      fs = variants(y, t)
      res = H.time_side_by_side({k: H.blocking(f, z) for k, f in fs.items()},
                                reference="read", reps=reps)
      ms = {k: v["median_s"] * 1e3 for k, v in res.items()}
      x = {k: v["ratio"] for k, v in res.items()}
      line = (f"| [{n}, {c}] | {dtype} | {ms['read']:,.1f} | {ms['exp-sum']:,.1f} | "
              f"{ms['softplus-sum']:,.1f} | {ms['jxent CE fwd']:,.1f} | "
              f"{ms['jxent BCE fwd']:,.1f} | {x['exp-sum']:.1f}× | {x['softplus-sum']:.1f}× | "
              f"{H.spread(H.pair(res, 'jxent CE fwd', 'exp-sum'))} | "
              f"{H.spread(H.pair(res, 'jxent BCE fwd', 'softplus-sum'))} |")
      lines.append(line)
      print(line, flush=True)
      del z, t, fs
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--reps", type=int, default=7)
  args = p.parse_args(argv)
  H.write_section("floors", run(args.reps))


if __name__ == "__main__":
  main()
