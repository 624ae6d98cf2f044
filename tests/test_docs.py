"""The documentation builds without warnings; in a real browser its math renders and its
internal links resolve (the browser part needs Chromium from the OS packages)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  pytest.importorskip("sphinxcontrib.katex")
  out = tmp_path_factory.mktemp("html")
  proc = subprocess.run([sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b",
                         "html", str(ROOT / "docs"), str(out)], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return out


def test_every_public_name_is_in_the_api_reference(built):
  import jxent

  page = (built / "api.html").read_text()
  names = [f"jxent.{n}" for n in jxent.__all__ if n not in ("grads", "sharded")]
  names += [f"jxent.sharded.{n}" for n in jxent.sharded.__all__]
  names += [f"jxent.grads.{n}" for n in ("softmax_cross_entropy_grad",
                                        "sigmoid_binary_cross_entropy_grad",
                                        "sigmoid_mse_grad", "softmax_cross_entropy_hessian")]
  missing = [n for n in names if f'id="{n}"' not in page]
  assert not missing


def test_every_public_function_has_its_docstring():
  # A docstring is one string literal: one built with "+" is no docstring at all (None), and
  # the reference page, help() and the doctests then silently lose it.
  import inspect

  import jxent

  public = [(f"jxent.{n}", getattr(jxent, n)) for n in jxent.__all__]
  public += [(f"jxent.sharded.{n}", getattr(jxent.sharded, n)) for n in jxent.sharded.__all__]
  bare = [name for name, f in public if inspect.isfunction(f)
          and (not (f.__doc__ or "").strip() or "<<" in f.__doc__)]
  assert not bare
  # Every public function carries a runnable example (collected by --doctest-modules; the
  # sharded ones on a one-device mesh); value_checks only wraps a function for checkify
  # (checked's example shows it).
  no_example = [name for name, f in public if inspect.isfunction(f)
                and ">>>" not in f.__doc__ and name != "jxent.value_checks"]
  assert not no_example


def test_links_resolve(built):
  sys.path.insert(0, str(ROOT / "docs"))
  import check

  assert check.check_links(built) == []


@pytest.mark.skipif(not any(shutil.which(b) for b in ("chromium", "chromium-browser",
                                                      "google-chrome")),
                    reason="needs Chromium (apt-get install chromium)")
def test_math_renders_in_a_browser(built, tmp_path):
  sys.path.insert(0, str(ROOT / "docs"))
  import check

  assert check.check_rendering(built, tmp_path) == []
  assert (tmp_path / "index.png").stat().st_size > 10_000
