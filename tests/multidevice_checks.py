"""Checks of rnnjax.distributed on 8 forced host devices, run in a subprocess by
tests/test_distributed.py (the main test process keeps its single default device).

    python tests/multidevice_checks.py [--out results.json] [--only NAME,NAME,...]

Each check records ``{"ok": bool, "detail": str}``; the script exits 0 when it finished,
whatever the results (the test asserts them one by one). The output is
``{"checks": [every check's name], "results": {name: record}}`` for the checks run
(``--only``: those named, default all).
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import rnnjax as rj  # noqa: E402

# Run as a script, this file has tests/ on sys.path, not the repository root that holds `tests`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.helpers import assert_trees_close, max_abs_diff  # noqa: E402

CHECKS: dict = {}  # name -> function returning a detail string; run by run_checks
RESULTS: dict[str, dict] = {}
F32 = dict(rtol=2e-5, atol=2e-6)  # float32 rounding: the gradient sums run in another order


def check(name):
    """Register ``fn`` as the check ``name`` (run later, by run_checks)."""

    def wrap(fn):
        assert name not in CHECKS, f"two checks named {name!r}"
        CHECKS[name] = fn
        return fn

    return wrap


def run_checks(names):
    """Run the named checks in order; record each one's outcome in RESULTS."""
    for name in names:
        start = time.perf_counter()
        try:
            detail = CHECKS[name]()
            RESULTS[name] = {"ok": True, "detail": detail or ""}
        except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the others
            RESULTS[name] = {"ok": False, "detail": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
        RESULTS[name]["seconds"] = round(time.perf_counter() - start, 1)


compiles = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
)


def raises_before_compiling(fn, *messages):
    """``fn()`` raises ValueError naming every message, and nothing compiled on the way."""
    before = len(compiles)
    try:
        fn()
    except ValueError as e:
        text = str(e)
        missing = [m for m in messages if m not in text]
        assert not missing, f"error {text!r} lacks {missing}"
        assert len(compiles) == before, f"{len(compiles) - before} compilations before the error"
        return text
    raise AssertionError("no ValueError")


assert len(jax.devices()) == 8, jax.devices()
MESH = jax.make_mesh((8,), ("data",))
MESH_2D = jax.make_mesh((4, 2), ("data", "model"))
SEQ = jax.make_mesh((8,), ("seq",))
OPT = optax.adam(1e-2)

# ---- data parallelism --------------------------------------------------------------------

LAYER = rj.Stack([rj.RNN(rj.LSTM(16)), rj.RNN(rj.GRU(16))])
PARAMS = LAYER.init(jax.random.key(0), 3)
kx, ky = jax.random.split(jax.random.key(1))
BATCH = {"x": jax.random.normal(kx, (16, 12, 3)), "y": jax.random.normal(ky, (16, 12, 16)),
         "lengths": jnp.arange(16) % 13}


def loss_fn(p, b):
    ys, _ = LAYER.apply(p, b["x"], lengths=b["lengths"])
    return rj.train.mean_squared_error(ys, b["y"], b["lengths"])


def two_steps(step):
    state = rj.train.TrainState.create(PARAMS, OPT)
    state, m1 = step(state, BATCH)
    state, m2 = step(state, BATCH)
    return state, (m1, m2)


@functools.cache
def reference():
    """(state, metrics) of two single-device steps, computed once for the checks that need it."""
    return two_steps(rj.train.make_train_step(loss_fn, OPT, donate=False))


@check("train_step_data_parallel_equals_single_device")
def _():
    step = rj.train.make_train_step(loss_fn, OPT, donate=False, mesh=MESH)
    state, metrics = two_steps(step)
    ref_state, ref_metrics = reference()
    assert_trees_close(state.params, ref_state.params, err_msg="params", **F32)
    assert_trees_close(state.opt_state, ref_state.opt_state, err_msg="opt_state", **F32)
    assert_trees_close(metrics, ref_metrics, err_msg="metrics", **F32)
    specs = {tuple(leaf.sharding.spec) for leaf in jax.tree.leaves(state.params)}
    assert specs == {()}, f"parameters not replicated: {specs}"
    return f"max |param diff| {max_abs_diff(state.params, ref_state.params):.2e} after 2 Adam steps"


