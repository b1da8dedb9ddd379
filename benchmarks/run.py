"""The benchmark suite: rnnjax against Flax, Equinox, PyTorch and causal attention.

    python -m benchmarks.run --quick            # ~3 min on 2 CPU cores
    python -m benchmarks.run --preset gpu       # accelerators (benchmarks/gpu.sh)
    python -m benchmarks.run --tiny             # seconds: checks the suite works

Every system gets the same input (batch-first ``(B, T, D)``, same dtype, same device),
is built once per (cell, mode, T), compiled ahead of time (compile time reported apart),
warmed up once, and timed as the median of ``--repeats`` calls that wait for their
result. Output: ``results.json``, ``results.md``, ``time_memory.png`` and ``time.png``/``memory.png``/
``compile.png`` under ``--out`` (default ``bench-results/<device>-<preset>/``, git-ignored);
the time table is printed at the end.

This module imports JAX only inside :func:`main`, after ``--host-devices`` has set
``XLA_FLAGS``: the flag must be in the environment before JAX starts its CPU backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import output, timing

# Presets. Default shapes are those of the speed targets: B=32, D=H=128, float32.
# quick: T=64..2048 forward, 64..1024 forward+backward (the backward at 2048 would double
#   the run's time). Estimate on 2 cores from the per-step costs at T=1024 (torch/flax/
#   rnnjax ~0.05-0.15 ms per step forward, ~0.15-0.5 ms per step forward+backward): one
#   round over every point (5 cells, rnnjax + remat + flax + equinox + torch + attention)
#   is ~15 s; warm-up + 3-5 timed rounds (the per-point budget keeps large T at 3) ~70 s;
#   ~150 ahead-of-time compiles at 0.2-0.5 s ~50 s; imports, vmap check, plots ~15 s.
#   About 2.5-3 minutes in all.
# full: T=2^6..2^14 everywhere, more repeats; for an accelerator with time to spare.
# gpu: full's lengths, fewer repeats, stops measuring after 6.5 minutes (what is left is
#   reported as skipped) so benchmarks/gpu.sh stays under 8 minutes.
PRESETS: dict[str, dict] = {
    "quick": dict(batch=32, input_size=128, hidden_size=128, dtype="float32",
                  lengths=[2**k for k in range(6, 12)], bwd_max_length=1024,
                  repeats=5, min_repeats=3, point_budget=0.5, vmap_length=256,
                  attention_max_gb=2.0, max_minutes=0.0),
    "full": dict(batch=32, input_size=128, hidden_size=128, dtype="float32",
                 lengths=[2**k for k in range(6, 15)], bwd_max_length=0,
                 repeats=10, min_repeats=5, point_budget=2.0, vmap_length=1024,
                 attention_max_gb=16.0, max_minutes=0.0),
    "gpu": dict(batch=32, input_size=128, hidden_size=128, dtype="float32",
                lengths=[2**k for k in range(6, 15)], bwd_max_length=0,
                repeats=5, min_repeats=3, point_budget=0.5, vmap_length=1024,
                attention_max_gb=24.0, max_minutes=6.5),
}
# --tiny: overrides any preset for a check that the suite runs (seconds, numbers meaningless).
TINY = dict(batch=2, input_size=8, hidden_size=8, lengths=[16, 64], bwd_max_length=0,
            repeats=1, min_repeats=1, point_budget=0.0, vmap_length=16, attention_max_gb=1.0,
            max_minutes=0.0)

MODE_ALIASES = {"fwd": "fwd", "forward": "fwd", "inference": "fwd",
                "fwd+bwd": "fwd+bwd", "fwdbwd": "fwd+bwd", "bwd": "fwd+bwd", "train": "fwd+bwd",
                "grad": "fwd+bwd"}
ALL_CELLS = ("lstm", "gru", "elman", "mingru", "lru")


def _words(values):
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: lists may be given with spaces or commas."""
    return [w for v in values for w in v.split(",") if w]


