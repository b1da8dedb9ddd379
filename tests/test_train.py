"""rnnjax.train: train steps against hand-written optax updates, truncated BPTT against full
BPTT and a manual chunk-by-chunk computation, fit against a plain loop, padding that holds
NaN, donated states, errors in the middle of fit, and bad input. (Losses: test_losses.py.)"""

import functools
import io
import itertools
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from tests.helpers import assert_trees_close

T = rj.train
B, STEPS, D, H, C = 3, 8, 3, 4, 5
CELL = rj.GRU(H)
LENGTHS = jnp.array([8, 6, 3])
F32 = dict(atol=1e-6, rtol=1e-5)  # float32 rounding
EXACT = dict(atol=0, rtol=0)


# Test data from numpy: no JAX compilation for random numbers.
PARAMS = {"rnn": CELL.init(jax.random.key(0), D), "out": jnp.asarray(np.random.default_rng(0).normal(size=(H, C)) * 0.5, jnp.float32)}


def init_params():
    return PARAMS


def make_batch(seed=1, steps=STEPS, lengths=LENGTHS):
    rng = np.random.default_rng(seed)
    batch = {
        "x": jnp.asarray(rng.normal(size=(B, steps, D)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, C, (B, steps)), jnp.int32),
    }
    if lengths is not None:
        batch["lengths"] = lengths
    return batch


def chunk_loss(p, carry, chunk):
    """A TBPTT loss: the GRU from ``carry`` over the chunk, per-step cross-entropy."""
    lengths = chunk.get("lengths")
    ys, carry = rj.scan(CELL, p["rnn"], chunk["x"], carry, lengths=lengths)
    return T.softmax_cross_entropy(ys @ p["out"], chunk["y"], lengths), carry


def full_loss(p, batch):
    return chunk_loss(p, CELL.init_carry((B,)), batch)[0]


# Every compiled step is shared across tests (each costs a compilation).
OPT = optax.adam(0.05)
CLIP = 0.05  # below the gradients' norm at initialisation: clipping is active
SGD = optax.sgd(0.5)  # updates are -0.5 * gradients: easy to write by hand
FROZEN = optax.sgd(0.0)  # parameters stay put: a chunked forward pass equals the full one
VALUE_AND_GRAD = jax.jit(jax.value_and_grad(chunk_loss, has_aux=True))
SGD_UPDATE = jax.jit(lambda params, grads: jax.tree.map(lambda p, g: p - 0.5 * g, params, grads))


@functools.cache
def train_step():
    return T.make_train_step(full_loss, OPT, clip_norm=CLIP)


@functools.cache
def tbptt_step(chunk_size, optimizer=OPT, pad=False, clip_norm=CLIP):
    return T.make_tbptt_step(chunk_loss, optimizer, chunk_size, clip_norm=clip_norm, pad=pad)


def fresh_state(optimizer=OPT):
    return T.TrainState.create(PARAMS, optimizer)  # copies PARAMS: donation leaves them alone


# ---- make_train_step ----------------------------------------------------------------------


@jax.jit
def manual_update(params, opt_state, batch):
    loss, grads = jax.value_and_grad(full_loss)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, CLIP / norm), grads)
    updates, opt_state = OPT.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, norm


def test_train_step_is_the_clipped_optax_update_of_the_loss_gradient():
    # (without clip_norm: test_tbptt_gradients_stop_at_chunk_boundaries)
    batch = make_batch()
    params, opt_state = init_params(), OPT.init(init_params())
    state = fresh_state()
    for _ in range(2):
        state, metrics = train_step()(state, batch)
        params, opt_state, loss, norm = manual_update(params, opt_state, batch)
        assert_trees_close(metrics["loss"], loss, **F32)
        assert_trees_close(metrics["grad_norm"], norm, **F32)  # before clipping
        assert float(norm) > CLIP  # the clipping was active
        assert_trees_close(state.params, params, **F32)
        assert_trees_close(state.opt_state, opt_state, **F32)
    assert int(state.step) == 2 and state.step.dtype == jnp.int32