@check("train_step_data_and_model_axes_equals_single_device")
def _():
    step = rj.train.make_train_step(loss_fn, OPT, donate=False, mesh=MESH_2D, model_axis="model")
    state, metrics = two_steps(step)
    ref_state, ref_metrics = reference()
    assert_trees_close(state.params, ref_state.params, err_msg="params", **F32)
    assert_trees_close(metrics, ref_metrics, err_msg="metrics", **F32)
    w = state.params[0].w_h  # (16, 64): hidden units split over "model"
    assert tuple(w.sharding.spec) == (None, "model"), w.sharding
    mu = state.opt_state[0].mu[0].w_h
    assert tuple(mu.sharding.spec) == (None, "model"), mu.sharding
    return f"max |param diff| {max_abs_diff(state.params, ref_state.params):.2e}; w_h spec {w.sharding.spec}"


def loop_all_reduces(hlo: str) -> dict[str, int]:
    """All-reduces in the body of every while loop of compiled HLO text, by body name."""
    computations = {}
    for block in hlo.split("\n\n"):
        m = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", block.strip())
        if m:
            computations[m.group(1)] = block
    return {b: computations.get(b, "").count("all-reduce(") for b in re.findall(r"body=%?([\w.\-]+)", hlo)}


@check("gradient_reduced_once_after_the_loop")
def _():
    state = rj.train.TrainState.create(PARAMS, OPT)
    step = rj.train.make_train_step(loss_fn, OPT, donate=False, mesh=MESH)
    hlo = step.lower(state, BATCH).compile().as_text()
    # The loops (the scans) must hold no all-reduce: the gradients are reduced where the
    # replicated parameters enter shard_map, after the loops.
    in_loops = loop_all_reduces(hlo)
    assert in_loops and not any(in_loops.values()), in_loops
    # What automatic partitioning of the plain step does instead (the reason for the above).
    auto = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    placed = jax.device_put(BATCH, jax.sharding.NamedSharding(auto, jax.sharding.PartitionSpec("data")))
    plain = rj.train.make_train_step(loss_fn, OPT, donate=False)
    auto_loops = loop_all_reduces(plain.lower(state, placed).compile().as_text())
    assert any(auto_loops.values()), auto_loops
    return (f"{hlo.count('all-reduce(')} all-reduce(s), none in the {len(in_loops)} loop bodies; "
            f"jit with a sharded batch alone: {sum(auto_loops.values())} inside loops")


@check("tbptt_step_data_parallel_equals_single_device")
def _():
    def chunk_loss(p, carry, b):
        ys, carry = LAYER.apply(p, b["x"], carry=carry, lengths=b["lengths"])
        return rj.train.mean_squared_error(ys, b["y"], b["lengths"]), carry

    carry = LAYER.init_carry((16,))
    ref = rj.train.make_tbptt_step(chunk_loss, OPT, 4, donate=False)
    dp = rj.train.make_tbptt_step(chunk_loss, OPT, 4, donate=False, mesh=MESH)
    state = rj.train.TrainState.create(PARAMS, OPT)
    a, ca, ma = ref(state, carry, BATCH)
    b, cb, mb = dp(state, carry, BATCH)
    assert_trees_close(b.params, a.params, err_msg="params", **F32)
    assert_trees_close(cb, ca, err_msg="carry", **F32)
    assert_trees_close(mb, ma, err_msg="metrics", **F32)
    return f"max |param diff| {max_abs_diff(a.params, b.params):.2e} after 3 chunk updates"


