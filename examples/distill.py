"""Distilling a small language model into a smaller one, with the head's logits never held.

The text is generated: a second-order Markov chain over a vocabulary of 32 tokens whose
next-token distributions are peaked, so that its best possible perplexity, exp(entropy
rate), is known exactly. A Flax NNX teacher (context of two
tokens, 256 hidden units) learns it with ``jxent.linear_cross_entropy``; then three students
with an 8-unit bottleneck learn from the teacher alone, on the same inputs and steps:

* ``jxent.linear_kl_divergence`` (forward KL, the teacher's whole distribution),
* ``jxent.linear_js_divergence`` (beta = 0.5),
* cross-entropy on the teacher's argmax (hard labels, ``jxent.linear_cross_entropy``).

Reported: each model's held-out perplexity on the true next tokens, exp(mean NLL), computed
with ``jxent.linear_cross_entropy`` on the held-out split.

    python examples/distill.py [--plot distill.png]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jxent

VOCAB, CONTEXT = 32, 2


def markov_source(seed: int = 0, scale: float = 2.5):
  """[V, V, V] next-token probabilities given the two previous tokens, and the chain's exact
  entropy rate (nats per token) under its stationary distribution over contexts.

  The next token's logits are ``scale * (A[a] + B[b])`` for the previous tokens a, b (A, B
  standard normal [V, V]): each previous token pushes the next one its own way, and the sum
  is peaked."""
  rng = np.random.default_rng(seed)
  a, b = rng.standard_normal((2, VOCAB, VOCAB))
  logits = scale * (a[:, None, :] + b[None, :, :])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  # Stationary distribution of the pair chain (a, b) -> (b, c): power iteration.
  pair = np.full((VOCAB, VOCAB), 1.0 / VOCAB**2)
  for _ in range(500):
    pair = np.einsum("ab,abc->bc", pair, probs)
  with np.errstate(divide="ignore", invalid="ignore"):
    h_next = -np.sum(np.where(probs > 0, probs * np.log(probs), 0.0), axis=-1)
  return probs, float(np.sum(pair * h_next))


def sample_text(probs, n: int, seed: int) -> np.ndarray:
  rng = np.random.default_rng(seed)
  cdf = np.cumsum(probs, axis=-1)
  out = np.empty(n, np.int32)
  out[:CONTEXT] = rng.integers(0, VOCAB, CONTEXT)
  u = rng.random(n)
  for i in range(CONTEXT, n):
    c = cdf[out[i - 2], out[i - 1]]
    out[i] = min(int(np.searchsorted(c, u[i] * c[-1])), VOCAB - 1)
  return out


def windows(text: np.ndarray):
  """(contexts [n, CONTEXT], next tokens [n])."""
  idx = np.arange(CONTEXT, len(text))
  ctx = np.stack([text[idx - CONTEXT + j] for j in range(CONTEXT)], axis=1)
  return ctx.astype(np.int32), text[idx].astype(np.int32)


class ContextLM(nnx.Module):
  """Embeds the previous tokens, mixes them into ``hidden`` units; the head is a separate
  [hidden, V] weight and bias, handed to jxent's fused functions."""

  def __init__(self, hidden: int, *, embed: int = 16, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, embed, rngs=rngs)
    self.mix = nnx.Linear(CONTEXT * embed, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, VOCAB, rngs=rngs)

  def hidden(self, ctx):
    e = self.embed(ctx).reshape(ctx.shape[0], -1)
    return jnp.tanh(self.mix(e))

  def head_params(self):
    return self.head.kernel[...], self.head.bias[...]


@nnx.jit
def _held_out_nll(model: ContextLM, ctx, y):
  w, b = model.head_params()
  return jxent.linear_cross_entropy(model.hidden(ctx), w, y, bias=b)


def perplexity(model: ContextLM, ctx, y) -> float:
  return float(jnp.exp(_held_out_nll(model, ctx, y)))


def params_numpy(model: ContextLM) -> dict:
  return {"embed": np.asarray(model.embed.embedding[...]),
          "mix_w": np.asarray(model.mix.kernel[...]), "mix_b": np.asarray(model.mix.bias[...]),
          "head_w": np.asarray(model.head.kernel[...]),
          "head_b": np.asarray(model.head.bias[...])}


