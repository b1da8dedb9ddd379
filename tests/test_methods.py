"""rnnjax/methods/: one interface for every method value (options in the value, one ``run``
on the canonical form), Newton's "auto" variant, the guess every front door passes the same
way, and the time-sharded wrapper."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax import methods
from rnnjax.sharding.mesh import SequenceSharding

ONE_DEVICE = SequenceSharding(jax.make_mesh((1,), ("seq",)), "seq")


def concrete_methods():
    out, todo = [], [methods.Method]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if not inspect.isabstract(cls):
            out.append(cls)
    return out


@pytest.mark.parametrize("cls", concrete_methods(), ids=lambda c: c.__name__)
def test_every_method_runs_through_one_signature(cls):
    params = list(inspect.signature(cls.run).parameters)
    assert params == ["self", "cell", "params", "seqs"], (cls.__name__, params)
    assert cls in methods.BY_NAME.values() or cls is methods.TimeSharded


def test_newton_auto_takes_the_exact_blocks_where_the_cell_gives_them():
    assert rj.Newton().variant == "auto"
    assert rj.Newton().resolve(rj.ParaLSTM(4), 64).variant == "deer"
    assert rj.Newton().resolve(rj.ParaGRU(4), 64).variant == "deer"
    assert rj.Newton().resolve(rj.IndRNN(4, activation="tanh"), 64).variant == "deer"
    assert rj.Newton().resolve(rj.GRU(4), 64).variant == "quasi-deer"
    assert rj.Newton("elk").resolve(rj.ParaLSTM(4), 64).variant == "elk"  # an explicit choice stays


def test_newton_auto_needs_fewer_iterations_than_quasi_deer_on_paralstm():
    cell = rj.ParaLSTM(8)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 256, 3))
    *_, auto = rj.parallel.newton_scan(cell, params, xs)
    *_, quasi = rj.parallel.newton_scan(cell, params, xs, newton="quasi-deer")
    assert bool(auto.converged) and bool(quasi.converged)
    assert int(auto.iterations) < int(quasi.iterations), (int(auto.iterations), int(quasi.iterations))


@pytest.fixture(scope="module")
def gru_case():
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 12, 3))
    lengths = jnp.array([12, 7])
    return cell, params, xs, lengths


def test_a_guess_goes_in_the_same_way_through_scan_and_newton_scan(gru_case):
    cell, params, xs, lengths = gru_case
    ys_ref, h_ref = rj.scan(cell, params, xs, lengths=lengths, reverse=True)
    *_, info = rj.parallel.newton_scan(cell, params, xs, lengths=lengths, reverse=True)
    # Started from the solution, one fixed iteration reproduces it (from zeros it would not).
    fixed = rj.Newton("quasi-deer", tol=None, max_iters=1)
    ys, h = rj.scan(cell, params, xs, lengths=lengths, reverse=True, method=fixed, guess=info.states)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5)
    ys_n, h_n, _ = rj.parallel.newton_scan(
        cell, params, xs, lengths=lengths, reverse=True, newton="quasi-deer", tol=None, max_iters=1, guess=info.states
    )
    np.testing.assert_array_equal(ys_n, ys)
    ys_zero, _ = rj.scan(cell, params, xs, lengths=lengths, reverse=True, method=fixed)
    assert float(jnp.max(jnp.abs(ys_zero - ys_ref))) > 1e-3


def test_a_guess_is_refused_by_methods_that_do_not_iterate_and_checked_for_shape(gru_case):
    cell, params, xs, _ = gru_case
    states = jnp.zeros((2, 12, 4))
    with pytest.raises(ValueError, match=r"guess= is the first iterate .*Sequential"):
        rj.scan(cell, params, xs, guess=states)
    with pytest.raises(ValueError, match=r"guess has a leaf of shape \(2, 11, 4\); expected \(2, 12, 4\)"):
        rj.scan(cell, params, xs, method=rj.Newton(), guess=states[:, 1:])
    with rj.distributed.data_parallel(jax.make_mesh((1,), ("data",)), "data"):
        with pytest.raises(ValueError, match="guess= is not split over rj.distributed.data_parallel"):
            rj.scan(cell, params, xs, method=rj.Newton(), guess=states)
    # No steps: nothing to iterate, the loop's empty result, the guess checked all the same.
    ys, h = rj.scan(cell, params, xs[:, :0], method=rj.Newton(), guess=states[:, :0])
    assert ys.shape == (2, 0, 4) and bool((h == 0).all())


def test_time_sharded_resolves_auto_by_the_time_sharded_table_and_refuses_what_cannot_split():
    sharded = rj.TimeSharded(rj.Auto(), ONE_DEVICE)
    assert sharded.resolve(rj.MinGRU(4), 64) == rj.TimeSharded(rj.Associative(), ONE_DEVICE)
    assert sharded.resolve(rj.ParaGRU(4), 64).method.variant == "deer"
    for method in (rj.Sequential(), rj.Chunked(), rj.Newton("elk"), rj.Kernel()):
        with pytest.raises(ValueError, match="does not split the time axis"):
            rj.TimeSharded(method, ONE_DEVICE).check(rj.MinGRU(4))
    with pytest.raises(TypeError, match="method value"):
        rj.TimeSharded("associative", ONE_DEVICE)
    with pytest.raises(TypeError, match="SequenceSharding"):
        rj.TimeSharded(rj.Associative(), "seq")


def test_time_sharded_on_one_device_equals_the_method_alone(gru_case):
    cell, params, xs, lengths = gru_case
    method = rj.Newton("deer", max_iters=20)
    ys, h = rj.scan(cell, params, xs, lengths=lengths, method=rj.TimeSharded(method, ONE_DEVICE))
    ys_ref, h_ref = rj.scan(cell, params, xs, lengths=lengths, method=method)
    np.testing.assert_allclose(ys, ys_ref, atol=1e-6)
    np.testing.assert_allclose(h, h_ref, atol=1e-6)
