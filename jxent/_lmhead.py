"""Per-token information quantities of a language-model head, without the [N, V] logits.

For hidden states ``h`` ([..., D]), an output projection ``W`` and an optional bias, the
logits of a token are ``z = (h W + b) / T`` (temperature ``T``). Per token this module
computes, one ``[chunk, V]`` block of logits at a time as ``linear_cross_entropy`` does:

* the log-probability of a label, ``log softmax(z)[y] = z_y - lse(z)``;
* the entropy ``H = -sum_v p_v log p_v = lse(z) - E_p[z]``;
* the logsumexp and the argmax (monitoring).

One ``jax.custom_jvp`` rule serves the differentiable ones. Its primal keeps per token the
logsumexp, the entropy and the label's logit; its tangent recomputes the blocks (vocabulary
slices outside, token chunks inside, both checkpointed, as the recompute method of the
cross-entropy) and returns, for a tangent ``dz`` of the logits,

    d lse = E_p[dz],   d z_y = dz_y,   d H = -Cov_p(z, dz) = -(E_p[(z - lse) dz] + H E_p[dz]),

linear in the tangents of ``h``, ``W`` and ``b``: forward mode, reverse mode (JAX's
transpose) and higher orders all work, and reverse mode keeps only the inputs and three
numbers per token.

The entropy is formed from ``log s - t / s`` with ``s = sum exp(z - m)`` and
``t = sum exp(z - m) (z - m)`` (``m`` the row's max), and ``log s`` as ``log1p`` of the sum
without the max's own term: it keeps its relative accuracy when the distribution is nearly
one-hot (no difference of two large numbers, no tail lost next to 1).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _fused as F
from jxent import _reference as R

Array = jax.Array


@functools.partial(jax.tree_util.register_dataclass, data_fields=[],
                   meta_fields=["layout", "vocab_slice", "acc", "temperature"])
class _Config:
  def __init__(self, layout, vocab_slice, acc, temperature):
    self.layout, self.vocab_slice = layout, vocab_slice
    self.acc, self.temperature = acc, temperature


def _plain(cfg):
  """The cross-entropy module's config for ``h @ W (+ b)`` alone (no cap, no options)."""
  return F._Config(None, None, None, cfg.layout, cfg.vocab_slice, cfg.acc)


def _block_logits(h, w, b, cfg):
  z = F._logits(h, w, b, _plain(cfg))[0]
  return z if cfg.temperature == 1.0 else z * (1.0 / cfg.temperature)


def _chunk_stats(z, y):
  """(lse, entropy, label logit, argmax) of one [T, V] block of logits."""
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1))
  m = jnp.where(jnp.isfinite(m), m, 0)
  zm = z - m[:, None]
  e = jnp.exp(zm)
  # s = sum e = 1 + rest, with rest summed without the max's own 1, so that log s keeps the
  # tail's mass when it is below float resolution next to 1 (a nearly one-hot row).
  top = zm == 0
  rest = jnp.sum(jnp.where(top, 0, e), axis=-1) + (jnp.sum(top, axis=-1) - 1)
  log_s = jnp.log1p(rest)
  # e * zm is 0 where e underflows (z = -inf gives 0 * -inf: taken as 0, 0 log 0 = 0).
  t = jnp.sum(jnp.where(e > 0, e * zm, 0), axis=-1)
  lse = m + log_s
  ent = log_s - t / (1 + rest)
  z_y = jnp.take_along_axis(z, jnp.clip(y, 0, z.shape[-1] - 1)[:, None], axis=-1)[:, 0]
  return lse, ent, z_y, jnp.argmax(z, axis=-1).astype(jnp.int32)


def _forward(h3, w, b, y2, cfg, with_argmax=False):
  def body(_, xs):
    h, y = xs
    lse, ent, z_y, am = _chunk_stats(_block_logits(h, w, b, cfg), y)
    return None, (lse, ent, z_y, am) if with_argmax else (lse, ent, z_y)

  return jax.lax.scan(body, None, (h3, y2))[1]


@jax.custom_jvp
def _head_stats(h3, w, b, y2, cfg):
  """(lse, entropy, label logit), each [n_chunks, T]."""
  return _forward(h3, w, b, y2, cfg)


