"""rj.SLSTM (xLSTM's sLSTM) against NX-AI's xlstm package (its "vanilla" PyTorch cell, values
and gradients in tests/fixtures/slstm_xlstm.npz, written by tests/fixtures/make_slstm_fixture.py;
neither xlstm nor torch is needed here), its default initialisation, its Jacobian blocks, the
fused gradient and Newton against the sequential loop, and extreme gates."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnjax as rj
from rnnjax.cells import SLSTMParams, SLSTMState
from tests.cases import normal
from tests.cells.test_para import assert_blocks_are_the_jacobian
from tests.compat import enable_x64
from tests.helpers import assert_trees_close

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "slstm_xlstm.npz"
D = 3


@functools.cache
def fixture():
    with np.load(FIXTURE) as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("config"))), arrays


def params_from_reference(cell, w, recurrent_kernel, bias, dtype):
    """The reference's layouts (``w``: ``(D, 4 * hidden)``; ``recurrent_kernel``: ``(heads,
    head_dim, 4, head_dim)``; ``bias``: ``(heads, 4, head_dim)``) as SLSTMParams."""
    dh, hidden = cell.head_dim, cell.hidden_size
    return SLSTMParams(
        w_x=jnp.asarray(w, dtype),
        w_h=jnp.asarray(np.asarray(recurrent_kernel).transpose(1, 2, 0, 3).reshape(dh, 4 * hidden), dtype),
        b=jnp.asarray(np.asarray(bias).transpose(1, 0, 2).reshape(-1), dtype),
    )


def reference_case(dtype):
    config, z = fixture()
    cell = rj.SLSTM(config["hidden_size"], num_heads=config["num_heads"])
    params = params_from_reference(cell, z["w"], z["recurrent_kernel"], z["bias"], dtype)
    carry = SLSTMState(*(jnp.asarray(s, dtype) for s in z["state0"]))
    return cell, params, jnp.asarray(z["x"], dtype), carry, z


@functools.cache
def scan_fn(cell):
    return jax.jit(lambda p, xs, c: rj.scan(cell, p, xs, c))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["float32", "float64"])
def test_outputs_and_final_state_match_xlstm(dtype):
    with enable_x64(dtype == jnp.float64):
        cell, params, xs, carry, z = reference_case(dtype)
        # float64: the same operations in other orders; float32: the reference's own float32 run
        # is 4.4e-7 from its float64 one (config["float32_reference_max_err"]), and ours 1.6e-7
        # (outputs) and 4.4e-7 (state, m up to ~10) from it.
        tol = dict(atol=1e-12, rtol=1e-12) if dtype == jnp.float64 else dict(atol=3e-6, rtol=3e-6)
        ys, final = scan_fn(cell)(params, xs, carry)
        assert ys.dtype == dtype
        assert_trees_close((ys, final), (z["ys"], SLSTMState(*z["state"])), **tol)
        # From the zero state the reference takes m_1 = i_1 (its n == 0 case); h does not depend on it.
        ys, final = scan_fn(cell)(params, xs, cell.init_carry(xs.shape[:1], dtype))
        assert_trees_close((ys, final), (z["ys_zero"], SLSTMState(*z["state_zero"])), **tol)


def test_gradients_match_xlstm():
    with enable_x64(True):
        cell, params, xs, carry, z = reference_case(jnp.float64)

        def loss(p, x, c):
            ys, final = rj.scan(cell, p, x, c)
            return jnp.sum(ys * z["ys_cot"]) + jnp.sum(jnp.stack(final) * z["state_cot"])

        g_params, g_x, g_carry = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)
        expected = params_from_reference(cell, z["grad_w"], z["grad_recurrent_kernel"], z["grad_bias"], jnp.float64)
        assert_trees_close(
            (g_params, g_x, g_carry), (expected, z["grad_x"], SLSTMState(*z["grad_state0"])), atol=1e-12, rtol=1e-10
        )


def test_default_init_is_the_references():
    config, z = fixture()
    cell = rj.SLSTM(config["hidden_size"], num_heads=config["num_heads"])
    params = jax.jit(cell.init, static_argnums=1)(jax.random.key(0), 64)
    expected = params_from_reference(cell, params.w_x, z["default_recurrent_kernel"], z["default_bias"], jnp.float32)
    # The reference computes the power law in float32 in another order: a few float32 ulps of 7.
    assert_trees_close(params, expected, atol=2e-6, rtol=0)
    assert not np.any(np.asarray(params.w_h))  # the reference's zero init, exactly
    np.testing.assert_allclose(np.std(np.asarray(params.w_x)), np.sqrt(2 / (5 * 64)), rtol=0.05)
    assert rj.SLSTM(4, num_heads=4).init(jax.random.key(0), D).b[4:8].tolist() == [5.0] * 4  # head_dim 1


def test_bad_config_and_params_raise():
    with pytest.raises(ValueError, match="hidden_size=6 is not a multiple of num_heads=4"):
        rj.SLSTM(6)
    with pytest.raises(ValueError, match="num_heads.*0"):
        rj.SLSTM(4, num_heads=0)
    cell = rj.SLSTM(8, num_heads=2)
    params = cell.init(jax.random.key(0), D)
    wrong = rj.SLSTM(8, num_heads=4).init(jax.random.key(0), D)
    with pytest.raises(ValueError, match=r"params.w_h has shape \(2, 32\); expected \(4, 32\)"):
        cell.step(wrong, cell.init_carry(()), jnp.ones(D))
    with pytest.raises(ValueError, match=r"x has shape \(4,\); expected \(..., 3\)"):
        cell.step(params, cell.init_carry(()), jnp.ones(4))


def random_params(cell, seed, dtype=np.float32, scale=0.5):
    """Every parameter random (the init zeroes ``w_h``)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), D))
    return SLSTMParams(*(jnp.asarray(scale * rng.normal(size=s.shape), dtype) for s in shapes))


