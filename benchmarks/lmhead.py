"""Every quantity of a language-model head, fused against unfused, forward+backward.

    python -m benchmarks lmhead [--quick] [--reps 3]

For each quantity, the scalar ``mean`` over tokens under ``jit(value_and_grad)`` with respect
to the student's h and W: jxent's blockwise function against the same formula on the
materialised logits (``jax.nn.log_softmax(h @ W)``; for the distillation losses both heads'
logits, the teacher's without gradient). Reports XLA's scratch (``memory_analysis()``), the
peak RSS of a fresh process per variant, the median of per-repetition time ratios, and the
largest relative difference of value and gradients. Writes the "lmhead" section of
benchmarks/RESULTS.md.
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

import jxent
from benchmarks import _harness as H
from benchmarks.fused import _rss_mib

SIZES = [(4096, 512, 32768), (8192, 1024, 65536)]
QUICK_SIZES = [(512, 64, 4096)]
K = 64  # the teacher's top-k
# "log_probs" and "entropy": the token mean taken by the function (reduction="mean", its
# gradients formed with the values); "…/token": the mean of its per-token output (any
# cotangent: the derivative computes the blocks again).
# "log_probs+entropy/token": both per token from one pass (return_entropy), the sum of their
# means; "…, two calls": the same from linear_log_probs and linear_entropy; "log_probs+entropy,
# two calls": their own reduction="mean" (each forms its gradients with its values).
# "kl+ce": linear_distillation_loss (half the forward KL, half the labels' cross-entropy, from
# one pass); "kl+ce, two calls": the same from linear_kl_divergence and linear_cross_entropy.
# "grpo": linear_policy_loss (GRPO's clipped ratio against old log-probabilities, beta = 0.04
# against a reference's, DAPO's token mean; its gradients formed with the value); "grpo, via
# log_probs/token": policy_loss of linear_log_probs' per-token output (any cotangent).
# "dpo": linear_preference_loss (DPO's sigmoid loss of sequence sums against a reference's,
# pairs of SEQ-token sequences, each chunk whole pairs); "kto": linear_kto_loss (sequences of
# SEQ tokens, every other one desirable, against a reference's, KL point 0.1); "gspo": "grpo"
# with GSPO's sequence ratio (importance_sampling_level="sequence", each chunk whole sequences);
# "vespo": "grpo" with VESPO's loss (loss_type="vespo", each chunk whole sequences).
# "dense_kl": linear_topk_kl_divergence with teacher_indices=None, the KL from a dense target
# given as data ([N, V] log-probabilities, an input of both variants; Liger's fused linear KL).
QUANTITIES = ("log_probs", "log_probs/token", "entropy", "entropy/token",
              "log_probs+entropy/token", "log_probs+entropy/token, two calls",
              "log_probs+entropy, two calls", "kl", "js", "tv", "topk_kl", "kl+ce",
              "kl+ce, two calls", "grpo", "grpo, via log_probs/token", "gspo", "dpo", "kto",
              "vespo", "dense_kl")
SEQ = 256  # tokens per sequence of the policy losses (one advantage per sequence)


def _inputs(n, d, v, dense=False):
  """The inputs; with ``dense`` also a dense target ``lt`` ([n, v] log-probabilities: those of
  the teacher head ht @ wt), else None."""
  rng = np.random.default_rng(0)
  f32 = np.float32
  x = {
      "h": jnp.asarray(rng.standard_normal((n, d), dtype=f32)),
      "w": jnp.asarray(rng.standard_normal((d, v), dtype=f32) * d**-0.5),
      "y": jnp.asarray(rng.integers(0, v, size=n, dtype=np.int32)),
      "ht": jnp.asarray(rng.standard_normal((n, d), dtype=f32)),
      "wt": jnp.asarray(rng.standard_normal((d, v), dtype=f32) * d**-0.5),
      "idx": jnp.asarray(np.argsort(rng.standard_normal((n, 2 * K)), axis=-1)[:, :K]
                         .astype(np.int32)),
      "lpt": jnp.asarray(np.log(rng.dirichlet(np.ones(K + 1), size=n)[:, :K]).astype(f32)),
      # The policy losses: per-sequence advantages; old and reference log-probabilities
      # about those of the policy (ratios between about 0.3 and 3: many clipped tokens).
      "adv": jnp.asarray(rng.standard_normal(n // SEQ, dtype=f32)),
      "old": jnp.asarray((-np.log(v) - 0.5 + 0.5 * rng.standard_normal(n)).astype(f32)),
      "ref": jnp.asarray((-np.log(v) - 0.5 + 0.5 * rng.standard_normal(n)).astype(f32)),
  }
  x["lt"] = jax.jit(lambda h, w: jax.nn.log_softmax(jnp.dot(h, w)))(x["ht"], x["wt"]) if dense \
      else None
  return x


# Arguments, not constants XLA could fold.
DATA = ("y", "ht", "wt", "idx", "lpt", "adv", "old", "ref", "lt")


def _dense(q):
  """The quantity's token mean on the materialised logits (the unfused reference)."""

  q = q.split("/")[0].split(",")[0]

  def f(h, w, y, ht, wt, idx, lpt, adv, old, ref, lt):
    lq = jax.nn.log_softmax(jnp.dot(h, w, preferred_element_type=jnp.float32))
    if q in ("grpo", "gspo", "vespo"):
      lp = jnp.take_along_axis(lq, y[:, None], axis=-1)[:, 0]
      return _policy(jxent.policy_loss, lp, adv, old, ref, level=q)
    if q == "dpo":
      seq = jnp.take_along_axis(lq, y[:, None], axis=-1)[:, 0].reshape(2, -1, SEQ).sum(-1)
      rs = ref.reshape(2, -1, SEQ).sum(-1)
      return jxent.preference_loss(seq[0], seq[1], ref_chosen_log_probs=rs[0],
                                   ref_rejected_log_probs=rs[1])
    if q == "kto":
      seq = jnp.take_along_axis(lq, y[:, None], axis=-1)[:, 0].reshape(-1, SEQ).sum(-1)
      return jxent.kto_loss(seq, _preferred(seq.shape[0]),
                            ref_log_probs=ref.reshape(-1, SEQ).sum(-1), kl=0.1)
    if q == "log_probs":
      return jnp.mean(jnp.take_along_axis(lq, y[:, None], axis=-1))
    if q == "dense_kl":
      return jnp.mean(jnp.sum(jnp.exp(lt) * (lt - lq), axis=-1))
    if q == "entropy":
      return jnp.mean(-jnp.sum(jnp.exp(lq) * lq, axis=-1))
    if q == "log_probs+entropy":
      return (jnp.mean(jnp.take_along_axis(lq, y[:, None], axis=-1))
              + jnp.mean(-jnp.sum(jnp.exp(lq) * lq, axis=-1)))
    if q in ("kl", "js", "tv", "kl+ce"):
      lp = jax.lax.stop_gradient(jax.nn.log_softmax(jnp.dot(ht, wt)))
      p, qq = jnp.exp(lp), jnp.exp(lq)
      if q == "kl":
        return jnp.mean(jnp.sum(p * (lp - lq), axis=-1))
      if q == "kl+ce":
        return (0.5 * jnp.mean(jnp.sum(p * (lp - lq), axis=-1))
                - 0.5 * jnp.mean(jnp.take_along_axis(lq, y[:, None], axis=-1)))
      if q == "tv":
        return jnp.mean(0.5 * jnp.sum(jnp.abs(p - qq), axis=-1))
      lm = jnp.log(0.5 * p + 0.5 * qq)
      return jnp.mean(0.5 * jnp.sum(p * (lp - lm), -1) + 0.5 * jnp.sum(qq * (lq - lm), -1))
    lq_i = jnp.take_along_axis(lq, idx, axis=-1)
    others = jnp.ones(lq.shape, bool).at[jnp.arange(lq.shape[0])[:, None], idx].set(False)
    lq_rest = jax.nn.logsumexp(jnp.where(others, lq, -jnp.inf), axis=-1)
    p = jnp.exp(lpt)
    r = 1 - jnp.sum(p, -1)
    return jnp.mean(jnp.sum(p * (lpt - lq_i), -1) + r * (jnp.log(r) - lq_rest))

  return f


