"""Write the optimised HLO of rj.scan's forward and gradient programs (LSTM, GRU, Elman;
B=32, D=H=128, T=1024), names and source locations stripped, so that two versions of
rnnjax can be compared exactly: a refactor that leaves these files equal cannot change
speed. Used for the driver-layer restructuring (see DECISIONS.md).

    python -m benchmarks.lab.compare_hlo /tmp/new.json
    (cd old-checkout && PYTHONPATH=. python -m benchmarks.lab.compare_hlo /tmp/old.json)
    python -m benchmarks.lab.compare_hlo --diff /tmp/old.json /tmp/new.json

With ``--methods``: instead, forward and gradient programs of every method value at small
shapes with lengths (Sequential, Associative, Chunked, each Newton variant, Kernel
interpreted, Auto), used for the one-evaluate-path restructuring.
"""

from __future__ import annotations

import argparse
import json
import re


def normalised(hlo: str) -> str:
    """The instructions of ``hlo`` with instruction names, metadata and stack frames removed."""
    lines = [line for line in hlo.splitlines() if line.startswith(("HloModule", "ENTRY", "%", "  "))]
    text = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines))
    text = re.sub(r"%[A-Za-z_0-9.-]+", "%x", re.sub(r"\.[0-9]+", "", text))
    return re.sub(r",? ?stack_frame_id=[0-9]+", "", text)


def programs() -> dict[str, str]:
    import jax
    import jax.numpy as jnp

    import rnnjax as rj

    new_api = hasattr(rj, "Sequential")
    out = {}
    for name, cell in (("elman", rj.Elman(128)), ("lstm", rj.LSTM(128)), ("gru", rj.GRU(128))):
        params, xs = cell.init(jax.random.key(0), 128), jnp.ones((32, 1024, 128))
        for mode in ("fwd", "autodiff", "fused"):
            gradient = "fused" if mode == "fused" else "autodiff"
            kw = dict(method=rj.Sequential(gradient=gradient)) if new_api else dict(vjp=gradient)
            run = lambda p, x, kw=kw, cell=cell: rj.scan(cell, p, x, **kw)[0]  # noqa: E731
            f = jax.jit(run if mode == "fwd" else jax.grad(lambda p, x, run=run: run(p, x).sum(), argnums=(0, 1)))
            out[f"{name}-{mode}"] = normalised(f.lower(params, xs).compile().as_text())
    return out


def method_cases():
    import rnnjax as rj

    H = 16
    yield "elman-seq", rj.Elman(H), rj.Sequential()
    yield "lstm-seq-autodiff", rj.LSTM(H), rj.Sequential(gradient="autodiff")
    yield "gru-seq-remat", rj.GRU(H), rj.Sequential(remat="sqrt")
    yield "mingru-assoc", rj.MinGRU(H), rj.Associative()
    yield "lru-chunked", rj.LRU(H), rj.Chunked(16)
    yield "indrnn-relu-assoc", rj.IndRNN(H, activation="relu"), rj.Associative()
    yield "indrnn-relu-chunked", rj.IndRNN(H, activation="relu"), rj.Chunked(8)
    yield "gru-newton-qdeer", rj.GRU(H), rj.Newton("quasi-deer")
    yield "gru-newton-deer", rj.GRU(H), rj.Newton("deer", max_iters=8)
    yield "paragru-newton-deer", rj.ParaGRU(H), rj.Newton("deer", tol=None, max_iters=3, init="step")
    yield "gru-newton-qelk", rj.GRU(H), rj.Newton("quasi-elk", max_iters=8)
    yield "lstm-kernel", rj.LSTM(H), rj.Kernel(interpret=True)
    yield "gru-auto", rj.GRU(H), rj.Auto()
    yield "mingru-auto", rj.MinGRU(H), rj.Auto()


def method_programs() -> dict[str, str]:
    import jax
    import jax.numpy as jnp

    import rnnjax as rj

    out = {}
    lengths = jnp.array([48, 30, 0, 7])
    for name, cell, method in method_cases():
        params = cell.init(jax.random.key(0), 8)
        xs = jax.random.normal(jax.random.key(1), (4, 48, 8))
        run = lambda p, x, cell=cell, method=method: rj.scan(cell, p, x, lengths=lengths, method=method)[0]  # noqa: E731
        grad = jax.grad(lambda p, x, run=run: (run(p, x) ** 2).sum(), argnums=(0, 1))
        for mode, f in (("fwd", run), ("grad", grad)):
            out[f"{name}-{mode}"] = normalised(jax.jit(f).lower(params, xs).compile().as_text())
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="output JSON, or two JSONs with --diff")
    parser.add_argument("--diff", action="store_true", help="compare two outputs")
    parser.add_argument("--methods", action="store_true", help="every method value at small shapes")
    args = parser.parse_args(argv)
    if not args.diff:
        json.dump(method_programs() if args.methods else programs(), open(args.paths[0], "w"))
        return
    old, new = (json.load(open(p)) for p in args.paths)
    for key in old:
        print(f"{key:16s} {'identical' if old[key] == new.get(key) else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
