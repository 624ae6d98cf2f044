"""The fused loss's extra outputs in its own pass, against the same numbers from extra calls.

    python -m benchmarks extras [--quick] [--reps 5]

Forward+backward under ``jit(value_and_grad)`` with respect to h and W, float32, mean
reduction, default chunk size, in one process, alternating; ratio = median of per-repetition
time ratios to the plain fused loss (min–max in parentheses):

* ``return_stats=True`` (each token's logsumexp, entropy, argmax and label log-probability
  from the loss's pass) against the loss followed by ``linear_token_stats`` (a second pass
  over the logits' blocks);
* ``token_scaling=True`` (each token's loss times its label's probability, held constant,
  with the forward method's gradients) against the same loss built by hand from the
  per-token losses (``reduction="none"``, whose derivative computes the blocks again);
* ``shift=1`` (next-token prediction on sequences of 512 tokens, ``[B, 512]``: the labels
  move, ``hidden`` is not sliced) against slicing ``hidden[:, :-1]`` and ``labels[:, 1:]``
  first, both against the unfused loss of the sliced inputs;
* the unfused loss with its statistics on the materialised logits, for scale.

Also XLA's scratch (``memory_analysis()``) and the largest difference of each variant's
statistics and gradients from the unfused ones. Writes the "extras" section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jxent
from benchmarks import _harness as H
from benchmarks.fused import _inputs

SIZES = [(4096, 512, 32768)]
QUICK_SIZES = [(256, 32, 2048)]


def _dense(h, w, y, scaled):
  """The unfused loss and its statistics, or (``scaled``) the loss scaled by p_y held constant
  and no statistics (those are the unscaled row's)."""
  z = jnp.dot(h, w, preferred_element_type=jnp.float32)
  lp = jax.nn.log_softmax(z)
  nll = -jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0]
  if scaled:
    return jnp.mean(jax.lax.stop_gradient(jnp.exp(-nll)) * nll), None
  ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
  zs = jax.lax.stop_gradient(z)
  stats = jxent.TokenStats(jax.nn.logsumexp(zs, axis=-1), jax.lax.stop_gradient(ent),
                           jnp.argmax(zs, axis=-1).astype(jnp.int32),
                           jax.lax.stop_gradient(-nll))
  return jnp.mean(nll), stats


SEQ = 512  # positions per sequence of the shift rows


def variants(y):
  """name -> (jitted value_and_grad in h and W returning ((loss, stats or None), grads),
  the unfused variant it is checked against)."""
  vg = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
  lce = jxent.linear_cross_entropy
  seq = SEQ if y is None else min(SEQ, y.shape[0])  # (--quick: N = 256, one sequence)
  seqs = lambda a: a.reshape(-1, seq, *a.shape[1:])

  def then_stats(h, w):
    return lce(h, w, y), jxent.linear_token_stats(h, w, y)

  def scaled_by_hand(h, w):
    per = lce(h, w, y, reduction="none")
    return jnp.mean(jax.lax.stop_gradient(jnp.exp(-per)) * per), None

  def next_token_unfused(h, w):
    hs, ys = seqs(h)[:, :-1], seqs(y)[:, 1:]
    lp = jax.nn.log_softmax(jnp.dot(hs, w, preferred_element_type=jnp.float32))
    return jnp.mean(-jnp.take_along_axis(lp, ys[..., None], axis=-1)), None

  plain, scaled, nxt = "unfused loss and stats", "unfused, scaled", "unfused, next token"
  return {
      "loss": (vg(lambda h, w: (lce(h, w, y), None)), plain),
      "return_stats": (vg(lambda h, w: lce(h, w, y, return_stats=True)), plain),
      "loss, then linear_token_stats": (vg(then_stats), plain),
      plain: (vg(lambda h, w: _dense(h, w, y, False)), plain),
      "token_scaling": (vg(lambda h, w: (lce(h, w, y, token_scaling=True), None)), scaled),
      "scaled by hand (reduction='none')": (vg(scaled_by_hand), scaled),
      scaled: (vg(lambda h, w: _dense(h, w, y, True)), scaled),
      "shift=1": (
          vg(lambda h, w: (lce(seqs(h), w, seqs(y), shift=1), None)), nxt),
      "sliced h[:, :-1], y[:, 1:]": (
          vg(lambda h, w: (lce(seqs(h)[:, :-1], w, seqs(y)[:, 1:]), None)), nxt),
      nxt: (vg(next_token_unfused), nxt),
  }


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def run(sizes, reps):
  rows = []
  for n, d, v in sizes:
    h, w, y = _inputs(n, d, v)
    fs = variants(y)
    outs = {k: f(h, w) for k, (f, _) in fs.items()}
    mem = {k: H.xla_memory(f, h, w) for k, (f, _) in fs.items()}
    res = H.time_side_by_side({k: H.blocking(f, h, w) for k, (f, _) in fs.items()},
                              reference="loss", warmup=1, reps=reps)
    for k, (_, ref) in fs.items():
      ((loss, stats), grads) = outs[k]
      ((ref_loss, ref_stats), ref_grads) = outs[ref]
      err = max([abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))]
                + [_rel(a, b) for a, b in zip(grads, ref_grads)])
      stats_err = "—"
      if stats is not None:
        mism = int(np.sum(np.asarray(stats.argmax) != np.asarray(ref_stats.argmax)))
        stats_err = (f"{max(_rel(stats[i], ref_stats[i]) for i in (0, 1, 3)):.1e}; "
                     f"argmax differs on {mism}")
      row = {"size": f"N={n}, D={d}, V={v}", "variant": k, "ms": res[k]["median_s"] * 1e3,
             "ratio": H.spread(res[k], 3), "temp_mib": mem[k]["temp"] / 2**20, "err": err,
             "stats_err": stats_err}
      rows.append(row)
      print(_fmt(row), flush=True)
  return rows


def _fmt(r):
  return (f"| {r['size']} | {r['variant']} | {r['ms']:,.0f} | {r['ratio']} | "
          f"{r['temp_mib']:,.1f} | {r['err']:.1e} | {r['stats_err']} |")


def to_markdown(rows, reps):
  return "\n".join([
      "## The fused loss's extra outputs in its own pass (CPU, float32, forward+backward)",
      "",
      f"Machine: {H.machine()}. `python -m benchmarks extras`; `jit(value_and_grad)` in h and "
      f"W, mean reduction, default chunk size; median of {reps} repetitions after warm-up, "
      "variants alternating, ratio = median of per-repetition time ratios to the plain fused "
      "loss (their min–max in parentheses). Error: largest relative difference of loss, dh "
      "and dW to the unfused variant of the same loss; statistics: of logsumexp, entropy and "
      "label log-probability, and how many argmaxes differ.",
      "",
      "| size | variant | ms | time / fused loss | XLA scratch MiB | max rel. error "
      "| statistics' max rel. error |",
      "|---|---|---:|---:|---:|---:|---|",
      *[_fmt(r) for r in rows],
  ])


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks extras",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="one small size; no RESULTS.md")
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args(argv)
  rows = run(QUICK_SIZES if args.quick else SIZES, 2 if args.quick else args.reps)
  if not args.quick:
    H.write_section("extras", to_markdown(rows, args.reps))


if __name__ == "__main__":
  main()
