"""Properties of rj.linear_attention.delta_rule (no gate, one decay per head, one per key) and
rj.linear_attention.rwkv7: the chunkwise WY/UT form (rj.Chunked(), the default;
rnnjax/engines/chunkwise_delta.py) against the step recurrence (rj.Sequential()) in values and
gradients, vmap, forward mode, gradient checks, padding, extreme gates, decoding from a
prefilled state, packed documents and bad input. The helpers shared with gla and the mLSTM come
from tests/test_linear_attention.py; parity with fla is tests/test_linear_attention_delta_parity.py.

Every comparison runs in float64 on a few shapes, so each (op, method, shape) compiles once and
the extreme-gate and padding tests reuse the programs of the comparison."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
import rnnjax.linear_attention  # noqa: F401  (rj.linear_attention)
from rnnjax.engines import chunkwise_delta
from tests.compat import enable_x64
from tests.test_linear_attention import DK, DV, RTOL64, H, assert_close, cotangent

LA = rj.linear_attention
OPS = ("delta_none", "delta_head", "delta_key", "rwkv7")  # delta_rule's three gate kinds, and rwkv7
# The fast set runs the per-key delta rule (KDA: the per-key scores of the inverse) and rwkv7;
# the slow set adds no gate and per-head decays (each op compiles its own programs, ~3-8 s here).
FAST_OPS = ("rwkv7",)  # the per-key delta rule (KDA) is checked fast against fla in the parity file
SOME_OPS = [op if op in FAST_OPS else pytest.param(op, marks=pytest.mark.slow) for op in OPS]

# RTOL64 = 1e-10 of the largest magnitude (tests/test_linear_attention.py) holds here too: the
# keys are unit vectors and beta lies in (0, 2), so each transition I - beta k k^T (times a decay
# <= 1) has norm <= 1 and neither method amplifies its rounding; RWKV-7's diag(e^w) - kk (kk a)^T
# with unit kk and a in (0, 1) likewise stays bounded over these few steps. Both methods then sum
# the same products in another order (the chunked one through T = (I + A)^-1, whose rows are
# those contractions' partial products), to ~T * d_k * 1.1e-16 ~ 1e-14 of the largest value: 1e-10
# is far above that and far below any difference in the recurrence (a wrong beta, decay order or
# a missed reset changes the outputs by percents).


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def inputs(op, batch, steps, dtype=jnp.float64, seed=0):
    """``(*per-step tensors, state)`` for ``op``: unit keys, beta in (0, 2), decays in (0, 1),
    RWKV-7's ``a = -kk``, ``b = kk * a_gate``, and a nonzero state."""
    ks = jax.random.split(jax.random.key(seed), 8)
    normal = lambda i, shape: jax.random.normal(ks[i], shape, dtype)
    qk, vs = (*batch, steps, H, DK), (*batch, steps, H, DV)
    q, v, S = normal(0, qk), normal(2, vs), normal(3, (*batch, H, DK, DV))
    if op == "rwkv7":
        kk = unit(normal(4, qk))
        w = jax.nn.log_sigmoid(2 + normal(5, qk))
        return (q, w, normal(1, qk), v, -kk, kk * jax.nn.sigmoid(normal(6, qk)), S)
    beta = 2 * jax.nn.sigmoid(normal(4, (*batch, steps, H)))
    shape = {"delta_none": None, "delta_head": (*batch, steps, H), "delta_key": qk}[op]
    gates = () if shape is None else (jax.nn.log_sigmoid(2 + normal(5, shape)),)
    return (q, unit(normal(1, qk)), v, beta, *gates, S)


def call(op, args, **kwargs):
    """``(o, final_state)`` of ``op`` on ``inputs(op, ...)``; "gla_key": rj.linear_attention.gla
    with per-key decays and scale 1 on ``(r, w, k, v, state)``, what rwkv7 is when ``a = b = 0``."""
    if op == "gla_key":
        r, w, k, v, S = args
        return LA.gla(r, k, v, w, scale=1.0, state=S, **kwargs)
    if op == "rwkv7":
        r, w, k, v, a, b, S = args
        return LA.rwkv7(r, w, k, v, a, b, state=S, **kwargs)
    q, k, v, beta, *gate, S = args
    return LA.delta_rule(q, k, v, beta, gate[0] if gate else None, state=S, **kwargs)


