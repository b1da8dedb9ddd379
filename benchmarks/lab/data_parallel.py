"""Decision script: data parallelism on one multi-core CPU, the training step over N host
devices under ``shard_map`` (what ``mesh=`` does) against XLA's automatic partitioning.

Times ``rj.train.make_train_step`` for an LSTM language-model-like step (MSE on every
output, Adam) five ways in one process, interleaved round by round:

- ``1 device``: the plain step, everything on device 0;
- ``mesh``: ``make_train_step(..., mesh=mesh)``, the batch split over the N devices and the
  recurrence run per shard under ``shard_map`` (one all-reduce of the gradients after the loop);
- ``1 device, fused`` and ``mesh, fused``: the same with
  ``rj.scan(..., method=rj.Sequential(gradient="fused"))``;
- ``jit-auto`` (the decision behind ``mesh``): the plain step with the batch placed by
  ``NamedSharding`` and XLA's automatic partitioning, which reduces the weight gradients
  inside the loop, once per step.

It checks that all give the same parameters after one step (float32 rounding) and
writes JSON and Markdown (``--out``, a path without extension; default
``bench-results/data-parallel-<cell>-<devices>dev``, git-ignored).

    python -m benchmarks.lab.data_parallel --host-devices 2          # this machine: 2 cores
    python -m benchmarks.lab.data_parallel --host-devices 2 --tiny   # seconds, numbers meaningless

``--host-devices N`` sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX
is imported (the library itself never sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from benchmarks import output, timing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host-devices", type=int, default=2, help="CPU devices to expose (default 2)")
    p.add_argument("--cell", default="lstm", choices=["lstm", "gru", "elman"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128, help="input and hidden size")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--systems", default="1 device,1 device, fused,mesh,mesh, fused,jit-auto",
                   help="comma-separated; the names contain ', ' (default: all five)")
    p.add_argument("--tiny", action="store_true", help="B=4 H=8 T=16, 1 repeat")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.hidden, args.length, args.repeats = 4, 8, 16, 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.host_devices}"
        ).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rnnjax as rj

    devices = jax.devices()
    n = len(devices)
    cell = {"lstm": rj.LSTM, "gru": rj.GRU, "elman": rj.Elman}[args.cell](args.hidden)
    params = cell.init(jax.random.key(0), args.hidden)
    k1, k2 = jax.random.split(jax.random.key(1))
    batch = {
        "x": jax.random.normal(k1, (args.batch, args.length, args.hidden)),
        "y": jax.random.normal(k2, (args.batch, args.length, args.hidden)),
    }
    optimizer = optax.adam(1e-3)

    def make_loss(gradient):
        def loss_fn(p, b):
            ys, _ = rj.scan(cell, p, b["x"], method=rj.Sequential(gradient=gradient))
            return rj.train.mean_squared_error(ys, b["y"])

        return loss_fn

    loss_fn, fused_loss = make_loss("autodiff"), make_loss("fused")

    mesh = jax.make_mesh((n,), ("data",))
    single = rj.train.make_train_step(loss_fn, optimizer, donate=False)
    same = lambda s, b: (s, b)
    steps = {"1 device": (single, same),
             "1 device, fused": (rj.train.make_train_step(fused_loss, optimizer, donate=False), same)}
    if n > 1:
        steps["mesh"] = (rj.train.make_train_step(loss_fn, optimizer, donate=False, mesh=mesh), same)
        steps["mesh, fused"] = (rj.train.make_train_step(fused_loss, optimizer, donate=False, mesh=mesh), same)
        auto = jax.sharding.Mesh(np.array(devices), ("data",))
        place = lambda s, b: (jax.device_put(s, NamedSharding(auto, P())), jax.device_put(b, NamedSharding(auto, P("data"))))
        steps["jit-auto"] = (rj.train.make_train_step(loss_fn, optimizer, donate=False), place)
    steps = {k: v for k, v in steps.items() if k in args.systems}

    state = rj.train.TrainState.create(params, optimizer)
    # Not compiled ahead: the mesh step places its arguments in Python on every call, and that
    # is part of what is timed. The first call (compile included) is timed apart.
    runs, compile_s, first = {}, {}, {}
    for name, (step, place) in steps.items():
        runs[name] = timing.blocking(step, *place(state, batch))
        out, compile_s[name] = timing.timed_call(runs[name])
        first[name] = out[0].params
    ref = first["1 device"] if "1 device" in first else next(iter(first.values()))
    max_diff = {
        name: max(float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(r)))) for a, r in zip(jax.tree.leaves(p), jax.tree.leaves(ref)))
        for name, p in first.items()
    }
    times = timing.time_interleaved(runs, args.repeats)  # drift on a shared machine hits every system alike
    median = {name: float(np.median(t)) for name, t in times.items()}
    base = median.get("1 device")
    rows = [
        {"system": name, "median_ms": 1e3 * m, "speedup": (base / m) if base else None,
         "first_call_s": compile_s[name], "max_param_diff_after_one_step": max_diff[name], "times_s": times[name]}
        for name, m in median.items()
    ]
    result = {
        "meta": {"devices": n, "device_kind": devices[0].device_kind, "cpu_count": os.cpu_count(),
                 "jax": jax.__version__, "python": platform.python_version(), "cell": args.cell,
                 "batch": args.batch, "hidden": args.hidden, "length": args.length, "repeats": args.repeats,
                 "step": "value_and_grad of MSE on every output + Adam update (rj.train.make_train_step)"},
        "rows": rows,
    }
    title = (f"{args.cell.upper()} training step, B={args.batch} D=H={args.hidden} T={args.length}, "
             f"{n} {devices[0].platform} devices, median of {args.repeats}")
    lines = [f"# {title}", "", "| system | median ms | speedup vs 1 device | first call s | max param diff after 1 step |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "—"
        lines.append(f"| {r['system']} | {r['median_ms']:.1f} | {speed} | {r['first_call_s']:.2f} | "
                     f"{r['max_param_diff_after_one_step']:.1e} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = args.out or output.default_out(f"data-parallel-{args.cell}-{n}dev")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(md)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
