"""jxent.sharded on an 8-device CPU mesh and across two jax.distributed processes.

The device count has to be fixed before JAX starts, so the checks run in subprocesses
(tests/_sharded_worker.py, tests/_multihost_worker.py) and are asserted here.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest

# The 8-device subprocess runs once per session: under xdist it starts in the background
# after collection (conftest.py) and the fixture waits for its result.

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def worker(request):
  path = conftest.sharded_result_path(request.config)
  if path is None:  # without xdist: run it here
    return conftest.run_sharded_worker()
  deadline = time.monotonic() + 900
  while not path.exists():  # started in the background by the first xdist worker
    assert time.monotonic() < deadline, "the 8-device worker did not finish"
    time.sleep(0.5)
  result = json.loads(path.read_text())
  assert "ok" in result, result.get("error")
  return result["ok"]


@pytest.mark.parametrize("mesh", ["1x8", "2x4", "8x1"])
def test_loss_and_gradients_equal_unsharded(worker, mesh):
  r = worker["meshes"][mesh]
  for key, err in r.items():
    assert err < 1e-5, (mesh, key, err)


def test_vocab_parallel_loss_keeps_no_logits_sized_buffer(worker):
  # The training step's scratch per device, relative to its block of logits (the gradient is
  # an output): a few [N] statistics. Autodiff through a tiny loss's sharp form kept four
  # blocks (its value is another form of lse - z_y and is differentiated as that).
  assert worker["scratch"] < 0.1, worker["scratch"]


def test_confident_label_keeps_relative_accuracy_across_shards(worker):
  # True losses of 1e-9 .. 1e-13 to rtol 1e-6 (lse - z_y would round them to 0); the
  # gradient's entries of 1e-9 .. 1e-8 off the label to rtol 1e-5, its label entry p_y - 1
  # to float32's resolution at 1.
  r = worker["confident"]
  assert r["loss"] < 1e-6 and r["linear_loss"] < 1e-6, r
  assert r["linear_real_head"] < 1e-4, r  # float64 logits: their float32 rounding at |z| ~ 30
  assert r["grad_others"] < 1e-5 and r["grad_label"] < 2**-21, r


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_property_sharded_equals_unsharded_in_every_reduction(worker, reduction):
  assert worker["property"][reduction] < 1e-5


@pytest.mark.parametrize("kind", ["explicit", "auto", "classic"])
def test_every_mesh_axis_type(worker, kind):
  r = worker["axis_types"][kind]
  want = {"vocab_parallel", "vocab_parallel_traced_options", "shard_map_fused_grad_h",
          "shard_map_fused_grad_w"}
  if kind != "classic":
    want |= {"class_weights", "fused_grad_h", "fused_grad_w", "fused_weights_grad_h",
             "fused_weights_grad_w", "fused_weights_grad_weights", "fused_scaled_grad_h",
             "fused_scaled_grad_w", "fused_stats_entropy", "fused_stats_argmax",
             "policy_grad_h", "policy_grad_w", "shift_grad_h", "preference_grad_h",
             "preference_grad_w",
             "head_log_probs_entropy",
             "head_entropy_mean", "head_distillation", "head_topk", "head_dense",
             "head_token_stats",
             "ctc"}
  assert set(r) == want
  for key, err in r.items():
    assert err < 1e-5, (kind, key, err)


@pytest.mark.parametrize("kind", ["logits", "linear"])
def test_only_small_collectives(worker, kind):
  n_local, d, model = 8, 8, 4  # 16 examples over data=2, hidden size 8, vocab over model=4
  sizes = {}
  for v, logits_elems in worker["logits_elements"].items():
    ops = worker["comm"][v][kind]
    assert ops, "expected all-reduces of [N] statistics"
    assert all(op == "all-reduce" for op, _, _ in ops)
    if kind == "linear":
      # dW of the local weight shard [D, V / model] is summed over the *data* axis: that is
      # data parallelism's gradient reduction (once per step, independent of N).
      w_shard = d * int(v) // model
      assert sum(n == w_shard for _, n, _ in ops) == 1
      ops = [o for o in ops if o[1] != w_shard]
    # Everything else is per-example statistics or dL/dh: at most [N_local, D], nothing
    # logits-sized.
    assert max(n for _, n, _ in ops) <= n_local * d < logits_elems // 8
    sizes[v] = sum(b for _, _, b in ops)
  # Bytes communicated for the loss do not grow with the vocabulary (O(N), not O(N V)).
  assert sizes["256"] == sizes["1024"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_with_jax_distributed():
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(HERE / "_multihost_worker.py"), str(i), port],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=conftest.WORKER_ENV)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("jax.distributed processes did not finish")
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, out[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    assert fields["process"] == str(i) and fields["devices"] == "4" and fields["local"] == "2"
    assert float(fields["loss_err"]) < 1e-5 and float(fields["grad_err"]) < 1e-5


def test_vocab_parallel_head_quantities_equal_unsharded(worker):
  # Log-probs, entropy, both from one pass, token stats, forward and reverse KL and JS on a
  # (data=2, model=4) mesh (both weight layouts; JS also as a mean) against the unsharded
  # functions in float64: values, the gradient in every float argument (student and
  # teacher) under a non-uniform cotangent, and (entropy, JS) Hessian-vector products.
  r = dict(worker["head"])
  comm = r.pop("comm")
  names = ("log_probs", "entropy", "log_probs_entropy", "kl_forward", "kl_reverse", "js",
           "log_probs_vd", "js_mean_vd")
  assert all(f"{n}_grad1" in r for n in names) and "js_grad4" in r and "js_mean_vd_grad4" in r
  assert "js_hvp1" in r and "entropy_hvp1" in r
  assert {"stats_logsumexp", "stats_entropy", "stats_argmax", "stats_label_log_prob"} <= set(r)
  for key, err in r.items():
    assert err < 1e-12, (key, err)
  # A distillation step's collectives: all-reduces of [N] statistics and of dL/dh (at most
  # [N_local, D] = 8 x 8), and the data axis' reduction of each weight shard's gradient
  # ([D, V / 4] = 8 x 256); nothing of the logits' size (N x V = 16 x 1024).
  assert comm and all(op == "all-reduce" for op, _, _ in comm)
  assert all(n <= 8 * 8 or n == 8 * 256 for _, n, _ in comm)


def test_vocab_parallel_losses_take_every_option_of_the_unsharded_ones(worker):
  # In float64 on a (data=2, model=4) mesh: the linear loss with a bias, a mask, both layouts,
  # smoothing, z-loss, a softcap (with smoothing: each shard's capped sum), per-token and
  # class weights, token scaling, every reduction, its logsumexp and statistics; the loss on
  # logits with a mask and class weights; make_vocab_parallel_loss's extra outputs; shift
  # on the loss and the log-probabilities. Values,
  # and gradients in every float argument (hidden, weight, bias, class and token weights).
  r = worker["options"]
  assert {"smooth_zloss_vd_lse", "smooth_zloss_vd_argmax", "softcap_smooth_scaled_entropy",
          "class_weights_weights_mean_grad3", "class_weights_weights_mean_grad4",
          "softcap_class_weights_sum_grad4", "dense_where_class_weights_grad1",
          "maker_label_log_prob", "shift_0", "shift_5"} <= set(r)
  for key, err in r.items():
    assert err < 1e-12, (key, err)


def _one_device(f, *args, specs):
  """``f`` inside shard_map over a one-device "model" axis (the trace-time checks)."""
  import jax
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  return jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P())(*args)


def test_vocab_parallel_losses_check_their_options():
  import re

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jxent

  h, w, y = jnp.ones((4, 3)), jnp.ones((3, 8)), jnp.arange(4)
  lin = lambda **kw: lambda h, w, y: jxent.sharded.vocab_parallel_linear_cross_entropy(
      h, w, y, axis_name="model", reduction="sum", **kw)
  specs = (P(), P(None, "model"), P())
  cases = [
      (dict(where=jnp.ones(3, bool)), "where must be a boolean mask of labels' shape (4,)"),
      (dict(where=jnp.ones(4)), "where must be a boolean mask of labels' shape"),
      (dict(weights=jnp.ones(5)), "weights must have hidden's shape without D, i.e. (4,)"),
      (dict(class_weights=jnp.ones(7)), "class_weights must have shape (8,)"),
      (dict(class_weights=jnp.ones(8), label_smoothing=0.1, logit_softcap=2.0),
       "class_weights, label_smoothing and logit_softcap together"),
      (dict(weight_layout="dvv"), "weight_layout must be 'dv' or 'vd'"),
      (dict(return_stats=1), "return_stats must be"),
  ]
  for kw, msg in cases:
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
      _one_device(lin(**kw), h, w, y, specs=specs)
  with pytest.raises(ValueError, match=re.escape("labels must have hidden's shape without D")):
    _one_device(lin(), h, w, jnp.arange(3), specs=specs)
  with pytest.raises(ValueError, match=re.escape("where must be a boolean mask of labels'")):
    _one_device(lambda z, y: jxent.sharded.vocab_parallel_cross_entropy(
        z, y, axis_name="model", where=jnp.ones(2, bool), reduction="sum"),
        h @ w, y, specs=(P(None, "model"), P()))
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  with pytest.raises(ValueError, match="shift .* has no sequences to move along"):
    jxent.sharded.make_vocab_parallel_loss(mesh, linear=True, shift=1)
  with pytest.raises(ValueError, match="does not take bias, class_weights: arrays"):
    jxent.sharded.make_vocab_parallel_loss(mesh, linear=True, bias=jnp.ones(8),
                                           class_weights=jnp.ones(8))
