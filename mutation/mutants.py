"""The mutants: one deliberate mistake each, as (file, exact text, replacement, tests).

Every ``find`` must occur exactly once in its file (the harness refuses otherwise), so a
refactor that moves the code shows up as an error here rather than as a silent no-op.
"""

from __future__ import annotations

import dataclasses

SOFTMAX = ["tests/test_torch_reference.py", "tests/test_classification.py",
           "tests/test_transforms.py", "tests/test_bad_values.py", "tests/test_properties.py"]
SIGMOID = ["tests/test_torch_reference.py", "tests/test_classification.py",
           "tests/test_transforms.py", "tests/test_bad_values.py"]
INFO = ["tests/test_information.py", "tests/test_torch_reference.py", "tests/test_transforms.py",
        "tests/test_bad_values.py", "tests/test_properties.py"]
FUSED = ["tests/test_fused.py", "tests/test_transforms.py", "tests/test_bad_values.py",
         "tests/test_properties.py"]
SHARDED = ["tests/test_sharded.py"]
GRADS = ["tests/test_grads.py", "jxent/grads.py"]
LMHEAD = ["tests/test_lmhead.py"]
# The head's mutants run the tests that exercise the mutated path (test_lmhead.py whole
# takes minutes per mutant); each was checked to fail on its mutant.
_LM = lambda *names: [f"tests/test_lmhead.py::test_{n}" for n in names]
_SCALAR = _LM("scalar_reductions_against_float64")
_TOPK = _LM("topk_kl_scalar_reductions_against_float64")
_ACCEL = _LM("values_and_gradients_against_float64", "ties_for_the_top_within_and_across_blocks")
LMHEAD_TESTS = {
    "lmhead-pair-accel-lse": _LM("distillation_values_and_gradients_against_float64"),
    "lmhead-topk-accel-rest": _TOPK + _LM("topk_kl_values_and_gradients_against_float64"),
    "lmhead-logp-grad-sign": _SCALAR, "lmhead-entropy-grad-h": _SCALAR,
    "lmhead-temperature": _SCALAR, "lmhead-weights-slope": _SCALAR,
    "lmhead-dropped-tokens": _SCALAR, "lmhead-topk-rest-grad": _TOPK,
    "lmhead-topk-teacher-slope": _TOPK,
    "lmhead-stats-tail": _LM("entropy_keeps_relative_accuracy_when_nearly_one_hot"),
    "lmhead-token-entropy-tangent": _LM("values_and_gradients_against_float64"),
    "lmhead-kl-student-grad": _LM("distillation_values_and_gradients_against_float64",
                                  "distillation_every_autodiff_mode_in_float64"),
    "lmhead-js-beta": _LM("distillation_values_and_gradients_against_float64"),
    "lmhead-accel-moment-shift": _ACCEL, "lmhead-accel-old-top": _ACCEL,
}


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  find: str
  replace: str
  what: str
  tests: tuple[str, ...]


def _m(name, path, find, replace, what, tests):
  if tests is LMHEAD:
    tests = LMHEAD_TESTS.get(name, LMHEAD)
  return Mutant(name, path, find, replace, what, tuple(tests))


