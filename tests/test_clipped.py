"""Cells linear up to a clip (rj.ClippedLinearCell: rj.IndRNN with a relu, relu6, hard-tanh or
identity activation) under rj.Associative and rj.Chunked (rnnjax/engines/clipped.py), and
the clipped maps' algebra (rnnjax.engines.affine.CLIP).

Every method is compared with the sequential driver (itself checked against a plain loop in
tests/test_cells.py) on one call with lengths, resets, reverse and a non-zero initial carry.
float32 tolerance: 1e-5 relative to the values' scale. The scan composes maps pairwise, so
its rounding error grows like log2(T) units, not T: at T <= 1024 a few 1e-7 of the scale.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax.engines.affine import CLIP, clip_maps, solve_affine
from rnnjax.ops import clip_range, resolve_activation
from tests.cases import normal, random_case
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

STEPS = 9
LENGTHS = jnp.array([9, 5, 0])
RESETS = jnp.zeros((3, STEPS), bool).at[0, 3].set(True).at[1, 1].set(True).at[1, 2].set(True).at[1, 6].set(True)
F32 = dict(atol=1e-5, rtol=1e-5, check_dtypes=True)


def signed_uniform(key, shape, dtype=jnp.float32):
    """Recurrent weights in [-1, 1): a negative ``u`` swaps a clip's bounds when maps compose."""
    return jax.random.uniform(key, shape, dtype, -1.0, 1.0)


CELLS = {
    "relu": rj.IndRNN(5),
    "relu6-signed": rj.IndRNN(5, activation="relu6", recurrent_init=signed_uniform, recurrent_max_abs=0.9),
    "hard_tanh-signed-nobias": rj.IndRNN(5, activation="hard_tanh", use_bias=False, recurrent_init=signed_uniform),
    "identity": rj.IndRNN(5, activation="identity"),
}


def data(cell, key=0, dtype=jnp.float32, batch=(3,), steps=STEPS):
    params, xs, carry = random_case(cell, steps, key, dtype, batch)
    return params, 3 * xs, carry  # large enough that relu6's and hard_tanh's upper bounds act


def test_clip_range_names_exactly_the_activations_that_are_clips():
    x = jnp.concatenate([normal(0, (200,)) * 5, jnp.array([0.0, -1.0, 1.0, 6.0, -jnp.inf, jnp.inf])])
    for name in ("relu", "relu6", "hard_tanh", "identity", "linear"):
        lo, hi = clip_range(name)
        np.testing.assert_array_equal(resolve_activation(name)(x), jnp.clip(x, lo, hi), err_msg=name)
        assert clip_range(resolve_activation(name)) == (lo, hi)
    assert clip_range("tanh") is None and clip_range("hard_sigmoid") is None and clip_range(lambda v: v) is None
    assert rj.IndRNN(3).clip_range == (0.0, float("inf"))
    assert rj.IndRNN(3, activation="tanh").clip_range is None


def test_clipped_maps_compose_earlier_then_later():
    # Negative and zero a, finite and infinite bounds: each case of the combine is taken.
    rng = np.random.default_rng(1)
    steps, width = 12, 64
    a = rng.uniform(-1.5, 1.5, (steps, width)).astype(np.float32)
    a[rng.random((steps, width)) < 0.15] = 0.0
    b = rng.standard_normal((steps, width)).astype(np.float32)
    lo = np.where(rng.random((steps, width)) < 0.3, -np.inf, rng.uniform(-1.0, 0.0, (steps, width))).astype(np.float32)
    hi = np.where(rng.random((steps, width)) < 0.3, np.inf, rng.uniform(0.0, 1.0, (steps, width))).astype(np.float32)
    h0 = rng.standard_normal(width).astype(np.float32)
    h, expected = h0, []
    for t in range(steps):
        h = np.minimum(np.maximum(a[t] * h + b[t], lo[t]), hi[t])
        expected.append(h)
    for chunk in (None, 5, steps):
        solve = jax.jit(lambda a, b, lo, hi, h0, chunk=chunk: solve_affine(CLIP, clip_maps(a, b, lo, hi), h0, chunk))
        states = solve(a, b, lo, hi, h0)
        np.testing.assert_allclose(states, np.stack(expected), rtol=1e-5, atol=1e-6, err_msg=f"chunk={chunk}")


