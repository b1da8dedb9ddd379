# Every target creates (or reuses) the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow fixtures clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/char_lm.py

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