def test_train_step_donates_the_state_and_compiles_once():
    params = init_params()
    state = T.TrainState.create(params, OPT)
    step = train_step()
    new, _ = step(state, make_batch())
    assert state.params["out"].is_deleted()
    assert not params["out"].is_deleted()  # create copied the caller's params
    compiled = step._cache_size()
    new, _ = step(new, make_batch(seed=2))
    assert step._cache_size() == compiled


DONATED = r"state\.step has been deleted: it was donated to a train step at a previous call .*use the state that step \(or rj\.train\.fit\) returned"


def test_a_donated_state_passed_again_is_refused_naming_the_array():
    state = fresh_state()
    train_step()(state, make_batch())
    with pytest.raises(ValueError, match=DONATED):
        train_step()(state, make_batch())
    with pytest.raises(ValueError, match=DONATED):
        T.fit(train_step(), state, [make_batch()], progress=False)
    # over a mesh the check comes before the state is placed (nothing compiles)
    mesh_step = T.make_train_step(full_loss, OPT, mesh=jax.make_mesh((1,), ("data",)))
    with pytest.raises(ValueError, match=DONATED):
        mesh_step(state, make_batch())


def test_train_step_with_aux_metrics_and_without_donation():
    def loss_fn(p, batch):
        loss = full_loss(p, batch)
        return loss, {"bits": loss / jnp.log(2.0)}

    state = fresh_state()
    _, metrics = T.make_train_step(loss_fn, OPT, has_aux=True, donate=False)(state, make_batch())
    assert sorted(metrics) == ["bits", "grad_norm", "loss"]
    assert_trees_close(metrics["bits"], metrics["loss"] / np.log(2.0), **F32)
    assert not state.params["out"].is_deleted()


@pytest.mark.parametrize(
    "loss_fn, kwargs, error, message",
    [
        (lambda p, b: jnp.ones(3) * p["out"].sum(), {}, ValueError, r"loss_fn returned a loss of shape \(3,\); expected a scalar"),
        (lambda p, b: (full_loss(p, b), {}), {}, TypeError, "pass has_aux=True"),
        (lambda p, b: full_loss(p, b), {"has_aux": True}, TypeError, r"must return \(loss, aux_dict\)"),
        (lambda p, b: (full_loss(p, b), [1.0]), {"has_aux": True}, TypeError, "aux must be a dict of metrics, got list"),
        (lambda p, b: (full_loss(p, b), {"loss": 1.0}), {"has_aux": True}, ValueError, "aux has the key 'loss'"),
    ],
)
def test_train_step_rejects_bad_loss_functions(loss_fn, kwargs, error, message):
    step = T.make_train_step(loss_fn, OPT, **kwargs)
    with pytest.raises(error, match=message):
        step(fresh_state(), make_batch())


def test_train_step_rejects_bad_arguments_and_states():
    with pytest.raises(ValueError, match="clip_norm must be a positive number or None, got 0"):
        T.make_train_step(full_loss, OPT, clip_norm=0)
    with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation"):
        T.make_train_step(full_loss, "adam")
    step = T.make_train_step(full_loss, OPT, donate=False)
    with pytest.raises(TypeError, match="state is a tuple; expected rj.train.TrainState"):
        step((init_params(), OPT.init(init_params())), make_batch())
    with pytest.raises(ValueError, match="state.opt_state has structure .* expected .* from optimizer.init"):
        step(fresh_state(optax.sgd(0.1)), make_batch())


