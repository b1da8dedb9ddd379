"""rnnjax.linear_attention against the reference recurrences of fla (linear attention, simple GLA,
GLA) and mlstm_kernels (mLSTM), computed in float64 (tests/fixtures/la_*.npz, written by
tests/fixtures/make_linear_attention_fixtures.py); neither library is needed here.

Every call leaves ``scale`` (and mLSTM's ``eps``) at rnnjax's default, so the defaults are
checked against the references' too."""

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

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CASES = ("linear_attn", "simple_gla", "gla", "mlstm")
METHODS = {"default": None, "sequential": rj.Sequential()}

# float32: the inputs are the exact float32 values the reference took, so the whole error is
# rnnjax's float32 rounding. Each output is a decayed sum of at most T * dk = 296 products;
# float32's unit roundoff is 6e-8, so sqrt(296) * 6e-8 ~ 1e-6 of the largest value is the
# typical error and 1e-5 leaves room for rounding that correlates along a sequence (the
# references' own float32 runs reach 2e-7 (fla) and 1.6e-6 (mLSTM output, through its
# division by max(|n^T q|, exp(-m))) of max|ref|: config["float32_reference_max_err"]).
RTOL32 = 1e-5
# float64: unit roundoff 1.1e-16; 1e-10 of max|ref| is a million times the rounding, and any
# difference in the recurrence itself (a gate, the scale, an eps) is far above it.
RTOL64 = 1e-10


@functools.cache
def load(case):
    with np.load(FIXTURES / f"la_{case}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(str(arrays.pop("config"))), arrays


def test_fixtures_exist():
    missing = [c for c in CASES if not (FIXTURES / f"la_{c}.npz").exists()]
    assert not missing, f"{missing}: run tests/fixtures/make_linear_attention_fixtures.py"


@functools.partial(jax.jit, static_argnames="method")
def gla(q, k, v, log_decay, state, method):
    o, final = la.gla(q, k, v, log_decay, state=state, method=method)
    return {"o": o, "state": final}


@functools.partial(jax.jit, static_argnames="method")
def mlstm(q, k, v, input_gate, forget_gate, C0, n0, m0, method):
    h, (C, n, m) = la.mlstm(q, k, v, input_gate, forget_gate, state=la.MLSTMState(C0, n0, m0), method=method)
    return {"h": h, "C": C, "n": n, "m": m}


def run(case, method, dtype):
    """rnnjax's outputs for a fixture case, and the reference's, by name."""
    config, arrays = load(case)
    x = {k: jnp.asarray(a, dtype) for k, a in arrays.items()}
    dk = arrays["q"].shape[-1]
    assert config["scale"] == dk**-0.5  # the default rnnjax is called with
    if config["op"] == "gla":
        got = gla(x["q"], x["k"], x["v"], x.get("log_decay"), x["state0"], method=method)
    else:
        assert config["eps"] == 1e-6
        args = ("q", "k", "v", "input_gate", "forget_gate", "C0", "n0", "m0")
        got = mlstm(*(x[a] for a in args), method=method)
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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_float32(case, method):
    check(case, method, np.float32, RTOL32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES)
def test_float64(case, method):
    with enable_x64(True):
        check(case, method, np.float64, RTOL64)
