"""rnnjax against its peers with the calls interleaved: each round calls every system once,
and the ratios are taken per round, then their median. ``benchmarks.run`` times one system
after another, so a machine that changes speed between systems moves its ratios (two
identical XLA programs measured 1.05-1.15 there); this script is its check.

    python -m benchmarks.lab.interleaved_peers --mode fwd+bwd --rounds 15 \\
        --systems rnnjax rnnjax-shard flax torch --host-devices 2

Systems are those of ``benchmarks.systems.SYSTEMS``, built exactly as ``benchmarks.run``
builds them (B=32, D=H=128, T=1024, float32 unless set). Prints one line per cell: the
median ms of each system, and the median per-round ratio of every rnnjax system to Flax, to
PyTorch and to the faster of the two in that round. JAX is imported after ``--host-devices``.
"""

from __future__ import annotations

import argparse
import statistics


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    p.add_argument("--cells", nargs="+", default=["lstm", "gru", "elman"])
    p.add_argument("--systems", nargs="+", default=["rnnjax", "flax", "torch"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128, help="D = H")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--host-devices", type=int, default=1)
    args = p.parse_args(argv)

    from benchmarks.run import set_host_devices

    set_host_devices(args.host_devices)
    import numpy as np

    from benchmarks import systems, timing

    peers = [s for s in args.systems if s in ("flax", "torch")]
    for cell in args.cells:
        prob = systems.Problem(cell, args.mode, args.batch, args.length, args.hidden, args.hidden)
        x = np.random.default_rng(0).standard_normal((args.batch, args.length, args.hidden)).astype(np.float32)
        built = {name: systems.SYSTEMS[name].build(prob, x) for name in args.systems}
        for b in built.values():
            b.run()
        t = {k: np.array(v) for k, v in timing.time_interleaved({n: b.run for n, b in built.items()}, args.rounds).items()}
        line = f"{cell:6s} {args.mode:8s} " + " ".join(f"{n}={1e3 * statistics.median(v):.1f}ms" for n, v in t.items())
        faster = np.minimum.reduce([t[q] for q in peers]) if peers else None
        for name in args.systems:
            if name in peers:
                continue
            line += "".join(f" | {name}/{q} {statistics.median(t[name] / t[q]):.3f}" for q in peers)
            if len(peers) > 1:
                line += f" | {name}/faster {statistics.median(t[name] / faster):.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
