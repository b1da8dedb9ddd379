"""Decision script: the cost of one quasi-DEER iteration on the dense cells (GRU, LSTM, Elman)
with the cell's structured unit-diagonal Jacobian (``DenseCell.step_with_jacobian``: ``L``
tangents per step, ``L`` the carry's leaves) against the diagonal of ``jax.jacfwd`` (``n``
tangents per step, ``n`` the flattened carry's size), in one process.

The ``jax.jacfwd`` path is the same cell with the capability hidden (``GRUByJacfwd`` & co.
below: ``jacobian_kind`` is ``None``, so ``rnnjax.engines.jacobians.structure_for`` picks
``jax.jacfwd``; the script checks that it does). For each cell, hidden size and T:

- cost per iteration = (time with ``rj.Newton("quasi-deer", tol=None, max_iters=k2)`` - time
  with ``max_iters=k1``) / (k2 - k1), forward only and forward+backward (gradient of
  ``sum(ys^2)`` with respect to the parameters; with ``tol=None`` the adjoint also runs
  ``max_iters`` iterations, and computes the diagonal once);
- the Jacobians alone: the engine's ``jacobian_fn`` over all ``T x B`` steps at random states,
  returning the Jacobians and the new states as the engine uses them (with the states dropped,
  XLA:CPU fused the structured LSTM's blocks into a 3x slower program: 8.3 against 3.2 ms, H=16);
- ``parts``: the rest of one iteration, the same for both paths: one evaluation of the step at
  all ``T x B`` positions (``values``; an iteration runs it once beside the Jacobians) and the
  elementwise scan that solves the linearised recurrence (``solve``; sequential or associative
  as ``rj.Newton(solve="auto")`` picks on this backend).

XLA hoists loop-invariant work out of the Newton loop (the input projection, and in the
``jax.jacfwd`` path the tangents of ``W_h`` products with the basis vectors), so the difference
of two iteration counts can understate the ``jax.jacfwd`` path's cost: the totals at both
counts are reported too.

All programs of one point are compiled ahead, then timed in interleaved rounds (medians), one
group per path, so that drift on a shared machine hits the two iteration counts of a path alike
and the ``jax.jacfwd`` programs' gigabytes of temporaries (freed back to the system after each
call, then faulted in again) do not slow the structured path's calls that follow them (seen:
structured LSTM H=64 ``max_iters=1`` at 235 ms after them, 46-88 ms alone). Writes
``--out``.json and .md (without ``--out`` it only prints).

    python -m benchmarks.lab.jacobian_cost                      # ~10 min on 2 cores
    python -m benchmarks.lab.jacobian_cost --tiny               # seconds: checks it runs
    python -m benchmarks.lab.jacobian_cost --cells gru --points 1024:16,4096:64
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
import rnnjax.cell
from rnnjax.carry import CarryLayout
from rnnjax.engines.affine import DIAG, solve_affine
from rnnjax.engines.jacobians import jacobian_fn, structure_for
from rnnjax.tuning import newton_solve

if not __package__:  # run as a file (python benchmarks/lab/<name>.py): `benchmarks` is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import timing  # noqa: E402


class _NoStructure:
    """Mixin hiding the structured Jacobian: the engine falls back to ``jax.jacfwd``."""

    @property
    def jacobian_kind(self):
        return None


@rnnjax.cell.frozen
class GRUByJacfwd(_NoStructure, rj.GRU):
    pass


@rnnjax.cell.frozen
class LSTMByJacfwd(_NoStructure, rj.LSTM):
    pass


@rnnjax.cell.frozen
class ElmanByJacfwd(_NoStructure, rj.Elman):
    pass


CELLS = {"gru": (rj.GRU, GRUByJacfwd), "lstm": (rj.LSTM, LSTMByJacfwd), "elman": (rj.Elman, ElmanByJacfwd)}
SOURCES = ("structured", "jacfwd")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default="gru,lstm,elman")
    # jax.jacfwd at H=64, T=4096 costs seconds per iteration (an LSTM's n = 128 tangents per
    # step): that point is left out by default, the cost per iteration is linear in T anyway.
    p.add_argument(
        "--points", default="1024:16,4096:16,1024:64", help="comma-separated T:hidden pairs (input size = hidden)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", default="1,4", help="k1,k2: the two fixed iteration counts")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--modes", default="fwd,fwd+bwd,jacobian,parts")
    p.add_argument("--tiny", action="store_true", help="H=8, T=64, B=2, 1 repeat (gru, lstm unless --cells)")
    p.add_argument("--out", type=Path, default=None, help="path without extension (.json, .md)")
    args = p.parse_args(argv)
    if args.tiny:
        if args.cells == p.get_default("cells"):
            args.cells = "gru,lstm"
        args.points, args.batch, args.repeats = "64:8", 2, 1
    return args


def flat_step(cell, layout):
    """The engine's step on flattened states, ``(params, s, x, reset, valid) -> (s, y)``."""

    def step(p, s, x, r, v):
        new, y = cell.step(p, layout.unflatten(jnp.where(r, jnp.zeros_like(s), s)), x)
        return jnp.where(v, layout.flatten(new), s), jnp.where(v, y, jnp.zeros((), y.dtype))

    return step