@functools.partial(jax.jit, static_argnames=("op", "method", "reverse"))
def values_and_grads(op, args, lengths, resets, method, reverse=False):
    """``((o, final), d/d args)``, the gradient of a fixed projection of ``o`` and the final state."""
    out, vjp = jax.vjp(lambda a: call(op, a, lengths=lengths, resets=resets, reverse=reverse, method=method), args)
    return out, vjp(jax.tree.map(cotangent, out))[0]


@functools.partial(jax.jit, static_argnames=("op", "method"))
def forward(op, args, lengths=None, resets=None, method=None):
    return call(op, args, lengths=lengths, resets=resets, method=method)


# ---- rj.Chunked() equals rj.Sequential(): values, final state, gradients --------------------

# name: (batch shape, T, chunk size, lengths, reset steps, reverse). Chunks of 16 (the inverse's
# forward substitution alone) leave a partial second chunk (21 = 16 + 5); chunks of 64 merge
# blocks of 16 pairwise, twice, with a partial second chunk (83 = 64 + 19); T = 13 under chunks
# of 64 is one chunk of 13 whose inverse is padded to 16, chunks of 24 pad it to 32; chunks of
# 4 make 10, carried through groups of chunk_group(4) = 8 chunks, the last one padded. Lengths
# run from 0 to T, one ending at the chunk boundary. "batch23" is the fast set's case: reverse
# runs the same chunkwise code on flipped sequences, so it covers the forward direction too.
LENGTHS_23 = np.array([[21, 0, 5], [16, 21, 1]])
CASES = {
    "batch23": ((2, 3), 21, 16, LENGTHS_23, (3, 16, 17), True),
    "batch23-forward": ((2, 3), 21, 16, LENGTHS_23, (3, 16, 17), False),
    "unbatched": ((), 83, 64, np.array(70), (5, 64, 69), True),
    "short": ((2,), 13, 64, None, None, False),
    "chunk24": ((2,), 37, 24, np.array([37, 30]), (24,), True),
    "groups": ((2,), 37, 4, np.array([37, 30]), (5, 20), False),
}
SLOW_CASES = tuple(c for c in CASES if c not in ("batch23", "groups"))


def case_args(op, case, seed=0):
    """``(args, lengths, resets, rj.Chunked(size), reverse)`` of ``case`` in float64."""
    batch, steps, size, lengths, reset_steps, reverse = CASES[case]
    resets = None
    if reset_steps is not None:
        # A different reset pattern per sequence: every other sequence also resets at step 0.
        resets = np.zeros((*batch, steps), bool)
        resets[..., list(reset_steps)] = True
        resets.reshape(-1, steps)[::2, 0] = True
    return inputs(op, batch, steps, jnp.float64, seed), lengths, resets, rj.Chunked(size), reverse


def check_chunked_equals_sequential(op, case, args=None):
    """rj.Chunked() and rj.Sequential() on ``args`` (default: the case's) in float64; returns
    the chunked ``((o, final), grads)``."""
    default, lengths, resets, chunked, reverse = case_args(op, case)
    args = default if args is None else args
    got = values_and_grads(op, args, lengths, resets, chunked, reverse)
    want = values_and_grads(op, args, lengths, resets, rj.Sequential(), reverse)
    assert_close(got[0], want[0], RTOL64)
    assert_close(got[1], want[1], RTOL64)
    return got


@pytest.mark.parametrize("op", SOME_OPS)
def test_chunked_equals_sequential_float64(op):
    with enable_x64(True):
        check_chunked_equals_sequential(op, "batch23")


# Fast: an op whose loop step is checkpointed; slow: the rest (per-key decays' cond checkpoints
# its branches instead).
@pytest.mark.parametrize("op", [o if o == "delta_head" else pytest.param(o, marks=pytest.mark.slow) for o in OPS])
def test_chunked_equals_sequential_over_groups_of_chunks(op):
    assert chunkwise_delta.chunk_group(4) < -(-37 // 4), "the case must span several groups"
    with enable_x64(True):
        check_chunked_equals_sequential(op, "groups")


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
@pytest.mark.parametrize("op", OPS)
def test_chunked_equals_sequential_float64_more_cases(op, case):
    with enable_x64(True):
        check_chunked_equals_sequential(op, case)


# ---- extreme gates: the chunked form is still the step recurrence, and means what it says ----

# On "batch23"'s shapes, so they reuse its compiled programs.
STEPS = np.arange(21)
LO, HI = STEPS % 3 == 0, STEPS % 3 == 1
FULL_23, NO_RESETS_23 = np.full((2, 3), 21), np.zeros((2, 3, 21), bool)


def at(a, mask, value):
    """``a`` (``(2, 3, T, ...)``) with ``value`` at the steps in ``mask``."""
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 3)), jnp.asarray(value, a.dtype), a)


