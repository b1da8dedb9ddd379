"""Newton's method as a training-time evaluator (ParaRNN's recipe): a fixed, small number of
exact-Newton ("deer") iterations from one parallel cell step, on cells with an exact
structured Jacobian (``rj.ParaGRU``, ``rj.ParaLSTM``, ``rj.IndRNN``).

Two parts (``--parts``, default both):

- ``check``: for each cell on random inputs (default T=4096, B=4, H=64, D=16), from
  ``init="step"``, the outputs after a fixed count of ``k = 1 .. --max-k`` iterations
  (``rj.parallel.newton_scan(..., newton="deer", tol=None, max_iters=k, init="step")``):
  the residual :math:`\\max|s_t - f(s_{t-1}, x_t)|`, ``max|ys - sequential|`` (float32), and
  ``max|ys - float64 sequential|`` beside the float32 sequential's own distance to float64
  (the rounding floor). ``k`` is *at float32 rounding* once its distance to float64 is no
  more than 2x the floor; the issue's target is k <= 4. Beside it, the iterations the
  converging mode (``tol="auto"``, up to 500) takes, for cells that need more than ``--max-k``.
- ``timing``: ``rj.ParaGRU`` forward and forward+backward (gradient of ``sum(ys^2)`` with
  respect to the parameters), ``rj.Newton("deer", tol=None, max_iters=--iters, init="step")``
  against ``rj.Sequential()`` at T in ``--T`` (default 1024, 4096, 16384; B=16, H=256): jit
  ahead, one warm-up, medians of interleaved calls. The issue's GPU target: Newton >= 10x
  sequential at T >= 4096 (fwd+bwd). On a 2-core CPU the numbers are information only.

    python -m benchmarks.lab.newton_training --tiny                      # seconds: checks that it runs
    python -m benchmarks.lab.newton_training --parts check --out benchmarks/results/cpu-newton-check-20261130
    python -m benchmarks.lab.newton_training --parts timing --T 1024,4096 --batch 4 --hidden 64
    python -m benchmarks.lab.newton_training --out bench-results/gpu-newton-training   # a GPU

Writes ``--out``.json and .md (the device, library versions and command line included);
without ``--out`` it only prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj

if not __package__:  # run as a file (python benchmarks/lab/<name>.py): `benchmarks` is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import timing  # noqa: E402

CELLS = {
    "paragru": rj.ParaGRU,
    "paralstm": rj.ParaLSTM,
    "indrnn": rj.IndRNN,  # relu, the cell's default
    "indrnn-tanh": lambda h: rj.IndRNN(h, activation="tanh"),
    # Shorter memory (u in [0, 0.5) instead of [0, 1)): how the iteration count depends on it.
    "indrnn-u0.5": lambda h: rj.IndRNN(h, recurrent_init=jax.nn.initializers.uniform(0.5)),
    "indrnn-tanh-u0.5": lambda h: rj.IndRNN(h, activation="tanh", recurrent_init=jax.nn.initializers.uniform(0.5)),
}
TINY = dict(check_T=64, check_batch=2, check_hidden=8, check_input=4, T="64,128", batch=2, hidden=8, repeats=1, max_k=3)
ROUNDING_FACTOR = 2.0  # "at float32 rounding": within this factor of the float32 sequential's own error


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="check,timing")
    p.add_argument("--cells", default=",".join(CELLS), help="cells of the check part")
    p.add_argument("--check-T", type=int, default=4096)
    p.add_argument("--check-batch", type=int, default=4)
    p.add_argument("--check-hidden", type=int, default=64)
    p.add_argument("--check-input", type=int, default=16)
    p.add_argument("--max-k", type=int, default=6, help="iteration counts 1 .. max-k")
    p.add_argument("--T", default="1024,4096,16384", help="sequence lengths of the timing part")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--input", type=int, default=None, help="input features of the timing part (default: hidden)")
    p.add_argument("--iters", type=int, default=3, help="Newton iterations of the timing part")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="T=64,128, B=2, H=8 unless given: seconds, numbers meaningless")
    p.add_argument("--out", type=Path, default=None, help="path without extension (.json, .md)")
    args = p.parse_args(argv)
    if args.tiny:  # fills the options the command line left at their defaults
        for key, value in TINY.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


# ---- check: iterations to float32 rounding ----


def check_cell(name, args):
    """Rows for k = 1 .. max_k: residual and errors of ``k`` fixed deer iterations."""
    cell = CELLS[name](args.check_hidden)
    kp, kx = jax.random.split(jax.random.key(0))
    params = cell.init(kp, args.check_input)
    xs = jax.random.normal(kx, (args.check_batch, args.check_T, args.check_input), jnp.float32)
    sequential = jax.jit(lambda p, x: rj.scan(cell, p, x)[0])
    ys_seq = np.asarray(sequential(params, xs), np.float64)
    with jax.enable_x64(True):  # the float64 reference: same parameters and inputs, widened
        wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (params, xs))
        ys_64 = np.asarray(jax.jit(lambda p, x: rj.scan(cell, p, x)[0])(*wide))
    floor = float(np.max(np.abs(ys_seq - ys_64)))
    rows = []
    for k in range(1, args.max_k + 1):
        ys, _, info = jax.jit(
            lambda p, x, k=k: rj.parallel.newton_scan(cell, p, x, newton="deer", tol=None, max_iters=k, init="step")
        )(params, xs)
        ys = np.asarray(ys, np.float64)
        err64 = float(np.max(np.abs(ys - ys_64)))
        rows.append(
            dict(
                cell=name,
                T=args.check_T,
                batch=args.check_batch,
                hidden=args.check_hidden,
                input=args.check_input,
                k=k,
                residual=float(info.residual),
                max_abs_vs_sequential=float(np.max(np.abs(ys - ys_seq))),
                max_abs_vs_float64=err64,
                float32_floor=floor,
                at_rounding=err64 <= ROUNDING_FACTOR * floor,
            )
        )
        print(
            f"{name:12s} k={k}  residual {rows[-1]['residual']:.2e}  |ys - seq| "
            f"{rows[-1]['max_abs_vs_sequential']:.2e}  |ys - f64| {err64:.2e}  (float32 floor {floor:.2e})",
            flush=True,
        )
    _, _, info = jax.jit(
        lambda p, x: rj.parallel.newton_scan(cell, p, x, newton="deer", tol="auto", max_iters=500, init="step")
    )(params, xs)
    for row in rows:
        row["converging_iterations"] = int(info.iterations) if bool(info.converged) else None
    return rows


# ---- timing: Newton vs sequential, ParaGRU ----


def timing_point(steps, args):
    """Rows for each mode at one T: Newton and sequential compiled, then timed interleaved."""
    cell = rj.ParaGRU(args.hidden)
    d = args.input or args.hidden
    kp, kx = jax.random.split(jax.random.key(0))
    params = cell.init(kp, d)
    xs = jax.random.normal(kx, (args.batch, steps, d), jnp.float32)
    methods = {
        f"newton(deer, {args.iters} it, init=step)": rj.Newton("deer", tol=None, max_iters=args.iters, init="step"),
        "sequential": rj.Sequential(),
    }
    rows = []
    for mode in args.modes.split(","):
        programs = {}
        for label, method in methods.items():

            def forward(p, x, method=method):
                return rj.scan(cell, p, x, method=method)[0]

            fn = forward if mode == "fwd" else jax.grad(lambda p, x, f=forward: jnp.sum(jnp.square(f(p, x))))
            programs[label] = timing.compile_ahead(fn, params, xs)
        results = timing.compare(programs, rounds=args.repeats)
        newton_label = next(iter(methods))
        row = dict(T=steps, batch=args.batch, hidden=args.hidden, input=d, mode=mode, iters=args.iters)
        for label, r in results.items():
            row[label] = dict(median_s=r.median_s, times_s=r.times_s, compile_s=r.compile_s)
        row["speedup"] = results["sequential"].median_s / results[newton_label].median_s
        rows.append(row)
        print(
            f"paragru T={steps:<6d} {mode:8s} newton {1e3 * results[newton_label].median_s:9.2f} ms  "
            f"sequential {1e3 * results['sequential'].median_s:9.2f} ms  speed-up {row['speedup']:.2f}x",
            flush=True,
        )
    return rows


# ---- output ----


def metadata(args):
    return dict(timing.environment(), options={k: str(v) for k, v in vars(args).items()})


def needed(rows):
    """{cell: the smallest k at float32 rounding, or None}."""
    out = {}
    for r in rows:
        if r["at_rounding"] and out.get(r["cell"]) is None:
            out[r["cell"]] = r["k"]
        out.setdefault(r["cell"], None)
    return out


def converging(rows):
    """{cell: iterations of the converging mode (tol="auto"), or None if it fell back}."""
    return {r["cell"]: r["converging_iterations"] for r in rows}


def markdown(meta, check_rows, timing_rows):
    lines = [
        "# Newton (exact deer, fixed iterations, init='step') for training",
        "",
        f"- device: {meta['device_kind']} ({meta['backend']}, {meta['device_count']} device(s)), "
        f"{meta['cpu_count']} CPUs; jax {meta['jax']}, jaxlib {meta['jaxlib']}, rnnjax {meta['rnnjax']}, "
        f"numpy {meta['numpy']}, python {meta['python']}; XLA_FLAGS={meta['xla_flags']!r}",
        f"- {meta['date']}: `{meta['command']}`",
        "",
    ]
    if check_rows:
        r0 = check_rows[0]
        lines += [
            f"## Iterations to float32 rounding (T={r0['T']}, B={r0['batch']}, H={r0['hidden']}, D={r0['input']})",
            "",
            "residual = max |s_t - f(s_{t-1}, x_t)|; errors are max |ys - reference|; floor = max |float32 "
            f"sequential - float64 sequential|; at rounding: |ys - float64| <= {ROUNDING_FACTOR:g} x floor.",
            "",
            "| cell | k | residual | vs float32 sequential | vs float64 sequential | floor | at rounding |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in check_rows:
            lines.append(
                f"| {r['cell']} | {r['k']} | {r['residual']:.2e} | {r['max_abs_vs_sequential']:.2e} "
                f"| {r['max_abs_vs_float64']:.2e} | {r['float32_floor']:.2e} | {'yes' if r['at_rounding'] else 'no'} |"
            )
        counts = converging(check_rows)
        lines += [
            "",
            "Iterations needed (target <= 4): "
            + ", ".join(
                f"{cell} {k if k is not None else '> ' + str(check_rows[-1]['k'])}"
                for cell, k in needed(check_rows).items()
            ),
            "",
            "Iterations of the converging mode (tol='auto', residual <= 1e-5): "
            + ", ".join(f"{cell} {k if k is not None else 'did not converge in 500'}" for cell, k in counts.items()),
            "",
        ]
    if timing_rows:
        labels = [k for k in timing_rows[0] if isinstance(timing_rows[0][k], dict)]
        lines += [
            f"## ParaGRU: Newton vs sequential (B={timing_rows[0]['batch']}, H={timing_rows[0]['hidden']}, "
            f"D={timing_rows[0]['input']}), ms (compile s)",
            "",
            "| T | mode | " + " | ".join(labels) + " | speed-up |",
            "|---:|---|" + "---:|" * (len(labels) + 1),
        ]
        for r in timing_rows:
            cells = [f"{1e3 * r[label]['median_s']:.2f} ({r[label]['compile_s']:.1f})" for label in labels]
            lines.append(f"| {r['T']} | {r['mode']} | " + " | ".join(cells) + f" | {r['speedup']:.2f}x |")
        lines += ["", "Target (GPU, fwd+bwd): speed-up >= 10x at T >= 4096.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    meta = metadata(args)
    print(f"device: {meta['device_kind']} ({meta['backend']}); jax {meta['jax']}", flush=True)
    parts = args.parts.split(",")
    check_rows, timing_rows = [], []

    def save():
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            data = dict(meta=meta, check=check_rows, timing=timing_rows, needed=needed(check_rows))
            args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))

    if "check" in parts:
        for name in args.cells.split(","):
            check_rows += check_cell(name, args)
            save()
    if "timing" in parts:
        for steps in (int(t) for t in args.T.split(",")):
            timing_rows += timing_point(steps, args)
            save()
    text = markdown(meta, check_rows, timing_rows)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(text)
        print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return dict(check=check_rows, timing=timing_rows, needed=needed(check_rows))


if __name__ == "__main__":
    main()