def test_an_out_of_range_label_makes_the_step_loss_nan():
    # inside the jitted step the label cannot raise; -1 must not pass as the last class
    batch = make_batch()
    batch["y"] = batch["y"].at[2, 1].set(-1)  # a real step of a sequence of length 3
    state, metrics = train_step()(fresh_state(), batch)
    assert np.isnan(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"])) and all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state))


def nan_padded(batch, value):
    """``batch`` with ``value`` in x and -1 in y at every step past a length."""
    padding = ~T.sequence_mask(batch["lengths"], batch["x"].shape[1])
    return {**batch, "x": jnp.where(padding[..., None], value, batch["x"]), "y": jnp.where(padding, -1, batch["y"])}


def test_nan_in_padding_changes_no_step():
    # depends on rj.scan keeping padded inputs out of the cell (rnnjax/sequence.py)
    batch = make_batch(lengths=jnp.array([8, 5, 0]))
    for pad in (np.nan, np.inf):
        (s0, m0), (s1, m1) = (train_step()(fresh_state(), nan_padded(batch, v)) for v in (0.0, pad))
        assert np.isfinite(float(m1["grad_norm"]))
        assert_trees_close((s1, m1), (s0, m0), **EXACT)
        step, carry = tbptt_step(4, SGD, clip_norm=None), CELL.init_carry((B,))
        (s0, c0, m0), (s1, c1, m1) = (step(fresh_state(SGD), carry, nan_padded(batch, v)) for v in (0.0, pad))
        assert_trees_close((s1, c1, m1), (s0, c0, m0), **EXACT)


MESH_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np, optax, rnnjax as rj

cell, opt = rj.GRU(4), optax.sgd(0.5)
mesh = jax.make_mesh((2,), ("data",))
params = {"rnn": cell.init(jax.random.key(0), 3), "out": jnp.ones((4, 3)) / 4}

def loss_fn(p, b):
    ys, _ = rj.scan(cell, p["rnn"], b["x"], lengths=b["lengths"])
    return rj.train.softmax_cross_entropy(ys @ p["out"], b["y"], b["lengths"])

step = rj.train.make_train_step(loss_fn, opt, mesh=mesh, donate=False)
rng = np.random.default_rng(0)
x, y, lengths = rng.normal(size=(4, 6, 3)), rng.integers(0, 3, (4, 6)), np.array([6, 4, 1, 0])
padding = np.arange(6) >= lengths[:, None]
out = {}
for name, value in [("zero", 0.0), ("nan", np.nan)]:
    batch = {"x": jnp.asarray(np.where(padding[..., None], value, x), jnp.float32),
             "y": jnp.asarray(np.where(padding, -1, y), jnp.int32), "lengths": jnp.asarray(lengths)}
    state, metrics = step(rj.train.TrainState.create(params, opt), batch)
    for i, leaf in enumerate(jax.tree.leaves((state, metrics))):
        out[f"{name}{i}"] = np.asarray(leaf)
np.savez(sys.argv[1], devices=len(jax.devices()), **out)
"""


@pytest.mark.slow  # a subprocess with its own JAX start: make test-all
def test_data_parallel_step_with_nan_in_padding_on_two_devices(tmp_path):
    # depends on rj.scan keeping padded inputs out of the cell (rnnjax/sequence.py)
    root = Path(__file__).resolve().parents[1]
    # The caller's XLA flags kept (tests/conftest.py sets some for the fast set), two devices added.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    out = tmp_path / "out.npz"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(MESH_SCRIPT), str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = np.load(out)
    assert int(result["devices"]) == 2
    names = sorted(k[4:] for k in result.files if k.startswith("zero"))
    for i in names:
        assert np.all(np.isfinite(result[f"nan{i}"])), f"leaf {i} is not finite"
        np.testing.assert_array_equal(result[f"nan{i}"], result[f"zero{i}"])


# ---- truncated BPTT -----------------------------------------------------------------------


# Two programs that give the same bits under XLA's default code generation, which make test
# (tests/conftest.py) trades for compile speed: there they differ in the last bit of a
# float32 (measured). make test-all (CI) runs it with JAX's defaults.
@pytest.mark.slow
def test_tbptt_with_one_chunk_equals_the_full_train_step_exactly():
    batch = make_batch()
    s_full, s_tb = fresh_state(), fresh_state()
    carry = CELL.init_carry((B,))
    for i in range(2):
        s_full, m_full = train_step()(s_full, batch)
        s_tb, carry_out, m_tb = tbptt_step(STEPS + 5)(s_tb, carry, batch)  # K > T
        if i == 0:  # the final carry of the sequence under the params before the update
            assert_trees_close(carry_out, rj.scan(CELL, init_params()["rnn"], batch["x"], lengths=LENGTHS)[1], **F32)
    assert_trees_close(s_tb, s_full, **EXACT)
    assert_trees_close(m_tb, m_full, **EXACT)
    # K == T is the same program
    programs = [tbptt_step(k).lower(s_tb, carry, batch).as_text() for k in (STEPS, STEPS + 5)]
    assert programs[0] == programs[1]


def test_tbptt_gradients_stop_at_chunk_boundaries():
    batch = make_batch()
    state, carry, metrics = tbptt_step(4, SGD, clip_norm=None)(fresh_state(SGD), CELL.init_carry((B,)), batch)

    def chunk(k):
        sl = slice(4 * k, 4 * k + 4)
        return {"x": batch["x"][:, sl], "y": batch["y"][:, sl], "lengths": jnp.clip(LENGTHS - 4 * k, 0, 4)}

    p0, c0 = init_params(), CELL.init_carry((B,))
    (l0, c1), g0 = VALUE_AND_GRAD(p0, c0, chunk(0))
    p1 = SGD_UPDATE(p0, g0)
    (l1, c2), g1 = VALUE_AND_GRAD(p1, c1, chunk(1))
    p2 = SGD_UPDATE(p1, g1)
    assert_trees_close(state.params, p2, **F32)
    assert_trees_close(carry, c2, **F32)
    assert int(state.step) == 2
    # the loss metric weights chunks by their real steps (4 + 4 + 3 = 11, then 4 + 2 + 0 = 6)
    assert_trees_close(metrics["loss"], (11 * l0 + 6 * l1) / 17, **F32)
    # Had the gradient flowed into chunk 0 through the carry, the second update would differ.
    g1_full = jax.jit(jax.grad(lambda p: chunk_loss(p, chunk_loss(p, c0, chunk(0))[1], chunk(1))[0]))(p1)
    p2_full = SGD_UPDATE(p1, g1_full)
    assert np.abs(np.asarray(p2_full["rnn"].w_h) - np.asarray(p2["rnn"].w_h)).max() > 1e-4


def test_tbptt_forward_hands_the_carry_over_and_reports_the_whole_sequence_loss():
    batch = make_batch(lengths=jnp.array([8, 5, 0]))
    state, carry, metrics = tbptt_step(2, FROZEN)(fresh_state(FROZEN), CELL.init_carry((B,)), batch)
    full_loss_jit = jax.jit(full_loss)
    assert_trees_close(metrics["loss"], full_loss_jit(init_params(), batch), **F32)
    assert_trees_close(carry, rj.scan(CELL, init_params()["rnn"], batch["x"], lengths=batch["lengths"])[1], **F32)
    assert int(state.step) == 4
    # padding: T=8 in chunks of 3 -> 9 steps, lengths added for a batch without them
    batch = make_batch(lengths=None)
    state, carry, metrics = tbptt_step(3, FROZEN, pad=True)(fresh_state(FROZEN), CELL.init_carry((B,)), batch)
    assert_trees_close(metrics["loss"], full_loss_jit(init_params(), batch), **F32)
    assert_trees_close(carry, rj.scan(CELL, init_params()["rnn"], batch["x"])[1], **F32)
    assert int(state.step) == 3


def test_tbptt_chunks_without_real_steps_make_no_update():
    batch = make_batch(lengths=jnp.array([4, 2, 0]))  # chunk 1 of 4 steps is padding only
    s_tb, _, _ = tbptt_step(4, SGD, clip_norm=None)(fresh_state(SGD), CELL.init_carry((B,)), batch)
    first = {"x": batch["x"][:, :4], "y": batch["y"][:, :4], "lengths": batch["lengths"]}
    _, grads = VALUE_AND_GRAD(init_params(), CELL.init_carry((B,)), first)
    assert int(s_tb.step) == 1
    assert_trees_close(s_tb.params, SGD_UPDATE(init_params(), grads), **F32)


def test_tbptt_folds_keys_per_chunk_and_compiles_one_loop():
    def loss_fn(p, carry, chunk):
        loss, carry = chunk_loss(p, carry, chunk)
        return loss, carry, {"u": jax.random.uniform(chunk["key"])}

    step = T.make_tbptt_step(loss_fn, FROZEN, 4, has_aux=True)
    key = jax.random.key(42)
    batch = {**make_batch(lengths=None), "key": key}
    _, _, metrics = step(fresh_state(FROZEN), CELL.init_carry((B,)), batch)
    assert_trees_close(metrics["u"], (jax.random.uniform(key) + jax.random.uniform(jax.random.fold_in(key, 1))) / 2, **F32)
    # the chunks run in a loop: the program does not grow with T
    carry = CELL.init_carry((B,))
    sizes = [
        len(tbptt_step(2, FROZEN).lower(fresh_state(FROZEN), carry, make_batch(steps=n)).as_text().splitlines())
        for n in (4, 16)
    ]
    assert sizes[0] == sizes[1]


def test_tbptt_bad_input_raises_a_clear_error():
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=f"chunk_size must be a positive int .*, got {bad!r}"):
            T.make_tbptt_step(chunk_loss, OPT, bad)
    with pytest.raises(ValueError, match="time_axis must be a non-negative int"):
        T.make_tbptt_step(chunk_loss, OPT, 2, time_axis=-1)
    carry = CELL.init_carry((B,))
    step = T.make_tbptt_step(chunk_loss, OPT, 3, donate=False)
    with pytest.raises(ValueError, match=r"T=8 is not a multiple of chunk_size=3; pass pad=True to pad it to 9"):
        step(fresh_state(), carry, make_batch())
    bad_batch = {**make_batch(), "y": make_batch()["y"][:, :6]}
    with pytest.raises(ValueError, match=r"batch\['y'\] has shape \(3, 6\); expected T=8 along time_axis=1"):
        step(fresh_state(), carry, bad_batch)
    with pytest.raises(TypeError, match="batch\\['lengths'\\] has dtype float32; expected an integer"):
        step(fresh_state(), carry, {**make_batch(), "lengths": jnp.ones(B)})
    padded = T.make_tbptt_step(lambda p, c, b: chunk_loss(p, c, dict(zip("xy", b))), OPT, 3, pad=True)
    with pytest.raises(ValueError, match="pass the batch as a dict"):
        padded(fresh_state(), carry, (make_batch()["x"], make_batch()["y"]))
    wrong_carry = T.make_tbptt_step(lambda p, c, b: (chunk_loss(p, c, b)[0], c[:, :2]), OPT, 4)
    with pytest.raises(ValueError, match=r"loss_fn returned a carry leaf float32\[3, 2\]; expected float32\[3, 4\]"):
        wrong_carry(fresh_state(), carry, make_batch())
    two = T.make_tbptt_step(lambda p, c, b: chunk_loss(p, c, b)[0], OPT, 4)
    with pytest.raises(TypeError, match=r"loss_fn must return \(loss, new_carry\)"):
        two(fresh_state(), carry, make_batch())


# ---- fit ----------------------------------------------------------------------------------


def test_fit_equals_a_plain_loop_and_prints_nothing_when_silent(capsys):
    batches = [make_batch(seed=s) for s in range(5)]
    state, history = T.fit(train_step(), fresh_state(), batches, progress=False, log_every=2)
    ref = fresh_state()
    losses = []
    for batch in batches:
        ref, metrics = train_step()(ref, batch)
        losses.append(float(metrics["loss"]))
    assert_trees_close(state, ref, **EXACT)
    assert history["step"] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(history["loss"], losses)
    assert len(history["grad_norm"]) == 5
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_fit_with_a_callable_steps_eval_and_progress():
    calls = []

    def batches(i):
        calls.append(i)
        return make_batch(seed=i % 3)

    def eval_fn(state):
        return {"loss": full_loss(state.params, make_batch(seed=9))}

    file = io.StringIO()
    records = []
    state, history = T.fit(train_step(), fresh_state(), batches, steps=7, eval_fn=eval_fn, eval_every=3,
                           log_every=2, file=file, on_log=records.append)
    assert calls == list(range(7)) and int(state.step) == 7
    assert history["eval_step"] == [3, 6, 7]
    assert_trees_close(history["eval_loss"][-1], eval_fn(state)["loss"], **F32)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 6, 7]  # every 2 steps, evaluations, the end
    assert np.isclose(records[1]["loss"], history["loss"][1])  # the mean since the previous log point
    text = file.getvalue()
    assert "step 1/7" in text and "steps/s" in text and "step 3: eval_loss" in text
    assert text.splitlines()[-1].startswith("fit: 7 steps in ")
    # a resumed run continues the numbering from state.step
    _, history = T.fit(train_step(), state, batches, steps=2, progress=False)
    assert history["step"] == [8, 9] and calls[-2:] == [7, 8]
    with pytest.raises(ValueError, match="steps is required when batches is a callable"):
        T.fit(train_step(), state, batches)


def test_fit_rewrites_one_line_on_terminals():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    file = Terminal()
    T.fit(train_step(), fresh_state(), [make_batch()] * 3, log_every=1, file=file)
    text = file.getvalue()
    assert text.count("\r") >= 3 and text.endswith("\n") and "step 3/3" in text


def test_fit_threads_a_tbptt_carry_and_stops_cleanly_on_interrupt():
    step = tbptt_step(4, SGD, clip_norm=None)
    batches = [make_batch(seed=s) for s in range(3)]
    state, history = T.fit(step, fresh_state(SGD), batches, carry=CELL.init_carry((B,)), progress=False)
    ref, carry = fresh_state(SGD), CELL.init_carry((B,))
    for batch in batches:
        ref, carry, _ = step(ref, carry, batch)
    assert_trees_close(state, ref, **EXACT)
    assert_trees_close(history["carry"], carry, **EXACT)
    assert history["step"] == [1, 2, 3] and int(state.step) == 6  # 2 chunk updates per batch

    def interrupted():
        yield make_batch()
        yield make_batch()
        raise KeyboardInterrupt

    file = io.StringIO()
    state, history = T.fit(train_step(), fresh_state(), interrupted(), file=file)
    assert int(state.step) == 2 and len(history["loss"]) == 2
    assert "(interrupted)" in file.getvalue()


def test_fit_hands_back_the_last_good_state_on_any_exception():
    good = [make_batch(seed=s) for s in range(3)]
    ref = fresh_state()
    for batch in good[:2]:
        ref, _ = train_step()(ref, batch)
    # a bad batch: rj.scan refuses it while tracing
    bad = {**good[0], "x": jnp.ones((B, STEPS, D + 1))}
    file = io.StringIO()
    with pytest.raises(ValueError, match="xs has shape") as info:
        T.fit(train_step(), fresh_state(), [*good[:2], bad, good[2]], file=file, log_every=5)
    err = info.value
    assert_trees_close(err.state, ref, **EXACT)
    assert err.history["step"] == [1, 2] and len(err.history["loss"]) == 2
    assert any("the last good state (after step 2) is in err.state" in note for note in err.__notes__)
    assert file.getvalue().splitlines()[-1].startswith("fit: 2 steps in ") and "(stopped by ValueError)" in file.getvalue()
    state, history = T.fit(train_step(), err.state, good[2:], progress=False)  # training goes on from it
    assert int(state.step) == 3 and history["step"] == [3]

    # an error in the evaluation (or anywhere else) hands back the state it was given
    def eval_fn(state):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed") as info:
        T.fit(train_step(), fresh_state(), good, eval_fn=eval_fn, eval_every=2, progress=False)
    assert_trees_close(info.value.state, ref, **EXACT)

    # a step that fails after consuming the donated state: nothing good is left to hand back
    def failing(state, batch):
        new, metrics = train_step()(state, batch)
        if int(new.step) == 2:
            raise FloatingPointError("loss is NaN")
        return new, metrics

    with pytest.raises(FloatingPointError) as info:
        T.fit(failing, fresh_state(), good, progress=False)
    assert info.value.state is None and info.value.history["step"] == [1]
    assert any("the state after step 1 was consumed by the failure" in note for note in info.value.__notes__)


# ---- fit and Ctrl-C -----------------------------------------------------------------------


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test. A suite started in the background (``make test &``)
    inherits SIGINT ignored (POSIX shells without job control do that), and fit rightly leaves a
    handler it did not expect alone: the tests' interrupts were lost and one of them hung."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def batches_until_interrupted(limit=50):
    """The batches of a run that only an interrupt should end: a lost SIGINT (say, a handler
    another test left installed, which fit leaves alone) ends it after ``limit`` steps and fails
    the test's step count, instead of hanging the suite."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "a SIGINT handler is installed"
    return itertools.repeat(make_batch(), limit)


def sigint_after_step(presses, at):
    """``train_step()`` that sends itself ``presses`` SIGINTs right after the jitted call
    returned at its ``at``-th call: the state passed in is donated by then."""
    calls = []

    def step(state, batch):
        out = train_step()(state, batch)
        calls.append(1)
        if len(calls) == at:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return out

    return step


@pytest.mark.usefixtures("default_sigint")
def test_ctrl_c_right_after_a_step_donated_the_state_stops_with_the_new_state():
    file = io.StringIO()
    state, history = T.fit(sigint_after_step(1, at=3), fresh_state(), batches_until_interrupted(), file=file)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert int(state.step) == 3 and history["step"] == [1, 2, 3] and len(history["loss"]) == 3
    assert "fit: 3 steps" in file.getvalue() and "(interrupted)" in file.getvalue()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # fit's own handler is gone


@pytest.mark.usefixtures("default_sigint")
def test_a_second_ctrl_c_raises_keyboard_interrupt_with_the_state_after_the_step():
    with pytest.raises(KeyboardInterrupt) as info:
        T.fit(sigint_after_step(2, at=2), fresh_state(), batches_until_interrupted(), progress=False)
    err = info.value
    assert int(err.state.step) == 2 and not any(leaf.is_deleted() for leaf in jax.tree.leaves(err.state))
    assert err.history["step"] == [1, 2]
    assert any("the last good state (after step 2) is in err.state" in note for note in err.__notes__)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("default_sigint")
def test_a_third_ctrl_c_inside_a_step_raises_at_once_and_says_the_state_was_consumed():
    with pytest.raises(KeyboardInterrupt) as info:
        T.fit(sigint_after_step(3, at=2), fresh_state(), batches_until_interrupted(), progress=False)
    assert info.value.state is None and info.value.history["step"] == [1]
    assert any("the state after step 1 was consumed" in note for note in info.value.__notes__)


@pytest.mark.usefixtures("default_sigint")
def test_without_fits_handler_an_interrupt_after_a_donation_raises_rather_than_reading_deleted_arrays():
    """Someone else's SIGINT handler is left in place; fit in another thread installs none."""

    def users_handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, users_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            T.fit(sigint_after_step(1, at=2), fresh_state(), itertools.repeat(make_batch(), 50), progress=False)
        assert signal.getsignal(signal.SIGINT) is users_handler
    finally:
        signal.signal(signal.SIGINT, previous)
    assert info.value.state is None and info.value.history["step"] == [1]
    results = []  # fit in another thread cannot set a signal handler, and does not try
    run = functools.partial(T.fit, train_step(), fresh_state(), [make_batch()] * 2, progress=False)
    thread = threading.Thread(target=lambda: results.append(run()))
    thread.start()
    thread.join()
    assert int(results[0][0].step) == 2


@pytest.mark.usefixtures("default_sigint")
def test_ctrl_c_at_random_moments_always_returns_the_state_of_the_steps_done():
    """Real SIGINTs from another thread, at random delays into runs that only an interrupt ends;
    the step does Python work after its donating call, where an interrupt used to lose the state."""
    calls, runs = [0], queue.Queue()

    def step(state, batch):
        out = train_step()(state, batch)
        calls[0] += 1
        time.sleep(0.001)
        return out

    def press():  # one SIGINT per run, sent after the run's first batch: it lands in that run
        while (run := runs.get(timeout=60)) is not None:
            time.sleep(run)
            os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=press)
    sender.start()
    state = fresh_state()
    try:
        for delay in np.random.default_rng(0).uniform(0.0, 0.02, 6):
            before, calls[0] = int(state.step), 0

            def batches(i, delay=delay, before=before):
                if i == before:
                    runs.put(delay)
                if i > before + 100_000:  # the signal was lost: fail rather than hang
                    raise RuntimeError("no interrupt arrived")
                return make_batch()

            state, history = T.fit(step, state, batches, steps=10**9, progress=False)
            assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
            assert int(state.step) - before == calls[0] == len(history["loss"]) >= 1
    finally:
        runs.put(None)
        sender.join()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- a matrix-state cell --------------------------------------------------------------------