def extreme(op, which):
    """ "batch23"'s inputs with saturated gates at a third of the steps each."""
    args = list(case_args(op, "batch23")[0])
    if which == "beta":  # no write, and the reflection I - 2 k k^T
        args[3] = at(at(args[3], LO, 0.0), HI, 2.0)
    else:  # decay exactly 0 (log decay -inf) and exactly 1 (0)
        i = 1 if op == "rwkv7" else 4
        args[i] = at(at(args[i], LO, -jnp.inf), HI, 0.0)
    return tuple(args)


EXTREMES = [
    ("delta_none", "beta"),
    ("delta_key", "beta"),
    ("delta_head", "decay"),
    ("delta_key", "decay"),
    ("rwkv7", "decay"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("op", "which"), EXTREMES)
def test_extreme_gates(op, which):
    with enable_x64(True):
        check_chunked_equals_sequential(op, "batch23", extreme(op, which))  # asserts finiteness too


def outputs_of(S, q, scale):
    """``o_t = S^T (s q_t)`` for a state ``S`` that every step keeps."""
    return jnp.einsum("...thd,...hde->...the", q * scale, S)


@pytest.mark.slow
def test_beta_zero_keeps_the_state():
    with enable_x64(True):
        q, k, v, beta, S = inputs("delta_none", (2, 3), 21)
        args = (q, k, v, jnp.zeros_like(beta), S)
        (o, final), _ = values_and_grads("delta_none", args, FULL_23, NO_RESETS_23, rj.Chunked(16), True)
        assert_close(final, S, RTOL64)
        assert_close(o, outputs_of(S, q, DK**-0.5), RTOL64)


@pytest.mark.slow
def test_beta_two_with_unit_keys_flips_the_stored_value():
    """With ``k = e_i`` and ``v = 0``, ``S <- (I - 2 e_i e_i^T) S`` negates what key ``i`` holds
    (row ``i``): after 21 steps cycling through the 4 keys, key 0 (6 writes) holds its value
    again and keys 1-3 (5 writes) its negation; the step recurrence agrees step by step."""
    with enable_x64(True):
        q, _, v, beta, S = inputs("delta_none", (2, 3), 21)
        k = jnp.broadcast_to(jax.nn.one_hot(STEPS % DK, DK, dtype=q.dtype)[:, None, :], q.shape)
        args = (q, k, jnp.zeros_like(v), jnp.full_like(beta, 2.0), S)
        (o, final), _ = values_and_grads("delta_none", args, FULL_23, NO_RESETS_23, rj.Chunked(16), True)
        sign = jnp.array([1.0, -1.0, -1.0, -1.0])[:, None]
        assert_close(final, S * sign, RTOL64)
        # reverse=True: the last step is processed first and sees S negated in row 20 % 4 = 0
        assert_close(
            o[..., 20, :, :], outputs_of(S * jnp.array([-1.0, 1, 1, 1])[:, None], q, DK**-0.5)[..., 20, :, :], RTOL64
        )
        check_chunked_equals_sequential("delta_none", "batch23", args)


def forgotten_at_the_first_step(op, args):
    """``args`` with the state forgotten at the first step processed (the last: reverse):
    decay 0, and for RWKV-7 no write of what ``a`` read from the undecayed state (``b = 0``)."""
    first = STEPS == 20
    args = list(args)
    i = 1 if op == "rwkv7" else 4
    args[i] = at(args[i], first, -jnp.inf)
    if op == "rwkv7":
        args[5] = at(args[5], first, 0.0)
    return tuple(args)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["delta_head", "delta_key", "rwkv7"])