def _length(text: str) -> int:
    m = re.fullmatch(r"2\^(\d+)", text.strip())
    return 2 ** int(m.group(1)) if m else int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time rnnjax against Flax, Equinox, PyTorch and causal attention over sequence "
                    "length, in one process on one device. Options left unset come from the preset "
                    "(then --tiny); see benchmarks/README.md.",
        epilog="presets: " + "; ".join(
            f"{name}: B={p['batch']} D={p['input_size']} H={p['hidden_size']} {p['dtype']} "
            f"T={p['lengths'][0]}..{p['lengths'][-1]}"
            + (f" (fwd+bwd to {p['bwd_max_length']})" if p["bwd_max_length"] else "")
            + f", repeats {p['min_repeats']}-{p['repeats']}"
            + (f", stops after {p['max_minutes']:g} min" if p["max_minutes"] else "")
            for name, p in PRESETS.items()) + "; --tiny: B=2 D=H=8 T=16,64, 1 repeat.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="defaults for every unset option (default quick)")
    p.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes, 1 repeat: checks that the suite runs (overrides the preset, not explicit options)")
    p.add_argument("--cells", nargs="+", default=["lstm,gru,elman,mingru,lru"], help=f"any of {', '.join(ALL_CELLS)} (default all)")
    p.add_argument("--modes", nargs="+", default=["fwd,fwd+bwd"],
                   help="fwd (inference) and/or fwd+bwd (gradient of sum(outputs) w.r.t. params and inputs; default both)")
    p.add_argument("--systems", nargs="+", default=None,
                   help="from benchmarks.systems.SYSTEMS (default: rnnjax rnnjax-autodiff rnnjax-remat rnnjax-remat-sqrt flax "
                        "equinox torch attention, plus rnnjax-shard with --host-devices > 1, "
                        "rnnjax-vmap at --vmap-length)")
    p.add_argument("--batch", type=int, help="B")
    p.add_argument("--input-size", type=int, help="D")
    p.add_argument("--hidden-size", type=int, help="H (attention: d_model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="inputs and parameters")
    p.add_argument("--lengths", nargs="+", help="sequence lengths T, e.g. 64 128 or 2^6 2^7")
    p.add_argument("--bwd-max-length", type=int, help="longest T for fwd+bwd (0: no limit)")
    p.add_argument("--repeats", type=int, help="timed calls per point, at most")
    p.add_argument("--min-repeats", type=int, help="timed calls per point, at least")
    p.add_argument("--point-budget", type=float,
                   help="seconds of timed calls per point: repeats = budget / warm-up time, clipped to "
                        "[min-repeats, repeats] (0: always --repeats)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing; the first one's time is reported (default 1)")
    p.add_argument("--vmap-length", type=int, help="T of the jax.vmap vs batched check (0: off)")
    p.add_argument("--attention-heads", type=int, default=1, help="heads of the attention reference (default 1)")
    p.add_argument("--attention-max-gb", type=float, help="skip attention past this estimated score memory")
    p.add_argument("--torch-threads", type=int, default=0, help="PyTorch CPU threads (0: all cores)")
    p.add_argument("--tf32", action="store_true",
                   help="on GPU, let JAX and PyTorch use TF32 matrix products (default: full float32 in both)")
    p.add_argument("--host-devices", type=_host_devices, default=1,
                   help="N > 1, or auto (the most CPU cores that divide the batch): sets "
                        "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts and adds the "
                        "rnnjax-shard system (batch split over N CPU devices)")
    p.add_argument("--malloc", choices=["default", "reuse"], default="default",
                   help="glibc's allocator for the whole process, every system alike. reuse: one arena, no mmap, "
                        "no trimming (mallopt before JAX starts), so XLA's per-call buffers reuse memory instead of "
                        "faulting in fresh pages; see benchmarks/README.md, 'The allocator' (default: default)")
    p.add_argument("--max-minutes", type=float, help="stop measuring after this long (0: never); rest is skipped")
    p.add_argument("--check", action="store_true",
                   help="compare every rnnjax variant's outputs/gradients with rnnjax's (one extra call each); "
                        "the largest difference goes in the JSON and the notes")
    p.add_argument("--seed", type=int, default=0, help="inputs and parameters (default 0)")
    p.add_argument("--out", type=Path,
                   help="output folder (default bench-results/<device>-<preset>, git-ignored; name a folder "
                        "under benchmarks/results/ only to refresh a committed reference result)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    return p


def _host_devices(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto, got {n}")
    return n


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset (and --tiny); normalise lists."""
    base = dict(PRESETS[args.preset])
    if args.tiny:
        base.update(TINY)
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.lengths = sorted({_length(t) for t in _words(map(str, args.lengths))})
    args.cells = _words(args.cells)
    bad = [c for c in args.cells if c not in ALL_CELLS]
    if bad:
        raise SystemExit(f"unknown cell(s) {bad}; expected some of {ALL_CELLS}")
    try:
        args.modes = list(dict.fromkeys(MODE_ALIASES[m] for m in _words(args.modes)))
    except KeyError as e:
        raise SystemExit(f"unknown mode {e.args[0]!r}; expected fwd or fwd+bwd") from None
    args.min_repeats = max(1, min(args.min_repeats, args.repeats))
    if args.host_devices == "auto":  # every core, as long as each gets an equal part of the batch
        args.host_devices = max(n for n in range(1, _cpu_count() + 1) if args.batch % n == 0)
    if args.vmap_length and args.vmap_length not in args.lengths:
        args.vmap_length = min(args.lengths, key=lambda t: abs(t - args.vmap_length))
    return args


def set_host_devices(n: int) -> None:
    """Ask XLA for ``n`` CPU devices; must run before JAX initialises its backends."""
    if n <= 1:
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_host_memory() -> str:
    """Make glibc's malloc keep and reuse freed memory, for the whole process.

    XLA:CPU allocates every buffer of a call (temporaries, outputs) afresh. With glibc's
    defaults, blocks above 32 MiB are ``mmap``-ed and returned on free, and each thread
    has its own arena that is trimmed, so every call faults its memory in again, page by
    page (~1 µs per 4 KiB here). One arena, no ``mmap`` and no trimming keep it mapped.
    Must run before JAX (or PyTorch) starts its threads. Returns what was done, for the
    record; changes nothing off glibc.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator left alone"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_MAX, 0), libc.mallopt(_M_TRIM_THRESHOLD, -1)]
    if not all(done):
        return f"mallopt failed ({done}): allocator partly default"
    return "glibc mallopt: M_ARENA_MAX=1 M_MMAP_MAX=0 M_TRIM_THRESHOLD=-1 (never trim)"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _git() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_out(device_kind: str, preset: str) -> Path:
    """``bench-results/<device>-<preset>``: outside the tracked tree (benchmarks.output)."""
    return output.default_out(f"{_slug(device_kind)}-{preset}")


def _leaves(result) -> list:
    import jax
    import numpy as np

    return [np.asarray(a) for a in jax.tree.leaves(result)]


def measure(system, prob, x, args, S, reference: dict | None = None, keep: dict | None = None) -> dict:
    """Build, warm up and time one (system, problem); never raises.

    ``reference``: with ``--check``, rnnjax's result for this problem is stored there
    (system "rnnjax") or compared with (systems that compute the same numbers).
    ``keep``: the built system is stored there under ``"built"`` (for :func:`interleaved`)."""
    rec = {"system": None, "cell": prob.cell, "mode": prob.mode, "T": prob.length, "status": "ok"}
    try:
        built = system.build(prob, x)
    except S.Skip as e:
        return {**rec, "status": "skipped", "note": str(e)}
    except Exception as e:  # noqa: BLE001 -- a peer's failure must not stop the suite; it is reported
        return {**rec, "status": "error", "note": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        first = built.first_call()
        if keep is not None:
            keep["built"] = built
        for _ in range(args.warmup - 1):
            built.run()
        n = args.repeats
        if args.point_budget > 0:
            n = int(min(args.repeats, max(args.min_repeats, args.point_budget // max(first, 1e-9))))
        faults0 = timing.minor_faults()
        times = timing.time_calls(built.run, n)
        faults = None if faults0 is None else (timing.minor_faults() - faults0) / n
        if reference is not None and system.same_as_rnnjax:
            leaves = _leaves(built.run())
            if "leaves" not in reference:
                reference["leaves"] = leaves
            elif len(leaves) != len(reference["leaves"]):
                rec["max_abs_diff_vs_rnnjax"] = float("inf")
            else:
                rec["max_abs_diff_vs_rnnjax"] = max(
                    (float(abs(a.astype("float64") - b.astype("float64")).max()) for a, b
                     in zip(leaves, reference["leaves"]) if a.size), default=0.0)
    except Exception as e:  # noqa: BLE001
        return {**rec, "status": "error", "note": f"{type(e).__name__}: {str(e)[:300]}"}
    med = timing.median(times)
    rec.update(median_s=med, min_s=min(times), times_s=times, repeats=n, per_step_us=med / prob.length * 1e6,
               first_call_s=first, compile_s=built.compile_s, lower_s=built.lower_s,
               memory_bytes=built.memory_bytes, memory_source=built.memory_source,
               memory_detail=built.memory_detail, info=built.info, page_faults_per_call=faults)
    return rec


def interleaved(a, b, rounds: int) -> float | None:
    """Median time of ``b.run()`` over median time of ``a.run()``, the two called in
    alternation (a, b, a, b, ...), so that both see the same machine state. None on error."""
    try:
        times = timing.time_interleaved({"a": a.run, "b": b.run}, rounds)
    except Exception:  # noqa: BLE001 -- a derived figure; the point's own records stand
        return None
    return timing.median(times["b"]) / timing.median(times["a"])


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(parser().parse_args(argv))
    set_host_devices(args.host_devices)
    malloc = reuse_host_memory() if args.malloc == "reuse" else "default"
    # JAX and PyTorch share one GPU: JAX allocates as it needs instead of taking 75% upfront.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    import jax
    import numpy as np

    from benchmarks import report
    from benchmarks import systems as S

    if args.host_devices > 1 and jax.local_device_count() < args.host_devices:
        raise SystemExit(f"--host-devices {args.host_devices}: JAX has {jax.local_device_count()} device(s); "
                         "JAX was initialised before the flag could be set (run as python -m benchmarks.run)")

    names = list(args.systems and _words(args.systems) or S.DEFAULT_SYSTEMS)
    if args.systems is None and args.host_devices > 1:
        at = names.index("rnnjax-autodiff") + 1
        names[at:at] = S.HOST_DEVICE_SYSTEMS
    if args.vmap_length and "rnnjax-vmap" not in names:
        names.append("rnnjax-vmap")
    if args.check and "rnnjax" in names:  # the reference is measured first
        names.remove("rnnjax")
        names.insert(0, "rnnjax")
    unknown = [n for n in names if n not in S.SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; expected some of {sorted(S.SYSTEMS)}")
    registry = dict(S.SYSTEMS)
    registry["attention"] = dataclasses.replace(registry["attention"], heads=args.attention_heads,
                                                max_gb=args.attention_max_gb)
    args.systems = names

    notes: list[str] = []
    active = []
    for name in names:
        why = registry[name].unavailable()
        if why:
            notes.append(f"{name}: not measured: {why}")
        else:
            active.append(name)
        if registry[name].note:
            notes.append(registry[name].note)
    if set(args.cells) & {"mingru", "lru"}:
        notes.append("minGRU and LRU have no peer implementation: only rnnjax variants (and attention) run them")
    if "attention" in names:
        notes.append(f"attention: causal self-attention, d_model={args.hidden_size}, {args.attention_heads} head(s), "
                     "Q/K/V/O projections, jax.nn.dot_product_attention(is_causal=True); one measurement per "
                     "(mode, T), repeated in every cell's rows")

    # Same arithmetic everywhere: off CPU, float32 matrix products are full float32 in JAX
    # and PyTorch alike unless --tf32 (JAX's GPU default would allow TF32, PyTorch's cuDNN too).
    precision = "float32" if jax.default_backend() == "cpu" or not args.tf32 else "tf32-allowed"
    if jax.default_backend() != "cpu" and not args.tf32:
        jax.config.update("jax_default_matmul_precision", "highest")
    torch_threads = None
    if "torch" in active:
        import torch

        torch.set_num_threads(args.torch_threads or _cpu_count())
        torch_threads = torch.get_num_threads()
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.allow_tf32 = bool(args.tf32)

    dev = jax.devices()[0]
    preset = args.preset + ("-tiny" if args.tiny else "")
    out = args.out or default_out(dev.device_kind, preset)
    meta = {
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": jax.device_count()},
        "versions": {"python": platform.python_version(), **S.versions()},
        "cpu_count": _cpu_count(), "cpu_model": _cpu_model(), "torch_threads": torch_threads,
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "malloc": malloc,  # and any allocator settings the process was started with:
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("MALLOC_", "GLIBC_TUNABLES"))},
        "git": _git(), "preset": preset,
        "command": "python -m benchmarks.run " + shlex.join(argv), "argv": argv,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes, "matmul_precision": precision,
    }
    if "torch" in active:
        meta["versions"]["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None

    records: list[dict] = []
    shared: set[tuple] = set()  # (system, mode, T) of cell-independent systems already measured
    start = time.perf_counter()
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    say = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)
    say(f"{dev.platform} {dev.device_kind} x{jax.device_count()}; systems {', '.join(active)}; out {out}")
    rng = np.random.default_rng(args.seed)
    for t in args.lengths:
        x = rng.standard_normal((args.batch, t, args.input_size)).astype(np.float32)
        for cell in args.cells:
            for mode in args.modes:
                if mode == "fwd+bwd" and args.bwd_max_length and t > args.bwd_max_length:
                    continue
                prob = S.Problem(cell, mode, args.batch, t, args.input_size, args.hidden_size, args.dtype, args.seed)
                reference = {} if args.check else None
                kept: dict[str, dict] = {}  # rnnjax and rnnjax-vmap at --vmap-length, for interleaved()
                for name in active:
                    system = registry[name]
                    if cell not in system.cells or mode not in system.modes:
                        continue
                    if system.only_at_vmap_length and t != args.vmap_length:
                        continue
                    if system.cell_independent:
                        if (name, mode, t) in shared:
                            continue
                        shared.add((name, mode, t))
                    if deadline and time.perf_counter() > deadline:
                        rec = {"cell": cell, "mode": mode, "T": t, "status": "skipped",
                               "note": f"--max-minutes {args.max_minutes:g} reached"}
                    else:
                        keep = kept.setdefault(name, {}) if (t == args.vmap_length and name in
                                                             ("rnnjax", "rnnjax-vmap")) else None
                        rec = measure(system, prob, x, args, S, reference if name == "rnnjax" or
                                      "leaves" in (reference or {}) else None, keep)
                    rec["system"] = name
                    if name in kept:
                        kept[name]["rec"] = rec
                    if system.cell_independent:
                        rec["cell"] = "*"
                    records.append(rec)
                    if rec["status"] == "ok":
                        comp = "" if rec["compile_s"] is None else f", compile {rec['compile_s']:.2f} s"
                        if "max_abs_diff_vs_rnnjax" in rec:
                            comp += f", max |diff| vs rnnjax {rec['max_abs_diff_vs_rnnjax']:.2g}"
                        say(f"{cell:6} {mode:7} T={t:<6} {name:14} {rec['median_s'] * 1e3:10.3f} ms "
                            f"(n={rec['repeats']}{comp})")
                    else:
                        say(f"{cell:6} {mode:7} T={t:<6} {name:14} {rec['status']}: {rec.get('note', '')}")
                if all("built" in kept.get(n, {}) for n in ("rnnjax", "rnnjax-vmap")):
                    ratio = interleaved(kept["rnnjax"]["built"], kept["rnnjax-vmap"]["built"], max(2 * args.repeats, 11))
                    kept["rnnjax-vmap"]["rec"]["vmap_over_batched_interleaved"] = ratio
                    if ratio is not None:
                        say(f"{cell:6} {mode:7} T={t:<6} rnnjax-vmap / rnnjax, calls interleaved: {ratio:.3f}")
                kept.clear()
            report.write_all(meta, records, out, plot=False)  # partial results survive an interrupted run
        del x
        gc.collect()  # ~0.2 s with torch and JAX loaded: once per length, not per point
    for rec in records:
        if rec["status"] != "ok":
            note = f"{rec['system']}: {rec['status']} at {rec['cell']} {rec['mode']} T={rec['T']}: {rec.get('note')}"
            notes.append(note)
    diffs = [r for r in records if "max_abs_diff_vs_rnnjax" in r]
    if diffs:
        worst = max(diffs, key=lambda r: r["max_abs_diff_vs_rnnjax"])
        notes.append(f"--check: {len(diffs)} rnnjax-variant results compared with rnnjax's; largest |difference| "
                     f"{worst['max_abs_diff_vs_rnnjax']:.3g} ({worst['system']} {worst['cell']} {worst['mode']} "
                     f"T={worst['T']})")
    if any(r.get("memory_source") == "rss-delta" for r in records):
        notes.append("rss-delta memory is the rise of the whole process's resident memory during the warm-up "
                     "call, sampled every 0.2 ms: approximate, not comparable one-to-one with XLA's analysis")
    try:
        import resource

        meta["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:
        pass
    meta["wall_s"] = time.perf_counter() - start
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    files = report.write_all(meta, records, out, plot=not args.no_plot)
    print(report.headline_table(meta, records))
    print(f"\nEvery system, length and ratio: {files['md']}")
    der = report.derived(meta, records)
    if der["flatness"]:
        print(f"\nrnnjax time-per-step max/min (T >= {report.FLAT_MIN_T}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in der["flatness"].items()))
    if der["vmap_over_batched"]:
        print(f"vmap / batched at T={args.vmap_length} (calls interleaved): "
              + ", ".join(f"{k} {v:.2f}" for k, v in der["vmap_over_batched"].items()))
    print(f"\n{len(records)} measurements in {meta['wall_s']:.0f} s. Files:")
    for path in files.values():
        print(f"  {path}")
    return {"meta": meta, "records": records, "files": files}


if __name__ == "__main__":
    main()
