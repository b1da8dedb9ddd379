"""rnnjax.linear_attention.delta_rule and rwkv7 against fla's reference recurrences (DeltaNet, Gated
DeltaNet, KDA, the generalized delta rule DPLR, and DPLR on RWKV-7's inputs), computed in float64
(tests/fixtures/la_*.npz, written by tests/fixtures/make_linear_attention_fixtures.py, whose
docstrings give fla's conventions and how its inputs were mapped to the ops'); fla is not needed here.

The delta-rule calls and the RWKV-7 call leave ``scale`` at rnnjax's default, so the defaults are
checked against the references' too; the DPLR reference hard-codes ``d_k ** -0.5``, passed as
``scale``. A case is skipped while its op does not exist yet."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from rnnjax import linear_attention as la
from tests.compat import enable_x64
from tests.fixtures.make_linear_attention_fixtures import contract_delta_rule, contract_rwkv7

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OPS = {
    "delta_rule": "delta_rule",
    "gated_delta_rule": "delta_rule",
    "kda": "delta_rule",
    "dplr": "rwkv7",
    "rwkv7": "rwkv7",
}
METHODS = {"default": None, "sequential": rj.Sequential()}

# float32: the inputs are the exact float32 values the reference took, so the whole error is
# rnnjax's float32 rounding. The transitions do not amplify it: I - beta k k^T with |k| = 1 and
# 0 < beta < 2 has eigenvalues 1 and 1 - beta, |1 - beta| < 1, and decays are <= 1 (RWKV-7's
# diag(e^w) - (kk * a) kk^T likewise). Each output is then a sum of at most T * d_k = 592 products
# (rwkv7's d_k = 16); float32's unit roundoff is 6e-8, so sqrt(592) * 6e-8 ~ 1.5e-6 of the largest
# value is the typical error and 1e-5 leaves room for rounding that correlates along a sequence.
# Measured (config["float32_reference_max_err"], ["float32_chunked_reference_max_err"]): fla's own
# float32 step loops reach 2e-7 of max|ref|, its float32 chunkwise forms (WY representation,
# chunks of 16 to 64) 9.3e-7 (KDA, chunk 64).
RTOL32 = 1e-5
# float64: unit roundoff 1.1e-16; 1e-10 of max|ref| is a million times the rounding, and any
# difference in the recurrence itself (beta's side, the decay's order, a scale) is far above it:
# each of those changes the outputs by 5% to 180% of max|ref| on these fixtures.
RTOL64 = 1e-10


def needs_op(case):
    op = OPS[case]
    reason = f"rj.linear_attention has no {op} yet (la_{case}.npz waits for it)"
    return pytest.param(case, marks=pytest.mark.skipif(not hasattr(la, op), reason=reason))


CASES = [needs_op(case) for case in OPS]


@functools.cache
def load(case):
    with np.load(FIXTURES / f"la_{case}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("config"))), arrays


def test_fixtures_exist():
    missing = [c for c in OPS if not (FIXTURES / f"la_{c}.npz").exists()]
    assert not missing, f"{missing}: run tests/fixtures/make_linear_attention_fixtures.py"


@pytest.mark.parametrize("case", list(OPS))
def test_fixtures_follow_the_contract(case):
    """The stored outputs are the ops' contract (the NumPy loops) on the stored inputs, as the
    generator asserted against fla: the fixtures need no conversion in the tests below."""
    config, x = load(case)
    assert config["op"] == OPS[case]
    if config["op"] == "delta_rule":
        o, state = contract_delta_rule(
            *(x.get(n) for n in ("q", "k", "v", "beta", "log_decay")), config["scale"], x["state0"]
        )
    else:
        o, state = contract_rwkv7(*(x[n] for n in ("r", "w", "k", "v", "a", "b")), config["scale"], x["state0"])
    for name, got in (("o", o), ("state", state)):
        np.testing.assert_allclose(got, x[name], rtol=0, atol=1e-12 * np.abs(x[name]).max())


@functools.partial(jax.jit, static_argnames="method")
def delta_rule(q, k, v, beta, log_decay, state, method):
    o, final = la.delta_rule(q, k, v, beta, log_decay, state=state, method=method)
    return {"o": o, "state": final}


@functools.partial(jax.jit, static_argnames=("scale", "method"))
def rwkv7(r, w, k, v, a, b, state, scale, method):
    kwargs = {} if scale is None else {"scale": scale}  # None: rwkv7's default
    o, final = la.rwkv7(r, w, k, v, a, b, state=state, method=method, **kwargs)
    return {"o": o, "state": final}


def run(case, method, dtype):
    """rnnjax's outputs for a fixture case, and the reference's, by name."""
    config, arrays = load(case)
    x = {k: jnp.asarray(a, dtype) for k, a in arrays.items()}
    if config["op"] == "delta_rule":
        assert config["scale"] == arrays["q"].shape[-1] ** -0.5  # the default rnnjax is called with
        got = delta_rule(x["q"], x["k"], x["v"], x["beta"], x.get("log_decay"), x["state0"], method=method)
    else:
        # la_rwkv7 was made with RWKV-7's scale 1.0, rwkv7's default; la_dplr's is d_k ** -0.5.
        scale = None if case == "rwkv7" else config["scale"]
        assert case != "rwkv7" or config["scale"] == 1.0
        args = (x[n] for n in ("r", "w", "k", "v", "a", "b", "state0"))
        got = rwkv7(*args, scale=scale, method=method)
    return {k: np.asarray(g) for k, g in got.items()}, {k: arrays[k] for k in got}


def check(case, method, dtype, rtol):
    got, ref = run(case, METHODS[method], dtype)
    errors = {}
    for name, r in ref.items():
        assert got[name].shape == r.shape, f"{name}: {got[name].shape} vs {r.shape}"
        assert got[name].dtype == dtype, f"{name}: {got[name].dtype}, expected {dtype}"
        errors[name] = float(np.abs(got[name].astype(np.float64) - r).max())
    print(f"{case} {method} {np.dtype(dtype).name}: max abs err {errors}")
    for name, r in ref.items():
        atol = rtol * float(np.abs(r).max())
        assert errors[name] <= atol, f"{case} {method}: {name} off by {errors[name]:.3g} > {atol:.3g}"


# The fast set compiles each op once per case (the default method, float32) for the gated delta
# rule, KDA and RWKV-7 (each gate kind and both recurrences); DeltaNet, plain DPLR, the sequential
# method and float64 (each a further compile) run in make test-all.
FAST_CASES = ("gated_delta_rule", "kda", "rwkv7")


@pytest.mark.parametrize(
    "case", [c if c.values[0] in FAST_CASES else pytest.param(*c.values, marks=[*c.marks, pytest.mark.slow]) for c in CASES]
)
def test_float32(case):
    check(case, "default", np.float32, RTOL32)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_float32_sequential(case):
    check(case, "sequential", np.float32, RTOL32)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_float64(case, method):
    with enable_x64(True):
        check(case, method, np.float64, RTOL64)
