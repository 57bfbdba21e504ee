# fcn_jax: `make test` and `make demo` each create .venv from nothing when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-all test-slow test-matrix demo bench clean

# A Python >= 3.12 for the newest-jax leg of `make test-matrix`: python3.12 on PATH if it runs
# (a pyenv shim for a version that is not selected does not), else a pyenv install of 3.12.
PYTHON_NEW ?= $(firstword $(foreach p,$(shell command -v python3.12 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(wildcard /root/.pyenv/versions/3.12*/bin/python3.12),\
	$(if $(shell $(p) -c "print(1)" 2>/dev/null),$(p))))

# A Python 3.13 for the third leg of `make test-matrix` (Debian 13's python3), found the same way.
PYTHON_313 ?= $(firstword $(foreach p,$(shell command -v python3.13 2>/dev/null) \
	$(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) $(wildcard /root/.pyenv/versions/3.13*/bin/python3.13),\
	$(if $(shell $(p) -c "print(1)" 2>/dev/null),$(p))))

# (Re)install when pyproject.toml changes; safe to re-run.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The suite on 8 emulated CPU devices (tests/conftest.py), without the cases marked slow:
# about 6-8 minutes on 2 cores. `make test-all` adds the slow ones (multi-process runs, 16-device
# self-tests, the remaining meshes, real world generation: about 28 minutes in all).
PYTEST_ARGS ?=
# The layers (pyproject.toml [tool.importlinter]) are checked first: an upward import fails the suite.
test: $(STAMP)
	@$(PY) -c "import sys, jax, flax; print('python', sys.version.split()[0], '| jax', jax.__version__, '| flax', flax.__version__)"
	$(VENV)/bin/lint-imports --no-cache
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q $(PYTEST_ARGS)

# Only the cases marked slow.
test-slow: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The supported range, as CI checks it: the suite on the default python3 (3.11 resolves jax 0.10.2)
# and, when a Python 3.12 or 3.13 exists on the machine, on the newest jax/flax each resolves, each
# in its own venv. A missing one is reported and skipped, not failed.
test-matrix:
	$(MAKE) test
	@if [ -n "$(PYTHON_NEW)" ]; then \
		$(MAKE) test PYTHON="$(PYTHON_NEW)" VENV=.venv-py312; \
	else echo "test-matrix: no working Python 3.12 found; its leg skipped"; fi
	@if [ -n "$(PYTHON_313)" ]; then \
		$(MAKE) test PYTHON="$(PYTHON_313)" VENV=.venv-py313; \
	else echo "test-matrix: no working Python 3.13 found; its leg skipped"; fi

# The main job on the embedded default (grows with each capability).
demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m fcn_jax.demo

bench: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) bench/bench_model.py

clean:
	rm -rf .venv .venv-py312 .venv-py313 .pytest_cache