@check("remat_policies_same_gradients_data_parallel")
def _():
    cell = rj.LSTM(8)
    params = cell.init(jax.random.key(2), 3)
    xs = jax.random.normal(jax.random.key(3), (8, 37, 3))
    lengths = jnp.arange(8) * 5

    def grads(remat, mesh):
        def loss(p, x):
            ys, (h, c) = rj.scan(cell, p, x, lengths=lengths, method=rj.Sequential(remat=remat))
            return jnp.sum(ys ** 2) + jnp.sum(c)

        f = jax.jit(jax.grad(loss, argnums=(0, 1)))
        if mesh is None:
            return f(params, xs)
        with rj.distributed.data_parallel(mesh, "data"):
            return f(params, xs)

    ref = grads(None, None)
    out = []
    for remat in (None, "step", "sqrt"):
        g = grads(remat, MESH)
        assert_trees_close(g, ref, err_msg=f"remat={remat} grads", **F32)
        out.append(f"{remat}: {max_abs_diff(g, ref):.1e}")
    return "max |grad diff| vs single device, no remat: " + ", ".join(out)


@check("data_parallel_flax_module")
def _():
    from rnnjax.flax import linen as rjl

    module = rjl.Recurrent(rj.RNN(rj.GRU(8)))
    xs = BATCH["x"]
    variables = module.init(jax.random.key(4), xs)
    ref = module.apply(variables, xs)
    with rj.distributed.data_parallel(MESH, "data"):
        out = jax.jit(module.apply)(variables, xs)
    assert_trees_close(out, ref, err_msg="flax output", **F32)
    return f"max |diff| {max_abs_diff(out, ref):.1e}"


@check("bad_input_errors_before_compiling")
def _():
    step = rj.train.make_train_step(loss_fn, OPT, donate=False, mesh=MESH)
    state = rj.train.TrainState.create(PARAMS, OPT)
    bad = {k: v[:12] for k, v in BATCH.items()}
    msgs = [raises_before_compiling(lambda: step(state, bad), "(12,", "8 devices", "'data'")]
    msgs.append(raises_before_compiling(
        lambda: rj.train.make_train_step(loss_fn, OPT, mesh=MESH, data_axis="batch"), "'batch'", "('data',)"))
    msgs.append(raises_before_compiling(
        lambda: rj.train.make_train_step(loss_fn, OPT, mesh=MESH, model_axis="model"), "'model'"))
    gru, mingru = rj.GRU(4), rj.MinGRU(4)
    gru_p, mingru_p = gru.init(jax.random.key(0), 3), mingru.init(jax.random.key(0), 3)
    x6, x5, x64 = np.ones((6, 5, 3), np.float32), np.ones((2, 5, 3), np.float32), np.ones((2, 64, 3), np.float32)
    with rj.distributed.data_parallel(MESH, "data"):
        msgs.append(raises_before_compiling(lambda: rj.scan(gru, gru_p, x6), "(6, 5, 3)", "8 devices"))
    msgs.append(raises_before_compiling(
        lambda: rj.distributed.sequence_scan(mingru, mingru_p, x5, mesh=SEQ, axis="seq"), "5 time steps", "8 devices"))
    msgs.append(raises_before_compiling(
        lambda: rj.distributed.sequence_scan(mingru, mingru_p, x64, mesh=SEQ, axis="time"), "'time'", "('seq',)"))
    msgs.append(raises_before_compiling(
        lambda: rj.distributed.sequence_scan(gru, gru_p, x64, mesh=SEQ, axis="seq", method="associative"), "linear recurrence"))
    return "\n".join(msgs)


# ---- sequence parallelism ----------------------------------------------------------------

T = 61  # not a multiple of 8: the last shard is padded
SEQ_CASES = {
    "MinGRU": (rj.MinGRU(6), "associative"),
    "MinLSTM": (rj.MinLSTM(6), "associative"),
    "LRU": (rj.LRU(6), "associative"),
    "IndRNNRelu": (rj.IndRNN(4), "associative"),  # the clipped scan: a relu IndRNN is linear up to a clip
    "Elman": (rj.Elman(4), "newton"),
    "GRU": (rj.GRU(4), "newton"),
    "LSTM": (rj.LSTM(3), "newton"),
    "MGU": (rj.MGU(4), "newton"),
    "IndRNN": (rj.IndRNN(4), "newton"),
}


