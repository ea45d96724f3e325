PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-dev

.PHONY: demo test test-fast venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

## make demo: set up .venv, run the whole pipeline on the built-in dataset, write ./causarray-demo/
demo: $(STAMP)
	$(VENV)/bin/causarray demo --out causarray-demo

## make test: set up .venv with the dev extra and run the test suite
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

## make test-fast: the suite without the tests marked slow
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) causarray-demo .pytest_cache