def jacobians_program(cell, steps, batch):
    """``f(params, S, X) -> (J, F, Y)``: the engine's quasi-DEER Jacobians at all ``T x B`` steps
    and the new states and outputs it computes with them."""
    layout = CarryLayout(cell.init_carry(()))
    structure = structure_for(cell, layout, "quasi-deer")
    one = jacobian_fn(cell, layout, structure, flat_step(cell, layout))
    r = jnp.zeros((steps, batch), bool)
    v = jnp.ones((steps, batch), bool)
    per_step = jax.vmap(jax.vmap(one, (None, 0, 0, 0, 0)), (None, 0, 0, 0, 0))
    return lambda p, s, x: per_step(p, s, x, r, v), structure, layout.n


def parts_programs(cell, steps, batch):
    """``{"values": f(params, S, X), "solve": g(J, u)}``: the step at all positions, and the
    diagonal affine scan of the linearised recurrence, as a Newton iteration runs them."""
    layout = CarryLayout(cell.init_carry(()))
    step = flat_step(cell, layout)
    r = jnp.zeros((steps, batch), bool)
    v = jnp.ones((steps, batch), bool)
    per_step = jax.vmap(jax.vmap(lambda *a: step(*a)[0], (None, 0, 0, 0, 0)), (None, 0, 0, 0, 0))
    h0 = jnp.zeros((batch, layout.n))
    return {
        "values": lambda p, s, x: per_step(p, s, x, r, v),
        # As rj.Newton(solve="auto") solves on this backend (sequential on CPU).
        "solve": lambda j, u: solve_affine(DIAG, (j, u), h0, steps if newton_solve() == "sequential" else None),
    }, layout.n


def newton_program(cell, iters, mode):
    method = rj.Newton("quasi-deer", tol=None, max_iters=iters)

    def forward(p, x):
        return rj.scan(cell, p, x, method=method)[0]

    if mode == "fwd":
        return forward
    return jax.grad(lambda p, x: jnp.sum(jnp.square(forward(p, x))))


def measure_point(name, hidden, steps, args):
    """One (cell, hidden, T): every program compiled, then timed in interleaved rounds."""
    k1, k2 = (int(k) for k in args.iters.split(","))
    modes = args.modes.split(",")
    cls, by_jacfwd = CELLS[name]
    cells = dict(zip(SOURCES, (cls(hidden), by_jacfwd(hidden))))
    kp, kx, ks = jax.random.split(jax.random.key(0), 3)
    params = cells["structured"].init(kp, hidden)
    xs = jax.random.normal(kx, (args.batch, steps, hidden))
    programs, structures = {}, {}
    if "parts" in modes:
        fns, n = parts_programs(cells["structured"], steps, args.batch)
        states = jax.random.uniform(ks, (steps, args.batch, n), minval=-1.0, maxval=1.0)
        programs[("shared", "values", None)] = timing.compile_ahead(fns["values"], params, states, xs.swapaxes(0, 1))
        programs[("shared", "solve", None)] = timing.compile_ahead(fns["solve"], 0.5 * states, states)
    for source, cell in cells.items():
        if "jacobian" in modes:
            fn, structures[source], n = jacobians_program(cell, steps, args.batch)
            states = jax.random.uniform(ks, (steps, args.batch, n), minval=-1.0, maxval=1.0)
            programs[(source, "jacobian", None)] = timing.compile_ahead(fn, params, states, xs.swapaxes(0, 1))
        for mode in (m for m in modes if m in ("fwd", "fwd+bwd")):
            for k in (k1, k2):
                programs[(source, mode, k)] = timing.compile_ahead(newton_program(cell, k, mode), params, xs)
    if structures:  # the comparison is void unless the hidden capability really changes the path
        assert structures["structured"].from_cell and not structures["jacfwd"].from_cell, structures
    results = {}
    for group in ("shared", *SOURCES):
        results.update(timing.compare({k: v for k, v in programs.items() if k[0] == group}, rounds=args.repeats))
    rows = []
    for mode in modes:
        row = dict(cell=name, hidden=hidden, T=steps, batch=args.batch, mode=mode)
        if mode == "parts":
            row.update({part: results[("shared", part, None)].median_s for part in ("values", "solve")})
            rows.append(row)
            continue
        for source in SOURCES:
            if mode == "jacobian":
                row[source] = results[(source, mode, None)].median_s
            else:
                lo, hi = results[(source, mode, k1)].median_s, results[(source, mode, k2)].median_s
                row[source] = (hi - lo) / (k2 - k1)
                row[f"{source}_total_k{k1}"], row[f"{source}_total_k{k2}"] = lo, hi
            row[f"{source}_compile_s"] = max(r.compile_s for key, r in results.items() if key[:2] == (source, mode))
        row["ratio"] = row["jacfwd"] / row["structured"] if row["structured"] > 0 else float("nan")
        rows.append(row)
    for (source, mode, k), r in results.items():  # every timed call, for the record
        rows[0].setdefault("times_s", {})[f"{source} {mode} {k}"] = r.times_s
    if "fwd" in modes:  # the two paths solve the same equations: same outputs up to rounding
        ys = [np.asarray(programs[(s, "fwd", k2)].run()) for s in SOURCES]
        rows[0]["max_abs_diff_ys"] = float(np.max(np.abs(ys[0] - ys[1])))
    return rows


