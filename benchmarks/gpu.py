"""On an accelerator: the test suite, the dense losses and the fused loss against the anchors.

    python -m benchmarks gpu [--smoke] [--budget-s 450] [--out FILE]

One run on one GPU, each step skipped (and said so in the table) when the time budget is spent
or a library is missing, and a step that fails reported without losing the others; the suite
runs first (with at most ``--tests-share`` of the budget), then the fused loss, then the
dense losses:

1. the test suite on the device (``JAX_PLATFORMS`` as set, e.g. ``cuda``; tests that are about
   XLA:CPU skip with a reason), pass/fail/skip counts;
2. softmax CE (integer and soft labels) and sigmoid BCE, float32 and bfloat16, at
   [8192, 50304] and [16384, 128256], forward and forward+backward: jxent against Optax (same
   JAX), PyTorch eager and ``torch.compile``, alternating in one process, medians of the
   per-repetition time ratios with their min–max;
3. the fused linear cross-entropy, bfloat16, weight [V, D], at Cut Cross-Entropy's Gemma-2
   shape (N=8192, D=2304, V=256000) and at (8192, 4096, 128256), forward+backward with
   respect to h and W: jxent (default block, a 256 MiB block, and with Cut Cross-Entropy's
   gradient filter for bfloat16, its tiles by XLA or by the Pallas kernels) against unfused
   JAX, Cut Cross-Entropy (filtered, its default, and exact) and Liger (dW accumulated in
   bfloat16, its default, and in float32); time ratios as above, peak device memory (JAX:
   ``peak_bytes_in_use`` of a fresh process per variant; PyTorch: ``max_memory_allocated``
   after a reset) minus the inputs, and dW's relative distance from the unfused dW;
4. writes the tables with the device, driver and library versions: the "gpu" section of
   benchmarks/RESULTS.md (full runs) and ``--out`` if given.

Steps run on request only (``--steps``): ``head``, the language-model head quantities
against unfused JAX; ``ctc``, the CTC loss against Optax and PyTorch's ``F.ctc_loss`` on the
device; ``cost``, XLA's cost analysis of the dense losses.

``--smoke`` runs the same code on CPU at tiny sizes (no test suite beyond one small file,
missing libraries skipped) and writes only to ``--out``; a test runs it so the script
cannot rot. Cut Cross-Entropy and Liger are pure-Python packages on Triton: on a machine
without a package index, bring them as wheels (``pip download --no-deps
cut-cross-entropy liger-kernel``) and install them before the run.
"""

from __future__ import annotations

import os

# Several frameworks share the device: no framework may take it whole at start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jxent  # noqa: E402
from benchmarks import _harness as H  # noqa: E402
from jxent import _fused, _pallas  # noqa: E402
from jxent._platform import use_implementation  # noqa: E402

DENSE_SHAPES = [(8192, 50304), (16384, 128256)]
FUSED_SHAPES = [(8192, 2304, 256000), (8192, 4096, 128256)]
SMOKE_DENSE = [(64, 1000)]
SMOKE_FUSED = [(128, 32, 1000)]
HEAD_SHAPES = [(8192, 4096, 128256)]
SMOKE_HEAD = [(96, 32, 1000)]
LOSSES = ("int", "soft", "bce")
CTC_SIZES = [(32, 400, 64, 100), (8, 1000, 256, 200)]  # B, T, K, N
SMOKE_CTC = [(2, 12, 5, 3)]
BIG_BLOCK_MIB = 256
ROOT = Path(__file__).resolve().parent.parent