def _expanding_maps(steps=300, width=16, u=-1.5, shift=0.0):
    """Relu maps h -> max(u h + b, 0) with |u| > 1: slopes of u**steps overflow float32."""
    rng = np.random.default_rng(8)
    a = np.full((steps, width), u, np.float32)
    b = (rng.standard_normal((steps, width)) + shift).astype(np.float32)
    return a, b, np.zeros_like(b), np.full_like(b, np.inf)


def _loop(elems, h):
    a, b, lo, hi = elems
    for t in range(a.shape[0]):
        h = np.minimum(np.maximum(a[t] * h + b[t], lo[t]), hi[t])
    return h


@pytest.mark.parametrize("u, shift", [(-1.5, 0.0), (1.5, -2.0)])
def test_clipped_maps_with_overflowing_slopes_stay_an_exact_monoid(u, shift):
    # |u| = 1.5 over 300 steps: 1.5**300 overflows float32, while the relu keeps the states
    # below 5. u < 0: a composition saturates, a constant (slope exactly 0). u > 0: its upper
    # bound stays inf and its slope overflows, but its value at the anchor stays finite, so
    # no inf * 0 or inf - inf arises (the old (a, b) form gave nan). Associativity and the
    # identity hold, and the composed maps agree with a plain loop of the steps.
    elems = _expanding_maps(u=u, shift=shift)
    maps = [clip_maps(*(jnp.asarray(e[t]) for e in elems)) for t in range(elems[0].shape[0])]

    def fold(i, j):
        out = maps[i]
        for e in maps[i + 1 : j]:
            out = CLIP.combine(out, e)
        return out

    x, y, z = fold(0, 100), fold(100, 200), fold(200, 300)
    left, right = CLIP.combine(CLIP.combine(x, y), z), CLIP.combine(x, CLIP.combine(y, z))
    ident = CLIP.identity(x)
    hs = [jnp.asarray(h, jnp.float32) for h in (np.zeros(16), np.linspace(-2, 3, 16))]
    for h in hs:
        want = _loop(elems, np.asarray(h))
        for composed in (left, right, CLIP.combine(ident, left), CLIP.combine(left, ident)):
            assert not any(np.isnan(np.asarray(e)).any() for e in composed)
            np.testing.assert_allclose(CLIP.apply(composed, h), want, rtol=1e-5, atol=1e-6)
    if u < 0:
        np.testing.assert_array_equal(left.slope, 0.0)  # every unit saturated somewhere: constants
    else:
        assert np.isinf(np.asarray(left.slope)).all()  # the case that overflows


def _corner_pool():
    """Step sequences, one per column, padded with identity steps to one length: every single
    step h -> clip(a h + b, lo, hi) with a in {0, +-1/2, +-1, +-2}, b in {-1, -1/2, 0, 3/4, 3}
    and each activation's range, and steep ones, 200 steps of clip(+-2 h, lo, hi), bounded (slope
    2**200 = inf in float32, anchor 0, value 0). Dyadic numbers of a few bits: float32 rounds
    nothing, so the composed maps must equal a float64 loop exactly."""
    ranges = [(0.0, np.inf), (0.0, 6.0), (-1.0, 1.0), (-np.inf, np.inf)]
    singles = [
        (a, b, lo, hi) for a in (0, 0.5, -0.5, 1, -1, 2, -2) for b in (-1, -0.5, 0, 0.75, 3) for lo, hi in ranges
    ]
    steep = [(a, 0.0, lo, hi) for a in (2, -2) for lo, hi in ranges[:3] if (a, hi) != (2, np.inf)]
    steep += [(-2.0, 0.0, -1.0, 1.0)]  # 201 steps: slope -inf
    steps = 201
    seqs = np.zeros((4, steps, len(singles) + len(steep)))
    seqs[0], seqs[2], seqs[3] = 1.0, -np.inf, np.inf  # the identity step: a = 1, b = 0, no bounds
    for j, step in enumerate(singles):
        seqs[:, 0, j] = step
    for j, step in enumerate(steep, len(singles)):
        seqs[:, : 200 + (j == seqs.shape[2] - 1), j] = np.array(step)[:, None]
    return seqs


