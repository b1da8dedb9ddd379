"""Property-based tests (hypothesis) of rj.scan's lengths, reverse and resets, and every method's
agreement with the sequential one on an empty batch, one step and second derivatives.

Shapes are drawn from a small set so that every compiled function is reused across examples.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import rnnjax as rj
from tests.cases import normal, random_case
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

BATCH, STEPS, FEATURES = 3, 6, 2
CELLS = {"gru": rj.GRU(4), "lstm": rj.LSTM(4, proj_size=3)}


@functools.cache
def params_of(name):
    """The params of CELLS[name] (built on first use, not when the module is collected)."""
    return CELLS[name].init(jax.random.key(0), FEATURES)


XS = np.asarray(normal(1, (BATCH, STEPS, FEATURES)))
F32 = dict(atol=1e-6, rtol=1e-6)  # float32 rounding

PROPERTY = settings(max_examples=50)  # deadline, derandomize: the profile in tests/conftest.py
cell_names = st.sampled_from(sorted(CELLS))
lengths_st = hnp.arrays(np.int32, (BATCH,), elements=st.integers(0, STEPS))
padding_values = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@functools.lru_cache(maxsize=None)
def run(name, reverse):
    cell, params = CELLS[name], params_of(name)  # built here, not while the lambda is traced
    return jax.jit(lambda xs, n, r: rj.scan(cell, params, xs, lengths=n, resets=r, reverse=reverse))


def no_resets(steps):
    return jnp.zeros((BATCH, steps), bool)


@st.composite
def padded(draw):
    extra = draw(st.integers(0, 3))
    pad = draw(hnp.arrays(np.float32, (BATCH, extra, FEATURES), elements=padding_values))
    return np.concatenate([XS, pad], axis=1)


@PROPERTY
@given(name=cell_names, lengths=lengths_st, xs_padded=padded(), reverse=st.booleans())
def test_padding_past_lengths_changes_nothing(name, lengths, xs_padded, reverse):
    # Garbage in the padded part of the original sequence, too.
    garbage = np.where(np.arange(STEPS)[None, :, None] < lengths[:, None, None], XS, 1e3)
    ys, carry = run(name, reverse)(garbage, lengths, no_resets(STEPS))
    xs_padded = xs_padded.copy()
    xs_padded[:, :STEPS] = garbage
    ys_padded, carry_padded = run(name, reverse)(xs_padded, lengths, no_resets(xs_padded.shape[1]))
    assert_trees_close(ys_padded[:, :STEPS], ys, **F32)
    assert_trees_close(carry_padded, carry, **F32)
    # Outputs past a length are exactly zero.
    past = np.arange(xs_padded.shape[1])[None, :] >= lengths[:, None]
    assert not np.any(np.asarray(ys_padded)[past])


@PROPERTY
@given(name=cell_names, lengths=lengths_st, reverse=st.booleans())
def test_each_sequence_equals_its_unpadded_self(name, lengths, reverse):
    ys, carry = run(name, reverse)(XS, lengths, no_resets(STEPS))
    cell, params = CELLS[name], params_of(name)
    for b, n in enumerate(lengths):
        if n == 0:
            assert_trees_close(jax.tree.map(lambda c: c[b], carry), cell.init_carry(), **F32)
            continue
        ref_ys, ref_carry = rj.scan(cell, params, XS[b, :n], reverse=reverse)
        assert_trees_close(ys[b, :n], ref_ys, **F32)
        assert_trees_close(jax.tree.map(lambda c: c[b], carry), ref_carry, **F32)


@PROPERTY
@given(name=cell_names, k=st.integers(0, STEPS - 1), lengths=lengths_st)
def test_reset_at_k_equals_a_fresh_sequence_from_k(name, k, lengths):
    resets = np.zeros((BATCH, STEPS), bool)
    resets[:, k] = True
    ys, carry = run(name, False)(XS, lengths, resets)
    cell, params = CELLS[name], params_of(name)
    for b, n in enumerate(lengths):
        if n <= k:  # the reset lies in padding: as if there were none
            ref_ys, ref_carry = rj.scan(cell, params, XS[b, :n]) if n else (ys[b, :0], cell.init_carry())
            assert_trees_close(jax.tree.map(lambda c: c[b], carry), ref_carry, **F32)
            continue
        fresh_ys, fresh_carry = rj.scan(cell, params, XS[b, k:n])
        assert_trees_close(ys[b, k:n], fresh_ys, **F32)
        assert_trees_close(jax.tree.map(lambda c: c[b], carry), fresh_carry, **F32)
        if k:
            assert_trees_close(ys[b, :k], rj.scan(cell, params, XS[b, :k])[0], **F32)


# ---- the padding contract: what lies past a length never reaches a cell ----------------------

# (cell, method, reverse): reverse alternates between cases to compile each case once.
PADDING_CASES = {
    "lstm-sequential-reverse": (rj.LSTM(4, proj_size=3), rj.Sequential(), True),
    "elman-fused": (rj.Elman(4), rj.Sequential(gradient="fused"), False),
    "gru-remat-reverse": (rj.GRU(4), rj.Sequential(remat="step"), True),
    "gru-newton": (rj.GRU(4), rj.Newton("quasi-deer"), False),
    "mingru-associative-reverse": (rj.MinGRU(4), rj.Associative(), True),
    "lru-chunked": (rj.LRU(4), rj.Chunked(2), False),
    "minlstm-sequential-reverse": (rj.MinLSTM(4), rj.Sequential(), True),
    "indrnn-mixed": (rj.Mixed(rj.IndRNN(4), jnp.float16), rj.Sequential(), False),
}
bad_values = st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -3e38])


@functools.lru_cache(maxsize=None)
def values_and_grads(case):
    """Jitted ``xs, carry, lengths, resets -> (ys, final carry, d/d(params, xs, carry))`` of a
    fixed random projection of the outputs and final carry."""
    cell, method, reverse = PADDING_CASES[case]
    params = cell.init(jax.random.key(0), FEATURES)

    def loss(params, xs, carry, lengths, resets):
        ys, final = rj.scan(cell, params, xs, carry, lengths=lengths, resets=resets, reverse=reverse, method=method)
        weights = normal(2, ys.shape)
        total = jnp.sum(ys.astype(jnp.float32) * weights)
        total += sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(final))
        return total, (ys, final)

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda *args: grad(params, *args)), cell


@pytest.mark.parametrize("case", sorted(PADDING_CASES))
@settings(max_examples=8)
@given(lengths=lengths_st, bad=bad_values, resets=hnp.arrays(np.bool_, (BATCH, STEPS), elements=st.booleans()))
def test_padding_reaches_neither_values_nor_gradients(case, lengths, bad, resets):
    fn, cell = values_and_grads(case)
    carry = jax.tree.map(lambda c: c + 0.5, cell.init_carry((BATCH,)))
    past = np.arange(STEPS)[None, :, None] >= lengths[:, None, None]
    clean = np.where(past, 0.0, XS).astype(np.float32)
    dirty = np.where(past, np.float32(bad), XS).astype(np.float32)
    want = fn(clean, carry, lengths, resets)
    got = fn(dirty, carry, lengths, resets)
    # Bit for bit: the padding is replaced before the cell sees it, so both runs compute the
    # same program on the same numbers.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(got))
    (d_params, d_xs, d_carry), _ = got
    assert not np.asarray(d_xs)[np.broadcast_to(past, d_xs.shape)].any()  # padding gets no gradient


# ---- every method: batch 0, T = 1 and second derivatives, against rj.Sequential() ----------

# Each method with a cell it runs (rj.Kernel() interpreted, as on CPU; more in tests/test_kernel.py). A case
# compiles once per shape, 2-10 s each for Newton's (ELK's the most): the fast set runs the
# default rj.Newton(), make test-all the other variants. Elman and LSTM are dense cells, whose
# quasi-Newton Jacobians are unit diagonals (jax.hessian through them was 53% and 2.6% off).
METHOD_CASES = {
    "sequential": (rj.Elman(4), rj.Sequential()),  # the fused gradient
    "associative": (rj.MinGRU(4), rj.Associative()),
    "chunked": (rj.MinGRU(4), rj.Chunked(2)),
    "auto": (rj.MinGRU(4), rj.Auto()),
    "deer": (rj.Elman(4), rj.Newton("deer")),
    "quasi-deer": (rj.Elman(4), rj.Newton("quasi-deer")),
    "elk": (rj.Elman(4), rj.Newton("elk")),
    "quasi-elk": (rj.LSTM(4), rj.Newton("quasi-elk")),
    "kernel": (rj.LSTM(4), rj.Kernel(interpret=True)),
}
SLOW_CASES = {"deer", "elk", "quasi-elk", "kernel"}
SLOW_SECOND_ORDER = SLOW_CASES | {"associative"}  # chunked runs the same engine in the fast set


def method_cases(slow):
    return [pytest.param(case, marks=[pytest.mark.slow] if case in slow else []) for case in sorted(METHOD_CASES)]


REFERENCE = rj.Sequential(gradient="autodiff")  # JAX's own derivatives of the loop, to any order
F64 = dict(atol=1e-8, rtol=1e-8)  # float64: Newton stops at a residual of 1e-10, the rest is rounding
NEWTON_F32 = dict(atol=1e-5, rtol=1e-5, check_dtypes=True)  # float32: Newton stops at a residual of 1e-5


@functools.cache
def values_and_gradients(cell, method):
    """Jitted ``params, xs, carry, lengths, resets -> ((ys, final carry), d/d(params, xs, carry))``
    of a scalar loss of the outputs and the final carry."""

    def loss(params, xs, carry, lengths, resets):
        ys, final = rj.scan(cell, params, xs, carry, lengths=lengths, resets=resets, method=method)
        total = jnp.sum(jnp.sin(ys)) + sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(final))
        return total, (ys, final)

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda *args: grad(*args)[::-1])


def method_case(case, batch, steps, key=3):
    cell, method = METHOD_CASES[case]
    return cell, method, random_case(cell, steps, key, batch=(batch,))


@pytest.mark.parametrize("case", method_cases(SLOW_CASES))
def test_an_empty_batch_gives_what_the_sequential_method_gives(case):
    cell, method, (params, xs, carry) = method_case(case, 0, STEPS)
    lengths, resets = jnp.zeros((0,), jnp.int32), jnp.zeros((0, STEPS), bool)
    got = values_and_gradients(cell, method)(params, xs, carry, lengths, resets)
    want = values_and_gradients(cell, rj.Sequential())(params, xs, carry, lengths, resets)
    assert_trees_close(got, want, atol=0, rtol=0, check_dtypes=True)  # empty arrays, zero gradients


@pytest.mark.parametrize("case", method_cases(SLOW_CASES))
@settings(max_examples=4)
@given(lengths=hnp.arrays(np.int32, (BATCH,), elements=st.integers(0, 1)),
       resets=hnp.arrays(np.bool_, (BATCH, 1), elements=st.booleans()))
def test_one_step_gives_what_the_sequential_method_gives(case, lengths, resets):
    cell, method, (params, xs, carry) = method_case(case, BATCH, 1)
    got = values_and_gradients(cell, method)(params, xs, carry, lengths, resets)
    want = values_and_gradients(cell, rj.Sequential())(params, xs, carry, lengths, resets)
    assert_trees_close(got, want, **NEWTON_F32)


@functools.cache
def hessian_times(cell, method):
    """Jitted ``params, xs, carry, direction -> H direction``: the Hessian of a scalar loss of a
    reversed scan with lengths and resets, in the parameters, times a direction (forward mode
    over reverse mode)."""
    lengths = jnp.array([STEPS, 2, 0])
    resets = jnp.zeros((BATCH, STEPS), bool).at[0, 3].set(True)

    def loss(params, xs, carry):
        ys, final = rj.scan(cell, params, xs, carry, lengths=lengths, resets=resets, reverse=True, method=method)
        weights = jnp.linspace(-1.0, 1.0, ys.size, dtype=ys.dtype).reshape(ys.shape)
        return jnp.sum(jnp.sin(ys) * weights) + sum(jnp.sum(x**2) for x in jax.tree.leaves(final))

    def product(params, xs, carry, direction):
        return jax.jvp(lambda p: jax.grad(loss)(p, xs, carry), (params,), (direction,))[1]

    return jax.jit(product)


@pytest.mark.parametrize("case", method_cases(SLOW_SECOND_ORDER))
def test_second_derivatives_equal_the_sequential_methods(case):
    cell, method = METHOD_CASES[case]
    with enable_x64(True):
        params, xs, carry = random_case(cell, STEPS, 4, jnp.float64, (BATCH,))
        direction = jax.tree.map(lambda p: normal(5, p.shape, p.dtype), params)
        got = hessian_times(cell, method)(params, xs, carry, direction)
        want = hessian_times(cell, REFERENCE)(params, xs, carry, direction)
    assert max(np.abs(np.asarray(leaf)).max() for leaf in jax.tree.leaves(want)) > 1e-2
    assert_trees_close(got, want, **F64, check_dtypes=True)
