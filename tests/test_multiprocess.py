"""rnnjax.distributed across processes: two processes on this machine, joined by
``jax.distributed.initialize`` (loopback coordinator, JAX's gloo CPU collectives), train one
model data-parallel over a mesh of both processes' devices, save and restore a checkpoint
together, and match one process's training (tests/multiprocess_worker.py is one process)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import rnnjax as rj
from tests.once import once_per_session

# Two fresh JAX processes (about 30 s): make test-all runs them, once per session
# (tests/once.py), whichever xdist workers run these tests.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

WORKER = Path(__file__).with_name("multiprocess_worker.py")
PROCESSES = 2
TIMEOUT_S = 180  # about 20 s when the machine is idle; a hang (a peer waiting forever) fails here
# The data-parallel step sums the gradient as two partial sums joined by an all-reduce; the
# reference sums it in one: float32 rounding (eps 1.2e-7) in another order, carried through
# four Adam steps. The same bound as tests/multidevice_checks.py; a lost or doubled row of
# the global batch changes the loss in its first digits.
F32 = dict(rtol=2e-5, atol=2e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(tmp: Path) -> list[str]:
    """Start the processes, wait for all of them (at most TIMEOUT_S), return their logs."""
    # One CPU device per process, whatever the caller's XLA_FLAGS or accelerators.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    coordinator = f"127.0.0.1:{free_port()}"
    logs = [tmp / f"process_{pid}.log" for pid in range(PROCESSES)]
    procs = []
    for pid, log in enumerate(logs):
        command = [sys.executable, str(WORKER), "--coordinator", coordinator, "--process-id", str(pid),
                   "--num-processes", str(PROCESSES), "--checkpoint", str(tmp / "checkpoint"),
                   "--out", str(tmp / f"process_{pid}.npz")]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    failed = [f"process {pid}: exit {p.returncode}\n{text[-4000:]}"
              for pid, (p, text) in enumerate(zip(procs, texts)) if p.returncode != 0]
    assert not failed, f"workers failed or ran past {TIMEOUT_S} s (killed: exit -9):\n" + "\n".join(failed)
    return texts


def run_and_report(tmp: Path) -> None:
    for text in run_workers(tmp):
        print("\n" + next(line for line in text.splitlines() if line.startswith("process ")))


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    tmp = once_per_session(tmp_path_factory, "multiprocess", run_and_report)
    return tmp / "checkpoint", [dict(np.load(tmp / f"process_{pid}.npz")) for pid in range(PROCESSES)]


def leaves(result: dict, prefix: str) -> list[np.ndarray]:
    count = sum(1 for k in result if k.startswith(prefix) and k[len(prefix):].isdigit())
    return [result[f"{prefix}{i}"] for i in range(count)]


def test_both_processes_trained_over_one_mesh_and_saved_one_checkpoint(results):
    checkpoint, per_process = results
    for r in per_process:
        assert int(r["process_count"]) == PROCESSES
        assert r["mesh_owners"].tolist() == list(range(PROCESSES)), "the mesh must hold a device of every process"
    steps = {int(r["saved_step"]) for r in per_process}
    assert steps == {len(per_process[0]["losses"]) - 1}, steps
    assert rj.train.checkpoint_steps(checkpoint) == sorted(steps)


def test_two_process_training_equals_one_process(results):
    for pid, r in enumerate(results[1]):
        np.testing.assert_allclose(r["losses"], r["ref_losses"], err_msg=f"process {pid}: losses", **F32)
        for name in ("saved", "final"):
            for i, (a, b) in enumerate(zip(leaves(r, f"{name}_"), leaves(r, f"ref_{name}_"), strict=True)):
                np.testing.assert_allclose(a, b, err_msg=f"process {pid}: {name} state leaf {i}", **F32)


def test_restore_returns_what_was_saved_exactly(results):
    for pid, r in enumerate(results[1]):
        saved, restored = leaves(r, "saved_"), leaves(r, "restored_")
        assert len(saved) == len(restored) > 0
        for i, (a, b) in enumerate(zip(restored, saved)):
            np.testing.assert_array_equal(a, b, err_msg=f"process {pid}: restored state leaf {i}")


def test_processes_hold_one_replicated_state(results):
    # A replicated array has one value: every process's copy is the same, bit for bit.
    first, *others = results[1]
    for pid, r in enumerate(others, start=1):
        np.testing.assert_array_equal(r["losses"], first["losses"], err_msg=f"process {pid}: losses")
        for name in ("saved_", "final_"):
            for i, (a, b) in enumerate(zip(leaves(r, name), leaves(first, name), strict=True)):
                np.testing.assert_array_equal(a, b, err_msg=f"process {pid}: {name}{i}")
