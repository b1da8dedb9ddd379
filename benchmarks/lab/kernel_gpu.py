"""The kernel engine (``rj.Kernel()``) on a GPU: correctness of the compiled kernels, then a
small sweep of its launch options against ``rj.Sequential()`` in one process.

1. **Check**: for Elman, LSTM and GRU (and LSTM under ``rj.Mixed`` bfloat16), outputs, final
   carries and the gradients of a loss of both with respect to params, inputs and initial
   carry, against ``rj.Sequential()``, with lengths, resets and reverse, and a batch that is
   not a multiple of ``block_batch``. Full float32 products on both sides (``precision=
   "highest"``), so the relative errors printed are float32 rounding; a TF32 row shows what
   the default precision costs. Every case runs on fresh random inputs; NaN fails.
2. **Sweep**: forward medians at B=32, D=H=128, T=1024, float32 and bfloat16, with ``W_h``
   streamed from L2 or held on chip, interleaved with ``rj.Sequential()`` (same-process ratios).
3. **Table** (``--table``): the suite's table (``benchmarks.run --preset gpu``) of LSTM, GRU and
   Elman at T = 1024 and 4096, forward and forward+backward: the kernel and the scan in float32
   and under ``rj.Mixed`` bfloat16, cuDNN through PyTorch, ``jax.experimental.rnn`` (LSTM).
   The predictions to set beside it: ``benchmarks/lab/gpu_kernel_predictions.md``.

    python -m benchmarks.lab.kernel_gpu            # on the GPU
    python -m benchmarks.lab.kernel_gpu --tiny     # anywhere (interpreted on CPU): seconds, small shapes
    python -m benchmarks.lab.kernel_gpu --skip-sweep --table     # checks, then the table

Prints a table per part; exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing

CELLS = {"elman": rj.Elman, "lstm": rj.LSTM, "gru": rj.GRU}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_case(name, cell, hidden, batch, steps, seed, method, precision_ref, **options):
    """Largest relative error over outputs, carries and gradients, kernel vs sequential."""
    key = jax.random.key(seed)
    kp, kx, kl, kr, kc = jax.random.split(key, 5)
    base = cell.cell if isinstance(cell, rj.Mixed) else cell
    params = base.init(kp, hidden)
    xs = jax.random.normal(kx, (batch, steps, hidden))
    carry = jax.tree.map(lambda a: 0.5 * jax.random.normal(kc, a.shape, a.dtype), cell.init_carry((batch,)))
    kw = {}
    if options.get("lengths"):
        kw["lengths"] = jax.random.randint(kl, (batch,), 0, steps + 1)
    if options.get("resets"):
        kw["resets"] = jax.random.bernoulli(kr, 0.05, (batch, steps))
    if options.get("reverse"):
        kw["reverse"] = True

    def loss(p, xs, c, m):
        ys, final = rj.scan(cell, p, xs, c, method=m, **kw)
        return jnp.sum(ys.astype(jnp.float32) ** 2) + sum(jnp.sum(jnp.sin(f)) for f in jax.tree.leaves(final))

    def both(m):
        with jax.default_matmul_precision(precision_ref):
            out = jax.jit(lambda p, xs, c: rj.scan(cell, p, xs, c, method=m, **kw))(params, xs, carry)
            grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(params, xs, carry, m)
        return jax.tree.leaves(out), jax.tree.leaves(grads)

    (o_ref, g_ref), (o_k, g_k) = both(rj.Sequential()), both(method)
    return max(rel(a, b) for a, b in zip(o_k, o_ref)), max(rel(a, b) for a, b in zip(g_k, g_ref))


def run_checks(hidden, batch, steps, interpret) -> bool:
    print(f"\n== check: kernel vs rj.Sequential(), D=H={hidden}, B={batch} (block_batch 16), T={steps} ==")
    print(f"{'case':44s} {'outputs rel':>12s} {'grads rel':>12s}  {'s':>5s}")
    ok = True
    exact = rj.Kernel(precision="highest", interpret=interpret or None)
    every = {"lengths": 1, "resets": 1, "reverse": 1}
    hold = rj.Kernel(precision="highest", weights="hold", interpret=interpret or None)
    cases = [
        ("lstm", rj.LSTM(hidden), exact, "highest", 2e-5, every),
        ("gru", rj.GRU(hidden), exact, "highest", 2e-5, every),
        ("lstm Mixed bf16", rj.Mixed(rj.LSTM(hidden), "bfloat16"), exact, "highest", 5e-2, {"lengths": 1}),
        # TF32 products (10-bit mantissa) against full float32: agreement to about 1e-3.
        ("lstm tf32 (default precision)", rj.LSTM(hidden), rj.Kernel(interpret=interpret or None), "highest", 2e-2,
         {"lengths": 1}),
        ("elman hold", rj.Elman(hidden), hold, "highest", 2e-5, every),
        ("elman", rj.Elman(hidden), exact, "highest", 2e-5, every),
        ("gru", rj.GRU(hidden), exact, "highest", 2e-5, {}),
    ]
    for seed, (name, cell, method, prec, tol, opts) in enumerate(cases):
        label = f"{name} {'+'.join(opts) or 'plain'}"
        t0 = time.perf_counter()
        try:
            out_err, grad_err = check_case(name, cell, hidden, batch, steps, seed, method, prec, **opts)
        except Exception as e:  # noqa: BLE001 -- report every case, then fail
            print(f"{label:44s} ERROR {type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=-3)
            ok = False
            continue
        good = out_err <= tol and grad_err <= tol
        ok &= good
        print(f"{label:44s} {out_err:12.2e} {grad_err:12.2e}  {time.perf_counter() - t0:5.1f}"
              f"{'' if good else f'  FAIL (> {tol:g})'}")
    return ok


def run_sweep(hidden, batch, steps, interpret, rounds):
    print(f"\n== sweep: forward medians (ms) at B={batch}, D=H={hidden}, T={steps}; W_h streamed from L2 or held ==")
    print(f"{'cell':6s} {'variant':28s} {'median ms':>10s} {'vs seq':>7s} {'compile s':>9s}")
    for name, cls in CELLS.items():
        for dtype in ("float32", "bfloat16"):
            cell = cls(hidden) if dtype == "float32" else rj.Mixed(cls(hidden), dtype)
            params = (cell if dtype == "float32" else cell.cell).init(jax.random.key(0), hidden)
            xs = jax.random.normal(jax.random.key(1), (batch, steps, hidden))
            variants = {f"sequential {dtype}": rj.Sequential()}
            for weights in ("stream", "hold"):
                variants[f"kernel {dtype} {weights}"] = rj.Kernel(weights=weights, interpret=interpret or None)
            compiled = {}
            for label, method in variants.items():
                try:
                    compiled[label] = timing.compile_ahead(
                        lambda p, xs, m=method, c=cell: rj.scan(c, p, xs, method=m)[0], params, xs)
                except Exception as e:  # noqa: BLE001
                    print(f"{name:6s} {label:28s} ERROR {type(e).__name__}: {str(e)[:200]}")
            try:
                results = timing.compare(compiled, rounds)
            except Exception as e:  # noqa: BLE001
                print(f"{name:6s} ERROR while timing {type(e).__name__}: {str(e)[:300]}")
                continue
            base = results.get(f"sequential {dtype}")
            for label, r in results.items():
                ratio = f"{r.median_s / base.median_s:7.2f}" if base else "      -"
                print(f"{name:6s} {label:28s} {r.median_s * 1e3:10.3f} {ratio} {compiled[label].compile_s:9.1f}")


TABLE_SYSTEMS = ("rnnjax-kernel", "rnnjax", "torch", "rnnjax-kernel-bf16", "rnnjax-bf16", "jax-cudnn")


def run_table(tiny, out, max_minutes):
    """The suite's table for the kernel's cells, lengths and peers (one process, one table)."""
    from benchmarks import run

    argv = ["--preset", "gpu", "--cells", "lstm", "gru", "elman", "--lengths", "1024", "4096"]
    argv += ["--systems", *TABLE_SYSTEMS, "--no-plot", "--out", str(out), "--max-minutes", str(max_minutes)]
    print(f"\n== table: python -m benchmarks.run {' '.join(argv + ['--tiny'] * tiny)} ==", flush=True)
    run.main(argv + ["--tiny"] * tiny)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes, interpreted kernels: checks the script runs")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--table", action="store_true", help="then the table against cuDNN and jax.experimental.rnn")
    p.add_argument("--out", default="bench-results/kernel-gpu-table", help="the table's folder (git-ignored default)")
    p.add_argument("--max-minutes", type=float, default=4.0, help="the table's time budget (0: none)")
    args = p.parse_args(argv)
    print("jax", jax.__version__, jax.devices())
    interpret = jax.default_backend() != "gpu"
    if args.tiny:
        ok = run_checks(hidden=16, batch=5, steps=6, interpret=interpret)
        if not args.skip_sweep:
            run_sweep(hidden=16, batch=16, steps=8, interpret=interpret, rounds=1)
    else:
        ok = run_checks(hidden=128, batch=37, steps=64, interpret=interpret)
        if not args.skip_sweep:
            run_sweep(hidden=128, batch=32, steps=1024, interpret=interpret, rounds=10)
    if args.table:
        run_table(args.tiny, args.out, args.max_minutes)
    print("\nchecks:", "all passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
