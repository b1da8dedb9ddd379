"""Drift of rj.Mixed (bfloat16 / float16 compute, float32 parameters and carry) from float32.

For every cell: one set of float32 parameters (the cell's default init) and one batch of
standard-normal inputs; ``rj.scan`` over them in float32 (the reference) and wrapped in
``rj.Mixed`` with each variant: compute bfloat16 or float16, carry float32, and
``carry_mode="keep"`` (the step sees the float32 carry: products in the compute dtype,
the carry's elementwise update in float32) or ``"round"`` (the carry rounded to the compute
dtype for the step, its increment added to the float32 carry). Outputs are compared step
by step with the reference:

    e_t = ||y_t - y_t^ref|| / ||y_t^ref||      (2-norms over batch and features)

reported at t = 100, 1000, 10000 (1-based steps, those <= T), as the mean and the max over
all t, and likewise for the final carry (all leaves together). Mixed outputs are cast to
float32 (float64 in the comparison) before the difference.

The summary gives, per compute dtype, the geometric mean over cells of the ratio of the
two modes' mean output errors (keep / round; < 1: keep is closer to float32).

    python -m benchmarks.lab.precision_drift                   # T=10000, B=8, H=64: ~1-2 min on 2 CPU cores
    python -m benchmarks.lab.precision_drift --tiny --out /tmp/drift   # seconds: checks that it runs
    python -m benchmarks.lab.precision_drift --round-products --variants bf16-keep,f16-keep --out /tmp/rp

``--round-products`` is an experiment on the library's internals: it makes the autocast
products of ``carry_mode="keep"`` (``rnnjax.ops.matmul`` and ``conv``: 16-bit weights, a
wider operand) return the 16-bit dtype instead of float32, to measure what their float32
result buys.

Writes ``OUT/precision_drift.json`` and ``OUT/precision_drift.md`` (``--out``, default
``bench-results/precision-drift``, git-ignored) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
import rnnjax.cell
import rnnjax.ops

if not __package__:  # run as a file (python benchmarks/lab/<name>.py): `benchmarks` is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import output, timing  # noqa: E402

CONV_SPATIAL = (4, 4)  # ConvLSTM frames (H, W); its width is capped by --conv-hidden

CELLS = {
    "lstm": rj.LSTM,
    "gru": rj.GRU,
    "elman": rj.Elman,
    "mgu": rj.MGU,
    "indrnn": rj.IndRNN,
    "mingru": rj.MinGRU,
    "minlstm": rj.MinLSTM,
    "lru": rj.LRU,
    "convlstm": lambda h: rj.ConvLSTM(h, kernel_size=3),
}

VARIANTS = {  # name -> (compute dtype, carry_mode)
    "bf16-keep": ("bfloat16", "keep"),
    "bf16-round": ("bfloat16", "round"),
    "f16-keep": ("float16", "keep"),
    "f16-round": ("float16", "round"),
}

REPORT_AT = (100, 1000, 10000)
DEFAULTS = dict(length=10_000, batch=8, hidden_size=64, input_size=64, conv_hidden=8)
TINY = dict(length=150, batch=2, hidden_size=8, input_size=8, conv_hidden=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.precision_drift", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, any of {', '.join(CELLS)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, any of {', '.join(VARIANTS)}")
    p.add_argument("--length", type=int, help="T (default 10000)")
    p.add_argument("--batch", type=int, help="B (default 8)")
    p.add_argument("--hidden-size", type=int, help="H (default 64)")
    p.add_argument("--input-size", type=int, help="D (default 64; LRU's output size too)")
    p.add_argument("--conv-hidden", type=int,
                   help="ConvLSTM filters and input channels (default 8; 4x4 frames), so it stays cheap on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-products", action="store_true",
                   help="experiment: autocast products return the 16-bit dtype instead of float32")
    p.add_argument("--tiny", action="store_true",
                   help="T=150, B=2, H=D=8, ConvLSTM 4: checks that the script runs (explicit options win)")
    p.add_argument("--out", type=Path, default=output.default_out("precision-drift"),
                   help="output folder (default bench-results/precision-drift, git-ignored)")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.cells = [c for c in args.cells.split(",") if c]
    args.variants = [v for v in args.variants.split(",") if v]
    for name, known in (("cell", CELLS), ("variant", VARIANTS)):
        bad = [c for c in getattr(args, name + "s") if c not in known]
        if bad:
            p.error(f"unknown {name}(s) {bad}; expected some of {list(known)}")
    return args


def relative_errors(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``e_t`` for time-major ``(T, ...)`` arrays: the norm of the difference over the norm of
    the reference, per step (0/0 counts as 0)."""
    steps = ref.shape[0]
    diff = np.linalg.norm((y - ref).reshape(steps, -1), axis=1)
    norm = np.linalg.norm(ref.reshape(steps, -1), axis=1)
    return np.where(norm > 0, diff / np.where(norm > 0, norm, 1.0), np.where(diff > 0, np.inf, 0.0))


