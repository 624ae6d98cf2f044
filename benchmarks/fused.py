"""Fused linear + cross-entropy against the unfused loss, forward+backward.

    python -m benchmarks fused [--quick] [--reps 3]

The reference is ``optax.softmax_cross_entropy_with_integer_labels(h @ W, y).mean()``
under ``jit(value_and_grad)`` with respect to ``h`` and ``W``. Reports XLA's scratch
memory (``memory_analysis().temp_size_in_bytes``), peak RSS of a fresh process per
variant, the median of per-repetition time ratios, and the largest relative
difference of loss and gradients. Writes the "fused" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from benchmarks import _harness as H

SIZES = [(4096, 512, 32768), (8192, 1024, 65536)]
QUICK_SIZES = [(1024, 256, 8192)]


def _inputs(n, d, v, dtype=jnp.float32):
  # NumPy's generator: no device-side temporaries, so the RSS probe measures the loss alone.
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((n, d), dtype=np.float32), dtype)
  w = jnp.asarray(rng.standard_normal((d, v), dtype=np.float32) * d**-0.5, dtype)
  y = jnp.asarray(rng.integers(0, v, size=n, dtype=np.int32))
  return h, w, y


def variants(y):
  return {
      "naive": jax.jit(jax.value_and_grad(
          lambda h, w: optax.softmax_cross_entropy_with_integer_labels(
              jnp.dot(h, w, preferred_element_type=jnp.float32), y).mean(), argnums=(0, 1))),
      "jxent": jax.jit(jax.value_and_grad(
          lambda h, w: jxent.linear_cross_entropy(h, w, y), argnums=(0, 1))),
      "jxent recompute": jax.jit(jax.value_and_grad(
          lambda h, w: jxent.linear_cross_entropy(h, w, y, method="recompute"), argnums=(0, 1))),
  }


def _rss_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


def rss_probe(name, n, d, v):
  """Peak RSS (MiB) of one run of a variant in this fresh process, as JSON.

  The variant is compiled and run once first; then the kernel's high-water mark is reset
  (``/proc/self/clear_refs``) and the second run's peak is read from ``VmHWM``.
  """
  h, w, y = _inputs(n, d, v)
  f = variants(y)[name]
  jax.block_until_ready(f(h, w))
  base = _rss_mib("VmRSS")
  with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
  jax.block_until_ready(f(h, w))
  print(json.dumps({"peak_mib": _rss_mib("VmHWM"), "before_mib": base}))


def _rss(name, n, d, v):
  out = subprocess.run([sys.executable, "-m", "benchmarks", "fused", "--rss", name,
                        f"{n},{d},{v}"], capture_output=True, text=True, check=True,
                       env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])


def run(sizes, reps):
  rows = []
  for n, d, v in sizes:
    h, w, y = _inputs(n, d, v)
    fs = variants(y)
    mem = {k: H.xla_memory(f, h, w) for k, f in fs.items()}
    outs = {k: f(h, w) for k, f in fs.items()}
    ref_loss, (ref_dh, ref_dw) = outs["naive"]

    def rel(a, b):
      return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

    res = H.time_side_by_side({k: H.blocking(f, h, w) for k, f in fs.items()},
                              reference="naive", warmup=1, reps=reps)
    for k in fs:
      loss, (dh, dw) = outs[k]
      rss = _rss(k, n, d, v)
      row = {
          "size": f"N={n}, D={d}, V={v}", "variant": k,
          "ms": res[k]["median_s"] * 1e3, "ratio": res[k]["ratio"],
          "lo": res[k]["lo"], "hi": res[k]["hi"],
          "temp_mib": mem[k]["temp"] / 2**20,
          "temp_frac": mem[k]["temp"] / mem["naive"]["temp"],
          "rss_mib": rss["peak_mib"], "rss_before_mib": rss["before_mib"],
          "err": max(abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                     rel(dh, ref_dh), rel(dw, ref_dw)),
      }
      rows.append(row)
      print(_fmt(row), flush=True)
    del h, w, fs, outs
  return rows


def _fmt(r):
  return (f"| {r['size']} | {r['variant']} | {r['ms']:,.0f} | **{r['ratio']:.3f}** "
          f"({r['lo']:.3f}–{r['hi']:.3f}) | "
          f"{r['temp_mib']:,.1f} | {100 * r['temp_frac']:.1f}% | {r['rss_mib']:,.0f} | "
          f"{r['rss_mib'] - r['rss_before_mib']:,.0f} | {r['err']:.1e} |")


def chunk_sweep(n, d, v, chunks=(128, 256, 512), reps=3):
  """Time and scratch of the default ("forward") method at several chunk sizes."""
  h, w, y = _inputs(n, d, v)
  fs = {"naive": variants(y)["naive"]}
  for c in chunks:
    fs[c] = jax.jit(jax.value_and_grad(
        lambda h, w, c=c: jxent.linear_cross_entropy(h, w, y, chunk_size=c), argnums=(0, 1)))
  res = H.time_side_by_side({k: H.blocking(f, h, w) for k, f in fs.items()},
                            reference="naive", reps=reps)
  lines = [f"Chunk size at N={n}, D={d}, V={v} (default: "
           f"{jxent._fused.default_chunk_size(n, v)}):", "",
           "| chunk | time / unfused (min–max) | XLA scratch MiB |", "|---:|---:|---:|"]
  for c in chunks:
    lines.append(f"| {c} | {H.spread(res[c], 3)} | "
                 f"{H.xla_memory(fs[c], h, w)['temp'] / 2**20:,.1f} |")
  print("\n".join(lines), flush=True)
  return "\n".join(lines)


def to_markdown(rows, reps):
  return "\n".join([
      "## Fused linear + cross-entropy (CPU, float32, forward+backward)",
      "",
      f"Machine: {H.machine()}. `python -m benchmarks fused`; `jit(value_and_grad)` with "
      "respect to h and W, mean reduction, default chunk size; median of "
      f"{reps} repetitions after warm-up, variants alternating, ratio = median of "
      "per-repetition time ratios (their min–max in parentheses) to the unfused reference "
      "(`optax...with_integer_labels(h @ W, y).mean()`). Scratch is XLA's "
      "`temp_size_in_bytes` of the compiled function; "
      "peak RSS is the kernel's high-water mark (`VmHWM`, reset after a warm-up run) of a "
      "fresh process during one run of the variant; 'RSS added' is that peak minus the "
      "resident size just before the run. Error: largest relative difference of loss, dh "
      "and dW to the reference.",
      "",
      "| size | variant | ms | time / unfused (min–max) | XLA scratch MiB | scratch / unfused "
      "| peak RSS MiB | RSS added by the run MiB | max rel. error |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
      *[_fmt(r) for r in rows],
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--rss", nargs=2, metavar=("VARIANT", "N,D,V"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rss:
    rss_probe(args.rss[0], *map(int, args.rss[1].split(",")))
    return
  rows = run(QUICK_SIZES if args.quick else SIZES, args.reps)
  if not args.quick:
    sweeps = [chunk_sweep(*SIZES[0], chunks=(128, 256, 512, 1024), reps=args.reps),
              chunk_sweep(*SIZES[1], chunks=(128, 256, 512), reps=args.reps)]
    text = to_markdown(rows, args.reps) + "\n\n" + "\n\n".join(sweeps)
    H.write_section("fused", text)


if __name__ == "__main__":
  main()