def _stats_block_tangent(h, y, valid, res, dh, w, b, dw, db, cfg, start, v):
  """Tangents of (lse, entropy, label logit) of one chunk from the vocabulary slice
  ``start:start + S`` (w, b and their tangents sliced)."""
  del valid, v
  lse, ent = res
  z = _block_logits(h, w, b, cfg)
  zl = z - jnp.where(jnp.isfinite(lse), lse, 0)[:, None]
  p = jnp.exp(zl)
  plain = _plain(cfg)
  dz = jnp.zeros(z.shape, cfg.acc)
  if dh is not None:
    dz = dz + F._logits(dh, w, None, plain)[0]
  if dw is not None:
    dz = dz + F._logits(h, dw, None, plain)[0]
  if db is not None:
    dz = dz + db.astype(cfg.acc)
  if cfg.temperature != 1.0:
    dz = dz * (1.0 / cfg.temperature)
  a1 = jnp.sum(p * dz, axis=-1)
  a2 = jnp.sum(jnp.where(p > 0, p * zl, 0) * dz, axis=-1)
  onehot = (jnp.arange(z.shape[-1]) + start)[None, :] == y[:, None]
  d_zy = jnp.sum(jnp.where(onehot, dz, 0), axis=-1)
  return a1, -(a2 + ent * a1), d_zy


def _head_stats_jvp(primals, tangents):
  h3, w, b, y2, cfg = primals
  dh3, dw, db, _, _ = tangents
  lse, ent, z_y = _forward(h3, w, b, y2, cfg)
  dh3 = dh3 if F._nonzero(dh3) else None
  dw = dw if F._nonzero(dw) else None
  db = db if (b is not None and F._nonzero(db)) else None
  zeros = (jnp.zeros_like(lse), jnp.zeros_like(ent), jnp.zeros_like(z_y))
  if dh3 is None and dw is None and db is None:
    return (lse, ent, z_y), zeros
  valid = jnp.ones(y2.shape, bool)
  out = F._tokens_tangent(h3, y2, valid, (lse, ent), dh3, w, b, dw, db, cfg,
                          block=_stats_block_tangent)
  return (lse, ent, z_y), tuple(out)


_head_stats.defjvp(_head_stats_jvp, symbolic_zeros=True)


def _prepare(hidden, weight, labels, bias, weight_layout, where, temperature, chunk_size,
             name):
  hidden, weight, labels, bias, v = F.check_head(hidden, weight, labels, bias, weight_layout)
  temperature = _checks.static_number(temperature, "temperature")
  if not temperature > 0:
    raise ValueError(f"temperature must be positive, got {temperature!r}.")
  h3, y2, v2, n, _ = F.chunk_tokens(hidden, labels, where, None, v, chunk_size, name)
  # Dropped tokens' hidden rows are replaced by 0: whatever they hold (NaN, inf) reaches
  # neither their (zeroed) outputs' tangents nor the weight's gradient.
  h3 = jnp.where(v2[..., None], h3, 0)
  acc = jnp.float64 if jnp.float64 in (hidden.dtype, weight.dtype) else jnp.float32
  cfg = _Config(weight_layout, F._VOCAB_SLICE, acc, float(temperature))
  unflat = lambda a: a.reshape(-1)[:n].reshape(hidden.shape[:-1])
  return h3, weight, bias, y2, v2, v, cfg, unflat