def random_state(cell, batch, seed, dtype=np.float32):
    """A state as a trajectory leaves it: ``n > 0``, ``|c| <= n``."""
    rng = np.random.default_rng(seed)
    shape = (*batch, cell.hidden_size)
    n = rng.uniform(0.5, 2.0, shape)
    h, c, m = rng.uniform(-1, 1, shape), n * rng.uniform(-1, 1, shape), rng.normal(size=shape)
    return SLSTMState(*(jnp.asarray(a, dtype) for a in (h, c, n, m)))


@pytest.mark.slow
@pytest.mark.parametrize("heads", [8, 2], ids=["head_dim1", "head_dim4"])
def test_jacobian_blocks(heads):
    """One unit per head: the blocks are the exact Jacobian (and nothing lies outside them).
    Four: they are its unit-diagonal entries, and the units do mix."""
    cell = rj.SLSTM(8, num_heads=heads)
    with enable_x64(True):
        params = random_params(cell, 3, np.float64)
        carry, x = random_state(cell, (2,), 4, np.float64), jnp.asarray(normal(5, (2, D), np.float64))
        if heads == 8:
            assert cell.jacobian_kind == "exact"
            assert_blocks_are_the_jacobian(cell, params, carry, x)
            return
        assert cell.jacobian_kind == "unit-diagonal"
        (new, y), blocks = cell.step_with_jacobian(params, carry, x)
        assert_trees_close((new, y), cell.step(params, carry, x), atol=0, rtol=0)
        full = jax.vmap(jax.jacfwd(lambda c, x: cell.step(params, c, x)[0]))(carry, x)  # full[k][m]: (2, 8, 8)
        diag = lambda a: jnp.diagonal(a, axis1=-2, axis2=-1)  # noqa: E731
        expected = jnp.stack([jnp.stack([diag(full[k][m]) for m in range(4)], -1) for k in range(4)], -2)
        np.testing.assert_allclose(np.asarray(blocks), np.asarray(expected), rtol=1e-12, atol=1e-14)
        off = full[0][0] * (1 - jnp.eye(8))  # d h_t / d h_{t-1} between distinct units of a head
        assert float(jnp.max(jnp.abs(off))) > 1e-3 and not np.any(np.asarray(off[:, :4, 4:]))  # heads don't mix