def test_clipped_maps_corner_cases_are_exact():
    # a = 0 (a constant), infinite slopes applied on their anchor (h - t = 0) and meeting a
    # bound on it (lo1 = t2), slopes of 0 and +-1, infinite bounds, relu, relu6, hard_tanh
    # and identity ranges: triples of maps composed both ways, with the identity on either
    # side, equal the float64 loop of their steps exactly, at a grid of h and at the maps' anchors.
    seqs = _corner_pool()
    width = seqs.shape[2]
    maps = clip_maps(*(jnp.asarray(s[0], jnp.float32) for s in seqs))
    for t in range(1, seqs.shape[1]):
        maps = CLIP.combine(maps, clip_maps(*(jnp.asarray(s[t], jnp.float32) for s in seqs)))
    assert np.isinf(np.asarray(maps.slope)).sum() == 4  # -2 under relu and relu6 saturates: constants
    rng = np.random.default_rng(3)
    pick = rng.integers(0, width, (3, 2048))
    pick[:, :width] = np.arange(width)  # every map in every place
    pick[1, width : 2 * width] = np.arange(width)[::-1]
    x, y, z = (jax.tree.map(lambda e, i=i: e[i], maps) for i in pick)
    left, right = CLIP.combine(CLIP.combine(x, y), z), CLIP.combine(x, CLIP.combine(y, z))
    ident = CLIP.identity(left)
    hs = [np.full(pick.shape[1], h, np.float32) for h in (-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5, 6.0, 7.0)]
    hs += [np.asarray(x.anchor), np.asarray(left.anchor), np.asarray(z.anchor)]
    for h in hs:
        want = h.astype(np.float64)
        for i in pick:
            want = _loop(seqs[:, :, i], want)
        for composed in (left, right, CLIP.combine(ident, left), CLIP.combine(left, ident)):
            np.testing.assert_array_equal(CLIP.apply(composed, jnp.asarray(h)), want.astype(np.float32))


@pytest.mark.parametrize(
    "u, steps, bias",
    [
        pytest.param(-1.5, 300, None, marks=pytest.mark.slow),
        pytest.param(-1.1, 1000, None, marks=pytest.mark.slow),
        pytest.param(1.1, 1000, -1.0, marks=pytest.mark.slow),
    ],
)
def test_expanding_recurrent_weight_gives_the_sequential_values_and_gradients(u, steps, bias):
    # |u|**steps overflows float32 while the relu keeps the states bounded: the parallel
    # methods composed maps of infinite slope and gave nan (27% of the outputs at u=-1.5;
    # at u=1.1 a bias of -1 keeps them bounded, and 7% were nan before the anchored maps).
    cell = rj.IndRNN(3)
    params = cell.init(jax.random.key(9), 2)
    params = params._replace(u=jnp.full((3,), u, jnp.float32))
    if bias is not None:
        params = params._replace(b=jnp.full((3,), bias, jnp.float32))
    xs = normal(9, (1, steps, 2))

    def loss(p, x, method):
        ys, h = rj.scan(cell, p, x, method=method)
        return jnp.sum(ys**2) + jnp.sum(h), (ys, h)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnames="method")
    want, (ys, h) = grad(params, xs, rj.Sequential())
    assert np.all(np.isfinite(np.asarray(ys))) and float(jnp.max(ys)) < 10
    scale = float(jnp.max(jnp.abs(ys)))
    gscale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
    for method in (rj.Associative(), rj.Chunked(32)):
        got, values = grad(params, xs, method)
        assert_trees_close(values, (ys, h), atol=1e-5 * scale, rtol=0, err_msg=repr(method))
        assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(got))
        assert_trees_close(got, want, atol=1e-5 * gscale, rtol=0, err_msg=repr(method))


