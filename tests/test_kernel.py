"""The kernel engine (rj.Kernel(), rnnjax/engines/kernel.py) and its column-block evaluator
(rnnjax/engines/blocked.py), run by Pallas' interpreter on CPU.

The interpreter runs the same kernel bodies (the loop over time, the traced ``update`` and its
derivative, the column blocks) that Triton compiles on a GPU, so equality with the sequential
engine here checks the engine's logic; benchmarks/lab/kernel_gpu.py checks the compiled kernels on a
GPU. Both engines do the same float32 arithmetic in a different order (the kernel adds the
products of column tiles and computes the gradients of W_x, W_h and the inputs as products over
all steps), so results agree to float32 rounding: relative error of a few ulps per step, far
under the 1e-5 (T <= 7) asserted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.engines import blocked
from tests.compat import enable_x64

KERNEL = rj.Kernel(block_batch=4, interpret=True)
RTOL = 1e-5  # relative (norm-wise) error, float32, T <= 7: see the module docstring


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_close_trees(got, want, rtol=RTOL):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert np.all(np.isfinite(np.asarray(g, np.float64)))
        assert rel_err(g, w) <= rtol, (rel_err(g, w), g.shape)


@functools.partial(jax.jit, static_argnames=("cell", "method", "reverse"))
def scan_and_grads(cell, method, params, xs, carry, lengths, resets, reverse):
    def loss(p, xs, c):
        ys, final = rj.scan(cell, p, xs, c, lengths=lengths, resets=resets, reverse=reverse, method=method)
        # A loss that weighs every output and final-carry element differently.
        weights = jnp.cos(jnp.arange(ys.size, dtype=jnp.float32)).reshape(ys.shape)
        return jnp.sum(weights * ys.astype(jnp.float32)) + sum(jnp.sum(jnp.sin(f)) for f in jax.tree.leaves(final))

    out = rj.scan(cell, params, xs, carry, lengths=lengths, resets=resets, reverse=reverse, method=method)
    return out, jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry)


def problem(cell, batch_shape, steps, input_size, seed=0, masks=True):
    kp, kx, kc, kl, kr = jax.random.split(jax.random.key(seed), 5)
    base = cell.cell if isinstance(cell, rj.Mixed) else cell
    params = base.init(kp, input_size)
    xs = jax.random.normal(kx, (*batch_shape, steps, input_size))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(kc, a.shape, a.dtype), cell.init_carry(batch_shape))
    lengths = jax.random.randint(kl, batch_shape, 0, steps + 1) if masks else None
    resets = jax.random.bernoulli(kr, 0.3, (*batch_shape, steps)) if masks else None
    return params, xs, carry, lengths, resets


def check_against_sequential(cell, batch_shape, steps, input_size, reverse, masks=True, rtol=RTOL, seed=0):
    params, xs, carry, lengths, resets = problem(cell, batch_shape, steps, input_size, seed, masks)
    want = scan_and_grads(cell, rj.Sequential(), params, xs, carry, lengths, resets, reverse)
    got = scan_and_grads(cell, KERNEL, params, xs, carry, lengths, resets, reverse)
    assert_close_trees(got, want, rtol)


# -- the engine -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell, batch_shape, reverse",
    [
        pytest.param(rj.LSTM(8), (5,), True, id="lstm-reverse"),  # 5 rows: two programs, three padded rows
        # any batch shape; GRU's 3-block products (make test-all)
        pytest.param(rj.GRU(8), (2, 3), False, id="gru-batch2x3", marks=pytest.mark.slow),
    ],
)
def test_outputs_carries_and_gradients_equal_the_sequential_engines(cell, batch_shape, reverse):
    check_against_sequential(cell, batch_shape, steps=6, input_size=3, reverse=reverse)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cell",
    [rj.Elman(8), rj.LSTM(8, proj_size=4), rj.LSTM(8, peephole=True), rj.GRU(8, use_bias=False), rj.LSTM(4)],
    ids=["elman", "lstm-proj", "lstm-peephole", "gru-nobias", "lstm-h4"],
)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("masks", [False, True], ids=["plain", "lengths-resets"])
def test_every_dense_cell_with_and_without_lengths_resets_reverse(cell, reverse, masks):
    check_against_sequential(cell, (5,), steps=7, input_size=3, reverse=reverse, masks=masks)


@pytest.mark.slow
def test_mixed_bfloat16_matches_the_sequential_engine_on_the_same_cell():
    # Same bfloat16 products (operands rounded, float32 accumulation) on both sides; the
    # order of accumulation differs, so results agree to bfloat16 rounding of the outputs
    # (unit roundoff 2^-8) rather than float32's.
    cell = rj.Mixed(rj.LSTM(8), "bfloat16")
    check_against_sequential(cell, (5,), steps=6, input_size=3, reverse=False, rtol=2**-8)


@pytest.mark.slow
def test_block_batch_wider_than_the_carry_with_lengths_and_resets():
    # 4 rows per program, carry width 2: each step's masks hold more rows than the block width.
    check_against_sequential(rj.Elman(2), (3,), steps=3, input_size=2, reverse=False)


def _inner_jaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else [v]:
            if isinstance(x, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                yield getattr(x, "jaxpr", x)


def _eqns(jaxpr, name, deep=True):
    for e in jaxpr.eqns:
        if e.primitive.name == name:
            yield e
        elif deep:
            for inner in _inner_jaxprs(e):
                yield from _eqns(inner, name)


@pytest.mark.parametrize("weights, looped", [("stream", True), ("hold", False)])
def test_streamed_w_h_is_multiplied_one_column_tile_at_a_time(weights, looped):
    """Streamed, each step's products with W_h's column tiles are a loop whose body multiplies
    one tile (unrolled, Triton held every tile's operand in registers at once and spilled:
    benchmarks/lab/kernel_report.py); held tiles stay unrolled. Forward and reverse kernels."""
    cell = rj.LSTM(8)  # 4 column tiles of 8
    params, xs, carry, *_ = problem(cell, (4,), 3, 8, masks=False)
    method = rj.Kernel(block_batch=4, interpret=True, weights=weights)
    loss = lambda p: jnp.sum(rj.scan(cell, p, xs, carry, method=method)[0])  # noqa: E731
    kernels = list(_eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, "pallas_call"))
    assert len(kernels) == 2  # the forward kernel keeping the carries, the reverse kernel
    for kernel in kernels:
        (steps,) = _eqns(kernel.params["jaxpr"], "scan", deep=False)
        body = steps.params["jaxpr"].jaxpr
        tile_loops = [e.params["jaxpr"].jaxpr for e in _eqns(body, "scan", deep=False)]
        direct = list(_eqns(body, "dot_general", deep=False))
        if looped:
            assert direct == [] and tile_loops
            assert [len(list(_eqns(j, "dot_general"))) for j in tile_loops] == [1] * len(tile_loops)
        else:
            assert tile_loops == [] and len(direct) >= 4


@pytest.mark.slow
def test_lstm_projection_wider_than_the_block_width():
    # LSTM(6, proj_size=4): products 24 and 4 wide, carries 4 and 6, so the block width is 2
    # and the projection weight (6, 4) is held as blocks, as is the (rows, 6) it multiplies.
    check_against_sequential(rj.LSTM(6, proj_size=4), (3,), steps=3, input_size=2, reverse=True, masks=False)


def to_float64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


@pytest.mark.slow
def test_float64_is_computed_in_float64():
    # Both engines in float64: results agree to float64 rounding (a few ulps per step: 1e-12
    # leaves a wide margin at T = 4); a float32 product anywhere leaves errors near 1e-8.
    cell = rj.LSTM(4)
    with enable_x64(True):
        params, xs, carry, lengths, resets = to_float64(problem(cell, (3,), steps=4, input_size=2))
        want = scan_and_grads(cell, rj.Sequential(), params, xs, carry, lengths, resets, False)
        got = scan_and_grads(cell, KERNEL, params, xs, carry, lengths, resets, False)
        assert jax.tree.leaves(got)[0].dtype == jnp.float64
        assert_close_trees(got, want, rtol=1e-12)


def test_float64_on_a_gpu_is_refused_naming_the_fix():
    cell = rj.Elman(2)
    with enable_x64(True):
        params = cell.init(jax.random.key(0), 2, jnp.float64)
        with pytest.raises(ValueError, match=r"params, xs, carry hold float64.*interpret=True.*rj\.Sequential\(\)"):
            rj.scan(cell, params, jnp.ones((3, 2), jnp.float64), method=rj.Kernel(interpret=False))


def second_order_problem():
    cell = rj.Elman(2)
    params = cell.init(jax.random.key(0), 2, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (3, 3, 2), jnp.float64)
    lengths, resets = jnp.array([3, 1, 2]), jnp.array([[0, 0, 1], [0, 0, 0], [0, 1, 0]], bool)

    def loss(method, params, xs):
        ys, h = rj.scan(cell, params, xs, lengths=lengths, resets=resets, method=method)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(h**2)

    return params, xs, loss


# Second derivatives in float64 on both sides agree to float64 rounding; 1e-10 leaves room for
# the different order of the products' sums.


@pytest.mark.slow
def test_reverse_over_reverse_equals_the_sequential_engines():
    with enable_x64(True):
        params, xs, loss = second_order_problem()

        def grad_of_grad(method):
            def inner(p):
                g = jax.grad(loss, argnums=(1, 2))(method, p, xs)
                return sum(jnp.sum(jnp.cos(leaf)) for leaf in jax.tree.leaves(g))

            return jax.grad(inner)(params)

        assert_close_trees(grad_of_grad(KERNEL), grad_of_grad(rj.Sequential()), rtol=1e-10)


@pytest.mark.slow
def test_hessian_forward_over_reverse_equals_the_sequential_engines():
    with enable_x64(True):
        params, xs, loss = second_order_problem()
        want = jax.hessian(functools.partial(loss, rj.Sequential(), params))(xs)
        got = jax.hessian(functools.partial(loss, KERNEL, params))(xs)
        assert_close_trees(got, want, rtol=1e-10)


def test_vmap_over_an_empty_axis():
    cell = rj.Elman(2)
    params = cell.init(jax.random.key(0), 3)

    def shapes(method, vmap, xs):
        out = vmap(lambda x: rj.scan(cell, params, x, method=method))(xs)
        return jax.tree.map(lambda a: (a.shape, a.dtype), out)

    twice = lambda f: jax.vmap(jax.vmap(f))  # noqa: E731
    for vmap, xs in [
        (jax.vmap, jnp.zeros((0, 5, 3))),
        (twice, jnp.zeros((0, 2, 5, 3))),
        (twice, jnp.zeros((2, 0, 5, 3))),
    ]:
        assert shapes(KERNEL, vmap, xs) == shapes(rj.Sequential(), vmap, xs)


@pytest.mark.slow
def test_no_rows_and_a_single_step():
    check_against_sequential(rj.Elman(2), (0,), steps=1, input_size=3, reverse=False)
    check_against_sequential(rj.Elman(2), (3,), steps=1, input_size=3, reverse=False)


def test_an_empty_sequence_and_an_unbatched_one():
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), 3)
    ys, h = rj.scan(cell, params, jnp.ones((0, 3)), method=KERNEL)
    assert ys.shape == (0, 4) and bool(jnp.all(h == 0))
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    want = rj.scan(cell, params, xs)
    assert_close_trees(rj.scan(cell, params, xs, method=KERNEL), want)


def test_forward_mode_fails_with_an_error_naming_the_fix():
    cell = rj.Elman(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jnp.ones((2, 3, 3))
    with pytest.raises(TypeError, match=r"rj\.Sequential\(\) for forward-mode"):
        jax.jvp(lambda x: rj.scan(cell, params, x, method=KERNEL)[0], (xs,), (xs,))


# -- the method value -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_batch": 0}, "block_batch"),
        ({"num_warps": 2.5}, "num_warps"),
        ({"precision": "tf32"}, "precision must be one of"),
        ({"interpret": "yes"}, "interpret must be"),
    ],
)
def test_bad_options_are_refused_when_the_method_is_built(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        rj.Kernel(**kwargs)


@pytest.mark.parametrize(
    "cell",
    [rj.MinGRU(4), rj.GRU(4, reset_after=False), rj.Mixed(rj.LSTM(4), "bfloat16", carry_mode="round")],
    ids=["linear-cell", "gru-reset-before", "mixed-round"],
)
def test_cells_it_cannot_run_are_refused_naming_the_methods_that_can(cell):
    params = (cell.cell if isinstance(cell, rj.Mixed) else cell).init(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"rj\.Kernel\(\) needs a dense cell.*rj\.Sequential\(\)"):
        rj.scan(cell, params, jnp.ones((2, 3)), method=rj.Kernel())


def test_the_method_is_named_and_hashable():
    assert rj.Kernel() == rj.Kernel() and hash(rj.Kernel()) == hash(rj.Kernel())
    cell = rj.Elman(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 3))
    # "kernel" is the default Kernel(), interpreted on CPU.
    assert_close_trees(rj.scan(cell, params, xs, method="kernel"), rj.scan(cell, params, xs))


# -- the column-block evaluator ---------------------------------------------------------------


def as_whole(tree):
    return jax.tree.map(
        lambda a: a.join() if isinstance(a, blocked.Blocks) else a,
        tree,
        is_leaf=lambda a: isinstance(a, blocked.Blocks),
    )


@pytest.mark.parametrize(
    "cell", [rj.GRU(8), rj.LSTM(8), rj.LSTM(8, peephole=True), rj.Elman(8)], ids=["gru", "lstm", "peephole", "elman"]
)
def test_blocked_evaluation_of_update_and_its_derivative_is_exact(cell):
    params = cell.init(jax.random.key(0), 8)
    rest = params._replace(w_x=None, w_h=None)
    carry = jax.tree.map(lambda a: a + 0.3, cell.init_carry((4,)))
    width = params.w_x.shape[1]
    zx, zh = (jax.random.normal(jax.random.key(k), (4, width)) for k in (1, 2))

    def update_and_vjp(rest, c, zx, zh):
        out, vjp = jax.vjp(lambda c, a, b: cell.update(rest, c, a, b), c, zx, zh)
        return out, vjp(jax.tree.map(jnp.cos, out))

    want = update_and_vjp(rest, carry, zx, zh)
    got = blocked.evaluate(update_and_vjp, 8, rest, carry, blocked.split(zx, 8), blocked.split(zh, 8))
    # Gate products of width > 8 arrive as blocks; the result is the same arithmetic, bit for bit.
    assert jax.tree.all(jax.tree.map(lambda g, w: bool(jnp.array_equal(g, w)), as_whole(got), want))


def test_blocked_evaluation_refuses_a_slice_off_the_block_boundary():
    with pytest.raises(NotImplementedError, match="slice at columns 0:6, not on the block width 4"):
        blocked.evaluate(lambda z: z[:, :6], 4, blocked.split(jnp.ones((2, 8)), 4))
