"""Property-based tests (hypothesis) of rj.scan's lengths, reverse and resets.

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
from tests.cases import normal
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
