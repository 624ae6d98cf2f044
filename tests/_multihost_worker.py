"""One process of a two-process jax.distributed run on CPU (started by test_sharded.py)."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2").strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU mesh by design, also on a GPU machine

import jax  # noqa: E402

pid, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jxent  # noqa: E402

N, V = 16, 64
rng = np.random.default_rng(0)  # the same data on both hosts
z = (rng.normal(size=(N, V)) * 3).astype(np.float32)
y = rng.integers(0, V, size=N).astype(np.int32)
y[1] = -100
mesh = jax.make_mesh((1, 4), ("data", "model"))  # 4 devices: 2 per process
zs = jax.make_array_from_callback(z.shape, NamedSharding(mesh, P("data", "model")),
                                  lambda idx: z[idx])
ys = jax.make_array_from_callback(y.shape, NamedSharding(mesh, P("data")), lambda idx: y[idx])
loss_fn = jxent.sharded.make_vocab_parallel_loss(mesh, ignore_index=-100, label_smoothing=0.1)
mean = jax.jit(lambda z, y: loss_fn(z, y).mean())(zs, ys)
grad = jax.jit(jax.grad(lambda z, y: loss_fn(z, y).mean()))(zs, ys)
ref = jxent.softmax_cross_entropy_with_integer_labels(z, y, ignore_index=-100,
                                                       label_smoothing=0.1)
ref_grad = jax.grad(lambda z: jxent.softmax_cross_entropy_with_integer_labels(
    z, y, ignore_index=-100, label_smoothing=0.1).mean())(z)
local = [np.abs(np.asarray(s.data) - np.asarray(ref_grad)[s.index]).max()
         for s in grad.addressable_shards]
print(f"RESULT process={pid} devices={jax.device_count()} local={jax.local_device_count()} "
      f"loss_err={abs(float(mean) - float(ref.mean())):.3e} grad_err={max(local):.3e}",
      flush=True)
jax.distributed.shutdown()