SEQ_CASES["ConvLSTM"] = (rj.ConvLSTM(2, kernel_size=(2, 2)), "newton")  # carry (2, 2, 2) per sequence: n = 16


def seq_inputs(cell, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    params = cell.init(keys[0], 3)
    features = (2, 2, 3) if isinstance(cell, rj.ConvLSTM) else (3,)
    xs = jax.random.normal(keys[1], (3, T) + features)
    lengths = jnp.array([T, 40, 7])
    resets = jax.random.bernoulli(keys[2], 0.1, (3, T))
    return params, xs, lengths, resets


GRADIENT_CASES = ("MinGRU", "LRU", "IndRNNRelu", "GRU", "LSTM")  # associative (log space, complex, clipped), Newton

for i, (name, (cell, method)) in enumerate(SEQ_CASES.items()):

    @check(f"sequence_parallel_{name}_{method}")
    def _(cell=cell, method=method, seed=i, name=name):
        params, xs, lengths, resets = seq_inputs(cell, seed)
        out = []
        for reverse in (False, True):
            kw = dict(lengths=lengths, resets=resets, reverse=reverse)
            ref = rj.scan(cell, params, xs, **kw)
            got = rj.distributed.sequence_scan(cell, params, xs, mesh=SEQ, axis="seq",
                                               method=rj.Newton("deer") if method == "newton" else method, **kw)
            assert_trees_close(got, ref, err_msg=f"reverse={reverse} ", rtol=1e-5, atol=1e-5)
            out.append(f"reverse={reverse}: {max_abs_diff(got, ref):.1e}")

        if name not in GRADIENT_CASES:  # gradients: the same solver as above; four cells keep the suite fast
            return "max |diff| " + ", ".join(out)

        def loss(p, x, scan):
            ys, final = scan(p, x)
            return jnp.sum(ys ** 2) + sum(jnp.sum(jnp.real(c)) for c in jax.tree.leaves(final))

        # Jitted: one compilation each, instead of one per eager operation.
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        ref_g = grad(params, xs, lambda p, x: rj.scan(cell, p, x, lengths=lengths, resets=resets))
        got_g = grad(params, xs, lambda p, x: rj.distributed.sequence_scan(cell, p, x, mesh=SEQ, axis="seq", method=method,
                                                                           lengths=lengths, resets=resets))
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_g))
        assert_trees_close(got_g, ref_g, err_msg="grad ", rtol=1e-4, atol=1e-4 * scale)
        out.append(f"grad: {max_abs_diff(got_g, ref_g):.1e} (largest |grad| {scale:.1e})")
        return "max |diff| " + ", ".join(out)