def markdown(meta, rows):
    k1, k2 = meta["iters"]
    lines = [
        "# quasi-DEER: structured (unit-diagonal) Jacobian vs jax.jacfwd's diagonal",
        "",
        f"- device: {meta['device_kind']} ({meta['backend']}), {meta['cpu_count']} CPUs; jax {meta['jax']}, "
        f"jaxlib {meta['jaxlib']}, rnnjax {meta['rnnjax']}, numpy {meta['numpy']}, python {meta['python']}",
        f"- {meta['date']}: `{meta['command']}`",
        f"- ms per Newton iteration = (median at max_iters={k2} - median at max_iters={k1}) / {k2 - k1}, "
        f"rj.Newton('quasi-deer', tol=None), batch {meta['batch']}, float32, median of {meta['repeats']} "
        "interleaved rounds per path; fwd+bwd: gradient of sum(ys^2) w.r.t. the parameters (the adjoint iterates too). "
        "jacobian: the engine's Jacobians (and new states) over all T x B steps (ms per call). "
        "ratio = jacfwd / structured.",
        "",
        f"| cell | H | T | mode | structured ms | jacfwd ms | ratio | structured total ms (k={k1}, k={k2}) "
        f"| jacfwd total ms (k={k1}, k={k2}) | total ratio (k={k2}) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["mode"] != "parts"):
        totals = ["-", "-"]
        if f"structured_total_k{k2}" in r:
            totals = [f"{1e3 * r[f'{s}_total_k{k1}']:.1f}, {1e3 * r[f'{s}_total_k{k2}']:.1f}" for s in SOURCES]
        total_ratio = "-" if totals[0] == "-" else f"{r[f'jacfwd_total_k{k2}'] / r[f'structured_total_k{k2}']:.1f}x"
        lines.append(
            f"| {r['cell']} | {r['hidden']} | {r['T']} | {r['mode']} | {1e3 * r['structured']:.2f} "
            f"| {1e3 * r['jacfwd']:.2f} | {r['ratio']:.1f}x | {totals[0]} | {totals[1]} | {total_ratio} |"
        )
    parts = [r for r in rows if r["mode"] == "parts"]
    if parts:
        lines += [
            "",
            "The rest of an iteration, the same for both paths (ms per call): the step at all T x B "
            "positions (values) and the diagonal associative scan (solve).",
            "",
            "| cell | H | T | values ms | solve ms |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['cell']} | {r['hidden']} | {r['T']} | {1e3 * r['values']:.2f} | {1e3 * r['solve']:.2f} |"
            for r in parts
        ]
    diffs = [r["max_abs_diff_ys"] for r in rows if "max_abs_diff_ys" in r]
    if diffs:
        lines += ["", f"max |ys(structured) - ys(jacfwd)| over all points: {max(diffs):.2e}"]
    return "\n".join(lines) + "\n"


def metadata(args):
    return dict(
        timing.environment(),
        batch=args.batch,
        repeats=args.repeats,
        iters=[int(k) for k in args.iters.split(",")],
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    meta = metadata(args)
    print(f"device: {meta['device_kind']} ({meta['backend']}); jax {meta['jax']}", flush=True)
    rows = []
    for point in args.points.split(","):
        steps, hidden = (int(v) for v in point.split(":"))
        for name in args.cells.split(","):
            for row in measure_point(name, hidden, steps, args):
                rows.append(row)
                if row["mode"] == "parts":
                    print(
                        f"{name:6s} H={hidden:<4d} T={steps:<6d} parts     values {1e3 * row['values']:9.2f} ms  "
                        f"solve {1e3 * row['solve']:9.2f} ms",
                        flush=True,
                    )
                    continue
                print(
                    f"{name:6s} H={hidden:<4d} T={steps:<6d} {row['mode']:9s} structured "
                    f"{1e3 * row['structured']:9.2f} ms  jacfwd {1e3 * row['jacfwd']:9.2f} ms  "
                    f"{row['ratio']:6.1f}x",
                    flush=True,
                )
            if args.out is not None:  # what is measured so far survives a kill
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    text = markdown(meta, rows)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(text)
        print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
