"""rj.Mixed (rnnjax/precision.py): bfloat16 and float16 compute with float32 parameters and
carry on every cell family, in both carry modes, the float32 identity, layers, vmap,
lengths, grads, errors, a smoke run of benchmarks/lab/precision_drift.py; and what it relies on
in rnnjax/cell.py: the autocast products (matmul, conv) and 16-bit initialisation."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax.ops import conv, matmul
from rnnjax.precision import CARRY_MODES, cast_floating
from tests.cases import CELL_CASES, normal, random_case
from tests.helpers import assert_trees_close

FAMILIES = ["elman", "lstm_proj_peephole", "gru", "mgu", "indrnn", "mingru", "minlstm", "lru", "convlstm"]
COMPUTE = {"bf16": jnp.bfloat16, "f16": jnp.float16}
HALF = [jnp.bfloat16, jnp.float16]
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
    """One jitted function per cell, ``(params, xs, carry0) -> (ys, carry, grads, step)``: outputs,
    final carry and the gradient of sum(y^2) with respect to the parameters, from one forward
    and one backward pass; and ``step``, the cell's step on its own from ``carry0`` and the
    first input (rj.scan would cast a carry of another dtype back to the initial one's). One
    program, one compilation."""

    def loss(params, xs):
        ys, carry = rj.scan(cell, params, xs)
        return jnp.sum(ys.astype(jnp.float32) ** 2), (ys, carry)

    def run(params, xs, carry0):
        grads, (ys, carry) = jax.grad(loss, has_aux=True)(params, xs)
        return ys, carry, grads, cell.step(params, carry0, jnp.take(xs, 0, axis=len(BATCH)))

    return jax.jit(run)


# Tolerances, in units of the compute dtype's unit roundoff u = eps / 2 (bfloat16 2^-8,
# float16 2^-11), for norm-wise relative errors. Each step rounds its operands (parameters,
# input, carry) and, with carry_mode="round", its results to about u relative (a dot of n
# terms with random signs: about sqrt(n) u of its largest terms, which the norm averages
# down); carry_mode="keep" rounds the operands of the products only, so the same bound holds
# for it. The cells are contractive at initialisation (Jacobian norm below 1), so errors
# from earlier steps do not grow: over T = 8 steps, plus the rounding of the inputs and of
# the output, they add up to at most (T + 2) u = 10 u (measured: 1-5 u). A gradient goes
# through the T steps twice (forward, then the transposed Jacobians): 2 (T + 2) u = 20 u
# (measured: 0.5-3 u). The LRU's gradient with respect to theta_log is the exception: its
# phases exp(theta_log) reach 2 pi and its terms, of both signs, cancel over the steps, so
# its relative error is larger (measured 23 u in bfloat16, 31 u in float16): 64 u for the
# LRU's gradients.
def _tolerances(name, compute):
    """(outputs and carry, gradients)."""
    u = float(jnp.finfo(compute).eps) / 2
    steps = (STEPS + 2) * u
    return steps, (64 * u if name.startswith("lru") else 2 * steps)


# The fast set runs every family once, and each (compute dtype, carry mode) pair on two or
# three families: family i at dtype i % 2 and mode (i // 2) % 2. make test-all runs every
# combination (each compiles its own program, about 1-3 s).
CLOSENESS_CASES = [pytest.param(name, compute, mode, id=f"{name}-{compute}-{mode}",
                                marks=[] if (j, k) == (i % 2, i // 2 % 2) else [pytest.mark.slow])
                   for i, name in enumerate(FAMILIES) for j, compute in enumerate(COMPUTE)
                   for k, mode in enumerate(CARRY_MODES)]


@pytest.mark.parametrize("name, compute, mode", CLOSENESS_CASES)
def test_dtypes_and_closeness_to_float32(name, compute, mode):
    cell = CELL_CASES[name]
    dtype = COMPUTE[compute]
    params, xs, carry0 = random_case(cell, STEPS, batch=BATCH)
    mixed = rj.Mixed(cell, compute_dtype=dtype, carry_mode=mode)
    ys, carry, grads, (new, y) = _run(mixed)(params, xs, carry0)
    ref_ys, ref_carry, ref_grads, _ = _run(cell)(params, xs, carry0)

    # The step on its own (new, y): a carry of float32 (complex64), an output of the compute dtype.
    assert y.dtype == dtype
    for leaf, ref in zip(jax.tree.leaves(new), jax.tree.leaves(ref_carry)):
        assert leaf.dtype == _carry_dtype(ref.dtype)

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


# Every family in one carry mode, keep and round by turns; make test-all runs the other too.
@pytest.mark.parametrize("name, mode", [
    pytest.param(name, mode, marks=[pytest.mark.slow] if (i + j) % 2 else [], id=f"{name}-{mode}")
    for i, name in enumerate(FAMILIES) for j, mode in enumerate(CARRY_MODES)])
def test_float32_compute_is_the_cell_itself(name, mode):
    cell = CELL_CASES[name]
    params, xs, carry = random_case(cell, 5, batch=BATCH)
    lengths = jnp.array([5, 2, 0])
    mixed = rj.Mixed(cell, compute_dtype=jnp.float32, carry_dtype=jnp.float32, carry_mode=mode)
    got = rj.scan(mixed, params, xs, carry, lengths=lengths)
    want = rj.scan(cell, params, xs, carry, lengths=lengths)
    assert_trees_close(got, want, atol=0, rtol=0, check_dtypes=True)


def _bf16_dot(a, w):
    """A product on bfloat16 operands, accumulated and returned in float32."""
    return jnp.matmul(a.astype(jnp.bfloat16), w.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


@pytest.mark.parametrize("reset_after", [True, False])
def test_keep_mode_follows_the_stated_equations(reset_after):
    """Eagerly (op by op): the GRU's equations with every product on bfloat16 operands
    accumulated in float32, the parameters rounded to bfloat16, everything else float32."""
    cell = rj.GRU(4, reset_after=reset_after)
    params = cell.init(jax.random.key(0), 3)
    params = params._replace(b_x=normal(3, params.b_x.shape))
    h = normal(1, (2, 4))  # not representable in bfloat16
    x = normal(2, (2, 3))
    p = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    xr, xz, xn = jnp.split(_bf16_dot(x, p.w_x) + p.b_x, 3, axis=-1)
    if reset_after:
        hr, hz, hn = jnp.split(_bf16_dot(h, p.w_h) + p.b_h, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
    else:
        hr, hz = jnp.split(_bf16_dot(h, p.w_h[:, :8]), 2, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + _bf16_dot(r * h, p.w_h[:, 8:]))
    want = (1.0 - z) * n + z * h
    assert want.dtype == jnp.float32

    new, y = rj.Mixed(cell, jnp.bfloat16, carry_mode="keep").step(params, h, x)
    assert new.dtype == jnp.float32 and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(new), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32))
    # The float32 update keeps what a bfloat16 carry would lose: h_{t+1} is not a bfloat16 number.
    assert not np.array_equal(np.asarray(new), np.asarray(new.astype(jnp.bfloat16), np.float32))


def test_round_mode_follows_the_stated_equations():
    """Eagerly (op by op, every result rounded to its dtype): h_{t+1} = h + (F_c(rho(h)) - rho(h));
    y in compute dtype or output_dtype."""
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), 3)
    h = normal(1, (2, 4))  # not representable in bfloat16
    x = normal(2, (2, 3))
    bf = jnp.bfloat16
    n, y = cell.step(jax.tree.map(lambda a: a.astype(bf), params), h.astype(bf), x.astype(bf))
    assert n.dtype == bf

    new, got_y = rj.Mixed(cell, bf, carry_mode="round").step(params, h, x)
    assert new.dtype == jnp.float32 and got_y.dtype == bf
    np.testing.assert_array_equal(np.asarray(new), np.asarray(h + (n.astype(jnp.float32) - h.astype(bf).astype(jnp.float32))))
    np.testing.assert_array_equal(np.asarray(got_y, np.float32), np.asarray(y, np.float32))
    assert not np.array_equal(np.asarray(new), np.asarray(n, np.float32))  # the low bits of h survive

    new, got_y = rj.Mixed(cell, bf, carry_mode="round", output_dtype=jnp.float32).step(params, h, x)
    assert new.dtype == jnp.float32 and got_y.dtype == jnp.float32


def test_round_mode_from_a_zero_carry_is_the_16_bit_cell():
    """With every result rounded to bfloat16 and h_0 = 0, rho(h_t) = h_t at every step, so
    round mode computes what the cell computes on bfloat16 params, inputs and carry (see the
    Mixed docstring)."""
    cell = rj.Elman(4)
    params = cell.init(jax.random.key(0), 3)
    xs = normal(1, (5, 2, 3))
    mixed = rj.Mixed(cell, carry_mode="round")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    h, h16 = mixed.init_carry((2,)), cell.init_carry((2,), jnp.bfloat16)
    for x in xs:  # eager steps: no fusion keeps excess precision
        h, _ = mixed.step(params, h, x)
        h16, _ = cell.step(p16, h16, x.astype(jnp.bfloat16))
        np.testing.assert_array_equal(np.asarray(h), np.asarray(h16, np.float32))


def test_keep_mode_is_closer_to_float32_than_round_mode():
    """What benchmarks/lab/precision_drift.py measured (T = 10 000), on a short run: the float32
    carry update and float32 results of the products drift less than rounding the carry."""
    for cell in (rj.LSTM(16), rj.GRU(16), rj.MinGRU(16)):
        params = cell.init(jax.random.key(0), 8)
        xs = normal(1, (4, 200, 8))
        ref = rj.scan(cell, params, xs)[0]
        errors = {mode: _rel(rj.scan(rj.Mixed(cell, carry_mode=mode), params, xs)[0].astype(jnp.float32), ref)
                  for mode in CARRY_MODES}
        assert errors["keep"] < errors["round"], (cell, errors)


def test_vmap_matches_the_batched_call():
    for name in ("lstm", "convlstm", "lru"):
        cell = rj.Mixed(CELL_CASES[name])
        params, xs, _ = random_case(cell, 6, batch=(2,))
        batched = rj.scan(cell, params, xs)
        mapped = jax.vmap(lambda x, c=cell, p=params: rj.scan(c, p, x))(xs)
        for a, b in zip(jax.tree.leaves(mapped), jax.tree.leaves(batched)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a, np.complex128), np.asarray(b, np.complex128), atol=1e-2)


@pytest.mark.parametrize("mode", CARRY_MODES)
def test_lengths_and_reverse_freeze_the_float32_carry(mode):
    cell = rj.Mixed(rj.LSTM(4), jnp.float16, carry_mode=mode)
    params, xs, _ = random_case(cell, 6, batch=(3,))
    lengths = jnp.array([6, 3, 0])
    # Sequence 1's padding replaced by other numbers: bit for bit the same results.
    garbage = xs.at[1, 3:].set(100.0).at[2].set(-7.0)
    for reverse in (False, True):
        ys, (h, c) = rj.scan(cell, params, xs, lengths=lengths, reverse=reverse)
        assert ys.dtype == jnp.float16 and h.dtype == c.dtype == jnp.float32
        assert not np.asarray(ys[1, 3:]).any() and not np.asarray(ys[2]).any()
        assert not np.asarray(h[2]).any() and not np.asarray(c[2]).any()  # length 0: the initial carry
        for a, b in zip(jax.tree.leaves((ys, h, c)),
                        jax.tree.leaves(rj.scan(cell, params, garbage, lengths=lengths, reverse=reverse))):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        # Sequence 1 alone, cut at its length, is another compiled program (other shapes, so
        # other kernels and fusions, which differ between processors). Both runs approximate the
        # same exact values to within the bound of test_dtypes_and_closeness_to_float32,
        # (steps + 2) u of norm-wise relative error each, so they differ by at most twice that.
        ys1, (h1, c1) = rj.scan(cell, params, xs[1, :3], reverse=reverse)
        bound = 2 * (3 + 2) * float(jnp.finfo(jnp.float16).eps) / 2
        for got, want in ((ys[1, :3].astype(jnp.float32), ys1.astype(jnp.float32)), (h[1], h1), (c[1], c1)):
            assert _rel(got, want) < bound, (reverse, _rel(got, want), bound)


def test_inside_rnn_bidirectional_and_stack():
    gru = rj.Mixed(rj.GRU(4))
    layer = rj.Stack([rj.Bidirectional(rj.RNN(gru)), rj.RNN(rj.Mixed(rj.LSTM(4), jnp.float16))])
    params = layer.init(jax.random.key(0), input_size=3)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    xs = normal(1, (2, 5, 3))
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

    def grads(method=rj.Sequential()):
        loss = lambda p: jnp.sum(rj.scan(cell, p, xs, method=method)[0].astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss))(params)  # one compilation, not one per eager operation

    ref = grads()
    for remat in ("step", "sqrt"):
        for a, b in zip(jax.tree.leaves(grads(rj.Sequential(remat=remat))), jax.tree.leaves(ref)):
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
        with pytest.raises(ValueError, match="linear recurrence.*Mixed is not one"):
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
    for bad in ("float32", True, None, "KEEP"):
        with pytest.raises(ValueError, match=r"carry_mode=.*expected one of \['keep', 'round'\]"):
            rj.Mixed(rj.GRU(4), carry_mode=bad)
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
    assert a != rj.Mixed(rj.GRU(4), jnp.float16) and a != rj.Mixed(rj.GRU(4), carry_mode="round")
    assert a.carry_mode == "keep"
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
    assert rj.Mixed(rj.MinGRU(4)).init(jax.random.key(0), 3, jnp.bfloat16).w.dtype == jnp.bfloat16
    assert rj.Mixed(rj.LSTM(4)).init(jax.random.key(0), 3, jnp.bfloat16).w_h.dtype == jnp.bfloat16
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


@pytest.mark.slow  # two runs of the drift script: make test-all runs it
def test_drift_script_smoke(tmp_path):
    from benchmarks.lab import precision_drift

    variants = ("bf16-keep", "bf16-round", "f16-keep")
    result = precision_drift.main(["--tiny", "--cells", "gru,lru", "--variants", ",".join(variants),
                                   "--length", "120", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "precision_drift.json").read_text())
    assert data["meta"]["options"]["length"] == 120 and data["meta"]["jax"]
    rows = {(r["cell"], r["variant"]): r for r in data["rows"]}
    assert set(rows) == {(c, v) for c in ("gru", "lru") for v in variants}
    for r in rows.values():
        assert r["finite"] and list(r["at"]) == ["100"] and 0 < r["mean"] <= r["max"] < 1
    # float16 keeps 3 more significand bits than bfloat16: its drift is smaller.
    assert rows[("gru", "f16-keep")]["mean"] < rows[("gru", "bf16-keep")]["mean"]
    assert data["summary"]["bfloat16"]["cells"] == 2 and "float16" not in data["summary"]
    md = (tmp_path / "precision_drift.md").read_text()
    assert "| gru | bf16-keep |" in md and "t=100" in md and "bfloat16:" in md
    assert result["files"]["md"] == tmp_path / "precision_drift.md"

    # The experiment rounds the autocast products, and only while it runs.
    out = tmp_path / "rp"
    rounded = precision_drift.main(["--tiny", "--cells", "gru", "--variants", "bf16-keep", "--length", "120",
                                    "--round-products", "--out", str(out)])
    assert rounded["rows"][0]["mean"] != rows[("gru", "bf16-keep")]["mean"]
    assert "Experiment" in (out / "precision_drift.md").read_text()
    import rnnjax.cells.gru

    assert rnnjax.cells.gru.matmul is matmul  # restored


# -- what Mixed relies on in rnnjax/cell.py ------------------------------------------------


def test_matmul_and_conv_are_the_plain_products_except_for_16_bit_weights():
    dn = ("NHWC", "HWIO", "NHWC")
    for a_dtype, w_dtype in [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
                             (jnp.float32, jnp.float16), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.bfloat16)]:
        a = normal(0, (3, 5), a_dtype)
        w = normal(1, (5, 4), w_dtype)
        img = normal(0, (2, 4, 4, 3), a_dtype)
        kernel = normal(1, (3, 3, 3, 2), w_dtype)
        autocast = w_dtype in HALF and a_dtype == jnp.float32
        if autocast:  # 16-bit operands, float32 result
            want = jnp.matmul(a.astype(w_dtype), w, preferred_element_type=jnp.float32)
            want_conv = jax.lax.conv_general_dilated(img.astype(w_dtype), kernel, (1, 1), "SAME", dimension_numbers=dn,
                                                     preferred_element_type=jnp.float32)
        else:  # bit for bit the promoted product
            want = a @ w
            dtype = jnp.result_type(a, w)
            want_conv = jax.lax.conv_general_dilated(img.astype(dtype), kernel.astype(dtype), (1, 1), "SAME",
                                                     dimension_numbers=dn)
        jitted = [(jax.jit(matmul)(a, w), jax.jit(conv, static_argnums=2)(img, kernel, dn))] if a_dtype == jnp.float32 else []
        for got, got_conv in [(matmul(a, w), conv(img, kernel, dn)), *jitted]:
            assert got.dtype == want.dtype == (jnp.float32 if autocast else jnp.result_type(a, w))
            assert got_conv.dtype == want_conv.dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
            np.testing.assert_array_equal(np.asarray(got_conv, np.float32), np.asarray(want_conv, np.float32))


def test_16_bit_params_with_float32_inputs_autocast_the_products():
    """An unwrapped cell with bfloat16 params and float32 inputs and carry: its products run on
    bfloat16 operands, its carry stays float32."""
    cell = rj.LSTM(4)
    params = cell.init(jax.random.key(0), 3, jnp.bfloat16)
    xs = normal(1, (2, 6, 3))
    ys, (h, c) = rj.scan(cell, params, xs, carry=cell.init_carry((2,)))
    assert ys.dtype == h.dtype == c.dtype == jnp.float32
    ref, _ = rj.scan(cell, jax.tree.map(lambda a: a.astype(jnp.float32), params), xs)
    assert 0 < _rel(ys, ref) < 10 * float(jnp.finfo(jnp.bfloat16).eps)
    jaxpr = str(jax.make_jaxpr(lambda p, x: rj.scan(cell, p, x, carry=cell.init_carry((2,))))(params, xs))
    assert "dot_general" in jaxpr and "preferred_element_type=float32" in jaxpr


INIT_CELLS = {"lstm": rj.LSTM(5, proj_size=3, peephole=True), "gru": rj.GRU(5), "gru_reset_before": rj.GRU(5, reset_after=False),
              "elman": rj.Elman(5), "mgu": rj.MGU(5), "convlstm": rj.ConvLSTM(4, kernel_size=3)}


# The fast set runs each cell in one 16-bit dtype, bfloat16 and float16 by turns; make test-all both.
@pytest.mark.parametrize("name, dtype", [
    pytest.param(name, dtype, id=f"{name}-{dtype_id}", marks=[pytest.mark.slow] if (i + j) % 2 else [])
    for i, name in enumerate(INIT_CELLS) for j, (dtype_id, dtype) in enumerate([("bf16", jnp.bfloat16), ("f16", jnp.float16)])])
def test_16_bit_init_is_the_float32_init_rounded(name, dtype):
    cell = INIT_CELLS[name]
    key = jax.random.key(7)
    got = cell.init(key, 3, dtype)
    want = cell.init(key, 3, jnp.float32)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w.astype(dtype), np.float32))


def test_float32_init_is_jax_initializers_own():
    key = jax.random.key(3)
    for ours, theirs, shape in [(rj.ops.orthogonal, jax.nn.initializers.orthogonal(), (6, 6)),
                                (rj.ops.orthogonal, jax.nn.initializers.orthogonal(), (3, 3, 4, 4)),
                                (rj.ops.glorot_uniform, jax.nn.initializers.glorot_uniform(), (5, 7))]:
        got, want = ours(key, shape, jnp.float32), theirs(key, shape, jnp.float32)
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    params = rj.LSTM(4).init(key, 3)
    np.testing.assert_array_equal(np.asarray(params.w_h[:, :4]),
                                  np.asarray(jax.nn.initializers.orthogonal()(jax.random.split(jax.random.split(key, 3)[1], 4)[0], (4, 4))))
