"""rnnjax.train.checkpoint (as rj.train.save_checkpoint / restore_checkpoint): round trips (typed
PRNG keys, every dtype, zero-size arrays), resuming bit for bit, interrupted and concurrent saves,
which folders are checkpoints and which steps are kept, unreadable checkpoints, mismatching models,
and bad input that writes nothing."""

import asyncio
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from rnnjax.train import checkpoint_leaves
from tests.cases import normal

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


def interrupt_commit(monkeypatch, written):
    """Make orbax's final commit (the rename of its temporary directory) fail, as a crash
    between writing the data and committing it would; ``written`` gets what was written."""
    import orbax.checkpoint as ocp

    async def crash(self):
        written.extend(os.listdir(self.get()))
        raise OSError("simulated crash before the commit")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch, capfd):
    first = T.TrainState.create(params(), OPT)
    T.save_checkpoint(tmp_path, first, step=1)
    second = first._replace(params=jax.tree.map(lambda x: x + 1.0, first.params))
    before = sorted(os.listdir(tmp_path))
    written = []
    with monkeypatch.context() as m:
        interrupt_commit(m, written)
        with pytest.raises(OSError, match="simulated crash"):
            T.save_checkpoint(tmp_path, second, step=2)
    assert "_METADATA" in written  # the crash came after the data was written
    assert T.checkpoint_steps(tmp_path) == [1]
    assert sorted(os.listdir(tmp_path)) == before  # the failed save removed its staging folder
    leaves_equal(T.restore_checkpoint(tmp_path, first), first)
    # A save killed earlier (a partial temporary directory with junk) is ignored too, and the
    # next save of that step succeeds.
    junk = tmp_path / "3.orbax-checkpoint-tmp-1234"
    junk.mkdir()
    (junk / "half_written").write_bytes(b"\x00" * 10)
    assert T.checkpoint_steps(tmp_path) == [1]
    T.save_checkpoint(tmp_path, second, step=2)
    leaves_equal(T.restore_checkpoint(tmp_path, first), second)
    assert capfd.readouterr().err == ""  # orbax's warnings are kept quiet


