"""A GRPO-style policy-gradient update on a toy sequence task, with the head's logits never
held in the update: ``jxent.linear_log_probs(..., return_entropy=True)`` gives the sampled
tokens' log-likelihood and the policy's entropy (an entropy bonus) from one pass.

The task: given a start token, write 8 more tokens from a vocabulary of 16; each token that
is the previous one plus 3 (mod 16) earns 1/8 of the reward. The policy (Flax NNX) sees the
previous token and the position. Each step samples a group of 8 continuations per start
token, scores them, and takes the group-normalised reward as the advantage (GRPO without the
clipping and the KL term, which this on-policy single update does not need):

    loss = -mean_i A_i sum_t log pi(a_it) - beta mean_it H(pi(. | s_it)).

    python examples/policy_gradient.py [--plot policy_gradient.png]
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

VOCAB, LENGTH, STEP = 16, 8, 3


def reward(start, tokens):
  """Share of the tokens that are the previous one plus STEP (mod VOCAB), per sequence."""
  prev = jnp.concatenate([start[:, None], tokens[:, :-1]], axis=1)
  return jnp.mean(tokens == (prev + STEP) % VOCAB, axis=1)


class Policy(nnx.Module):
  def __init__(self, hidden: int = 32, *, rngs: nnx.Rngs):
    self.token = nnx.Embed(VOCAB, hidden, rngs=rngs)
    self.position = nnx.Embed(LENGTH, hidden, rngs=rngs)
    self.mix = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, VOCAB, rngs=rngs)

  def hidden(self, prev, pos):
    """[..., hidden] state from the previous token and the position (both [...])."""
    return jnp.tanh(self.mix(jnp.tanh(self.token(prev) + self.position(pos))))


@nnx.jit
def sample(policy: Policy, start, key):
  """Sampled continuations [B, LENGTH] (the full [B, V] logits of one position are needed
  to draw from it; the update below never forms them)."""
  w, b = policy.head.kernel[...], policy.head.bias[...]
  prev, out = start, []
  for t in range(LENGTH):
    key, sub = jax.random.split(key)
    h = policy.hidden(prev, jnp.full_like(prev, t))
    prev = jax.random.categorical(sub, h @ w + b).astype(jnp.int32)
    out.append(prev)
  return jnp.stack(out, axis=1)


def pg_loss(policy: Policy, start, tokens, advantage, beta):
  prev = jnp.concatenate([start[:, None], tokens[:, :-1]], axis=1)
  h = policy.hidden(prev, jnp.broadcast_to(jnp.arange(LENGTH), prev.shape))
  w, b = policy.head.kernel[...], policy.head.bias[...]
  # REINFORCE: the mean over sequences of A_b sum_t log p(token_bt), and the entropy's mean
  # over tokens; both per token from one pass over the head's blocks (return_entropy).
  logp, ent = jxent.linear_log_probs(h, w, tokens, bias=b, return_entropy=True)
  pg = jnp.sum(advantage[:, None] * logp)
  entropy = jnp.mean(ent)
  loss = -pg / tokens.shape[0] - beta * entropy
  return loss, entropy


@nnx.jit(static_argnames="group")
def update(policy, optimizer, start, key, beta, group):
  starts = jnp.repeat(start, group)
  tokens = sample(policy, starts, key)
  r = reward(starts, tokens)
  g = r.reshape(-1, group)
  advantage = ((g - g.mean(1, keepdims=True)) / (g.std(1, keepdims=True) + 1e-6)).reshape(-1)
  (_, entropy), grads = nnx.value_and_grad(pg_loss, has_aux=True)(
      policy, starts, tokens, advantage, beta)
  optimizer.update(policy, grads)
  return jnp.mean(r), entropy


def greedy(params: dict, start: np.ndarray) -> np.ndarray:
  """Greedy continuations in NumPy from the parameters alone (an independent check)."""
  prev, out = start, []
  for t in range(LENGTH):
    x = np.tanh(params["token"][prev] + params["position"][t])
    h = np.tanh(x @ params["mix_w"] + params["mix_b"])
    prev = np.argmax(h @ params["head_w"] + params["head_b"], axis=-1)
    out.append(prev)
  return np.stack(out, axis=1)


def main(*, steps: int = 300, prompts: int = 32, group: int = 8, beta: float = 0.01,
         lr: float = 1e-2, seed: int = 0, verbose: bool = True, plot: str | None = None
         ) -> dict:
  t0 = time.perf_counter()
  policy = Policy(rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(policy, optax.adam(lr), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  rewards, entropies = [], []
  for i in range(steps):
    key, sub = jax.random.split(key)
    start = jnp.asarray(rng.integers(0, VOCAB, prompts), jnp.int32)
    r, h = update(policy, optimizer, start, sub, beta, group)
    rewards.append(float(r))
    entropies.append(float(h))
    if verbose and (i + 1) % max(steps // 10, 1) == 0:
      print(f"step {i + 1:4d}  mean reward {rewards[-1]:.3f}  "
            f"policy entropy {entropies[-1]:.3f} nats")
  params = {"token": np.asarray(policy.token.embedding[...]),
            "position": np.asarray(policy.position.embedding[...]),
            "mix_w": np.asarray(policy.mix.kernel[...]), "mix_b": np.asarray(policy.mix.bias[...]),
            "head_w": np.asarray(policy.head.kernel[...]),
            "head_b": np.asarray(policy.head.bias[...])}
  result = {"reward": np.asarray(rewards), "entropy": np.asarray(entropies), "params": params,
            "seconds": time.perf_counter() - t0}
  if verbose:
    k = max(steps // 10, 1)
    print(f"mean reward: first {k} steps {np.mean(rewards[:k]):.3f}, last {k} "
          f"{np.mean(rewards[-k:]):.3f}; entropy {np.mean(entropies[:k]):.3f} -> "
          f"{np.mean(entropies[-k:]):.3f} nats (uniform: {np.log(VOCAB):.3f}); "
          f"{result['seconds']:.1f} s")
  if plot:
    _plot(result, plot)
  return result


def _plot(result: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.6))
  ax.plot(result["reward"], color="C0", label="mean reward")
  ax.set_xlabel("update")
  ax.set_ylabel("mean reward", color="C0")
  ax.set_ylim(0, 1.02)
  ax2 = ax.twinx()
  ax2.plot(result["entropy"], color="C1", label="policy entropy")
  ax2.set_ylabel("policy entropy (nats)", color="C1")
  ax2.set_ylim(0, np.log(VOCAB) * 1.05)
  ax.set_title("GRPO-style updates with linear_log_probs (and its entropy)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--plot", help="save the reward and entropy curves to this PNG")
  main(plot=p.parse_args().plot)
