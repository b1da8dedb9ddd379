"""rj.Sequential(gradient="fused") (rnnjax/engines/fused.py), the default derivative of dense
cells: the sequence-level derivative equals autodiff's in reverse and forward mode, with
lengths, resets, reverse, an initial carry, several batch axes, vmap, jit and second order;
bad combinations are errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from tests.cases import CELL_CASES, normal, random_case
from tests.compat import enable_x64

DENSE = [name for name, cell in CELL_CASES.items() if isinstance(cell, rj.cell.DenseCell) and cell.fusable]
STEPS = 7


def test_the_dense_cells_are_the_three_families():
    assert {type(CELL_CASES[n]).__name__ for n in DENSE} == {"Elman", "LSTM", "GRU"}


@jax.jit
def _identity(x):
    return x


def _loss(cell, vjp, reverse):
    method = rj.Sequential(gradient=vjp)

    def loss(params, xs, carry, lengths, resets):
        ys, final = rj.scan(cell, params, xs, carry, lengths=lengths, resets=resets, reverse=reverse, method=method)
        # Weighted so that every output and carry entry gets its own cotangent.
        w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
        return jnp.sum(w * ys) + sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(final))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


# Each dense configuration in one direction, forward and reverse by turns; make test-all runs
# the other direction too (each case compiles two gradients).
@pytest.mark.parametrize("name, reverse", [
    pytest.param(name, reverse, marks=[pytest.mark.slow] if (i + reverse) % 2 else [], id=f"{name}-{reverse}")
    for i, name in enumerate(DENSE) for reverse in (False, True)])
def test_fused_gradients_equal_autodiff(name, reverse):
    cell = CELL_CASES[name]
    params, xs, carry = random_case(cell, STEPS, key=3, batch=(3,))
    lengths = jnp.array([STEPS, 4, 0])
    resets = jnp.zeros((3, STEPS), bool).at[:, 2].set(True).at[1, 5].set(True)
    ref = _loss(cell, "autodiff", reverse)(params, xs, carry, lengths, resets)
    got = _loss(cell, "fused", reverse)(params, xs, carry, lengths, resets)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"{name}{jax.tree_util.keystr(path)}")


def test_fused_forward_is_the_same_loop():
    cell = CELL_CASES["lstm_proj_peephole"]
    params, xs, carry = random_case(cell, STEPS, key=4, batch=(2, 3))  # two batch axes
    ys, final = rj.scan(cell, params, xs, carry, method=rj.Sequential(gradient="fused"))
    ref_ys, ref_final = rj.scan(cell, params, xs, carry)
    np.testing.assert_array_equal(ys, ref_ys)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(ref_final)):
        np.testing.assert_array_equal(a, b)


def test_fused_under_vmap_and_second_order():
    cell = CELL_CASES["gru"]
    params, xs, _ = random_case(cell, 5, key=5, batch=(4,))

    def loss(p, x, vjp):
        return jnp.sum(rj.scan(cell, p, x, method=rj.Sequential(gradient=vjp))[0] ** 2)

    # Jitted: one compilation each, instead of one per eager operation.
    per_example = jax.jit(jax.vmap(jax.grad(lambda p, x: loss(p, x, "fused")), in_axes=(None, 0)))(params, xs)
    ref = jax.jit(jax.vmap(jax.grad(lambda p, x: loss(p, x, "autodiff")), in_axes=(None, 0)))(params, xs)
    for a, b in zip(jax.tree.leaves(per_example), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    with enable_x64(True):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        x64 = xs[:2, :3].astype(jnp.float64)
        check_grads(jax.jit(lambda p, x: loss(p, x, "fused")), (p64, x64), order=2, modes=["rev"], atol=1e-4, rtol=1e-4)


def test_fused_inside_data_parallel_and_layers():
    fused = rj.Sequential(gradient="fused")
    layer = rj.Stack([rj.Bidirectional(rj.RNN(rj.LSTM(4), method=fused)), rj.RNN(rj.GRU(4), method=fused)])
    plain = rj.Stack([rj.Bidirectional(rj.RNN(rj.LSTM(4))), rj.RNN(rj.GRU(4))])
    params = layer.init(jax.random.key(0), 3)
    xs = normal(1, (4, 6, 3))
    lengths = jnp.array([6, 3, 1, 5])
    loss = lambda lay: jax.grad(lambda p: jnp.sum(lay.apply(p, xs, lengths=lengths)[0] ** 2))
    mesh = jax.make_mesh((1,), ("data",))
    with rj.distributed.data_parallel(mesh, "data"):
        got = jax.jit(loss(layer))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(loss(plain))(params))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_fused_rejects_what_it_cannot_do():
    cell = rj.MinGRU(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jnp.ones((2, 5, 3))
    fused = rj.Sequential(gradient="fused")
    with pytest.raises(ValueError, match=r"gradient='fused' needs a dense cell .* MinGRU with this configuration is not one"):
        rj.scan(cell, params, xs, method=fused)
    with pytest.raises(ValueError, match="does not combine with remat='sqrt'"):
        rj.Sequential(gradient="fused", remat="sqrt")
    with pytest.raises(ValueError, match=r"gradient must be one of \('auto', 'autodiff', 'fused'\), got 'manual'"):
        rj.Sequential(gradient="manual")
    with pytest.raises(ValueError, match="needs a dense cell"):
        rj.RNN(rj.LRU(4), method=fused)
    with pytest.raises(ValueError, match="needs a dense cell"):
        rj.RNN(rj.GRU(4, reset_after=False), method=fused)


def test_the_default_derivative_of_dense_cells_is_the_fused_one():
    default, lstm, gru_before = rj.Sequential(), rj.LSTM(4), rj.GRU(4, reset_after=False)
    assert default.uses_fused(lstm) and not default.uses_fused(gru_before) and not default.uses_fused(rj.MinGRU(4))
    assert not rj.Sequential(remat="step").uses_fused(lstm) and not rj.Sequential(gradient="autodiff").uses_fused(lstm)
    params, xs, carry = random_case(lstm, 3, key=1, batch=(2,))
    grad = lambda method: jax.make_jaxpr(jax.grad(lambda p: jnp.sum(rj.scan(lstm, p, xs, carry, method=method)[0])))
    assert str(grad(default)(params)) == str(grad(rj.Sequential(gradient="fused"))(params))
    assert str(grad(default)(params)) != str(grad(rj.Sequential(gradient="autodiff"))(params))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", ["lstm_proj_peephole", "gru"])
def test_forward_mode_equals_autodiff(name, reverse):
    # jax.jvp runs the tangent loop; jax.linearize and jax.jacfwd go through the same rule.
    cell = CELL_CASES[name]
    params, xs, carry = random_case(cell, STEPS, key=6, batch=(3,))
    lengths = jnp.array([STEPS, 4, 0])
    resets = jnp.zeros((3, STEPS), bool).at[:, 2].set(True)
    tangents = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), (params, xs, carry))

    def run(gradient):
        method = rj.Sequential(gradient=gradient)
        f = lambda p, x, c: rj.scan(cell, p, x, c, lengths=lengths, resets=resets, reverse=reverse, method=method)
        return jax.jit(lambda primals, tangents: jax.jvp(f, primals, tangents))((params, xs, carry), tangents)

    for a, b in zip(jax.tree.leaves(run("fused")), jax.tree.leaves(run("autodiff"))):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name", DENSE)
def test_summed_columns_are_read_only_as_a_sum(name):
    # DenseCell.summed_columns lets vjp="fused" keep those columns once; the claim must hold
    # exactly, and the next column must not have the property (the claim is the largest).
    cell = CELL_CASES[name]
    params, xs, carry = random_case(cell, steps=1)
    zx = rj.ops.matmul(xs[:, 0], params.w_x)
    zh = rj.ops.matmul(cell.recurrent_input(carry), params.w_h)
    width = zx.shape[-1]
    k = cell.summed_columns(width)
    assert 0 < k <= width

    def moved(cols):  # the first `cols` columns summed into zx, zeroed in zh
        return cell.update(params, carry, zx.at[:, :cols].add(zh[:, :cols]), zh.at[:, :cols].set(0.0))

    exact = lambda a, b: all(bool(jnp.array_equal(u, v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    reference = cell.update(params, carry, zx, zh)
    assert exact(moved(k), reference), f"{name}: update changes when its {k} summed columns arrive summed"
    if k < width:
        assert not exact(moved(k + 1), reference), f"{name}: column {k} is read only as a sum too"
