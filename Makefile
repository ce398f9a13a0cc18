# `make demo` runs the main job, `make test` every check. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.groupnorm-installed

# The NumPy-only check has an environment of its own: the package installed from a copy of the checkout
# (so nothing is built in it), its one dependency NumPy, the test tools, and no framework. It runs on the oldest
# supported Python where one is found (python3.10, or pyenv's), so that the package and these tests are
# checked on it too; else on $(PYTHON).
NUMPY_VENV := .venv-numpy
NUMPY_STAMP := $(NUMPY_VENV)/.groupnorm-tools
NUMPY_PYTHON ?= $(firstword $(foreach p,python3.10 $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10),\
	$(shell $(p) -c 'print("$(p)")' 2>/dev/null)) $(PYTHON))
# the test files that need no framework; their tests that need one are marked `extras` and left out
NUMPY_TESTS := tests/test_numpy.py tests/test_plan.py tests/test_packaging.py tests/test_cli.py \
	tests/test_docs_site.py tests/test_bench.py
# The torch tests on a machine without a C compiler: groupnorm's exact fallback where its kernel would
# run. PATH holds the environment's bin/ alone; CC is unset; a fresh cache, so no kernel built before is
# found. (The float64 gradchecks never take the float32 kernel's path: they are the same either way. The
# bound on a no-grad call's allocations is the compiled kernel's; the composite holds float32 temporaries.)
TORCH_TESTS := tests/test_torch.py tests/test_torch_numerics.py
NO_COMPILER := env -u CC -u CXX PATH=$(abspath $(VENV))/bin

.PHONY: demo test lint typecheck unit docs docs-check numpy-only no-compiler bench clean

$(STAMP): pyproject.toml requirements/dev.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/dev.txt -e '.[all]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/groupnorm demo

test: lint typecheck docs-check numpy-only unit no-compiler

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

# The documentation site, into site/ (`make docs`); `make test` builds it strict (any warning fails:
# a broken link, reference or docstring; not --quiet, which would hide them) into a temporary directory.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build

docs-check: $(STAMP)
	out=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir $$out; \
	status=$$?; rm -rf $$out; exit $$status

$(NUMPY_STAMP): requirements/numpy-only.txt requirements/constraints.txt pyproject.toml
	rm -rf $(NUMPY_VENV)
	$(NUMPY_PYTHON) -m venv $(NUMPY_VENV)
	$(NUMPY_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NUMPY_VENV)/bin/python -m pip install --quiet -c requirements/constraints.txt -r requirements/numpy-only.txt
	touch $(NUMPY_STAMP)

numpy-only: $(NUMPY_STAMP)
	$(NUMPY_VENV)/bin/python -c 'import sys, pathlib; [compile(p.read_bytes(), str(p), "exec") \
		for d in ("src", "tests") for p in sorted(pathlib.Path(d).rglob("*.py"))]'
	copy=$$(mktemp -d) && cp -R src pyproject.toml README.md LICENSE MANIFEST.in $$copy/ && \
	$(NUMPY_VENV)/bin/python -m pip install --quiet --no-build-isolation --force-reinstall --no-deps $$copy; \
	status=$$?; rm -rf $$copy; exit $$status
	$(NUMPY_VENV)/bin/python -m pip check
	$(NUMPY_VENV)/bin/python -c 'import importlib.util as u, sys; \
		extra = [m for m in ("torch", "tensorflow", "keras", "jax", "flax", "rich", "matplotlib") if u.find_spec(m)]; \
		sys.exit(f"not a NumPy-only environment: {extra}" if extra else 0)'
	GROUPNORM_TEST_INSTALLED=1 $(NUMPY_VENV)/bin/python -m pytest -p no:cacheprovider -o pythonpath=tests \
		-m 'not extras' $(NUMPY_TESTS)

no-compiler: $(STAMP)
	cache=$$(mktemp -d) && \
	$(NO_COMPILER) $(abspath $(PY)) -c 'import shutil, sys; \
		cc = [c for c in ("cc", "gcc", "clang", "c++", "g++", "clang++") if shutil.which(c)]; \
		sys.exit(f"a C compiler is still on PATH: {cc}" if cc else 0)' && \
	$(NO_COMPILER) GROUPNORM_CACHE_DIR=$$cache $(abspath $(PY)) -m pytest -n auto -p no:cacheprovider \
		-k 'not gradcheck and not allocates_only_its_output' $(TORCH_TESTS); \
	status=$$?; rm -rf $$cache; exit $$status

bench: $(STAMP)
	$(VENV)/bin/groupnorm bench

clean:
	rm -rf $(VENV) $(NUMPY_VENV) site .pytest_cache .mypy_cache .ruff_cache .hypothesis
