"""rj.scan's driver semantics: lengths, reverse, resets, remat, unroll, streaming, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.sequence import flip_valid
from tests.cases import normal
from tests.helpers import assert_trees_close

LSTM = rj.LSTM(6)
PARAMS = LSTM.init(jax.random.key(0), 3)
XS = normal(1, (2, 3, 7, 3))  # batch shape (2, 3), T = 7
LENGTHS = jnp.array([[7, 0, 3], [1, 5, 7]])
F32 = dict(atol=1e-6, rtol=1e-5)  # float32 rounding


def test_lengths_freeze_carry_and_zero_outputs_for_two_batch_axes():
    ys, carry = rj.scan(LSTM, PARAMS, XS, lengths=LENGTHS)
    for i in range(2):
        for j in range(3):
            n = int(LENGTHS[i, j])
            ref_ys, ref_carry = rj.scan(LSTM, PARAMS, XS[i, j, :n])
            assert_trees_close(ys[i, j, :n], ref_ys, **F32)
            assert not np.any(np.asarray(ys[i, j, n:]))
            assert_trees_close(jax.tree.map(lambda c: c[i, j], carry), ref_carry, **F32)
    # Length 0 keeps the initial carry, whatever it is.
    start = jax.tree.map(lambda c: c + 0.5, LSTM.init_carry((2, 3)))
    _, carry = rj.scan(LSTM, PARAMS, XS, start, lengths=LENGTHS)
    assert_trees_close(jax.tree.map(lambda c: c[0, 1], carry), jax.tree.map(lambda c: c[0, 1], start), **F32)


def test_lengths_traced_under_jit_equal_concrete():
    f = jax.jit(lambda n: rj.scan(LSTM, PARAMS, XS, lengths=n))
    assert_trees_close(f(LENGTHS), rj.scan(LSTM, PARAMS, XS, lengths=LENGTHS), **F32)


def test_reverse_runs_each_sequence_backwards_over_its_valid_part():
    ys, carry = rj.scan(LSTM, PARAMS, XS, lengths=LENGTHS, reverse=True)
    for i, j in [(0, 0), (0, 2), (1, 0), (1, 1)]:
        n = int(LENGTHS[i, j])
        flipped_ys, ref_carry = rj.scan(LSTM, PARAMS, XS[i, j, :n][::-1])
        assert_trees_close(ys[i, j, :n], flipped_ys[::-1], **F32)
        assert not np.any(np.asarray(ys[i, j, n:]))
        assert_trees_close(jax.tree.map(lambda c: c[i, j], carry), ref_carry, **F32)
    # Without lengths, reverse is the plain reversed scan.
    ys, carry = rj.scan(LSTM, PARAMS, XS, reverse=True)
    ref_ys, ref_carry = rj.scan(LSTM, PARAMS, XS[..., ::-1, :])
    assert_trees_close(ys, ref_ys[..., ::-1, :], **F32)
    assert_trees_close(carry, ref_carry, **F32)


def test_flip_valid_is_an_involution_that_keeps_padding():
    x = jnp.arange(10.0).reshape(5, 2)  # time-major, batch 2
    lengths = jnp.array([3, 5])
    flipped = flip_valid(x, lengths)
    np.testing.assert_array_equal(flipped[:, 0], [4.0, 2.0, 0.0, 6.0, 8.0])
    np.testing.assert_array_equal(flipped[:, 1], [9.0, 7.0, 5.0, 3.0, 1.0])
    np.testing.assert_array_equal(flip_valid(flipped, lengths), x)


def test_resets_start_a_fresh_sequence():
    xs = XS[0]  # (3, 7, 3)
    resets = jnp.zeros((3, 7), bool).at[0, 4].set(True).at[1, 2].set(True).at[1, 5].set(True)
    ys, carry = rj.scan(LSTM, PARAMS, xs, resets=resets)
    # Sequence 0: a fresh start at step 4.
    tail_ys, tail_carry = rj.scan(LSTM, PARAMS, xs[0, 4:])
    assert_trees_close(ys[0, 4:], tail_ys, **F32)
    assert_trees_close(jax.tree.map(lambda c: c[0], carry), tail_carry, **F32)
    head_ys, _ = rj.scan(LSTM, PARAMS, xs[0, :4])
    assert_trees_close(ys[0, :4], head_ys, **F32)
    # Sequence 1: three packed segments [0, 2), [2, 5), [5, 7).
    for a, b in [(0, 2), (2, 5), (5, 7)]:
        assert_trees_close(ys[1, a:b], rj.scan(LSTM, PARAMS, xs[1, a:b])[0], **F32)
    # Sequence 2: no reset, the plain scan.
    assert_trees_close(ys[2], rj.scan(LSTM, PARAMS, xs[2])[0], **F32)


def test_reverse_resets_keep_the_same_segment_boundaries():
    xs = XS[0]
    resets = jnp.zeros((3, 7), bool).at[1, 2].set(True).at[1, 5].set(True).at[0, 3].set(True)
    lengths = jnp.array([7, 7, 3])
    ys, carry = rj.scan(LSTM, PARAMS, xs, lengths=lengths, resets=resets, reverse=True)
    for a, b in [(0, 2), (2, 5), (5, 7)]:
        seg_ys, seg_carry = rj.scan(LSTM, PARAMS, xs[1, a:b], reverse=True)
        assert_trees_close(ys[1, a:b], seg_ys, **F32)
        if a == 0:  # the backward pass ends on the first segment
            assert_trees_close(jax.tree.map(lambda c: c[1], carry), seg_carry, **F32)
    # Sequence 2 has length 3, so its reset at step 3 is padding and changes nothing.
    assert_trees_close(ys[2, :3], rj.scan(LSTM, PARAMS, xs[2, :3], reverse=True)[0], **F32)


def test_reset_and_length_together():
    xs = XS[0]
    resets = jnp.zeros((3, 7), bool).at[0, 2].set(True).at[1, 6].set(True)
    lengths = jnp.array([5, 4, 7])
    ys, carry = rj.scan(LSTM, PARAMS, xs, lengths=lengths, resets=resets)
    seg_ys, seg_carry = rj.scan(LSTM, PARAMS, xs[0, 2:5])
    assert_trees_close(ys[0, 2:5], seg_ys, **F32)
    assert_trees_close(jax.tree.map(lambda c: c[0], carry), seg_carry, **F32)
    # The reset of sequence 1 lies past its length: its final carry is the unreset one.
    assert_trees_close(jax.tree.map(lambda c: c[1], carry), rj.scan(LSTM, PARAMS, xs[1, :4])[1], **F32)


def test_remat_and_unroll_give_same_values_and_gradients():
    def value_and_grad(**kw):
        def loss(p):
            ys, (h, c) = rj.scan(LSTM, p, XS, lengths=LENGTHS, **kw)
            return jnp.sum(ys**2) + jnp.sum(c**2)

        return jax.jit(jax.value_and_grad(loss))(PARAMS)  # one compilation, not one per eager operation

    base = value_and_grad()
    assert_trees_close(value_and_grad(method=rj.Sequential(remat="step")), base, atol=1e-5, rtol=1e-5)
    assert_trees_close(value_and_grad(method=rj.Sequential(unroll=4)), base, atol=1e-5, rtol=1e-5)
    assert_trees_close(value_and_grad(method=rj.Sequential(unroll=16)), base, atol=1e-5, rtol=1e-5)  # GPU's "auto"


def test_unroll_auto_is_decided_per_backend():
    from rnnjax.tuning import resolve_unroll
    from rnnjax.tuning import AUTO_UNROLL

    assert resolve_unroll("auto", backend="cpu") == AUTO_UNROLL["cpu"] == 1
    assert resolve_unroll("auto", backend="gpu") == resolve_unroll("auto", backend="cuda") == AUTO_UNROLL["gpu"]
    assert resolve_unroll("auto") == AUTO_UNROLL["cpu"]  # this test process runs on CPU
    assert resolve_unroll(3) == 3 and resolve_unroll(True) is True
    with pytest.raises(ValueError, match='unroll must be a positive int, True or "auto", got \'fast\''):
        resolve_unroll("fast")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: rj.Sequential(unroll=0), "unroll must be a positive int"),
        (lambda: rj.Sequential(remat="log"), r"remat must be one of \(None, 'step', 'sqrt'\), got 'log'"),
        (lambda: rj.Sequential(remat=True), r"remat must be one of \(None, 'step', 'sqrt'\), got True"),
        (lambda: rj.Sequential(gradient="manual"), r"gradient must be one of \('auto', 'autodiff', 'fused'\)"),
        (lambda: rj.Sequential(gradient="fused", remat="sqrt"), "does not combine with remat='sqrt'"),
        (lambda: rj.Chunked(size=0), "size must be a positive int"),
        (lambda: rj.Newton("newtonian"), "unknown Newton variant 'newtonian'"),
        (lambda: rj.Newton(tol=-1.0), "tol must be a positive finite number"),
        (lambda: rj.Newton(max_iters=0), "max_iters must be a positive int"),
        (lambda: rj.Newton("deer", damping=1.0), "damping applies to the variants 'elk' and 'quasi-elk'"),
        (lambda: rj.Newton("elk", damping=float("inf")), "damping must be a positive finite number"),
    ],
)
def test_method_values_check_their_options_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_method_values_are_hashable_and_strings_name_their_defaults():
    from rnnjax.methods import as_method

    assert {rj.Sequential(), rj.Sequential()} == {rj.Sequential()}
    assert as_method("newton") == rj.Newton() and as_method("chunked") == rj.Chunked()
    # A method that cannot run a cell names the ones that can, in rj.scan and in rj.RNN.
    with pytest.raises(ValueError, match=r"rj.Associative\(\) needs a cell with a linear recurrence .* GRU is not one. "
                                         r"Methods that can run it: rj.Sequential\(\), rj.Newton\(\), rj.Auto\(\)"):
        rj.RNN(rj.GRU(3), method=rj.Associative())
    with pytest.raises(ValueError, match=r"rj.Chunked\(\) needs a cell with a linear recurrence"):
        rj.scan(LSTM, PARAMS, XS, method="chunked")


# 4: 2 blocks of 2; 7: padded to 3 blocks of 3. The fast set runs one forward and one reverse
# case; make test-all runs the rest (about 10 s each).
@pytest.mark.parametrize("reverse, steps", [(False, 4), (True, 7)] + [
    pytest.param(reverse, steps, marks=pytest.mark.slow) for reverse, steps in [(False, 1), (False, 7), (True, 1), (True, 4)]])
def test_every_remat_policy_gives_the_same_values_and_gradients(steps, reverse):
    xs, lengths = XS[..., :steps, :], jnp.minimum(LENGTHS, steps)
    resets = jnp.zeros((2, 3, steps), bool).at[0, :, steps // 2].set(True)

    def loss(p, xs, remat):
        ys, (h, c) = rj.scan(LSTM, p, xs, lengths=lengths, resets=resets, reverse=reverse,
                             method=rj.Sequential(remat=remat))
        return jnp.sum(ys**2) + jnp.sum(c**2) + jnp.sum(jnp.sin(h))

    # Jitted: one compilation per policy, instead of one per eager operation.
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    base = value_and_grad(PARAMS, xs, None)
    for remat in ("step", "sqrt"):
        assert_trees_close(value_and_grad(PARAMS, xs, remat), base, atol=1e-5, rtol=1e-5)
    # Without lengths too (the reverse pass then runs lax.scan backwards).
    no_lengths = lambda p, remat: jnp.sum(rj.scan(LSTM, p, xs, reverse=reverse, method=rj.Sequential(remat=remat))[0] ** 2)
    grad = jax.jit(jax.grad(no_lengths), static_argnums=1)
    assert_trees_close(grad(PARAMS, "sqrt"), grad(PARAMS, None), atol=1e-5, rtol=1e-5)


def test_sqrt_remat_keeps_activation_memory_sublinear():
    """XLA's memory analysis of a training step's gradient, temporaries only. Per-step remat
    stores a carry per step, O(T); "sqrt" stores O(sqrt(T)) (plus the time-major copy of the
    input that every policy makes)."""
    cell = rj.LSTM(32)
    params = cell.init(jax.random.key(0), 8)

    def temp_bytes(remat, steps):
        xs = jnp.ones((4, steps, 8))
        grad = jax.jit(jax.grad(lambda p: rj.scan(cell, p, xs, method=rj.Sequential(remat=remat))[1].c.sum()))
        analysis = grad.lower(params).compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    step, sqrt = temp_bytes("step", 4096), temp_bytes("sqrt", 4096)
    assert 3 * sqrt < step, (step, sqrt)
    assert temp_bytes("step", 1024) * 3.5 < step  # per step: grows like T (x4 here)
    assert temp_bytes("sqrt", 1024) * 3 > sqrt  # sqrt: grows far slower (x2 for sqrt(T))


def test_remat_stores_fewer_residuals():
    big = rj.LSTM(32)
    p = big.init(jax.random.key(0), 16)
    xs = jnp.ones((4, 64, 16))

    def residual_bytes(remat):
        f = lambda p: rj.scan(big, p, xs, method=rj.Sequential(remat=remat))[0].sum()
        _, vjp = jax.vjp(f, p)
        return sum(leaf.nbytes for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "nbytes"))

    assert residual_bytes("step") < residual_bytes(None)


def test_streaming_steps_equal_scan():
    step = jax.jit(LSTM.step)
    carry = LSTM.init_carry((2, 3))
    outs = []
    for t in range(XS.shape[-2]):
        carry, y = step(PARAMS, carry, XS[:, :, t])
        outs.append(y)
    ys, final = rj.scan(LSTM, PARAMS, XS)
    assert_trees_close(jnp.stack(outs, axis=-2), ys, **F32)
    assert_trees_close(carry, final, **F32)
    # And scanning in two chunks, handing over the carry, equals one scan.
    ys1, c1 = rj.scan(LSTM, PARAMS, XS[..., :3, :])
    ys2, c2 = rj.scan(LSTM, PARAMS, XS[..., 3:, :], c1)
    assert_trees_close(jnp.concatenate([ys1, ys2], axis=-2), ys, **F32)
    assert_trees_close(c2, final, **F32)


def test_given_carry_dtype_is_kept():
    carry = LSTM.init_carry((2, 3), jnp.float32)
    ys, final = rj.scan(LSTM, PARAMS, XS.astype(jnp.bfloat16), carry)
    assert final.h.dtype == jnp.float32 and ys.dtype == jnp.float32


# ---- bad input: a clear error at trace time, never a NaN or a silent broadcast ----


# The inputs are built when a test runs, not when the module is collected (in every xdist worker).
BAD_INPUTS = [
    (lambda: dict(xs=jnp.ones((3,))), ValueError, r"xs has shape \(3,\); expected \(\.\.\., T, 3\)"),
    (lambda: dict(xs=jnp.ones((2, 7, 4))), ValueError, r"xs has shape \(2, 7, 4\); expected \(\.\.\., T, 3\)"),
    (lambda: dict(xs=jnp.ones((2, 7, 3), jnp.int32)), TypeError, "xs has dtype int32; expected a floating"),
    (lambda: dict(lengths=jnp.array([7, 7])), ValueError, r"lengths has shape \(2,\); expected \(2, 3\)"),
    (lambda: dict(lengths=jnp.full((2, 3), 2.0)), TypeError, "lengths has dtype float32; expected an integer"),
    (lambda: dict(lengths=jnp.full((2, 3), -1)), ValueError, r"lengths has the value -1; expected every length in \[0, T=7\]"),
    (lambda: dict(lengths=jnp.full((2, 3), 8)), ValueError, r"lengths has the value 8; expected every length in \[0, T=7\]"),
    (lambda: dict(resets=jnp.zeros((2, 3, 6), bool)), ValueError, r"resets has shape \(2, 3, 6\); expected \(2, 3, 7\)"),
    (lambda: dict(resets=jnp.zeros((2, 3, 7))), TypeError, "resets has dtype float32; expected bool"),
    (lambda: dict(carry=jnp.zeros((2, 3, 6))), ValueError, "carry has structure"),
    (lambda: dict(carry=rj.LSTM(6).init_carry((3,))), ValueError, r"carry has a leaf of shape \(3, 6\); expected \(2, 3, 6\)"),
    (lambda: dict(carry=rj.LSTM(6).init_carry((2, 3, 1))), ValueError, r"expected \(2, 3, 6\)"),
    (lambda: dict(carry=LSTM.init_carry((2, 3), jnp.int32)), TypeError,
     "carry has a leaf of dtype int32; expected a floating dtype such as float32"),
    (lambda: dict(carry=LSTM.init_carry((2, 3))._replace(c=jnp.zeros((2, 3, 6), bool))), TypeError,
     "carry has a leaf of dtype bool; expected a floating dtype"),
    (lambda: dict(params=PARAMS._replace(w_h=PARAMS.w_h.astype(jnp.int32))), TypeError,
     "params.w_h has dtype int32; expected a floating dtype such as float32"),
    (lambda: dict(reverse="yes"), TypeError, "reverse must be a bool, got 'yes'"),
    (lambda: dict(method="fastest"), ValueError, r"unknown method 'fastest'; expected a method value such as rj.Sequential\(\)"),
    (lambda: dict(unroll=4), TypeError, r"unroll= is now method=rj.Sequential\(unroll=...\)"),
    (lambda: dict(vjp="fused"), TypeError, r"vjp= is now method=rj.Sequential\(gradient='fused'\)"),
    (lambda: dict(chunk_size=4), TypeError, r"chunk_size= is now method=rj.Chunked\(size=...\)"),
    (lambda: dict(tol=1e-3, newton="deer"), TypeError, r"tol= is now method=rj.Newton\(tol=...\); newton= is now"),
    (lambda: dict(speed="max"), TypeError, r"rj.scan got unexpected keyword arguments \['speed'\]"),
    (lambda: dict(params=rj.GRU(6).init(jax.random.key(0), 3)), TypeError, "params is a GRUParams; expected LSTMParams"),
    (lambda: dict(params=rj.LSTM(6).init(jax.random.key(0), 4)), ValueError, r"xs has shape \(2, 3, 7, 3\); expected \(\.\.\., T, 4\)"),
    (lambda: dict(params=rj.LSTM(5).init(jax.random.key(0), 3)), ValueError, r"params.w_x has shape \(3, 20\); expected \(3, 24\) for LSTM\(hidden_size=6"),
]


@pytest.mark.parametrize("make_kwargs, error, message", BAD_INPUTS, ids=[f"kwargs{i}" for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_a_clear_error(make_kwargs, error, message):
    args = dict(params=PARAMS, xs=XS, carry=None)
    args.update(make_kwargs())
    params, xs, carry = args.pop("params"), args.pop("xs"), args.pop("carry")
    with pytest.raises(error, match=message):
        rj.scan(LSTM, params, xs, carry, **args)
    # The same input inside a jitted function fails the same way, at trace time.
    with pytest.raises(error, match=message):
        jax.jit(lambda: rj.scan(LSTM, params, xs, carry, **args))()


def test_unknown_activation_name_is_rejected():
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        rj.Elman(4, activation="tanhh")
    with pytest.raises(ValueError, match="unknown gate_activation 'sigmoidd'"):
        rj.LSTM(4, gate_activation="sigmoidd")


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_sizes_are_rejected(bad):
    with pytest.raises(ValueError, match="proj_size must be a positive int"):
        rj.LSTM(4, proj_size=bad)
    with pytest.raises(ValueError, match="hidden_size must be a positive int"):
        rj.GRU(bad)
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        rj.GRU(4).init(jax.random.key(0), bad)


def test_narrow_integer_lengths_mean_what_int32_lengths_mean():
    # T = 300 does not fit in uint8 (it would wrap to 44), nor does 0 - 1 for a length-0
    # sequence: every place that mixes lengths with T computes in int32.
    cell = rj.Elman(2)
    params = cell.init(jax.random.key(0), 1)
    xs = normal(1, (3, 300, 1))
    lengths = np.array([200, 0, 255])
    for reverse in (False, True):
        want = rj.scan(cell, params, xs, lengths=jnp.asarray(lengths, jnp.int32), reverse=reverse)
        for dtype in (jnp.uint8, jnp.int8, jnp.uint16, jnp.int16):
            narrow = lengths.clip(max=jnp.iinfo(dtype).max).astype(dtype)
            if (narrow != lengths).any():
                continue
            got = rj.scan(cell, params, xs, lengths=jnp.asarray(narrow), reverse=reverse)
            assert_trees_close(got, want, atol=0, rtol=0)
    ys = np.asarray(want[0])
    assert (ys[0, :200] != 0).all() and not ys[0, 200:].any() and not ys[1].any()
    last = rj.train.last_step(want[0], jnp.asarray(lengths, jnp.uint8))
    np.testing.assert_array_equal(last, ys[[0, 1, 2], [199, 0, 254]] * np.array([[1], [0], [1]]))


def _sum_of_squares(method):
    """``xs (4, 2) -> sum(ys ** 2)`` of a GRU(3) run by ``method``."""
    cell = rj.GRU(3)
    params = cell.init(jax.random.key(0), 2)
    return lambda x: jnp.sum(rj.scan(cell, params, x, method=method)[0] ** 2)


FORWARD_MODE_XS = normal(1, (4, 2))


def test_forward_mode_through_a_custom_vjp_method_names_the_fix():
    with pytest.raises(TypeError, match=r"has no forward mode.*use method=rj.Sequential\(\) for forward-mode"):
        jax.jvp(_sum_of_squares(rj.Newton()), (FORWARD_MODE_XS,), (FORWARD_MODE_XS,))


def test_forward_mode_through_the_fused_gradient_equals_autodiff():
    # The sequence-level derivative (the default for dense cells) is a custom_jvp: jax.jvp
    # runs its tangent loop, which must give autodiff's directional derivative.
    tangent = jnp.cos(FORWARD_MODE_XS)
    got = jax.jvp(_sum_of_squares(rj.Sequential(gradient="fused")), (FORWARD_MODE_XS,), (tangent,))
    want = jax.jvp(_sum_of_squares(rj.Sequential(gradient="autodiff")), (FORWARD_MODE_XS,), (tangent,))
    assert_trees_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # two Hessians compiled (about 10 s): make test-all runs it
def test_forward_over_reverse_hessian_through_the_fused_gradient():
    # Reverse mode to second order works: forward-over-reverse jax.hessian through the fused
    # gradient equals autodiff's (float32 rounding of two different programs).
    hessian = lambda method: jax.jit(jax.hessian(_sum_of_squares(method)))(FORWARD_MODE_XS)
    assert_trees_close(
        hessian(rj.Sequential(gradient="fused")), hessian(rj.Sequential(gradient="autodiff")), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("proj_size", [4, 5])
def test_lstm_projection_must_reduce_the_hidden_size(proj_size):
    # As PyTorch (proj_size must be smaller than hidden_size).
    with pytest.raises(ValueError, match=f"proj_size={proj_size} must be smaller than hidden_size=4"):
        rj.LSTM(4, proj_size=proj_size)