def test_staging_folders_of_killed_saves_are_removed_and_live_ones_kept(tmp_path):
    """A save killed (kill -9) leaves its staging folder; the next save removes it once no
    process holds its writer lock, and never touches a live writer's folder."""
    state = {"w": jnp.ones(3)}
    dead, live = tmp_path / ".rnnjax-tmp-5-dead", tmp_path / ".rnnjax-tmp-5-live"
    for folder in (dead, live):
        (folder / "default").mkdir(parents=True)
        (folder / "default" / "data").write_bytes(b"\x00" * 10)
        (folder / ".writer.lock").touch()
    with open(live / ".writer.lock", "r+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another open file description: a live writer
        T.save_checkpoint(tmp_path, state, step=1)
        assert not dead.exists() and (live / "default" / "data").exists()
    T.save_checkpoint(tmp_path, state, step=2)
    assert not live.exists()
    assert T.checkpoint_steps(tmp_path) == [1, 2]


CONCURRENT_WRITER = """
import json, pathlib, sys, time
import jax.numpy as jnp
import orbax.checkpoint as ocp
import rnnjax as rj

root, me, trials = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

def meet(name):  # a barrier of the two writers, through files
    (root / f"{name}-{me}").touch()
    deadline = time.monotonic() + 30
    while not all((root / f"{name}-{i}").exists() for i in (0, 1)):
        assert time.monotonic() < deadline, f"writer {me}: the other writer never reached {name}"
        time.sleep(0.001)

trial = 0
write = ocp.StandardCheckpointHandler.save
def write_then_meet(self, *args, **kwargs):
    write(self, *args, **kwargs)
    if trial % 2 == 0:  # in even trials both writers hold all their data before either publishes
        meet(f"written{trial}")
ocp.StandardCheckpointHandler.save = write_then_meet

value = 10.0 * (me + 1)
state = {"s": jnp.asarray(value), "a": jnp.full((32, 32), 2 * value)}
results = []
for trial in range(trials):
    meet(f"start{trial}")
    try:
        rj.train.save_checkpoint(root / f"ck{trial}", state, step=2)
        results.append("saved")
    except Exception as e:
        results.append(f"{type(e).__name__}: {e}")
print(json.dumps(results))
"""


@pytest.mark.slow  # a subprocess with its own JAX start: make test-all
def test_concurrent_saves_of_one_step_publish_exactly_one_writers_state(tmp_path):
    """Two OS processes save step 2 into one directory at once: one publishes its complete
    state, the other gets a clear error, and a restore holds one writer's arrays only."""
    trials = 4
    script = tmp_path / "writer.py"
    script.write_text(CONCURRENT_WRITER)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(i), str(trials)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    like = {"s": jnp.asarray(0.0), "a": jnp.zeros((32, 32))}
    for trial in range(trials):
        outcome = [results[0][trial], results[1][trial]]
        assert outcome.count("saved") == 1, (trial, outcome)
        loser = outcome[1 - outcome.index("saved")]
        assert re.match(r"ValueError: a checkpoint for step 2 already exists in .*ck\d", loser), (trial, loser)
        directory = tmp_path / f"ck{trial}"
        assert T.checkpoint_steps(directory) == [2]
        assert not [n for n in os.listdir(directory) if n.startswith(".rnnjax-tmp")]
        restored = T.restore_checkpoint(directory, like)
        winner_value = 10.0 * (outcome.index("saved") + 1)
        assert float(restored["s"]) == winner_value, (trial, outcome, float(restored["s"]))
        np.testing.assert_array_equal(np.asarray(restored["a"]), np.full((32, 32), 2 * winner_value, np.float32))


def test_keep_deletes_the_oldest_checkpoints(tmp_path):
    state = T.TrainState.create(params(), OPT)
    for s in range(1, 5):
        T.save_checkpoint(tmp_path, state, step=s, keep=2)
    assert T.checkpoint_steps(tmp_path) == [3, 4]
    for s in range(5, 7):
        T.save_checkpoint(tmp_path, state, step=s, keep=None)
    assert T.checkpoint_steps(tmp_path) == [3, 4, 5, 6]


def test_latest_is_the_highest_step_and_keep_prunes_by_step_number(tmp_path):
    """A run restarted from an earlier checkpoint saves lower steps: they warn, "latest"
    stays the highest step, and pruning keeps the highest steps and the one just saved."""
    states = {s: {"w": jnp.full(2, float(s))} for s in (10, 20, 30, 5, 6)}
    for s in (10, 20, 30):
        T.save_checkpoint(tmp_path, states[s], step=s, keep=3)
    with pytest.warns(UserWarning, match=re.escape(
            f"saving step 5 in {tmp_path}, which has higher steps [10, 20, 30]: restore_checkpoint() "
            "restores the highest step (30); pass step=5 to load this one")):
        T.save_checkpoint(tmp_path, states[5], step=5, keep=3)
    assert T.checkpoint_steps(tmp_path) == [5, 10, 20, 30]
    leaves_equal(T.restore_checkpoint(tmp_path, states[5]), states[30])
    leaves_equal(T.restore_checkpoint(tmp_path, states[5], step=5), states[5])
    with pytest.warns(UserWarning, match=r"saving step 6 .* higher steps \[10, 20, 30\]"):
        T.save_checkpoint(tmp_path, states[6], step=6, keep=3)
    assert T.checkpoint_steps(tmp_path) == [6, 10, 20, 30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a higher step does not warn
        T.save_checkpoint(tmp_path, states[30], step=31, keep=2)
    assert T.checkpoint_steps(tmp_path) == [30, 31]


def test_folders_that_are_not_checkpoints_are_never_listed_or_deleted(tmp_path):
    own = {"7": "notes.txt", "007": "x", "12": "default/_METADATA"}  # a folder named like a step
    for folder, file in own.items():
        (tmp_path / folder / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / file).write_text("the user's")
    (tmp_path / "8").write_text("a file named like a step")
    elsewhere = tmp_path / "elsewhere"
    T.save_checkpoint(elsewhere, {"w": jnp.zeros(2)}, step=0)
    (tmp_path / "0").symlink_to(elsewhere / "0")  # a link to a checkpoint is one; deleting it unlinks it
    assert T.checkpoint_steps(tmp_path) == [0]
    for s in (1, 2, 3):
        T.save_checkpoint(tmp_path, {"w": jnp.full(2, float(s))}, step=s, keep=1)
    assert T.checkpoint_steps(tmp_path) == [3]
    for folder, file in own.items():
        assert (tmp_path / folder / file).read_text() == "the user's"
    assert (tmp_path / "8").read_text() == "a file named like a step"
    assert not (tmp_path / "0").exists() and T.checkpoint_steps(elsewhere) == [0]
    assert sorted(os.listdir(tmp_path)) == sorted([".rnnjax.lock", "3", "8", "elsewhere", *own])


def test_a_checkpoint_of_an_earlier_rnnjax_is_listed_restored_and_pruned(tmp_path):
    """Earlier versions saved through orbax's CheckpointManager, without rnnjax's record."""
    import orbax.checkpoint as ocp

    state = T.TrainState.create(params(), OPT)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path, options=options, item_handlers=ocp.StandardCheckpointHandler()) as manager:
        manager.save(4, args=ocp.args.StandardSave(state))
    assert T.checkpoint_steps(tmp_path) == [4]
    leaves_equal(T.restore_checkpoint(tmp_path, state), state)
    with pytest.raises(ValueError, match=r"params/rnn/w_x has shape \(3, 12\) in the checkpoint, \(3, 24\) in the model"):
        T.restore_checkpoint(tmp_path, T.TrainState.create(params(rj.GRU(8)), OPT))
    T.save_checkpoint(tmp_path, state, step=5, keep=1)
    assert T.checkpoint_steps(tmp_path) == [5]


# The models are built when a test runs, not when the module is collected (in every xdist worker).
@pytest.mark.parametrize(
    "make_like, message",
    [
        (lambda: params(rj.GRU(8)), r"params/rnn/w_x has shape \(3, 12\) in the checkpoint, \(3, 24\) in the model"),
        (lambda: params(rj.GRU(4), input_size=2), r"params/rnn/w_x has shape \(3, 12\) in the checkpoint, \(2, 12\) in the model"),
        (lambda: {"rnn": params()["rnn"], "out": jnp.zeros(2)}, "params/out is in the model but not in the checkpoint"),
        (lambda: {}, r"params/rnn/\w+ is in the checkpoint but not in the model"),
        (lambda: jax.tree.map(lambda x: x.astype(jnp.float16), params()), "params/rnn/w_x has dtype float32 in the checkpoint, float16 in the model"),
    ],
    ids=["wider", "other-input", "missing-leaf", "extra-leaf", "dtype"],
)
def test_a_mismatching_model_gets_an_error_naming_the_first_mismatching_path(tmp_path, make_like, message):
    T.save_checkpoint(tmp_path, T.TrainState.create(params(), optax.sgd(0.1)), step=3)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="checkpoint at step 3 in .* does not match the model: " + message):
        T.restore_checkpoint(tmp_path, T.TrainState.create(make_like(), optax.sgd(0.1)))
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


