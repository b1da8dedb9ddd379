"""Demonstration: training a nonlinear RNN in parallel over time. ``rj.ParaGRU`` learns the
adding problem (Hochreiter & Schmidhuber 1997) with its recurrence evaluated by Newton's
method (a fixed 3 exact "deer" iterations from one parallel cell step, as ParaRNN trains)
and, from the same initial parameters on the same batches, by the sequential scan.

    python examples/adding_problem.py                     # T=1000, 400 steps: about 2 minutes on 2 cores
    python examples/adding_problem.py --reference float64 # the yardstick behind TOLERANCE: 2.5 minutes
    python examples/adding_problem.py --length 4096 --batch 64 --steps 300   # a GPU (gpu_parallel.sh)

On the default run the loss leaves the baseline's plateau after about 300 steps and ends near
0.02 (the chrono initialisation below is what makes T=1000 learnable that fast: with ParaGRU's
default bias it stayed at the baseline for 600 steps at these settings, 1000 with H=64 and
Adam 3e-3).

Each input sequence is ``(T, 2)``: a channel of values uniform in ``[0, 1)`` and a marker
channel that is 1 at exactly two steps, one in each half of the sequence. The target is the
sum of the two marked values, predicted by a linear readout of the last output; always
predicting 1.0 scores the variance of that sum, ``2/12 ~ 0.167``, so a loss below that baseline
means the model carries the marked values across up to ``T`` steps.

It prints both loss curves side by side and their largest relative difference, which must
stay within :data:`TOLERANCE`, and beside it a yardstick for float32 rounding amplified by
training (``--reference``): a third, sequential run from initial parameters perturbed by one
part in 2^24 (``perturbed``, the default), or the sequential run in float64 (``float64``, slower).
Why 3 iterations: ``python benchmarks/newton_training.py --parts check`` measures how many
fixed iterations from ``init="step"`` bring ParaGRU's outputs to float32 rounding (3 at T=4096).
"""

from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj

BASELINE = 2.0 / 12.0  # MSE of always predicting 1.0: the variance of a sum of two U(0, 1)
NEWTON_ITERS = 3  # exact Newton steps from init="step": float32 rounding for ParaGRU (see the docstring)
# Largest relative difference allowed between the Newton and the sequential loss curves, at any
# step: 4x how far float32 training itself is from float64 over the default run (the sequential
# float32 and float64 curves differ by up to 2.5e-4; Newton vs sequential: 1.8e-5), measured by
# `python examples/adding_problem.py --reference float64`, see benchmarks/experiments/DECISIONS.md.
# A Newton solve stopped short of float32 rounding (1 iteration) exceeds it (tests/test_adding_problem.py).
TOLERANCE = 1e-3
REFERENCES = ("perturbed", "float64", "none")


