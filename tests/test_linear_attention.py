"""Properties of rj.linear_attention.gla (no gate, one decay per head, one per key) and
rj.linear_attention.mlstm: the chunkwise form (rj.Chunked(), the default) against the step
recurrence (rj.Sequential()) in values and gradients, vmap, gradient checks, padding, extreme
gates, decoding from a prefilled state, bad input, and packed documents.

Every comparison of the two methods uses the same few shapes, so each (op, method, case)
compiles once; parity with fla and mlstm_kernels is tests/test_linear_attention_parity.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
import rnnjax.linear_attention  # noqa: F401  (rj.linear_attention)
from tests.compat import enable_x64

LA = rj.linear_attention
OPS = ("none", "head", "key", "mlstm")  # gla's three gate kinds, and the mLSTM
H, DK, DV = 2, 4, 3
# The fast set runs the per-key decays (the most intricate chunkwise path: secondary chunks);
# the slow set adds no gate, per-head decays and the mLSTM (each op compiles its own programs,
# ~2-6 s apiece here; the mLSTM's chunked default meets xLSTM's numbers in the fast parity file).
FAST_OPS = ("key",)
SOME_OPS = [op if op in FAST_OPS else pytest.param(op, marks=pytest.mark.slow) for op in OPS]

# float64: unit roundoff 1.1e-16; both methods sum the same few hundred products in another
# order, so they agree to ~1e-14 of the largest value; 1e-10 is far above that and far below
# any difference in the recurrence itself.
RTOL64 = 1e-10
# float32: unit roundoff 6e-8. An output is a decayed sum of at most T * d_k = 52 products
# (T = 13), a gradient a few such sums chained, so the methods' orders of summation differ by
# ~n * 6e-8 ~ 3e-6 of the magnitudes summed; the mLSTM divides by max(|n^T q|, e^-m), which
# can amplify that a few times. 3e-5 of the largest magnitude states that.
RTOL32 = 3e-5


def assert_close(got, want, rtol):
    """Every leaf of ``got`` within ``rtol`` of the largest magnitude among ``want``'s leaves.
    Rounding errors scale with the terms summed, which the group's largest entry bounds; a leaf
    that is small by cancellation (the mLSTM stabiliser's gradient, a saturated gate's) carries
    an absolute error at that scale, not at its own."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    scale = max(float(np.max(np.abs(w), initial=0.0)) for w in want)
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.shape == w.shape and g.dtype == w.dtype, (i, g.shape, w.shape, g.dtype, w.dtype)
        assert np.isfinite(g).all(), f"leaf {i} is not finite"
        err = float(np.max(np.abs(g - w), initial=0.0))
        assert err <= rtol * scale, f"leaf {i}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def inputs(op, batch, steps, dtype=jnp.float32, seed=0):
    """``(q, k, v, *gates, *state)`` for ``op``: random, with decays in (0, 1) and a nonzero state."""
    ks = jax.random.split(jax.random.key(seed), 8)
    normal = lambda i, shape: jax.random.normal(ks[i], shape, dtype)
    q, k, v = normal(0, (*batch, steps, H, DK)), normal(1, (*batch, steps, H, DK)), normal(2, (*batch, steps, H, DV))
    S = normal(3, (*batch, H, DK, DV))
    if op == "mlstm":
        gates = (2 * normal(4, (*batch, steps, H)), 2 + 2 * normal(5, (*batch, steps, H)))
        return (q, k, v, *gates, S, normal(6, (*batch, H, DK)), normal(7, (*batch, H)))
    shape = {"none": None, "head": (*batch, steps, H), "key": (*batch, steps, H, DK)}[op]
    gates = () if shape is None else (jax.nn.log_sigmoid(2 + normal(4, shape)),)
    return (q, k, v, *gates, S)


def call(op, args, **kwargs):
    """``(o, final_state)`` of ``op`` on ``inputs(op, ...)``; an mLSTM state as a plain tuple."""
    if op == "mlstm":
        q, k, v, i, f, C, n, m = args
        h, final = LA.mlstm(q, k, v, i, f, state=LA.MLSTMState(C, n, m), **kwargs)
        return h, tuple(final)
    q, k, v, *gate, S = args
    return LA.gla(q, k, v, gate[0] if gate else None, state=S, **kwargs)