def test_typed_prng_keys_round_trip_as_keys_of_their_impl(tmp_path):
    state = {
        "dropout": jax.random.key(3),  # key<fry>
        "keys": jax.random.split(jax.random.key(4, impl="rbg"), 3),  # key<rbg>, shape (3,)
        "raw": jax.random.PRNGKey(5),  # uint32 (2,)
        "empty_keys": jax.random.split(jax.random.key(6), 0),
        "w": jnp.ones(2),
    }
    T.save_checkpoint(tmp_path, state, step=1)
    for like in (state, jax.eval_shape(lambda: state)):
        restored = T.restore_checkpoint(tmp_path, like)
        for name in ("dropout", "keys", "empty_keys"):
            assert restored[name].dtype == state[name].dtype and restored[name].shape == state[name].shape
            assert jax.random.key_impl(restored[name]) == jax.random.key_impl(state[name])
            np.testing.assert_array_equal(jax.random.key_data(restored[name]), jax.random.key_data(state[name]))
        leaves_equal(restored["raw"], state["raw"])
        # the restored key draws what the saved one draws
        np.testing.assert_array_equal(jax.random.uniform(restored["dropout"], (3,)), jax.random.uniform(state["dropout"], (3,)))
    other_impl = {**state, "keys": jax.random.split(jax.random.key(4), 3)}
    with pytest.raises(ValueError, match=r"keys has dtype key<rbg> in the checkpoint, key<fry> in the model"):
        T.restore_checkpoint(tmp_path, other_impl)
    with pytest.raises(ValueError, match=r"dropout has shape \(\) in the checkpoint, \(2,\) in the model"):
        T.restore_checkpoint(tmp_path, {**state, "dropout": jax.random.PRNGKey(3)})