@check("sequence_parallel_linear_attention")
def _():
    """rj.linear_attention's ops with the time axis over 8 devices equal one device (rj.Sequential())."""
    la, out = rj.linear_attention, []
    keys = jax.random.split(jax.random.key(7), 8)
    q, k = (jax.random.normal(keys[i], (3, T, 2, 4)) for i in (0, 1))
    v = jax.random.normal(keys[2], (3, T, 2, 3))
    gates = {"none": None, "head": jax.nn.log_sigmoid(2 + jax.random.normal(keys[3], (3, T, 2))),
             "key": jax.nn.log_sigmoid(2 + jax.random.normal(keys[4], (3, T, 2, 4)))}
    i_gate, f_gate = 3 * jax.random.normal(keys[3], (3, T, 2)), 2 * jax.random.normal(keys[4], (3, T, 2))
    S0 = jax.random.normal(keys[5], (3, 2, 4, 3))
    m_state = la.MLSTMState(S0, jax.random.normal(keys[6], (3, 2, 4)), jax.random.normal(keys[7], (3, 2)))
    lengths, resets = jnp.array([T, 40, 0]), jax.random.bernoulli(keys[6], 0.1, (3, T))
    sharded = rj.TimeSharded(rj.Chunked(4), rj.distributed.SequenceSharding(SEQ, "seq"))
    ops = {f"gla_{name}": (lambda q, g, method, g_=g, **kw: la.gla(q, k, v, g_, state=S0, method=method, **kw))
           for name, g in gates.items()}
    ops["mlstm"] = lambda q, g, method, **kw: la.mlstm(q, k, v, i_gate, f_gate, state=m_state, method=method, **kw)
    for name, op in ops.items():
        for reverse in (False, True):
            kw = dict(lengths=lengths, resets=resets, reverse=reverse)
            ref, got = op(q, None, rj.Sequential(), **kw), op(q, None, sharded, **kw)
            assert_trees_close(got, ref, err_msg=f"{name} reverse={reverse} ", **F32)
        loss = lambda q, method, op=op: jnp.sum(jnp.sin(op(q, None, method, lengths=lengths, resets=resets)[0]))
        g_ref, g_got = jax.grad(loss)(q, rj.Sequential()), jax.grad(loss)(q, sharded)
        assert_trees_close(g_got, g_ref, err_msg=f"{name} grad ", rtol=1e-4, atol=1e-4 * float(jnp.abs(g_ref).max()))
        out.append(f"{name}: {max_abs_diff(got, ref):.1e}, grad {max_abs_diff(g_got, g_ref):.1e}")
    return "max |diff| " + ", ".join(out)


@check("sequence_parallel_matrix_state_cells")
def _():
    """rj.Mamba2 (its convolution's window crosses the shards) and rj.MLSTM through sequence_scan
    (auto: rj.Chunked() split over time) equal rj.scan on one device."""
    out = []
    for cell in (rj.Mamba2(heads=2, head_size=4, state_size=4), rj.MLSTM(heads=2, qk_head_size=4, v_head_size=4)):
        params, xs, lengths, resets = seq_inputs(cell, 3)
        for reverse in (False, True):
            kw = dict(lengths=lengths, resets=resets, reverse=reverse)
            ref = rj.scan(cell, params, xs, method=rj.Sequential(), **kw)
            got = rj.distributed.sequence_scan(cell, params, xs, mesh=SEQ, axis="seq", **kw)
            assert_trees_close(got, ref, err_msg=f"{type(cell).__name__} reverse={reverse} ", **F32)
            out.append(f"{type(cell).__name__} reverse={reverse}: {max_abs_diff(got, ref):.1e}")
        hlo = jax.jit(lambda p, x, cell=cell: rj.distributed.sequence_scan(cell, p, x, mesh=SEQ, axis="seq")).lower(
            params, xs).compile().as_text()
        assert "all-gather" in hlo, f"{type(cell).__name__}: no all-gather of the shard summaries"
    return "max |diff| " + ", ".join(out)


def unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def sharded_equals_one_device(name, op, args, lengths, resets):
    """``op(*args, method, lengths=, resets=, reverse=)`` with the time axis over 8 devices
    (rj.TimeSharded(rj.Chunked(4))) equals rj.Sequential() on one device, both directions, in
    values and final state, and in the gradients of every argument (reverse: the direction that
    flips the shards' order); the shards exchange their summaries (an all-gather in the HLO).
    Returns the largest differences."""
    sharded = rj.TimeSharded(rj.Chunked(4), rj.distributed.SequenceSharding(SEQ, "seq"))
    out = []
    for reverse in (False, True):
        kw = dict(lengths=lengths, resets=resets, reverse=reverse)
        run = jax.jit(lambda args, method, kw=kw: op(*args, method, **kw), static_argnums=1)
        ref, got = run(args, rj.Sequential()), run(args, sharded)
        assert_trees_close(got, ref, err_msg=f"{name} reverse={reverse} ", **F32)
        out.append(f"{name} reverse={reverse}: {max_abs_diff(got, ref):.1e}")

    def loss(args, method):
        o, final = op(*args, method, lengths=lengths, resets=resets, reverse=True)
        return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(final))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_ref, g_got = grad(args, rj.Sequential()), grad(args, sharded)
    scale = max(float(jnp.abs(g).max()) for g in g_ref)
    assert_trees_close(g_got, g_ref, err_msg=f"{name} grad ", rtol=1e-4, atol=1e-4 * scale)
    out.append(f"{name} grad: {max_abs_diff(g_got, g_ref):.1e} (largest |grad| {scale:.1e})")
    hlo = jax.jit(lambda args: op(*args, sharded)).lower(args).compile().as_text()
    assert "all-gather" in hlo, f"{name}: no all-gather of the shard summaries"
    return out


@check("sequence_parallel_delta_rule")
def _():
    """rj.linear_attention.delta_rule (a decay per head, per key; unit keys, beta in (0, 2)) and
    rwkv7 (RWKV-7's a = -kk, b = kk * a_gate) over 8 devices equal one device."""
    la, out = rj.linear_attention, []
    keys = iter(jax.random.split(jax.random.key(8), 12))
    normal = lambda *shape: jax.random.normal(next(keys), shape)
    q, k, v, S0 = normal(3, T, 2, 4), unit(normal(3, T, 2, 4)), normal(3, T, 2, 3), normal(3, 2, 4, 3)
    beta = 2 * jax.nn.sigmoid(normal(3, T, 2))
    g_head, g_key = jax.nn.log_sigmoid(2 + normal(3, T, 2)), jax.nn.log_sigmoid(2 + normal(3, T, 2, 4))
    kk, w = unit(normal(3, T, 2, 4)), jax.nn.log_sigmoid(2 + normal(3, T, 2, 4))
    a, b = -kk, kk * jax.nn.sigmoid(normal(3, T, 2, 4))
    lengths, resets = jnp.array([T, 40, 0]), jax.random.bernoulli(next(keys), 0.1, (3, T))
    delta = lambda q, k, v, beta, g, S, method, **kw: la.delta_rule(q, k, v, beta, g, state=S, method=method, **kw)
    rwkv7 = lambda r, w, k, v, a, b, S, method, **kw: la.rwkv7(r, w, k, v, a, b, state=S, method=method, **kw)
    out += sharded_equals_one_device("delta_head", delta, (q, k, v, beta, g_head, S0), lengths, resets)
    out += sharded_equals_one_device("delta_key", delta, (q, k, v, beta, g_key, S0), lengths, resets)
    out += sharded_equals_one_device("rwkv7", rwkv7, (q, w, k, v, a, b, S0), lengths, resets)
    return "max |diff| " + ", ".join(out)


