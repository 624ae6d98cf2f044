"""Vocab-parallel cross-entropy vs gathering the logits, on an 8-device CPU mesh.

    python -m benchmarks sharded [--reps 5]

The 8 devices are XLA host-platform devices (``--xla_force_host_platform_device_count=8``)
sharing this machine's cores, so times measure the work and the collectives' copies, not a
network. Per-device memory is XLA's ``memory_analysis()`` of the compiled per-device program.
Writes the "sharded" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402
from benchmarks import _harness as H  # noqa: E402


def run(n=4096, v=65536, mesh_shape=(2, 4), reps=5):
  mesh = jax.make_mesh(mesh_shape, ("data", "model"))
  z = jax.random.normal(jax.random.PRNGKey(0), (n, v)) * 2
  y = jax.random.randint(jax.random.PRNGKey(1), (n,), 0, v)
  z = jax.device_put(z, NamedSharding(mesh, P("data", "model")))
  y = jax.device_put(y, NamedSharding(mesh, P("data")))
  vp = jxent.sharded.make_vocab_parallel_loss(mesh)

  def gathered(z, y):
    full = jax.reshard(z, NamedSharding(mesh, P("data", None)))  # all-gather over "model"
    return jxent.softmax_cross_entropy_with_integer_labels(full, y).mean()

  fs = {
      "vocab-parallel (jxent.sharded)": jax.jit(jax.value_and_grad(lambda z, y: vp(z, y).mean())),
      "gather logits, then jxent loss": jax.jit(jax.value_and_grad(gathered)),
  }
  vals = {k: f(z, y) for k, f in fs.items()}
  ref_loss, ref_g = vals["gather logits, then jxent loss"]
  res = H.time_side_by_side({k: H.blocking(f, z, y) for k, f in fs.items()},
                            reference="gather logits, then jxent loss", reps=reps)
  rows = []
  for k, f in fs.items():
    compiled = f.lower(z, y).compile()
    mem = compiled.memory_analysis()
    txt = compiled.as_text()
    loss, g = vals[k]
    rows.append({
        "variant": k, "ms": res[k]["median_s"] * 1e3, "ratio": res[k]["ratio"],
        "temp": mem.temp_size_in_bytes / 2**20,
        "peak": (mem.temp_size_in_bytes + mem.output_size_in_bytes
                 + mem.argument_size_in_bytes) / 2**20,
        "all_gathers": txt.count("all-gather-start(") + txt.count("all-gather("),
        "err": max(abs(float(loss) - float(ref_loss)) / float(ref_loss),
                   float(jnp.max(jnp.abs(g - ref_g)) / jnp.max(jnp.abs(ref_g)))),
    })
    print(rows[-1], flush=True)
  lines = [
      "## Vocab-parallel cross-entropy (8-device CPU mesh)",
      "",
      f"Machine: {H.machine()}; mesh {mesh_shape[0]}×{mesh_shape[1]} (data × model) of host "
      f"devices sharing the cores. N = {n}, V = {v} float32 logits sharded "
      "P(data, model); `jit(value_and_grad)` of the mean loss; median of "
      f"{reps} repetitions after warm-up, alternating. Per-device memory: XLA "
      "`memory_analysis()` of the per-device program (arguments + outputs + scratch).",
      "",
      "| variant | ms | time / gathered | per-device scratch MiB | per-device total MiB "
      "| all-gathers in HLO | max rel. diff |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['ms']:,.0f} | **{r['ratio']:.2f}** | {r['temp']:,.1f} | "
                 f"{r['peak']:,.1f} | {r['all_gathers']} | {r['err']:.1e} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--quick", action="store_true")
  args = p.parse_args(argv)
  if args.quick:
    print(run(n=512, v=8192, reps=2))
    return
  H.write_section("sharded", run(reps=args.reps))


if __name__ == "__main__":
  main()
