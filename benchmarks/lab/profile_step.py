"""Where the time of one benchmark point goes: HLO op counts and per-op timings.

    python -m benchmarks.lab.profile_step --cell lstm --length 1024 --mode fwd+bwd
    python -m benchmarks.lab.profile_step --system rnnjax-remat --hlo /tmp/lstm.hlo --trace /tmp/prof

Builds the point exactly as ``benchmarks.run`` does (same system registry), then prints
compile time, median run time, XLA's cost and memory analysis, the op counts of the
optimised HLO (whole program, and per ``while`` body: what runs once per time step), and,
with ``--trace``, a ``jax.profiler`` trace plus the total time per XLA op (thunk) in it.
``--hlo FILE`` writes the optimised HLO text. JAX is imported after ``--host-devices``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

from benchmarks import timing
from benchmarks.run import reuse_host_memory, set_host_devices

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(", re.MULTILINE)
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", re.MULTILINE)


def computations(hlo: str) -> dict[str, str]:
    """Computation name -> its text, from ``compiled.as_text()``."""
    heads = list(_COMP.finditer(hlo))
    return {m.group(1): hlo[m.end(): heads[i + 1].start() if i + 1 < len(heads) else len(hlo)]
            for i, m in enumerate(heads)}


def op_counts(text: str) -> collections.Counter:
    return collections.Counter(m.group(1) for m in _INSTR.finditer(text))


def while_bodies(hlo: str) -> list[str]:
    return re.findall(r"\swhile\(.*?body=%?([\w.\-]+)", hlo)


def trace_op_times(trace_dir: Path) -> list[tuple[str, float, int]]:
    """(name, total µs, count) of the XLA ops in the newest perfetto trace, slowest first."""
    files = sorted(trace_dir.glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and not name.startswith("$"):  # "$..." are Python frames
            total[name] += e.get("dur", 0)
            count[name] += 1
    return [(n, t, count[n]) for n, t in total.most_common()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.profile_step", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--system", default="rnnjax", help="a JAX system of benchmarks.systems.SYSTEMS")
    p.add_argument("--cell", default="lstm")
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "fwd+bwd"])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25, help="ops listed per table")
    p.add_argument("--hlo", type=Path, help="write the optimised HLO text here")
    p.add_argument("--trace", type=Path, help="write a jax.profiler trace here and sum time per XLA op")
    p.add_argument("--host-devices", type=int, default=1)
    p.add_argument("--malloc", choices=["default", "reuse"], default="default",
                   help="reuse: glibc keeps freed memory, as benchmarks.run --malloc reuse")
    args = p.parse_args(argv)
    set_host_devices(args.host_devices)
    malloc = reuse_host_memory() if args.malloc == "reuse" else "default"

    import jax
    import numpy as np

    from benchmarks import systems as S

    system = S.SYSTEMS[args.system]
    if system.framework != "jax":
        raise SystemExit(f"{args.system} is not a JAX system; profile it with its own tools")
    prob = S.Problem(args.cell, args.mode, args.batch, args.length, args.input_size, args.hidden_size, args.dtype)
    x = np.random.default_rng(0).standard_normal((args.batch, args.length, args.input_size)).astype(np.float32)
    built = system.build(prob, x)
    built.run()
    faults0 = timing.minor_faults()
    times = timing.time_calls(built.run, args.repeats)
    faults = None if faults0 is None else (timing.minor_faults() - faults0) / args.repeats
    med = timing.median(times)
    print(f"{args.system} {args.cell} {args.mode} B={args.batch} T={args.length} D={args.input_size} "
          f"H={args.hidden_size} {args.dtype} on {jax.devices()[0].device_kind}")
    print(f"compile {built.compile_s:.3f} s (lower {built.lower_s:.3f} s); median {med * 1e3:.3f} ms "
          f"= {med / args.length * 1e6:.2f} us/step over {args.repeats} runs")
    if faults is not None:
        print(f"page faults per call {faults:.0f} (allocator: {malloc})")
    try:
        cost = built.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        print("cost analysis: " + ", ".join(f"{k} {v:.3g}" for k, v in sorted(cost.items())
                                            if k in ("flops", "bytes accessed", "transcendentals")))
    except Exception as e:  # noqa: BLE001 -- not every backend has it
        print(f"cost analysis: unavailable ({type(e).__name__})")
    if built.memory_detail:
        print("memory analysis (MiB): " + ", ".join(f"{k.replace('_size_in_bytes', '').replace('_in_bytes', '')} {v / 2**20:.2f}"
                                                   for k, v in built.memory_detail.items() if v))
    hlo = built.compiled.as_text()
    if args.hlo:
        args.hlo.write_text(hlo)
        print(f"HLO written to {args.hlo}")
    comps = computations(hlo)
    print(f"\nwhole program: {sum(op_counts(hlo).values())} instructions in {len(comps)} computations; "
          "top ops: " + ", ".join(f"{k} {v}" for k, v in op_counts(hlo).most_common(args.top)))
    for body in while_bodies(hlo):
        counts = op_counts(comps.get(body, ""))
        print(f"while body {body}: {sum(counts.values())} instructions per step: "
              + ", ".join(f"{k} {v}" for k, v in counts.most_common(args.top)))
    if args.trace:
        with jax.profiler.trace(str(args.trace), create_perfetto_trace=True):
            for _ in range(args.repeats):
                built.run()
        rows = trace_op_times(args.trace)
        print(f"\nper-op time over {args.repeats} runs (trace in {args.trace}; open the perfetto_trace.json.gz "
              "at ui.perfetto.dev or the folder with TensorBoard's profile plugin):")
        for name, us, n in rows[: args.top]:
            print(f"  {us / 1e3:10.3f} ms {n:8d}x  {name}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