def test_decay_zero_forgets_the_state(op):
    """Decay 0 at the first step: the outputs, final state and the gradients are those from a
    zero state, and the initial state gets no gradient (the chunked form floors the log decay at
    -104: e^-104 of the state, 1e-45, remains). RWKV-7's b at that step is the exception: its
    gradient is what it would have written, a^T S_0."""
    with enable_x64(True):
        args = forgotten_at_the_first_step(op, inputs(op, (2, 3), 21))
        (out, grads) = values_and_grads(op, args, FULL_23, NO_RESETS_23, rj.Chunked(16), True)
        zero = args[:-1] + (jnp.zeros_like(args[-1]),)
        want_out, want_grads = values_and_grads(op, zero, FULL_23, NO_RESETS_23, rj.Chunked(16), True)
        if op == "rwkv7":
            grads, want_grads = grads[:5] + grads[6:], want_grads[:5] + want_grads[6:]
        assert_close(out, want_out, RTOL64)
        assert_close(grads, want_grads, RTOL64)
        scale = max(float(jnp.abs(g).max()) for g in grads[:-1])
        assert float(jnp.abs(grads[-1]).max()) <= RTOL64 * scale


@pytest.mark.slow
def test_decay_one_is_no_gate():
    """Log decay 0 per head is DeltaNet without a gate: the same outputs and gradients."""
    with enable_x64(True):
        q, k, v, beta, g, S = inputs("delta_head", (2, 3), 21)
        _, lengths, resets, chunked, reverse = case_args("delta_head", "batch23")
        gated = values_and_grads("delta_head", (q, k, v, beta, jnp.zeros_like(g), S), lengths, resets, chunked, reverse)
        plain = values_and_grads("delta_none", (q, k, v, beta, S), lengths, resets, chunked, reverse)
        assert_close(gated[0], plain[0], RTOL64)
        assert_close(gated[1][:4] + gated[1][5:], plain[1], RTOL64)


@pytest.mark.slow
def test_rwkv7_without_its_rank_one_term_is_gla_with_per_key_decays():
    """``a = b = 0``: ``S_t = diag(e^w) S + k v^T``, rj.linear_attention.gla with per-key decays
    (scale 1), decays 0 and 1 included; outputs and the gradients of r, w, k, v and the state."""
    with enable_x64(True):
        r, w, k, v, a, b, S = extreme("rwkv7", "decay")
        _, lengths, resets, chunked, reverse = case_args("rwkv7", "batch23")
        args = (r, w, k, v, jnp.zeros_like(a), jnp.zeros_like(b), S)
        out, grads = values_and_grads("rwkv7", args, lengths, resets, chunked, reverse)
        gla_out, gla_grads = values_and_grads("gla_key", (r, w, k, v, S), lengths, resets, chunked, reverse)
        assert_close(out, gla_out, RTOL64)
        assert_close(grads[:4] + grads[6:], gla_grads, RTOL64)


# ---- padding: what lies past a length reaches neither outputs nor gradients -----------------


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_padding_reaches_neither_values_nor_gradients(op):
    with enable_x64(True):
        args, lengths, resets, chunked, reverse = case_args(op, "batch23")
        past = lengths[..., None] <= STEPS  # (2, 3, 21)
        n_steps = len(args) - 1  # every input but the state has a time axis
        bad = (np.nan, np.inf, -np.inf, np.nan, 1e30, -np.inf, np.nan)

        def fill(values):
            return (
                tuple(
                    jnp.where(past.reshape(past.shape + (1,) * (a.ndim - 3)), jnp.asarray(x, a.dtype), a)
                    for a, x in zip(args[:n_steps], values)
                )
                + args[n_steps:]
            )

        want = values_and_grads(op, fill((0.0,) * 7), lengths, resets, chunked, reverse)
        got = values_and_grads(op, fill(bad), lengths, resets, chunked, reverse)
        # Bit for bit: the padding is replaced before the recurrence sees it.
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert np.isfinite(np.asarray(a)).all()
        for d in got[1][:n_steps]:  # padding gets no gradient
            assert not np.asarray(d)[np.broadcast_to(past.reshape(past.shape + (1,) * (d.ndim - 3)), d.shape)].any()


# ---- vmap, forward mode, gradient checks --------------------------------------------------


@functools.partial(jax.jit, static_argnames="op")
def vmapped(op, args, lengths, resets):
    return jax.vmap(lambda a, n, r: call(op, a, lengths=n, resets=r))(args, lengths, resets)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_vmap_of_unbatched_equals_batched(op):
    with enable_x64(True):
        args = inputs(op, (2,), 21)
        lengths, resets = np.array([21, 8]), np.zeros((2, 21), bool)
        resets[0, 4] = resets[1, 17] = True
        assert_close(vmapped(op, args, lengths, resets), forward(op, args, lengths, resets), RTOL64)