class Budget:
  """Wall-clock budget of the whole run; steps ask before they start."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


def _optional(name: str):
  try:
    return importlib.import_module(name)
  except Exception:  # noqa: BLE001 - any failure to import means "not available"
    return None


def _torch():
  torch = _optional("torch")
  if torch is None:
    return None, None
  dev = "cuda" if (jax.default_backend() == "gpu" and torch.cuda.is_available()) else "cpu"
  return torch, dev


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def environment() -> str:
  dev = jax.devices()[0]
  driver = "n/a"
  if shutil.which("nvidia-smi"):
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True)
    driver = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else "n/a"
  libs = ", ".join(f"{d} {_version(d)}" for d in (
      "jaxlib", "optax", "torch", "triton", "cut-cross-entropy", "liger-kernel"))
  return (f"Device: {dev.platform} ({dev.device_kind}); nvidia-smi: {driver}; host: "
          f"{H.machine()}; {libs}.")


# ------------------------------------------------------------------------ 1. test suite


def run_tests(paths: list[str], timeout_s: float) -> dict:
  """Runs pytest on the default JAX platform; returns counts and the summary line.

  At the time limit pytest gets SIGINT (it then prints its counts so far, "interrupted"),
  and is killed only if it does not stop within 20 s.
  """
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=line", *paths]
  if _optional("xdist") is not None and len(paths) == 1 and paths[0] == "tests":
    cmd += ["-n", str(min(16, os.cpu_count() or 1))]
  t0 = time.monotonic()
  # A wide terminal, so that the summary's failure lines keep their messages.
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT, env=dict(os.environ, COLUMNS="400"))
  rc: int | str
  try:
    text, _ = proc.communicate(timeout=max(timeout_s, 1))
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGINT)
    try:
      text, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      text, _ = proc.communicate()
    rc = "stopped at the time limit"
  lines = text.strip().splitlines() if text.strip() else []
  summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed)", ln)), "")
  counts = {k: int(n) for n, k in re.findall(
      r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", summary)}
  failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
  return {"rc": rc, "seconds": time.monotonic() - t0, "counts": counts,
          "summary": summary or (lines[-1] if lines else ""), "failed": failed, "log": text}


# ------------------------------------------------------------------- 2. dense losses


def _dense_jax(kind: str, grad: bool):
  if kind == "int":
    jx = lambda z, y: jxent.softmax_cross_entropy_with_integer_labels(z, y, reduction="mean")
    ox = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
  elif kind == "soft":
    jx = lambda z, y: jxent.softmax_cross_entropy(z, y, reduction="mean")
    ox = lambda z, y: optax.softmax_cross_entropy(z, y).mean()
  else:
    jx = lambda z, y: jxent.sigmoid_binary_cross_entropy(z, y, reduction="mean")
    ox = lambda z, y: optax.sigmoid_binary_cross_entropy(z, y).mean()
  wrap = (lambda f: jax.jit(jax.value_and_grad(f))) if grad else jax.jit
  return wrap(jx), wrap(ox)


def _dense_inputs(kind, n, c, dtype):
  """Logits and labels drawn on the device 16 row blocks at a time: the float32 temporaries
  of the draw stay small (JAX's allocator keeps its peak, which PyTorch then lacks)."""
  blocks = 16 if n % 16 == 0 else 1

  @jax.jit
  def draw(key):
    def block(k):
      k1, k2 = jax.random.split(k)
      z = (3 * jax.random.normal(k1, (n // blocks, c), jnp.float32)).astype(dtype)
      if kind == "int":
        y = jax.random.randint(k2, (n // blocks,), 0, c)
      elif kind == "soft":
        y = jax.nn.softmax(jax.random.normal(k2, (n // blocks, c), jnp.float32)).astype(dtype)
      else:
        y = (jax.random.uniform(k2, (n // blocks, c)) < 0.1).astype(dtype)
      return z, y
    z, y = jax.lax.map(block, jax.random.split(key, blocks))
    return z.reshape(n, c), y.reshape(n, *y.shape[2:])

  return draw(jax.random.PRNGKey(0))


def xla_costs(shape, out_dir: Path | None) -> list[str]:
  """XLA's cost analysis ("bytes accessed") of each dense loss's compiled forward+backward,
  jxent and Optax, float32 at ``shape``, as markdown rows; the optimized HLO of both soft-label
  programs goes to ``out_dir`` when given."""
  n, c = shape
  rows = []
  for kind in ("int", "soft", "bce"):
    z, y = _dense_inputs(kind, n, c, jnp.float32)
    cost = {}
    for name, f in zip(("jxent", "Optax"), _dense_jax(kind, grad=True)):
      compiled = f.lower(z, y).compile()
      ca = compiled.cost_analysis()
      ca = ca[0] if isinstance(ca, (list, tuple)) else ca
      cost[name] = float(ca.get("bytes accessed", float("nan")))
      if out_dir is not None and kind == "soft":
        (out_dir / f"soft_{name.lower()}.hlo.txt").write_text(compiled.as_text())
    rows.append(f"| [{n}, {c}] | float32 | {kind} | {cost['jxent'] / 1e9:.3g} | "
                f"{cost['Optax'] / 1e9:.3g} | {cost['jxent'] / cost['Optax']:.2f} |")
    del z, y
  return rows


def _dense_torch(torch, kind: str, grad: bool):
  F = torch.nn.functional

  def loss(z, y):  # class ids and probabilities alike go to F.cross_entropy
    if kind == "bce":
      return F.binary_cross_entropy_with_logits(z, y)
    return F.cross_entropy(z, y)

  if not grad:
    return loss

  def fwd_bwd(z, y):
    z = z.detach().requires_grad_(True)
    out = loss(z, y)
    (g,) = torch.autograd.grad(out, z)
    return out, g

  return fwd_bwd


def _to_torch(torch, dev, x):
  if dev == "cuda":
    return torch.from_dlpack(x)  # shares the device buffer: no second copy of the inputs
  a = np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)
  t = torch.from_numpy(a)
  return t.to(torch.bfloat16) if x.dtype == jnp.bfloat16 else t


def _is_oom(e: Exception) -> bool:
  return "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"


def _sync(torch, dev):
  if torch is not None and dev == "cuda":
    torch.cuda.synchronize()


def _release(torch, dev):
  """Frees what the last case held: JAX buffers by collection, PyTorch's cached blocks (two
  frameworks' allocators share the device, and PyTorch's does not give memory back alone)."""
  gc.collect()
  if torch is not None and dev == "cuda":
    torch.cuda.empty_cache()


def _ratio(times, a, b):
  return H.pair({k: {"times": times[k]} for k in (a, b)}, a, b)


def _fmt_ratio(r) -> str:
  return "—" if r is None else H.spread(r)


def dense(shapes, budget: Budget, reps: int, inner: int, compile_torch: bool,
          rows: list[dict], reserve: float = 0.0, losses=LOSSES) -> list[dict]:
  """Appends one row per case to ``rows``; stops measuring ``reserve`` s before the end."""
  torch, dev = _torch()
  for n, c in shapes:
    for dtype in (jnp.float32, jnp.bfloat16):
      for kind in losses:
        z, y = _dense_inputs(kind, n, c, dtype)
        tz = ty = None
        if torch is not None:
          tz, ty = _to_torch(torch, dev, z), _to_torch(torch, dev, y)
          if kind == "int":
            ty = ty.long()
        for grad in (False, True):
          row = {"shape": f"[{n}, {c}]", "dtype": jnp.dtype(dtype).name, "loss": kind,
                 "pass": "fwd+bwd" if grad else "fwd"}
          if budget.left() < reserve + 20:
            rows.append(row | {"note": "skipped: time budget"})
            continue
          fj, fo = _dense_jax(kind, grad)
          def run_jax(f, z=z, y=y):
            def go():
              out = None
              for _ in range(inner):  # dispatched back to back; only the last output kept
                out = f(z, y)
              jax.block_until_ready(out)
            return go

          fns = {"jxent": run_jax(fj), "optax": run_jax(fo)}
          if torch is not None:
            ft = _dense_torch(torch, kind, grad)

            def run_torch(f, tz=tz, ty=ty):
              def go():
                for _ in range(inner):
                  f(tz, ty)
                _sync(torch, dev)
              return go

            fns["torch"] = run_torch(ft)
            if compile_torch and budget.left() > reserve + 60:
              try:
                # A fresh compile per case: past dynamo's recompile limit (8 cases of one
                # function) torch.compile silently runs eager code.
                torch._dynamo.reset()
                fc = torch.compile(ft)
                run_torch(fc)()  # compile outside the timed reps
                fns["torch.compile"] = run_torch(fc)
              except Exception as e:  # noqa: BLE001 - report, do not abort the run
                row["note"] = f"torch.compile failed: {type(e).__name__}"
          try:
            times = _alternate(fns, reps)
          except Exception as e:  # noqa: BLE001 - PyTorch out of memory beside JAX's pool
            if not _is_oom(e):
              raise
            fns = {k: f for k, f in fns.items() if k in ("jxent", "optax")}
            _release(torch, dev)
            times = _alternate(fns, reps)
            row["note"] = (row.get("note", "") + " PyTorch: out of device memory beside "
                           "JAX's (allocators do not share)").strip()
          row |= {"ms": {k: statistics.median(v) * 1e3 / inner for k, v in times.items()},
                  "vs optax": _ratio(times, "jxent", "optax"),
                  "vs torch": _ratio(times, "jxent", "torch") if "torch" in times else None,
                  "vs compile": (_ratio(times, "jxent", "torch.compile")
                                 if "torch.compile" in times else None)}
          rows.append(row)
          print(_dense_line(row), flush=True)
        del z, y, tz, ty
        fns = None
        _release(torch, dev)
  return rows


def ctc(sizes, budget: Budget, reps: int, inner: int, rows: list[dict]) -> list[dict]:
  """Appends one row per size and pass: jxent's CTC loss against Optax and PyTorch's
  F.ctc_loss (on the device), float32, the sum of the per-sequence losses (the inputs of
  ``python -m benchmarks ctc``)."""
  from benchmarks import ctc as C
  torch, dev = _torch()
  for b, t, k, n in sizes:
    z, fp, y, lp, frames, lengths = C._inputs(b, t, k, n)
    zj = jax.device_put(jnp.asarray(z))
    for grad in (False, True):
      row = {"shape": f"B={b}, T={t}, K={k}, N={n}", "pass": "fwd+bwd" if grad else "fwd"}
      if budget.left() < 20:
        rows.append(row | {"note": "skipped: time budget"})
        continue
      jitted = {name: jax.jit(jax.value_and_grad(f) if grad else f)
                for name, f in C._functions(fp, y, lp).items()}

      def run_jax(f):
        def go():
          out = None
          for _ in range(inner):
            out = f(zj)
          jax.block_until_ready(out)
        return go

      fns = {"jxent": run_jax(jitted["jxent"]), "optax": run_jax(jitted["Optax"])}
      if torch is not None:
        tr = C._torch(z, y, frames, lengths, grad, dev)
        fns["torch"] = lambda tr=tr: ([tr() for _ in range(inner)], tr.sync())
      times = _alternate(fns, reps)
      row |= {"ms": {key: statistics.median(v) * 1e3 / inner for key, v in times.items()},
              "vs optax": _ratio(times, "jxent", "optax"),
              "vs torch": _ratio(times, "jxent", "torch") if "torch" in times else None}
      rows.append(row)
      print(_ctc_line(row), flush=True)
    _release(torch, dev)
  return rows


def _ctc_line(r) -> str:
  if "ms" not in r:
    return f"| {r['shape']} | {r['pass']} | — | — | — | — | — | {r.get('note', '')} |"
  ms = r["ms"]
  get = lambda key: f"{ms[key]:.3f}" if key in ms else "—"
  return (f"| {r['shape']} | {r['pass']} | {get('jxent')} | {get('optax')} | {get('torch')} | "
          f"**{_fmt_ratio(r['vs optax'])}** | {_fmt_ratio(r['vs torch'])} | |")


def _alternate(fns: dict, reps: int) -> dict[str, list[float]]:
  """Warm-up once, then ``reps`` rounds in alternating order; raw seconds per round."""
  res = H.time_side_by_side(fns, reference=next(iter(fns)), reps=reps)
  return {k: v["times"] for k, v in res.items()}


def _dense_line(r) -> str:
  if "ms" not in r:
    return (f"| {r['shape']} | {r['dtype']} | {r['loss']} | {r['pass']} | — | — | — | — | — "
            f"| — | {r.get('note', '')} |")
  ms = r["ms"]
  get = lambda k: f"{ms[k]:.3f}" if k in ms else "—"
  return (f"| {r['shape']} | {r['dtype']} | {r['loss']} | {r['pass']} | {get('jxent')} | "
          f"{get('optax')} | {get('torch')} | **{_fmt_ratio(r['vs optax'])}** | "
          f"{_fmt_ratio(r['vs torch'])} | {_fmt_ratio(r['vs compile'])} | {r.get('note', '')} |")


# ------------------------------------------------------------------ 3. fused linear CE


def _fused_inputs(n, d, v):
  """bf16 inputs drawn on the host and copied over: no float32 temporary on the device
  (it would be the peak of a memory probe that reads the allocator's peak since start)."""
  rng = np.random.default_rng(1)
  bf16 = jnp.bfloat16
  h = rng.standard_normal((n, d), dtype=np.float32).astype(bf16)
  w = rng.standard_normal((v, d), dtype=np.float32)
  w *= np.float32(d**-0.5)
  w = w.astype(bf16)
  y = rng.integers(0, v, size=n, dtype=np.int32)
  return jax.device_put(h), jax.device_put(w), jax.device_put(y)


# "filtered": Cut Cross-Entropy's default gradient filter for bfloat16 (eps(bf16) / 32).
FILTER_EPS = 2.0**-12
# "(Pallas)": the filtered tiles' products by the Triton kernels of jxent/_pallas.py instead
# of XLA's gathered products.
# "return_stats": the loss with its per-token entropy, argmax and label log-probability
# (``return_stats=True``) from the same pass.
FUSED_JAX = ("jxent", "jxent filtered", "jxent filtered (Pallas)", "jxent filtered (XLA tiles)",
             f"jxent block={BIG_BLOCK_MIB}MiB", "jxent return_stats", "unfused JAX")


def _loud_tiles(h, w) -> str:
  """How the gradient filter will see these inputs: each accelerator vocabulary block's share
  of [64, 64] tiles with a softmax entry of at least FILTER_EPS, counted against the two
  thresholds (XLA's gathered products take a block with at most 1/64 of its tiles loud, the
  Pallas kernels one with at most 1/8; above, the whole block's products)."""
  n, d = h.shape
  v = w.shape[0]
  tb, tv = _fused._FILTER_TILE
  cols = _fused.accelerator_vocab_block(n, v) // tv * tv
  nb, n_t = v // cols if cols else 0, n // tb * tb
  if not nb or not n_t:
    return "loud tiles: n/a"

  @jax.jit
  def shares(h, w):  # (arguments, not constants: XLA would fold the products at compile time)
    def logits(j):
      w_j = jax.lax.dynamic_slice_in_dim(w, j * cols, cols)
      return jnp.dot(h[:n_t], w_j.T, preferred_element_type=jnp.float32)

    lse = jax.nn.logsumexp(jax.lax.map(lambda j: jax.nn.logsumexp(logits(j), axis=-1),
                                       jnp.arange(nb)), axis=0)
    rest = w[nb * cols:]
    if rest.shape[0]:  # the columns past the last full block count in the logsumexp
      lse = jnp.logaddexp(lse, jax.nn.logsumexp(
          jnp.dot(h[:n_t], rest.T, preferred_element_type=jnp.float32), axis=-1))

    def share(j):
      top = jnp.max((logits(j) - lse[:, None]).reshape(n_t // tb, tb, cols // tv, tv),
                    axis=(1, 3))
      return jnp.mean(jnp.exp(top) >= FILTER_EPS)
    return jax.lax.map(share, jnp.arange(nb))

  s = np.asarray(shares(h, w))
  return (f"loud-tile share per vocabulary block of {cols}: median {np.median(s):.3f}, "
          f"max {s.max():.3f}; blocks <=1/64: {int(np.sum(s <= 1 / 64))}, "
          f"<=1/8: {int(np.sum(s <= 1 / 8))} of {nb}")


def _fused_jax(name: str, y):
  if name.startswith("jxent"):
    block = int(name.split("=")[1][:-3]) * 2**20 if "=" in name else None

    def f(h, w):  # the block size and the kernels' switch are read when it is traced
      old = _fused._ACCEL_BLOCK_BYTES
      _fused._ACCEL_BLOCK_BYTES = block or old
      try:
        kernels = (True if name.endswith("(Pallas)") else
                   False if name.endswith("(XLA tiles)") else None)
        with _pallas.use_pallas_filter(kernels):  # None: the library's default
          out = jxent.linear_cross_entropy(
              h, w, y, weight_layout="vd", return_stats=name.endswith("return_stats"),
              gradient_filter=FILTER_EPS if "filtered" in name else None)
          return out if isinstance(out, tuple) else (out, None)
      finally:
        _fused._ACCEL_BLOCK_BYTES = old
  else:  # the unfused reference: [N, V] logits in float32
    f = lambda h, w: (optax.softmax_cross_entropy_with_integer_labels(
        jnp.dot(h, w.T, preferred_element_type=jnp.float32), y).mean(), None)

  def loss_grads_stats(h, w):  # (loss, (dh, dW), statistics or None)
    (loss, stats), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
    return loss, grads, stats
  return jax.jit(loss_grads_stats)


# "fp32 accumulation": Liger's dW accumulated in float32 (``accum_dtype``); by default it is
# accumulated in W's dtype (bfloat16) over its token chunks.
FUSED_TORCH = ("cut-cross-entropy", "cut-cross-entropy exact", "liger-kernel",
               "liger-kernel fp32 accumulation")


@jax.jit
def _unfused_stats(h, w, y):
  lp = jax.nn.log_softmax(jnp.dot(h, w.T, preferred_element_type=jnp.float32))
  return (-jnp.sum(jnp.exp(lp) * lp, axis=-1), jnp.argmax(lp, axis=-1).astype(jnp.int32),
          jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0])


def _stats_note(h, w, y, stats) -> str:
  """How far ``return_stats``'s entropy and label log-probability are from those of float32
  unfused logits, and the share of tokens whose argmax agrees."""
  ent, am, lpy = _unfused_stats(h, w, y)
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
  return (f"stats against unfused: entropy max diff / max {rel(stats.entropy, ent):.1e}, "
          f"log p_y {rel(stats.label_log_prob, lpy):.1e}, argmax agrees on "
          f"{float(jnp.mean(stats.argmax == am)):.4f} of tokens")


def _fused_torch(name: str):
  if name.startswith("cut-cross-entropy"):
    cce = _optional("cut_cross_entropy")
    if cce is None:
      return None
    # By default CCE skips the backward products of blocks whose softmax entries are all
    # below eps(bf16)/32 (its "gradient filtering"); "exact" turns that off, as jxent computes.
    eps = None if name.endswith("exact") else "high"
    return lambda h, w, y: cce.linear_cross_entropy(h, w, y, filter_eps=eps)
  lk = _optional("liger_kernel.transformers.fused_linear_cross_entropy")
  if lk is None:
    return None
  if name.endswith("fp32 accumulation"):
    import torch
    loss = lk.LigerFusedLinearCrossEntropyLoss(accum_dtype=torch.float32)
  else:
    loss = lk.LigerFusedLinearCrossEntropyLoss()
  return lambda h, w, y: loss(w, h, y)


@jax.jit
def _sq_diff_sums(a, b):
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.sum(jnp.square(a - b)), jnp.sum(jnp.square(b))


def _dw_error(got, ref, torch) -> float | None:
  """||dW - dW_ref|| / ||dW_ref|| (Frobenius, float32 sums), ``ref`` the unfused JAX dW; a
  PyTorch ``got`` is read through DLPack, rows in slices (no dW-sized float32 temporary)."""
  try:
    if not hasattr(got, "detach"):
      num, den = _sq_diff_sums(got, ref)
      return float(jnp.sqrt(num / den))
    r = torch.from_dlpack(ref)
    num = den = 0.0
    for i in range(0, r.shape[0], 8192):
      a, b = got[i:i + 8192].float(), r[i:i + 8192].float()
      num += float(torch.sum(torch.square(a - b)))
      den += float(torch.sum(torch.square(b)))
    return (num / den) ** 0.5
  except Exception:  # noqa: BLE001 - no number is reported as n/a
    return None


def jax_peak_probe(name: str, n: int, d: int, v: int) -> None:
  """In a fresh process: peak device bytes of one fwd+bwd of a JAX variant, as JSON."""
  h, w, y = _fused_inputs(n, d, v)
  jax.block_until_ready((h, w, y))
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  base, before = stats.get("bytes_in_use"), stats.get("peak_bytes_in_use")
  jax.block_until_ready(_fused_jax(name, y)(h, w))
  stats = dev.memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  # A peak no higher than before the call is the inputs' own making, not the loss's.
  ok = None not in (peak, before) and peak > before
  print(json.dumps({"peak": peak if ok else None, "base": base}))


def _jax_peaks(names, n, d, v, timeout) -> dict:
  """Peak device bytes above the inputs of each JAX variant, each in its own fresh process
  (the processes run side by side: each reads its own allocator's peak)."""
  procs = {name: subprocess.Popen(
      [sys.executable, "-m", "benchmarks", "gpu", "--probe", name, f"{n},{d},{v}"],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
      for name in names}
  peaks = {}
  for name, proc in procs.items():
    try:
      out, _ = proc.communicate(timeout=max(timeout, 1))
      res = json.loads(out.strip().splitlines()[-1])
      ok = res["peak"] is not None and res["base"] is not None
      peaks[name] = res["peak"] - res["base"] if ok else None
    except Exception:  # noqa: BLE001 - no number is reported as n/a
      proc.kill()
      peaks[name] = None
  return peaks


def fused(shapes, budget: Budget, reps: int, rows: list[dict], reserve: float = 0.0,
          variants=None) -> list[dict]:
  """Appends one row per variant and size to ``rows``; stops ``reserve`` s before the end.
  ``variants``: a subset of FUSED_JAX + FUSED_TORCH (jxent and unfused JAX always run: the
  ratios are against them)."""
  torch, dev = _torch()
  keep = lambda name: variants is None or name in variants or name in ("jxent", "unfused JAX")
  jax_names = tuple(filter(keep, FUSED_JAX))
  for n, d, v in shapes:
    size = f"N={n}, D={d}, V={v}"
    if budget.left() < reserve + 60:
      rows.append({"size": size, "note": "skipped: time budget"})
      continue
    h, w, y = _fused_inputs(n, d, v)
    fns, mem, outs = {}, {}, {}
    for name in jax_names:
      f = _fused_jax(name, y)
      try:
        outs[name] = f(h, w)
      except Exception as e:  # noqa: BLE001 - report, do not abort the run
        if name in ("jxent", "unfused JAX"):
          raise
        rows.append({"size": size, "variant": name,
                     "note": f"failed: {type(e).__name__}: "
                             + (str(e).splitlines() or [""])[0][:120].replace("|", "/")})
        continue
      fns[name] = lambda f=f, h=h, w=w: jax.block_until_ready(f(h, w))
      xla = H.xla_memory(f, h, w)
      mem[name] = {"xla": xla["temp"] + xla["output"]}
    if torch is not None:
      th, tw, ty = (_to_torch(torch, dev, a) for a in (h, w, y))
      ty = ty.long()
      for name in filter(keep, FUSED_TORCH):
        f = _fused_torch(name) if dev == "cuda" else None  # both are Triton (GPU) kernels
        if f is None:
          continue

        def go(f=f):
          hh = th.detach().requires_grad_(True)
          ww = tw.detach().requires_grad_(True)
          loss = f(hh, ww, ty)
          g = torch.autograd.grad(loss, (hh, ww))
          _sync(torch, dev)
          return loss, g

        try:
          go()
        except Exception as e:  # noqa: BLE001 - report, do not abort the run
          rows.append({"size": size, "variant": name, "note": f"failed: {type(e).__name__}"})
          continue
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outs[name] = go()
        mem[name] = {"peak": torch.cuda.max_memory_allocated() - base}
        fns[name] = go
    times = _alternate(fns, reps)
    if torch is not None and dev == "cuda":
      torch.cuda.empty_cache()  # the probes and the next steps get the cached blocks back
    peaks = _jax_peaks([k for k in jax_names if k in fns], n, d, v, min(120, budget.left() - 30))
    loud = _loud_tiles(h, w) if any("filtered" in k for k in fns) else ""
    ref = float(outs["unfused JAX"][0])
    for name in fns:
      if name in jax_names:
        mem[name]["peak"] = peaks[name]
      loss = outs[name][0]
      loss = float(loss.float().item()) if hasattr(loss, "detach") else float(loss)
      row = {"size": size, "variant": name,
             "ms": statistics.median(times[name]) * 1e3,
             "vs unfused": _ratio(times, name, "unfused JAX"),
             "vs jxent": _ratio(times, "jxent", name) if name != "jxent" else None,
             "peak": mem[name].get("peak"), "xla": mem[name].get("xla"),
             "loss err": abs(loss - ref) / abs(ref),
             "dw err": None if name == "unfused JAX" else _dw_error(
                 outs[name][1][1], outs["unfused JAX"][1][1], torch)}
      if "filtered" in name:  # how far the filtered dW is from the exact one
        exact, got = outs["unfused JAX"][1][1], outs[name][1][1]
        err = jnp.max(jnp.abs(got.astype(jnp.float32) - exact.astype(jnp.float32)))
        row["note"] = (f"dW max abs. diff / max abs. dW: "
                       f"{float(err / jnp.max(jnp.abs(exact.astype(jnp.float32)))):.1e}")
        if name == "jxent filtered":
          row["note"] += f"; {loud}"
      if name.endswith("return_stats"):
        row["note"] = _stats_note(h, w, y, outs[name][2])
      if name == "cut-cross-entropy":
        row["note"] = "; ".join(f"{j} / this: {_fmt_ratio(_ratio(times, j, name))}"
                                for j in ("jxent filtered", "jxent filtered (Pallas)",
                                          "jxent filtered (XLA tiles)")
                                if j in times)
      rows.append(row)
      print(_fused_line(row), flush=True)
    del h, w, y, fns, outs
    _release(torch, dev)
  return rows


def _mib(b):
  return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _fused_line(r) -> str:
  if "ms" not in r:
    return f"| {r['size']} | {r.get('variant', '—')} | — | — | — | — | — | — | {r['note']} | — |"
  dw = "—" if r.get("dw err") is None else f"{r['dw err']:.1e}"
  return (f"| {r['size']} | {r['variant']} | {r['ms']:,.1f} | {_fmt_ratio(r['vs unfused'])} | "
          f"{_fmt_ratio(r['vs jxent'])} | {_mib(r['peak'])} | {_mib(r['xla'])} | "
          f"{r['loss err']:.1e} | {r.get('note', '')} | {dw} |")


# ------------------------------------------------------------ 4. language-model head

# "…/token": the mean of the per-token output (any cotangent: the derivative recomputes).
# "log_probs+entropy…": both per-token outputs' means; "/token": from one call
# (``return_entropy=True``), "two calls": ``linear_log_probs`` and ``linear_entropy`` apart.
# "kl+ce": linear_distillation_loss (half the forward KL, half the labels' cross-entropy);
# "(two calls)": the same from linear_kl_divergence and linear_cross_entropy.
# "grpo": linear_policy_loss (sequences of up to 256 tokens, one advantage each, the clipped
# ratio against old log-probabilities, beta = 0.04 against a reference's, the token mean);
# "gspo": the same with GSPO's sequence ratio; "dpo": linear_preference_loss (pairs of such
# sequences, DPO's sigmoid loss against a reference's sums); "dense_kl": the KL from the
# teacher's whole [N, V] log-probabilities given as data (teacher_indices=None).
HEAD_QUANTITIES = ("log_probs", "log_probs/token", "entropy", "kl", "js", "topk_kl", "tv",
                   "log_probs+entropy/token", "log_probs+entropy/token (two calls)", "kl+ce",
                   "kl+ce (two calls)", "grpo", "gspo", "dpo", "dense_kl")
SMOKE_HEAD_QUANTITIES = ("log_probs", "kl", "topk_kl")  # one of each path: a short smoke run
HEAD_VARIANTS = ("jxent", "jxent token chunks", "unfused JAX")
HEAD_TOPK = 32  # the teacher's top-k log-probabilities of the top-k KL


def _teacher_topk(ht, wt, k=HEAD_TOPK):
  """The teacher's k most likely classes and their log-probabilities, [N, k] each."""
  lp = jax.nn.log_softmax(jnp.dot(ht, wt.T, preferred_element_type=jnp.float32))
  lpt, idx = jax.lax.top_k(lp, k)
  return idx, lpt


def _unfused_pair(lq, lp, q):
  p, qs = jnp.exp(lp), jnp.exp(lq)
  if q.startswith("kl"):
    return jnp.sum(p * (lp - lq), axis=-1)
  if q == "tv":
    return 0.5 * jnp.sum(jnp.abs(p - qs), axis=-1)
  lm = jnp.log(0.5 * p + 0.5 * qs)
  return 0.5 * jnp.sum(p * (lp - lm), axis=-1) + 0.5 * jnp.sum(qs * (lq - lm), axis=-1)


def _policy(loss, lp_or_labels, y, v, **kw):
  """GRPO's loss of the tokens as sequences of up to 256: advantages, old and reference
  log-probabilities formed from the labels (arguments, so that XLA cannot fold them)."""
  seq = math.gcd(y.shape[0], 256)
  s = jnp.sin(y.astype(jnp.float32)).reshape(-1, seq)
  old = -math.log(v) - 0.5 + 0.5 * s
  return loss(lp_or_labels.reshape(-1, seq, *lp_or_labels.shape[1:]), s[:, 0],
              old_log_probs=old, ref_log_probs=old + 0.25 * jnp.cos(s), beta=0.04, **kw)


def _pairs(lp_or_h, y):
  """Tokens as [2, pairs, seq, ...] (chosen, rejected; sequences of up to 256 tokens) and a
  reference's per-token log-probabilities formed from the labels."""
  seq = math.gcd(y.shape[0] // 2, 256)
  ref = -5.0 + 0.5 * jnp.sin(y.astype(jnp.float32))
  split = lambda a: a.reshape(2, -1, seq, *a.shape[1:])
  return split(lp_or_h), split(y), split(ref)


def _head_fn(q: str, variant: str, y, ht, wt, topk=None):
  """``(jit(value_and_grad) in (h, W), its other arguments)`` of the token mean of quantity
  ``q``, weight [V, D]; ``topk``: the teacher's (indices, log-probabilities) for "topk_kl",
  its [N, V] log-probabilities for "dense_kl".
  The labels and the teacher are arguments, not constants of the program (XLA would fold the
  teacher's side at compile time: minutes of compilation, and a forward that is not timed)."""
  if variant == "unfused JAX":
    def f(h, w, y, ht, wt, topk):
      lq = jax.nn.log_softmax(jnp.dot(h, w.T, preferred_element_type=jnp.float32))
      if q in ("grpo", "gspo"):
        lp = jnp.take_along_axis(lq, y[:, None], axis=-1)[:, 0]
        return _policy(jxent.policy_loss, lp, y, lq.shape[-1], importance_sampling_level=(
            "sequence" if q == "gspo" else "token"))
      if q == "dpo":
        lp, _, ref = _pairs(jnp.take_along_axis(lq, y[:, None], axis=-1)[:, 0], y)
        seq, rs = jnp.sum(lp, -1), jnp.sum(ref, -1)
        return jxent.preference_loss(seq[0], seq[1], ref_chosen_log_probs=rs[0],
                                     ref_rejected_log_probs=rs[1])
      if q.startswith("log_probs+entropy"):
        return (jnp.mean(jnp.take_along_axis(lq, y[:, None], axis=-1))
                + jnp.mean(-jnp.sum(jnp.exp(lq) * lq, axis=-1)))
      if q.startswith("log_probs"):
        return jnp.mean(jnp.take_along_axis(lq, y[:, None], axis=-1))
      if q == "entropy":
        return jnp.mean(-jnp.sum(jnp.exp(lq) * lq, axis=-1))
      if q == "dense_kl":
        return jnp.mean(jnp.sum(jnp.exp(topk) * (topk - lq), axis=-1))
      if q == "topk_kl":
        idx, lpt = topk
        rows = jnp.arange(lq.shape[0])[:, None]
        lq_rest = jax.nn.logsumexp(lq.at[rows, idx].set(-jnp.inf), axis=-1)
        r = jnp.maximum(1 - jnp.sum(jnp.exp(lpt), axis=-1), 0)
        top = jnp.sum(jnp.exp(lpt) * (lpt - jnp.take_along_axis(lq, idx, axis=-1)), axis=-1)
        return jnp.mean(top + jnp.where(r > 0, r * (jnp.log(r) - lq_rest), 0))
      lp = jax.lax.stop_gradient(jax.nn.log_softmax(
          jnp.dot(ht, wt.T, preferred_element_type=jnp.float32)))
      if q.startswith("kl+ce"):
        return (0.5 * jnp.mean(_unfused_pair(lq, lp, q))
                - 0.5 * jnp.mean(jnp.take_along_axis(lq, y[:, None], axis=-1)))
      return jnp.mean(_unfused_pair(lq, lp, q))
  else:
    def g(h, w, y, ht, wt, topk):
      if q in ("grpo", "gspo"):
        return _policy(lambda h3, *a, **k: jxent.linear_policy_loss(
            h3, w, y.reshape(h3.shape[:-1]), *a, weight_layout="vd", **k), h, y, w.shape[0],
            importance_sampling_level="sequence" if q == "gspo" else "token")
      if q == "dpo":
        h4, y3, ref = _pairs(h, y)
        return jxent.linear_preference_loss(h4, w, y3, ref_log_probs=ref, weight_layout="vd")
      if q == "log_probs":
        return jxent.linear_log_probs(h, w, y, weight_layout="vd", reduction="mean")
      if q == "log_probs/token":
        return jnp.mean(jxent.linear_log_probs(h, w, y, weight_layout="vd"))
      if q == "log_probs+entropy/token":
        lp, ent = jxent.linear_log_probs(h, w, y, weight_layout="vd", return_entropy=True)
        return jnp.mean(lp) + jnp.mean(ent)
      if q == "log_probs+entropy/token (two calls)":
        return (jnp.mean(jxent.linear_log_probs(h, w, y, weight_layout="vd"))
                + jnp.mean(jxent.linear_entropy(h, w, weight_layout="vd")))
      if q == "tv":
        return jxent.linear_tv_distance(h, w, ht, wt, weight_layout="vd")
      if q == "kl+ce":
        return jxent.linear_distillation_loss(h, w, ht, wt, y, weight_layout="vd")
      if q == "kl+ce (two calls)":
        return 0.5 * (jxent.linear_kl_divergence(h, w, ht, wt, weight_layout="vd")
                      + jxent.linear_cross_entropy(h, w, y, weight_layout="vd"))
      if q == "entropy":
        return jxent.linear_entropy(h, w, weight_layout="vd", reduction="mean")
      if q == "js":
        return jxent.linear_js_divergence(h, w, ht, wt, weight_layout="vd")
      if q == "topk_kl":
        return jxent.linear_topk_kl_divergence(h, w, *topk, weight_layout="vd")
      if q == "dense_kl":
        return jxent.linear_topk_kl_divergence(h, w, None, topk, weight_layout="vd")
      return jxent.linear_kl_divergence(h, w, ht, wt, weight_layout="vd")

    def f(h, w, y, ht, wt, topk):  # the implementation is chosen when it is traced
      if variant == "jxent":
        return g(h, w, y, ht, wt, topk)
      with use_implementation("reference"):  # token chunks, as on XLA:CPU
        return g(h, w, y, ht, wt, topk)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1))), (y, ht, wt, topk)


def head(shapes, budget: Budget, reps: int, rows: list[dict], quantities=HEAD_QUANTITIES,
         reserve: float = 0.0, variants=HEAD_VARIANTS) -> list[dict]:
  """Appends one row per quantity, variant and size: jxent's head functions (vocabulary
  blocks on GPU/TPU), the same forced to token chunks, and unfused JAX."""
  for n, d, v in shapes:
    size = f"N={n}, D={d}, V={v}"
    h, w, y = _fused_inputs(n, d, v)
    ht = jax.device_put(jnp.roll(h, 1, axis=0))
    wt = jax.device_put(jnp.roll(w, 1, axis=1))
    topk = jax.block_until_ready(_teacher_topk(ht, wt, min(HEAD_TOPK, v))) \
        if "topk_kl" in quantities else None
    for q in quantities:
      if budget.left() < reserve + 60:
        rows.append({"size": size, "quantity": q, "note": "skipped: time budget"})
        continue
      fns, outs, xla = {}, {}, {}
      data = topk
      if q == "dense_kl":  # the teacher's whole distribution, float32 [N, V], as data
        data = jax.block_until_ready(jax.jit(lambda ht, wt: jax.nn.log_softmax(jnp.dot(
            ht, wt.T, preferred_element_type=jnp.float32)))(ht, wt))
      for name in variants:
        f, rest = _head_fn(q, name, y, ht, wt, data)
        outs[name] = f(h, w, *rest)
        mem = H.xla_memory(f, h, w, *rest)
        xla[name] = mem["temp"] + mem["output"]
        fns[name] = lambda f=f, h=h, w=w, rest=rest: jax.block_until_ready(f(h, w, *rest))
      times = _alternate(fns, reps)
      ref = float(outs["unfused JAX"][0])
      for name in variants:
        row = {"size": size, "quantity": q, "variant": name,
               "ms": statistics.median(times[name]) * 1e3,
               "vs unfused": _ratio(times, name, "unfused JAX"), "xla": xla[name],
               "err": abs(float(outs[name][0]) - ref) / max(abs(ref), 1e-30)}
        rows.append(row)
        print(_head_line(row), flush=True)
      del fns, outs, data
    del h, w, y, ht, wt, topk
    gc.collect()
  return rows


def _head_line(r) -> str:
  if "ms" not in r:
    return f"| {r['size']} | {r['quantity']} | — | — | — | — | — | {r['note']} |"
  return (f"| {r['size']} | {r['quantity']} | {r['variant']} | {r['ms']:,.1f} | "
          f"{_fmt_ratio(r['vs unfused'])} | {_mib(r['xla'])} | {r['err']:.1e} | |")


# ---------------------------------------------------------------------------- report


def to_markdown(env, tests, dense_rows, fused_rows, argv, reps, inner, errors=(),
                cost_rows=(), head_rows=(), ctc_rows=()) -> str:
  out = ["## On an accelerator: jxent against Optax, PyTorch, Cut Cross-Entropy and Liger", "",
         env, "",
         f"`python -m benchmarks gpu {' '.join(argv)}`. Ratios: median of per-repetition time "
         f"ratios ({reps} alternating repetitions after warm-up, each of {inner} calls for the "
         "dense losses), min–max in parentheses.", ""]
  if tests is not None:
    counts = ", ".join(f"{v} {k}" for k, v in tests["counts"].items()) or "no summary"
    out += [f"Test suite on the device: {counts} in {tests['seconds']:.0f} s "
            f"(exit status {tests['rc']}).", ""]
    out += [f"- {f}" for f in tests["failed"]]
    out += [""] if tests["failed"] else []
  out += ["Dense losses (mean reduction; ms per call; ratio < 1: jxent faster):", "",
          "| shape | dtype | loss | pass | jxent ms | Optax ms | torch ms | jxent / Optax "
          "| jxent / torch | jxent / torch.compile | note |",
          "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
          *[_dense_line(r) for r in dense_rows], "",
          "Fused linear + cross-entropy, bfloat16, weight [V, D], forward+backward with respect "
          "to h and W (peak: device memory above the inputs during one call; XLA: compiled "
          "scratch + outputs):", "",
          "| size | variant | ms | time / unfused JAX | jxent time / this | peak MiB "
          "| XLA MiB | loss rel. diff | note | dW rel. diff |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
          *[_fused_line(r) for r in fused_rows]]
  if head_rows:
    out += ["", "Language-model head quantities, bfloat16, weight [V, D], the token mean under "
            "`jit(value_and_grad)` in h and W (`reduction=\"mean\"`; \"/token\": the mean "
            "of the per-token output; kl, js (beta 0.5), tv: from a teacher head without "
            "gradient; topk_kl: from the teacher's 32 most likely classes; "
            "log_probs+entropy: both outputs' means, from one call (return_entropy) or two; "
            "kl+ce: half the forward KL and half the labels' cross-entropy, from "
            "linear_distillation_loss or two calls; grpo: linear_policy_loss, sequences of "
            "up to 256 tokens, the clipped ratio and a KL term with beta 0.04; gspo: the same "
            "with GSPO's sequence ratio; dpo: linear_preference_loss, pairs of such sequences, "
            "DPO's loss against a reference's sums). "
            "\"jxent token chunks\": the same functions forced to their reference (XLA:CPU) "
            "form; XLA: compiled scratch + outputs:", "",
            "| size | quantity | variant | ms | time / unfused JAX | XLA MiB | value rel. diff "
            "| note |", "|---|---|---|---:|---:|---:|---:|---|",
            *[_head_line(r) for r in head_rows]]
  if ctc_rows:
    out += ["", "CTC loss, float32 logits [B, T, K], labels [B, N], about a tenth of each "
            "row's frames and labels padded, the sum of the per-sequence losses (ms per call; "
            "PyTorch: F.ctc_loss on the same log-probabilities, eager):", "",
            "| size | pass | jxent ms | Optax ms | torch ms | jxent / Optax | jxent / torch "
            "| note |", "|---|---|---:|---:|---:|---:|---:|---|",
            *[_ctc_line(r) for r in ctc_rows]]
  if cost_rows:
    out += ["", "XLA's cost analysis of the dense losses' compiled forward+backward "
            "(`jax.jit(jax.value_and_grad(loss)).lower(z, y).compile().cost_analysis()"
            "[\"bytes accessed\"]`, mean reduction):", "",
            "| shape | dtype | loss | jxent GB | Optax GB | jxent / Optax |",
            "|---|---|---|---:|---:|---:|", *cost_rows]
  if errors:
    out += ["", "Steps that failed:", "", *[f"- {e}" for e in errors]]
  return "\n".join(out)


def main(argv=None):
  argv = list(sys.argv[2:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device; "
                 "writes only to --out")
  p.add_argument("--budget-s", type=float, default=450, help="wall-clock budget (default 450)")
  p.add_argument("--out", type=Path, help="also write the markdown here")
  p.add_argument("--tests", nargs="*", default=None, help="pytest paths (default: tests; "
                 "smoke: tests/test_information.py); none to skip")
  p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
  p.add_argument("--steps", default="tests,fused,dense", help="comma-separated subset of "
                 "tests,fused,dense,cost,head,ctc (default: the first three; only a run of "
                 "those three at least writes RESULTS.md); cost: XLA's bytes accessed of the "
                 "dense losses, and their soft-label HLO beside --out; head: the language-model "
                 "head quantities against unfused JAX; ctc: the CTC loss against Optax and "
                 "PyTorch")
  p.add_argument("--dense-shapes", help="e.g. 16384x128256,8192x50304 (default: both)")
  p.add_argument("--fused-shapes", help="N,D,V triples, e.g. 8192x2304x256000 (default: "
                 "both)")
  p.add_argument("--fused-variants", help="a subset of the fused step's variants, comma-"
                 f"separated (jxent and unfused JAX always run): {', '.join(FUSED_JAX[1:-1])}, "
                 f"{', '.join(FUSED_TORCH)}")
  p.add_argument("--dense-losses", help=f"e.g. soft (default: {','.join(LOSSES)})")
  p.add_argument("--head-quantities", help=f"e.g. kl,js (default: {','.join(HEAD_QUANTITIES)})")
  p.add_argument("--head-chunks", action="store_true", help="head step: also time the "
                 "functions forced to their token-chunked (XLA:CPU) form")
  p.add_argument("--tests-share", type=float, default=0.4,
                 help="share of the budget the suite may take (default 0.4)")
  p.add_argument("--kernel-tiles-kept", type=int, help="the Pallas filter kernels take a "
                 "block with up to 1/K of its tiles loud (default: the library's, "
                 f"{_fused._KERNEL_TILES_KEPT})")
  p.add_argument("--probe", nargs=2, metavar=("VARIANT", "N,D,V"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.kernel_tiles_kept:  # read at trace time; the memory probes inherit it
    os.environ["JXENT_BENCH_KERNEL_TILES_KEPT"] = str(args.kernel_tiles_kept)
  if "JXENT_BENCH_KERNEL_TILES_KEPT" in os.environ:
    _fused._KERNEL_TILES_KEPT = int(os.environ["JXENT_BENCH_KERNEL_TILES_KEPT"])
  if args.probe:
    jax_peak_probe(args.probe[0], *map(int, args.probe[1].split(",")))
    return
  budget = Budget(args.budget_s)
  steps = set(args.steps.split(","))
  env = environment()
  print(env, flush=True)
  paths = args.tests if args.tests is not None else (
      ["tests/test_information.py"] if args.smoke else ["tests"])
  paths = paths if "tests" in steps else []
  dense_shapes = SMOKE_DENSE if args.smoke else DENSE_SHAPES
  if args.dense_shapes:
    dense_shapes = [tuple(map(int, x.split("x"))) for x in args.dense_shapes.split(",")]
  dense_losses = tuple(args.dense_losses.split(",")) if args.dense_losses else LOSSES
  head_quantities = (tuple(args.head_quantities.split(",")) if args.head_quantities else
                     SMOKE_HEAD_QUANTITIES if args.smoke else HEAD_QUANTITIES)
  if not set(head_quantities) <= set(HEAD_QUANTITIES):
    p.error(f"--head-quantities: {args.head_quantities!r}; choose among "
            f"{','.join(HEAD_QUANTITIES)}")
  if not set(dense_losses) <= set(LOSSES):
    p.error(f"--dense-losses: {args.dense_losses!r}; choose among {','.join(LOSSES)}")
  reps, inner = (3, 2) if args.smoke else (7, 10)
  # The suite first, while no framework holds device memory in this process (at most its
  # share of the budget), then the fused loss (the anchors' comparison), then the dense
  # losses with the rest. The markdown is rewritten after every step, so a run stopped from
  # outside still leaves its tables.
  tests, dense_rows, fused_rows, errors, cost_rows, head_rows = None, [], [], [], [], []
  ctc_rows = []

  def write():
    text = to_markdown(env, tests, dense_rows, fused_rows, argv, reps, inner, errors,
                       cost_rows, head_rows, ctc_rows)
    if args.out:
      args.out.write_text(text + "\n")
    return text

  def step(name, fn):
    try:
      fn()
    except Exception:  # noqa: BLE001 - one broken step must not lose the others' numbers
      errors.append(f"{name}: {traceback.format_exc(limit=3).strip().splitlines()[-1]}")
      traceback.print_exc()
    write()

  def suite():
    nonlocal tests
    tests = run_tests(paths, timeout_s=budget.left() * args.tests_share)
    print("tests:", tests["summary"], flush=True)
    if args.out:
      args.out.with_suffix(".tests.log").write_text(tests["log"])

  if paths:
    step("tests", suite)
  fused_shapes = SMOKE_FUSED if args.smoke else FUSED_SHAPES
  if args.fused_shapes:
    fused_shapes = [tuple(map(int, x.split("x"))) for x in args.fused_shapes.split(",")]
  fused_variants = None
  if args.fused_variants:
    fused_variants = {x.strip() for x in args.fused_variants.split(",")}
    if not fused_variants <= set(FUSED_JAX + FUSED_TORCH):
      p.error(f"--fused-variants: {args.fused_variants!r}")
  if "fused" in steps:
    step("fused", lambda: fused(fused_shapes, budget, 3 if args.smoke else 5, fused_rows,
                                reserve=budget.left() * 0.3 if "dense" in steps else 0.0,
                                variants=fused_variants))
  if "dense" in steps:
    step("dense", lambda: dense(dense_shapes, budget, reps, inner, not args.no_compile,
                                dense_rows, losses=dense_losses))
  if "head" in steps:
    step("head", lambda: head(SMOKE_HEAD if args.smoke else HEAD_SHAPES, budget,
                              3 if args.smoke else 5, head_rows, head_quantities,
                              variants=HEAD_VARIANTS if args.head_chunks or args.smoke
                              else ("jxent", "unfused JAX")))
  if "ctc" in steps:
    step("ctc", lambda: ctc(SMOKE_CTC if args.smoke else CTC_SIZES, budget, reps,
                            2 if args.smoke else 5, ctc_rows))
  if "cost" in steps:
    step("cost", lambda: cost_rows.extend(xla_costs(
        dense_shapes[0], args.out.parent if args.out else None)))
  text = write()
  if args.out:
    print(f"wrote {args.out}")
  if not args.smoke and {"tests", "fused", "dense"} <= steps and not args.dense_shapes \
      and not args.dense_losses:
    H.write_section("gpu", text)


if __name__ == "__main__":
  main()