def test_every_dtype_zero_size_arrays_and_none_round_trip(tmp_path):
    state = {
        # tensorstore stores none of these three as they are
        "uint4": jnp.arange(5, dtype=jnp.uint4),
        "uint2": jnp.arange(3, dtype=jnp.uint2),
        "float8_e4m3": jnp.asarray([-448.0, -0.0, 0.001953125, 1.5, jnp.inf, jnp.nan], jnp.float8_e4m3),
        "bfloat16": jnp.asarray([1.5, -2.25], jnp.bfloat16),
        "complex64": jnp.asarray([1 + 2j], jnp.complex64),
        "int4": jnp.arange(-3, 3, dtype=jnp.int4),
        "float8_e5m2": jnp.asarray([0.5, 3.0], jnp.float8_e5m2),
        "bool": jnp.asarray([True, False]),
        "zero_size": jnp.zeros((0, 3), jnp.float16),
        "numpy_zero_size": np.zeros((2, 0), np.int32),
        "none": None,
    }
    T.save_checkpoint(tmp_path, state, step=1)
    for like in (state, jax.eval_shape(lambda: state)):
        restored = T.restore_checkpoint(tmp_path, like)
        assert jax.tree.structure(restored) == jax.tree.structure(state)
        for name, saved in state.items():
            if saved is None:
                continue
            got = restored[name]
            assert got.dtype == saved.dtype and got.shape == saved.shape, name
            # bit for bit, NaN and -0.0 included
            np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(saved).view(np.uint8), err_msg=name)
    assert type(T.restore_checkpoint(tmp_path, state)["numpy_zero_size"]) is np.ndarray


def test_a_dtype_orbax_cannot_store_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # every dtype of JAX today is stored or converted; a future one would not be
    monkeypatch.setattr(checkpoint_leaves, "_storable", lambda dtype: np.dtype(dtype) != np.dtype(jnp.bfloat16))
    with pytest.raises(TypeError, match="state's array at w has dtype bfloat16, which orbax cannot store; cast it"):
        T.save_checkpoint(tmp_path / "ck", {"w": jnp.ones(2, jnp.bfloat16)}, step=1)
    assert not (tmp_path / "ck").exists()