def _preferred(n):
  return jnp.arange(n) % 2 == 0


def _policy(loss, lp, adv, old, ref, level="grpo"):
  """GRPO's loss of per-token log-probabilities [N] as sequences of SEQ tokens (``level``
  "gspo": GSPO's sequence ratio; "vespo": VESPO's loss)."""
  seqs = lambda a: a.reshape(-1, SEQ)
  return loss(seqs(lp), adv, old_log_probs=seqs(old), ref_log_probs=seqs(ref), beta=0.04,
              importance_sampling_level="sequence" if level == "gspo" else "token",
              loss_type="vespo" if level == "vespo" else "dapo")


def _fused(q):

  def f(h, w, y, ht, wt, idx, lpt, adv, old, ref, lt):
    if q in ("grpo", "gspo", "vespo"):
      h3 = h.reshape(-1, SEQ, h.shape[-1])
      return _policy(lambda lp, *a, **k: jxent.linear_policy_loss(h3, w, lp, *a, **k),
                     y, adv, old, ref, level=q)
    if q == "dpo":
      return jxent.linear_preference_loss(h.reshape(2, -1, SEQ, h.shape[-1]), w,
                                          y.reshape(2, -1, SEQ),
                                          ref_log_probs=ref.reshape(2, -1, SEQ))
    if q == "kto":
      return jxent.linear_kto_loss(h.reshape(-1, SEQ, h.shape[-1]), w, y.reshape(-1, SEQ),
                                   _preferred(h.shape[0] // SEQ),
                                   ref_log_probs=ref.reshape(-1, SEQ), kl=0.1)
    if q == "grpo, via log_probs/token":
      return _policy(jxent.policy_loss, jxent.linear_log_probs(h, w, y), adv, old, ref)
    if q == "log_probs":
      return jxent.linear_log_probs(h, w, y, reduction="mean")
    if q == "log_probs/token":
      return jnp.mean(jxent.linear_log_probs(h, w, y))
    if q == "entropy":
      return jxent.linear_entropy(h, w, reduction="mean")
    if q == "entropy/token":
      return jnp.mean(jxent.linear_entropy(h, w))
    if q == "log_probs+entropy/token":
      lp, ent = jxent.linear_log_probs(h, w, y, return_entropy=True)
      return jnp.mean(lp) + jnp.mean(ent)
    if q == "log_probs+entropy/token, two calls":
      return jnp.mean(jxent.linear_log_probs(h, w, y)) + jnp.mean(jxent.linear_entropy(h, w))
    if q == "log_probs+entropy, two calls":
      return (jxent.linear_log_probs(h, w, y, reduction="mean")
              + jxent.linear_entropy(h, w, reduction="mean"))
    if q == "kl":
      return jxent.linear_kl_divergence(h, w, ht, wt)
    if q == "js":
      return jxent.linear_js_divergence(h, w, ht, wt)
    if q == "tv":
      return jxent.linear_tv_distance(h, w, ht, wt)
    if q == "kl+ce":
      return jxent.linear_distillation_loss(h, w, ht, wt, y)
    if q == "kl+ce, two calls":
      return (0.5 * jxent.linear_kl_divergence(h, w, ht, wt)
              + 0.5 * jxent.linear_cross_entropy(h, w, y))
    if q == "dense_kl":
      return jxent.linear_topk_kl_divergence(h, w, None, lt)
    return jxent.linear_topk_kl_divergence(h, w, idx, lpt)

  return f


def variants(q):
  return {"unfused": jax.jit(jax.value_and_grad(_dense(q), argnums=(0, 1))),
          "jxent": jax.jit(jax.value_and_grad(_fused(q), argnums=(0, 1)))}


def _args(x):
  return (x["h"], x["w"], *(x[k] for k in DATA))


def rss_probe(q, name, n, d, v):
  """Peak RSS (MiB) of one run of a variant in this fresh process, as JSON."""
  args = _args(_inputs(n, d, v, dense=q == "dense_kl"))
  f = variants(q)[name]
  jax.block_until_ready(f(*args))
  base = _rss_mib("VmRSS")
  with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
  jax.block_until_ready(f(*args))
  print(json.dumps({"peak_mib": _rss_mib("VmHWM"), "before_mib": base}))


def _rss(q, name, n, d, v):
  out = subprocess.run([sys.executable, "-m", "benchmarks", "lmhead", "--rss", q, name,
                        f"{n},{d},{v}"], capture_output=True, text=True, check=True,
                       env=dict(os.environ))
  return json.loads(out.stdout.strip().splitlines()[-1])


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def run(sizes, reps, quantities=QUANTITIES):
  rows = []
  for n, d, v in sizes:
    args = _args(_inputs(n, d, v, dense="dense_kl" in quantities))
    for q in quantities:
      fs = variants(q)
      mem = {k: H.xla_memory(f, *args) for k, f in fs.items()}
      outs = {k: f(*args) for k, f in fs.items()}
      res = H.time_side_by_side({k: H.blocking(f, *args) for k, f in fs.items()},
                                reference="unfused", warmup=1, reps=reps)
      ref_val, (ref_dh, ref_dw) = outs["unfused"]
      val, (dh, dw) = outs["jxent"]
      rss = {k: _rss(q, k, n, d, v) for k in fs}
      row = {
          "size": f"N={n}, D={d}, V={v}", "quantity": q,
          "ms": res["jxent"]["median_s"] * 1e3, "ms_ref": res["unfused"]["median_s"] * 1e3,
          "ratio": res["jxent"], "temp_mib": mem["jxent"]["temp"] / 2**20,
          "temp_ref_mib": mem["unfused"]["temp"] / 2**20,
          "temp_frac": mem["jxent"]["temp"] / mem["unfused"]["temp"],
          "peak": rss["jxent"]["peak_mib"], "peak_ref": rss["unfused"]["peak_mib"],
          "rss": rss["jxent"]["peak_mib"] - rss["jxent"]["before_mib"],
          "rss_ref": rss["unfused"]["peak_mib"] - rss["unfused"]["before_mib"],
          "err": max(abs(float(val) - float(ref_val)) / max(abs(float(ref_val)), 1e-30),
                     _rel(dh, ref_dh), _rel(dw, ref_dw)),
      }
      rows.append(row)
      print(_fmt(row), flush=True)
      del fs, outs
  return rows


def _fmt(r):
  return (f"| {r['size']} | {r['quantity']} | {r['ms']:,.0f} | {r['ms_ref']:,.0f} | "
          f"**{H.spread(r['ratio'], 3)}** | {r['temp_mib']:,.1f} | {r['temp_ref_mib']:,.0f} | "
          f"**{100 * r['temp_frac']:.1f}%** | {r['peak']:,.0f} | {r['peak_ref']:,.0f} | "
          f"{r['rss']:,.0f} | {r['rss_ref']:,.0f} | {r['err']:.1e} |")


def to_markdown(rows, reps):
  return "\n".join([
      "## Language-model head quantities (CPU, float32, forward+backward)",
      "",
      f"Machine: {H.machine()}. `python -m benchmarks lmhead`; the token mean of each "
      "quantity under `jit(value_and_grad)` with respect to the student's h and W, default "
      "chunk size (the function's own `reduction=\"mean\"`; \"/token\": `jnp.mean` of its "
      "per-token output, whose derivative takes any cotangent and computes the blocks "
      "again), against the same formula on the materialised logits (distillation: both "
      f"heads' logits, the teacher's without gradient; top-k: k = {K}). Median of {reps} "
      "repetitions after warm-up, variants alternating; ratio = median of per-repetition "
      "time ratios (min–max). Scratch: XLA's `temp_size_in_bytes`; peak RSS: the kernel's "
      "high-water mark (`VmHWM`, reset after a warm-up run) of a fresh process during one "
      "run; RSS added: that peak minus the resident size before the run (near 0 when the "
      "run reuses the warm-up's memory). Error: largest relative difference of value, dh "
      "and dW. \"log_probs+entropy/token\": both per token from one call "
      "(`return_entropy=True`), the sum of their means; \"…, two calls\": the same from "
      "`linear_log_probs` and `linear_entropy`; \"log_probs+entropy, two calls\": the sum of "
      "their own `reduction=\"mean\"`. \"kl+ce\": `linear_distillation_loss` (half the "
      "forward KL, half the labels' cross-entropy, from one pass over the blocks); \"kl+ce, "
      "two calls\": the same from `linear_kl_divergence` and `linear_cross_entropy`. "
      f"\"grpo\": `linear_policy_loss` (sequences of {SEQ} tokens, one advantage each, "
      "the clipped ratio against old log-probabilities, beta = 0.04 against a reference's, "
      "the token mean), against `policy_loss` of the materialised log-softmax; \"grpo, via "
      "log_probs/token\": `policy_loss` of `linear_log_probs`' per-token output; \"gspo\": "
      "\"grpo\" with GSPO's sequence ratio (`importance_sampling_level=\"sequence\"`); "
      "\"vespo\": \"grpo\" with VESPO's loss (`loss_type=\"vespo\"`). "
      "\"dpo\": "
      f"`linear_preference_loss` (pairs of {SEQ}-token sequences, DPO's sigmoid loss of "
      "the sequences' sums against a reference's, beta = 0.1), against `preference_loss` of "
      "the materialised log-softmax's sums; \"kto\": `linear_kto_loss` (sequences of "
      f"{SEQ} tokens, every other one desirable, the KL point 0.1), against `kto_loss` "
      "likewise. The "
      "total variation's gradient jumps by q_v where "
      "p_v = q_v; a (token, class) pair whose p_v and q_v agree to float32's rounding (a "
      "relative gap under 1e-6: 67 of the 134M pairs at the first size, counted in float64) "
      "can take either sign in either float32 computation, and one such pair moves a column "
      "of dW by about 1/sqrt(N) of its "
      "scale: its error column is that jump (its value agrees to float32 resolution).",
      "",
      "| size | quantity | jxent ms | unfused ms | time / unfused (min–max) | jxent scratch "
      "MiB | unfused scratch MiB | scratch / unfused | jxent peak RSS MiB | unfused peak RSS "
      "MiB | jxent RSS added MiB | unfused RSS added MiB | max rel. error |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      *[_fmt(r) for r in rows],
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--quick", action="store_true", help="one small size; no RESULTS.md")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--quantities", nargs="+", choices=QUANTITIES, default=QUANTITIES,
                 help="measure these alone; their rows replace the same rows of the "
                      "RESULTS.md table, the others stay as they were measured")
  p.add_argument("--rss", nargs=3, metavar=("QUANTITY", "VARIANT", "N,D,V"),
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rss:
    rss_probe(args.rss[0], args.rss[1], *map(int, args.rss[2].split(",")))
    return
  rows = run(QUICK_SIZES if args.quick else SIZES, args.reps, tuple(args.quantities))
  if not args.quick:
    H.write_section("lmhead", merge_rows(to_markdown(rows, args.reps), rows))


def _key(line):
  """(size, quantity) of a table row of the section."""
  cells = [c.strip() for c in line.strip().strip("|").split("|")]
  return cells[0], cells[1]


def merge_rows(markdown, rows):
  """``markdown`` with, when ``rows`` are a part of the quantities, the RESULTS.md rows of the
  others kept (in the table's order: size, then quantity)."""
  if {r["quantity"] for r in rows} == set(QUANTITIES):
    return markdown
  text = H.RESULTS.read_text() if H.RESULTS.exists() else ""
  start, end = "<!-- lmhead:start -->", "<!-- lmhead:end -->"
  old = text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else ""
  fresh = {(r["size"], r["quantity"]): _fmt(r) for r in rows}
  kept = {_key(ln): ln for ln in old.splitlines() if ln.startswith("| N=")}
  table = {**kept, **fresh}
  order = {q: i for i, q in enumerate(QUANTITIES)}
  sizes = [f"N={n}, D={d}, V={v}" for n, d, v in SIZES]
  keys = sorted(table, key=lambda k: (sizes.index(k[0]) if k[0] in sizes else len(sizes),
                                      order.get(k[1], len(order))))
  head = [ln for ln in markdown.splitlines() if not ln.startswith("| N=")]
  return "\n".join(head + [table[k] for k in keys])


if __name__ == "__main__":
  main()
