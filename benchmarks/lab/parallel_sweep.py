"""Sequence-length sweep of rj.scan's methods: sequential, associative, chunked, newton, auto.

For every cell, method and T: jit, warm up, time `repeats` calls with block_until_ready and
report the median, forward and forward+backward (gradient of a sum-of-squares loss with
respect to the parameters); compilation is timed apart. Results go to OUT.json and OUT.md
(and OUT.png when matplotlib is installed), with the device and library versions; without
``--out`` it only prints.

    python -m benchmarks.lab.parallel_sweep --cells mingru,lru,gru:16 --methods sequential,associative,newton \\
        --T 1024,4096 --batch 8 --hidden 64 --out bench-results/my_sweep

Presets: ``--preset cpu-auto`` (the measurement behind "auto"'s CPU table, < 6 min on 2 cores)
and ``--preset gpu`` (benchmarks/lab/gpu_parallel.sh). Then

    python -m benchmarks.lab.parallel_sweep --auto-table benchmarks/results/cpu-auto-20261127.json

prints the auto table entry for rnnjax/tuning.py derived from the measurements, and
how far from the fastest method the table's choice is at every measured point.

A cell is ``name`` or ``name:hidden`` (mingru, minlstm, lru, gru, lstm, elman, mgu, indrnn,
paragru, paralstm). "chunked" runs once per ``--chunk-sizes`` entry ("sqrt" is the library's
default rule); "newton" once per Newton spec, for nonlinear cells only unless
``--newton-linear``: the specs of ``--newton-variants``, or for cells with an exact structured
Jacobian (``jacobian_kind == "exact"``: paragru, paralstm, indrnn) those of
``--newton-exact-variants``. A spec is a variant with optional suffixes (parse_newton):

    quasi-deer             rj.Newton("quasi-deer"): tol="auto", max_iters=50, init="zero"
    deer-step              rj.Newton("deer", init="step")
    deer-fixed3-step       rj.Newton("deer", tol=None, max_iters=3, init="step"): exactly 3
                           iterations, no convergence check (ParaRNN's training mode)
    quasi-elk-max20        rj.Newton("quasi-elk", max_iters=20)

A ``--methods`` entry ``newton-<spec>`` (e.g. ``newton-deer-fixed3-step``) adds that spec for
every nonlinear cell. A spec that runs the same program as an earlier one for that cell (e.g.
"deer" and "quasi-deer" on a cell whose Jacobian is exactly diagonal) is skipped as a
duplicate. "auto" reuses the timing of the method it resolves to (the dispatch happens at
trace time, so it is the same program), measuring it only if that one was not run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import rnnjax as rj
from rnnjax import tuning
from rnnjax.carry import CarryLayout
from rnnjax.engines.jacobians import structure_for

if not __package__:  # run as a file (python benchmarks/lab/<name>.py): `benchmarks` is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import timing  # noqa: E402

CELLS = {
    "mingru": rj.MinGRU,
    "minlstm": rj.MinLSTM,
    "lru": lambda h: rj.LRU(h, r_min=0.9, r_max=0.999),
    "gru": rj.GRU,
    "lstm": rj.LSTM,
    "elman": rj.Elman,
    "mgu": rj.MGU,
    "indrnn": rj.IndRNN,
    "paragru": rj.ParaGRU,
    "paralstm": rj.ParaLSTM,
}

METHODS = ("sequential", "associative", "chunked", "newton", "auto")  # rj.scan's method names
NEWTON_PREFIX = "newton-"  # a --methods entry newton-<spec>: one Newton spec for every nonlinear cell
DEFAULT_NEWTON = rj.Newton().variant  # the variant rj.Newton() and so "auto" run

PRESETS = {
    # The measurement behind rnnjax.tuning.auto_table("cpu"): < 6 min on 2 cores (budget-s stops it early
    # if the machine is slower; what was measured is still written).
    "cpu-auto": dict(
        cells="mingru,lru,gru:16",
        methods="sequential,associative,chunked,newton",
        T="256,2048,16384,65536",
        batch=8,
        hidden=64,
        repeats=3,
        chunk_sizes="sqrt",
        newton_variants="quasi-deer",
        newton_max_T=2048,
        nonlinear_max_T=16384,
        max_call_s=3.0,
        budget_s=300.0,
    ),
    # One GPU, < 6 min: the linear cells to T = 2^16, quasi-DEER for a small GRU, and the cells with
    # exact structured Jacobians by Newton, converging and with ParaRNN's fixed 3 iterations.
    "gpu": dict(
        cells="mingru,lru,gru:16,paragru,paralstm,indrnn",
        methods="sequential,associative,chunked,newton,auto",
        T="1024,4096,16384,65536",
        batch=16,
        hidden=64,
        repeats=5,
        chunk_sizes="sqrt,64",
        newton_variants="quasi-deer,deer",
        newton_exact_variants="quasi-deer,deer,deer-fixed3-step",
        newton_max_T=65536,
        nonlinear_max_T=65536,
        max_call_s=10.0,
        budget_s=330.0,
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for the options below")
    p.add_argument("--cells", default="mingru,lru,gru:16")
    p.add_argument("--methods", default="sequential,associative,chunked,newton,auto")
    p.add_argument("--T", default="256,1024,4096", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64, help="hidden size of cells given without one")
    p.add_argument("--input", type=int, default=None, help="input features (default: hidden)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--chunk-sizes", default="sqrt", help='chunk sizes for "chunked": ints or "sqrt"')
    p.add_argument("--newton-variants", default="quasi-deer", help="Newton specs for nonlinear cells (see above)")
    p.add_argument(
        "--newton-exact-variants",
        default="quasi-deer,deer-fixed3-step",
        help='Newton specs for cells with jacobian_kind == "exact"',
    )
    p.add_argument("--newton-linear", action="store_true", help="run newton on linear cells too")
    p.add_argument("--newton-max-T", type=int, default=4096, help="longest T for newton")
    p.add_argument("--nonlinear-max-T", type=int, default=1 << 16, help="longest T for nonlinear cells")
    p.add_argument(
        "--max-call-s", type=float, default=5.0, help="skip a method's longer T once one call took longer than this"
    )
    p.add_argument("--budget-s", type=float, default=None, help="stop measuring after this many seconds")
    p.add_argument("--out", default=None, help="output path without extension (writes .json, .md, .png)")
    p.add_argument("--auto-table", nargs="+", metavar="JSON", help="print the auto table from sweep results and exit")
    args = p.parse_args(argv)
    if args.preset:
        # The preset fills every option the command line left at its default.
        defaults = vars(p.parse_args([]))
        for key, value in PRESETS[args.preset].items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


def make_cell(spec: str, hidden: int):
    name, _, size = spec.partition(":")
    if name not in CELLS:
        raise SystemExit(f"unknown cell {name!r}; expected one of {sorted(CELLS)}")
    return CELLS[name](int(size) if size else hidden)


def parse_newton(spec: str) -> dict:
    """``newton_scan``'s options of a Newton spec ``VARIANT[-fixedK|-maxK][-step|-zero]``, e.g.
    ``"deer-fixed3-step"`` -> ``{"newton": "deer", "tol": None, "max_iters": 3, "init": "step"}``."""
    tokens = spec.split("-")
    opts = {}
    while len(tokens) > 1 and (tokens[-1] in ("step", "zero") or tokens[-1].startswith(("fixed", "max"))):
        token = tokens.pop()
        if token in ("step", "zero"):
            opts["init"] = token
        else:
            count = token.removeprefix("fixed").removeprefix("max")
            if not count.isdigit() or int(count) < 1:
                raise SystemExit(f"bad Newton spec {spec!r}: {token!r} must be fixedK or maxK with K >= 1")
            opts["max_iters"] = int(count)
            if token.startswith("fixed"):
                opts["tol"] = None
    variant = "-".join(tokens)
    if variant not in rj.parallel.NEWTON_VARIANTS:
        raise SystemExit(
            f"bad Newton spec {spec!r}: variant {variant!r} is not one of {list(rj.parallel.NEWTON_VARIANTS)}"
        )
    return {"newton": variant, **opts}


def newton_specs(cell, methods, newton_variants, exact_variants):
    """The Newton specs run on ``cell``: by its Jacobian's kind, plus ``newton-<spec>`` methods."""
    if "newton" not in methods and not any(m.startswith(NEWTON_PREFIX) for m in methods):
        return []
    exact = getattr(cell, "jacobian_kind", None) == "exact"
    specs = list((exact_variants if exact else newton_variants) if "newton" in methods else [])
    specs += [m.removeprefix(NEWTON_PREFIX) for m in methods if m.startswith(NEWTON_PREFIX)]
    return list(dict.fromkeys(specs))


