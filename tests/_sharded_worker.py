"""Checks of jxent.sharded on an 8-device CPU mesh; run by test_sharded.py in a subprocess
(the device count must be set before JAX starts). Prints one JSON object."""

import json
import os
import re

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jxent  # noqa: E402

N, D = 16, 8
OPTS = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)


def rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def data(v, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  z = jax.random.normal(k[0], (N, v)) * 3
  y = jax.random.randint(k[1], (N,), 0, v).at[jnp.array([2, 9])].set(-100)
  h = jax.random.normal(k[2], (N, D))
  w = jax.random.normal(k[3], (D, v)) * 0.5
  return z, y, h, w


def collectives(compiled_text):
  """(op, element count, bytes) of every cross-device collective in compiled HLO."""
  out = []
  for line in compiled_text.splitlines():
    m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(all-reduce|all-gather|all-to-all|reduce-scatter|"
                  r"collective-permute)(?:-start)?\(", line)
    if not m:
      continue
    for dtype, dims in re.findall(r"(f32|f64|bf16|s32|u32|pred)\[([0-9,]*)\]", m.group(1)):
      n = 1
      for d in filter(None, dims.split(",")):
        n *= int(d)
      size = {"f64": 8, "bf16": 2, "pred": 1}.get(dtype, 4)
      out.append((m.group(2), n, n * size))
  return out


def main():
  result = {"meshes": {}}
  v = 64
  z, y, h, w = data(v)
  ref = lambda z: jxent.softmax_cross_entropy_with_integer_labels(z, y, **OPTS)
  ref_lin = lambda h, w: jxent.softmax_cross_entropy_with_integer_labels(h @ w, y, **OPTS)
  g_ref = jax.grad(lambda z: ref(z).mean())(z)
  gl_ref = jax.grad(lambda h, w: ref_lin(h, w).mean(), argnums=(0, 1))(h, w)
  for shape in [(1, 8), (2, 4), (8, 1)]:
    mesh = jax.make_mesh(shape, ("data", "model"))
    f = jxent.sharded.make_vocab_parallel_loss(mesh, **OPTS)
    fl = jxent.sharded.make_vocab_parallel_loss(mesh, linear=True, chunk_size=4, **OPTS)
    step = jax.jit(jax.value_and_grad(lambda z: f(z, y).mean()))
    step_lin = jax.jit(jax.value_and_grad(lambda h, w: fl(h, w, y).mean(), argnums=(0, 1)))
    loss, g = step(z)
    loss_l, (gh, gw) = step_lin(h, w)
    result["meshes"]["x".join(map(str, shape))] = {
        "loss": rel(f(z, y), ref(z)), "grad": rel(g, g_ref),
        "mean": abs(float(loss) - float(ref(z).mean())) / float(ref(z).mean()),
        "linear_loss": rel(fl(h, w, y), ref_lin(h, w)),
        "linear_mean": abs(float(loss_l) - float(ref_lin(h, w).mean())) / float(
            ref_lin(h, w).mean()),
        "linear_grad_h": rel(gh, gl_ref[0]), "linear_grad_w": rel(gw, gl_ref[1]),
    }
  # Communication: collectives of the whole training step at two vocabulary sizes.
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  comm = {}
  for v in (256, 1024):
    z, y, h, w = data(v, seed=1)
    f = jxent.sharded.make_vocab_parallel_loss(mesh, **OPTS)
    fl = jxent.sharded.make_vocab_parallel_loss(mesh, linear=True, chunk_size=4, **OPTS)
    txt = jax.jit(jax.value_and_grad(lambda z: f(z, y).mean())).lower(z).compile().as_text()
    txt_l = jax.jit(jax.value_and_grad(lambda h, w: fl(h, w, y).mean(), argnums=(0, 1))) \
        .lower(h, w).compile().as_text()
    comm[v] = {"logits": collectives(txt), "linear": collectives(txt_l)}
  result["comm"] = {str(k): v for k, v in comm.items()}
  result["logits_elements"] = {str(v): N * v for v in (256, 1024)}
  print(json.dumps(result))


if __name__ == "__main__":
  main()
