# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test docs docs-check mutation bench lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.demo-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet -e ".[demo,test,docs]"
	touch $@

$(VENV)/.docs-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet -e ".[docs]"
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m jxent demo

test: $(VENV)/.test-installed
	$(PY) -m pytest -n 2 --dist loadgroup -q

# The documentation site (docs/_build/html), warnings as errors.
docs: $(VENV)/.docs-installed
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html docs docs/_build/html

# The built pages in headless Chromium (OS package): math rendered, internal links resolve.
docs-check: docs
	$(PY) docs/check.py docs/_build/html

# Mutants of the math against the suite; writes mutation/RESULTS.md (about 26 minutes).
mutation: $(VENV)/.test-installed
	$(PY) -m mutation

bench: $(VENV)/.test-installed
	$(PY) -m benchmarks

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build
