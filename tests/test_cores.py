"""rj.distributed.use_cpu_cores and make_train_step(mesh="local") (rnnjax/distributed/cores.py,
rnnjax/train/step.py). The cores are set before JAX starts, so those checks run in a subprocess
with 4 CPU devices; the main process keeps its single device."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from tests.once import once_per_session

# One subprocess for the module's tests (tests/once.py); one worker runs them (tests/conftest.py).
pytestmark = pytest.mark.xdist_group("four_cores")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import rnnjax as rj
    count = rj.distributed.use_cpu_cores(4)          # before any JAX computation
    import jax, jax.numpy as jnp, numpy as np, optax
    out = {"count": count, "devices": jax.device_count()}

    cell = rj.LSTM(8)
    params = {"rnn": cell.init(jax.random.key(0), 3), "out": jnp.ones((8, 1)) / 8}
    xs = jax.random.normal(jax.random.key(1), (8, 5, 3))
    batch = {"x": xs, "y": jnp.cumsum(xs[..., :1], axis=1), "lengths": jnp.array([5, 4, 3, 2, 1, 5, 0, 5])}

    def loss_fn(p, b):
        ys, _ = rj.scan(cell, p["rnn"], b["x"], lengths=b["lengths"])
        return rj.train.mean_squared_error(ys @ p["out"], b["y"], b["lengths"])

    def two_steps(step):
        state = rj.train.TrainState.create(params, optax.adam(1e-2))
        for _ in range(2):
            state, metrics = step(state, batch)
        return jax.device_get(state.params), float(metrics["loss"])

    local = rj.train.make_train_step(loss_fn, optax.adam(1e-2), mesh="local")
    plain = rj.train.make_train_step(loss_fn, optax.adam(1e-2))
    (p_local, l_local), (p_plain, l_plain) = two_steps(local), two_steps(plain)
    out["max_param_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p_local), jax.tree.leaves(p_plain)))
    out["max_param_scale"] = max(float(np.abs(b).max()) for b in jax.tree.leaves(p_plain))
    out["loss_diff"] = abs(l_local - l_plain)
    # 6 rows do not divide over 4 devices: the step splits them over 3.
    six = jax.tree.map(lambda a: a[:6], batch)
    state = rj.train.TrainState.create(params, optax.adam(1e-2))
    got = local(state, six)[0].params
    want = plain(rj.train.TrainState.create(params, optax.adam(1e-2)), six)[0].params
    out["six_rows_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    out["six_rows_devices"] = len(local.lower(state, six).compile().input_shardings[0][1]["x"].device_set)
    try:
        rj.distributed.use_cpu_cores(2)
    except RuntimeError as err:
        out["too_late"] = str(err)
    json.dump(out, sys.stdout)
    """
)


def run_script(folder):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (folder / "out.json").write_text(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def four_cores(tmp_path_factory):
    # One subprocess for the session, whichever xdist workers run these tests (tests/once.py).
    return json.loads((once_per_session(tmp_path_factory, "four_cores", run_script) / "out.json").read_text())


def test_use_cpu_cores_exposes_the_cores_as_devices(four_cores):
    assert four_cores["count"] == 4 and four_cores["devices"] == 4


def test_the_local_mesh_step_equals_the_single_device_step(four_cores):
    # The same loss and updates; the gradient's sums run in another order over 4 shards, so
    # the parameters after two Adam steps agree to float32 rounding.
    assert four_cores["max_param_diff"] <= 1e-5 * max(1.0, four_cores["max_param_scale"])
    assert four_cores["loss_diff"] <= 1e-5


def test_a_batch_that_does_not_divide_over_the_cores_uses_the_largest_divisor(four_cores):
    assert four_cores["six_rows_devices"] == 3
    assert four_cores["six_rows_diff"] <= 1e-5


def test_use_cpu_cores_after_jax_started_names_the_fix(four_cores):
    assert "must run before JAX computes anything" in four_cores["too_late"]
    assert "started with 4 device(s)" in four_cores["too_late"]


def test_the_local_mesh_with_one_device_is_the_plain_step():
    loss_fn = lambda p, b: jnp.mean((b * p["w"] - 1.0) ** 2)
    state = rj.train.TrainState.create({"w": jnp.zeros(3)}, optax.sgd(0.1))
    local = rj.train.make_train_step(loss_fn, optax.sgd(0.1), mesh="local", donate=False)
    plain = rj.train.make_train_step(loss_fn, optax.sgd(0.1), donate=False)
    assert jax.device_count() == 1
    np.testing.assert_array_equal(local(state, jnp.ones(3))[0].params["w"], plain(state, jnp.ones(3))[0].params["w"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mesh": "global"}, 'mesh must be a jax.sharding.Mesh, "local" or None'),
        ({"mesh": "local", "model_axis": "model"}, 'mesh="local" has one axis'),
    ],
)
def test_bad_mesh_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rj.train.make_train_step(lambda p, b: jnp.sum(p), optax.sgd(0.1), **kwargs)


def test_use_cpu_cores_checks_its_count():
    with pytest.raises(ValueError, match="count must be a positive int"):
        rj.distributed.use_cpu_cores(0)
