# `make demo` runs the main job, `make test` every check. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.groupnorm-installed

.PHONY: demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/dev.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/groupnorm demo

test: lint typecheck unit

lint: $(STAMP)
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

typecheck: $(STAMP)
	$(PY) -m mypy

# Flax's wheel ships no tests: fetch its GroupNorm test files (from the installed version's sdist on
# PyPI) for tests that run them with groupnorm's classes; with them required, a missing file fails.
unit: $(STAMP)
	$(PY) tests/fetch_upstream.py
	GROUPNORM_REQUIRE_UPSTREAM=1 $(PY) -m pytest -n auto

bench: $(STAMP)
	$(VENV)/bin/groupnorm bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
