"""CTC loss: jxent against Optax (and PyTorch's F.ctc_loss where installed), side by side.

    python -m benchmarks ctc [--smoke]

Per size, float32 logits [B, T, K] with random frame and label paddings (about a tenth of
each row padded at its end), the sum of the per-sequence losses, forward and
forward+backward in the logits under ``jit``; repetitions alternate, the ratio is the median
of per-repetition time ratios to Optax (min–max in parentheses). PyTorch (CPU, eager) takes
the same log-probabilities as ``[T, B, K]`` with lengths. Error: the largest difference
of each float32 value (and gradient) to the float64 one, relative to its largest entry.
Writes the "ctc" section of benchmarks/RESULTS.md (not with ``--smoke``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from benchmarks import _harness as H

SIZES = ((16, 200, 32, 40), (32, 400, 64, 100), (8, 1000, 256, 200))  # B, T, K, N
SMOKE = ((2, 12, 5, 3),)


def _inputs(b, t, k, n, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(b, t, k)).astype(np.float32) * 2
  frames = t - rng.integers(0, t // 10 + 1, size=b)
  lengths = np.minimum(n - rng.integers(0, n // 10 + 1, size=b), frames // 2)
  frame_pad = (np.arange(t)[None, :] >= frames[:, None]).astype(np.float32)
  label_pad = (np.arange(n)[None, :] >= lengths[:, None]).astype(np.float32)
  labels = rng.integers(1, k, size=(b, n)).astype(np.int32)
  return z, frame_pad, labels, label_pad, frames, lengths


def _functions(frame_pad, labels, label_pad):
  args = (jnp.asarray(frame_pad), jnp.asarray(labels), jnp.asarray(label_pad))
  jx = lambda z: jnp.sum(jxent.ctc_loss(z, *args))
  ox = lambda z: jnp.sum(optax.ctc_loss(z, *args))
  return {"jxent": jx, "Optax": ox}


def _torch(z, labels, frames, lengths, grad, dev="cpu"):
  """A call of PyTorch's F.ctc_loss on ``dev`` for the same problem (``.sync()`` waits for
  the device), or None without PyTorch."""
  try:
    import torch
  except ImportError:
    return None
  lp = torch.from_numpy(np.ascontiguousarray(z.transpose(1, 0, 2))).to(dev)
  lp = torch.log_softmax(lp, -1).detach().requires_grad_(grad)
  y, fl, ll = (torch.from_numpy(np.asarray(a, np.int64)).to(dev)
               for a in (labels, frames, lengths))
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def run():
    loss = torch.nn.functional.ctc_loss(lp, y, fl, ll, reduction="sum")
    if grad:
      loss.backward()
    return loss

  run.sync = sync  # a CUDA call is asynchronous: block after a round of calls
  return run


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks ctc", description=__doc__.split(
      "\n")[0])
  p.add_argument("--smoke", action="store_true", help="one tiny size, few repetitions")
  args = p.parse_args(argv)
  sizes, reps, inner = (SMOKE, 3, 2) if args.smoke else (SIZES, 9, 5)
  lines = [
      f"Machine: {H.machine()}. `python -m benchmarks ctc`; float32 logits `[B, T, K]`, "
      "labels `[B, N]`, about a tenth of each row's frames and labels padded; the sum of "
      "the per-sequence losses under `jit`, forward and forward+backward in the logits. "
      f"Median of {reps} repetitions of {inner} calls after warm-up, variants alternating; "
      "ratio = median of per-repetition time ratios to Optax (min–max). PyTorch: "
      "`F.ctc_loss` (eager, CPU) on the same log-probabilities, where installed. Error: "
      "largest relative difference of the float32 value and gradient to jxent's in float64, "
      "relative to the largest entry.",
      "",
      "| B, T, K, N | pass | jxent ms | Optax ms | jxent / Optax | PyTorch / Optax "
      "| jxent scratch MiB | Optax scratch MiB | jxent max rel. error | Optax max rel. error |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  print("\n".join(lines), flush=True)
  agree = 0.0  # Optax in float64 against the float64 reference
  for b, t, k, n in sizes:
    z, frame_pad, labels, label_pad, frames, lengths = _inputs(b, t, k, n)
    zj = jnp.asarray(z)
    fns = _functions(frame_pad, labels, label_pad)
    for grad in (False, True):
      jitted = {name: jax.jit(jax.value_and_grad(f) if grad else f) for name, f in fns.items()}
      outs = {name: f(zj) for name, f in jitted.items()}
      with jax.enable_x64(True):  # the reference: jxent's recursion in float64
        ref = (jax.value_and_grad if grad else lambda f: f)(fns["jxent"])(z.astype(np.float64))
        ref = [np.asarray(a) for a in jax.tree.leaves(ref)]
        other = (jax.value_and_grad if grad else lambda f: f)(fns["Optax"])(z.astype(np.float64))
        agree = max(agree, *(_rel(a, c) for a, c in zip(jax.tree.leaves(other), ref)))
      err = {name: max(_rel(a, c) for a, c in zip(jax.tree.leaves(out), ref))
             for name, out in outs.items()}
      mem = {name: H.xla_memory(f, zj)["temp"] / 2**20 for name, f in jitted.items()}

      def calls(f):
        def go():
          for _ in range(inner):
            out = f(zj)
          jax.block_until_ready(out)
        return go

      variants = {name: calls(f) for name, f in jitted.items()}
      torch_run = _torch(z, labels, frames, lengths, grad)
      if torch_run is not None:
        variants["PyTorch"] = lambda: ([torch_run() for _ in range(inner)], torch_run.sync())
      res = H.time_side_by_side(variants, reference="Optax", reps=reps)
      line = (f"| {b}, {t}, {k}, {n} | {'fwd+bwd' if grad else 'fwd'} | "
              f"{res['jxent']['median_s'] / inner * 1e3:,.2f} | "
              f"{res['Optax']['median_s'] / inner * 1e3:,.2f} | **{H.spread(res['jxent'])}** | "
              f"{H.spread(res.get('PyTorch')) or '—'} | {mem['jxent']:.2f} | "
              f"{mem['Optax']:.2f} | {err['jxent']:.1e} | {err['Optax']:.1e} |")
      lines.append(line)
      print(line, flush=True)
  tail = (f"\nOptax's own float64 value and gradient differ from the float64 reference by at "
          f"most {agree:.1e} (relative): the float32 errors are each computation's rounding.")
  lines.append(tail)
  print(tail)
  if not args.smoke:
    H.write_section("ctc", "## CTC loss: jxent against Optax (CPU)\n\n" + "\n".join(lines))


if __name__ == "__main__":
  main()
