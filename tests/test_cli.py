"""The command line: `python -m jxent demo` and `grads` print the numbers jxent computes."""

import re
import subprocess
import sys


def _run(*args, timeout=300):
  out = subprocess.run([sys.executable, "-m", "jxent", *args], capture_output=True, text=True,
                       timeout=timeout)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_demo_prints_the_seed_numbers():
  out = _run("demo")
  for number in ("0.36", "1.61", "2.30", "0.8018", "0.804", "0.5108", "0.6852", "1.1568"):
    assert number in out, number
  assert "= D(p||q): checked" in out
  diffs = [float(x) for x in re.findall(r"max \|jax.grad - formula\| = ([0-9.e+-]+)", out)]
  assert len(diffs) == 5 and max(diffs) < 1e-5


def test_grads_command():
  out = _run("grads", "--examples", "64")
  assert "softmax(z) - y" in out and "(s - y) s (1 - s)" in out


def test_import_jxent_pulls_in_no_app_code():
  import subprocess
  import sys

  code = ("import sys, jxent; bad = [m for m in sys.modules if m.startswith(("
          "'jxent._apps', 'matplotlib', 'sklearn', 'flax'))]; print(bad); assert not bad")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