@pytest.mark.parametrize(
    "name, method, reverse",
    [
        pytest.param(
            name,
            method,
            reverse,
            marks=[pytest.mark.slow] if (i + j + reverse) % 2 else [],
            id=f"{name}-{method_id}-{'reverse' if reverse else 'forward'}",
        )
        for i, name in enumerate(CELLS)
        for j, (method_id, method) in enumerate([("associative", rj.Associative()), ("chunked", rj.Chunked(4))])
        for reverse in (False, True)
    ],
)
def test_parallel_methods_match_sequential(name, method, reverse):
    cell = CELLS[name]
    params, xs, carry = data(cell)
    kw = dict(lengths=LENGTHS, resets=RESETS, reverse=reverse)
    expected = rj.scan(cell, params, xs, carry, **kw)
    ys, final = rj.scan(cell, params, xs, carry, method=method, **kw)
    assert_trees_close((ys, final), expected, **F32)
    assert not np.any(np.asarray(ys[1, 5:])) and not np.any(np.asarray(ys[2]))
    lo, hi = cell.clip_range
    assert float(jnp.min(ys[0])) >= lo and float(jnp.max(ys[0])) <= hi


@pytest.mark.parametrize(
    "name, method",
    [("relu", "associative")]
    + [
        pytest.param(name, method, marks=pytest.mark.slow)
        for name, method in [
            ("hard_tanh-signed-nobias", "chunked"),
            ("relu6-signed", "associative"),
            ("relu", "chunked"),
        ]
    ],
)
def test_check_grads_both_modes_and_equal_to_sequential_derivatives(name, method):
    cell = CELLS[name]
    with enable_x64(True):
        params, xs, carry = data(cell, key=3, dtype=jnp.float64, batch=(2,), steps=6)
        lengths, resets = jnp.array([6, 4]), jnp.zeros((2, 6), bool).at[0, 2].set(True)

        def loss(p, x, c, method=method):
            ys, h = rj.scan(
                cell,
                p,
                x,
                c,
                lengths=lengths,
                resets=resets,
                reverse=True,
                method=rj.Chunked(4) if method == "chunked" else method,
            )
            return jnp.sum(jnp.sin(ys)) + jnp.sum(h**2)

        loss = jax.jit(loss, static_argnames="method")  # one compilation for check_grads' calls
        check_grads(loss, (params, xs, carry), order=1, modes=["fwd", "rev"])
        sequential = rj.Sequential(gradient="autodiff")
        got = jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry)
        want = jax.grad(lambda *a: loss(*a, method=sequential), argnums=(0, 1, 2))(params, xs, carry)
        assert_trees_close(got, want, atol=1e-10, rtol=1e-8, check_dtypes=True)
        tangents = jax.tree.map(jnp.ones_like, (params, xs, carry))
        got = jax.jvp(loss, (params, xs, carry), tangents)
        want = jax.jvp(lambda *a: loss(*a, method=sequential), (params, xs, carry), tangents)
        assert_trees_close(got, want, atol=1e-10, rtol=1e-8, check_dtypes=True)