def test_restored_arrays_are_placed_like_the_models_on_a_mesh(tmp_path):
    mesh = jax.make_mesh((1,), ("data",))
    on_mesh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {"w": jax.device_put(jnp.arange(4.0), on_mesh),
             "key": jax.device_put(jax.random.split(jax.random.key(1), 2), on_mesh)}
    T.save_checkpoint(tmp_path, state, step=1)
    restored = T.restore_checkpoint(tmp_path, state)
    assert restored["w"].sharding == on_mesh and restored["key"].sharding == on_mesh
    leaves_equal(restored["w"], state["w"])
    # jax.eval_shape of it has a sharding on an abstract mesh: the arrays come back as saved
    abstract = T.restore_checkpoint(tmp_path, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(jax.random.key_data(abstract["key"]), jax.random.key_data(state["key"]))


def test_an_error_placing_the_arrays_is_raised_as_it_is_and_never_skipped(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    saved_steps(tmp_path, [1, 2])

    def refuse(self, directory, *args, **kwargs):  # as a sharding the arrays cannot be placed on
        jax.sharding.NamedSharding(jax.make_mesh((1,), ("data",)), jax.sharding.PartitionSpec("model"))

    monkeypatch.setattr(ocp.Checkpointer, "restore", refuse)
    with pytest.raises(ValueError, match="Resource axis: model of P\\('model',\\) is not found in mesh") as raised:
        T.restore_checkpoint(tmp_path, {"w": jnp.zeros(3), "noise": jnp.zeros((32, 32))}, skip_unreadable=True)
    assert not isinstance(raised.value, T.CorruptCheckpointError)
    assert raised.value.__notes__ == [f"while restoring the checkpoint of step 2 in {tmp_path / '2'}"]


def saved_steps(directory, steps):
    """Save a state at each step (``w`` = step, ``noise``: too large to be inlined in orbax's
    index); return the state of each step."""
    states = {s: {"w": jnp.full(3, float(s)), "noise": normal(s, (32, 32))} for s in steps}
    for s, state in states.items():
        T.save_checkpoint(directory, state, step=s, keep=None)
    return states


CORRUPTIONS = {
    "truncated-metadata": lambda step: (step / "default" / "_METADATA").write_text((step / "default" / "_METADATA").read_text()[:20]),
    "deleted-metadata": lambda step: (step / "default" / "_METADATA").unlink(),
    "deleted-index": lambda step: (step / "default" / "manifest.ocdbt").unlink(),
    "truncated-array-data": lambda step: [f.write_bytes(f.read_bytes()[:100]) for f in (step / "default" / "ocdbt.process_0" / "d").iterdir()],
    "truncated-record": lambda step: (step / "rnnjax_checkpoint.json").write_text('{"format": 1, "leav'),
    "record-without-a-field": lambda step: (step / "rnnjax_checkpoint.json").write_text('{"leaves": [{"path": "w"}]}'),
    "deleted-item": lambda step: shutil.rmtree(step / "default"),
}
REASONS = {
    "truncated-metadata": r"orbax's metadata in .*default cannot be read \(JSONDecodeError",
    "deleted-metadata": r"orbax's metadata file .*default/_METADATA is missing",
    "deleted-index": r"orbax's metadata in .*default cannot be read \(ValueError: NOT_FOUND",
    "truncated-array-data": r"reading its arrays failed \(Exception: Encountered error while reading array index",
    "truncated-record": r"its record rnnjax_checkpoint.json cannot be read \(JSONDecodeError",
    "record-without-a-field": r"its record rnnjax_checkpoint.json is malformed: leaf 0 \(w\) has no list 'shape'",
    "deleted-item": r"orbax's metadata file .*default/_METADATA is missing",
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_an_unreadable_latest_checkpoint_names_itself_the_other_steps_and_the_way_on(tmp_path, corruption):
    states = saved_steps(tmp_path, [1, 2, 3])
    CORRUPTIONS[corruption](tmp_path / "3")
    like = states[1]
    where = re.escape(f"checkpoint of step 3 in {tmp_path / '3'} cannot be read: ")
    hint = re.escape(f"; other steps in {tmp_path}: [1, 2]; restore one with restore_checkpoint(..., step=2), "
                     "or pass skip_unreadable=True to restore the newest readable step")
    with pytest.raises(T.CorruptCheckpointError, match=where + REASONS[corruption] + ".*" + hint):
        T.restore_checkpoint(tmp_path, like)
    leaves_equal(T.restore_checkpoint(tmp_path, like, step=2), states[2])
    with pytest.warns(UserWarning, match=re.escape(f"skipped the checkpoint of step 3 in {tmp_path / '3'}") + ".*restoring step 2"):
        leaves_equal(T.restore_checkpoint(tmp_path, like, skip_unreadable=True), states[2])


def test_skip_unreadable_gives_up_with_an_error_when_no_step_is_readable_and_not_on_a_mismatch(tmp_path):
    states = saved_steps(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=r"does not match the model: w has shape \(3,\) in the checkpoint, \(4,\) in the model"):
        T.restore_checkpoint(tmp_path, {**states[1], "w": jnp.zeros(4)}, skip_unreadable=True)
    with pytest.raises(ValueError, match="pass it or step=, not both"):
        T.restore_checkpoint(tmp_path, states[1], step=1, skip_unreadable=True)
    for step in (1, 2):
        (tmp_path / str(step) / "default" / "_METADATA").unlink()
    with pytest.warns(UserWarning, match="skipped the checkpoint of step 2"):
        with pytest.raises(T.CorruptCheckpointError, match=r"no checkpoint in .* can be read \(steps \[1, 2\]\); step 1: orbax's"):
            T.restore_checkpoint(tmp_path, states[1], skip_unreadable=True)
    with pytest.raises(T.CorruptCheckpointError, match=r"step 2 in .* cannot be read: .*; other steps in .*: \[1\]"):
        T.restore_checkpoint(tmp_path, states[1])


NOISY_RESTORES = """
import gc, pathlib, shutil, sys
import jax.numpy as jnp
import numpy as np
import rnnjax as rj

directory = pathlib.Path(sys.argv[1])
# many arrays: many reads in flight when one fails; orbax reads jax and numpy arrays apart
arrays = [np.random.default_rng(i).normal(size=(16, 16)).astype(np.float32) for i in range(200)]
state = {f"w{i}": jnp.asarray(a) if i % 2 else a for i, a in enumerate(arrays)}
rj.train.save_checkpoint(directory, state, step=1)
for step in (2, 3):
    shutil.copytree(directory / "1", directory / str(step))
(directory / "2" / "default" / "manifest.ocdbt").unlink()
for data in (directory / "3" / "default" / "ocdbt.process_0" / "d").iterdir():
    data.write_bytes(data.read_bytes()[:100])
for step in (3, 2) * 4:
    try:
        rj.train.restore_checkpoint(directory, state, step=step)
    except rj.train.CorruptCheckpointError as e:
        print("raised:", str(e)[:25])
gc.collect()
"""


@pytest.mark.slow  # a subprocess with its own JAX start: make test-all
def test_a_failed_restore_prints_no_tracebacks_of_the_reads_orbax_abandoned():
    """Each failing restore used to print up to hundreds of tracebacks ("Event loop is
    closed", "Exception ignored in: <coroutine object _read_array_index_and_device_put>",
    "Task exception was never retrieved") from orbax's other reads, ending after it had raised;
    in a fresh process, as a user sees them."""
    with tempfile.TemporaryDirectory() as directory:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
        proc = subprocess.run([sys.executable, "-c", NOISY_RESTORES, directory], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("raised: checkpoint of step") == 8, proc.stdout
    assert proc.stderr == "", proc.stderr[-3000:]


def test_only_the_reports_of_abandoned_reads_are_silenced(tmp_path, monkeypatch, caplog):
    """A callback to a closed event loop from tensorstore's thread is dropped; the same error
    raised elsewhere, and asyncio's reports of other tasks, are handed on."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    T.save_checkpoint(tmp_path, {"w": jnp.ones(2)}, step=1)  # the first use of orbax installs the filters
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)  # as tensorstore's thread calls it (from C: no caller frame)
    except RuntimeError as e:
        closed = e
    try:
        raise RuntimeError("Event loop is closed")  # same text, other origin: reported
    except RuntimeError as e:
        other = e
    for error, traceback in ((closed, closed.__traceback__.tb_next), (other, other.__traceback__)):
        sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=error, exc_traceback=traceback,
                                                 err_msg=None, object=None))
    assert seen == [other]
    with caplog.at_level("ERROR", logger="asyncio"):
        logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=(RuntimeError, other, other.__traceback__))
    assert [r.exc_info[1] for r in caplog.records] == [other]


def one_character_edits(text):
    """``text`` with each character in turn replaced: a digit by the next, a letter by the next
    lower-case letter, anything else by ``x``."""
    for i, c in enumerate(text):
        if c.isdigit():
            new = str((int(c) + 1) % 10)
        elif c.isalpha():
            new = chr((ord(c.lower()) - ord("a") + 1) % 26 + ord("a"))
        else:
            new = "x"
        yield i, text[:i] + new + text[i + 1 :]


def test_every_one_character_edit_of_the_record_is_reported_as_corruption(tmp_path):
    state = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16), "key": jax.random.key(1)}
    T.save_checkpoint(tmp_path, state, step=3)
    record = tmp_path / "3" / "rnnjax_checkpoint.json"
    text = record.read_text()
    missed = []
    for i, edited in one_character_edits(text):
        record.write_text(edited)
        try:
            T.restore_checkpoint(tmp_path, state)
            missed.append((i, edited[max(0, i - 12) : i + 12], "restored"))
        except T.CorruptCheckpointError as e:
            assert f"checkpoint of step 3 in {tmp_path / '3'} cannot be read: its record" in str(e)
        except Exception as e:  # noqa: BLE001 - a model mismatch, or anything else, is the wrong report
            missed.append((i, edited[max(0, i - 12) : i + 12], f"{type(e).__name__}: {e}"))
    assert not missed, f"{len(missed)} of {len(text)} edits not reported as corruption, e.g. {missed[:3]}"
    record.write_text(text)
    restored = T.restore_checkpoint(tmp_path, state)
    leaves_equal(restored["w"], state["w"])


def test_a_record_of_format_1_is_read_and_its_inconsistent_edits_are_reported_as_corruption(tmp_path):
    """Records written before format 2 carry no checksum: they are checked for consistency."""
    state = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
    T.save_checkpoint(tmp_path, state, step=3)
    record = tmp_path / "3" / "rnnjax_checkpoint.json"
    content = json.loads(record.read_text())
    content.pop("checksum", None)
    text = json.dumps({**content, "format": 1})
    record.write_text(text)
    leaves_equal(T.restore_checkpoint(tmp_path, state), state)
    edits = {
        '"shape": [2, 3]': ('"shape": [2, 4]', r"leaf 1 \(w\) has shape \[2, 4\] but is stored with shape \[2, 3\]"),
        '"dtype": "bfloat16"': ('"dtype": "float16"', r"leaf 0 \(b\) has dtype float16 but is stored as bfloat16"),
        '"step": 3': ('"step": 4', "its record rnnjax_checkpoint.json is of step 4"),
        '"format": 1': ('"format": 2', "has format 2 but no checksum"),
    }
    for old, (new, reason) in edits.items():
        assert text.count(old) == 1
        record.write_text(text.replace(old, new))
        with pytest.raises(T.CorruptCheckpointError, match=reason):
            T.restore_checkpoint(tmp_path, state)


def test_a_symlinked_lock_file_is_refused_not_followed(tmp_path):
    directory, target = tmp_path / "run", tmp_path / "precious"
    directory.mkdir()
    target.write_text("keep me")
    lock = directory / ".rnnjax.lock"
    lock.symlink_to(target)
    with pytest.raises(ValueError, match=re.escape(f"{lock} is a symbolic link")):
        T.save_checkpoint(directory, {"w": jnp.ones(3)}, step=1)
    assert target.read_text() == "keep me" and os.listdir(directory) == [".rnnjax.lock"]
    lock.unlink()
    lock.symlink_to(tmp_path / "absent")  # a dangling link: following it would create the file
    with pytest.raises(ValueError, match=re.escape(f"{lock} is a symbolic link")):
        T.save_checkpoint(directory, {"w": jnp.ones(3)}, step=1)
    assert not os.path.lexists(tmp_path / "absent") and T.checkpoint_steps(directory) == []
