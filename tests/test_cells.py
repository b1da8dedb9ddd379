"""Every cell in tests/cases.py against a plain Python loop, with and without jit, under
vmap, through check_grads, and for recompilation. Cell-specific equations are checked in
tests/cells/."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax.scan import compiled_count
from tests.cases import CELL_CASES, INPUT_SIZE, normal, seq_shape, step_shape
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

CASES = sorted(CELL_CASES)
# A family's second configuration (activation, bias, reset placement, clipping, ring) changes
# its step, which the fast set checks against the loop for every configuration (forwards).
# How the driver batches, maps, caches, casts, reverses and differentiates a step does not
# depend on it: the fast set runs those tests on one configuration per family, make test-all
# on all. (LSTM's is plain "lstm": "lstm_proj_peephole"'s output is narrower than its carry.)
# The matrix-state cells share one driver (rj.Chunked's engine, tested per op and per cell in
# tests/test_linear_attention*.py and tests/cells/): Mamba2 (convolution, per-head decay) stands
# for them. The RG-LRU (a LinearCell, as the LRU) and the sLSTM have their parity, Associative,
# Jacobian and fused-gradient checks in tests/cells/test_rglru.py and test_slstm.py.
SECOND_CONFIGS = {"elman_relu_nobias", "lstm", "gru_reset_before", "mgu_nobias_relu", "indrnn_tanh_clipped",
                  "minlstm_identity_nobias", "lru_ring", "gla", "mlstm", "deltanet", "gated_deltanet", "rwkv7",
                  "rglru", "slstm"}
DRIVER_CASES = [pytest.param(name, marks=pytest.mark.slow) if name in SECOND_CONFIGS else name for name in CASES]
STEPS = 6
LENGTHS = np.array([6, 3, 0])
F32 = dict(atol=1e-5, rtol=1e-5)  # float32 rounding


def _data(cell, key=0, batch=(3,), steps=STEPS, dtype=jnp.float32):
    params = cell.init(jax.random.key(key), INPUT_SIZE, dtype)
    return params, normal(key, seq_shape(cell, batch, steps), dtype)


@functools.lru_cache(maxsize=None)
def jitted_step(cell):
    # One compilation per cell; run eagerly, each operation of a step compiled on its own.
    return jax.jit(cell.step)


def loop_reference(cell, params, xs, lengths, reverse=False):
    """One sequence at a time, one ``cell.step`` at a time, no masking tricks."""
    step = jitted_step(cell)
    ys, finals = [], []
    for b in range(xs.shape[0]):
        carry = cell.init_carry(step_shape(cell)[:-1])
        seq_ys = [None] * xs.shape[1]
        order = range(lengths[b] - 1, -1, -1) if reverse else range(lengths[b])
        for t in order:
            carry, y = step(params, carry, xs[b, t])
            seq_ys[t] = y
        zero = jnp.zeros_like(step(params, carry, xs[b, 0])[1])
        ys.append(jnp.stack([zero if y is None else y for y in seq_ys]))
        finals.append(carry)
    return jnp.stack(ys), jax.tree.map(lambda *c: jnp.stack(c), *finals)


@functools.lru_cache(maxsize=None)
def jitted_scan(cell, reverse):
    return jax.jit(lambda p, xs, lengths: rj.scan(cell, p, xs, lengths=lengths, reverse=reverse))


# The delta-rule and RWKV-7 cells' steps are checked against NumPy transcriptions of the
# published layers in tests/cells/ (fast); their generic loop comparison runs in make test-all.
LOOP_SLOW = {"deltanet", "gated_deltanet", "rwkv7"}


@pytest.mark.parametrize("name, reverse", [
    pytest.param(name, reverse, id=f"{name}-{'reverse' if reverse else 'forward'}",
                 marks=[pytest.mark.slow] if (reverse and name in SECOND_CONFIGS) or name in LOOP_SLOW else [])
    for name in CASES for reverse in (False, True)])
def test_scan_matches_python_loop_with_and_without_jit(name, reverse):
    cell = CELL_CASES[name]
    params, xs = _data(cell)
    expected_ys, expected_carry = loop_reference(cell, params, xs, LENGTHS, reverse)
    for run in (
        lambda: rj.scan(cell, params, xs, lengths=jnp.asarray(LENGTHS), reverse=reverse),
        lambda: jitted_scan(cell, reverse)(params, xs, jnp.asarray(LENGTHS)),
    ):
        ys, carry = run()
        assert ys.shape == expected_ys.shape
        assert_trees_close(ys, expected_ys, **F32)
        assert_trees_close(carry, expected_carry, **F32)
    # Past a sequence's length the outputs are exactly zero.
    assert not np.any(np.asarray(ys[1, 3:])) and not np.any(np.asarray(ys[2]))


@pytest.mark.parametrize("name", DRIVER_CASES)
def test_vmap_over_single_sequences_equals_batched_call(name):
    cell = CELL_CASES[name]
    params, xs = _data(cell, key=1)
    lengths = jnp.asarray(LENGTHS)
    for reverse in (False, True):
        batched = jitted_scan(cell, reverse)(params, xs, lengths)
        single = jax.vmap(lambda x, n: rj.scan(cell, params, x, lengths=n, reverse=reverse))(xs, lengths)
        assert_trees_close(single, batched, atol=1e-6, rtol=1e-6)


def _check_grads_reverse_mode(name, order):
    cell = CELL_CASES[name]
    # float32 params widened on the host: the float64 init would compile anew for every cell.
    params, xs = _data(cell, key=2, batch=(2,), steps=3)
    params, xs = jax.tree.map(lambda a: np.asarray(a, np.float64), (params, xs))
    with enable_x64(True):
        params, xs = jax.tree.map(jnp.asarray, (params, xs))
        lengths = jnp.array([3, 2])

        def loss(p, x):
            ys, carry = rj.scan(cell, p, x, lengths=lengths)
            return jnp.sum(ys**2) + sum(jnp.sum(jnp.abs(c) ** 2) for c in jax.tree.leaves(carry))

        # Jitted: one compilation for check_grads' calls, instead of one per eager operation.
        check_grads(jax.jit(loss), (params, xs), order=order, modes=["rev"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DRIVER_CASES)
def test_check_grads_reverse_mode(name):
    _check_grads_reverse_mode(name, order=1)


# Second order costs about 4 times the first (check_grads differentiates the VJP numerically,
# each call traced and compiled anew): make test-all runs it. Not ConvLSTM: its second order
# is slow to check.
@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in CASES if CELL_CASES[name].input_ndim != 3])
def test_check_grads_reverse_mode_second_order(name):
    _check_grads_reverse_mode(name, order=2)


@pytest.mark.parametrize("name", DRIVER_CASES)
def test_second_call_with_same_shapes_does_not_recompile(name):
    cell = CELL_CASES[name]
    params, xs = _data(cell, key=3)
    f = jax.jit(lambda p, x, n: rj.scan(cell, p, x, lengths=n)[0].sum())
    f(params, xs, jnp.asarray(LENGTHS))
    f(jax.tree.map(lambda a: a + 1, params), xs * 2, jnp.asarray([1, 2, 3]))
    assert f._cache_size() == 1
    # Eager calls hit the driver's own compiled cache too.
    rj.scan(cell, params, xs)
    before = compiled_count()
    rj.scan(cell, params, xs * 3)
    assert compiled_count() == before


@pytest.mark.parametrize("name", DRIVER_CASES)
def test_any_leading_batch_shape(name):
    cell = CELL_CASES[name]
    params, xs = _data(cell, key=4, batch=(2, 3), steps=2)
    ys, carry = rj.scan(cell, params, xs)
    flat_ys, flat_carry = rj.scan(cell, params, xs.reshape((6,) + xs.shape[2:]))
    assert_trees_close(ys.reshape(flat_ys.shape), flat_ys, atol=1e-6, rtol=1e-5)
    assert_trees_close(jax.tree.map(lambda c: c.reshape((6,) + c.shape[2:]), carry), flat_carry, atol=1e-6, rtol=1e-5)
    single_ys, _ = rj.scan(cell, params, xs[1, 2])
    assert_trees_close(single_ys, ys[1, 2], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", DRIVER_CASES)
def test_bfloat16_inputs_with_float32_params_stay_finite(name):
    cell = CELL_CASES[name]
    params, xs = _data(cell, key=5)
    ys, carry = rj.scan(cell, params, xs.astype(jnp.bfloat16), lengths=jnp.asarray(LENGTHS))
    ref, _ = rj.scan(cell, params, xs, lengths=jnp.asarray(LENGTHS))
    assert ys.dtype == ref.dtype
    assert all(bool(jnp.isfinite(leaf).all()) for leaf in jax.tree.leaves((ys, carry)))
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ref), atol=0.1)


@pytest.mark.parametrize("name", DRIVER_CASES)
def test_float64_with_x64(name):
    cell = CELL_CASES[name]
    with enable_x64(True):
        params, xs = _data(cell, key=6, dtype=jnp.float64, steps=3)
        ys, carry = rj.scan(cell, params, xs)
        assert ys.dtype == jnp.float64
        assert all(jnp.finfo(leaf.dtype).bits == 64 for leaf in jax.tree.leaves(carry))


@pytest.mark.parametrize("name", CASES)
def test_hashable_frozen_config(name):
    cell = CELL_CASES[name]
    assert hash(cell) == hash(type(cell)(**{f: getattr(cell, f) for f in cell.__dataclass_fields__}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cell.hidden_size = 1


@pytest.mark.parametrize("name", CASES)
def test_mismatched_params_and_inputs_raise(name):
    cell = CELL_CASES[name]
    params, xs = _data(cell, key=7, steps=2)
    wrong_features = jnp.ones(xs.shape[:-1] + (INPUT_SIZE + 1,))
    with pytest.raises(ValueError, match=rf"expected \(\.\.\., T, .*{INPUT_SIZE}\)"):
        rj.scan(cell, params, wrong_features)
    with pytest.raises(TypeError, match="floating"):
        rj.scan(cell, params, xs.astype(jnp.int32))
    other = rj.Elman(3) if not isinstance(cell, rj.Elman) else rj.GRU(3)
    with pytest.raises((TypeError, ValueError), match="params"):
        rj.scan(cell, other.init(jax.random.key(0), INPUT_SIZE), xs)
    # Same type, wrong shapes: params of a bigger cell of the same kind.
    bad = type(params)(*[None if p is None else jnp.concatenate([p, p], axis=-1) for p in params])
    with pytest.raises((ValueError, TypeError)):
        rj.scan(cell, bad, xs)