def cotangent(a):
    """A fixed, nonconstant cotangent of ``a``'s shape."""
    return jnp.cos(0.7 * jnp.arange(a.size, dtype=a.dtype) + 0.3).reshape(a.shape)


@functools.partial(jax.jit, static_argnames=("op", "method", "reverse"))
def values_and_grads(op, args, lengths, resets, method, reverse=False):
    """``((o, final), d/d args)``, the gradient of a fixed projection of ``o`` and the final state."""
    out, vjp = jax.vjp(lambda a: call(op, a, lengths=lengths, resets=resets, reverse=reverse, method=method), args)
    return out, vjp(jax.tree.map(cotangent, out))[0]


@functools.partial(jax.jit, static_argnames=("op", "method"))
def forward(op, args, lengths=None, resets=None, method=None):
    return call(op, args, lengths=lengths, resets=resets, method=method)


# ---- rj.Chunked() equals rj.Sequential(): values, final state, gradients --------------------

# name: (batch shape, T, chunk size, lengths, reset steps, reverse). Chunks of 4 leave a partial
# last chunk (13 = 3 * 4 + 1); chunks of 24 hold two secondary chunks of per-key decays (12
# steps each) and a partial second chunk (37 = 24 + 13); None is the default size (64 > T).
# "batch23" is the fast set's case: reverse runs the same chunkwise code on flipped sequences,
# so it covers the forward direction too; the slow set adds the rest.
LENGTHS_23 = np.array([[13, 0, 5], [9, 13, 1]])
CASES = {
    "batch23": ((2, 3), 13, 4, LENGTHS_23, (3, 6, 7), True),
    "batch23-forward": ((2, 3), 13, 4, LENGTHS_23, (3, 6, 7), False),
    "unbatched": ((), 37, 24, np.array(30), (5, 24, 29), True),
    "default-size": ((2,), 13, None, None, None, False),
}
SLOW_CASES = ("batch23-forward", "unbatched", "default-size")


def case_args(op, case, dtype=jnp.float32, seed=0):
    batch, steps, size, lengths, reset_steps, reverse = CASES[case]
    resets = None
    if reset_steps is not None:
        # A different reset pattern per sequence: every other sequence also resets at step 0.
        resets = np.zeros((*batch, steps), bool)
        resets[..., list(reset_steps)] = True
        resets.reshape(-1, steps)[::2, 0] = True
    return inputs(op, batch, steps, dtype, seed), lengths, resets, rj.Chunked(size), reverse


def reference(op, case, args):
    """rj.Sequential()'s values and gradients in float64 on ``args`` (upcast)."""
    with enable_x64(True):
        _, lengths, resets, _, reverse = case_args(op, case)
        args = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), args)
        out, grads = values_and_grads(op, args, lengths, resets, rj.Sequential(), reverse)
        return jax.tree.map(np.asarray, (out, grads))


def check_float64(op, case):
    with enable_x64(True):
        args, lengths, resets, chunked, reverse = case_args(op, case, jnp.float64)
        got_out, got_grads = values_and_grads(op, args, lengths, resets, chunked, reverse)
        want_out, want_grads = reference(op, case, args)
        assert_close(got_out, want_out, RTOL64)
        assert_close(got_grads, want_grads, RTOL64)


def check_float32(op, args, case="batch23"):
    """rj.Chunked() in float32 against rj.Sequential() in float64 on the same numbers."""
    _, lengths, resets, chunked, reverse = case_args(op, case)
    got_out, got_grads = values_and_grads(op, args, lengths, resets, chunked, reverse)
    want_out, want_grads = reference(op, case, args)
    up = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    assert_close(up(got_out), want_out, RTOL32)
    assert_close(up(got_grads), want_grads, RTOL32)
    return got_out, got_grads


@pytest.mark.parametrize("op", SOME_OPS)
def test_chunked_equals_sequential_float64(op):
    check_float64(op, "batch23")


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
@pytest.mark.parametrize("op", OPS)
def test_chunked_equals_sequential_float64_more_cases(op, case):
    check_float64(op, case)


@pytest.mark.slow  # the float64 comparison is the sharp one; this one states float32's bound
@pytest.mark.parametrize("op", OPS)
def test_chunked_equals_sequential_float32(op):
    check_float32(op, case_args(op, "batch23")[0])


