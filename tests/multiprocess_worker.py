"""One process of the two-process training check run by tests/test_multiprocess.py.

    python tests/multiprocess_worker.py --coordinator 127.0.0.1:PORT --process-id I \
        --num-processes 2 --checkpoint DIR --out RESULT.npz

Each process has one CPU device; ``jax.distributed.initialize`` joins them (JAX's CPU
collectives between processes are gloo over TCP, the default of
``jax_cpu_collectives_implementation``). The global mesh holds both devices; each process
feeds its own rows of the global batch (``rj.distributed.shard_batch``) for ``STEPS``
steps of ``rj.train.make_train_step(..., mesh=mesh)``; the processes save a checkpoint
together, restore it, and take one more step from the restored state with the whole
global batch given by every process. Then each process, on its own device alone, repeats
the same training with the plain single-device step: the reference.
The result file holds both, for the test to compare; a one-line summary goes to stdout.
"""

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj

LAYER = rj.RNN(rj.LSTM(8))
OPT = optax.adam(1e-2)
GLOBAL_BATCH, T, D = 4, 7, 3
STEPS = 3  # steps before the checkpoint; one more follows the restore


def loss_fn(params, batch):
    ys, _ = LAYER.apply(params["rnn"], batch["x"], lengths=batch["lengths"])
    return rj.train.mean_squared_error(ys @ params["out"], batch["y"], batch["lengths"])


def init_params():
    return {"rnn": LAYER.init(jax.random.key(0), D), "out": 0.1 * jnp.ones((8, 2))}


def global_batch(step: int) -> dict[str, np.ndarray]:
    """The global batch of ``step`` as host arrays, the same in every process. Lengths
    differ per row, so the masked mean is over the global batch's real steps."""
    rng = np.random.default_rng(step)
    return {
        "x": rng.standard_normal((GLOBAL_BATCH, T, D), dtype=np.float32),
        "y": rng.standard_normal((GLOBAL_BATCH, T, 2), dtype=np.float32),
        "lengths": ((np.arange(GLOBAL_BATCH) * 3 + step) % (T + 1)).astype(np.int32),
    }


def local_rows(batch: dict, process: int, processes: int) -> dict:
    """This process's rows of a global batch: the ``process``-th of ``processes`` equal blocks."""
    n = GLOBAL_BATCH // processes
    return {k: v[process * n:(process + 1) * n] for k, v in batch.items()}


def host_leaves(tree) -> list[np.ndarray]:
    """Every leaf as a host array, read from this process's copy of a replicated array."""
    return [np.asarray(leaf.addressable_data(0)) if isinstance(leaf, jax.Array) else np.asarray(leaf)
            for leaf in jax.tree.leaves(tree)]


def reference() -> tuple[list[float], list, list]:
    """The same training on this process's one device with the plain step: losses of every
    step, the state after ``STEPS`` steps and after one more."""
    step = rj.train.make_train_step(loss_fn, OPT, donate=False)
    state = rj.train.TrainState.create(init_params(), OPT)
    losses = []
    for i in range(STEPS + 1):
        state, metrics = step(state, global_batch(i))
        losses.append(float(metrics["loss"]))
        if i == STEPS - 1:
            saved = host_leaves(state)
    return losses, saved, host_leaves(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pid, n = args.process_id, args.num_processes

    jax.distributed.initialize(args.coordinator, num_processes=n, process_id=pid, initialization_timeout=60)
    assert jax.process_count() == n and jax.process_index() == pid, (jax.process_count(), jax.process_index())
    assert len(jax.devices()) == n and len(jax.local_devices()) == 1, (jax.devices(), jax.local_devices())
    mesh = jax.make_mesh((n,), ("data",))
    owners = sorted(d.process_index for d in mesh.devices.flat)

    step = rj.train.make_train_step(loss_fn, OPT, mesh=mesh)
    state = rj.train.TrainState.create(init_params(), OPT)
    losses = []
    for i in range(STEPS):
        batch = rj.distributed.shard_batch(local_rows(global_batch(i), pid, n), mesh)
        assert batch["x"].shape == (GLOBAL_BATCH, T, D), batch["x"].shape
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    saved_path = rj.train.save_checkpoint(args.checkpoint, state)
    saved = host_leaves(state)
    like = jax.eval_shape(lambda: rj.train.TrainState.create(init_params(), OPT))
    restored = rj.train.restore_checkpoint(args.checkpoint, like)
    restored_leaves = host_leaves(restored)
    # The other way in: every process passes the whole global batch as host arrays.
    final, metrics = step(restored, global_batch(STEPS))
    losses.append(float(metrics["loss"]))
    final_leaves = host_leaves(final)

    ref_losses, ref_saved, ref_final = reference()
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(restored_leaves + final_leaves, ref_saved + ref_final))
    np.savez(
        args.out,
        process_count=jax.process_count(), mesh_owners=np.array(owners), saved_step=int(saved_path.name),
        losses=np.array(losses), ref_losses=np.array(ref_losses),
        **{f"saved_{i}": a for i, a in enumerate(saved)},
        **{f"restored_{i}": a for i, a in enumerate(restored_leaves)},
        **{f"final_{i}": a for i, a in enumerate(final_leaves)},
        **{f"ref_saved_{i}": a for i, a in enumerate(ref_saved)},
        **{f"ref_final_{i}": a for i, a in enumerate(ref_final)},
    )
    print(f"process {pid}/{n}: mesh over devices of processes {owners}; losses "
          f"{' '.join(f'{x:.6f}' for x in losses)} (steps 1-{STEPS}, then step {STEPS + 1} after restoring "
          f"{saved_path}); reference {' '.join(f'{x:.6f}' for x in ref_losses)}; "
          f"max |state - reference| {diff:.2e}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