def adding_batch(seed: int, step: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(xs (batch, length, 2) float32, targets (batch,) float32)``, a function of
    ``(seed, step)`` only: every run sees the same batches."""
    if length < 2:
        raise ValueError(f"length is {length}; the adding problem needs length >= 2 (one marker per half)")
    rng = np.random.default_rng((seed, step))
    values = rng.uniform(size=(batch, length)).astype(np.float32)
    half = length // 2
    first = rng.integers(0, half, batch)
    second = rng.integers(half, length, batch)
    markers = np.zeros((batch, length), np.float32)
    rows = np.arange(batch)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = values[rows, first] + values[rows, second]
    return np.stack([values, markers], axis=-1), targets


def make_batches(seed: int, batch: int, length: int):
    """``i -> (xs, targets)`` as device arrays: batch ``i`` of :func:`adding_batch`."""
    return lambda i: tuple(map(jnp.asarray, adding_batch(seed, i, batch, length)))


def chrono_bias(max_timescale: float):
    """A ``bias_init`` for ``rj.ParaGRU`` (shape ``(3, hidden)``, rows ``z, r, h``): ``b_z =
    -log(U(1, max_timescale))``, zeros elsewhere (chrono initialisation, Tallec & Ollivier
    2018). ParaGRU's ``z`` weights the *new* candidate, so ``z ~ 1/tau`` keeps a unit's state
    for about ``tau`` steps: from the start, some units remember across the whole sequence."""

    def init(key, shape, dtype=jnp.float32):
        tau = jax.random.uniform(key, shape[1:], jnp.float32, 1.0, max_timescale)
        return jnp.zeros(shape, dtype).at[0].set(-jnp.log(tau).astype(dtype))

    return init


def model_cell(hidden: int, length: int) -> rj.ParaGRU:
    return rj.ParaGRU(hidden, bias_init=chrono_bias(length))


def init_params(key: jax.Array, hidden: int, length: int) -> dict:
    k_rnn, k_out = jax.random.split(key)
    return {
        "rnn": model_cell(hidden, length).init(k_rnn, input_size=2),
        "w": jax.random.normal(k_out, (hidden,)) / math.sqrt(hidden),
        "b": jnp.zeros(()),
    }


def make_step(method: rj.methods.Method, hidden: int, length: int, learning_rate: float):
    """``(step, optimizer)``: a jitted Adam step on the MSE of the last output's readout."""
    layer = rj.RNN(model_cell(hidden, length), method=method)

    def loss_fn(params, batch):
        xs, targets = batch
        ys, _ = layer.apply(params["rnn"], xs)
        preds = rj.train.last_step(ys) @ params["w"] + params["b"]
        return jnp.mean(jnp.square(preds - targets))

    optimizer = optax.adam(learning_rate)
    return rj.train.make_train_step(loss_fn, optimizer, clip_norm=1.0), optimizer


def train(step, optimizer, params, batches, steps: int) -> tuple[list[float], float]:
    """``(loss at every step, seconds per step)``; the first step (compilation) is not timed."""
    state = rj.train.TrainState.create(params, optimizer)  # copies: params stay usable
    state, first = rj.train.fit(step, state, batches, steps=1, progress=False)
    start = time.perf_counter()
    state, rest = rj.train.fit(step, state, batches, steps=steps - 1, progress=False, log_every=50)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / max(steps - 1, 1)
    return first["loss"] + rest["loss"], seconds


def relative_difference(a: list[float], b: list[float]) -> float:
    """``max_i |a_i - b_i| / |b_i|``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def perturbed(params: dict, seed: int) -> dict:
    """``params`` with every entry scaled by ``1 + e``, ``|e| <= 2^-24``: float32 rounding."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    scale = lambda k, x: x * (1.0 + 2.0**-24 * jax.random.uniform(k, x.shape, x.dtype, -1.0, 1.0))
    return jax.tree.unflatten(treedef, [scale(k, x) for k, x in zip(keys, leaves)])


def main(
    steps: int = 400,
    length: int = 1000,
    hidden: int = 32,
    batch: int = 32,
    learning_rate: float = 1e-2,
    seed: int = 0,
    newton_iters: int = NEWTON_ITERS,
    reference: str = "perturbed",
) -> dict:
    """Train twice (Newton with ``newton_iters`` fixed iterations, sequential) from the same
    parameters on the same batches, and a third ``reference`` run (one of :data:`REFERENCES`):
    sequential from parameters perturbed by float32 rounding, or sequential in float64.

    Returns a dict: ``newton`` and ``sequential`` (loss per step), ``reference`` (the third
    run's, or None), ``max_relative_difference`` (Newton vs sequential),
    ``reference_difference`` (sequential vs the reference run, or None), ``seconds_per_step``
    ({"newton", "sequential"}), ``final_loss`` (mean over the last tenth of the steps, each
    method) and ``baseline``.

    Raises:
      ValueError: ``steps < 2`` or an unknown ``reference``.
    """
    if steps < 2:
        raise ValueError(f"steps is {steps}; expected at least 2 (the first one compiles)")
    if reference not in REFERENCES:
        raise ValueError(f"reference is {reference!r}; expected one of {list(REFERENCES)}")
    print(
        f"adding problem: T={length}, batch {batch}, ParaGRU({hidden}), Adam {learning_rate}, {steps} steps "
        f"on {jax.devices()[0].device_kind}; baseline (always 1.0) MSE {BASELINE:.3f}"
    )
    params = init_params(jax.random.key(seed), hidden, length)
    batches = make_batches(seed, batch, length)
    methods = {
        "newton": rj.Newton("deer", tol=None, max_iters=newton_iters, init="step"),
        "sequential": rj.Sequential(),
    }
    curves, seconds, steps_fns = {}, {}, {}
    for name, method in methods.items():
        steps_fns[name] = make_step(method, hidden, length, learning_rate)
        curves[name], seconds[name] = train(*steps_fns[name], params, batches, steps)
        print(f"  {name:10s}: {1e3 * seconds[name]:8.1f} ms per step", flush=True)
    other = None
    if reference == "perturbed":  # the same compiled sequential step, from parameters one rounding away
        other, _ = train(*steps_fns["sequential"], perturbed(params, seed + 1), batches, steps)
    elif reference == "float64":
        with jax.enable_x64(True):
            wide = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
            step, optimizer = make_step(methods["sequential"], hidden, length, learning_rate)
            other, _ = train(step, optimizer, wide(params), lambda i: wide(batches(i)), steps)

    tail = max(1, steps // 10)
    final = {name: float(np.mean(curve[-tail:])) for name, curve in curves.items()}
    print_curves(curves, other, reference)
    difference = relative_difference(curves["newton"], curves["sequential"])
    reference_difference = None if other is None else relative_difference(curves["sequential"], other)
    print(
        f"\nmax relative difference of the loss curves, Newton vs sequential: {difference:.2e} "
        f"(tolerance {TOLERANCE:.0e})"
    )
    if reference_difference is not None:
        what = {"perturbed": "initial parameters one float32 rounding apart", "float64": "float32 vs float64"}
        print(f"  sequential vs sequential, {what[reference]}: {reference_difference:.2e}")
    print(
        f"seconds per step: Newton {seconds['newton']:.4f}, sequential {seconds['sequential']:.4f} "
        f"(sequential / Newton = {seconds['sequential'] / seconds['newton']:.2f}x)"
    )
    for name, loss in final.items():
        verdict = "below" if loss < BASELINE else "not below"
        print(f"final loss ({name}, mean of the last {tail} steps): {loss:.4f}, {verdict} the baseline {BASELINE:.3f}")
    return {
        "newton": curves["newton"],
        "sequential": curves["sequential"],
        "reference": other,
        "max_relative_difference": difference,
        "reference_difference": reference_difference,
        "seconds_per_step": seconds,
        "final_loss": final,
        "baseline": BASELINE,
    }


def print_curves(curves: dict, other: list[float] | None, reference: str, rows: int = 15) -> None:
    """The curves side by side at ``rows`` points, each the mean over the steps since the last."""
    steps = len(curves["newton"])
    edges = np.unique(np.linspace(0, steps, rows + 1).astype(int))
    header = f"\n{'steps':>13s} {'newton':>10s} {'sequential':>10s} {'rel. diff':>10s}"
    print(header + (f" {'sequential, ' + reference:>22s}" if other is not None else ""))
    for lo, hi in zip(edges[:-1], edges[1:]):
        n, s = (float(np.mean(curves[k][lo:hi])) for k in ("newton", "sequential"))
        line = f"{lo:6d}-{hi - 1:<6d} {n:10.4f} {s:10.4f} {abs(n - s) / s:10.1e}"
        print(line + (f" {float(np.mean(other[lo:hi])):22.4f}" if other is not None else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--length", type=int, default=1000, help="T")
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--newton-iters", type=int, default=NEWTON_ITERS)
    parser.add_argument(
        "--reference",
        choices=REFERENCES,
        default="perturbed",
        help="the third run, a yardstick for float32 rounding amplified by training",
    )
    args = parser.parse_args()
    result = main(
        steps=args.steps,
        length=args.length,
        hidden=args.hidden,
        batch=args.batch,
        learning_rate=args.learning_rate,
        seed=args.seed,
        newton_iters=args.newton_iters,
        reference=args.reference,
    )
    if result["max_relative_difference"] > TOLERANCE:
        raise SystemExit(
            f"the Newton and sequential curves differ by {result['max_relative_difference']:.2e} > {TOLERANCE:.0e}"
        )
