"""Mutation testing of jxent's math: `make mutation` (or `python -m mutation`).

Each mutant is one deliberate, behaviour-changing mistake in a copy of the library (a
flipped sign, a dropped factor, a mask ignored in one pass, a wrong denominator, ...). The
harness copies the repository to a temporary directory, applies one mutant, runs the test
files that cover the mutated module (``pytest -x``: the first failure kills the mutant)
and records whether the suite noticed. The kill rate and every survivor are written to
mutation/RESULTS.md. Not part of ``make test``: a full run takes about 26 minutes on two cores.

    python -m mutation [--only NAME ...] [--jobs 2] [--list]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutation.mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("RESULTS.md")
COPY = ("jxent", "tests", "examples", "benchmarks", "pyproject.toml")


def _copy_repo(dest: Path) -> None:
  for name in COPY:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy2(src, dest / name)


def apply(m: Mutant, root: Path) -> None:
  path = root / m.path
  text = path.read_text()
  count = text.count(m.find)
  if count != 1:
    raise ValueError(f"mutant {m.name}: {m.find!r} occurs {count} times in {m.path} "
                     "(expected once); update mutation/mutants.py")
  path.write_text(text.replace(m.find, m.replace))


def run_one(m: Mutant, timeout: float) -> dict:
  t0 = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="jxent-mutant-") as tmp:
    root = Path(tmp)
    _copy_repo(root)
    apply(m, root)
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
           "-p", "no:randomly", "--no-header", *m.tests]
    try:
      out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                           timeout=timeout)
      status = "survived" if out.returncode == 0 else (
          "killed" if out.returncode == 1 else f"error (exit {out.returncode})")
      tail = (out.stdout + out.stderr).strip().splitlines()
      first_fail = next((ln for ln in tail if ln.startswith("FAILED ")), tail[-1] if tail else "")
    except subprocess.TimeoutExpired:
      status, first_fail = "timeout", f"no verdict in {timeout:.0f} s"
  return {"name": m.name, "what": m.what, "path": m.path, "status": status,
          "by": first_fail, "seconds": time.monotonic() - t0}


def _check_unmutated(tests: list[str]) -> None:
  """The chosen tests must pass on the real code, or every mutant looks killed."""
  out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-n", "2", *sorted(set(tests))], cwd=ROOT, capture_output=True,
                       text=True)
  if out.returncode != 0:
    sys.exit("the unmutated suite fails; fix it first:\n" + out.stdout[-3000:])


def to_markdown(results: list[dict], seconds: float) -> str:
  killed = sum(r["status"] == "killed" for r in results)
  lines = [
      "# Mutation testing: the last run",
      "",
      f"`python -m mutation` on {datetime.date.today().isoformat()}: **{killed} of "
      f"{len(results)} mutants killed ({100 * killed / max(len(results), 1):.0f}%)** in "
      f"{seconds / 60:.1f} minutes (the unmutated check included). Each mutant is one "
      "deliberate mistake in a copy of the library; 'killed' means the listed tests failed "
      "on it (the first failing test is shown).",
      "",
      "| mutant | file | the mistake | verdict | first failing test |",
      "|---|---|---|---|---|",
  ]
  for r in results:
    by = r["by"].replace("|", "\\|")
    if len(by) > 110:
      by = by[:107] + "..."
    lines.append(f"| {r['name']} | `{r['path']}` | {r['what']} | {r['status']} | {by} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m mutation", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", nargs="*", help="run only these mutants (by name)")
  p.add_argument("--jobs", type=int, default=2, help="mutants run in parallel")
  p.add_argument("--timeout", type=float, default=900, help="seconds per mutant")
  p.add_argument("--list", action="store_true", help="list the mutants and exit")
  args = p.parse_args(argv)
  mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
  if args.list:
    for m in mutants:
      print(f"{m.name:<28} {m.path:<28} {m.what}")
    return 0
  t0 = time.monotonic()
  with tempfile.TemporaryDirectory() as tmp:  # every mutant must apply cleanly
    _copy_repo(Path(tmp))
    for m in mutants:
      apply(m, Path(tmp))
      _copy_repo_file(m, Path(tmp))
  # One JAX compilation cache for the whole run (the tests' conftest.py uses it): the
  # unmutated check fills it, and each mutant compiles only the programs it changes.
  cache = tempfile.mkdtemp(prefix="jxent-mutation-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  try:
    _check_unmutated([t.split("::")[0] for m in mutants for t in m.tests])
    results = _run_all(mutants, args)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  order = {m.name: i for i, m in enumerate(mutants)}
  results.sort(key=lambda r: order[r["name"]])
  text = to_markdown(results, time.monotonic() - t0)
  if not args.only:
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")
  killed = sum(r["status"] == "killed" for r in results)
  print(f"{killed}/{len(results)} killed")
  return 0 if killed >= 0.95 * len(results) else 1


def _run_all(mutants, args) -> list[dict]:
  results = []
  with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
    futures = {pool.submit(run_one, m, args.timeout): m for m in mutants}
    for fut in cf.as_completed(futures):
      r = fut.result()
      results.append(r)
      print(f"{r['status']:>9}  {r['name']:<28} {r['seconds']:5.0f} s  {r['by'][:80]}",
            flush=True)
  return results


def _copy_repo_file(m: Mutant, root: Path) -> None:
  """Restores the mutated file in the scratch copy, so mutants are checked one at a time."""
  shutil.copy2(ROOT / m.path, root / m.path)


if __name__ == "__main__":
  sys.exit(main())