def newton_program_key(cell, opts: dict):
    """What decides the program a Newton spec compiles to for ``cell`` (equal keys: duplicates)."""
    structure = structure_for(cell, CarryLayout(cell.init_carry(())), opts["newton"])
    method = method_value("newton", opts)
    elk = opts["newton"] in ("elk", "quasi-elk")
    return structure, elk, method.tol, method.max_iters, method.init, method.damping


def configs(cell, methods, chunk_sizes, newton_variants, newton_linear, exact_variants=()):
    """(label, method, options) for every method run on ``cell``; options ``{"duplicate_of":
    label}`` mark a Newton spec that compiles to the same program as an earlier one."""
    linear = isinstance(cell, rj.LinearCell)
    associative = rj.parallel.runs_associatively(cell)  # linear, or linear up to a clip (relu IndRNN)
    out = []
    for method in methods:
        if method in ("associative", "chunked") and not associative:
            continue
        if method == "chunked":
            for size in chunk_sizes:
                opts = {} if size == "sqrt" else {"chunk_size": int(size)}
                out.append((f"chunked(C={size})", "chunked", opts))
        elif method in METHODS and method not in ("newton", "auto"):
            out.append((method, method, {}))
    if not linear or newton_linear:
        seen = {}
        for spec in newton_specs(cell, methods, newton_variants, exact_variants):
            opts = parse_newton(spec)
            key = newton_program_key(cell, opts)
            label = f"newton({spec})"
            out.append((label, "newton", opts if key not in seen else {**opts, "duplicate_of": seen[key]}))
            seen.setdefault(key, label)
    return out


