# Every target creates (or reuses) the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bench demo test test-slow notebooks fixtures clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

# The benchmark's peers: Equinox from PyPI; PyTorch only if none is installed (torch==2.13.0 is
# the CPU build where a local wheel exists; elsewhere pip picks the platform's build). A peer
# that fails to install is skipped by the benchmark with a note.
$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0 || echo "PyTorch not installed: its rows will be skipped"
	touch $@

bench: $(VENV)/.bench
	$(PY) -m benchmarks.run --quick --host-devices auto

demo: $(VENV)/.installed
	$(PY) examples/char_lm.py

notebooks: $(VENV)/.installed
	$(PY) notebooks/build.py

test: $(VENV)/.installed
	$(PY) -m pytest -n 2 -m "not slow" -q

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow -q

# Regenerates tests/fixtures/*.npz from PyTorch and Keras (never needed by the tests).
fixtures:
	$(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/pip install --quiet torch==2.13.0 keras jax numpy
	.venv-fixtures/bin/pip install --quiet --no-deps -e .
	KERAS_BACKEND=jax .venv-fixtures/bin/python tests/fixtures/make_fixtures.py

clean:
	rm -rf $(VENV) .venv-fixtures *.egg-info