def test_gradient_has_no_sequential_loop():
    cell = CELLS["relu"]
    params, xs, carry = data(cell)

    def loss(p):
        ys, h = rj.scan(cell, p, xs, carry, lengths=LENGTHS, resets=RESETS, reverse=True, method="associative")
        return jnp.sum(ys**2) + jnp.sum(h**2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert not re.search(r"\b(scan|while)\[", jaxpr)


def test_vmap_over_single_sequences_equals_batched_call():
    cell = CELLS["relu6-signed"]
    params, xs, carry = data(cell, key=4)
    run = lambda x, c, n, r: rj.scan(cell, params, x, c, lengths=n, resets=r, reverse=True, method="associative")
    assert_trees_close(jax.vmap(run)(xs, carry, LENGTHS, RESETS), run(xs, carry, LENGTHS, RESETS), **F32)


@pytest.mark.slow
def test_long_sequence_with_long_memory_stays_close():
    # The default u in [0, 1): units with u near 1 sum hundreds of steps, states grow to ~10.
    cell = CELLS["relu"]
    params = cell.init(jax.random.key(5), 8)
    xs = normal(5, (2, 1024, 8))
    expected = rj.scan(cell, params, xs)
    scale = float(jnp.max(jnp.abs(expected[0])))
    assert scale > 3
    for method in (rj.Associative(), rj.Chunked()):
        assert_trees_close(rj.scan(cell, params, xs, method=method), expected, atol=1e-5 * scale, rtol=0)


def test_sequence_scan_picks_the_clipped_scan():
    cell = CELLS["relu"]
    params, xs, carry = data(cell, key=6)
    mesh = jax.make_mesh((1,), ("seq",))
    got = rj.distributed.sequence_scan(cell, params, xs, carry, mesh=mesh, axis="seq", lengths=LENGTHS, resets=RESETS)
    assert_trees_close(got, rj.scan(cell, params, xs, carry, lengths=LENGTHS, resets=RESETS), **F32)
    assert rj.parallel.choose_method(cell, 4096, backend="cpu") == "sequential"  # unmeasured elsewhere: no change


@pytest.mark.parametrize(
    "cell, message",
    [
        (
            rj.IndRNN(3, activation="tanh"),
            "IndRNN(hidden_size=3, activation='tanh', use_bias=True, recurrent_max_abs=None) "
            "(its clip_range is None: the activation is not a clip) is not one",
        ),
        (rj.IndRNN(3, activation=jnp.tanh), "its clip_range is None"),
    ],
)
def test_a_configuration_that_is_not_a_clip_is_refused_by_name(cell, message):
    for method in (rj.Associative(), rj.Chunked()):
        with pytest.raises(
            ValueError,
            match=re.escape(message) + r".*Methods that can run it: rj.Sequential\(\), "
            r"rj.Newton\(\), rj.Auto\(\)",
        ):
            rj.RNN(cell, method=method)


def test_training_with_the_clipped_scan_follows_the_sequential_loss_curve():
    # The parallel method changes the speed, not the model: 25 Adam steps from the same
    # parameters on the same batches. float64, so that the curves may differ by rounding only.
    import optax

    cell = rj.IndRNN(6, recurrent_max_abs=1.0)
    with enable_x64(True):
        params = {"rnn": cell.init(jax.random.key(7), 2, jnp.float64), "out": jnp.zeros(6)}
        xs = jnp.asarray(np.random.default_rng(7).uniform(size=(8, 40, 2)))
        target = jnp.mean(xs[..., 0] * xs[..., 1], axis=1)
        optimizer = optax.adam(3e-2)

        def curve(method):
            def loss(p):
                _, last = rj.scan(cell, p["rnn"], xs, lengths=jnp.arange(8) * 4 + 12, method=method)
                return jnp.mean((last @ p["out"] - target) ** 2)

            @jax.jit
            def step(p, state):
                value, grads = jax.value_and_grad(loss)(p)
                updates, state = optimizer.update(grads, state, p)
                return optax.apply_updates(p, updates), state, value

            p, state, values = params, optimizer.init(params), []
            for _ in range(25):
                p, state, value = step(p, state)
                values.append(float(value))
            return np.array(values)

        sequential, parallel = curve(rj.Sequential()), curve(rj.Associative())
    assert sequential[-1] < 0.5 * sequential[0]  # it learns
    np.testing.assert_allclose(parallel, sequential, rtol=1e-9)
