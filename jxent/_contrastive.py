"""Contrastive losses: the cross-entropy of picking an example's positive among its negatives
(InfoNCE's bound on mutual information). Plain JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent import _checks
from jxent import _stats as S

Array = jax.Array


def ntxent(
    embeddings: ArrayLike, labels: ArrayLike, *, temperature: ArrayLike = 0.07,
    eps: float | None = None, where: ArrayLike | None = None, reduction: str = "mean",
) -> Array:
  r"""Normalized temperature-scaled cross-entropy (NT-Xent, SimCLR's loss), Optax's ``ntxent``.

  With the cosine similarities :math:`s_{ij} = \hat x_i \cdot \hat x_j / \tau`, each ordered
  positive pair :math:`(i, j)` (same label, :math:`i \ne j`) is a softmax cross-entropy of
  picking :math:`j` among itself and :math:`i`'s negatives :math:`N_i` (other labels):

  .. math:: \ell_{ij} = -\log \frac{e^{s_{ij}}}{e^{s_{ij}} + \sum_{k \in N_i} e^{s_{ik}}}
            = \operatorname{softplus}\Bigl(\log \sum_{k \in N_i} e^{s_{ik}} - s_{ij}\Bigr),

  computed in the second form: a confident pair's loss keeps its relative accuracy (Optax's
  ``numer - log(denom)`` rounds it to 0 below float32's resolution). Its minimum over a batch
  of :math:`K + 1` candidates bounds the mutual information of the two views: InfoNCE's
  :math:`I \ge \log(K + 1) - \ell`.

  Args:
    embeddings: ``[B, D]`` floating point (16-bit inputs computed in float32).
    labels: integer ``[B]``: examples with the same label are positive pairs (e.g. the two
      augmented views of one image: ``[0, 0, 1, 1, ...]``).
    temperature: :math:`\tau > 0` (may be traced and differentiated, e.g. learned).
    eps: each embedding is divided by :math:`\sqrt{\max(\lVert x \rVert^2, \varepsilon)}`
      (Optax's cosine similarity); default: the dtype's machine epsilon.
    where: optional boolean ``[B]``: dropped examples are neither anchors, positives nor
      negatives (padding), and get no gradient.
    reduction: ``"mean"`` (default: over the ordered positive pairs, as Optax; 0 if there
      are none, where Optax gives NaN), ``"sum"``, or ``"none"``: the ``[B, B]`` matrix of
      :math:`\ell_{ij}`, 0 off the positive pairs.

  An anchor without negatives gives its pairs loss 0 (nothing to tell apart).

  >>> import jax.numpy as jnp
  >>> import jxent
  >>> x = jnp.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
  >>> round(float(jxent.ntxent(x, jnp.array([0, 0, 1, 1]), temperature=1.0)), 4)
  0.5978
  """
  _checks.reduction(reduction)
  x = _checks.upcast(_checks.floating(embeddings, "embeddings"))
  labels = _checks.integer(labels, "labels")
  if x.ndim != 2 or labels.shape != x.shape[:1]:
    raise ValueError(f"ntxent needs embeddings [B, D] and labels [B], got "
                     f"embeddings.shape={x.shape} and labels.shape={labels.shape}.")
  tau = jnp.asarray(temperature, x.dtype)
  if tau.ndim:
    raise ValueError(f"temperature must be a scalar, got shape {tau.shape}.")
  _checks.value_check(tau > 0, "temperature must be > 0.")
  eps = float(jnp.finfo(x.dtype).eps) if eps is None else _checks.static_number(eps, "eps")
  b = x.shape[0]
  keep = jnp.ones(b, bool)
  if where is not None:
    keep = _checks.as_array(where, "where")
    if keep.dtype != jnp.bool_ or keep.shape != (b,):
      raise ValueError(f"where must be a boolean mask of shape ({b},), got {keep.dtype} "
                       f"{keep.shape}.")
    x = jnp.where(keep[:, None], x, 0)  # a dropped row's NaN cannot reach the loss
  unit = x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), eps))
  s = jnp.dot(unit, unit.T, precision=jax.lax.Precision.HIGHEST) / tau
  same = labels[:, None] == labels[None, :]
  both = keep[:, None] & keep[None, :]
  positive = same & both & ~jnp.eye(b, dtype=bool)
  negatives = S.lse_rows(jnp.where(~same & both, s, -jnp.inf))
  pairs = jnp.where(positive, jax.nn.softplus(negatives[:, None] - s), 0)
  return _checks.reduce(pairs, reduction, jnp.sum(positive))
