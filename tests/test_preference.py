"""preference_loss and linear_preference_loss (DPO family, IPO, CPO, SimPO, ORPO): against
float64 NumPy formulas written here and against the dense loss of materialised logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jxent

RNG = np.random.default_rng(23)
P = 6  # pairs
C = -RNG.uniform(2, 12, size=P)  # sequence log-probabilities
R = -RNG.uniform(2, 12, size=P)
RC = C + RNG.normal(size=P)
RR = R + RNG.normal(size=P)
KEEP = np.array([True, True, False, True, True, True])
CASES = {  # loss type -> its options
    "sigmoid": dict(beta=0.3, label_smoothing=0.1, gamma=0.2), "hinge": dict(beta=0.3),
    "ipo": dict(beta=0.4), "robust": dict(beta=0.2, label_smoothing=0.2),
    "exo_pair": dict(beta=0.3, label_smoothing=1e-3), "nca_pair": dict(beta=0.5),
    "bco_pair": dict(beta=0.5), "sppo_hard": dict(beta=0.7), "apo_zero": dict(beta=0.5),
    "apo_down": dict(beta=0.5), "discopop": dict(beta=0.3, discopop_tau=0.5),
    "orpo": dict(beta=0.2)}


def _log_sigmoid(x):
  return -np.logaddexp(0, -x)


def _sigmoid(x):
  return np.exp(_log_sigmoid(x))


def np_pair(c, r, rc, rr, loss_type, beta, label_smoothing=0.0, gamma=0.0,
            discopop_tau=0.05):
  """float64 NumPy, from the papers' formulas (as TRL's DPOTrainer and Liger write them)."""
  eps = label_smoothing
  dc, dr = c - rc, r - rr
  x = beta * (dc - dr) - gamma
  ls = _log_sigmoid
  if loss_type == "sigmoid":
    return -(1 - eps) * ls(x) - eps * ls(-x)
  if loss_type == "hinge":
    return np.maximum(0, 1 - x)
  if loss_type == "ipo":
    return (dc - dr - 1 / (2 * beta)) ** 2
  if loss_type == "robust":
    return ((1 - eps) * -ls(x) - eps * -ls(-x)) / (1 - 2 * eps)
  if loss_type == "exo_pair":
    qw, ql = _sigmoid(x), _sigmoid(-x)
    return qw * (np.log(qw) - np.log(1 - eps)) + ql * (np.log(ql) - np.log(eps))
  if loss_type == "nca_pair":
    return -ls(beta * dc) - 0.5 * ls(-beta * dc) - 0.5 * ls(-beta * dr)
  if loss_type == "bco_pair":
    return -ls(beta * dc) - ls(-beta * dr)
  if loss_type == "sppo_hard":
    return (dc - 0.5 / beta) ** 2 + (dr + 0.5 / beta) ** 2
  if loss_type == "apo_zero":
    return 1 - _sigmoid(beta * dc) + _sigmoid(beta * dr)
  if loss_type == "apo_down":
    return _sigmoid(beta * dc) + 1 - _sigmoid(beta * (dc - dr))
  if loss_type == "discopop":
    m = _sigmoid(x / discopop_tau)
    return -ls(x) * (1 - m) + np.exp(-x) * m
  assert loss_type == "orpo"
  odds = lambda lp: lp - np.log1p(-np.exp(lp))
  return -beta * ls(odds(c) - odds(r))


def _refs(loss_type):
  return (None, None) if loss_type == "orpo" else (RC, RR)


@pytest.mark.parametrize("loss_type", sorted(CASES))
def test_preference_loss_against_numpy_float64(loss_type):
  opts = CASES[loss_type]
  rc, rr = _refs(loss_type)
  with jax.enable_x64(True):
    f = jax.jit(lambda c, r, rc, rr, **kw: jxent.preference_loss(
        c, r, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, loss_type=loss_type,
        **opts, **kw), static_argnames="reduction")
    ref = np_pair(C, R, 0 if rc is None else rc, 0 if rr is None else rr, loss_type, **opts)
    np.testing.assert_allclose(f(C, R, rc, rr, reduction="none"), ref, rtol=1e-12)
    got = jxent.preference_loss(C, R, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr,
                                loss_type=loss_type, where=KEEP, **opts, reduction="none")
    np.testing.assert_allclose(got, np.where(KEEP, ref, 0), rtol=1e-12)
    mean = jxent.preference_loss(C, R, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr,
                                 loss_type=loss_type, where=KEEP, **opts)
    np.testing.assert_allclose(mean, np.sum(ref * KEEP) / KEEP.sum(), rtol=1e-12)
    np.testing.assert_allclose(f(C, R, rc, rr, reduction="sum"), ref.sum(), rtol=1e-12)
    # Every argument's gradient (non-unit cotangent) against autodiff of the same formula in
    # jax.numpy, and numerically; vmap over a batch of pair sets.
    cot = RNG.uniform(0.5, 1.5, size=P)
    args = (C, R) + (() if rc is None else (rc, rr))
    g = jax.jit(lambda *a: jnp.sum(cot * jxent.preference_loss(
        a[0], a[1], ref_chosen_log_probs=a[2] if len(a) > 2 else None,
        ref_rejected_log_probs=a[3] if len(a) > 2 else None, loss_type=loss_type,
        reduction="none", **opts)))
    check_grads(g, args, order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    b = jnp.stack([jnp.asarray(C), jnp.asarray(C) - 1])
    out = jax.vmap(lambda c: f(c, R, rc, rr, reduction="none"))(b)
    np.testing.assert_allclose(out[1], np_pair(C - 1, R, 0 if rc is None else rc,
                                               0 if rr is None else rr, loss_type, **opts),
                               rtol=1e-12)


def test_preference_gradient_closed_forms():
  # DPO: d loss / d c = -beta (1 - eps) sigma(-x) + beta eps sigma(x), and the opposite in r
  # and in c_ref (the margin's slopes). A flipped sign or a lost beta shows here.
  with jax.enable_x64(True):
    beta, eps, gamma = 0.3, 0.1, 0.2
    x = beta * ((C - RC) - (R - RR)) - gamma
    gc = -beta * (1 - eps) * _sigmoid(-x) + beta * eps * _sigmoid(x)
    grads = jax.grad(lambda c, r, rc, rr: jnp.sum(jxent.preference_loss(
        c, r, ref_chosen_log_probs=rc, ref_rejected_log_probs=rr, beta=beta,
        label_smoothing=eps, gamma=gamma, reduction="none")), argnums=(0, 1, 2, 3))(C, R, RC, RR)
    for g, sign in zip(grads, (1, -1, -1, 1)):
      np.testing.assert_allclose(g, sign * gc, rtol=1e-12)
    # ORPO: d/dc of -beta log sigma(L), L = odds(c) - odds(r), odds' = 1 / (1 - e^c).
    beta = 0.2
    lo = (C - np.log1p(-np.exp(C))) - (R - np.log1p(-np.exp(R)))
    gc = -beta * _sigmoid(-lo) / (1 - np.exp(C))
    g = jax.grad(lambda c: jnp.sum(jxent.preference_loss(c, R, loss_type="orpo", beta=beta,
                                                         reduction="none")))(C)
    np.testing.assert_allclose(g, gc, rtol=1e-12)


def test_preference_extremes_metrics_and_errors():
  with jax.enable_x64(True):
    c, r = np.array([-1.0, -3e4, -10.0]), np.array([-3e4, -1.0, -10.0])
    for loss_type in ("sigmoid", "robust", "discopop", "exo_pair", "nca_pair", "orpo"):
      opts = dict(CASES[loss_type], beta=1.0)
      v, g = jax.value_and_grad(lambda c: jnp.sum(jxent.preference_loss(
          c, r, loss_type=loss_type, reduction="none", **opts)))(c)
      assert np.isfinite(v) and np.all(np.isfinite(g)), (loss_type, v, g)
    # A margin of 3e4 is a loss of about 0 (and its slope 0); a margin of -3e4 about 3e4 (its
    # slope -beta): log-sigmoid, not log(sigmoid(x)) = log 0.
    out = jxent.preference_loss(c, r, beta=1.0, reduction="none")
    np.testing.assert_allclose(out, [0, 29999.0, np.log(2)], rtol=1e-12, atol=1e-300)
    out = jxent.preference_loss(c, r, beta=1.0, loss_type="discopop", reduction="none")
    assert out[0] < 1e-300 and abs(out[1] - 29999.0) < 1e-9
    # ORPO: a chosen completion of probability 1 has infinite odds (loss 0); a positive
    # "log-probability" has none: NaN, not a number that looks right.
    out = jxent.preference_loss(np.array([0.0, 0.5]), np.array([-1.0, -1.0]),
                                loss_type="orpo", reduction="none")
    assert out[0] == 0 and np.isnan(out[1])
    # The metrics: means over the kept pairs, without derivative.
    loss, m = jxent.preference_loss(C, R, ref_chosen_log_probs=RC, ref_rejected_log_probs=RR,
                                    beta=0.5, where=KEEP, return_metrics=True)
    rc, rr = 0.5 * (C - RC), 0.5 * (R - RR)
    k = KEEP
    np.testing.assert_allclose(m["chosen_rewards"], rc[k].mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rejected_rewards"], rr[k].mean(), rtol=1e-12)
    np.testing.assert_allclose(m["reward_margin"], (rc - rr)[k].mean(), rtol=1e-12)
    np.testing.assert_allclose(m["reward_accuracy"], (rc > rr)[k].mean(), rtol=1e-12)
    np.testing.assert_allclose(m["chosen_log_probs"], C[k].mean(), rtol=1e-12)
    assert float(jxent.preference_loss(C, R, where=np.zeros(P, bool))) == 0
  with pytest.raises(ValueError, match="loss_type must be one of"):
    jxent.preference_loss(C, R, loss_type="dpo")
  with pytest.raises(ValueError, match="must have the same shape"):
    jxent.preference_loss(C, R[:3])
  with pytest.raises(ValueError, match="exo_pair.*label_smoothing"):
    jxent.preference_loss(C, R, loss_type="exo_pair")
  with pytest.raises(ValueError, match="no reference"):
    jxent.preference_loss(C, R, loss_type="orpo", ref_chosen_log_probs=RC)
  with pytest.raises(ValueError, match="gamma"):
    jxent.preference_loss(C, R, loss_type="ipo", gamma=0.5)
  with pytest.raises(ValueError, match="label_smoothing applies"):
    jxent.preference_loss(C, R, loss_type="hinge", label_smoothing=0.1)
  with pytest.raises(ValueError, match="beta must be positive"):
    jxent.preference_loss(C, R, beta=0)
  with pytest.raises(TypeError, match="static Python number"):
    jax.jit(lambda b: jxent.preference_loss(C, R, beta=b))(0.1)
  with pytest.raises(ValueError, match="reduction"):
    jxent.preference_loss(C, R, reduction="avg")
  with pytest.raises(ValueError, match="where must be a boolean"):
    jxent.preference_loss(C, R, where=KEEP[:3])
  with pytest.raises(TypeError, match="chosen_log_probs must be a floating"):
    jxent.preference_loss(np.arange(P), R)


# The head: pairs of sequences of T tokens; chunks of 8 do not divide the 2 * B * T tokens.
B, T, D, V = 3, 5, 6, 20
HH = RNG.normal(size=(2, B, T, D))
WW = RNG.normal(size=(D, V)) * 0.5
BB = RNG.normal(size=V) * 0.3
YY = RNG.integers(0, V, size=(2, B, T))
MM = np.ones((2, B, T), bool)
MM[:, :, :2] = False  # the prompt
MM[1, 0, 3:] = False  # a shorter rejected completion
MM[0, 2, :] = False  # pair 2's chosen completion is empty: the pair is dropped
TEMP = 0.8
REF_SHIFT = RNG.normal(size=(2, B, T)) * 0.3


def _log_probs64(h, w, b):
  lp = jax.nn.log_softmax((h @ w + b) / TEMP)
  return jnp.take_along_axis(lp, YY[..., None], -1)[..., 0]


def _dense_preference(h, w, b, ref, *, average, nll_weight, **opts):
  lp = jnp.where(MM, _log_probs64(h, w, b), 0)
  n = np.maximum(MM.sum(-1), 1)
  seq = lp.sum(-1) / (n if average else 1)
  rs = jnp.where(MM, ref, 0).sum(-1) / (n if average else 1)
  keep = MM.any(-1).all(0)
  refs = {} if opts.get("loss_type") == "orpo" else dict(
      ref_chosen_log_probs=rs[0], ref_rejected_log_probs=rs[1])
  loss = jxent.preference_loss(seq[0], seq[1], where=keep, **refs, **opts)
  return loss + nll_weight * -lp[0].sum() / MM[0].sum()


@pytest.mark.parametrize("case, layout, impl", [
    ("sigmoid", "dv", "platform"), ("orpo", "vd", "platform"),
    ("ipo", "vd", "accelerator"), ("sigmoid", "dv", "accelerator")], indirect=["impl"])
def test_linear_preference_loss_against_dense_float64(case, layout, impl):
  opts = dict(loss_type=case, beta=0.3, average_log_prob=case != "sigmoid",
              nll_weight=0.5 if case != "ipo" else 0.0)
  if case == "sigmoid":
    opts.update(gamma=0.1, label_smoothing=0.05)
  with jax.enable_x64(True):
    ref = _log_probs64(HH, WW, BB) + REF_SHIFT  # the reference policy's, per token
    wl = WW if layout == "dv" else WW.T

    def fused(h, w, b, ref, **kw):
      refs = {} if case == "orpo" else {"ref_log_probs": ref}
      return jxent.linear_preference_loss(h, w, YY, where=MM, bias=b, weight_layout=layout,
                                          temperature=TEMP, chunk_size=8, **refs, **opts,
                                          **kw)

    def dense(h, w, b, ref):
      w = w if layout == "dv" else w.T
      return _dense_preference(h, w, b, ref, average=opts["average_log_prob"],
                               nll_weight=opts["nll_weight"],
                               **{k: v for k, v in opts.items()
                                  if k not in ("average_log_prob", "nll_weight")})

    args = (HH, wl, BB, ref)
    argnums = (0, 1, 2) if case == "orpo" else (0, 1, 2, 3)
    v1, g1 = jax.jit(jax.value_and_grad(fused, argnums))(*args)
    v0, g0 = jax.value_and_grad(dense, argnums)(*args)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for a, b, i in zip(g1, g0, argnums):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"argument {i}")
    assert np.all(np.asarray(g1[0])[~MM] == 0)  # the prompt's and padding's hidden states
    # Forward mode, non-unit tangents in every argument.
    t = tuple(np.asarray(RNG.normal(size=np.shape(a))) for a in args)
    np.testing.assert_allclose(jax.jvp(fused, args, t)[1], jax.jvp(dense, args, t)[1],
                               rtol=1e-10)
    # The metrics, with the chosen tokens' negative log-likelihood.
    loss, m = jax.jit(lambda *a: fused(*a, return_metrics=True))(*args)
    np.testing.assert_allclose(loss, v0, rtol=1e-12)
    lp = np.where(MM, _log_probs64(HH, WW, BB), 0)
    np.testing.assert_allclose(m["nll"], -lp[0].sum() / MM[0].sum(), rtol=1e-12)
    n = np.maximum(MM.sum(-1), 1)
    seq = lp.sum(-1) / (n if opts["average_log_prob"] else 1)
    keep = MM.any(-1).all(0)
    np.testing.assert_allclose(m["chosen_log_probs"], seq[0][keep].mean(), rtol=1e-12)


def test_linear_preference_loss_inputs():
  h = jnp.asarray(HH, jnp.bfloat16)
  out = jxent.linear_preference_loss(h, jnp.asarray(WW, jnp.bfloat16), YY, where=MM)
  assert out.dtype == jnp.float32 and np.isfinite(out)
  # The per-sequence reference equals the per-token one aggregated.
  ref = RNG.normal(size=(2, B, T)) - 3
  seq_ref = np.where(MM, ref, 0).sum(-1)
  a = jxent.linear_preference_loss(HH, WW, YY, where=MM, ref_log_probs=ref)
  b = jxent.linear_preference_loss(HH, WW, YY, where=MM, ref_log_probs=seq_ref)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  with pytest.raises(ValueError, match="leading axis of 2"):
    jxent.linear_preference_loss(HH[0], WW, YY[0])
  with pytest.raises(ValueError, match="ref_log_probs must have"):
    jxent.linear_preference_loss(HH, WW, YY, ref_log_probs=ref[..., :2])
  with pytest.raises(ValueError, match="where must be a boolean"):
    jxent.linear_preference_loss(HH, WW, YY, where=MM[0])
  with pytest.raises(ValueError, match="nll_weight"):
    jxent.linear_preference_loss(HH, WW, YY, nll_weight=1.0, reduction="none")
  with pytest.raises(TypeError, match="labels"):
    jxent.linear_preference_loss(HH, WW, YY.astype(float))
  with pytest.raises(ValueError, match="reduction must be one of"):
    jxent.linear_preference_loss(HH, WW, YY, reduction="avg")
  with pytest.raises(ValueError, match="chunk_size must be positive"):
    jxent.linear_preference_loss(HH, WW, YY, chunk_size=0)
  with pytest.raises(ValueError, match="reduction must be one of"):
    jxent.linear_kto_loss(HH[0], WW, YY[0], PREF[:B], reduction="avg")


# KTO: unpaired completions, each desirable or not.
PREF = np.array([True, False, True, True, False, False])
KL0 = 0.7


def np_kto(s, ref, kl, preferred, beta, wd=1.0, wu=1.0):
  """float64 NumPy, TRL's and Liger's formula: 1 - sigmoid(+-beta (log ratio - z0))."""
  d = (s - ref) - kl
  return np.where(preferred, wd * (1 - _sigmoid(beta * d)), wu * (1 - _sigmoid(-beta * d)))


def test_kto_loss_against_numpy_float64():
  kl = RNG.uniform(0, 1, size=P)
  with jax.enable_x64(True):
    ref = np_kto(C, RC, kl, PREF, 0.3, 1.5, 0.5)
    f = lambda s, r, k, **kw: jxent.kto_loss(s, PREF, ref_log_probs=r, kl=k, beta=0.3,
                                             desirable_weight=1.5, undesirable_weight=0.5, **kw)
    np.testing.assert_allclose(f(C, RC, kl, reduction="none"), ref, rtol=1e-12)
    np.testing.assert_allclose(f(C, RC, kl, where=KEEP), ref[KEEP].mean(), rtol=1e-12)
    np.testing.assert_allclose(f(C, RC, kl, reduction="sum"), ref.sum(), rtol=1e-12)
    np.testing.assert_allclose(jxent.kto_loss(C, PREF, kl=KL0, reduction="none"),
                               np_kto(C, 0, KL0, PREF, 0.1), rtol=1e-12)
    # The slopes in s: -lambda beta sigma(beta d) sigma(-beta d), its sign by the preference.
    d = (C - RC) - kl
    slope = 0.3 * _sigmoid(0.3 * d) * _sigmoid(-0.3 * d) * np.where(PREF, -1.5, 0.5)
    cot = RNG.uniform(0.5, 1.5, size=P)
    g = jax.jit(lambda s, r, k: jnp.sum(cot * f(s, r, k, reduction="none")))
    gs, gr, gk = jax.grad(g, argnums=(0, 1, 2))(C, RC, kl)
    np.testing.assert_allclose(gs, cot * slope, rtol=1e-12)
    np.testing.assert_allclose(gr, -cot * slope, rtol=1e-12)
    np.testing.assert_allclose(gk, -cot * slope, rtol=1e-12)
    check_grads(g, (C, RC, kl), order=2, modes=["fwd", "rev"], atol=1e-6, rtol=1e-6)
    # Far from the reference point: a loss of about lambda or 0, never NaN.
    v, gs = jax.value_and_grad(lambda s: jnp.sum(jxent.kto_loss(
        s, np.array([True, False]), beta=1.0, reduction="none")))(np.array([-3e4, -3e4]))
    np.testing.assert_allclose(v, 1.0, rtol=1e-12)
    assert np.all(np.isfinite(gs))
    loss, m = jxent.kto_loss(C, PREF, ref_log_probs=RC, beta=0.5, where=KEEP,
                             return_metrics=True)
    good, bad = KEEP & PREF, KEEP & ~PREF
    np.testing.assert_allclose(m["chosen_rewards"], 0.5 * (C - RC)[good].mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rejected_rewards"], 0.5 * (C - RC)[bad].mean(), rtol=1e-12)
    np.testing.assert_allclose(m["rejected_log_probs"], C[bad].mean(), rtol=1e-12)
  with pytest.raises(ValueError, match="preferred must be a boolean"):
    jxent.kto_loss(C, PREF.astype(int))
  with pytest.raises(ValueError, match="kl must broadcast to the sequences"):
    jxent.kto_loss(C, PREF, kl=np.ones(4))
  with pytest.raises(ValueError, match="undesirable_weight must be >= 0"):
    jxent.kto_loss(C, PREF, undesirable_weight=-1)


@pytest.mark.parametrize("layout, impl", [("dv", "platform"), ("vd", "accelerator")],
                         indirect=["impl"])
def test_linear_kto_loss_against_dense_float64(layout, impl):
  h, y, mask = HH.reshape(2 * B, T, D), YY.reshape(2 * B, T), MM.reshape(2 * B, T)
  with jax.enable_x64(True):
    ref = np.asarray(_log_probs64(HH, WW, BB)).reshape(2 * B, T) + REF_SHIFT.reshape(2 * B, T)
    wl = WW if layout == "dv" else WW.T
    opts = dict(beta=0.4, desirable_weight=1.2, undesirable_weight=0.8, average_log_prob=True)

    def fused(h, w, b, ref, kl, **kw):
      return jxent.linear_kto_loss(h, w, y, PREF, ref_log_probs=ref, kl=kl, where=mask,
                                   bias=b, weight_layout=layout, temperature=TEMP,
                                   chunk_size=8, **opts, **kw)

    def dense(h, w, b, ref, kl):
      w = w if layout == "dv" else w.T
      lp = jax.nn.log_softmax((h @ w + b) / TEMP)
      lp = jnp.where(mask, jnp.take_along_axis(lp, y[..., None], -1)[..., 0], 0)
      n = np.maximum(mask.sum(-1), 1)
      s, rs = lp.sum(-1) / n, jnp.where(mask, ref, 0).sum(-1) / n
      return jxent.kto_loss(s, PREF, ref_log_probs=rs, kl=kl, where=mask.any(-1),
                            beta=0.4, desirable_weight=1.2, undesirable_weight=0.8)

    args = (h, wl, BB, ref, 0.3)
    v1, g1 = jax.jit(jax.value_and_grad(fused, range(5)))(*args)
    v0, g0 = jax.value_and_grad(dense, range(5))(*args)
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for a, b, i in zip(g1, g0, range(5)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"argument {i}")
    assert not mask[2].any() and np.all(np.asarray(g1[0])[2] == 0)  # a dropped sequence
    t = tuple(np.asarray(RNG.normal(size=np.shape(a))) for a in args)
    np.testing.assert_allclose(jax.jvp(fused, args, t)[1], jax.jvp(dense, args, t)[1],
                               rtol=1e-10)


def test_fused_and_per_token_paths_agree(monkeypatch):
  # Whole pairs (or sequences) per token chunk form each block's gradient in its own pass;
  # longer groups, per-pair outputs and meshes take the per-token log-probabilities. Both
  # give the same loss and gradients (a per-sequence reference and a KL point included).
  from jxent import _lmhead
  seq_ref = np.where(MM, REF_SHIFT - 4, 0).sum(-1)
  h, y, mask = HH.reshape(2 * B, T, D), YY.reshape(2 * B, T), MM.reshape(2 * B, T)
  kl = RNG.uniform(0, 1, size=2 * B)

  def dpo(hh, w, b, ref):
    return jxent.linear_preference_loss(hh, w, YY, where=MM, bias=b, ref_log_probs=ref,
                                        beta=0.3, nll_weight=0.5, chunk_size=8,
                                        reduction="sum")

  def kto(hh, w, b, kl):
    return jxent.linear_kto_loss(hh, w, y, PREF, where=mask, bias=b, kl=kl,
                                 ref_log_probs=seq_ref.reshape(-1), chunk_size=8)

  with jax.enable_x64(True):
    for f, args in ((dpo, (HH, WW, BB, seq_ref)), (kto, (h, WW, BB, kl))):
      fused = jax.value_and_grad(f, range(4))(*args)
      monkeypatch.setattr(_lmhead, "groups_fit", lambda *a: False)
      per_token = jax.value_and_grad(f, range(4))(*args)
      monkeypatch.undo()
      np.testing.assert_allclose(fused[0], per_token[0], rtol=1e-12)
      for a, b, i in zip(fused[1], per_token[1], range(4)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=f"{f.__name__} {i}")
    # Per-pair and per-sequence losses (the per-token path) sum to the fused sum.
    none = jxent.linear_preference_loss(HH, WW, YY, where=MM, ref_log_probs=seq_ref,
                                        beta=0.3, reduction="none")
    total = jxent.linear_preference_loss(HH, WW, YY, where=MM, ref_log_probs=seq_ref,
                                         beta=0.3, reduction="sum")
    assert none.shape == (B,) and none[2] == 0
    np.testing.assert_allclose(np.sum(none), total, rtol=1e-12)
    none = jxent.linear_kto_loss(h, WW, y, PREF, where=mask, reduction="none")
    np.testing.assert_allclose(np.sum(none) / mask.any(-1).sum(),
                               jxent.linear_kto_loss(h, WW, y, PREF, where=mask), rtol=1e-12)
