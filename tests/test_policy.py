"""policy_loss and linear_policy_loss (PPO/GRPO family), linear_log_prob_loss: against float64
NumPy references of the per-token formulas and against the dense loss on materialised logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent

S, T, D, V = 3, 7, 8, 30  # 21 tokens: not a multiple of the chunk (8)
RNG = np.random.default_rng(11)
H = RNG.normal(size=(S, T, D))
W = RNG.normal(size=(D, V)) * 0.5
BIAS = RNG.normal(size=V) * 0.3
Y = RNG.integers(0, V, size=(S, T))
MASK = RNG.uniform(size=(S, T)) > 0.25
MASK[2] = False  # a sequence without a kept token
ADV = RNG.normal(size=S)
OLD_SHIFT = RNG.normal(size=(S, T)) * 0.3  # old = log p + shift: ratios about 0.6 to 1.6
REF_SHIFT = RNG.normal(size=(S, T)) * 0.5
ISW = RNG.uniform(0.5, 1.5, size=(S, T))
TEMP = 0.7


def np_ratio(lp, old, mask, level):
  """Token-level ratios, or GSPO's: the sequence's mean log-ratio over its kept tokens."""
  d = lp - (lp if old is None else old)
  if level == "sequence":
    d = np.broadcast_to((np.sum(d * mask, -1) / np.maximum(mask.sum(-1), 1))[:, None], d.shape)
  return np.exp(d)


def np_vespo_phi(lp, adv, old, isw, mask, vk=(2.0, 3.0), vl=(3.0, 2.0)):
  """VESPO's weight of each sequence (TRL's get_gamma_weights), broadcast to its tokens."""
  d = np.clip(lp - (lp if old is None else old), -20, 20)
  if isw is not None:
    d = d + np.clip(np.log(isw), np.log(1e-8), 20)
  lw = np.clip(np.sum(d * mask, -1, keepdims=True), np.log(1e-8), 20)
  k = np.where(adv >= 0, vk[0], vk[1])
  lam = np.where(adv >= 0, vl[0], vl[1])
  return np.exp(lam + k * lw - lam * np.exp(lw))


def np_policy(lp, adv, old=None, ref=None, isw=None, mask=MASK, *, loss_type="dapo",
              eps_low=0.2, eps_high=None, beta=0.0, delta=None, tau=(1.0, 1.05),
              bias_kl=False, max_len=None, num_items=None, level="token", vk=(2.0, 3.0),
              vl=(3.0, 2.0)):
  """float64 NumPy, written from the formulas (Liger's GRPO; token- or sequence-level
  ratios)."""
  eps_high = eps_low if eps_high is None else eps_high
  adv = np.broadcast_to(adv[:, None] if np.ndim(adv) == 1 else adv, lp.shape)
  r = np_ratio(lp, old, mask, level)
  if loss_type == "cispo":
    loss = -np.minimum(r, eps_high) * adv * lp
  elif loss_type == "vespo":  # the importance weights are in the sequence's weight
    loss = -np_vespo_phi(lp, adv, old, isw, mask, vk, vl) * adv * lp
    isw = None
  elif loss_type == "sapo":
    t = np.where(adv > 0, tau[0], tau[1])
    loss = -adv * 4 / t / (1 + np.exp(-t * (r - 1)))
  else:
    r1 = r if delta is None else np.minimum(r, delta)
    loss = -np.minimum(r1 * adv, np.clip(r, 1 - eps_low, 1 + eps_high) * adv)
  if isw is not None:
    loss = loss * isw
  if beta:
    kl = np.exp(ref - lp) - (ref - lp) - 1
    loss = loss + beta * (kl * r if bias_kl else kl)
  m = mask.astype(np.float64)
  total = (loss * m)
  if loss_type in ("grpo", "sapo"):
    return float(np.sum(total.sum(-1) / np.maximum(m.sum(-1), 1)) / lp.shape[0])
  if loss_type == "dr_grpo":
    return float(total.sum() / (lp.shape[0] * max_len))
  if loss_type == "luspo":
    return float(np.sum(total * m.sum(-1, keepdims=True)) / lp.size)
  if num_items is not None and loss_type in ("dapo", "cispo", "vespo"):
    return float(total.sum() / num_items)
  return float(total.sum() / max(m.sum(), 1))


def np_metrics(lp, adv, old=None, ref=None, isw=None, mask=MASK, *, loss_type="dapo",
               eps_low=0.2, eps_high=None, beta=0.0, bias_kl=False, level="token", **_):
  """Liger's metrics: the clipped fraction (on the side of the advantage's sign), the KL."""
  del isw
  eps_high = eps_low if eps_high is None else eps_high
  adv = np.broadcast_to(adv[:, None], lp.shape)
  r = np_ratio(lp, old, mask, level)
  lower, upper = r < 1 - eps_low, r > 1 + eps_high
  if loss_type == "cispo":
    lower, upper = np.zeros_like(mask), r > eps_high
  if loss_type in ("sapo", "vespo"):
    lower = upper = np.zeros_like(mask)
  n = max(mask.sum(), 1)
  out = {"clip_ratio": np.sum(((lower & (adv < 0)) | (upper & (adv > 0))) & mask) / n}
  if beta:
    kl = np.exp(ref - lp) - (ref - lp) - 1
    out["kl"] = np.sum((kl * r if bias_kl else kl) * mask) / n
  return out


def log_probs64(h, w, b, temp=TEMP):
  z = (h @ w + b) / temp
  return jnp.take_along_axis(jax.nn.log_softmax(z, -1), jnp.asarray(Y)[..., None], -1)[..., 0]


CASES = {  # name: (options, which optional per-token arrays)
    "dapo-on-policy": (dict(), ()),
    "dapo": (dict(eps_high=0.28), ("old",)),
    "bnpo-kl": (dict(loss_type="bnpo", beta=0.04), ("old", "ref")),
    "grpo-kl-corrected": (dict(loss_type="grpo", beta=0.1, bias_kl=True), ("old", "ref")),
    "dr_grpo-delta-isw": (dict(loss_type="dr_grpo", delta=1.3, max_len=16), ("old", "isw")),
    "dapo-items": (dict(num_items=40.0), ("old",)),
    "cispo": (dict(loss_type="cispo", eps_high=1.25), ("old",)),
    "sapo": (dict(loss_type="sapo", tau=(1.0, 1.5)), ("old",)),
    # GSPO: each sequence's ratio (the mean log-ratio of its kept tokens) on all its tokens.
    "gspo-kl-corrected": (dict(level="sequence", loss_type="grpo", beta=0.1, bias_kl=True,
                               eps_low=3e-4, eps_high=4e-4), ("old", "ref")),
    "gspo-dapo-isw": (dict(level="sequence", eps_high=0.01), ("old", "isw")),
    # LUSPO: each token's clipped loss times its sequence's length; VESPO: a gamma weight
    # of each sequence's ratio (with the importance weights), held constant.
    "luspo-kl": (dict(loss_type="luspo", beta=0.04), ("old", "ref")),
    "vespo-isw": (dict(loss_type="vespo", vk=(1.5, 2.5), vl=(2.0, 1.0)), ("old", "isw")),
    "vespo-kl-items": (dict(loss_type="vespo", beta=0.1, bias_kl=True, num_items=40.0),
                       ("old", "ref")),
}


def _options(opts):
  """np_policy's keywords as jxent's."""
  names = dict(eps_low="epsilon_low", eps_high="epsilon_high", beta="beta", delta="delta",
               tau="sapo_temperatures", bias_kl="bias_corrected_kl",
               max_len="max_completion_length", num_items="num_items_in_batch",
               loss_type="loss_type", level="importance_sampling_level", vk="vespo_k",
               vl="vespo_lambda")
  return {names[k]: v for k, v in opts.items()}


def _arrays(lp, which):
  out = {}
  if "old" in which:
    out["old"] = lp + OLD_SHIFT
  if "ref" in which:
    out["ref"] = lp + REF_SHIFT
  if "isw" in which:
    out["isw"] = ISW
  return out


def test_policy_loss_against_numpy_float64():
  with jax.enable_x64(True):
    lp = np.asarray(log_probs64(H, W, BIAS))
    for name, (opts, which) in CASES.items():
      arrays = _arrays(lp, which)
      want = np_policy(lp, ADV, **arrays, **opts)
      kw = dict(old_log_probs=arrays.get("old"), ref_log_probs=arrays.get("ref"),
                importance_weights=arrays.get("isw"))
      got, metrics = jxent.policy_loss(lp, ADV, where=MASK, **kw, **_options(opts),
                                       return_metrics=True)
      np.testing.assert_allclose(float(got), want, rtol=1e-12, err_msg=name)
      want_m = np_metrics(lp, ADV, **arrays, **opts)
      assert set(metrics) == set(want_m), name
      for k, v in want_m.items():
        np.testing.assert_allclose(metrics[k], v, rtol=1e-12, err_msg=f"{name} {k}")
      # Per-token advantages of the same values, and -inf on dropped tokens, change nothing.
      lp_bad = np.where(MASK, lp, -np.inf)
      adv_t = np.broadcast_to(ADV[:, None], (S, T))
      got = jxent.policy_loss(lp_bad, adv_t, where=MASK, **kw, **_options(opts))
      np.testing.assert_allclose(float(got), want, rtol=1e-12, err_msg=name)
      g = jax.grad(lambda lp: jxent.policy_loss(lp, ADV, where=MASK, **kw,
                                                **_options(opts)))(lp_bad)
      assert np.all(np.isfinite(g)) and np.all(g[~MASK] == 0), name
      n = MASK.sum()
      if name == "cispo":  # the clipped ratio is held constant: -sg(min(r, e)) A / n
        r = np.exp(lp - arrays["old"])
        np.testing.assert_allclose(g, -np.minimum(r, 1.25) * ADV[:, None] * MASK / n,
                                   rtol=1e-12, atol=1e-15)
        continue
      if name == "dapo-on-policy":  # r = 1, held at 1, with the gradient of log p: -A / n
        np.testing.assert_allclose(g, -ADV[:, None] * MASK / n, rtol=1e-12)
        continue
      if name == "vespo-isw":  # the sequence's weight is held constant: -sg(phi) A / n
        phi = np_vespo_phi(lp, ADV[:, None], arrays["old"], ISW, MASK, (1.5, 2.5), (2.0, 1.0))
        np.testing.assert_allclose(g, -phi * ADV[:, None] * MASK / n, rtol=1e-12, atol=1e-15)
        assert np.ptp(phi[0]) == 0 and np.ptp(phi) > 0  # one weight per sequence
        continue
      # The value's own derivatives in every argument, both modes, to second order.
      names = which + ("adv",)

      def f(lp, *rest, names=names, opts=opts):
        r = dict(zip(names, rest))
        return 1.7 * jxent.policy_loss(lp, r["adv"], where=MASK, old_log_probs=r.get("old"),
                                       ref_log_probs=r.get("ref"),
                                       importance_weights=r.get("isw"), **_options(opts))

      if opts.get("loss_type") == "vespo":  # a held weight: autodiff is not the slope of
        continue                            # the value, so no finite differences
      check_grads(f, (lp,) + tuple(arrays[k] for k in which) + (ADV,), order=2,
                  modes=["fwd", "rev"], eps=1e-6)


def _fused_vs_dense(case, layout, temp=TEMP):
  """(fused, dense) loss functions of (h, W, b, adv, *per-token arrays), float64."""
  opts, which = CASES[case]
  kw = _options(opts)

  def split(rest):
    r = dict(zip(which, rest))
    return dict(old_log_probs=r.get("old"), ref_log_probs=r.get("ref"),
                importance_weights=r.get("isw"))

  def fused(h, w, b, adv, *rest, return_metrics=False):
    w = w if layout == "dv" else w.T
    return jxent.linear_policy_loss(h, w, Y, adv, where=MASK, bias=b, weight_layout=layout,
                                    temperature=temp, chunk_size=8, **split(rest), **kw,
                                    return_metrics=return_metrics)

  def dense(h, w, b, adv, *rest, return_metrics=False):
    return jxent.policy_loss(log_probs64(h, w, b, temp), adv, where=MASK, **split(rest), **kw,
                             return_metrics=return_metrics)

  lp = np.asarray(log_probs64(H, W, BIAS, temp))
  return fused, dense, (H, W, BIAS, ADV) + tuple(_arrays(lp, which)[k] for k in which)


@pytest.mark.parametrize("case, layout, impl", [
    ("grpo-kl-corrected", "dv", "platform"), ("dr_grpo-delta-isw", "vd", "platform"),
    ("bnpo-kl", "vd", "accelerator"), ("dapo-on-policy", "dv", "accelerator"),
    ("gspo-kl-corrected", "dv", "platform"), ("gspo-dapo-isw", "vd", "accelerator"),
    ("luspo-kl", "dv", "accelerator"), ("vespo-isw", "dv", "platform"),
    ("vespo-kl-items", "vd", "accelerator")],
    indirect=["impl"])
def test_linear_policy_loss_against_dense_float64(case, layout, impl):
  with jax.enable_x64(True):
    fused, dense, args = _fused_vs_dense(case, layout)
    argnums = tuple(range(len(args)))
    v1, g1 = jax.jit(jax.value_and_grad(fused, argnums))(*args)
    v0, g0 = jax.value_and_grad(dense, argnums)(*args)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for a, b, i in zip(g1, g0, argnums):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"argument {i}")
    # Forward mode (a non-unit tangent in every argument) and second order in h.
    t = tuple(np.asarray(RNG.normal(size=np.shape(a))) for a in args)
    _, d1 = jax.jvp(fused, args, t)
    _, d0 = jax.jvp(dense, args, t)
    np.testing.assert_allclose(d1, d0, rtol=1e-10)
    hv = lambda f: jax.jvp(jax.grad(lambda h: f(h, *args[1:])), (args[0],), (t[0],))[1]
    np.testing.assert_allclose(hv(fused), hv(dense), rtol=1e-9, atol=1e-13)
    # The metrics, and the log-probabilities from the loss's own pass.
    loss, m1 = jax.jit(lambda *a: fused(*a, return_metrics=True))(*args)
    _, m0 = dense(*args, return_metrics=True)
    np.testing.assert_allclose(loss, v0, rtol=1e-12)
    np.testing.assert_allclose(m1.pop("log_probs"),
                               np.where(MASK, log_probs64(H, W, BIAS), 0), rtol=1e-12)
    assert set(m1) == set(m0)
    # On-policy (r = 1) nothing is clipped; VESPO has no clip.
    clips = "old" in CASES[case][1] and CASES[case][0].get("loss_type") != "vespo"
    assert (m1["clip_ratio"] > 0) == clips
    for k in m0:
      np.testing.assert_allclose(m1[k], m0[k], rtol=1e-12, err_msg=k)


def _dense_token_loss(fn, h, w, b, args, weights, reduction, mask):
  lp = log_probs64(h, w, b)
  val = jnp.where(mask, jax.vmap(jax.vmap(fn))(jnp.where(mask, lp, 0), *args), 0)
  val = val if weights is None else val * weights
  if reduction == "none":
    return val
  return jnp.sum(val) / (1 if reduction == "sum" else jnp.sum(jnp.where(mask, weights, 0)))


@pytest.mark.parametrize("impl", ["platform", "accelerator"], indirect=True)
def test_log_prob_loss_every_reduction_mode_and_closure(impl):
  fn = lambda lp, a, c: a * jnp.exp(lp) - c * lp ** 2  # smooth, curved in log p
  a, c = RNG.normal(size=(S, T)), RNG.uniform(size=(S, 1))
  wts = RNG.uniform(0.2, 2.0, size=(S, T))
  cot = RNG.uniform(0.3, 1.7, size=(S, T))
  with jax.enable_x64(True):
    for reduction in ("none", "mean"):
      def fused(h, w, b, a, c, wts, **kw):
        return jxent.linear_log_prob_loss(h, w, Y, fn, (a, c), bias=b, where=MASK,
                                          temperature=TEMP, weights=wts, reduction=reduction,
                                          chunk_size=8, **kw)

      def dense(h, w, b, a, c, wts):
        return _dense_token_loss(fn, h, w, b, (a, jnp.broadcast_to(c, (S, T))), wts,
                                 reduction, MASK)

      args = (H, W, BIAS, a, c, wts)
      out = lambda f: (lambda *x: jnp.sum(f(*x) * cot) if reduction == "none" else f(*x))
      v1, g1 = jax.jit(jax.value_and_grad(out(fused), range(6)))(*args)
      v0, g0 = jax.value_and_grad(out(dense), range(6))(*args)
      np.testing.assert_allclose(v1, v0, rtol=1e-12)
      for x, y, i in zip(g1, g0, range(6)):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14, err_msg=f"{reduction} {i}")
      # The log-probabilities from the same pass, without derivative.
      out_lp = jax.jit(jax.value_and_grad(
          lambda h: jnp.sum(fused(h, W, BIAS, a, c, wts, return_log_probs=True)[1]))
      )(H)
      np.testing.assert_allclose(out_lp[0], np.sum(np.where(MASK, log_probs64(H, W, BIAS), 0)),
                                 rtol=1e-12)
      assert np.all(out_lp[1] == 0)
    # Second order in W of the mean (its gradients formed with the value): a Hessian-vector
    # product, forward over reverse.
    dw = RNG.normal(size=W.shape)
    hvp = lambda f: jax.jvp(jax.grad(lambda w: f(H, w, BIAS, a, c, wts)), (W,), (dw,))[1]
    np.testing.assert_allclose(hvp(fused), hvp(dense), rtol=1e-9, atol=1e-13)
    # A traced coefficient the function closes over is an input like the others.
    g = jax.jit(jax.grad(lambda k: jxent.linear_log_prob_loss(
        H, W, Y, lambda lp: k * lp ** 2, where=MASK, chunk_size=8)))(2.0)
    lp = np.asarray(log_probs64(H, W, 0.0, 1.0))
    np.testing.assert_allclose(g, np.sum(lp ** 2 * MASK) / MASK.sum(), rtol=1e-10)
    # Dropped tokens give 0 (the function sees log p = 0 there), and a derivative that is
    # singular at log p = 0 reaches no gradient.
    fn = lambda lp, a: a * jnp.log(-lp)
    out = jxent.linear_log_prob_loss(H, W, Y, fn, (a,), where=MASK, reduction="none",
                                     chunk_size=8)
    np.testing.assert_allclose(out, np.where(MASK, a * np.log(-lp), 0), rtol=1e-10)
    for red, f in (("none", lambda x: jnp.sum(x * cot)), ("mean", lambda x: x)):
      grads = jax.grad(lambda h, w, a: f(jxent.linear_log_prob_loss(
          h, w, Y, fn, (a,), where=MASK, reduction=red, chunk_size=8)), (0, 1, 2))(H, W, a)
      assert all(np.all(np.isfinite(g)) for g in grads), red
      assert np.all(grads[0][~MASK] == 0) and np.all(grads[2][~MASK] == 0), red
    k = jnp.array([1.0, 2.0, 3.0])
    batched = jax.vmap(lambda k: jxent.linear_log_prob_loss(
        H, W, Y, lambda lp: k * lp, where=MASK, reduction="sum", chunk_size=8))(k)
    np.testing.assert_allclose(batched, k * np.sum(lp * MASK), rtol=1e-10)


def test_bfloat16_and_bad_input():
  h = jnp.asarray(H, jnp.bfloat16)
  w = jnp.asarray(W, jnp.bfloat16)
  adv = ADV.astype(np.float32)
  got = jxent.linear_policy_loss(h, w, Y, adv)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, -np.mean(adv), rtol=1e-5)  # on-policy dapo: mean of -A
  g = jax.grad(lambda h: jxent.linear_policy_loss(h, w, Y, adv))(h)
  w64 = np.asarray(w, np.float64)
  want = jax.grad(lambda h: jnp.mean(-adv[:, None] * log_probs64(h, w64, 0.0, 1.0)))(
      np.asarray(h, np.float64))
  assert g.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g, np.float64), want, rtol=2e-2, atol=1e-3)
  lp = jnp.zeros((S, T))
  with pytest.raises(ValueError, match="loss_type must be one of"):
    jxent.policy_loss(lp, ADV, loss_type="ppo2")
  with pytest.raises(ValueError, match="give ref_log_probs"):
    jxent.policy_loss(lp, ADV, beta=0.1)
  with pytest.raises(ValueError, match="max_completion_length"):
    jxent.policy_loss(lp, ADV, loss_type="dr_grpo")
  with pytest.raises(ValueError, match=r"advantages must have the sequences' shape \(3,\)"):
    jxent.policy_loss(lp, np.zeros(5))
  with pytest.raises(ValueError, match=r"where must be a boolean array of the tokens' shape"):
    jxent.policy_loss(lp, ADV, where=np.ones((S, T + 1), bool))
  with pytest.raises(TypeError, match="epsilon_low must be a static Python number"):
    jax.jit(lambda e: jxent.policy_loss(lp, ADV, epsilon_low=e))(0.2)
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    jxent.linear_log_prob_loss(H, W, Y, None)
  with pytest.raises(ValueError, match=r"token_args\[0\] must broadcast to labels' shape"):
    jxent.linear_log_prob_loss(H, W, Y, lambda lp, a: a * lp, (np.zeros(5),))
  with pytest.raises(ValueError, match="must map scalars"):
    jxent.linear_log_prob_loss(H, W, Y, lambda lp: jnp.stack([lp, lp]))


def test_sequence_ratio_paths_agree_and_errors(monkeypatch):
  # GSPO's ratio from whole sequences per token chunk (each block once; a sequence longer
  # than a block in blocks, all but the last computed twice) and from the per-token
  # log-probabilities (meshes): the same loss and gradients in h, W and the old and
  # reference log-probabilities.
  from jxent import _lmhead
  with jax.enable_x64(True):
    lp = np.asarray(log_probs64(H, W, BIAS))
    old, ref = lp + OLD_SHIFT, lp + REF_SHIFT

    def f(h, w, old, ref, chunk=8):
      return jxent.linear_policy_loss(h, w, Y, ADV, where=MASK, bias=BIAS, temperature=TEMP,
                                      old_log_probs=old, ref_log_probs=ref, beta=0.1,
                                      bias_corrected_kl=True, loss_type="bnpo",
                                      importance_sampling_level="sequence", chunk_size=chunk)

    fused = [jax.value_and_grad(functools.partial(f, chunk=c), range(4))(H, W, old, ref)
             for c in (8, 3)]  # whole sequences of 7 per chunk; 3 blocks of 3 per sequence
    monkeypatch.setattr(_lmhead, "groups_fit", lambda *a: False)
    per_token = jax.value_and_grad(f, range(4))(H, W, old, ref)
    for got in fused:
      np.testing.assert_allclose(got[0], per_token[0], rtol=1e-12)
      for a, b, i in zip(got[1], per_token[1], range(4)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"argument {i}")
    # VESPO's sequence weight: the same two paths.
    def v(h, w, old):
      return jxent.linear_policy_loss(h, w, Y, ADV, where=MASK, old_log_probs=old,
                                      importance_weights=ISW, loss_type="vespo", chunk_size=8)

    per_token = jax.value_and_grad(v, range(3))(H, W, old)
    monkeypatch.undo()
    fused = jax.value_and_grad(v, range(3))(H, W, old)
    np.testing.assert_allclose(fused[0], per_token[0], rtol=1e-12)
    for a, b, i in zip(fused[1], per_token[1], range(3)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"vespo argument {i}")
  with pytest.raises(ValueError, match="no such clip"):
    jxent.policy_loss(lp, ADV, loss_type="cispo", importance_sampling_level="sequence")
  with pytest.raises(ValueError, match="no such clip"):
    jxent.policy_loss(lp, ADV, loss_type="vespo", importance_sampling_level="sequence")
  with pytest.raises(ValueError, match="delta clamps the clipped objective"):
    jxent.policy_loss(lp, ADV, loss_type="vespo", delta=2.0)
  with pytest.raises(ValueError, match="vespo_lambda must be positive"):
    jxent.policy_loss(lp, ADV, loss_type="vespo", vespo_lambda=(1.0, 0.0))
  with pytest.raises(TypeError, match="vespo_k must be a pair"):
    jxent.policy_loss(lp, ADV, loss_type="vespo", vespo_k=2.0)
  with pytest.raises(ValueError, match="importance_sampling_level must be"):
    jxent.linear_policy_loss(H, W, Y, ADV, importance_sampling_level="sentence")
