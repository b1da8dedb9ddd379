"""Iterations to reach rj.Newton()'s tolerance with exact Jacobian blocks ("deer") versus their
diagonals ("quasi-deer"), for the cells whose Jacobian blocks are exact (ParaGRU, ParaLSTM, a
tanh IndRNN): what decided rj.Newton(variant="auto") (DECISIONS.md, "Newton's default variant").

    python -m benchmarks.lab.newton_variant            # T = 4096, B = 4, D = H = 64, float32
    python -m benchmarks.lab.newton_variant --tiny     # seconds
"""

from __future__ import annotations

import argparse
import time

import jax

import rnnjax as rj


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="T=64, B=2, width 8")
    args = parser.parse_args(argv)
    steps, batch, width = (64, 2, 8) if args.tiny else (args.steps, args.batch, args.width)
    cells = {"ParaGRU": rj.ParaGRU(width), "ParaLSTM": rj.ParaLSTM(width), "IndRNN-tanh": rj.IndRNN(width, "tanh")}
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, {device}; T={steps} B={batch} D=H={width}, float32, tol='auto'")
    print(f"{'cell':12s} {'variant':11s} {'auto picks':11s} {'iterations':>10s} {'converged':>9s} {'ms':>8s}")
    xs = jax.random.normal(jax.random.key(1), (batch, steps, width))
    for name, cell in cells.items():
        params = cell.init(jax.random.key(0), width)
        picked = rj.Newton().resolve(cell, steps).variant
        for variant in ("deer", "quasi-deer"):
            run = jax.jit(lambda p, x, v=variant, c=cell: rj.parallel.newton_scan(c, p, x, newton=v)[2])
            jax.block_until_ready(run(params, xs))
            start = time.perf_counter()
            info = jax.block_until_ready(run(params, xs))
            ms = 1e3 * (time.perf_counter() - start)
            row = f"{name:12s} {variant:11s} {picked:11s} {int(info.iterations):10d} {bool(info.converged)!s:>9s}"
            print(f"{row} {ms:8.1f}")


if __name__ == "__main__":
    main()