@pytest.mark.slow
def test_one_head_takes_the_fused_gradient_and_equals_autodiff():
    cell = rj.SLSTM(4, num_heads=1)
    assert cell.fusable and not rj.SLSTM(4, num_heads=2).fusable
    assert rj.Sequential().uses_fused(cell)
    with enable_x64(True):
        params, carry = random_params(cell, 6, np.float64), random_state(cell, (2,), 7, np.float64)
        xs = jnp.asarray(normal(8, (2, 5, D), np.float64))

        def loss(p, x, c, gradient):
            ys, final = rj.scan(cell, p, x, c, method=rj.Sequential(gradient=gradient))
            return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(leaf**2) for leaf in final)

        grads = [jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry, g) for g in ("fused", "autodiff")]
        assert_trees_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)


@pytest.mark.slow
def test_newton_deer_converges_to_the_sequential_values():
    """One unit per head: exact Jacobian blocks, so DEER (4 x 4 blocks) is exact Newton."""
    cell = rj.SLSTM(4, num_heads=4)
    params, carry = random_params(cell, 9), random_state(cell, (2,), 10)
    xs = normal(11, (2, 12, D))
    ys, final, info = rj.parallel.newton_scan(cell, params, xs, carry, newton="deer")
    assert bool(info.converged) and int(info.iterations) < 12  # no fallback, fewer than T steps
    assert_trees_close((ys, final), rj.scan(cell, params, xs, carry), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_newton_quasi_deer_with_heads_equals_sequential():
    cell = rj.SLSTM(8, num_heads=2)
    params, carry = random_params(cell, 12, scale=0.3), random_state(cell, (2,), 13)
    xs = normal(14, (2, 16, D))
    ys, final, info = rj.parallel.newton_scan(cell, params, xs, carry, newton="quasi-deer")
    assert bool(info.converged)
    assert_trees_close((ys, final), rj.scan(cell, params, xs, carry), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_check_grads_float64():
    cell = rj.SLSTM(4, num_heads=2)
    with enable_x64(True):
        params, carry = random_params(cell, 15, np.float64), random_state(cell, (2,), 16, np.float64)
        xs = jnp.asarray(normal(17, (2, 4, D), np.float64))

        @jax.jit
        def loss(p, x, c):
            ys, final = rj.scan(cell, p, x, c, lengths=jnp.array([4, 2]))
            return jnp.sum(ys**2) + sum(jnp.sum(leaf**2) for leaf in final)

        check_grads(loss, (params, xs, carry), order=2, modes=["rev"])


def extreme_case():
    """Input-gate pre-activations of +/-30 and +100 (exp(100) overflows float32): input features
    D.. drive them one to one."""
    cell = rj.SLSTM(4, num_heads=2)
    params = random_params(cell, 18)
    rng = np.random.default_rng(19)
    gate = np.where(rng.random((2, 9, 4)) < 0.5, 30.0, -30.0)
    gate[:, 4] = 100.0
    xs = jnp.asarray(np.concatenate([rng.normal(size=(2, 9, D)), gate], -1), jnp.float32)
    w_x = jnp.zeros((D + 4, 16)).at[:D].set(params.w_x).at[D:, :4].set(jnp.eye(4))
    return cell, params._replace(w_x=w_x), xs, random_state(cell, (2,), 20)


def test_extreme_input_gates_stay_finite():
    """Outputs and state finite, and |h| <= 1: h is sigma(o) times a weighted mean of tanh
    values (the initial |c| <= n)."""
    cell, params, xs, carry = extreme_case()
    ys, final = scan_fn(cell)(params, xs, carry)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves((ys, final)))
    assert float(jnp.max(jnp.abs(ys))) <= 1.0


@pytest.mark.slow
def test_extreme_input_gates_give_finite_gradients_and_float32_close_to_float64():
    cell, params, xs, carry = extreme_case()

    def loss(p, x, c):
        ys, final = rj.scan(cell, p, x, c)
        return jnp.sum(ys) + jnp.sum(final.h), (ys, final)

    grads, (ys, final) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(params, xs, carry)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(grads))
    with enable_x64(True):
        wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, xs, carry))
        ys64, final64 = rj.scan(cell, *wide)
    assert_trees_close((ys, final.h), (ys64, final64.h), atol=1e-5, rtol=0)