MLSTM = rj.MLSTM(heads=2, qk_head_size=2, v_head_size=2)


def mlstm_chunk_loss(p, carry, chunk):
    """Predict the previous step's input (a delay of one) with an mLSTM layer from ``carry``."""
    lengths = chunk.get("lengths")
    ys, carry = rj.scan(MLSTM, p, chunk["x"], carry, lengths=lengths)
    return T.mean_squared_error(ys, chunk["target"], lengths), carry


@pytest.mark.slow  # TBPTT and fit compile several programs: 5 s
def test_tbptt_and_fit_run_a_matrix_state_cell():
    x = np.random.default_rng(3).normal(size=(B, STEPS, D)).astype(np.float32)
    target = np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    batch = {"x": jnp.asarray(x), "target": jnp.asarray(target), "lengths": LENGTHS}
    params = MLSTM.init(jax.random.key(0), D)
    zero = MLSTM.init_carry((B,))
    # TBPTT in chunks of 3 (T = 8, padded) hands the mLSTM state (C, n, m) from chunk to chunk:
    # with frozen params, the loss and the carry are the whole sequence's.
    step = T.make_tbptt_step(mlstm_chunk_loss, FROZEN, 3, pad=True)
    state, carry, metrics = step(T.TrainState.create(params, FROZEN), zero, batch)
    loss, final = jax.jit(mlstm_chunk_loss)(params, zero, batch)
    assert_trees_close(metrics["loss"], loss, **F32)
    assert_trees_close(carry, final, **F32)
    assert int(state.step) == 3
    # fit with a full-sequence step learns the delay.
    adam = optax.adam(0.05)
    train = T.make_train_step(lambda p, b: mlstm_chunk_loss(p, zero, b)[0], adam)
    state, history = T.fit(train, T.TrainState.create(params, adam), [batch] * 40, progress=False, log_every=39)
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
