#!/usr/bin/env bash
# Build the sdist and wheel, install the wheel into a fresh virtual environment (its
# dependencies from PyPI) and use it from outside the source tree. Exits non-zero on any error.
#   PY: the interpreter that runs `build` (default .venv/bin/python, which needs `build`:
#   `make smoke-wheel` installs it). The fresh environment is made by the same interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
start=$SECONDS
TMP=$(mktemp -d "${TMPDIR:-/tmp}/rnnjax-smoke.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

echo "== build the sdist, then the wheel from it, into $TMP/dist"
"$PY" -m build --outdir "$TMP/dist" "$ROOT" >"$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; exit 1; }
sdist=$(ls "$TMP"/dist/rnnjax-*.tar.gz)
wheel=$(ls "$TMP"/dist/rnnjax-*.whl)
echo "   $(basename "$sdist") $(basename "$wheel")"

echo "== contents"
"$PY" - "$sdist" "$wheel" <<'PYEOF'
import sys, tarfile, zipfile

sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as tar:
    names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
missing = {"LICENSE", "README.md", "pyproject.toml", "rnnjax/__init__.py", "rnnjax/py.typed"} - names
assert not missing, f"sdist lacks {sorted(missing)}"
with zipfile.ZipFile(wheel) as whl:
    names = set(whl.namelist())
need = {"rnnjax/__init__.py", "rnnjax/py.typed"}
assert need <= names, f"wheel lacks {sorted(need - names)}"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "wheel lacks its LICENSE"
assert not any(n.startswith(("tests/", "benchmarks/", "docs/")) for n in names), "wheel ships non-package files"
print("   sdist: LICENSE README.md pyproject.toml; wheel: py.typed, LICENSE")
PYEOF

echo "== fresh virtual environment, wheel installed with its core dependencies only (no extras)"
"$PY" -m venv "$TMP/venv"  # from a venv's python, venv uses the base interpreter
"$TMP/venv/bin/python" -m pip install --quiet --upgrade pip >"$TMP/pip.log" 2>&1 || { cat "$TMP/pip.log"; exit 1; }
"$TMP/venv/bin/python" -m pip install --quiet "$wheel" >>"$TMP/pip.log" 2>&1 || { cat "$TMP/pip.log"; exit 1; }

echo "== smoke test from $TMP (outside the checkout)"
cd "$TMP"
"$TMP/venv/bin/python" - "$ROOT" <<'PYEOF'
import importlib.util, pathlib, sys

import jax, jax.numpy as jnp, optax
import rnnjax as rj

# The core installs neither Flax, Equinox nor Orbax (extras rnnjax[flax], rnnjax[equinox], rnnjax[checkpoint]).
for optional in ("flax", "equinox", "orbax"):
    assert importlib.util.find_spec(optional) is None, f"{optional} was installed without its extra"
for module, extra in (("rnnjax.flax", "flax"), ("rnnjax.equinox", "equinox")):
    try:
        importlib.import_module(module)
    except ImportError as err:
        assert f"rnnjax[{extra}]" in str(err), err
    else:
        raise AssertionError(f"import {module} worked without {extra} installed")

root = pathlib.Path(sys.argv[1]).resolve()
package = pathlib.Path(rj.__file__).resolve().parent
assert root not in package.parents, f"imported rnnjax from the checkout: {package}"
assert (package / "py.typed").is_file(), f"py.typed not installed in {package}"

cell = rj.LSTM(hidden_size=8)
params = cell.init(jax.random.key(0), input_size=3)
xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
ys, (h, c) = rj.scan(cell, params, xs, lengths=jnp.array([5, 3]))
assert ys.shape == (2, 5, 8) and h.shape == (2, 8), (ys.shape, h.shape)
assert bool(jnp.all(jnp.isfinite(ys))) and bool(jnp.all(ys[1, 3:] == 0))

def loss_fn(p, batch):
    ys, _ = rj.scan(cell, p, batch)
    return jnp.mean(ys ** 2)

step = rj.train.make_train_step(loss_fn, optax.sgd(0.1))
state = rj.train.TrainState.create(params, optax.sgd(0.1))
state, metrics = step(state, xs)
assert int(state.step) == 1 and bool(jnp.isfinite(metrics["loss"])), metrics
print(f"   rnnjax from {package}; jax {jax.__version__}; loss {float(metrics['loss']):.4f}")
PYEOF

echo "OK ($((SECONDS - start)) s)"
