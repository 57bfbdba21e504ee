# fcn_jax: `make test` and `make demo` each create .venv from nothing when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

# (Re)install when pyproject.toml changes; safe to re-run.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Whole suite on 8 emulated CPU devices (tests/conftest.py).
test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q

# Skip the cases marked slow.
test-fast: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not slow"

# The main job on the embedded default (grows with each capability).
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m fcn_jax.demo

bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) bench/bench_model.py

clean:
	rm -rf $(VENV) .pytest_cache
