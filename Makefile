# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: demo test bench lint clean

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.demo-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test-installed: $(VENV)/bin/activate pyproject.toml
	$(PIP) install --quiet -e ".[demo,test]"
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m jxent demo

test: $(VENV)/.test-installed
	$(PY) -m pytest -n 2 -q

bench: $(VENV)/.test-installed
	$(PY) -m benchmarks

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
