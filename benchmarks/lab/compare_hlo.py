"""Write the optimised HLO of rj.scan's forward and gradient programs (LSTM, GRU, Elman;
B=32, D=H=128, T=1024), names and source locations stripped, so that two versions of
rnnjax can be compared exactly: a refactor that leaves these files equal cannot change
speed. Used for the driver-layer restructuring (see DECISIONS.md).

    python -m benchmarks.lab.compare_hlo /tmp/new.json
    (cd old-checkout && PYTHONPATH=. python -m benchmarks.lab.compare_hlo /tmp/old.json)
    python -m benchmarks.lab.compare_hlo --diff /tmp/old.json /tmp/new.json
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="output JSON, or two JSONs with --diff")
    parser.add_argument("--diff", action="store_true", help="compare two outputs")
    args = parser.parse_args(argv)
    if not args.diff:
        json.dump(programs(), open(args.paths[0], "w"))
        return
    old, new = (json.load(open(p)) for p in args.paths)
    for key in old:
        print(f"{key:16s} {'identical' if old[key] == new.get(key) else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
