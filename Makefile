PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-dev
CORE    = $(VENV)/.installed-core

.PHONY: demo test test-fast venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# the package and its dependencies only: what `make demo` needs
$(CORE): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	touch $(CORE)

# the package with the dev extra (pytest, statsmodels, dask, ...): what `make test` needs
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP) $(CORE)

venv: $(STAMP)

## make demo: set up .venv (the package only), run the whole pipeline on the built-in dataset, write ./causarray-demo/
demo: $(CORE)
	$(VENV)/bin/causarray demo --out causarray-demo

## make test: set up .venv with the dev extra and run the test suite
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## make test-fast: the suite without the tests marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) causarray-demo .pytest_cache
