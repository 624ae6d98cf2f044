"""Checks the built documentation the way a reader sees it: `make docs-check`.

    python docs/check.py [docs/_build/html] [--screenshots DIR]

1. Every internal link of every page resolves: the target file exists and, for a
   ``#fragment``, the target page has an element with that id.
2. In headless Chromium (from the OS packages: ``apt-get install chromium``), after the
   page's scripts ran: the pages with formulas contain rendered MathML and no raw TeX
   (``\\(``, ``$$``, ``\\frac``, ``\\varepsilon``, ...) is left in the visible text.
3. Screenshots of the home page and of the API reference are written to ``--screenshots``
   (default: the build directory's ``_screenshots``) and must be non-trivial PNGs.

Exits with status 1 and a list of problems if any check fails.
"""

from __future__ import annotations

import argparse
import html.parser
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

MATH_PAGES = ("information.html", "losses.html", "gradients.html", "api.html")
SCREENSHOT_PAGES = ("index.html", "api.html")
RAW_TEX = re.compile(r"\\\(|\\\[|\$\$|\\frac|\\varepsilon|\\sum|\\log|\\operatorname|\\sigma")


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.hrefs: list[str] = []
    self.ids: set[str] = set()

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if a.get("id"):
      self.ids.add(a["id"])
    if tag == "a" and a.get("href"):
      self.hrefs.append(a["href"])


class _VisibleText(html.parser.HTMLParser):
  """Text a reader sees: without scripts, styles and MathML's TeX annotations."""

  HIDDEN = {"script", "style", "annotation", "head"}

  def __init__(self):
    super().__init__()
    self.depth = 0
    self.parts: list[str] = []
    self.math = 0

  def handle_starttag(self, tag, attrs):
    if tag in self.HIDDEN:
      self.depth += 1
    if tag == "math":
      self.math += 1

  def handle_endtag(self, tag):
    if tag in self.HIDDEN and self.depth:
      self.depth -= 1

  def handle_data(self, data):
    if not self.depth:
      self.parts.append(data)


def _parse(path: Path) -> _Links:
  p = _Links()
  p.feed(path.read_text(encoding="utf-8"))
  return p


def check_links(root: Path) -> list[str]:
  problems, parsed = [], {}
  pages = sorted(p for p in root.rglob("*.html") if "_sources" not in p.parts)
  for page in pages:
    parsed[page] = _parse(page)
  for page, links in parsed.items():
    for href in links.hrefs:
      parts = urlsplit(href)
      if parts.scheme or parts.netloc or href.startswith("mailto:"):
        continue
      target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
      if not target.exists():
        problems.append(f"{page.relative_to(root)}: broken link {href!r}")
        continue
      if parts.fragment and target.suffix == ".html":
        ids = parsed[target].ids if target in parsed else _parse(target).ids
        if unquote(parts.fragment) not in ids:
          problems.append(f"{page.relative_to(root)}: no #{parts.fragment} in "
                          f"{target.relative_to(root)} ({href!r})")
  return problems


def _chromium() -> str | None:
  for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
    if shutil.which(name):
      return shutil.which(name)
  return None


def _browser(chrome: str, *args: str) -> subprocess.CompletedProcess:
  with tempfile.TemporaryDirectory() as profile:
    return subprocess.run(
        [chrome, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args],
        capture_output=True, text=True, timeout=120)


def check_rendering(root: Path, shots: Path) -> list[str]:
  chrome = _chromium()
  if chrome is None:
    return ["no Chromium found: install it from the OS packages (apt-get install chromium)"]
  problems = []
  for name in MATH_PAGES:
    out = _browser(chrome, "--dump-dom", (root / name).resolve().as_uri())
    if out.returncode != 0 or "<html" not in out.stdout:
      problems.append(f"{name}: Chromium could not render it: {out.stderr[-500:]}")
      continue
    text = _VisibleText()
    text.feed(out.stdout)
    visible = "".join(text.parts)
    if text.math == 0:
      problems.append(f"{name}: no rendered math (no <math> element after the scripts ran)")
    raw = sorted(set(RAW_TEX.findall(visible)))
    if raw:
      problems.append(f"{name}: raw TeX visible after rendering: {', '.join(raw)}")
  shots.mkdir(parents=True, exist_ok=True)
  for name in SCREENSHOT_PAGES:
    png = shots / name.replace(".html", ".png")
    png.unlink(missing_ok=True)
    out = _browser(chrome, f"--screenshot={png}", "--window-size=1280,1600",
                   (root / name).resolve().as_uri())
    if not png.exists() or png.stat().st_size < 10_000:
      problems.append(f"{name}: no screenshot ({out.stderr[-300:]})")
    else:
      print(f"screenshot: {png}")
  return problems


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("root", nargs="?", default="docs/_build/html", type=Path)
  p.add_argument("--screenshots", type=Path)
  args = p.parse_args(argv)
  root = args.root
  if not (root / "index.html").exists():
    print(f"{root}/index.html not found: build the docs first (make docs)", file=sys.stderr)
    return 1
  problems = check_links(root)
  problems += check_rendering(root, args.screenshots or root / "_screenshots")
  for prob in problems:
    print("FAIL", prob)
  print(f"docs check: {'OK' if not problems else f'{len(problems)} problem(s)'}")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