@functools.partial(jax.jit, static_argnames=("op", "method", "reverse"))
def tangents(op, args, lengths, resets, method, reverse):
    """``jax.jvp`` of ``call`` along a fixed tangent of every input and the state."""
    fn = lambda a: call(op, a, lengths=lengths, resets=resets, reverse=reverse, method=method)
    return jax.jvp(fn, (args,), (jax.tree.map(cotangent, args),))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_forward_mode_equals_sequential(op):
    """jax.jvp through the chunks of 64 (the inverse's custom_jvp, on merged blocks) equals the
    step recurrence's, with lengths, resets and reverse."""
    with enable_x64(True):
        args, lengths, resets, chunked, reverse = case_args(op, "unbatched")
        got = tangents(op, args, lengths, resets, chunked, reverse)
        want = tangents(op, args, lengths, resets, rj.Sequential(), reverse)
        assert_close(got[0], want[0], RTOL64)
        assert_close(got[1], want[1], RTOL64)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_check_grads(op):
    with enable_x64(True):
        args = inputs(op, (2,), 7, jnp.float64, seed=1)
        lengths, resets = np.array([7, 4]), np.zeros((2, 7), bool)
        resets[0, 2] = resets[1, 0] = True
        fn = jax.jit(lambda a: call(op, a, lengths=lengths, resets=resets, method=rj.Chunked(4)))
        check_grads(fn, (args,), order=1, modes=("fwd", "rev"))


# ---- decoding from a prefilled state, packed documents (forward only) ----------------------

LENGTHS_2 = np.array([13, 13])
NO_RESETS = np.zeros((2, 13), bool)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_prefill_then_decode_equals_one_call(op):
    """A chunkwise prefill of the first 9 steps, then one call per step (T = 1) from the state
    each returns, equals one call over all 13 steps."""
    with enable_x64(True):
        args = inputs(op, (2,), 13)
        at_steps = lambda start, stop, state: tuple(a[:, start:stop] for a in args[:-1]) + (state,)
        o, state = forward(op, at_steps(0, 9, args[-1]))
        outs = [o]
        for t in range(9, 13):
            o, state = forward(op, at_steps(t, t + 1, state))
            outs.append(o)
        want_o, want_state = forward(op, args, LENGTHS_2, NO_RESETS)
        assert_close(jnp.concatenate(outs, axis=1), want_o, RTOL64)
        assert_close(state, want_state, RTOL64)


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_reset_equals_separate_calls(op):
    """Two documents packed in one row, a reset at the boundary, equal two separate calls, the
    second from a zero state (each on the first steps of a 13-step row, as lengths)."""
    with enable_x64(True):
        args = inputs(op, (2,), 13)
        cut = 6
        resets = NO_RESETS.copy()
        resets[:, cut] = True
        o, final = forward(op, args, LENGTHS_2, resets)
        second = tuple(jnp.roll(a, -cut, axis=1) for a in args[:-1]) + (jnp.zeros_like(args[-1]),)
        o1, _ = forward(op, args, LENGTHS_2 * 0 + cut, NO_RESETS)
        o2, final2 = forward(op, second, LENGTHS_2 - cut, NO_RESETS)
        assert_close(o[:, :cut], o1[:, :cut], RTOL64)
        assert_close(o[:, cut:], o2[:, : 13 - cut], RTOL64)
        assert_close(final, final2, RTOL64)
        assert not np.asarray(o1[:, cut:]).any() and not np.asarray(o2[:, 13 - cut :]).any()


# ---- bad input: errors that name the bad shape and the expected one --------------------------