def linear_log_probs(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Array:
  r"""Log-probability of each token's label under ``softmax((hidden @ weight + bias) / T)``.

  .. math:: \log p_y = z_y - \log \sum_v e^{z_v}, \qquad z = (h W + b) / T,

  computed one ``[chunk_size, V]`` block of logits at a time (the ``[N, V]`` logits are never
  held, nor their gradient): the log-likelihood of sampled tokens for policy-gradient losses
  (REINFORCE, PPO, GRPO). Differentiable with respect to ``hidden``, ``weight`` and ``bias``
  in every autodiff mode; the gradient of :math:`\log p_y` in the logits is
  :math:`(\mathrm{onehot}(y) - p) / T`.

  Args:
    hidden: ``[..., D]`` activations (bf16 and f16 are accumulated in float32).
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: integer ``[...]`` token ids (``hidden``'s shape without D).
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]``: tokens to keep; dropped tokens get 0 and no gradient.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block; default: a ``[chunk, V]`` float32 block of ~64 MiB.

  Returns:
    ``[...]`` log-probabilities (float32, float64 for float64 inputs): :math:`\le 0`,
    :math:`-\infty` where the label's logit is :math:`-\infty` (a masked class), NaN for a
    kept label outside ``[0, V)``.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((3, 2)); w = jnp.zeros((2, 4))
  >>> jxent.linear_log_probs(h, w, jnp.array([0, 1, 3]))  # uniform: log(1/4)
  Array([-1.3862944, -1.3862944, -1.3862944], dtype=float32)
  """
  h3, w, b, y2, v2, v, cfg, unflat = _prepare(hidden, weight, labels, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_log_probs")
  lse, _, z_y = _head_stats(h3, w, b, y2, cfg)
  _, bad = R.split_labels(y2, v2, v)
  out = R.poison_rows(jnp.where(v2, z_y - lse, 0).reshape(-1), bad.reshape(-1))
  return unflat(out)


def linear_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> Array:
  r"""Entropy of ``softmax((hidden @ weight + bias) / T)`` per token, in nats.

  .. math:: H = -\sum_v p_v \log p_v = \log \sum_v e^{z_v} - \mathbb{E}_p[z],
     \qquad z = (h W + b) / T,

  one ``[chunk_size, V]`` block of logits at a time: the policy's entropy (an entropy bonus
  or regulariser) without the ``[N, V]`` logits. Differentiable with respect to ``hidden``,
  ``weight`` and ``bias`` in every autodiff mode; in the logits,
  :math:`\partial H / \partial z_v = -p_v (\log p_v + H) / T`.

  Args:
    hidden: ``[..., D]`` activations.
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]``: tokens to keep; dropped tokens get 0 and no gradient.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block; default: a ``[chunk, V]`` float32 block of ~64 MiB.

  Returns:
    ``[...]`` entropies in :math:`[0, \log V]` (classes with logit :math:`-\infty` count as
    probability 0, :math:`0 \log 0 = 0`). Relative accuracy holds for nearly one-hot
    distributions (the entropy is not a difference of two large numbers).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.ones((2, 2)); w = jnp.zeros((2, 4))
  >>> jxent.linear_entropy(h, w)  # uniform over 4: log 4
  Array([1.3862944, 1.3862944], dtype=float32)
  """
  h3, w, b, y2, v2, _, cfg, unflat = _prepare(hidden, weight, None, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_entropy")
  _, ent, _ = _head_stats(h3, w, b, y2, cfg)
  return unflat(jnp.where(v2, ent, 0))


class TokenStats(NamedTuple):
  """Per-token statistics of a language-model head (``linear_token_stats``)."""

  logsumexp: Array
  """``[...]`` :math:`\\log \\sum_v e^{z_v}` of the (tempered) logits."""
  entropy: Array
  """``[...]`` entropy of the softmax, in nats."""
  argmax: Array
  """``[...]`` int32 index of the largest logit (the greedy prediction)."""
  label_log_prob: Array | None
  """``[...]`` :math:`\\log p_y`, or None without labels."""


def linear_token_stats(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    where: ArrayLike | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> TokenStats:
  r"""Logsumexp, entropy, argmax and (with labels) label log-probability per token, in one
  pass over ``[chunk_size, V]`` blocks of ``(hidden @ weight + bias) / T``: monitoring
  without the ``[N, V]`` logits (accuracy is ``stats.argmax == labels``).

  Not differentiable: the inputs are taken under ``jax.lax.stop_gradient`` (use
  :func:`linear_log_probs`, :func:`linear_entropy` or :func:`linear_cross_entropy` for
  gradients). Dropped tokens (``where`` False) get 0 everywhere (argmax 0).

  Args:
    hidden: ``[..., D]`` activations.
    weight: ``[D, V]`` (``weight_layout="dv"``) or ``[V, D]`` (``"vd"``).
    labels: optional integer ``[...]`` token ids.
    bias: optional ``[V]``.
    weight_layout: ``"dv"`` or ``"vd"``.
    where: optional boolean ``[...]`` mask of tokens to keep.
    temperature: :math:`T > 0`, a Python number (static).
    chunk_size: tokens per block; default: a ``[chunk, V]`` float32 block of ~64 MiB.

  Returns:
    A :class:`TokenStats` of ``[...]`` arrays.

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> h = jnp.array([[1.0, 0.0], [0.0, 1.0]]); w = jnp.array([[2.0, 0.0], [0.0, 3.0]])
  >>> s = jxent.linear_token_stats(h, w, jnp.array([0, 0]))
  >>> s.argmax
  Array([0, 1], dtype=int32)
  """
  h3, w, b, y2, v2, v, cfg, unflat = _prepare(hidden, weight, labels, bias, weight_layout,
                                              where, temperature, chunk_size,
                                              "linear_token_stats")
  h3, w, b = jax.lax.stop_gradient((h3, w, b))
  lse, ent, z_y, am = _forward(h3, w, b, y2, cfg, with_argmax=True)
  keep = lambda a: unflat(jnp.where(v2, a, 0))
  logp = None
  if labels is not None:
    _, bad = R.split_labels(y2, v2, v)
    logp = unflat(R.poison_rows(jnp.where(v2, z_y - lse, 0).reshape(-1), bad.reshape(-1)))
  return TokenStats(keep(lse), keep(ent), keep(am), logp)