def auto_label(cell, steps):
    """The label of the configuration "auto" runs (default options)."""
    method = tuning.choose_method(cell, steps)
    if method == "chunked":
        return f"chunked(C={tuning.default_chunk_size(steps)})", method, {}
    if method == "newton":
        return f"newton({DEFAULT_NEWTON})", method, {}
    return method, method, {}


def method_value(method: str, opts: dict):
    """The ``rj.scan`` method value of a configuration (``opts`` as :func:`configs` gives)."""
    if method == "chunked":
        return rj.Chunked(size=opts.get("chunk_size"))
    if method == "newton":
        return rj.Newton(
            opts["newton"],
            tol=opts.get("tol", "auto"),
            max_iters=opts.get("max_iters", 50),
            init=opts.get("init", "zero"),
        )
    return {"sequential": rj.Sequential, "associative": rj.Associative, "auto": rj.Auto}[method]()


def measure(cell, method, opts, steps, args, dtype, mode):
    input_size = args.input or getattr(cell, "hidden_size", args.hidden)
    kp, kx = jax.random.split(jax.random.key(0))
    params = cell.init(kp, input_size, dtype)
    xs = jax.random.normal(kx, (args.batch, steps, input_size), dtype)

    def forward(p, x):
        return rj.scan(cell, p, x, method=method_value(method, opts))

    def loss(p, x):
        ys, carry = forward(p, x)
        total = jnp.sum(jnp.square(ys.astype(jnp.float32)))
        return total + sum(
            jnp.sum(jnp.abs(c.astype(jnp.complex64 if jnp.iscomplexobj(c) else jnp.float32)) ** 2)
            for c in jax.tree.leaves(carry)
        )

    fn = forward if mode == "fwd" else jax.grad(loss)
    result = timing.measure(timing.compile_ahead(fn, params, xs), args.repeats)
    row = dict(compile_s=result.compile_s, times_s=result.times_s, median_s=result.median_s)
    if method == "newton" and mode == "fwd":
        info = jax.jit(lambda p, x: rj.parallel.newton_scan(cell, p, x, **opts)[2])(params, xs)
        row["newton"] = dict(
            iterations=int(info.iterations), converged=bool(info.converged), residual=float(info.residual)
        )
    return row


def metadata(args):
    return dict(
        timing.environment(),
        options={k: v for k, v in vars(args).items() if k != "auto_table"},
        auto_table=tuning.auto_table(),
    )


