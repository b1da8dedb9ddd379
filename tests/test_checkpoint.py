"""rnnjax.train.checkpoint (as rj.train.save_checkpoint / restore_checkpoint): round trips, resuming
bit for bit, interrupted saves, mismatching models, and bad input that writes nothing."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj

T = rj.train
CELL = rj.GRU(4)
OPT = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))
RNG = np.random.default_rng(0)
XS = jnp.asarray(RNG.normal(size=(6, 2, 5, 3)), jnp.float32)  # 6 batches of (2, 5, 3)
YS = jnp.asarray(RNG.normal(size=(6, 2, 5, 4)), jnp.float32)


def params(cell=CELL, input_size=3, seed=0):
    return {"rnn": cell.init(jax.random.key(seed), input_size)}


def loss_fn(p, batch):
    ys, _ = rj.scan(CELL, p["rnn"], batch["x"])
    return T.mean_squared_error(ys, batch["y"])


@functools.cache
def train_step():
    return T.make_train_step(loss_fn, OPT)


def batch(i):
    return {"x": XS[i], "y": YS[i]}


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_structure_values_and_dtypes(tmp_path):
    state = T.TrainState.create(params(rj.LSTM(4, peephole=True)), OPT)  # NamedTuples, None fields
    state = state._replace(step=jnp.asarray(7, jnp.int32))
    path = T.save_checkpoint(tmp_path / "ck", state)
    assert path == tmp_path / "ck" / "7" and T.checkpoint_steps(tmp_path / "ck") == [7]
    like = T.TrainState.create(params(rj.LSTM(4, peephole=True), seed=1), OPT)  # other values
    restored = T.restore_checkpoint(tmp_path / "ck", like)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert type(restored.params["rnn"]).__name__ == "LSTMParams" and restored.params["rnn"].w_proj is None
    leaves_equal(restored, state)
    # an abstract target (jax.eval_shape) works as well, in str paths too
    abstract = jax.eval_shape(lambda: like)
    leaves_equal(T.restore_checkpoint(str(tmp_path / "ck"), abstract, step=7), state)


def test_resuming_from_a_checkpoint_is_bit_for_bit_training_without_interruption(tmp_path):
    step = train_step()
    straight = T.TrainState.create(params(), OPT)
    for i in range(6):
        straight, _ = step(straight, batch(i))

    state = T.TrainState.create(params(), OPT)
    for i in range(3):
        state, _ = step(state, batch(i))
    T.save_checkpoint(tmp_path, state)
    del state
    # a fresh process would know only the model's structure
    like = jax.eval_shape(lambda: T.TrainState.create(params(), OPT))
    state = T.restore_checkpoint(tmp_path, like)
    assert int(state.step) == 3
    for i in range(3, 6):
        state, _ = step(state, batch(i))  # the restored (and donated) buffers train on
    leaves_equal(state, straight)
    # through fit too: the callable batches continue from the restored step
    resumed, history = T.fit(step, T.restore_checkpoint(tmp_path, like), batch, steps=3, progress=False)
    assert history["step"] == [4, 5, 6]
    leaves_equal(resumed, straight)


def interrupt_commit(monkeypatch):
    """Make orbax's final commit (the rename of the temporary directory) fail, as a crash
    between writing the data and committing it would."""
    import orbax.checkpoint as ocp

    async def crash(self):
        raise OSError("simulated crash before the commit")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, capfd):
    first = T.TrainState.create(params(), OPT)
    T.save_checkpoint(tmp_path, first, step=1)
    second = first._replace(params=jax.tree.map(lambda x: x + 1.0, first.params))
    with monkeypatch.context() as m:
        interrupt_commit(m)
        with pytest.raises(OSError, match="simulated crash"):
            T.save_checkpoint(tmp_path, second, step=2)
    assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(tmp_path))  # the data was written
    assert T.checkpoint_steps(tmp_path) == [1]
    leaves_equal(T.restore_checkpoint(tmp_path, first), first)
    # A save killed earlier (a partial temporary directory with junk) is ignored too, and the
    # next save of that step replaces it.
    junk = tmp_path / "3.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "half_written").write_bytes(b"\x00" * 10)
    assert T.checkpoint_steps(tmp_path) == [1]
    T.save_checkpoint(tmp_path, second, step=2)
    leaves_equal(T.restore_checkpoint(tmp_path, first), second)
    assert capfd.readouterr().err == ""  # orbax's warnings are kept quiet


def test_keep_deletes_the_oldest_checkpoints(tmp_path):
    state = T.TrainState.create(params(), OPT)
    for s in range(1, 5):
        T.save_checkpoint(tmp_path, state, step=s, keep=2)
    assert T.checkpoint_steps(tmp_path) == [3, 4]
    for s in range(5, 7):
        T.save_checkpoint(tmp_path, state, step=s, keep=None)
    assert T.checkpoint_steps(tmp_path) == [3, 4, 5, 6]


@pytest.mark.parametrize(
    "like, message",
    [
        (params(rj.GRU(8)), r"params/rnn/w_x has shape \(3, 12\) in the checkpoint, \(3, 24\) in the model"),
        (params(rj.GRU(4), input_size=2), r"params/rnn/w_x has shape \(3, 12\) in the checkpoint, \(2, 12\) in the model"),
        ({"rnn": params()["rnn"], "out": jnp.zeros(2)}, "params/out is in the model but not in the checkpoint"),
        ({}, r"params/rnn/\w+ is in the checkpoint but not in the model"),
        (jax.tree.map(lambda x: x.astype(jnp.float16), params()), "params/rnn/w_x has dtype float32 in the checkpoint, float16 in the model"),
    ],
    ids=["wider", "other-input", "missing-leaf", "extra-leaf", "dtype"],
)
def test_a_mismatching_model_gets_an_error_naming_the_first_mismatching_path(tmp_path, like, message):
    T.save_checkpoint(tmp_path, T.TrainState.create(params(), optax.sgd(0.1)), step=3)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="checkpoint at step 3 in .* does not match the model: " + message):
        T.restore_checkpoint(tmp_path, T.TrainState.create(like, optax.sgd(0.1)))
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_input_raises_and_writes_nothing(tmp_path):
    target = tmp_path / "ck"
    state = T.TrainState.create(params(), OPT)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        T.save_checkpoint(target, state, step=-1)
    with pytest.raises(ValueError, match="keep must be a positive int or None, got 0"):
        T.save_checkpoint(target, state, keep=0)
    with pytest.raises(TypeError, match="state has a str at params/name; expected arrays only"):
        T.save_checkpoint(target, state._replace(params={"name": "gru"}))
    with pytest.raises(ValueError, match="state has no step attribute; pass step="):
        T.save_checkpoint(target, {"w": jnp.ones(2)})
    with pytest.raises(TypeError, match="state has a traced value at step; save_checkpoint must be called outside jit"):
        jax.jit(lambda s: T.save_checkpoint(target, s) and 0)(state)
    donated = T.TrainState.create(params(), OPT)
    train_step()(donated, batch(0))
    with pytest.raises(ValueError, match=r"state's array at step has been deleted \(donated to a train step\)"):
        T.save_checkpoint(target, donated)
    assert not target.exists()
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        T.save_checkpoint(tmp_path / "file", state)
    T.save_checkpoint(target, state)
    with pytest.raises(ValueError, match=r"a checkpoint for step 0 already exists in .*existing steps: \[0\]"):
        T.save_checkpoint(target, state)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 in .*; it has steps \[0\]"):
        T.restore_checkpoint(target, state, step=5)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        T.restore_checkpoint(tmp_path / "missing", state)
    assert not (tmp_path / "missing").exists()