# ---- extreme gates: finite, and still the step recurrence's numbers ------------------------


def extreme(op, which):
    """``case_args(op, "batch23")``'s inputs with saturated gates at a third of the steps each."""
    args = list(case_args(op, "batch23")[0])
    steps = np.arange(13)
    lo, hi = steps % 3 == 0, steps % 3 == 1
    at = lambda a, mask, value: jnp.where(mask.reshape((13,) + (1,) * (a.ndim - 3)), jnp.asarray(value, a.dtype), a)
    if op == "mlstm":
        i, f = 3, 4
        if which == "input":
            args[i] = at(at(args[i], lo, -30.0), hi, 30.0)
        else:  # forget gate saturated open (decay 1 - 1e-13) and shut (decay 1e-13)
            args[f] = at(at(args[f], lo, -30.0), hi, 30.0)
    else:  # decay exactly 0 (log decay -inf), decay 1e-4343 (-1e4) and exactly 1 (0)
        g = at(args[3], lo, -jnp.inf if which == "zero" else -1e4)
        args[3] = at(g, hi, 0.0)
    return tuple(args)


EXTREMES = [
    *(pytest.param("head", which, marks=pytest.mark.slow) for which in ("zero", "tiny")),
    *(("key", which) for which in ("zero", "tiny")),
    ("mlstm", "input"),
    pytest.param("mlstm", "forget", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("op", "which"), EXTREMES)
def test_extreme_gates(op, which):
    check_float32(op, extreme(op, which))  # asserts finiteness too


# ---- padding: what lies past a length reaches neither outputs nor gradients -----------------


@pytest.mark.parametrize("op", SOME_OPS)
def test_padding_reaches_neither_values_nor_gradients(op):
    args, lengths, resets, chunked, reverse = case_args(op, "batch23")
    past = np.arange(13) >= lengths[..., None]  # (2, 3, 13)
    n_steps = 3 + (op != "none") + (op == "mlstm")  # q, k, v and the gates have a time axis
    bad = (np.nan, np.inf, -np.inf, np.nan, 1e30)

    def fill(values):
        return tuple(
            jnp.where(past.reshape(past.shape + (1,) * (a.ndim - 3)), jnp.asarray(x, a.dtype), a) if j < n_steps else a
            for j, (a, x) in enumerate(zip(args, values + (0.0,) * len(args)))
        )

    want = values_and_grads(op, fill((0.0,) * 5), lengths, resets, chunked, reverse)
    got = values_and_grads(op, fill(bad), lengths, resets, chunked, reverse)
    # Bit for bit: the padding is replaced before the recurrence sees it.
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.isfinite(np.asarray(a)).all()
    for d in got[1][:n_steps]:  # padding gets no gradient
        assert not np.asarray(d)[np.broadcast_to(past.reshape(past.shape + (1,) * (d.ndim - 3)), d.shape)].any()


# ---- vmap, packed documents, decoding (forward only; one compiled shape per op) ------------

LENGTHS_2 = np.array([13, 13])
NO_RESETS = np.zeros((2, 13), bool)


@functools.partial(jax.jit, static_argnames="op")
def vmapped(op, args, lengths, resets):
    return jax.vmap(lambda a, n, r: call(op, a, lengths=n, resets=r))(args, lengths, resets)


@pytest.mark.parametrize("op", [pytest.param(op, marks=pytest.mark.slow) if op != "key" else op for op in OPS])
def test_vmap_of_unbatched_equals_batched(op):
    args = inputs(op, (2,), 13)
    lengths, resets = np.array([13, 8]), np.zeros((2, 13), bool)
    resets[0, 4] = resets[1, 9] = True
    want = forward(op, args, lengths, resets)
    assert_close(vmapped(op, args, lengths, resets), want, RTOL32)


@pytest.mark.parametrize("op", SOME_OPS)
def test_reset_equals_separate_calls(op):
    """Two documents packed in one row, a reset at the boundary, equal two separate calls, the
    second from a zero state (each on the first steps of a 13-step row, as lengths)."""
    args = inputs(op, (2,), 13)
    cut = 6
    resets = NO_RESETS.copy()
    resets[:, cut] = True
    o, final = forward(op, args, LENGTHS_2, resets)
    n_steps = len(args) - (3 if op == "mlstm" else 1)
    zero_state = tuple(jnp.zeros_like(a) for a in args[n_steps:])
    second = tuple(jnp.roll(a, -cut, axis=1) for a in args[:n_steps]) + zero_state
    o1, final1 = forward(op, args, LENGTHS_2 * 0 + cut, NO_RESETS)
    o2, final2 = forward(op, second, LENGTHS_2 - cut, NO_RESETS)
    assert_close(o[:, :cut], o1[:, :cut], RTOL32)
    assert_close(o[:, cut:], o2[:, : 13 - cut], RTOL32)
    assert_close(final, final2, RTOL32)
    assert not np.asarray(o1[:, cut:]).any() and not np.asarray(o2[:, 13 - cut :]).any()


@pytest.mark.parametrize("op", SOME_OPS)
def test_prefill_then_decode_equals_one_call(op):
    """A chunkwise prefill of the first 9 steps, then one call per step (T = 1) from the state
    each returns, equals one call over all 13 steps."""
    args = inputs(op, (2,), 13)
    n_steps = len(args) - (3 if op == "mlstm" else 1)
    at = lambda start, stop, state: tuple(a[:, start:stop] for a in args[:n_steps]) + tuple(state)
    o, state = forward(op, at(0, 9, args[n_steps:]))
    outs = [o]
    for t in range(9, 13):
        o, state = forward(op, at(t, t + 1, jax.tree.leaves(state)))
        outs.append(o)
    want_o, want_state = forward(op, args, LENGTHS_2, NO_RESETS)
    assert_close(jnp.concatenate(outs, axis=1), want_o, RTOL32)
    assert_close(state, want_state, RTOL32)


# ---- gradient checks in float64: reverse and forward mode through the chunked form ----------


# The fast set checks the mLSTM (~13 s here: check_grads traces jvp and vjp afresh per call).
@pytest.mark.slow  # 4 s each; the float64 comparison of gradients with Sequential runs in the fast set
@pytest.mark.parametrize("op", OPS)
def test_check_grads(op):
    with enable_x64(True):
        args = inputs(op, (2,), 5, jnp.float64, seed=1)
        lengths, resets = np.array([5, 3]), np.array([[False, False, True, False, False], [True] + [False] * 4])
        fn = jax.jit(lambda a: call(op, a, lengths=lengths, resets=resets, method=rj.Chunked(2)))
        check_grads(fn, (args,), order=1, modes=("fwd", "rev"))


# ---- bad input: errors that name the bad shape and the expected one --------------------------

Q, V = jnp.ones((2, 5, 2, 4)), jnp.ones((2, 5, 2, 3))
G = jnp.zeros((2, 5, 2))
BAD = {
    "q-ndim": (
        lambda: LA.gla(Q[0, 0], Q[0, 0], V[0, 0]),
        ValueError,
        r"q has shape \(2, 4\); expected \(\*batch, T, heads, d_k\)",
    ),
    "k-shape": (lambda: LA.gla(Q, Q[:, :4], V), ValueError, r"k has shape \(2, 4, 2, 4\); expected \(2, 5, 2, 4\)"),
    "v-shape": (lambda: LA.gla(Q, Q, V[:, :4]), ValueError, r"v has shape \(2, 4, 2, 3\); expected \(2, 5, 2, \?\)"),
    "k-dtype": (lambda: LA.gla(Q, Q.astype(jnp.int32), V), TypeError, "k has dtype int32; expected a floating dtype"),
    "q-dtype": (lambda: LA.gla(Q.astype(jnp.int32), Q, V), TypeError, "q has dtype int32; expected a floating dtype"),
    "log-decay": (
        lambda: LA.gla(Q, Q, V, jnp.zeros((2, 5, 3))),
        ValueError,
        r"log_decay has shape \(2, 5, 3\); expected .*\(2, 5, 2\) or .*\(2, 5, 2, 4\)",
    ),
    "gla-state": (
        lambda: LA.gla(Q, Q, V, state=jnp.zeros((2, 2, 3, 4))),
        ValueError,
        r"state has shape \(2, 2, 3, 4\); expected \(2, 2, 4, 3\)",
    ),
    "lengths": (
        lambda: LA.gla(Q, Q, V, lengths=jnp.array([1, 2, 3])),
        ValueError,
        r"lengths has shape \(3,\); expected \(2,\)",
    ),
    "resets": (
        lambda: LA.gla(Q, Q, V, resets=jnp.zeros((2, 4), bool)),
        ValueError,
        r"resets has shape \(2, 4\); expected \(2, 5\)",
    ),
    "forget-gate": (
        lambda: LA.mlstm(Q, Q, V, G, G[..., 0]),
        ValueError,
        r"forget_gate has shape \(2, 5\); expected \(2, 5, 2\)",
    ),
    "input-dtype": (
        lambda: LA.mlstm(Q, Q, V, G.astype(jnp.int32), G),
        TypeError,
        "input_gate has dtype int32; expected a floating",
    ),
    "mlstm-state-type": (
        lambda: LA.mlstm(Q, Q, V, G, G, state=jnp.zeros((2, 2, 4, 3))),
        TypeError,
        "state must be an MLSTMState",
    ),
    "mlstm-state-n": (
        lambda: LA.mlstm(Q, Q, V, G, G, state=LA.MLSTMState(jnp.zeros((2, 2, 4, 3)), jnp.zeros((2, 2, 3)), G[:, 0])),
        ValueError,
        r"state.n has shape \(2, 2, 3\); expected \(2, 2, 4\)",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    fn, error, match = BAD[case]
    with pytest.raises(error, match=match):
        fn()


@pytest.mark.parametrize("method", [rj.Associative(), rj.Newton()], ids=repr)
@pytest.mark.parametrize("op", ["gla", "mlstm"])
def test_methods_that_cannot_run_the_op_name_chunked(op, method):
    run = {"gla": lambda: LA.gla(Q, Q, V, G, method=method), "mlstm": lambda: LA.mlstm(Q, Q, V, G, G, method=method)}
    with pytest.raises(ValueError, match=r"rj\.Chunked\(\)"):
        run[op]()


@pytest.mark.slow
def test_an_empty_batch_and_no_steps_give_empty_outputs_and_the_initial_state():
    """Batch 0 and T = 0 through the ops and the cells (a reshape to -1 of a zero-size array
    raised ZeroDivisionError before): outputs empty, the state the initial one, gradients too."""
    la = rj.linear_attention
    for batch, steps in ((0, 5), (2, 0)):
        q, v = jnp.ones((batch, steps, 2, 4)), jnp.ones((batch, steps, 2, 3))
        for g in (None, jnp.zeros((batch, steps, 2)), jnp.zeros((batch, steps, 2, 4))):
            o, S = la.gla(q, q, v, g, state=jnp.full((batch, 2, 4, 3), 0.5))
            assert o.shape == (batch, steps, 2, 3) and S.shape == (batch, 2, 4, 3) and bool((S == 0.5).all())
        h, state = la.mlstm(q, q, v, jnp.zeros((batch, steps, 2)), jnp.zeros((batch, steps, 2)))
        assert h.shape == (batch, steps, 2, 3) and state.m.shape == (batch, 2)
    for cell in (rj.Mamba2(heads=2, head_size=4, state_size=4),):  # the convolution's windows too
        params = cell.init(jax.random.key(0), 8)
        for shape in ((0, 7, 8), (3, 0, 8)):
            ys, _ = rj.scan(cell, params, jnp.ones(shape))
            grad = jax.grad(lambda x, cell=cell, params=params: jnp.sum(rj.scan(cell, params, x)[0]))(jnp.ones(shape))
            assert ys.shape == shape and grad.shape == shape


def test_the_chunk_size_table_tells_per_key_decays_apart(monkeypatch):
    """rj.GLA and the per-key op read the "gla_key" row, Mamba2 and the per-head op "gla"."""
    from rnnjax import tuning
    from rnnjax.linear_attention.ops import GatedOuterProduct, MLSTMOp

    monkeypatch.setitem(tuning.MATRIX_CHUNK, "cpu", {"gla": 16, "gla_key": 32, "mlstm": 8})
    cells = {rj.GLA(2, 4, 4): 32, GatedOuterProduct(2, 4, 4, "key", 1.0): 32, rj.Mamba2(2, 4, 4): 16,
             GatedOuterProduct(2, 4, 4, "head", 1.0): 16, MLSTMOp(2, 4, 4, 1.0): 8, rj.MLSTM(2, 4, 4): 8}
    assert {cell: tuning.matrix_chunk_size(cell, "cpu") for cell in cells} == cells


@pytest.mark.parametrize("chunks", [1, 6])
def test_chunk_states_by_one_product_equal_the_loop(monkeypatch, chunks):
    """The per-head chunk states as one product (rnnjax.engines.chunkwise.chunk_states) equal the
    loop over chunks in float64, values and gradients, with resets (keep false), a decay of
    exactly 1 and one far below float64's range, and an initial state."""
    from rnnjax.engines import chunkwise

    rng = np.random.default_rng(0)
    with enable_x64(True):
        log_decay = -rng.exponential(1.0, (2, 3, chunks))
        log_decay[0, 0, 0], log_decay[1, 2, -1] = 0.0, 104.0 * -64
        keep = jnp.asarray(rng.random((2, 3, chunks)) > 0.3)
        local, state = rng.standard_normal((2, 3, chunks, 4, 5)), rng.standard_normal((2, 3, 4, 5))
        args = tuple(map(jnp.asarray, (log_decay, local, state)))

        def run(product):
            monkeypatch.setattr(chunkwise, "STATE_PRODUCT_CHUNKS", chunks if product else 0)
            f = lambda a, L, S: chunkwise.chunk_states(a, keep, L, S)
            out, vjp = jax.vjp(f, *args)
            return out, vjp(jax.tree.map(cotangent, out))

        assert_close(run(True), run(False), RTOL64)


@pytest.mark.parametrize("apply", [jnp.multiply, jnp.matmul], ids=["decay", "matrix"])
def test_affine_scan_derivatives_equal_the_loops(apply):
    """rnnjax.engines.chunkwise.affine_scan (its derivative a second pass of the recurrence,
    reading the forward's states) equals autodiff of the plain loop in float64: values,
    reverse mode, forward mode, and second order (check_grads)."""
    from rnnjax.engines.chunkwise import affine_loop, affine_scan

    loop = functools.partial(affine_loop, apply)
    rng = np.random.default_rng(1)
    with enable_x64(True):
        shape_A = (5, 2, 3, 1) if apply is jnp.multiply else (5, 2, 3, 3)
        args = tuple(jnp.asarray(a) for a in (rng.uniform(0.2, 1.0, shape_A), rng.standard_normal((5, 2, 3, 4)),
                                              rng.standard_normal((2, 3, 4))))
        ours = functools.partial(affine_scan, apply)
        out, vjp = jax.vjp(ours, *args)
        ref_out, ref_vjp = jax.vjp(loop, *args)
        cts = jax.tree.map(cotangent, out)
        tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)
        assert_close(out, ref_out, RTOL64)
        assert_close(vjp(cts), ref_vjp(cts), RTOL64)
        assert_close(jax.jvp(ours, args, tangents), jax.jvp(loop, args, tangents), RTOL64)
        check_grads(ours, args, order=2, modes=("fwd", "rev"))


def test_per_key_decays_up_to_the_span_bound_take_one_product():
    """Decays strong enough that every chunk's per-key span lies in (60, SEPARABLE_SPAN]: the
    in-chunk scores are the one separable product (its factors reach e^{+-55}; causal pairs'
    products stay <= 1, masked pairs overflow and are selected away), and match the step
    recurrence in float64 to float32 rounding, values and gradients."""
    from rnnjax.engines.chunkwise import LOG_DECAY_FLOOR, SEPARABLE_SPAN

    args, _, _, chunked, _ = case_args("key", "batch23")
    g = -jax.random.uniform(jax.random.key(7), args[3].shape, minval=22.0, maxval=38.0)
    args = (*args[:3], g, *args[4:])
    size, steps = chunked.size, g.shape[-3]
    b = np.cumsum(np.maximum(np.asarray(g), LOG_DECAY_FLOOR)[..., : steps - steps % size, :, :]
                  .reshape(*g.shape[:-3], -1, size, *g.shape[-2:]), axis=-3)
    spans = b[..., 0, :, :] - b[..., -1, :, :]
    assert 60 < spans.min() and spans.max() <= SEPARABLE_SPAN
    check_float32("key", args)