MUTANTS = [
    # ------------------------------------------------------------ reference softmax CE
    _m("ref-smoothing-factor", "jxent/_reference.py",
       "  a = a * (1 - eps)\n", "  a = a * 1\n",
       "integer target: the (1 - ε) factor on the label dropped", SOFTMAX),
    _m("ref-smoothing-spread", "jxent/_reference.py",
       "  s = eps / c_eff * (", "  s = eps * (",
       "integer target: smoothing mass ε not divided by C", SOFTMAX),
    _m("ref-zloss-square", "jxent/_reference.py",
       "lse.shape).astype(lse.dtype), lse * lse)", "lse.shape).astype(lse.dtype), lse)",
       "z-loss: λ·lse instead of λ·lse²", SOFTMAX),
    _m("ref-zloss-dropped-rows", "jxent/_reference.py",
       "  return loss + (term if valid is None else jnp.where(valid, term, 0))",
       "  return loss + term",
       "z-loss added on dropped examples too", SOFTMAX),
    _m("ref-soft-weights", "jxent/_reference.py",
       "    t = t * w.astype(acc)[None, :]\n", "    t = t\n",
       "soft labels: class weights ignored", SOFTMAX),
    _m("soft-target-sums", "jxent/_softmax.py",
       "  return jnp.sum(R.soft_target(y, valid, w, eps, cmask, m.dtype), axis=-1)",
       "  return jnp.sum(y.astype(m.dtype), axis=-1)",
       "soft labels: the gradient's softmax coefficient ignores weights and smoothing", SOFTMAX),
    _m("ref-soft-smoothing", "jxent/_reference.py",
       "      t = (1 - eps) * t + eps / y.shape[-1]\n", "      t = (1 - eps) * t + eps\n",
       "soft labels: smoothing mass not divided by C", SOFTMAX),
    _m("ref-label-gap-sign", "jxent/_reference.py",
       "  return m - z_y.astype(m.dtype)", "  return z_y.astype(m.dtype) - m",
       "integer loss: the label's gap m - z_y with its sign flipped", SOFTMAX),
    _m("ref-max-rest-frac", "jxent/_reference.py",
       "  (no select, which XLA:CPU's fused reductions pay for).\"\"\"\n"
       "  return jnp.sum(e - jnp.floor(e), axis=-1)",
       "  (no select, which XLA:CPU's fused reductions pay for).\"\"\"\n"
       "  return jnp.sum(e, axis=-1)",
       "fused confident labels: the max's own term left in the rest (log 2 too high)",
       ["tests/test_classification.py", "tests/test_fused.py"]),
    _m("ref-label-tail-frac", "jxent/_reference.py",
       "  e = jnp.exp(jnp.minimum(z - z_y[:, None], 0))\n"
       "  return jnp.sum(e - jnp.floor(e), axis=-1)",
       "  e = jnp.exp(jnp.minimum(z - z_y[:, None], 0))\n  return jnp.sum(e, axis=-1)",
       "vocab-parallel confident labels: the label's own term left in the tail",
       ["tests/test_sharded.py"]),
    _m("cpu-label-tail-frac", "jxent/_cpu.py",
       "  return jnp.sum(jnp.sum(e - jnp.floor(e), axis=-1).reshape(n, k), axis=-1)",
       "  return jnp.sum(jnp.sum(e - jnp.floor(e) + 1e-3 * e, axis=-1).reshape(n, k), axis=-1)",
       "XLA:CPU confident labels: the tail off by 0.1%", ["tests/test_classification.py"]),
    _m("ref-class-mask-ignored", "jxent/_reference.py",
       "  return z if cmask is None else jnp.where(cmask, z, -jnp.inf)", "  return z",
       "a class-mask `where` ignored", SOFTMAX),
    # --------------------------------------------------------------- softmax derivative
    _m("grad-sign", "jxent/_softmax.py",
       "  g = coef[:, None] * p - t\n", "  g = t - coef[:, None] * p\n",
       "the gradient softmax − y with its sign flipped", SOFTMAX),
    _m("grad-zloss-slope", "jxent/_softmax.py",
       "    slope = 2 * zl * jnp.where(", "    slope = zl * jnp.where(",
       "z-loss gradient missing its factor 2", SOFTMAX),
    _m("grad-dropped-rows", "jxent/_softmax.py",
       "  return g if valid is None else jnp.where(valid[:, None], g, 0)", "  return g",
       "gradient of ignored examples not zeroed", SOFTMAX),
    _m("grad-smoothing-target", "jxent/_softmax.py",
       "      t = t + s[:, None] * (1 if v is None else v)\n", "      t = t\n",
       "integer labels: smoothing left out of the gradient's target", SOFTMAX),
    _m("grad-dzloss", "jxent/_softmax.py",
       "    lse2 = (m + r) ** 2\n", "    lse2 = (m + r)\n",
       "derivative in z_loss: lse instead of lse²", SOFTMAX),
    _m("mean-class-weights", "jxent/_softmax.py",
       "    return _checks.mean_of(total, jnp.sum(wy if valid is None else "
       "jnp.where(valid, wy, 0)))",
       "    return _checks.mean_of(total, z.shape[0] if valid is None else jnp.sum(valid))",
       "weighted mean divided by the count instead of Σ w_y (PyTorch's definition)", SOFTMAX),
    _m("mean-of-empty", "jxent/_checks.py",
       "  return total / jnp.where(count == 0, 1, count).astype(total.dtype)",
       "  return total / count.astype(total.dtype)",
       "mean over no kept example: NaN instead of 0", SOFTMAX),
    # ----------------------------------------------------------------------- sigmoid
    _m("bce-pos-weight-side", "jxent/_reference.py",
       "  neg = jnp.maximum(z, 0) + tail\n",
       "  neg = jnp.maximum(z, 0) + tail\n  if pw is not None:\n    neg = pw * neg\n",
       "pos_weight applied to the negative term too", SIGMOID),
    _m("bce-label-poison", "jxent/_reference.py",
       "  return y * pos + (neg - y * neg) + label_poison(y)",
       "  return y * pos + (neg - y * neg)",
       "labels outside [0, 1] give a finite BCE instead of NaN", SIGMOID),
    _m("bce-tail", "jxent/_reference.py",
       "  tail = jnp.log1p(jnp.exp(-jnp.abs(z)))\n  pos",
       "  tail = jnp.exp(-jnp.abs(z))\n  pos",
       "BCE: log1p(e^-|z|) approximated by e^-|z|", SIGMOID),
    _m("focal-gamma", "jxent/_sigmoid.py",
       "  losses = ce * one_minus_pt**gamma", "  losses = ce * one_minus_pt**(gamma + 1)",
       "focal loss: exponent γ + 1", SIGMOID),
    _m("focal-alpha", "jxent/_sigmoid.py",
       "    losses = (alpha * yf + (1 - alpha) * (1 - yf)) * losses",
       "    losses = (alpha * (1 - yf) + (1 - alpha) * yf) * losses",
       "focal loss: α weights the negative class", SIGMOID),
    # -------------------------------------------------------- information quantities
    _m("js-half", "jxent/_information.py",
       "_nan_where(bad, 0.5 * jnp.sum(d_pm + d_qm, axis=axis))",
       "_nan_where(bad, jnp.sum(d_pm + d_qm, axis=axis))",
       "JS divergence without its ½", INFO),
    _m("binary-entropy-slope", "jxent/_information.py",
       "jnp.log1p(-safe) - jnp.log(safe)", "jnp.log(safe) - jnp.log1p(-safe)",
       "binary entropy's derivative with its sign flipped", INFO),
    _m("xlogy-zero", "jxent/_information.py",
       "  return jnp.where(nonzero, x * jnp.log(safe_y), jnp.where(jnp.isnan(y), jnp.nan, 0))",
       "  return x * jnp.log(y)",
       "0·log 0 computed as NaN (no convention)", INFO),
    _m("ce-logits-sign", "jxent/_information.py",
       "  return _checks.in_nats_to_base(-jnp.sum(_plogq(logp, logq), axis=axis), base)",
       "  return _checks.in_nats_to_base(jnp.sum(_plogq(logp, logq), axis=axis), base)",
       "cross_entropy_from_logits with its sign flipped", INFO),
    _m("probability-ce-where", "jxent/_probability.py",
       "      probs, labels = jnp.where(kb, probs, 1), jnp.where(kb, labels, 0)\n",
       "      probs, labels = probs, labels\n",
       "categorical CE: a per-example `where` does not zero dropped examples' inputs", INFO),
    # -------------------------------------------------------------------- fused loss
    _m("fused-cotangent-scale", "jxent/_fused.py",
       "  tangent = tangent + jnp.sum(scale * _option_tangent(cfg, dcfg, d_eps, d_zl))",
       "  tangent = tangent + jnp.sum(_option_tangent(cfg, dcfg, d_eps, d_zl))",
       "fused loss: derivative in smoothing/z-loss ignores the mean's scale", FUSED),
    _m("fused-bias-grad", "jxent/_fused.py",
       "      db = db + jnp.sum(dz, axis=0)", "      db = db",
       "fused loss: the bias gradient never accumulated", FUSED),
    _m("fused-slice-offset", "jxent/_fused.py",
       "  onehot = (jnp.arange(z.shape[-1]) + start)[None, :] == y[:, None]",
       "  onehot = jnp.arange(z.shape[-1])[None, :] == y[:, None]",
       "fused recompute: the label's one-hot ignores the vocabulary slice's offset", FUSED),
    _m("fused-smoothing-slope", "jxent/_fused.py",
       "    d_eps = jnp.where(valid, smooth - nll, 0)",
       "    d_eps = jnp.where(valid, nll - smooth, 0)",
       "fused loss: derivative in label_smoothing with its sign flipped", FUSED),
    _m("fused-softcap-chain", "jxent/_fused.py",
       "  if tanh is not None:\n    dz = dz * (1 - tanh * tanh)",
       "  if tanh is not None:\n    dz = dz",
       "fused loss: the soft-cap's chain-rule factor dropped", FUSED),
    _m("fused-filter-label-sign", "jxent/_fused.py",
       "  c = jnp.where(valid & ~bad, -a, 0)", "  c = jnp.where(valid & ~bad, a, 0)",
       "gradient filter: the label term added apart with its sign flipped", FUSED),
    _m("fused-filter-threshold", "jxent/_fused.py",
       "    keep = ~(jnp.exp(top) < cfg.filter_eps) | jnp.any(bad)",
       "    keep = ~(jnp.exp(top) < 2 * cfg.filter_eps) | jnp.any(bad)",
       "gradient filter: a block skipped below 2 eps instead of eps", FUSED),
    _m("fused-filter-tile-rows", "jxent/_fused.py",
       "    rows = ti[:, None] * tb + jnp.arange(tb)[None, :]",
       "    rows = tj[:, None] * tb + jnp.arange(tb)[None, :]",
       "gradient filter: a computed tile reads the wrong tokens' logsumexp", FUSED),
    # --------------------------------------------------------- language-model head
    _m("lmhead-logp-grad-sign", "jxent/_lmhead.py",
       "    return val, R.poison_rows(jnp.where(onehot, 1 - p, -p), bad), None",
       "    return val, R.poison_rows(jnp.where(onehot, 1 - p, p), bad), None",
       "log-probs, sum/mean: the softmax term of the gradient with its sign flipped", LMHEAD),
    _m("lmhead-entropy-grad-h", "jxent/_lmhead.py",
       "  return val, -p * (jnp.maximum(zl, floor) + ent[:, None]), None",
       "  return val, -p * jnp.maximum(zl, floor), None",
       "entropy, sum/mean: the gradient -p (log p + H) without its H term", LMHEAD),
    _m("lmhead-temperature", "jxent/_lmhead.py",
       "    g = g * (sc / cfg.temperature)[:, None]  # z = (h W + b) / T\n    dw, db = carry",
       "    g = g * sc[:, None]\n    dw, db = carry",
       "one-head sum/mean: the 1/T of the tempered logits dropped from the gradient", LMHEAD),
    _m("lmhead-weights-slope", "jxent/_lmhead.py",
       "  if nz(dscale):  # per-token weights (and a mean's weighted denominator)\n"
       "    tangent = tangent + jnp.sum(val * dscale)",
       "  if nz(dscale):  # per-token weights (and a mean's weighted denominator)\n"
       "    tangent = tangent + 0 * jnp.sum(val * dscale)",
       "one-head sum/mean: the derivative in the per-token weights dropped", LMHEAD),
    _m("lmhead-dropped-tokens", "jxent/_lmhead.py",
       "  scale = v2.astype(cfg.acc) if wt is None else wt",
       "  scale = jnp.ones(v2.shape, cfg.acc) if wt is None else wt",
       "one-head sum/mean: dropped (and padding) tokens counted", LMHEAD),
    _m("lmhead-topk-rest-grad", "jxent/_lmhead.py",
       "    g = g_lse[:, None] * q + g_rest[:, None] * q_rest",
       "    g = g_lse[:, None] * q",
       "top-k KL, sum/mean: the gradient of the missing mass's term dropped", LMHEAD),
    _m("lmhead-topk-teacher-slope", "jxent/_lmhead.py",
       "    tangent = tangent + jnp.sum(scale[..., None] * slope * ddata[1])",
       "    tangent = tangent + 0 * jnp.sum(scale[..., None] * slope * ddata[1])",
       "top-k KL, sum/mean: the derivative in the teacher's log-probabilities dropped", LMHEAD),
    _m("lmhead-stats-tail", "jxent/_lmhead.py",
       "  log_s = jnp.log1p(rest)\n  lse = m + log_s",
       "  log_s = jnp.log(1 + rest)\n  lse = m + log_s",
       "head statistics: log s as log(1 + rest), the tail's mass lost next to 1", LMHEAD),
    _m("lmhead-token-entropy-tangent", "jxent/_lmhead.py",
       "  return a1, -(a2 + ent * a1), d_zy", "  return a1, -a2, d_zy",
       "per-token entropy: the tangent -Cov_p(z, dz) without its H E_p[dz] term", LMHEAD),
    _m("lmhead-kl-student-grad", "jxent/_lmhead.py",
       "    gs = q - p if want_s else None\n", "    gs = p - q if want_s else None\n",
       "forward KL, mean/sum: the student's gradient q - p with its sign flipped", LMHEAD),
    _m("lmhead-js-beta", "jxent/_lmhead.py",
       "  return parts[0] if cfg.kind != \"js\" else beta * parts[0] + (1 - beta) * parts[1]",
       "  return parts[0] if cfg.kind != \"js\" else 0.5 * parts[0] + 0.5 * parts[1]",
       "JS divergence: β ignored in the value (always ½, ½)", LMHEAD),
    _m("lmhead-accel-moment-shift", "jxent/_lmhead.py",
       "    t = jnp.where(new, scale * (t + s_old * shift), t)",
       "    t = jnp.where(new, scale * t, t)",
       "GPU/TPU head statistics: the first moment not moved with its shift", LMHEAD),
    _m("lmhead-accel-old-top", "jxent/_lmhead.py",
       "    rest = jnp.where(new, s_old * scale, rest)",
       "    rest = jnp.where(new, rest * scale, rest)",
       "GPU/TPU head statistics: the old top's term lost when the top moves", LMHEAD),
    _m("lmhead-pair-accel-lse", "jxent/_lmhead.py",
       "  return m_new, s * jnp.exp(m - mf) + jnp.sum(jnp.exp(z - mf[:, None]), axis=-1)",
       "  return m_new, s + jnp.sum(jnp.exp(z - mf[:, None]), axis=-1)",
       "GPU/TPU KL, JS, top-k: the running sum not rescaled when the max moves", LMHEAD),
    _m("lmhead-topk-accel-rest", "jxent/_lmhead.py",
       "    g = g + g_rest[:, None] * jnp.exp(_masked_topk(z, idx, start) - rest_f)",
       "    g = g + g_rest[:, None] * jnp.exp(z - rest_f)",
       "GPU/TPU top-k KL: the rest's gradient over all classes", LMHEAD),
    # --------------------------------------------------------------------- sharded
    _m("sharded-smoothing-vocab", "jxent/sharded.py",
       "eps * (r + (m - sum_z / vocab_size))", "eps * (r + (m - sum_z / (vocab_size + 1)))",
       "vocab-parallel smoothing: mean logit over V + 1 classes", SHARDED),
    _m("sharded-label-logit", "jxent/sharded.py",
       "  z_y = jax.lax.psum(jnp.where(here, picked, 0), axis_name)",
       "  z_y = jnp.where(here, picked, 0)",
       "vocab-parallel: the label's logit not summed over shards", SHARDED),
    _m("sharded-linear-tail", "jxent/sharded.py",
       "                         jnp.exp(jnp.minimum(lse_local - z_y, 0)))",
       "                         0)",
       "vocab-parallel linear: a tiny loss's tail without the other shards' mass", SHARDED),
    # ---------------------------------------------------- tiny losses (relative accuracy)
    _m("ref-sharp-rest", "jxent/_reference.py",
       "row_sum(jnp.where(d == 0, 0, e), axis=-1)", "row_sum(e, axis=-1) - 1",
       "sharp logsumexp: the rest as the whole sum minus 1 (rounds a tiny loss to 0)",
       SOFTMAX),
    _m("info-sharp-log-softmax", "jxent/_information.py",
       "shifted - R.sharpen(lse, rest)", "shifted - lse",
       "log_softmax: the top class's tiny log-probability rounded to 0", INFO),
    _m("cpu-soft-sharp", "jxent/_cpu.py",
       "  loss, m, r = jax.lax.cond(jnp.any(_kept(loss < R._SMALL_LOSS, valid)), sharp,",
       "  loss, m, r = jax.lax.cond(jnp.any(_kept(loss < 0, valid)), sharp,",
       "XLA:CPU soft labels: the sharp pass never taken", SOFTMAX),
    _m("fused-accel-tail", "jxent/_fused.py",
       "    rest = jnp.where(m_new > m, old, rest) + R.max_rest(e)",
       "    rest = rest + R.max_rest(e)",
       "GPU/TPU fused loss: a tiny loss's rest not rescaled when a later block holds the max",
       ["tests/test_fused.py::test_confident_labels_through_a_real_head"]),
    # -------------------------------------------------------------- grads and apps
    _m("grads-mse-factor", "jxent/grads.py",
       "  return (s - targets) * s * jax.nn.sigmoid(-logits)", "  return (s - targets) * s",
       "sigmoid_mse_grad missing its (1 − σ) factor", GRADS),
    _m("compare-train-accuracy", "jxent/_apps/compare.py",
       "      return value, grads, accuracy(apply(p, xte), yte), optax.tree.norm(grads)",
       "      return value, grads, accuracy(apply(p, xtr), ytr), optax.tree.norm(grads)",
       "comparison: accuracy measured on the training split", ["tests/test_compare.py"]),
]
