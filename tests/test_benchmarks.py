"""The accelerator benchmark's --smoke mode runs end to end here, so the script cannot rot."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_smoke(tmp_path):
  out = tmp_path / "gpu.md"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks", "gpu", "--smoke", "--out", str(out),
       "--tests", "tests/test_information.py::test_entropy_axis", "--no-compile",
       "--steps", "tests,fused,dense,cost,head,ctc"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  text = out.read_text()
  # The device line, the test step's own counts, and a measured row for every dense case.
  backend = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                           capture_output=True, text=True, check=True).stdout.strip()
  assert f"Device: {backend}" in text
  assert re.search(r"Test suite on the device: 1 passed in \d+ s \(exit status 0\)", text)
  rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
          if ln.startswith("| [64, 1000] |")]
  dense, cost = [r for r in rows if len(r) == 11], [r for r in rows if len(r) == 6]
  assert len(dense) == 2 * 3 * 2  # dtypes x losses x passes
  for cells in dense:
    jx_ms, opt_ms = float(cells[4]), float(cells[5])
    assert jx_ms > 0 and opt_ms > 0
    ratio = re.match(r"\*\*([\d.]+) \(([\d.]+)–([\d.]+)\)\*\*", cells[7])
    lo, med, hi = float(ratio[2]), float(ratio[1]), float(ratio[3])
    assert 0 < lo <= med <= hi
  # The fused loss: jxent and the unfused reference measured, the same loss to bf16 accuracy.
  fused = {ln.split("|")[2].strip(): ln for ln in text.splitlines()
           if ln.startswith("| N=128, D=32, V=1000 |")}
  assert {"jxent", "unfused JAX"} <= set(fused)
  cells = [c.strip() for c in fused["jxent"].strip("|").split("|")]
  assert float(cells[7]) < 1e-2
  assert float(cells[9]) < 1e-2  # dW against the unfused dW (Frobenius, relative)
  # The filtered gradient: the same loss, and its distance from the exact dW reported.
  for name in ("jxent filtered", "jxent filtered (Pallas)"):
    cells = [c.strip() for c in fused[name].strip("|").split("|")]
    assert float(cells[7]) < 1e-2
    diff = re.search(r"dW max abs. diff / max abs. dW: ([\d.e+-]+)", cells[8])
    assert 0 <= float(diff[1]) < 0.5
  # How the filter sees the data: every block's loud-tile share (V=1000: one block of 960
  # columns, where unit-variance logits over 1000 classes leave no tile quiet).
  assert re.search(r"loud-tile share per vocabulary block of 960: median 1.000, max 1.000; "
                   r"blocks <=1/64: 0, <=1/8: 0 of 1", fused["jxent filtered"])
  # XLA's bytes accessed of each dense loss, jxent and Optax, and the soft-label programs.
  assert [c[2] for c in cost] == ["int", "soft", "bce"]
  for c in cost:
    assert float(c[5]) == pytest.approx(float(c[3]) / float(c[4]), rel=0.05, abs=0.01)
  assert "HloModule" in (tmp_path / "soft_jxent.hlo.txt").read_text()
  # The head quantities: every variant measured, the same value to bf16 accuracy.
  head = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
          if ln.startswith("| N=96, D=32, V=1000 |")]
  assert [(c[1], c[2]) for c in head] == [
      (q, v) for q in ("log_probs", "kl", "topk_kl")
      for v in ("jxent", "jxent token chunks", "unfused JAX")]
  for c in head:
    assert float(c[3]) > 0 and float(c[6]) < 1e-2
  # The CTC loss: both passes, jxent and Optax measured.
  ctc = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()
         if ln.startswith("| B=2, T=12, K=5, N=3 |")]
  assert [c[1] for c in ctc] == ["fwd", "fwd+bwd"]
  for c in ctc:
    assert float(c[2]) > 0 and float(c[3]) > 0 and c[5].startswith("**")


def test_sharp_benchmark_times_what_it_says(capsys):
  # "one sum" is the reference itself, "two sums" the form before it (a sharpened logsumexp)
  # and "plain" the reference without a sharp loss (a confident row's loss of 1e-9 rounds to 0
  # there); the swap does not outlive tracing.
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import sharp
  from jxent import _reference as R
  from jxent._platform import use_implementation
  z = jnp.array([[21.0, 0.0, 0.0, -1.0]])
  y = jnp.array([0])
  want = np.log1p(np.exp(-21.0) * 2 + np.exp(-22.0))
  with use_implementation("reference"):
    np.testing.assert_allclose(sharp._loss("one sum", False)(z, y), want, rtol=1e-6)
    np.testing.assert_allclose(sharp._loss("two sums", False)(z, y), want, rtol=1e-6)
    assert sharp._loss("plain", False)(z, y) == 0
    # The three share the loss's gradient rule (softmax - onehot); a masked class and a
    # label that is not the max.
    zz = jnp.array([[2.0, -1.0, 0.5, -jnp.inf], [0.0, 3.0, 1.0, -2.0]])
    yy = jnp.array([0, 2])
    for v in ("two sums", "plain"):
      np.testing.assert_allclose(sharp._loss(v, True)(zz, yy)[1],
                                 sharp._loss("one sum", True)(zz, yy)[1], rtol=1e-6)
  assert R.int_lse_parts is sharp.ONE_SUM
  sharp.main(["--smoke"])
  rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| [64, 1000] |")]
  assert len(rows) == 4  # dtypes x passes
  for ln in rows:
    cells = [c.strip() for c in ln.strip("|").split("|")]
    assert float(cells[3]) > 0
    for cell in cells[4:]:
      med, lo, hi = map(float, re.match(r"([\d.]+) \(([\d.]+)–([\d.]+)\)", cell).groups())
      assert 0 < lo <= med <= hi


def test_lmhead_rows_of_some_quantities_replace_only_theirs(tmp_path, monkeypatch):
  # `python -m benchmarks lmhead --quantities ...` keeps the other rows as they were, in the
  # table's order.
  from benchmarks import _harness as H
  from benchmarks import lmhead as L
  results = tmp_path / "RESULTS.md"
  monkeypatch.setattr(H, "RESULTS", results)

  def row(size, q, ms):
    return {"size": size, "quantity": q, "ms": ms, "ms_ref": 2.0, "ratio": {
        "ratio": 0.5, "lo": 0.4, "hi": 0.6}, "temp_mib": 1.0, "temp_ref_mib": 2.0,
        "temp_frac": 0.5, "peak": 1.0, "peak_ref": 2.0, "rss": 0.0, "rss_ref": 0.0, "err": 0.0}

  sizes = [f"N={n}, D={d}, V={v}" for n, d, v in L.SIZES]
  old = [row(s, q, 1.0) for s in sizes for q in L.QUANTITIES]
  H.write_section("lmhead", L.to_markdown(old, 3))
  new = [row(s, "entropy", 7.0) for s in sizes]
  H.write_section("lmhead", L.merge_rows(L.to_markdown(new, 3), new))
  lines = [ln for ln in results.read_text().splitlines() if ln.startswith("| N=")]
  assert [L._key(ln) for ln in lines] == [(s, q) for s in sizes for q in L.QUANTITIES]
  for ln in lines:
    assert ("| 7 |" in ln) == (L._key(ln)[1] == "entropy"), ln


def test_loud_tile_count_against_numpy(monkeypatch):
  # The filtered row's note: each vocabulary block's share of [64, 64] tiles holding a softmax
  # entry of at least 2^-12, counted here in float64 NumPy. Blocks of 1024 columns; the
  # weights of blocks 4-7 shrunk so that their tiles are mostly quiet, and 100 larger
  # columns past the last full block, which count in the logsumexp only (without them every
  # block's share would differ).
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import gpu
  from jxent import _fused

  n, d, cols = 256, 16, 1024
  monkeypatch.setattr(_fused, "_ACCEL_BLOCK_BYTES", 4 * n * cols)
  rng = np.random.default_rng(0)
  block = np.arange(8 * cols + 100) // cols
  scale = np.where(block < 4, 1.0, np.where(block < 8, 0.7, 2.0))[:, None]
  h = jnp.asarray(rng.standard_normal((n, d)) * 2, jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((8 * cols + 100, d)) * scale, jnp.bfloat16)
  z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  share = np.array([np.mean(p[:, j * cols:(j + 1) * cols].reshape(4, 64, 16, 64)
                            .max(axis=(1, 3)) >= 2**-12) for j in range(8)])
  assert np.sum(share <= 1 / 8) > 0 and np.sum(share > 1 / 8) > 0  # both sides of a limit
  want = (f"loud-tile share per vocabulary block of {cols}: median {np.median(share):.3f}, "
          f"max {share.max():.3f}; blocks <=1/64: {int(np.sum(share <= 1 / 64))}, "
          f"<=1/8: {int(np.sum(share <= 1 / 8))} of 8")
  assert gpu._loud_tiles(h, w) == want


def test_extras_benchmark_times_what_it_says(capsys):
  # Every variant's row, with its loss and gradients near the unfused ones of the same loss
  # (scaled or not) and, where it returns statistics, those too.
  from benchmarks import extras
  extras.main(["--quick"])
  rows = [[c.strip() for c in ln.strip("|").split("|")]
          for ln in capsys.readouterr().out.splitlines() if ln.startswith("| N=256, D=32,")]
  assert [c[1] for c in rows] == list(extras.variants(None))
  for c in rows:
    med, lo, hi = map(float, re.match(r"([\d.]+) \(([\d.]+)–([\d.]+)\)", c[3]).groups())
    assert 0 < lo <= med <= hi and float(c[5]) < 1e-5
    if c[6] != "—":
      err, mism = re.match(r"([\d.e+-]+); argmax differs on (\d+)", c[6]).groups()
      assert float(err) < 1e-5 and mism == "0"
  # return_stats, the two-pass form and the unfused one (the reference of the other two).
  assert sum(c[6] != "—" for c in rows) == 3


def test_ctc_benchmark_smoke(capsys):
  # The tiny size runs end to end; jxent's value and gradient agree with Optax's there.
  from benchmarks import ctc
  ctc.main(["--smoke"])
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2, 12")]
  assert [r.split("|")[2].strip() for r in rows] == ["fwd", "fwd+bwd"]
  assert all(float(r.split("|")[-3]) < 1e-5 for r in rows)  # jxent against float64
