"""jxent's losses against Optax and PyTorch (when installed), forward and forward+backward.

    python -m benchmarks losses [--quick] [--reps 7]

Writes the table to benchmarks/RESULTS.md (section "losses"). Times are medians;
the ratios are medians of per-repetition ratios measured side by side.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent
from benchmarks import _harness as H

SIZES = [(4096, 32768), (8192, 50304)]
QUICK_SIZES = [(2048, 16384)]


def _losses():
  """(name, jxent mean loss, optax mean loss, torch loss maker, label kind)."""
  return [
      ("softmax CE, integer labels",
       lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean"),
       lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean(),
       "cross_entropy", "int"),
      ("softmax CE, soft labels",
       lambda z, y: jxent.softmax_cross_entropy(z, y, reduction="mean"),
       lambda z, y: optax.softmax_cross_entropy(z, y).mean(),
       "cross_entropy", "soft"),
      ("sigmoid BCE (multi-label)",
       lambda z, y: jxent.sigmoid_binary_cross_entropy(z, y, reduction="mean"),
       lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean(),
       "binary_cross_entropy_with_logits", "bin"),
  ]


def _labels(kind, n, c, dtype, key):
  if kind == "int":
    return jax.random.randint(key, (n,), 0, c)
  if kind == "soft":
    return jax.nn.softmax(jax.random.normal(key, (n, c)), axis=-1).astype(dtype)
  return (jax.random.uniform(key, (n, c)) < 0.05).astype(dtype)


def _torch_variants(torch_fn_name, z, y, dtype):
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return {}
  tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  zt = torch.from_numpy(np.asarray(z.astype(jnp.float32))).to(tdtype)
  yt = torch.from_numpy(np.asarray(y.astype(jnp.float32) if y.ndim == 2 else y)).to(
      tdtype if y.ndim == 2 else torch.long)
  fn = getattr(F, torch_fn_name)

  def fwd():
    with torch.no_grad():
      return fn(zt, yt).item()

  zg = zt.clone().requires_grad_(True)

  def fwd_bwd():
    zg.grad = None
    loss = fn(zg, yt)
    loss.backward()
    return loss.item()

  return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def run(sizes=SIZES, dtypes=("float32", "bfloat16"), reps=7) -> list[dict]:
  rows = []
  for n, c in sizes:
    for dtype in dtypes:
      kz, ky = jax.random.split(jax.random.PRNGKey(0))
      z = (2 * jax.random.normal(kz, (n, c))).astype(dtype)
      nbytes = z.size * z.dtype.itemsize
      read = jax.jit(lambda z: jnp.sum(z, axis=-1, dtype=jnp.float32))
      read_t = H.time_side_by_side({"read": H.blocking(read, z)}, reference="read", reps=reps)
      floor = read_t["read"]["median_s"]
      for name, jx, opt, torch_name, kind in _losses():
        y = _labels(kind, n, c, dtype, ky)
        # The least a forward must read: the logits, and labels of the same size if dense.
        # Both floors are timed in the same alternating run as the forwards they divide.
        read2 = None
        if y.shape == z.shape:
          read2 = jax.jit(lambda z, y: jnp.sum(z, axis=-1, dtype=jnp.float32)
                          + jnp.sum(y, axis=-1, dtype=jnp.float32))
        for mode in ("fwd", "fwd+bwd"):
          if mode == "fwd":
            fj, fo = jax.jit(jx), jax.jit(opt)
          else:
            fj, fo = jax.jit(jax.value_and_grad(jx)), jax.jit(jax.value_and_grad(opt))
          got, want = fj(z, y), fo(z, y)
          v_got = float(got if mode == "fwd" else got[0])
          v_want = float(want if mode == "fwd" else want[0])
          variants = {"jxent": H.blocking(fj, z, y), "optax": H.blocking(fo, z, y)}
          tv = _torch_variants(torch_name, z, y, dtype)
          if tv:
            variants["torch"] = tv[mode]
          if mode == "fwd":
            variants["read floor"] = H.blocking(read, z)
            if read2 is not None:
              variants["inputs floor"] = H.blocking(read2, z, y)
          res = H.time_side_by_side(variants, reference="optax", reps=reps)
          fwd = mode == "fwd"
          row = {
              "loss": name, "dtype": dtype, "size": f"[{n}, {c}]", "pass": mode,
              "jxent_ms": res["jxent"]["median_s"] * 1e3,
              "optax_ms": res["optax"]["median_s"] * 1e3,
              "jxent/optax": res["jxent"],
              "torch_ms": res["torch"]["median_s"] * 1e3 if "torch" in res else None,
              "jxent/torch": H.pair(res, "jxent", "torch") if "torch" in res else None,
              "read_floor_ms": floor * 1e3,
              "read_GBps": nbytes / floor / 1e9,
              "jxent_GBps": nbytes / res["jxent"]["median_s"] / 1e9,
              "fwd/read": H.pair(res, "jxent", "read floor") if fwd else None,
              "fwd/inputs": (H.pair(res, "jxent", "inputs floor" if read2 is not None
                                    else "read floor") if fwd else None),
              "value_rel_diff": abs(v_got - v_want) / max(abs(v_want), 1e-30),
          }
          rows.append(row)
          print(_format_row(row), flush=True)
      del z
  return rows


def _format_row(r: dict) -> str:
  torch = "—" if r["torch_ms"] is None else f"{r['torch_ms']:,.1f}"
  vs_torch = "—" if r["jxent/torch"] is None else H.spread(r["jxent/torch"])
  return (f"| {r['loss']} | {r['dtype']} | {r['size']} | {r['pass']} | {r['jxent_ms']:,.1f} | "
          f"{r['optax_ms']:,.1f} | {torch} | **{H.spread(r['jxent/optax'])}** | {vs_torch} | "
          f"{r['jxent_GBps']:.1f} | {H.spread(r['fwd/read'], 1, '×')} | "
          f"{H.spread(r['fwd/inputs'], 1, '×')} |")


def to_markdown(rows: list[dict], reps: int) -> str:
  floors = {}
  for r in rows:
    floors[(r["size"], r["dtype"])] = (r["read_floor_ms"], r["read_GBps"])
  lines = [
      "## Losses: jxent vs Optax vs PyTorch (CPU)",
      "",
      f"Machine: {H.machine()}. `python -m benchmarks losses`; median of {reps} repetitions "
      "after warm-up, variants alternating; every ratio is the median of the per-repetition "
      "ratios of one alternating run, with their min–max in parentheses (< 1 means jxent is "
      "faster). Mean-reduced losses; fwd+bwd is `jax.value_and_grad` (PyTorch: "
      "`loss.backward()`). GB/s counts one read of the logits. 'fwd / read floor' divides "
      "the forward's time by that of one `jnp.sum` pass over the logits, timed in the same "
      "alternating run; soft labels and multi-label targets are a second array of the "
      "logits' size that the forward must also read, and 'fwd / inputs floor' divides by "
      "one pass over both arrays.",
      "",
      "| loss | dtype | [N, C] | pass | jxent ms | optax ms | torch ms | jxent/optax "
      "| jxent/torch | jxent GB/s | fwd / read floor | fwd / inputs floor |",
      "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  lines += [_format_row(r) for r in rows]
  lines += ["", "Read floor (one `jnp.sum` pass over the logits):", ""]
  for (size, dtype), (t, bw) in floors.items():
    lines.append(f"- {size} {dtype}: {t:.1f} ms, {bw:.1f} GB/s")
  worst = max(r["value_rel_diff"] for r in rows)
  lines += ["", f"Largest relative difference of a loss value against Optax: {worst:.1e}."]
  return "\n".join(lines)


def page_fault_probe(n: int, c: int, reps: int) -> dict:
  """fwd+bwd of integer-label CE in this process (run in a fresh process per environment)."""
  z = jax.random.normal(jax.random.PRNGKey(0), (n, c))
  y = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, c)
  _, jx, opt, _, _ = _losses()[0]
  fj, fo = jax.jit(jax.value_and_grad(jx)), jax.jit(jax.value_and_grad(opt))
  copy = jax.jit(lambda z: z + 1)
  res = H.time_side_by_side({"jxent": H.blocking(fj, z, y), "optax": H.blocking(fo, z, y),
                             "fresh [N, C] write": H.blocking(copy, z)}, reference="optax",
                            reps=reps)
  return {k: v["median_s"] * 1e3 for k, v in res.items()} | {"ratio": res["jxent"]["ratio"]}


def page_fault_section(sizes, reps: int) -> str:
  """Runs the probe in fresh processes with and without transparent huge pages for malloc."""
  import json
  import os
  import subprocess
  import sys

  lines = [
      "### Where the fwd+bwd time goes: page faults on the fresh gradient buffer",
      "",
      "Each fwd+bwd writes a fresh [N, C] gradient; XLA:CPU gets it from malloc, which maps "
      "new pages that the kernel faults in 4 KiB at a time. Same process per row, fresh "
      "process per environment (float32, integer labels):",
      "",
      "| [N, C] | environment | jxent ms | optax ms | jxent/optax | fresh `z + 1` ms |",
      "|---|---|---:|---:|---:|---:|",
  ]
  for n, c in sizes:
    for label, extra in (("default", {}),
                         ("`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`",
                          {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})):
      env = dict(os.environ, **extra)
      out = subprocess.run(
          [sys.executable, "-m", "benchmarks", "losses", "--probe", f"{n},{c}",
           "--reps", str(reps)], capture_output=True, text=True, env=env, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      lines.append(f"| [{n}, {c}] | {label} | {r['jxent']:,.1f} | {r['optax']:,.1f} | "
                   f"{r['ratio']:.2f} | {r['fresh [N, C] write']:,.1f} |")
      print(lines[-1], flush=True)
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true", help="small sizes, no RESULTS.md update")
  p.add_argument("--reps", type=int, default=7)
  p.add_argument("--probe", help="N,C: print one page-fault probe as JSON (internal)")
  args = p.parse_args(argv)
  if args.probe:
    import json

    n, c = map(int, args.probe.split(","))
    print(json.dumps(page_fault_probe(n, c, args.reps)))
    return
  rows = run(QUICK_SIZES if args.quick else SIZES, reps=args.reps)
  ratios = [r["jxent/optax"]["ratio"] for r in rows]
  print(f"median jxent/optax over all rows: {statistics.median(ratios):.2f}")
  if not args.quick:
    text = to_markdown(rows, args.reps) + "\n\n" + page_fault_section(SIZES, args.reps)
    H.write_section("losses", text)


if __name__ == "__main__":
  main()
