"""Checks of jxent.sharded on an 8-device CPU mesh; run by test_sharded.py in a subprocess
(the device count must be set before JAX starts). Prints one JSON object."""

import contextlib
import json
import os
import re

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU mesh by design, also on a GPU machine

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jxent  # noqa: E402
from jxent._platform import use_implementation  # noqa: E402

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
  cot = jnp.linspace(0.3, 1.7, N)  # a non-uniform cotangent of the per-example losses
  g_ref = jax.grad(lambda z: jnp.sum(cot * ref(z)))(z)
  gl_ref = jax.grad(lambda h, w: jnp.sum(cot * ref_lin(h, w)), argnums=(0, 1))(h, w)
  for shape in [(1, 8), (2, 4), (8, 1)]:
    mesh = jax.make_mesh(shape, ("data", "model"))
    f = jxent.sharded.make_vocab_parallel_loss(mesh, **OPTS)
    fl = jxent.sharded.make_vocab_parallel_loss(mesh, linear=True, chunk_size=4, **OPTS)
    step = jax.jit(jax.value_and_grad(lambda z: jnp.sum(cot * f(z, y))))
    step_lin = jax.jit(jax.value_and_grad(lambda h, w: jnp.sum(cot * fl(h, w, y)),
                                          argnums=(0, 1)))
    loss, g = step(z)
    loss_l, (gh, gw) = step_lin(h, w)
    want, want_l = float(jnp.sum(cot * ref(z))), float(jnp.sum(cot * ref_lin(h, w)))
    result["meshes"]["x".join(map(str, shape))] = {
        "loss": rel(f(z, y), ref(z)), "grad": rel(g, g_ref),
        "weighted_sum": abs(float(loss) - want) / want,
        "linear_loss": rel(fl(h, w, y), ref_lin(h, w)),
        "linear_weighted_sum": abs(float(loss_l) - want_l) / want_l,
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
  result["axis_types"] = {k: axis_type_checks(k) for k in ("explicit", "auto", "classic")}
  result["scratch"] = vocab_parallel_scratch()
  result["confident"] = confident_labels()
  result["property"] = sharded_equals_unsharded()
  result["head"] = head_quantities()
  result["options"] = loss_options()
  print(json.dumps(result))


def vocab_parallel_scratch():
  """XLA's per-device scratch of the vocab-parallel loss's value_and_grad, [128, 2048] float32
  logits on the 2x4 mesh, relative to one device's [64, 512] block of them."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  z = jax.ShapeDtypeStruct((128, 2048), jnp.float32,
                           sharding=NamedSharding(mesh, P("data", "model")))
  y = jax.ShapeDtypeStruct((128,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
  f = jxent.sharded.make_vocab_parallel_loss(mesh)
  temp = jax.jit(jax.value_and_grad(lambda z, y: f(z, y).mean())).lower(z, y).compile() \
      .memory_analysis().temp_size_in_bytes
  return temp / (64 * 512 * 4)


def confident_labels():
  """A confident correct label (true loss 1e-9 .. 1e-13, which lse - z_y rounds to 0): the
  sharded losses (on logits, and linear) against log1p(sum_{c != y} e^(z_c - z_y)) in
  float64 (relative error), and the first one's gradient against cot (p - onehot(y)):
  relative error off the label, absolute error at the label (p_y - 1 rounds at the scale of
  1, as unsharded)."""
  import numpy as np
  from jax.sharding import PartitionSpec as P
  v = 32
  mesh = jax.make_mesh((1, 8), ("data", "model"))
  z = np.array(jax.random.normal(jax.random.PRNGKey(3), (N, v)), np.float32)
  y = np.arange(N) * 5 % v
  z[np.arange(N), y] += np.linspace(20.0, 30.0, N, dtype=np.float32)  # label on every shard
  cot = np.linspace(0.5, 1.5, N)
  f = jax.jit(jax.shard_map(
      lambda z, y: jxent.sharded.vocab_parallel_cross_entropy(z, y, axis_name="model"),
      mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P()))
  zd = z.astype(np.float64)
  gap = zd - zd[np.arange(N), y][:, None]
  gap[np.arange(N), y] = -np.inf
  want = np.log1p(np.sum(np.exp(gap), axis=1))
  p = np.exp(zd - np.log(np.sum(np.exp(zd), axis=1, keepdims=True)))
  g_want = cot[:, None] * (p - np.eye(v)[y])
  # The linear loss with the identity as its head (its logits are z), the head's columns
  # split over "model" like the logits.
  fl = jax.jit(jax.shard_map(
      lambda h, w, y: jxent.sharded.vocab_parallel_linear_cross_entropy(
          h, w, y, axis_name="model", chunk_size=8),
      mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  eye = put(np.eye(v, dtype=np.float32), P(None, "model"))
  h = put(z, P())
  z, y = put(z, P(None, "model")), put(y, P())
  with jax.set_mesh(mesh):
    g = jax.grad(lambda z: jnp.sum(jnp.asarray(cot, jnp.float32) * f(z, y)))(z)
    loss = f(z, y)
    linear = fl(h, eye, y)
  # A real head (D = 256): the label's logit h . w_y, computed apart, differs from the
  # block's by rounding; its own term must stay out of the tail. Against float64 logits.
  # 64 classes a shard, where XLA's product blocks differ from the label's dot.
  rng = np.random.default_rng(3)
  hr = rng.standard_normal((N, 256)).astype(np.float32)
  wr = (rng.standard_normal((256, 512)) * 0.01).astype(np.float32)
  yr = np.arange(N) * 37 % 512
  for i in range(N):
    wr[:, yr[i]] += hr[i] * (28.0 / (hr[i] @ hr[i]))
  zr = hr.astype(np.float64) @ wr.astype(np.float64)
  gap = zr - zr[np.arange(N), yr][:, None]
  gap[np.arange(N), yr] = -np.inf
  want_r = np.log1p(np.sum(np.exp(gap), axis=1))
  real = []
  for impl in ("platform", "accelerator"):  # token chunks, then vocabulary blocks (GPU, TPU)
    f_r = jax.jit(jax.shard_map(
        lambda h, w, y: jxent.sharded.vocab_parallel_linear_cross_entropy(
            h, w, y, axis_name="model", chunk_size=8),
        mesh=mesh, in_specs=(P(), P(None, "model"), P()), out_specs=P()))
    with jax.set_mesh(mesh), (use_implementation(impl) if impl != "platform"
                              else contextlib.nullcontext()):
      real.append(f_r(put(hr, P()), put(wr, P(None, "model")), put(yr, P())))
  err = np.abs(np.asarray(g, np.float64) - g_want)
  label = np.eye(v, dtype=bool)[y]
  return {"loss": float(np.max(np.abs(np.asarray(loss, np.float64) - want) / want)),
          "linear_loss": float(np.max(np.abs(np.asarray(linear, np.float64) - want) / want)),
          "linear_real_head": max(float(np.max(np.abs(np.asarray(x, np.float64) - want_r)
                                               / want_r)) for x in real),
          "grad_others": float(np.max(err[~label] / np.abs(g_want[~label]))),
          "grad_label": float(np.max(err[label]))}


def sharded_equals_unsharded():
  """Hypothesis property: inside shard_map over a vocabulary split in 8, every reduction of
  vocab_parallel_cross_entropy equals the unsharded loss (random logits, labels, options)."""
  import hypothesis.extra.numpy as hnp
  import numpy as np
  from hypothesis import given, settings
  from hypothesis import strategies as st
  from jax.sharding import PartitionSpec as P

  v = 32
  mesh = jax.make_mesh((1, 8), ("data", "model"))
  worst = {"none": 0.0, "sum": 0.0, "mean": 0.0}
  fns = {}
  for red in worst:
    def local(z, y, eps, zl, red=red):
      return jxent.sharded.vocab_parallel_cross_entropy(
          z, y, axis_name="model", ignore_index=-100, label_smoothing=eps, z_loss=zl,
          reduction=red)
    # The vocabulary split over "model"; the examples whole on every device.
    fns[red] = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "model"), P(), P(),
                                                                  P()), out_specs=P()))

  @settings(max_examples=25, deadline=None)
  @given(hnp.arrays(np.float32, (N, v), elements=st.floats(-50, 50, width=32)),
         hnp.arrays(np.int32, (N,), elements=st.integers(-1, v - 1)),
         st.floats(0, 0.5), st.floats(0, 0.1))
  def check(z, y, eps, zl):
    y = np.where(y < 0, -100, y)  # some ignored examples
    put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    args = (put(z, P(None, "model")), put(y, P()), put(np.float32(eps), P()),
            put(np.float32(zl), P()))
    for red, f in fns.items():
      got = f(*args)
      want = jxent.softmax_cross_entropy_with_integer_labels(
          z, y, ignore_index=-100, label_smoothing=eps, z_loss=zl, reduction=red)
      err = float(jnp.max(jnp.abs(got - want)) / max(float(jnp.max(jnp.abs(want))), 1e-6))
      worst[red] = max(worst[red], err)

  check()
  return worst


def axis_type_checks(kind):
  """Errors against the unsharded loss on a 2x4 mesh of each kind: the vocab-parallel loss,
  data-parallel shard_map around the fused loss with grad, and jit with batch-sharded inputs."""
  from functools import partial

  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  if kind == "classic":
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  else:
    t = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(t, t))
  v = 64
  z, y, h, w = data(v, seed=2)
  y = jnp.clip(y, 0, v - 1)
  out = {}
  ref = jxent.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=0.1)
  f = jxent.sharded.make_vocab_parallel_loss(mesh, label_smoothing=0.1)
  out["vocab_parallel"] = rel(f(z, y), ref)
  traced = jax.jit(lambda eps, zl: jxent.sharded.make_vocab_parallel_loss(
      mesh, label_smoothing=eps, z_loss=zl)(z, y))(0.1, 1e-3)
  out["vocab_parallel_traced_options"] = rel(
      traced, jxent.softmax_cross_entropy_with_integer_labels(z, y, label_smoothing=0.1,
                                                              z_loss=1e-3))
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  hs, ys, zs = put(h, P("data")), put(y, P("data")), put(z, P("data"))

  @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=P())
  def dp(h, w, y):
    return jax.lax.pmean(jxent.linear_cross_entropy(h, w, y, chunk_size=4), "data")

  ref_dp = lambda h, w: jxent.softmax_cross_entropy_with_integer_labels(h @ w, y,
                                                                        reduction="mean")
  g = jax.jit(jax.grad(dp, argnums=(0, 1)))(hs, put(w, P()), ys)
  g0 = jax.grad(ref_dp, argnums=(0, 1))(h, w)
  out["shard_map_fused_grad_h"] = rel(g[0], g0[0])
  out["shard_map_fused_grad_w"] = rel(g[1], g0[1])
  if kind != "classic":
    with jax.set_mesh(mesh):
      cw = jnp.linspace(0.5, 2.0, v)
      lw = jax.jit(lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(
          z, y, class_weights=cw, reduction="mean"))(zs, ys)
      out["class_weights"] = rel(lw, jxent.softmax_cross_entropy_with_integer_labels(
          z, y, class_weights=cw, reduction="mean"))
      gl = jax.jit(jax.grad(lambda h, w, y: jxent.linear_cross_entropy(h, w, y),
                            argnums=(0, 1)))(hs, w, ys)
      out["fused_grad_h"] = rel(gl[0], g0[0])
      out["fused_grad_w"] = rel(gl[1], g0[1])
      # per-token weights with the tokens over the mesh: the weighted mean and its gradients
      tw = jnp.linspace(0.2, 1.8, y.shape[0])
      wmean = lambda h, w, tw: jnp.sum(tw * jxent.softmax_cross_entropy_with_integer_labels(
          h @ w, y)) / jnp.sum(tw)
      gw = jax.jit(jax.grad(lambda h, w, tw: jxent.linear_cross_entropy(h, w, ys, weights=tw),
                            argnums=(0, 1, 2)))(hs, w, put(tw, P("data")))
      gw0 = jax.grad(wmean, argnums=(0, 1, 2))(h, w, tw)
      out["fused_weights_grad_h"] = rel(gw[0], gw0[0])
      out["fused_weights_grad_w"] = rel(gw[1], gw0[1])
      out["fused_weights_grad_weights"] = rel(gw[2], gw0[2])
      # return_stats and token_scaling with the tokens over the mesh: the loss
      # mean_i sg(p_i) (-log p_i), its gradients, and the statistics laid out as the tokens.
      def scaled(h, w):
        nll = jxent.softmax_cross_entropy_with_integer_labels(h @ w, y)
        return jnp.mean(jax.lax.stop_gradient(jnp.exp(-nll)) * nll)

      (_, st), gs = jax.jit(jax.value_and_grad(
          lambda h, w, y: jxent.linear_cross_entropy(h, w, y, return_stats=True,
                                                     token_scaling=True),
          argnums=(0, 1), has_aux=True))(hs, w, ys)
      gs0 = jax.grad(scaled, argnums=(0, 1))(h, w)
      out["fused_scaled_grad_h"] = rel(gs[0], gs0[0])
      out["fused_scaled_grad_w"] = rel(gs[1], gs0[1])
      out["fused_stats_entropy"] = rel(st.entropy, jxent.entropy_from_logits(h @ w))
      out["fused_stats_argmax"] = float(jnp.mean(st.argmax != jnp.argmax(h @ w, -1)))
      # A policy loss (GRPO's clipped ratio, a KL term) with the sequences over the mesh:
      # each device's sum formed with its gradients, only scalars across devices.
      seqs = lambda a: a.reshape(8, -1, *a.shape[1:])
      old = jnp.linspace(-5.0, -3.0, y.shape[0])
      adv = jnp.linspace(-1.0, 1.0, 8)
      pol = lambda lp: jxent.policy_loss(lp, adv, old_log_probs=seqs(old),
                                         ref_log_probs=seqs(old) + 0.5, beta=0.1,
                                         loss_type="grpo")
      gp0 = jax.grad(lambda h, w: pol(seqs(-jxent.softmax_cross_entropy_with_integer_labels(
          h @ w, y))), argnums=(0, 1))(h, w)
      gp = jax.jit(jax.grad(lambda h, w, y, o, a: jxent.linear_policy_loss(
          h, w, y, a, old_log_probs=o, ref_log_probs=o + 0.5, beta=0.1, loss_type="grpo",
          chunk_size=4), argnums=(0, 1)))(put(seqs(h), P("data")), w, put(seqs(y), P("data")),
                                          put(seqs(old), P("data")), put(adv, P("data")))
      out["policy_grad_h"] = rel(gp[0].reshape(h.shape), gp0[0])
      out["policy_grad_w"] = rel(gp[1], gp0[1])
      # Next-token alignment (shift=1) with the sequences over the mesh: the loss of
      # hidden[:, :-1] on labels[:, 1:], its gradient in h (last positions 0).
      nxt = lambda h, w: jxent.softmax_cross_entropy_with_integer_labels(
          seqs(h)[:, :-1] @ w, seqs(y)[:, 1:], ignore_index=-100, reduction="mean")
      gn0 = jax.grad(nxt)(h, w)
      gn = jax.jit(jax.grad(lambda h, w, y: jxent.linear_cross_entropy(
          h, w, y, ignore_index=-100, shift=1)))(put(seqs(h), P("data")), w,
                                                 put(seqs(y), P("data")))
      out["shift_grad_h"] = rel(gn.reshape(h.shape), gn0.reshape(h.shape))
      # A preference loss (DPO against a reference) with the pairs over the mesh (the
      # per-token log-probabilities there), as on one device (whole pairs per block).
      pairs = lambda a: a.reshape(2, 4, -1, *a.shape[1:])
      dpo = lambda h, w, y, r: jxent.linear_preference_loss(h, w, y, ref_log_probs=r,
                                                            nll_weight=0.5)
      gd0 = jax.grad(dpo, argnums=(0, 1))(pairs(h), w, pairs(y), pairs(old))
      on_mesh = lambda a: put(pairs(a), P(None, "data"))
      gd = jax.jit(jax.grad(dpo, argnums=(0, 1)))(on_mesh(h), w, on_mesh(y), on_mesh(old))
      out["preference_grad_h"] = rel(gd[0], gd0[0])
      out["preference_grad_w"] = rel(gd[1], gd0[1])
      # The other head functions with the tokens over the mesh: value and gradient in h
      # (a non-uniform cotangent for the per-token outputs) as unsharded.
      cot = jnp.linspace(0.5, 1.5, y.shape[0])
      keep = jnp.arange(y.shape[0]) % 5 != 3
      idx = (jnp.arange(y.shape[0])[:, None] * 3 + jnp.arange(4)[None, :]) % v
      lpt = jnp.log(jnp.full((y.shape[0], 4), 0.2))
      ignore = int(y[0])
      heads = {
          "head_log_probs_entropy": lambda h, ht, y, m: jnp.sum(cot * sum(
              jxent.linear_log_probs(h, w, y, where=m, return_entropy=True))),
          "head_entropy_mean": lambda h, ht, y, m: jxent.linear_entropy(
              h, w, where=m, weights=cot, reduction="mean"),
          "head_distillation": lambda h, ht, y, m: jxent.linear_distillation_loss(
              h, w, ht, w, y, divergence="js", ignore_index=ignore, where=m),
          "head_topk": lambda h, ht, y, m: jxent.linear_topk_kl_divergence(
              h, w, idx, lpt, where=m, reduction="sum"),
          "head_dense": lambda h, ht, y, m: jxent.linear_topk_kl_divergence(
              h, w, None, jax.nn.log_softmax(z), where=m, reduction="mean"),
      }
      for key, fn in heads.items():
        v0, g0 = jax.value_and_grad(fn)(h, h[::-1], y, keep)
        v1, g1 = jax.jit(jax.value_and_grad(fn))(hs, put(h[::-1], P("data")), ys,
                                                 put(keep, P("data")))
        out[key] = max(rel(v1, v0), rel(g1, g0))
      st = jax.jit(lambda h, y: jxent.linear_token_stats(h, w, y))(hs, ys)
      out["head_token_stats"] = rel(st.entropy, jxent.linear_token_stats(h, w, y).entropy)
      # CTC with the sequences over the mesh: per-sequence losses and the logits' gradient
      # (a non-uniform cotangent), then the mean, as unsharded.
      zc = z.reshape(-1)[:384].reshape(8, 6, 8)
      yc = (jnp.arange(24).reshape(8, 3) * 5) % 7 + 1  # no blank (0)
      fpc = (jnp.arange(6)[None, :] >= jnp.array([6, 5, 6, 4, 6, 6, 5, 6])[:, None]) * 1.0
      lpc = (jnp.arange(3)[None, :] >= jnp.array([3, 2, 3, 3, 1, 3, 2, 3])[:, None]) * 1.0
      ctc = lambda z, fp, y, lp: jnp.sum(cot[:8] * jxent.ctc_loss(z, fp, y, lp))
      v0, g0 = jax.value_and_grad(ctc)(zc, fpc, yc, lpc)
      v1, g1 = jax.jit(jax.value_and_grad(ctc))(*(put(a, P("data")) for a in (zc, fpc, yc, lpc)))
      mean = jax.jit(lambda *a: jxent.ctc_loss(*a, reduction="mean"))(
          *(put(a, P("data")) for a in (zc, fpc, yc, lpc)))
      out["ctc"] = max(rel(v1, v0), rel(g1, g0),
                       rel(mean, jxent.ctc_loss(zc, fpc, yc, lpc, reduction="mean")))
  return out


def head_quantities():
  """The vocab-parallel head quantities against the unsharded functions, in float64 on a
  (data=2, model=4) mesh: values, gradients in every float argument under a non-uniform
  cotangent, Hessian-vector products, and the collectives of a distillation step."""
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P

  out = {}
  sh = jxent.sharded
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  tok, col, vec = P("data"), P(None, "model"), P("model")
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.PRNGKey(3), 8)
    n, d, dt, v = 12, 5, 3, 32
    h = jax.random.normal(k[0], (n, d), jnp.float64)
    w = jax.random.normal(k[1], (d, v), jnp.float64)
    b = jax.random.normal(k[2], (v,), jnp.float64)
    ht = jax.random.normal(k[3], (n, dt), jnp.float64)
    wt = 2 * jax.random.normal(k[4], (dt, v), jnp.float64)
    y = jax.random.randint(k[5], (n,), 0, v)
    mask = jax.random.uniform(k[6], (n,)) > 0.2
    cot = jax.random.uniform(k[7], (n,), jnp.float64, 0.5, 1.5)
    kw = dict(temperature=0.8)  # both forms
    kin = dict(kw, axis_name="model", chunk_size=4)  # the sharded form
    pair = dict(teacher_grad=True, reduction="none")

    def smap(f, specs, out_specs=tok):
      return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=out_specs)

    one = (tok, col, vec, tok, tok)  # h, w, b, y, mask
    two = (tok, col, vec, tok, col, tok)  # h, w, b, ht, wt, mask
    cases = {
        "log_probs": (
            smap(lambda h, w, b, y, m: sh.vocab_parallel_linear_log_probs(
                h, w, y, bias=b, where=m, **kin), one),
            lambda h, w, b, y, m: jxent.linear_log_probs(h, w, y, bias=b, where=m, **kw),
            (h, w, b), (y, mask)),
        "entropy": (
            smap(lambda h, w, b, y, m: sh.vocab_parallel_linear_entropy(
                h, w, bias=b, where=m, **kin), one),
            lambda h, w, b, y, m: jxent.linear_entropy(h, w, bias=b, where=m, **kw),
            (h, w, b), (y, mask)),
        # both from one pass, stacked [2, n]
        "log_probs_entropy": (
            smap(lambda h, w, b, y, m: jnp.stack(sh.vocab_parallel_linear_log_probs(
                h, w, y, bias=b, where=m, return_entropy=True, **kin)), one,
                 out_specs=P(None, "data")),
            lambda h, w, b, y, m: jnp.stack(jxent.linear_log_probs(
                h, w, y, bias=b, where=m, return_entropy=True, **kw)),
            (h, w, b), (y, mask)),
    }
    for name, extra in (("kl_forward", {}), ("kl_reverse", {"direction": "reverse"})):
      cases[name] = (
          smap(lambda h, w, b, ht, wt, m, e=extra: sh.vocab_parallel_linear_kl_divergence(
              h, w, ht, wt, student_bias=b, where=m, **pair, **e, **kin), two),
          lambda h, w, b, ht, wt, m, e=extra: jxent.linear_kl_divergence(
              h, w, ht, wt, student_bias=b, where=m, **pair, **e, **kw),
          (h, w, b, ht, wt), (mask,))
    cases["js"] = (
        smap(lambda h, w, b, ht, wt, m: sh.vocab_parallel_linear_js_divergence(
            h, w, ht, wt, student_bias=b, where=m, beta=0.3, **pair, **kin), two),
        lambda h, w, b, ht, wt, m: jxent.linear_js_divergence(
            h, w, ht, wt, student_bias=b, where=m, beta=0.3, **pair, **kw),
        (h, w, b, ht, wt), (mask,))
    # The [V, D] layout (the weight's rows split over "model"), with a scalar reduction for
    # the sharded pair (its tokens whole on every device: a mean over all of them).
    row = P("model", None)
    cases["log_probs_vd"] = (
        smap(lambda h, w, b, y, m: sh.vocab_parallel_linear_log_probs(
            h, w, y, bias=b, where=m, weight_layout="vd", **kin), (tok, row, vec, tok, tok)),
        lambda h, w, b, y, m: jxent.linear_log_probs(h, w, y, bias=b, where=m,
                                                     weight_layout="vd", **kw),
        (h, w.T, b), (y, mask))
    cases["js_mean_vd"] = (
        smap(lambda h, w, b, ht, wt, m: sh.vocab_parallel_linear_js_divergence(
            h, w, ht, wt, student_bias=b, where=m, beta=0.3, teacher_grad=True,
            weight_layout="vd", reduction="mean", **kin), (P(), row, vec, P(), row, P()), P()),
        lambda h, w, b, ht, wt, m: jxent.linear_js_divergence(
            h, w, ht, wt, student_bias=b, where=m, beta=0.3, teacher_grad=True,
            weight_layout="vd", reduction="mean", **kw),
        (h, w.T, b, ht, wt.T), (mask,))
    for name, (f, ref, args, rest) in cases.items():
      # One compiled program per case: value, gradient (and for JS a Hessian-vector
      # product) of the sharded and of the unsharded function.
      def both(args, rest, f=f, ref=ref, name=name):
        res = []
        for g in (f, ref):
          loss = lambda *a, g=g: jnp.sum(cot * g(*a, *rest))
          grads = jax.grad(loss, tuple(range(len(args))))(*args)
          hvp = ()
          if name in ("entropy", "js"):
            t = tuple(jnp.cos(a) for a in args)
            hvp = jax.jvp(jax.grad(loss, (0, 1)), args, t)[1]
          res.append((g(*args, *rest), grads, hvp))
        return res

      (val, grads, hvp), (val0, grads0, hvp0) = jax.jit(both)(args, rest)
      out[name] = rel(val, val0)
      for i, (a, c) in enumerate(zip(grads, grads0)):
        out[f"{name}_grad{i}"] = rel(a, c)
      for i, (a, c) in enumerate(zip(hvp, hvp0)):
        out[f"{name}_hvp{i}"] = rel(a, c)
    stats = smap(lambda h, w, b, y, m: sh.vocab_parallel_linear_token_stats(
        h, w, y, bias=b, where=m, **kin), one,
        out_specs=jxent.TokenStats(tok, tok, tok, tok))(h, w, b, y, mask)
    want = jxent.linear_token_stats(h, w, y, bias=b, where=mask, **kw)
    for field, a, c in zip(want._fields, stats, want):
      out[f"stats_{field}"] = rel(a.astype(jnp.float64), c.astype(jnp.float64))
  # The collectives of a distillation step (float32, V = 1024 over 4 shards).
  kl = smap(lambda h, w, ht, wt: sh.vocab_parallel_linear_kl_divergence(
      h, w, ht, wt, axis_name="model", chunk_size=4, reduction="none"), (tok, col, tok, col))
  hb, wb = jnp.ones((16, 8)), jnp.ones((8, 1024))
  txt = jax.jit(jax.grad(lambda h, w: kl(h, w, h, w).mean(), argnums=(0, 1))).lower(
      hb, wb).compile().as_text()
  out["comm"] = collectives(txt)
  return out


def loss_options():
  """The vocab-parallel losses with every option against the unsharded ones, in float64 on a
  (data=2, model=4) mesh: values, gradients in every float argument under a non-uniform
  cotangent, the logsumexp and the statistics; and make_vocab_parallel_loss's outputs."""
  from jax.sharding import AxisType
  from jax.sharding import PartitionSpec as P

  out = {}
  sh = jxent.sharded
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  tok, col, row, vec = P("data"), P(None, "model"), P("model", None), P("model")
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.PRNGKey(4), 8)
    n, d, v = 12, 5, 32
    h = jax.random.normal(k[0], (n, d), jnp.float64)
    w = 2 * jax.random.normal(k[1], (d, v), jnp.float64)
    b = jax.random.normal(k[2], (v,), jnp.float64)
    y = jax.random.randint(k[3], (n,), 0, v).at[3].set(-100)
    mask = jax.random.uniform(k[4], (n,)) > 0.2
    tw = jax.random.uniform(k[5], (n,), jnp.float64, 0.2, 1.8)
    cw = jax.random.uniform(k[6], (v,), jnp.float64, 0.5, 2.0)
    cot = jax.random.uniform(k[7], (n,), jnp.float64, 0.5, 1.5)
    z = h @ w + b
    # name: (options, tokens' spec, weight layout, reduction); the tokens whole on every
    # device for the scalar reductions (a mean over all of them).
    cases = {
        "smooth_zloss_vd": (dict(label_smoothing=0.1, z_loss=1e-3), tok, "vd", "none"),
        "softcap_smooth_scaled": (dict(logit_softcap=3.0, label_smoothing=0.2,
                                       token_scaling=True), tok, "dv", "none"),
        "class_weights_weights_mean": (dict(label_smoothing=0.1, z_loss=1e-2, cw=True,
                                            tw=True), P(), "dv", "mean"),
        "softcap_class_weights_sum": (dict(logit_softcap=2.0, cw=True, tw=True,
                                           token_scaling=True), P(), "vd", "sum"),
    }
    for name, (opts, spec, layout, red) in cases.items():
      o = dict(opts)
      use_cw, use_tw = o.pop("cw", False), o.pop("tw", False)
      stats = red == "none"
      ww = w if layout == "dv" else w.T
      o.update(ignore_index=-100, weight_layout=layout, reduction=red, return_stats=stats,
               return_lse=stats)
      pick = lambda c, t: dict(class_weights=c if use_cw else None,
                               weights=t if use_tw else None)

      def sharded(h, w, b, c, t, o=o, pick=pick, spec=spec, layout=layout, red=red,
                  stats=stats):
        outs = spec if red == "none" else P()
        if stats:
          outs = (spec, spec, jxent.TokenStats(spec, spec, spec, spec))
        f = jax.shard_map(
            lambda h, w, b, c, t, y, m: sh.vocab_parallel_linear_cross_entropy(
                h, w, y, bias=b, where=m, axis_name="model", chunk_size=4, **pick(c, t), **o),
            mesh=mesh, in_specs=(spec, col if layout == "dv" else row, vec, vec, spec, spec,
                                 spec), out_specs=outs)
        return f(h, w, b, c, t, y, mask)

      def ref(h, w, b, c, t, o=o, pick=pick):
        return jxent.linear_cross_entropy(h, w, y, bias=b, where=mask, chunk_size=4,
                                          **pick(c, t), **o)

      def both(args, stats=stats):
        res = []
        for g in (sharded, ref):  # the per-token loss under the cotangent, or the scalar
          loss = lambda *a, g=g: jnp.sum(cot * g(*a)[0]) if stats else g(*a)
          res.append((g(*args), jax.grad(loss, tuple(range(5)))(*args)))
        return res

      (got, grads), (want, grads0) = jax.jit(both)((h, ww, b, cw, tw))
      if not stats:
        out[f"{name}_loss"] = rel(got, want)
      else:
        out[f"{name}_loss"] = rel(got[0], want[0])
        kept = mask & (y != -100)  # the logsumexp is 0 on dropped tokens
        out[f"{name}_lse"] = rel(got[1], jnp.where(kept, want[1], 0))
        for sf, sa, sc in zip(want[2]._fields, got[2], want[2]):
          out[f"{name}_{sf}"] = rel(sa.astype(jnp.float64), sc.astype(jnp.float64))
      for i, (a, c) in enumerate(zip(grads, grads0)):
        if (i == 3 and not use_cw) or (i == 4 and not use_tw):
          assert float(jnp.max(jnp.abs(a))) == 0 == float(jnp.max(jnp.abs(c)))
          continue
        out[f"{name}_grad{i}"] = rel(a, c)
    # The loss on logits with where, class weights and smoothing: a mean and its gradients.
    dense = jax.shard_map(
        lambda z, c, y, m: sh.vocab_parallel_cross_entropy(
            z, y, axis_name="model", where=m, ignore_index=-100, class_weights=c,
            label_smoothing=0.1, z_loss=1e-3, reduction="mean"),
        mesh=mesh, in_specs=(col, vec, P(), P()), out_specs=P())
    dense0 = lambda z, c, y, m: jxent.softmax_cross_entropy_with_integer_labels(
        z, y, where=m, ignore_index=-100, class_weights=c, label_smoothing=0.1, z_loss=1e-3,
        reduction="mean")
    for f, key in ((dense, "dense"), (dense0, "dense0")):
      out[key] = jax.jit(jax.value_and_grad(f, (0, 1)))(z, cw, y, mask)
    (val, g), (val0, g0) = out.pop("dense"), out.pop("dense0")
    out["dense_where_class_weights"] = rel(val, val0)
    out["dense_where_class_weights_grad0"] = rel(g[0], g0[0])
    out["dense_where_class_weights_grad1"] = rel(g[1], g0[1])
    # make_vocab_parallel_loss with the [V, D] layout, a softcap and both extra outputs.
    fl = sh.make_vocab_parallel_loss(mesh, linear=True, weight_layout="vd", logit_softcap=3.0,
                                     label_smoothing=0.1, return_lse=True, return_stats=True,
                                     ignore_index=-100, chunk_size=4)
    loss, lse, st = fl(h, w.T, y)
    loss0, lse0, st0 = jxent.linear_cross_entropy(
        h, w.T, y, weight_layout="vd", logit_softcap=3.0, label_smoothing=0.1,
        ignore_index=-100, reduction="none", return_lse=True, return_stats=True)
    out["maker_loss"] = rel(loss, loss0)
    kept = y != -100
    out["maker_lse"] = rel(jnp.where(kept, lse, 0), jnp.where(kept, lse0, 0))
    for sf, sa, sc in zip(st0._fields, st, st0):
      out[f"maker_{sf}"] = rel(sa.astype(jnp.float64), sc.astype(jnp.float64))
    # shift=2 on [2, 6] sequences (one per data shard): the loss with its logsumexp, and the
    # log-probabilities with the entropy, [2, 4], against the unsharded shifted functions.
    seq = lambda a: a.reshape(2, 6, *a.shape[1:])
    shifted = jax.shard_map(
        lambda h, w, y, m: (sh.vocab_parallel_linear_cross_entropy(
            h, w, y, axis_name="model", ignore_index=-100, return_lse=True, shift=2, where=m),
            sh.vocab_parallel_linear_log_probs(h, w, y, axis_name="model", return_entropy=True,
                                               shift=2, where=m)),
        mesh=mesh, in_specs=(tok, col, tok, tok), out_specs=((tok, tok), (tok, tok)))
    shifted0 = lambda h, w, y, m: (
        jxent.linear_cross_entropy(h, w, y, ignore_index=-100, return_lse=True,
                                   reduction="none", shift=2, where=m),
        jxent.linear_log_probs(h, w, y, return_entropy=True, shift=2, where=m))
    cot2 = seq(cot)[:, 2:]
    ys, ms = jnp.clip(seq(y), 0), seq(mask)
    for f, key in ((shifted, "shift"), (shifted0, "shift0")):
      scalar = lambda h, w, f=f: sum(jnp.sum(cot2 * a) for a in jax.tree.leaves(
          f(h, w, ys, ms)))
      out[key] = jax.jit(lambda h, w, f=f, scalar=scalar: (
          f(h, w, ys, ms), jax.grad(scalar, (0, 1))(h, w)))(seq(h), w)
    (val, g), (val0, g0) = out.pop("shift"), out.pop("shift0")
    for i, (a, c) in enumerate(zip(jax.tree.leaves((val, g)), jax.tree.leaves((val0, g0)))):
      assert a.shape == c.shape, (a.shape, c.shape)
      out[f"shift_{i}"] = rel(a, c)
  return out


if __name__ == "__main__":
  main()