Q, V, B = jnp.ones((2, 5, 2, 4)), jnp.ones((2, 5, 2, 3)), jnp.ones((2, 5, 2))
BAD = {
    "beta": (lambda: LA.delta_rule(Q, Q, V, B[..., 0]), ValueError, r"beta has shape \(2, 5\); expected \(2, 5, 2\)"),
    "beta-dtype": (
        lambda: LA.delta_rule(Q, Q, V, B.astype(jnp.int32)),
        TypeError,
        "beta has dtype int32; expected a floating",
    ),
    "log-decay": (
        lambda: LA.delta_rule(Q, Q, V, B, jnp.zeros((2, 5, 3))),
        ValueError,
        r"log_decay has shape \(2, 5, 3\); expected .*\(2, 5, 2\) or .*\(2, 5, 2, 4\)",
    ),
    "delta-k": (
        lambda: LA.delta_rule(Q, Q[:, :4], V, B),
        ValueError,
        r"k has shape \(2, 4, 2, 4\); expected \(2, 5, 2, 4\)",
    ),
    "delta-state": (
        lambda: LA.delta_rule(Q, Q, V, B, state=jnp.zeros((2, 2, 3, 4))),
        ValueError,
        r"state has shape \(2, 2, 3, 4\); expected \(2, 2, 4, 3\)",
    ),
    "delta-resets": (
        lambda: LA.delta_rule(Q, Q, V, B, resets=jnp.zeros((2, 4), bool)),
        ValueError,
        r"resets has shape \(2, 4\); expected \(2, 5\)",
    ),
    "rwkv7-a": (
        lambda: LA.rwkv7(Q, Q, Q, V, Q[..., :3], Q),
        ValueError,
        r"a has shape \(2, 5, 2, 3\); expected \(2, 5, 2, 4\)",
    ),
    "rwkv7-b": (
        lambda: LA.rwkv7(Q, Q, Q, V, Q, Q[:, :4]),
        ValueError,
        r"b has shape \(2, 4, 2, 4\); expected \(2, 5, 2, 4\)",
    ),
    "rwkv7-w": (
        lambda: LA.rwkv7(Q, Q[..., 0], Q, V, Q, Q),
        ValueError,
        r"w has shape \(2, 5, 2\); expected \(2, 5, 2, 4\)",
    ),
    "rwkv7-v": (
        lambda: LA.rwkv7(Q, Q, Q, V[:, :4], Q, Q),
        ValueError,
        r"v has shape \(2, 4, 2, 3\); expected \(2, 5, 2, \?\)",
    ),
    "rwkv7-state": (
        lambda: LA.rwkv7(Q, Q, Q, V, Q, Q, state=jnp.zeros((2, 3, 4))),
        ValueError,
        r"state has shape \(2, 3, 4\); expected \(2, 2, 4, 3\)",
    ),
    "rwkv7-lengths": (
        lambda: LA.rwkv7(Q, Q, Q, V, Q, Q, lengths=jnp.array([1, 2, 3])),
        ValueError,
        r"lengths has shape \(3,\); expected \(2,\)",
    ),
    "rwkv7-r-ndim": (lambda: LA.rwkv7(*(Q[0, 0],) * 3, V[0, 0], *(Q[0, 0],) * 2), ValueError, r"^r has shape \(2, 4\)"),
    "associative": (lambda: LA.delta_rule(Q, Q, V, B, method=rj.Associative()), ValueError, r"rj\.Chunked\(\)"),
    "newton": (lambda: LA.rwkv7(Q, Q, Q, V, Q, Q, method=rj.Newton()), ValueError, r"rj\.Chunked\(\)"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    fn, error, match = BAD[case]
    with pytest.raises(error, match=match):
        fn()


def test_rwkv7_errors_name_r():
    with pytest.raises(ValueError, match=r"^r has shape \(2, 4\)"):
        LA.rwkv7(*(Q[0, 0],) * 3, V[0, 0], *(Q[0, 0],) * 2)


@pytest.mark.parametrize("op", ["delta_key", "rwkv7"])
def test_per_key_decays_up_to_the_span_bound_take_one_product(op):
    """Per-key decays with every chunk's span in (60, SEPARABLE_SPAN]: the separable scores (the
    branch taken) in float32 match the step recurrence in float64, values and gradients, to
    the float32 bound of the gla test (tests/test_linear_attention.py)."""
    from rnnjax.engines.chunkwise import SEPARABLE_SPAN
    from tests.test_linear_attention import RTOL32

    with enable_x64(True):
        args, lengths, resets, chunked, reverse = case_args(op, "batch23")
        i = 1 if op == "rwkv7" else 4
        g = -jax.random.uniform(jax.random.key(7), args[i].shape, jnp.float64, 4.6, 7.0)
        args = (*args[:i], g, *args[i + 1 :])
        full = np.asarray(g[..., : chunked.size, :, :])  # the first chunk; the second is partial (21 = 16 + 5)
        spans = -np.sum(full if op == "rwkv7" else full[..., 1:, :, :], axis=-3)
        assert 60 < spans.min() and spans.max() <= SEPARABLE_SPAN
        want = values_and_grads(op, args, lengths, resets, rj.Sequential(), reverse)
        args32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), args)
        got = values_and_grads(op, args32, lengths, resets, chunked, reverse)
    up = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
    assert_close(up(got), up(want), RTOL32)
