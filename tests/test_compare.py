"""The CE-vs-MSE comparison and the examples: short runs with asserted outcomes."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jxent._apps import compare as _compare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blobs_result():
  return _compare.run(("blobs",), optimizers=("sgd",), steps=60, seeds=3, progress=False)


def _run(result, init, loss):
  (r,) = [r for r in result["runs"] if r["init"] == init and r["loss"] == loss]
  return r


def test_saturated_start_mse_gradient_vanishes_and_ce_recovers(blobs_result):
  ce, mse = _run(blobs_result, "saturated", "cross_entropy"), _run(blobs_result, "saturated", "mse")
  # Confidently wrong start: MSE's gradient carries sigmoid'(z) ~ e^-8 and is ~100x smaller.
  assert mse["grad_norm_0"] < ce["grad_norm_0"] / 50
  assert ce["steps_to_target"] is not None and ce["final_accuracy"] >= 0.95
  assert mse["steps_to_target"] is None and mse["final_accuracy"] < 0.5


def test_normal_start_both_losses_learn(blobs_result):
  for loss in ("cross_entropy", "mse"):
    r = _run(blobs_result, "normal", loss)
    assert r["final_accuracy"] >= 0.95, r
  curves = blobs_result["curves"][("blobs", "linear", "normal", "sgd", "cross_entropy")]
  assert curves["loss"].shape == (3, 61)
  assert curves["loss"][:, -1].mean() < curves["loss"][:, 0].mean() / 5


def test_reported_accuracy_is_the_held_out_accuracy_of_the_trained_model(blobs_result):
  # Recomputed in NumPy from the final parameters, independently of the training code.
  data = _compare.load("blobs")
  for r in blobs_result["runs"]:
    hist = blobs_result["curves"][(r["dataset"], r["model"], r["init"], r["optimizer"],
                                   r["loss"])]
    w, b = np.asarray(hist["params"]["w"], np.float64), np.asarray(hist["params"]["b"])
    z_test = np.einsum("nd,sdk->snk", data.x_test, w)[..., 0] + b[:, None, 0]
    acc_test = ((z_test > 0) == data.y_test).mean(axis=1)
    np.testing.assert_allclose(hist["accuracy"][:, -1], acc_test, atol=1e-6)
    assert abs(r["final_accuracy"] - acc_test.mean()) < 1e-6
    # steps to target: the first step whose mean held-out accuracy reaches it.
    mean_curve = hist["accuracy"].mean(axis=0)
    hits = np.flatnonzero(mean_curve >= r["target_accuracy"])
    assert r["steps_to_target"] == (int(hits[0]) if hits.size else None)
  # ... and that check can tell the splits apart: some trained model scores differently on
  # the training split.
  gaps = []
  for hist in blobs_result["curves"].values():
    w, b = np.asarray(hist["params"]["w"]), np.asarray(hist["params"]["b"])
    z_train = np.einsum("nd,sdk->snk", data.x_train, w)[..., 0] + b[:, None, 0]
    gaps.append(abs(((z_train > 0) == data.y_train).mean() - hist["accuracy"][:, -1].mean()))
  assert max(gaps) > 1e-3


def test_saturate_makes_predictions_confidently_wrong():
  data = _compare.load("blobs")
  init, apply = _compare.linear_model(data)
  import jax

  p = _compare.saturate(init(jax.random.PRNGKey(0)), apply, data, "linear")
  z = np.asarray(apply(p, data.x_train))
  assert abs(np.mean(np.abs(z)) - _compare.SATURATION_LOGIT) < 1.0
  assert np.mean((z > 0) == data.y_train) < 0.1


def test_cli_json_and_plot(tmp_path):
  js, png = tmp_path / "runs.json", tmp_path / "curves.png"
  out = subprocess.run(
      [sys.executable, "-m", "jxent", "compare", "--datasets", "blobs", "--optimizers", "sgd",
       "--steps", "30", "--seeds", "2", "--json", str(js), "--plot", str(png), "--no-progress"],
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  runs = json.loads(js.read_text())["runs"]
  assert len(runs) == 4
  keys = {"dataset", "init", "loss", "optimizer", "steps_to_target", "final_accuracy",
          "final_loss", "grad_norm_0"}
  assert all(keys <= set(r) for r in runs)
  assert {r["loss"] for r in runs} == {"cross_entropy", "mse"}
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
  assert "| blobs | linear | saturated | sgd | mse |" in out.stdout


def _example(name):
  sys.path.insert(0, str(ROOT / "examples"))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def test_example_gradients():
  r = _example("gradients").main(verbose=False)
  assert r["softmax_max_diff"] < 1e-6 and r["bce_max_diff"] < 1e-6 and r["mse_max_diff"] < 1e-6
  np.testing.assert_allclose(r["softmax_grad"], [0.3, -0.4, 0.1], atol=1e-6)
  assert abs(r["mse_wrong"]) < abs(r["ce_wrong"]) / 100


def test_example_multilabel():
  r = _example("multilabel").main(steps=150, verbose=False)
  assert all(acc > 0.9 for acc in r["per_label_accuracy"].values()), r
  assert r["exact_match"] > 0.85


def test_example_flax_digits():
  r = _example("flax_mnist_like").main(epochs=8, verbose=False)
  assert r["test_accuracy"] > 0.93, r


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_example_distill_soft_targets_beat_hard_ones():
  d = _example("distill")
  r = d.main(teacher_steps=500, student_steps=400, tokens=20_000, verbose=False)
  # Each reported perplexity, recomputed in float64 NumPy from the returned parameters on the
  # held-out split (the model's forward written out here, not the example's code).
  ctx, y = r["held_out"]

  def ppl(p):
    e = p["embed"].astype(np.float64)[ctx].reshape(len(y), -1)
    h = np.tanh(e @ p["mix_w"] + p["mix_b"])
    logp = _np_log_softmax(h @ p["head_w"] + p["head_b"])
    return float(np.exp(-logp[np.arange(len(y)), y].mean()))

  assert abs(ppl(r["params"]["teacher"]) / r["teacher_perplexity"] - 1) < 1e-4
  for name, v in r["student_perplexity"].items():
    assert abs(ppl(r["params"][name]) / v - 1) < 1e-4, name
  # The source's entropy rate, against the held-out text's own NLL under the true chain.
  probs, rate = d.markov_source(0)
  assert abs(np.log(r["best_possible_perplexity"]) - rate) < 1e-9
  true_nll = -np.log(probs[ctx[:, 0], ctx[:, 1], y]).mean()
  assert abs(true_nll - rate) < 0.05
  # The outcome: the teacher learns the text; the whole distribution (KL) teaches the small
  # student best, the bounded JS less, the teacher's argmax worst (an overconfident student).
  s = r["student_perplexity"]
  best = r["best_possible_perplexity"]
  assert best < r["teacher_perplexity"] < 1.4 * best
  assert s["forward KL"] < s["JS (beta=0.5)"] < s["CE on teacher argmax"]
  assert s["forward KL"] < 2 * r["teacher_perplexity"]
  assert s["CE on teacher argmax"] > 2 * s["forward KL"]


def test_example_policy_gradient_learns_the_rule():
  pg = _example("policy_gradient")
  r = pg.main(steps=120, verbose=False)
  # The reward and entropy curves: from near chance (1/16 per token) and near log 16 to a
  # rewarded, nearly deterministic policy.
  assert r["reward"][:5].mean() < 0.35 and r["reward"][-10:].mean() > 0.85
  assert r["entropy"][:5].mean() > 1.5 and r["entropy"][-10:].mean() < 0.5
  # The learned policy, decoded greedily in NumPy from its parameters, follows the rule.
  start = np.arange(pg.VOCAB)
  tokens = pg.greedy(r["params"], start)
  prev = np.concatenate([start[:, None], tokens[:, :-1]], axis=1)
  assert ((tokens == (prev + pg.STEP) % pg.VOCAB).mean()) > 0.85
