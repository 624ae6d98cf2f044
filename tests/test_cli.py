"""The command line: `python -m jxent demo` and `grads` print the numbers jxent computes."""

import re
import subprocess
import sys

import numpy as np


def _run(*args, timeout=300):
  out = subprocess.run([sys.executable, "-m", "jxent", *args], capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr
  return out.stdout


def _num(pattern, text):
  m = re.search(pattern, text)
  assert m, pattern
  return [float(g) for g in m.groups()]


def test_demo_prints_what_it_computes():
  out = _run("demo")
  p, q = np.array([0.7, 0.2, 0.1]), np.array([0.5, 0.3, 0.2])
  # Each printed number against an independent float64 computation, to its printed digits.
  for event, pi in (("boots normally", 0.7), ("fails to boot", 0.2), ("explodes", 0.1)):
    (got,) = _num(rf"computer {event}\s+{pi}\s+([0-9.]+)", out)
    assert abs(got - -np.log(pi)) <= 0.005
  h = -np.sum(p * np.log(p))
  nats, bits = _num(r"H\(p\) = ([0-9.]+) nats = ([0-9.]+) bits", out)
  assert abs(nats - h) <= 5e-5 and abs(bits - h / np.log(2)) <= 5e-5
  (kl,) = _num(r"D\(p\|\|q\) = sum p log\(p/q\) = ([0-9.]+) nats", out)
  (hpq,) = _num(r"H\(p,q\)  = -sum p log q   = ([0-9.]+) nats", out)
  assert abs(kl - np.sum(p * np.log(p / q))) <= 5e-5 and abs(hpq + np.sum(p * np.log(q))) <= 5e-5
  m = (p + q) / 2
  (js,) = _num(r"JS\(p, q\) = ([0-9.]+) bits", out)
  js_ref = 0.5 * (np.sum(p * np.log2(p / m)) + np.sum(q * np.log2(q / m)))
  assert abs(js - js_ref) <= 5e-5
  single, single_logits = _num(r"-log 0.6 = ([0-9.]+)   \(from logits log\(pred\): ([0-9.]+)\)",
                               out)
  assert abs(single - -np.log(0.6)) <= 5e-5 and abs(single_logits - -np.log(0.6)) <= 5e-5
  total, total_logits = _num(r"sum = ([0-9.]+)   \(from logits: ([0-9.]+)\)", out)
  ref = -np.log(0.9) - np.log(0.7) - np.log(0.8)
  assert abs(total - ref) <= 5e-5 and abs(total_logits - ref) <= 5e-5
  diffs = [float(x) for x in re.findall(r"max \|jax.grad - formula\| = ([0-9.e+-]+)", out)]
  assert len(diffs) == 5 and max(diffs) < 1e-5
  pattern = r"z = +(-?\d+): sigmoid = [0-9.]+ +CE grad = (-?[0-9.]+) +MSE grad = (-?[0-9.]+)"
  for z, ce, mse in re.findall(pattern, out):
    s = 1 / (1 + np.exp(-float(z)))
    assert abs(float(ce) - (s - 1)) <= 5e-5 and abs(float(mse) - (s - 1) * s * (1 - s)) <= 5e-6
  # The CE-vs-MSE summary restates the table's own numbers.
  rows = {tuple(c.strip() for c in ln.strip("|").split("|")[2:5]): ln
          for ln in out.splitlines() if ln.startswith("| blobs | linear |")}
  assert len(rows) == 8
  sgd_ce = rows[("saturated", "sgd", "cross_entropy")].split("|")
  sgd_mse = rows[("saturated", "sgd", "mse")].split("|")
  summary = " ".join(out.split("blobs, linear, sgd, saturated start")[1].split())
  assert f"reached it at step {sgd_ce[6].split()[0]}" in summary
  assert f"({sgd_mse[7].split()[0]})" in summary


def test_grads_command():
  # The gradient tour: five closed forms against jax.grad, each difference it computed small
  # (a wrong formula in jxent.grads gives differences of order 0.1).
  out = _run("grads", "--examples", "64")
  diffs = [float(x) for x in re.findall(r"max \|jax.grad - formula\| = ([0-9.e+-]+)", out)]
  assert len(diffs) == 5 and max(diffs) < 1e-5, out


def test_import_jxent_pulls_in_no_app_code():
  import subprocess
  import sys

  code = ("import sys, jxent; bad = [m for m in sys.modules if m.startswith(("
          "'jxent._apps', 'matplotlib', 'sklearn', 'flax'))]; print(bad); assert not bad")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr


def _fails(*args):
  out = subprocess.run([sys.executable, "-m", "jxent", *args], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2, out.stdout + out.stderr
  return out.stderr


def test_bad_choices_are_argument_errors_naming_the_choices():
  err = _fails("compare", "--optimizers", "rmsprop")
  assert "unknown optimizer 'rmsprop'" in err and "sgd, adam" in err
  err = _fails("compare", "--datasets", "blobs,mnist")
  assert "unknown dataset 'mnist'" in err and "breast_cancer" in err
  assert "must be a positive integer" in _fails("compare", "--steps", "0")


def test_cli_choices_match_the_app():
  from jxent import __main__ as cli
  from jxent._apps import compare

  assert cli.DATASETS == compare.DATASETS
  assert cli.OPTIMIZERS == tuple(compare.OPTIMIZERS)


def test_missing_demo_extras_are_named_up_front(tmp_path):
  # A stand-in 'matplotlib' that cannot be found: the command stops before any work.
  code = ("import sys, importlib.util as u; real = u.find_spec; "
          "u.find_spec = lambda n, *a: None if n == 'matplotlib' else real(n, *a); "
          "from jxent.__main__ import main; sys.exit(main(['demo']))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2
  assert "pip install 'jxent[demo]'" in out.stderr and "matplotlib" in out.stderr
  assert "jxent demo" not in out.stdout  # nothing ran


def test_help_shows_defaults():
  out = _run("compare", "--help")
  assert "(default: 300)" in out and "(default: sgd,adam)" in out
