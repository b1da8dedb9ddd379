# Every target creates (or reuses) the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bench demo test test-slow test-all notebooks docs lint smoke-wheel fixtures la-fixtures rg-fixtures clean

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

# Writes bench-results/cpu-quick/ (git-ignored): the committed reference runs in benchmarks/results/
# change only when a command names one with --out (benchmarks/results/README.md).
bench: $(VENV)/.bench
	$(PY) -m benchmarks.run --quick --host-devices auto

# The documentation (docs/), built into docs/_build/html with warnings as errors.
$(VENV)/.docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $@

docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

# Lint, format and type checks of rnnjax/ (ruff, mypy; configured in pyproject.toml).
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check rnnjax
	$(VENV)/bin/ruff format --check rnnjax
	$(VENV)/bin/mypy

# Builds the sdist and wheel, installs the wheel into a fresh venv and imports it from outside the tree.
smoke-wheel: $(VENV)/.dev
	PY=$(abspath $(PY)) .ci/smoke_wheel.sh

demo: $(VENV)/.installed
	$(PY) examples/char_lm.py

notebooks: $(VENV)/.installed
	$(PY) notebooks/build.py

# Tests on 2 processes. --dist loadgroup: the tests that share one subprocess (tests/test_cores.py,
# tests/test_distributed.py, tests/test_multiprocess.py) run on one worker, which starts it once
# (the groups: XDIST_GROUPS in tests/conftest.py).
PYTEST := $(PY) -m pytest -n 2 --dist loadgroup -q

# The fast set (minutes): everything but the tests marked slow, compiled for compile speed
# (--fast-compile, tests/conftest.py).
test: $(VENV)/.installed
	$(PYTEST) -m "not slow" --fast-compile

# Only the tests marked slow (notebooks, README examples, every multidevice check, ...).
test-slow: $(VENV)/.installed
	$(PYTEST) -m slow

# Every test, as CI runs it (.ci/run).
test-all: $(VENV)/.installed
	$(PYTEST)

# Regenerates tests/fixtures/*.npz from PyTorch and Keras (never needed by the tests).
fixtures:
	$(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/pip install --quiet torch==2.13.0 keras jax numpy
	.venv-fixtures/bin/pip install --quiet --no-deps -e .
	KERAS_BACKEND=jax .venv-fixtures/bin/python tests/fixtures/make_fixtures.py

# Regenerates tests/fixtures/la_*.npz from fla and mlstm_kernels' plain-PyTorch references
# (never needed by the tests; --no-deps: fla would pull in triton, which the references don't use).
la-fixtures:
	$(PYTHON) -m venv .venv-fixtures-la
	.venv-fixtures-la/bin/pip install --quiet torch==2.13.0 numpy einops
	.venv-fixtures-la/bin/pip install --quiet --no-deps fla-core==0.6.0 mlstm-kernels==2.0.6
	.venv-fixtures-la/bin/python tests/fixtures/make_linear_attention_fixtures.py

# Regenerates tests/fixtures/rglru_recurrentgemma.npz from RecurrentGemma's JAX RGLRU layer (never
# needed by the tests). Its requirements are installed by hand (its [jax] extra would add
# orbax-checkpoint, which the layer does not use); jax and flax are the versions of .venv.
rg-fixtures:
	$(PYTHON) -m venv .venv-fixtures-rg
	.venv-fixtures-rg/bin/pip install --quiet jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 einops jaxtyping "typeguard<3" "absl-py<2" "numpy<2.4" sentencepiece
	.venv-fixtures-rg/bin/pip install --quiet --no-deps recurrentgemma==1.0.1
	.venv-fixtures-rg/bin/python tests/fixtures/make_rglru_fixture.py

# Regenerates tests/fixtures/slstm_xlstm.npz from xlstm's sLSTM cell on its "vanilla" PyTorch backend
# (never needed by the tests; --no-deps: xlstm's mlstm_kernels and ninja serve its CUDA and mLSTM paths).
slstm-fixtures:
	$(PYTHON) -m venv .venv-fixtures-slstm
	.venv-fixtures-slstm/bin/pip install --quiet torch==2.13.0 numpy packaging
	.venv-fixtures-slstm/bin/pip install --quiet --no-deps xlstm==2.0.6
	.venv-fixtures-slstm/bin/python tests/fixtures/make_slstm_fixture.py

clean:
	rm -rf $(VENV) .venv-fixtures .venv-fixtures-la .venv-fixtures-slstm .venv-fixtures-rg *.egg-info docs/_build docs/api/generated docs/notebooks/*.ipynb
