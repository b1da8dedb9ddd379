"""rnnjax/optional.py: the core works without the extras, and each extra's absence gives an
error that names it. The subprocess hides flax, equinox and orbax (and torch, matplotlib) behind an
import hook, as an environment with only the core dependencies would (`make smoke-wheel`
checks a real one)."""

import subprocess
import sys
import textwrap

import pytest

from rnnjax.optional import EXTRAS, require

CORE_ONLY = textwrap.dedent(
    """
    import importlib.abc, sys, tempfile

    HIDDEN = ("flax", "equinox", "orbax", "torch", "matplotlib", "tensorstore")

    class HideExtras(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, HideExtras())

    import jax, jax.numpy as jnp, optax
    import rnnjax as rj

    cell = rj.GRU(hidden_size=4)
    params = cell.init(jax.random.key(0), input_size=3)
    ys, h = rj.scan(cell, params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
    assert ys.shape == (2, 5, 4) and bool((ys[1, 2:] == 0).all())
    loss = lambda p, xs: jnp.mean(rj.scan(cell, p, xs)[0] ** 2)
    state = rj.train.TrainState.create(params, optax.sgd(0.1))
    state, metrics = rj.train.make_train_step(loss, optax.sgd(0.1))(state, jnp.ones((2, 5, 3)))
    assert int(state.step) == 1

    errors = {}
    try:
        import rnnjax.flax.linen
    except ImportError as err:
        errors["flax"] = str(err)
    try:
        import rnnjax.equinox
    except ImportError as err:
        errors["equinox"] = str(err)
    try:
        rj.train.save_checkpoint(tempfile.mkdtemp(), state)
    except ImportError as err:
        errors["checkpoint"] = str(err)
    for name in ("flax", "equinox", "orbax", "torch", "matplotlib"):
        assert name not in sys.modules, f"import rnnjax imported {name}"
    print(errors)
    """
)


@pytest.fixture(scope="module")
def core_only_errors():
    out = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])  # the dict printed last


def test_scan_and_training_work_with_the_core_dependencies_only(core_only_errors):
    assert set(core_only_errors) == {"flax", "equinox", "checkpoint"}


@pytest.mark.parametrize("extra", ["flax", "equinox", "checkpoint"])
def test_a_missing_extra_is_named_in_the_error(core_only_errors, extra):
    assert f"pip install 'rnnjax[{extra}]'" in core_only_errors[extra]


def test_require_returns_an_installed_module_and_rejects_unknown_names():
    assert require("matplotlib", "plots").__name__ == "matplotlib"
    with pytest.raises(KeyError, match="not an optional dependency"):
        require("numpy", "x")
    assert {extra for _, extra in EXTRAS.values()} == {"flax", "equinox", "checkpoint", "torch", "keras", "plot"}
