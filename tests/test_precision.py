"""rj.Mixed (rnnjax/precision.py): bfloat16 and float16 compute with float32 parameters and
carry on every cell family, the float32 identity, layers, vmap, lengths, grads, errors, and
a smoke run of benchmarks/precision_drift.py."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.precision import cast_floating
from tests.cases import CELL_CASES, random_case

FAMILIES = ["elman", "lstm_proj_peephole", "gru", "mgu", "indrnn", "mingru", "minlstm", "lru", "convlstm"]
COMPUTE = {"bf16": jnp.bfloat16, "f16": jnp.float16}
STEPS = 8
BATCH = (3,)


def _carry_dtype(leaf_dtype):
    return jnp.complex64 if jnp.issubdtype(leaf_dtype, jnp.complexfloating) else jnp.float32


def _rel(a, b):
    """Norm-wise relative difference, in float64."""
    a, b = np.asarray(a, np.complex128).ravel(), np.asarray(b, np.complex128).ravel()
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.lru_cache(maxsize=None)
def _run(cell):
    """One jitted function per cell: outputs, final carry and the gradient of sum(y^2)
    with respect to the parameters, from one forward and one backward pass."""

    def loss(params, xs):
        ys, carry = rj.scan(cell, params, xs)
        return jnp.sum(ys.astype(jnp.float32) ** 2), (ys, carry)

    def run(params, xs):
        grads, (ys, carry) = jax.grad(loss, has_aux=True)(params, xs)
        return ys, carry, grads

    return jax.jit(run)


# Tolerances, in units of the compute dtype's unit roundoff u = eps / 2 (bfloat16 2^-8,
# float16 2^-11), for norm-wise relative errors. Each step rounds its operands and results
# to about u relative (a dot of n terms with random signs: about sqrt(n) u of its largest
# terms, which the norm averages down). The cells are contractive at initialisation
# (Jacobian norm below 1), so errors from earlier steps do not grow: over T = 8 steps, plus
# the rounding of the inputs and of the output, they add up to at most (T + 2) u = 10 u
# (measured: 1-5 u). A gradient goes through the T steps twice (forward, then the
# transposed Jacobians in compute dtype): 2 (T + 2) u = 20 u (measured: 0.5-3 u). The
# LRU's gradient with respect to theta_log is the exception: its phases exp(theta_log)
# reach 2 pi and its terms, of both signs, cancel over the steps, so its relative error
# is larger (measured 23 u in bfloat16, 31 u in float16): 64 u for the LRU's gradients.
def _tolerances(name, compute):
    """(outputs and carry, gradients)."""
    u = float(jnp.finfo(compute).eps) / 2
    steps = (STEPS + 2) * u
    return steps, (64 * u if name.startswith("lru") else 2 * steps)


@pytest.mark.parametrize("compute", COMPUTE, ids=list(COMPUTE))
@pytest.mark.parametrize("name", FAMILIES)
def test_dtypes_and_closeness_to_float32(name, compute):
    cell = CELL_CASES[name]
    dtype = COMPUTE[compute]
    params, xs, _ = random_case(cell, STEPS, batch=BATCH)
    ys, carry, grads = _run(rj.Mixed(cell, compute_dtype=dtype))(params, xs)
    ref_ys, ref_carry, ref_grads = _run(cell)(params, xs)

    assert ys.dtype == dtype and ys.shape == ref_ys.shape
    for leaf, ref in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry)):
        assert leaf.dtype == _carry_dtype(ref.dtype) and leaf.shape == ref.shape
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert g.dtype == p.dtype == jnp.float32
        assert np.isfinite(np.asarray(g)).all()

    tol, grad_tol = _tolerances(name, dtype)
    assert _rel(ys.astype(jnp.float32), ref_ys) < tol
    for leaf, ref in zip(jax.tree.leaves(carry), jax.tree.leaves(ref_carry)):
        assert _rel(leaf, ref) < tol
    for field, g, ref in zip(params._fields, grads, ref_grads):
        if ref is not None:
            assert _rel(g, ref) < grad_tol, field


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_compute_is_the_cell_itself(name):
    cell = CELL_CASES[name]
    params, xs, carry = random_case(cell, 5, batch=BATCH)
    lengths = jnp.array([5, 2, 0])
    mixed = rj.Mixed(cell, compute_dtype=jnp.float32, carry_dtype=jnp.float32)
    got = rj.scan(mixed, params, xs, carry, lengths=lengths)
    want = rj.scan(cell, params, xs, carry, lengths=lengths)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_follows_the_stated_equations():
    """Eagerly (op by op, every result rounded to its dtype): h_{t+1} = h + (F_c(rho(h)) - rho(h))
    with accumulate, F_c(rho(h)) cast up without; y in compute dtype or output_dtype."""
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), 3)
    h = jax.random.normal(jax.random.key(1), (2, 4))  # not representable in bfloat16
    x = jax.random.normal(jax.random.key(2), (2, 3))
    bf = jnp.bfloat16
    n, y = cell.step(jax.tree.map(lambda a: a.astype(bf), params), h.astype(bf), x.astype(bf))

    new, got_y = rj.Mixed(cell, bf).step(params, h, x)
    assert new.dtype == jnp.float32 and got_y.dtype == bf
    np.testing.assert_array_equal(np.asarray(new), np.asarray(h + (n.astype(jnp.float32) - h.astype(bf).astype(jnp.float32))))
    np.testing.assert_array_equal(np.asarray(got_y, np.float32), np.asarray(y, np.float32))
    assert not np.array_equal(np.asarray(new), np.asarray(n, np.float32))  # the low bits of h survive

    new, got_y = rj.Mixed(cell, bf, accumulate=False, output_dtype=jnp.float32).step(params, h, x)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(n, np.float32))
    assert got_y.dtype == jnp.float32


def test_accumulate_and_plain_agree_from_a_representable_carry():
    """With every result rounded to bfloat16 and h_0 = 0, rho(h_t) = h_t at every step, so
    accumulating the increment gives exactly the plain update (see the Mixed docstring)."""
    cell = rj.Elman(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (5, 2, 3))
    acc, plain = rj.Mixed(cell), rj.Mixed(cell, accumulate=False)
    h_acc = h_plain = acc.init_carry((2,))
    for x in xs:  # eager steps: no fusion keeps excess precision
        h_acc, _ = acc.step(params, h_acc, x)
        h_plain, _ = plain.step(params, h_plain, x)
        np.testing.assert_array_equal(np.asarray(h_acc), np.asarray(h_plain))


def test_vmap_matches_the_batched_call():
    for name in ("lstm", "convlstm", "lru"):
        cell = rj.Mixed(CELL_CASES[name])
        params, xs, _ = random_case(cell, 6, batch=(2,))
        batched = rj.scan(cell, params, xs)
        mapped = jax.vmap(lambda x, c=cell, p=params: rj.scan(c, p, x))(xs)
        for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(batched)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a, np.complex128), np.asarray(b, np.complex128), atol=1e-2)


def test_lengths_and_reverse_freeze_the_float32_carry():
    cell = rj.Mixed(rj.LSTM(4), jnp.float16)
    params, xs, _ = random_case(cell, 6, batch=(3,))
    lengths = jnp.array([6, 3, 0])
    for reverse in (False, True):
        ys, (h, c) = rj.scan(cell, params, xs, lengths=lengths, reverse=reverse)
        assert ys.dtype == jnp.float16 and h.dtype == c.dtype == jnp.float32
        assert not np.asarray(ys[1, 3:]).any() and not np.asarray(ys[2]).any()
        # Sequence 1 alone, cut at its length: the same outputs and final carry.
        ys1, (h1, c1) = rj.scan(cell, params, xs[1, :3], reverse=reverse)
        np.testing.assert_array_equal(np.asarray(ys[1, :3], np.float32), np.asarray(ys1, np.float32))
        np.testing.assert_array_equal(np.asarray(h[1]), np.asarray(h1))
        np.testing.assert_array_equal(np.asarray(c[1]), np.asarray(c1))
        assert not np.asarray(h[2]).any()  # length 0: the initial carry


def test_inside_rnn_bidirectional_and_stack():
    gru = rj.Mixed(rj.GRU(4))
    layer = rj.Stack([rj.Bidirectional(rj.RNN(gru)), rj.RNN(rj.Mixed(rj.LSTM(4), jnp.float16))])
    params = layer.init(jax.random.key(0), input_size=3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    lengths = jnp.array([5, 2])
    ys, ((h_fwd, h_bwd), (h, c)) = jax.jit(lambda p, x: layer.apply(p, x, lengths=lengths))(params, xs)
    assert ys.shape == (2, 5, 4) and ys.dtype == jnp.float16
    assert {h_fwd.dtype, h_bwd.dtype, h.dtype, c.dtype} == {jnp.dtype(jnp.float32)}
    assert not np.asarray(ys[1, 2:]).any()
    # The Bidirectional layer equals its two directions run by rj.scan.
    fwd, bwd = params[0]
    y_f, h_f = rj.scan(gru, fwd, xs, lengths=lengths)
    y_b, h_b = rj.scan(gru, bwd, xs, lengths=lengths, reverse=True)
    y_bi, _ = rj.Bidirectional(rj.RNN(gru)).apply(params[0], xs, lengths=lengths)
    np.testing.assert_array_equal(np.asarray(y_bi, np.float32), np.asarray(jnp.concatenate([y_f, y_b], -1), np.float32))
    np.testing.assert_array_equal(np.asarray(h_fwd), np.asarray(h_f))
    np.testing.assert_array_equal(np.asarray(h_bwd), np.asarray(h_b))


def test_remat_and_newton_give_the_same_numbers():
    cell = rj.Mixed(rj.GRU(3))
    params, xs, _ = random_case(cell, 9, batch=(2,))

    def grads(**opts):
        return jax.grad(lambda p: jnp.sum(rj.scan(cell, p, xs, **opts)[0].astype(jnp.float32) ** 2))(params)

    ref = grads()
    for remat in (True, "sqrt"):
        for a, b in zip(jax.tree.leaves(grads(remat=remat)), jax.tree.leaves(ref)):
            assert a.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    ys, h = rj.scan(cell, params, xs)
    ys_n, h_n = rj.scan(cell, params, xs, method="newton")
    assert ys_n.dtype == ys.dtype and h_n.dtype == h.dtype
    # Newton iterates to the sequential solution (or falls back to it): equal up to a
    # bfloat16 rounding of the last step.
    np.testing.assert_allclose(np.asarray(ys_n, np.float32), np.asarray(ys, np.float32), atol=2e-2)


def test_linear_methods_reject_the_wrapper():
    cell = rj.Mixed(rj.MinGRU(4))
    params, xs, _ = random_case(cell, 4)
    for method in ("associative", "chunked"):
        with pytest.raises(ValueError, match="linear recurrence.*Mixed is not"):
            rj.scan(cell, params, xs, method=method)
        with pytest.raises(ValueError, match="linear recurrence"):
            rj.RNN(cell, method=method)
    assert rj.scan(cell, params, xs, method="auto")[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("field", ["compute_dtype", "carry_dtype", "output_dtype"])
@pytest.mark.parametrize("bad", [jnp.int32, "int8", jnp.bool_, jnp.complex64, "nonsense", 3])
def test_bad_dtypes_raise(field, bad):
    with pytest.raises(ValueError, match=rf"{field}=.*expected one of \['bfloat16', 'float16', 'float32', 'float64'\]"):
        rj.Mixed(rj.GRU(4), **{field: bad})


def test_other_bad_arguments_raise():
    with pytest.raises(ValueError, match="compute_dtype=None"):
        rj.Mixed(rj.GRU(4), compute_dtype=None)
    with pytest.raises(TypeError, match="accumulate must be True or False"):
        rj.Mixed(rj.GRU(4), accumulate=1)
    with pytest.raises(TypeError, match="Mixed expects an rnnjax cell"):
        rj.Mixed(rj.RNN(rj.GRU(4)))
    cell = rj.Mixed(rj.GRU(4))
    params = cell.init(jax.random.key(0), 3)
    with pytest.raises(TypeError, match="x has dtype int32"):
        cell.step(params, cell.init_carry(), jnp.ones(3, jnp.int32))
    with pytest.raises(ValueError, match=r"xs has shape \(5, 2\); expected \(\.\.\., T, 3\)"):
        rj.scan(cell, params, jnp.ones((5, 2)))
    with pytest.raises(TypeError, match="params is a LSTMParams; expected GRUParams"):
        rj.scan(cell, rj.LSTM(4).init(jax.random.key(0), 3), jnp.ones((5, 3)))


def test_config_is_static_hashable_and_normalised():
    a = rj.Mixed(rj.GRU(4), "bfloat16", "float32")
    b = rj.Mixed(rj.GRU(4), jnp.bfloat16, np.float32)
    assert a == b and hash(a) == hash(b) and a.compute_dtype == jnp.dtype(jnp.bfloat16)
    assert a != rj.Mixed(rj.GRU(4), jnp.float16)
    assert a.input_ndim == 1 and rj.Mixed(rj.ConvLSTM(2)).input_ndim == 3
    assert a.params_type is rj.GRU(4).params_type and a.output_size(3) == 4
    params = a.init(jax.random.key(0), 3)
    xs = jnp.ones((2, 5, 3))
    fn = jax.jit(lambda c, p, x: rj.scan(c, p, x)[0], static_argnums=0)
    fn(a, params, xs)
    size = fn._cache_size()
    fn(b, params, xs)
    assert fn._cache_size() == size  # b is the same static config: no recompile


def test_params_keep_their_dtype_and_init_carry_ignores_dtype():
    # (MinGRU: the orthogonal initialiser of the other cells' w_h has no bfloat16 QR on CPU.)
    assert rj.Mixed(rj.MinGRU(4)).init(jax.random.key(0), 3, jnp.bfloat16).w.dtype == jnp.bfloat16
    cell = rj.Mixed(rj.LSTM(4))
    h, c = cell.init_carry((2,), jnp.bfloat16)
    assert h.dtype == c.dtype == jnp.float32
    lru = rj.Mixed(rj.LRU(4), jnp.float16)
    assert lru.init_carry((2,)).dtype == jnp.complex64


def test_cast_floating_touches_real_and_complex_floats_only():
    tree = {"f": jnp.ones(2), "i": jnp.arange(2), "b": jnp.array([True]), "c": jnp.ones(2, jnp.complex64),
            "none": None}
    out = cast_floating(tree, jnp.bfloat16)
    assert out["f"].dtype == jnp.bfloat16 and out["i"].dtype == tree["i"].dtype
    assert out["b"].dtype == jnp.bool_ and out["c"].dtype == jnp.complex64 and out["none"] is None


def test_drift_script_smoke(tmp_path):
    from benchmarks import precision_drift

    result = precision_drift.main(["--tiny", "--cells", "gru,lru", "--variants", "bf16,bf16-noacc,f16",
                                   "--length", "120", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "precision_drift.json").read_text())
    assert data["meta"]["options"]["length"] == 120 and data["meta"]["jax"]
    rows = {(r["cell"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(c, v) for c in ("gru", "lru") for v in ("bf16", "bf16-noacc", "f16")}
    for r in rows.values():
        assert r["finite"] and list(r["at"]) == ["100"] and 0 < r["mean"] <= r["max"] < 1
    # float16 keeps 3 more significand bits than bfloat16: its drift is smaller.
    assert rows[("gru", "f16")]["mean"] < rows[("gru", "bf16")]["mean"]
    md = (tmp_path / "precision_drift.md").read_text()
    assert "| gru | bf16 |" in md and "t=100" in md and "bfloat16:" in md
    assert result["files"]["md"] == tmp_path / "precision_drift.md"
