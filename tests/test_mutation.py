"""The mutation harness's mutants still point at the code: each one's text occurs exactly once
in its file, so a refactor that moves the math shows up here, in `make test`, rather than as
an error in the middle of a half-hour `make mutation`."""

from pathlib import Path

from mutation.mutants import MUTANTS

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutant_applies_exactly_once():
  names = [m.name for m in MUTANTS]
  assert len(names) == len(set(names))
  for m in MUTANTS:
    text = (ROOT / m.path).read_text()
    assert text.count(m.find) == 1, (m.name, m.path, text.count(m.find))
    assert m.find != m.replace
    for test in m.tests:
      assert (ROOT / test.split("::")[0]).exists(), (m.name, test)