def train(model, loss_fn, data, *, steps, batch, lr, seed, eval_every, eval_data):
  """Adam on ``loss_fn(model, ctx, y)``; returns the held-out perplexity curve."""
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, ctx, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, ctx, y)
    optimizer.update(model, grads)
    return loss

  ctx, y = data
  rng = np.random.default_rng(seed)
  curve = []
  for i in range(steps + 1):
    if i % eval_every == 0 or i == steps:
      curve.append((i, perplexity(model, *eval_data)))
    if i < steps:
      idx = rng.integers(0, len(y), batch)
      step(model, optimizer, ctx[idx], y[idx])
  return curve


def main(*, teacher_steps: int = 1500, student_steps: int = 1500, tokens: int = 60_000,
         student_hidden: int = 8, batch: int = 256, seed: int = 0, verbose: bool = True,
         plot: str | None = None) -> dict:
  t0 = time.perf_counter()
  probs, entropy_rate = markov_source(seed)
  train_text = sample_text(probs, tokens, seed + 1)
  test_text = sample_text(probs, tokens // 4, seed + 2)
  data, held_out = windows(train_text), windows(test_text)
  every = max(student_steps // 20, 1)

  teacher = ContextLM(256, rngs=nnx.Rngs(seed))

  def ce_on_data(model, ctx, y):
    w, b = model.head_params()
    return jxent.linear_cross_entropy(model.hidden(ctx), w, y, bias=b)

  train(teacher, ce_on_data, data, steps=teacher_steps, batch=batch, lr=3e-3, seed=seed,
        eval_every=max(teacher_steps // 10, 1), eval_data=held_out)
  t_w, t_b = teacher.head_params()

  def teacher_hidden(ctx):
    return jax.lax.stop_gradient(teacher.hidden(ctx))

  losses = {
      "forward KL": lambda m, ctx, y: jxent.linear_kl_divergence(
          m.hidden(ctx), m.head_params()[0], teacher_hidden(ctx), t_w,
          student_bias=m.head_params()[1], teacher_bias=t_b),
      "JS (beta=0.5)": lambda m, ctx, y: jxent.linear_js_divergence(
          m.hidden(ctx), m.head_params()[0], teacher_hidden(ctx), t_w, beta=0.5,
          student_bias=m.head_params()[1], teacher_bias=t_b),
      "CE on teacher argmax": lambda m, ctx, y: jxent.linear_cross_entropy(
          m.hidden(ctx), m.head_params()[0],
          jnp.argmax(teacher_hidden(ctx) @ t_w + t_b, axis=-1), bias=m.head_params()[1]),
  }
  students, curves = {}, {}
  for name, fn in losses.items():
    # Every student starts from the same weights and sees the same batches.
    s = ContextLM(student_hidden, rngs=nnx.Rngs(seed + 10))
    curves[name] = train(s, fn, data, steps=student_steps, batch=batch, lr=1e-2, seed=seed,
                         eval_every=every, eval_data=held_out)
    students[name] = s

  result = {
      "best_possible_perplexity": float(np.exp(entropy_rate)),
      "teacher_perplexity": perplexity(teacher, *held_out),
      "student_perplexity": {k: perplexity(s, *held_out) for k, s in students.items()},
      "curves": curves,
      "params": {"teacher": params_numpy(teacher),
                 **{k: params_numpy(s) for k, s in students.items()}},
      "held_out": held_out,
      "seconds": time.perf_counter() - t0,
  }
  if verbose:
    print(f"held-out perplexity ({len(held_out[1])} tokens; the source's best possible: "
          f"{result['best_possible_perplexity']:.3f})")
    print(f"  teacher (256 hidden units, trained on the text)  {result['teacher_perplexity']:.3f}")
    for k, v in result["student_perplexity"].items():
      print(f"  student ({student_hidden} units) by {k:22s}  {v:.3f}")
    print(f"({result['seconds']:.1f} s)")
  if plot:
    _plot(result, plot)
  return result


def _plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.6))
  for name, curve in result["curves"].items():
    steps, ppl = zip(*curve)
    ax.plot(steps, ppl, label=f"student: {name}")
  ax.axhline(result["teacher_perplexity"], color="k", ls="--", lw=1, label="teacher")
  ax.axhline(result["best_possible_perplexity"], color="gray", ls=":", lw=1,
             label="source's best possible")
  ax.set_xlabel("student step")
  ax.set_ylabel("held-out perplexity")
  ax.set_yscale("log")
  ax.set_title("Distilling from the teacher alone (no true labels)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--plot", help="save the perplexity curves to this PNG")
  main(plot=p.parse_args().plot)
