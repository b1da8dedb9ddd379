"""rnnjax.distributed: the 8-device checks run in a subprocess (tests/multidevice_checks.py,
8 forced host devices); the rest here on this process's single default device.

The default run (``-m "not slow"``) runs a fast subset of the checks (FAST: one of each kind:
data-parallel training, errors before compiling, a sequence-parallel scan with gradients, the
split over devices); ``make test-all`` runs every one. One subprocess runs all the checks
the session selected, once (tests/once.py), whichever xdist workers run its tests."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from tests.cases import normal
from tests.once import once_per_session

CHECKS = Path(__file__).with_name("multidevice_checks.py")
EXPECTED = [
    "train_step_data_parallel_equals_single_device",
    "train_step_data_and_model_axes_equals_single_device",
    "gradient_reduced_once_after_the_loop",
    "tbptt_step_data_parallel_equals_single_device",
    "remat_policies_same_gradients_data_parallel",
    "data_parallel_flax_module",
    "bad_input_errors_before_compiling",
    *(f"sequence_parallel_{name}_associative" for name in ("MinGRU", "MinLSTM", "LRU", "IndRNNRelu")),
    *(f"sequence_parallel_{name}_newton" for name in ("Elman", "GRU", "LSTM", "MGU", "IndRNN", "ConvLSTM")),
    "sequence_parallel_linear_attention",
    "sequence_parallel_matrix_state_cells",
    "sequence_parallel_delta_rule",
    "sequence_parallel_delta_cells",
    "sequence_parallel_is_split_over_devices",
    "fixed_points_of_replicated_params_run_on_one_device",
]
FAST = [
    "train_step_data_parallel_equals_single_device",
    "bad_input_errors_before_compiling",
    "sequence_parallel_MinGRU_associative",
    "sequence_parallel_is_split_over_devices",
]
MULTIDEVICE = pytest.mark.xdist_group("multidevice")


def selected_checks(session) -> list[str]:
    """The checks whose tests this session runs (in EXPECTED's order)."""
    names = {item.callspec.params["name"] for item in session.items
             if getattr(item, "originalname", None) == "test_multidevice" and item.module.__name__ == __name__}
    return [name for name in EXPECTED if name in names] or FAST


@pytest.fixture(scope="session")
def multidevice(tmp_path_factory, request):
    """``{"checks": every check's name, "results": {name: {"ok", "detail", "seconds"}}}``."""
    only = ",".join(selected_checks(request.session))

    def run(folder):
        out = folder / "results.json"
        proc = subprocess.run([sys.executable, str(CHECKS), "--out", str(out), "--only", only],
                              capture_output=True, text=True, timeout=900)
        finished = proc.returncode == 0 and out.exists()
        assert finished, f"checks did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    # One subprocess for the session, even when xdist sends these tests to both workers.
    return json.loads((once_per_session(tmp_path_factory, "multidevice", run) / "results.json").read_text())


@MULTIDEVICE
def test_every_multidevice_check_ran(multidevice, request):
    assert multidevice["checks"] == EXPECTED  # a new check needs its name here
    assert list(multidevice["results"]) == selected_checks(request.session)


@MULTIDEVICE
@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in EXPECTED])
def test_multidevice(multidevice, name):
    result = multidevice["results"][name]
    assert result["ok"], result["detail"]


# ---- one device ----------------------------------------------------------------------------

MESH = jax.make_mesh((1,), ("data",))
CELL = rj.GRU(6)


@functools.cache
def cell_params():
    """CELL's params (built on first use, not when the module is collected)."""
    return CELL.init(jax.random.key(0), 3)


XS = normal(1, (4, 9, 3))


def test_data_parallel_context_on_one_device_equals_plain_scan():
    lengths = jnp.array([9, 3, 0, 5])
    with rj.distributed.data_parallel(MESH, "data"):
        assert rj.distributed.current_data_parallel().axis == "data"
        ys, h = jax.jit(lambda p, x: rj.scan(CELL, p, x, lengths=lengths))(cell_params(), XS)
    assert rj.distributed.current_data_parallel() is None
    ref_ys, ref_h = rj.scan(CELL, cell_params(), XS, lengths=lengths)
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(h, ref_h, rtol=1e-6, atol=1e-6)


def test_data_parallel_rejects_a_single_sequence_and_bad_axes():
    with rj.distributed.data_parallel(MESH, "data"):
        with pytest.raises(ValueError, match=r"single sequence .*sequence_scan"):
            rj.scan(CELL, cell_params(), XS[0])
    with pytest.raises(ValueError, match=r"axis='batch' is not an axis of the mesh; its axes are \('data',\)"):
        with rj.distributed.data_parallel(MESH, "batch"):
            pass
    with pytest.raises(TypeError, match="jax.sharding.Mesh"):
        with rj.distributed.data_parallel("data", "data"):
            pass


def test_train_step_with_a_one_device_mesh_equals_plain_step():
    def loss_fn(p, b):
        return rj.train.mean_squared_error(rj.scan(CELL, p, b["x"])[0], b["y"])

    opt = optax.sgd(0.1)
    batch = {"x": XS, "y": jnp.ones((4, 9, 6))}
    state = rj.train.TrainState.create(cell_params(), opt)
    a, ma = rj.train.make_train_step(loss_fn, opt, donate=False)(state, batch)
    b, mb = rj.train.make_train_step(loss_fn, opt, donate=False, mesh=MESH)(state, batch)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="model_axis and data_axis must be different"):
        rj.train.make_train_step(loss_fn, opt, mesh=MESH, model_axis="data")


def test_sequence_scan_one_device_and_errors():
    seq = jax.make_mesh((1,), ("seq",))
    cell = rj.MinGRU(5)
    params = cell.init(jax.random.key(2), 3)
    ys, h = rj.distributed.sequence_scan(cell, params, XS, mesh=seq, axis="seq", reverse=True)
    ref_ys, ref_h = rj.scan(cell, params, XS, reverse=True)
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Newton\\(\\) with 'deer', 'quasi-deer'"):
        rj.distributed.sequence_scan(CELL, cell_params(), XS, mesh=seq, axis="seq", method=rj.Newton("elk"))
    with pytest.raises(ValueError, match=r"sequence_scan\) runs rj.Associative\(\) or rj.Newton\(\)"):
        rj.distributed.sequence_scan(cell, params, XS, mesh=seq, axis="seq", method="chunked")
    with pytest.raises(ValueError, match="needs a cell with a linear recurrence"):
        rj.distributed.sequence_scan(CELL, cell_params(), XS, mesh=seq, axis="seq", method=rj.Associative())
    with pytest.raises(ValueError, match=r"xs has shape \(4, 9, 4\); expected"):
        rj.distributed.sequence_scan(cell, params, jnp.ones((4, 9, 4)), mesh=seq, axis="seq")


def test_shard_batch_and_replicate_place_arrays():
    batch = {"x": np.ones((4, 9, 3), np.float32), "key": jax.random.key(0)}
    placed = rj.distributed.shard_batch(batch, MESH, "data")
    assert tuple(placed["x"].sharding.spec) == ("data",)
    assert tuple(placed["key"].sharding.spec) == ()
    params = rj.distributed.replicate(cell_params(), MESH)
    assert all(tuple(p.sharding.spec) == () for p in jax.tree.leaves(params))
    two_d = jax.make_mesh((1, 1), ("data", "model"))
    shardings = rj.distributed.state_shardings(cell_params(), two_d, "model")
    assert tuple(shardings.w_h.spec) == (None, "model")  # (hidden, 3 * hidden): split the columns
    assert tuple(shardings.b_x.spec) == ()  # vectors stay replicated