def sweep(args, save=lambda rows: None, rows=None):
    dtype = jnp.dtype(args.dtype)
    lengths = [int(t) for t in str(args.T).split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS and not m.startswith(NEWTON_PREFIX):
            raise SystemExit(f"unknown method {m!r}; expected some of {list(METHODS)} or newton-<spec>")
        if m.startswith(NEWTON_PREFIX):
            parse_newton(m.removeprefix(NEWTON_PREFIX))  # a bad spec fails before anything runs
    chunk_sizes = str(args.chunk_sizes).split(",")
    variants = args.newton_variants.split(",")
    exact_variants = args.newton_exact_variants.split(",")
    for spec in variants + exact_variants:
        parse_newton(spec)
    modes = args.modes.split(",")
    start = time.perf_counter()
    rows = [] if rows is None else rows

    def over_budget():
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    cells = [(spec, make_cell(spec, args.hidden)) for spec in args.cells.split(",")]
    measured, slow = {}, set()
    # T is the outer loop: if the budget runs out, what is missing is the longest sequences.
    for steps in lengths:
        save(rows)  # what is measured so far survives a kill
        for spec, cell in cells:
            kind = tuning.cell_kind(cell)
            if kind in ("nonlinear", "exact_jacobian", "clipped_linear") and steps > args.nonlinear_max_T:
                continue
            base = dict(
                cell=spec,
                kind=kind,
                T=steps,
                batch=args.batch,
                hidden=getattr(cell, "hidden_size", None),
                dtype=args.dtype,
            )
            for label, method, opts in configs(
                cell, methods, chunk_sizes, variants, args.newton_linear, exact_variants
            ):
                for mode in modes:
                    row = dict(base, label=label, method=method, options=opts, mode=mode)
                    if "duplicate_of" in opts:
                        row["skipped"] = f"the same program as {opts['duplicate_of']}"
                    elif method == "newton" and steps > args.newton_max_T:
                        row["skipped"] = f"T > --newton-max-T={args.newton_max_T}"
                    elif (spec, label, mode) in slow:
                        row["skipped"] = f"a shorter T took longer than --max-call-s={args.max_call_s}"
                    elif over_budget():
                        row["skipped"] = f"over --budget-s={args.budget_s}"
                    else:
                        row.update(measure(cell, method, opts, steps, args, dtype, mode))
                        measured[(spec, label, steps, mode)] = row
                        if row["median_s"] > args.max_call_s:
                            slow.add((spec, label, mode))
                        print(
                            f"{spec:10s} {label:22s} T={steps:<6d} {mode:8s} {1e3 * row['median_s']:10.2f} ms"
                            f"  (compile {row['compile_s']:.2f} s)",
                            flush=True,
                        )
                    rows.append(row)
            if "auto" in methods:
                label, method, opts = auto_label(cell, steps)
                for mode in modes:
                    row = dict(base, label="auto", method="auto", resolves_to=label, options={}, mode=mode)
                    if (spec, label, steps, mode) in measured:
                        src = measured[(spec, label, steps, mode)]
                        row.update({k: src[k] for k in ("compile_s", "times_s", "median_s")})
                    elif over_budget():
                        row["skipped"] = f"over --budget-s={args.budget_s}"
                    else:
                        row.update(measure(cell, method, opts, steps, args, dtype, mode))
                    rows.append(row)
    save(rows)
    return rows


# ---- reports ----


def best_by_point(rows):
    """{(cell, T, mode): (label, median_s)} over measured, non-auto rows."""
    best = {}
    for r in rows:
        if "median_s" not in r or r["label"] == "auto":
            continue
        key = (r["cell"], r["T"], r["mode"])
        if key not in best or r["median_s"] < best[key][1]:
            best[key] = (r["label"], r["median_s"])
    return best


def markdown(meta, rows):
    lines = [
        "# rj.scan methods: sequence-length sweep",
        "",
        (
            f"- device: {meta['device_kind']} ({meta['backend']}, {meta['device_count']} device(s)), "
            f"{meta['cpu_count']} CPUs, {meta['machine']}"
        ),
        (
            f"- jax {meta['jax']}, jaxlib {meta['jaxlib']}, rnnjax {meta['rnnjax']}, numpy {meta['numpy']}, "
            f"python {meta['python']}; XLA_FLAGS={meta['xla_flags']!r}"
        ),
        f"- {meta['date']}: `{meta['command']}`",
        (
            f"- batch {meta['options']['batch']}, dtype {meta['options']['dtype']}, median of "
            f"{meta['options']['repeats']} calls after one warm-up; ms (compile s). fwd+bwd: gradient of "
            "sum(ys^2) + |carry|^2 with respect to the parameters."
        ),
        "",
    ]
    best = best_by_point(rows)
    for cell in dict.fromkeys(r["cell"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            sel = [r for r in rows if r["cell"] == cell and r["mode"] == mode]
            if not sel:
                continue
            labels = list(dict.fromkeys(r["label"] for r in sel))
            steps = sorted({r["T"] for r in sel})
            lines += [
                f"## {cell}, {mode}",
                "",
                "| T | " + " | ".join(labels) + " | fastest | auto / fastest |",
                "|---:|" + "---:|" * (len(labels) + 2),
            ]
            for t in steps:
                cells, auto_ratio = [], ""
                for label in labels:
                    r = next((r for r in sel if r["label"] == label and r["T"] == t), None)
                    if r is None or "median_s" not in r:
                        duplicate = r is not None and r.get("options", {}).get("duplicate_of")
                        cells.append("-" if r is None else f"= {duplicate}" if duplicate else "skip")
                        continue
                    text = f"{1e3 * r['median_s']:.2f} ({r['compile_s']:.1f})"
                    if r.get("newton"):
                        info = r["newton"]
                        if "tol" in r["options"] and r["options"]["tol"] is None:  # fixed count: no fallback
                            text += f" {info['iterations']} it, residual {info['residual']:.1e}"
                        else:
                            text += f" {info['iterations']} it{'' if info['converged'] else ', fell back'}"
                    if label == "auto":
                        text = f"{1e3 * r['median_s']:.2f} = {r['resolves_to']}"
                        if (cell, t, mode) in best:
                            auto_ratio = f"{r['median_s'] / best[(cell, t, mode)][1]:.2f}"
                    cells.append(text)
                fastest = best.get((cell, t, mode), ("-", None))[0]
                lines.append(f"| {t} | " + " | ".join(cells) + f" | {fastest} | {auto_ratio} |")
            lines.append("")
    # Speed-ups over the sequential driver (the GPU targets are stated on fwd+bwd).
    lines += [
        "## Speed-up over sequential (sequential time / method time)",
        "",
        "| cell | mode | T | method | speed-up |",
        "|---|---|---:|---|---:|",
    ]
    seq = {
        (r["cell"], r["T"], r["mode"]): r["median_s"] for r in rows if r["label"] == "sequential" and "median_s" in r
    }
    for r in rows:
        key = (r["cell"], r["T"], r["mode"])
        if r["label"] not in ("sequential", "auto") and "median_s" in r and key in seq:
            lines.append(f"| {r['cell']} | {r['mode']} | {r['T']} | {r['label']} | {seq[key] / r['median_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 4), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        for label in dict.fromkeys(r["label"] for r in rows if r["cell"] == cell and r["label"] != "auto"):
            pts = sorted(
                (r["T"], r["median_s"])
                for r in rows
                if r["cell"] == cell and r["label"] == label and r["mode"] == "fwd+bwd" and "median_s" in r
            )
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=label)
        ax.set(title=f"{cell}, fwd+bwd", xlabel="T", ylabel="median s")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- the auto table from measurements ----

KIND_METHODS = {
    "log_linear": ("sequential", "associative", "chunked"),
    "linear": ("sequential", "associative", "chunked"),
    "clipped_linear": ("sequential", "associative", "chunked", "newton"),
    "exact_jacobian": ("sequential", "newton"),
    "nonlinear": ("sequential", "newton"),
}


def auto_table(paths):
    rows, backends = [], set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        backends.add(data["meta"]["backend"])
        rows += [r for r in data["rows"] if "median_s" in r and r["label"] != "auto"]
    if len(backends) != 1:
        raise SystemExit(f"results from several backends {sorted(backends)}; give one backend's files")
    backend = backends.pop()
    # "chunked" has one chunk-size rule per backend: the one with the best geometric-mean
    # ratio to the fastest chunked entry at the points where all were measured.
    chunk_labels = sorted({r["label"] for r in rows if r["method"] == "chunked"})
    chunk_choice = None
    if chunk_labels:
        score = {}
        for label in chunk_labels:
            ratios = []
            for r in rows:
                if r["label"] != label:
                    continue
                same = [
                    s["median_s"]
                    for s in rows
                    if s["method"] == "chunked" and (s["cell"], s["T"], s["mode"]) == (r["cell"], r["T"], r["mode"])
                ]
                if len(same) == len(chunk_labels):
                    ratios.append(r["median_s"] / min(same))
            score[label] = math.exp(statistics.mean(map(math.log, ratios))) if ratios else math.inf
        chunk_choice = min(score, key=score.get)
    default_newton = f"newton({DEFAULT_NEWTON})"

    def candidate(r):  # the table's method name for a row, or None if "auto" cannot run it
        if r["method"] == "chunked":
            return "chunked" if r["label"] == chunk_choice else None
        if r["method"] == "newton":
            return "newton" if r["label"] == default_newton else None
        return r["method"]

    table = {"chunk_size": "sqrt" if chunk_choice in (None, "chunked(C=sqrt)") else int(chunk_choice[10:-1])}
    worst = []
    for kind, allowed in KIND_METHODS.items():
        sel = [r for r in rows if r["kind"] == kind and candidate(r) in allowed]
        steps = sorted({r["T"] for r in sel})
        choice = []
        for t in steps:
            points = {(r["cell"], r["mode"]) for r in sel if r["T"] == t}
            best = {
                p: min(r["median_s"] for r in rows if (r["cell"], r["mode"]) == p and r["T"] == t and r["kind"] == kind)
                for p in points
            }
            ratios = {}
            for m in allowed:
                per = [
                    next(
                        (
                            r["median_s"]
                            for r in sel
                            if candidate(r) == m and (r["cell"], r["mode"]) == p and r["T"] == t
                        ),
                        math.inf,
                    )
                    / best[p]
                    for p in points
                ]
                ratios[m] = max(per)  # the worst point decides: "auto" must be near the best everywhere
            m = min(ratios, key=ratios.get)
            choice.append((t, m))
            worst.append((ratios[m], kind, t, m))
        rows_out, last = [], None
        for t, m in choice:
            if m != last:
                rows_out.append((0 if last is None else t, m))
                last = m
        table[kind] = tuple(rows_out) or ((0, "sequential"),)
    return backend, table, worst


def main(argv=None):
    args = parse_args(argv)
    if args.auto_table:
        backend, table, worst = auto_table(args.auto_table)
        key = "cpu" if backend == "cpu" else "gpu"
        print(f"# from {' '.join(args.auto_table)}; paste into rnnjax/tuning.py:")
        print(f'AUTO_TABLE["{key}"] = {{')
        for kind in tuning.CELL_KINDS:
            print(f'    "{kind}": {table[kind]!r},')
        print(f'    "chunk_size": {table["chunk_size"]!r},')
        print("}")
        print("# the table's choice / fastest measured, worst points first (kind, T, method):")
        for ratio, kind, t, m in sorted(worst, reverse=True)[:8]:
            print(f"#   {ratio:.3f}  {kind} T={t} {m}")
        bad = [w for w in worst if w[0] > 1.1]
        print(
            "# every measured point within 1.1x of the fastest"
            if not bad
            else f"# {len(bad)} point(s) over 1.1x: there fwd and fwd+bwd, or cells of one kind, disagree on the "
            "fastest method, or the fastest was a configuration auto does not run (another chunk size, "
            "a non-default newton variant)"
        )
        return
    meta = metadata(args)
    print(f"device: {meta['device_kind']} ({meta['backend']}); jax {meta['jax']}", flush=True)
    out = Path(args.out) if args.out else None

    def save(rows):
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        meta["complete"] = False
        out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))

    rows = []
    try:
        sweep(args, save, rows)
    except KeyboardInterrupt:  # timeout -s INT: report what was measured
        print("interrupted: writing what was measured", file=sys.stderr)
    if out is None:
        print(markdown(meta, rows))
        return
    meta["complete"] = not any("budget" in r.get("skipped", "") for r in rows)
    out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(meta, rows))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