@check("sequence_parallel_delta_cells")
def _():
    """rj.GatedDeltaNet and rj.RWKV7 (their convolution and token shift across the shards) through
    sequence_scan (auto: rj.Chunked() split over time) equal rj.scan on one device, in values and
    gradients."""
    out = []
    cells = (rj.GatedDeltaNet(heads=2, key_size=4, value_size=4),
             rj.RWKV7(hidden_size=3, heads=2, head_size=4, decay_rank=4, a_rank=4, gate_rank=4))
    for cell in cells:
        name = type(cell).__name__
        params, xs, lengths, resets = seq_inputs(cell, 4)
        # RWKV-7's initial output projection is zero (as fla's): perturb every parameter
        noise = jax.random.split(jax.random.key(5), len(jax.tree.leaves(params)))
        params = jax.tree.unflatten(jax.tree.structure(params), [
            p + 0.1 * jax.random.normal(n, p.shape, p.dtype) for p, n in zip(jax.tree.leaves(params), noise)])
        for reverse in (False, True):
            kw = dict(lengths=lengths, resets=resets, reverse=reverse)
            ref = rj.scan(cell, params, xs, method=rj.Sequential(), **kw)
            got = rj.distributed.sequence_scan(cell, params, xs, mesh=SEQ, axis="seq", **kw)
            assert_trees_close(got, ref, err_msg=f"{name} reverse={reverse} ", **F32)
            out.append(f"{name} reverse={reverse}: {max_abs_diff(got, ref):.1e} (largest |y| "
                       f"{float(jnp.abs(ref[0]).max()):.1e})")

        def loss(p, x, scan):
            ys, final = scan(p, x)
            return jnp.sum(ys ** 2) + sum(jnp.sum(c) for c in jax.tree.leaves(final))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        kw = dict(lengths=lengths, resets=resets, reverse=True)
        g_ref = grad(params, xs, lambda p, x, cell=cell, kw=kw: rj.scan(cell, p, x, method=rj.Sequential(), **kw))
        g_got = grad(params, xs, lambda p, x, cell=cell, kw=kw: rj.distributed.sequence_scan(
            cell, p, x, mesh=SEQ, axis="seq", **kw))
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_ref))
        assert_trees_close(g_got, g_ref, err_msg=f"{name} grad ", rtol=1e-4, atol=1e-4 * scale)
        out.append(f"{name} grad: {max_abs_diff(g_got, g_ref):.1e} (largest |grad| {scale:.1e})")
        hlo = jax.jit(lambda p, x, cell=cell: rj.distributed.sequence_scan(cell, p, x, mesh=SEQ, axis="seq")).lower(
            params, xs).compile().as_text()
        assert "all-gather" in hlo, f"{name}: no all-gather of the shard summaries"
    return "max |diff| " + ", ".join(out)


@check("sequence_parallel_is_split_over_devices")
def _():
    cell = rj.MinGRU(6)
    params, xs, lengths, resets = seq_inputs(cell, 0)
    xs = jnp.concatenate([xs, xs[:, :3]], axis=1)  # T = 64
    f = jax.jit(lambda p, x: rj.distributed.sequence_scan(cell, p, x, mesh=SEQ, axis="seq"))
    hlo = f.lower(params, xs).compile().as_text()
    assert "all-gather" in hlo, "no all-gather of the shard summaries"
    # The associative scan on each device covers T / 8 = 8 steps, not 64.
    ys = f(params, xs)[0]
    np.testing.assert_allclose(ys, rj.scan(cell, params, xs)[0], rtol=1e-5, atol=1e-5)
    return f"{hlo.count('all-gather(')} all-gather(s)"


@check("fixed_points_of_replicated_params_run_on_one_device")
def _():
    # Params replicated by mesh training made the search run once per device, and two devices
    # running its long loop at once wedged XLA:CPU (benchmarks/lab/two_device_hang.py).
    cell = rj.GRU(4)
    params = cell.init(jax.random.key(0), 3)
    starts = 0.3 * jax.random.normal(jax.random.key(1), (16, 4))
    everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)), jax.sharding.PartitionSpec())
    points, q = rj.inspect.fixed_point_candidates(cell, jax.device_put(params, everywhere), jnp.zeros(3),
                                                  jax.device_put(starts, everywhere), steps=50)
    assert len(points.devices()) == 1 and len(q.devices()) == 1, f"ran on {len(points.devices())} devices"
    expected = rj.inspect.fixed_point_candidates(cell, params, jnp.zeros(3), starts, steps=50)
    assert_trees_close((points, q), expected, rtol=0, atol=0)
    return f"on {points.devices()}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; the checks are {list(CHECKS)}")
    run_checks(names)
    text = json.dumps({"checks": list(CHECKS), "results": RESULTS}, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    for name, r in RESULTS.items():
        print(("ok  " if r["ok"] else "FAIL"), f"{r['seconds']:5.1f}s", name, "-", r["detail"].splitlines()[0] if r["detail"] else "")