def carry_vector(carry) -> np.ndarray:
    parts = []
    for leaf in jax.tree.leaves(carry):
        leaf = np.asarray(leaf)
        if np.iscomplexobj(leaf):
            parts += [leaf.real.ravel(), leaf.imag.ravel()]
        else:
            parts.append(leaf.astype(np.float64).ravel())
    return np.concatenate(parts).astype(np.float64)


def run_cell(name: str, args) -> list[dict]:
    conv = name == "convlstm"
    hidden = args.conv_hidden if conv else args.hidden_size
    d = args.conv_hidden if conv else args.input_size
    cell = CELLS[name](hidden)
    kp, kx = jax.random.split(jax.random.key(args.seed))
    params = cell.init(kp, d)
    shape = (args.batch, args.length, *CONV_SPATIAL, d) if conv else (args.batch, args.length, d)
    xs = jax.random.normal(kx, shape, jnp.float32)

    def run(c):
        (ys, carry), seconds = timing.timed_call(timing.blocking(rj.scan, c, params, xs))  # compile included
        ys = np.moveaxis(np.asarray(ys.astype(jnp.float32), np.float64), 1, 0)  # (T, B, ...)
        return ys, carry_vector(carry), seconds, jax.tree.map(lambda a: str(a.dtype), carry)

    ref_y, ref_c, ref_s, _ = run(cell)
    rows = []
    for variant in args.variants:
        compute, mode = VARIANTS[variant]
        y, c, seconds, carry_dtypes = run(rj.Mixed(cell, compute_dtype=compute, carry_dtype=jnp.float32,
                                                   carry_mode=mode))
        e = relative_errors(y, ref_y)
        c_norm = np.linalg.norm(ref_c)
        rows.append(dict(
            cell=name, variant=variant, compute_dtype=compute, carry_mode=mode, T=args.length,
            batch=args.batch, hidden=hidden, input_size=d,
            at={t: float(e[t - 1]) for t in REPORT_AT if t <= args.length},
            mean=float(e.mean()), max=float(e.max()),
            final_carry=float(np.linalg.norm(c - ref_c) / c_norm) if c_norm > 0 else float(np.linalg.norm(c)),
            finite=bool(np.isfinite(y).all() and np.isfinite(c).all()),
            carry_dtypes=carry_dtypes, wall_s_incl_compile=seconds, reference_wall_s_incl_compile=ref_s,
        ))
        print(f"{name:9} {variant:11} mean {rows[-1]['mean']:.2e} max {rows[-1]['max']:.2e} "
              f"final carry {rows[-1]['final_carry']:.2e} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    """Per compute dtype: the geometric mean over cells of (keep's mean error) / (round's
    mean error), and on how many cells keep was closer."""

    def keep_over_round(pairs, key):
        return [p["keep"][key] / p["round"][key] for p in pairs.values()
                if "keep" in p and "round" in p and p["keep"][key] > 0 and p["round"][key] > 0]

    out = {}
    for dtype in sorted({r["compute_dtype"] for r in rows}):
        pairs = {}
        for r in rows:
            if r["compute_dtype"] == dtype:
                pairs.setdefault(r["cell"], {})[r["carry_mode"]] = r
        ratios, carry = keep_over_round(pairs, "mean"), keep_over_round(pairs, "final_carry")
        if ratios:
            out[dtype] = dict(
                cells=len(ratios),
                keep_closer=sum(r < 1 for r in ratios),
                equal=sum(r == 1 for r in ratios),
                geomean_mean_error_ratio=float(np.exp(np.mean(np.log(ratios)))),
                geomean_final_carry_ratio=float(np.exp(np.mean(np.log(carry)))) if carry else None,
            )
    return out


def markdown(meta: dict, rows: list[dict], summ: dict) -> str:
    cfg = meta["options"]
    at = [t for t in REPORT_AT if t <= cfg["length"]]
    lines = [
        f"# rj.Mixed drift from float32 (T={cfg['length']}, B={cfg['batch']}, H={cfg['hidden_size']}, "
        f"D={cfg['input_size']})",
        "",
        f"{meta['device_kind']} ({meta['backend']}), jax {meta['jax']}, {meta['date']}. "
        f"`{meta['command']}`" + (" **Experiment: autocast products rounded to the 16-bit dtype.**"
                                   if cfg.get("round_products") else ""),
        "",
        "Relative error of the outputs, e_t = ||y_t - y_t^f32|| / ||y_t^f32|| over batch and features, at step t, "
        "its mean and max over all steps, and of the final carry. Parameters and carry float32; "
        "`-keep` / `-round`: `carry_mode=\"keep\"` / `\"round\"`.",
        "",
        "| cell | variant | " + " | ".join(f"t={t}" for t in at) + " | mean | max | final carry |",
        "|---|---|" + "---:|" * (len(at) + 3),
    ]
    for r in rows:
        cells = [f"{r['at'][t]:.2e}" for t in at] + [f"{r['mean']:.2e}", f"{r['max']:.2e}", f"{r['final_carry']:.2e}"]
        flag = "" if r["finite"] else " (non-finite!)"
        lines.append(f"| {r['cell']} | {r['variant']}{flag} | " + " | ".join(cells) + " |")
    if summ:
        lines += ["", "keep vs round (geometric mean over cells of the ratio of errors, keep / round; < 1: keep closer):",
                  ""]
        for dtype, s in summ.items():
            carry = "" if s["geomean_final_carry_ratio"] is None else f", final carry x{s['geomean_final_carry_ratio']:.3f}"
            lines.append(f"- {dtype}: mean output error x{s['geomean_mean_error_ratio']:.3f}{carry}; keep "
                         f"closer on {s['keep_closer']} of {s['cells']} cells, equal on {s['equal']}")
    notes = {r["cell"]: r for r in rows if r["cell"] == "convlstm"}
    if notes:
        r = notes["convlstm"]
        lines += ["", f"ConvLSTM: {CONV_SPATIAL[0]}x{CONV_SPATIAL[1]} frames, {r['input_size']} input channels, "
                      f"{r['hidden']} filters (--conv-hidden)."]
    return "\n".join(lines) + "\n"


def metadata(args, argv) -> dict:
    device = jax.devices()[0]
    import jaxlib

    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(["python -m benchmarks.lab.precision_drift", *argv]),
        backend=jax.default_backend(), device=str(device), device_kind=device.device_kind,
        jax=jax.__version__, jaxlib=jaxlib.__version__, rnnjax=rj.__version__, numpy=np.__version__,
        python=platform.python_version(), cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )


@contextlib.contextmanager
def rounded_products():
    """Within: the cells' autocast products (``rnnjax.ops.matmul``, ``conv``) round their
    float32 result to the 16-bit weights' dtype. Patches the names the cell modules imported;
    clears jax's caches on entry and exit so that no trace crosses the boundary."""

    def rounding(fn):
        def wrapped(a, w, *rest):
            out = fn(a, w, *rest)
            half = jnp.result_type(w) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            return out.astype(w.dtype) if half and out.dtype != w.dtype else out

        return wrapped

    jax.clear_caches()  # no trace made before is reused inside
    patched = []
    originals = {attr: getattr(rnnjax.ops, attr) for attr in ("matmul", "conv")}
    # rnnjax.cell too: DenseCell.step makes the products of Elman, LSTM and GRU there.
    modules = [rnnjax.cell] + [m for name, m in sys.modules.items() if name.startswith("rnnjax.cells.")]
    for module in modules:
        for attr, original in originals.items():
            if getattr(module, attr, None) is original:
                patched.append((module, attr, original))
                setattr(module, attr, rounding(original))
    try:
        yield
    finally:
        for module, attr, original in patched:
            setattr(module, attr, original)
        jax.clear_caches()


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    meta = metadata(args, argv)
    start = time.perf_counter()
    with rounded_products() if args.round_products else contextlib.nullcontext():
        rows = [row for name in args.cells for row in run_cell(name, args)]
    meta["wall_s"] = time.perf_counter() - start
    summ = summary(rows)
    text = markdown(meta, rows, summ)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / "precision_drift.json", args.out / "precision_drift.md"
    json_path.write_text(json.dumps(dict(meta=meta, rows=rows, summary=summ), indent=1, default=str))
    md_path.write_text(text)
    print(text)
    print(f"wrote {json_path}, {md_path}")
    return dict(meta=meta, rows=rows, summary=summ, files=dict(json=json_path, md=md_path))


if __name__ == "__main__":
    main()
