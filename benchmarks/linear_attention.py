"""Matrix-state recurrences: the step loop vs the chunkwise form vs causal softmax attention.

    python -m benchmarks.linear_attention                       # CPU preset: T = 1k, 4k, 16k (~15 min)
    python -m benchmarks.linear_attention --lengths 4096 --ops gla_head --repeats 5
    python -m benchmarks.linear_attention --preset gpu          # + fla / xLSTM Triton kernels if they import
    python -m benchmarks.linear_attention --tiny                # seconds: checks that everything runs
    python -m benchmarks.linear_attention --malloc reuse        # glibc keeps freed memory between calls
    python -m benchmarks.linear_attention --order isolated      # each row in its own process

Ops (``rj.linear_attention``) at B=2, 4 heads, d_k = d_v = 64, float32 by default:
``gla_head`` (one decay per head: simple GLA, Mamba2's SSD), ``gla_key`` (per key dimension:
GLA), ``mlstm``, ``delta`` (DeltaNet), ``gated_delta`` (Gated DeltaNet: one decay per head),
``rwkv7`` (RWKV-7's DPLR recurrence, inputs made as its time mix makes them). Systems:
``sequential`` (``rj.Sequential()``: the step recurrence under
``lax.scan``, autodiff), ``chunked`` (``rj.Chunked()``, default chunk size), ``chunked-<C>``,
``attention`` (``jax.nn.dot_product_attention(is_causal=True)`` on the same q, k, v), and on a
GPU ``fla`` (``chunk_simple_gla`` / ``chunk_gla`` / ``chunk_delta_rule`` /
``chunk_gated_delta_rule`` / ``chunk_rwkv7``) and ``xlstm`` (``mlstm_kernels``' chunkwise
Triton kernel). Modes: ``fwd`` and ``fwd+bwd`` (gradient of ``sum(o)`` w.r.t. q, k, v and the
gates). Each row: median time over interleaved rounds, compile time, and XLA's compiled peak
memory (arguments + outputs + temporaries). Writes ``results.json`` and ``results.md`` (and
``results.png`` with matplotlib) into ``bench-results/<device>-linear-attention/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing
from benchmarks.output import default_out
from benchmarks.run import reuse_host_memory
from benchmarks.systems import xla_memory

PRESETS = {
    "cpu": dict(lengths=[1024, 4096, 16384], systems=["sequential", "chunked", "attention"], repeats=5),
    "gpu": dict(
        lengths=[1024, 4096, 16384], systems=["sequential", "chunked", "attention", "fla", "xlstm"], repeats=10
    ),
    "tiny": dict(
        lengths=[64], systems=["sequential", "chunked", "chunked-16", "attention"], repeats=2, batch=1, dk=8, dv=8
    ),
}
OPS = ("gla_head", "gla_key", "mlstm", "delta", "gated_delta", "rwkv7")
MODES = ("fwd", "fwd+bwd")


class Skip(Exception):
    """A row that does not run here (a missing peer, too much memory)."""


def inputs(op: str, batch: int, steps: int, heads: int, dk: int, dv: int, dtype) -> tuple:
    """``(q, k, v, *gates)`` as the op takes them, seeded."""
    keys = jax.random.split(jax.random.key(0), 5)
    q, k = (jax.random.normal(keys[i], (batch, steps, heads, dk), dtype) for i in (0, 1))
    v = jax.random.normal(keys[2], (batch, steps, heads, dv), dtype)
    if op == "gla_head":
        return q, k, v, jax.nn.log_sigmoid(4 + jax.random.normal(keys[3], (batch, steps, heads), dtype))
    if op == "gla_key":
        return q, k, v, jax.nn.log_sigmoid(4 + jax.random.normal(keys[3], (batch, steps, heads, dk), dtype)) / 16
    unit = lambda a: a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    if op in ("delta", "gated_delta"):  # L2-normalised keys, beta in (0, 1), as the cells make them
        beta = jax.nn.sigmoid(jax.random.normal(keys[3], (batch, steps, heads), dtype))
        if op == "delta":
            return q, unit(k), v, beta
        return q, unit(k), v, beta, jax.nn.log_sigmoid(4 + jax.random.normal(keys[4], (batch, steps, heads), dtype))
    if op == "rwkv7":  # r, w, k, v, a, b: log w in (-0.607, 0), a = -kk, b = kk * a_gate
        w = -np.exp(-0.5) * jax.nn.sigmoid(jax.random.normal(keys[3], q.shape, dtype))
        kk, gate = unit(k), jax.nn.sigmoid(jax.random.normal(keys[4], q.shape, dtype))
        return q, w, k * (1 - 0.5 * gate), v, -kk, kk * gate
    return (
        q,
        k,
        v,
        jax.random.normal(keys[3], (batch, steps, heads), dtype),
        3 + jax.random.normal(keys[4], (batch, steps, heads), dtype),
    )


def jax_fn(op: str, system: str):
    """``f(*inputs) -> o`` for an rnnjax system or causal attention."""
    if system == "attention":
        if op == "rwkv7":  # r, w, k, v, ...: attention on r, k, v
            return lambda r, w, k, v, *rest: jax.nn.dot_product_attention(r, k, v, is_causal=True)
        return lambda q, k, v, *gates: jax.nn.dot_product_attention(q, k, v, is_causal=True)
    method = (
        rj.Sequential() if system == "sequential" else rj.Chunked(int(system.split("-")[1]) if "-" in system else None)
    )
    if op == "mlstm":
        return lambda q, k, v, i, f: rj.linear_attention.mlstm(q, k, v, i, f, method=method)[0]
    if op in ("delta", "gated_delta"):
        return lambda q, k, v, beta, *g: rj.linear_attention.delta_rule(q, k, v, beta, *g, method=method)[0]
    if op == "rwkv7":
        return lambda r, w, k, v, a, b: rj.linear_attention.rwkv7(r, w, k, v, a, b, method=method)[0]
    return lambda q, k, v, g: rj.linear_attention.gla(q, k, v, g, method=method)[0]


def build_jax(op: str, system: str, mode: str, args: tuple, max_gb: float):
    if system == "attention":
        b, t, h, _ = args[0].shape
        need = b * h * t * t * 4 * (2 if mode == "fwd" else 4)
        if need > max_gb * 2**30:
            raise Skip(f"scores need ~{need / 2**30:.1f} GiB > --max-gb {max_gb:g}")
    fn = forward = jax_fn(op, system)
    if mode == "fwd+bwd":
        fn = jax.grad(lambda *a: jnp.sum(forward(*a).astype(jnp.float32)), argnums=tuple(range(len(args))))
    compiled = timing.compile_ahead(fn, *args)
    return compiled, xla_memory(compiled.executable)[0]


def build_torch(op: str, system: str, mode: str, args: tuple):
    """fla's or xLSTM's Triton kernel on the same numbers (GPU only)."""
    try:
        import torch
    except ImportError as err:
        raise Skip("torch is not installed") from err
    if not torch.cuda.is_available():
        raise Skip("needs a CUDA GPU")
    try:
        if system == "fla":
            if op == "mlstm":
                raise Skip("fla has no mLSTM kernel here: see xlstm")
            from fla.ops.delta_rule import chunk_delta_rule
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule
            from fla.ops.gla import chunk_gla
            from fla.ops.rwkv7 import chunk_rwkv7
            from fla.ops.simple_gla import chunk_simple_gla

            # (B, T, H, D) layout, as rnnjax; the gated delta rule takes (q, k, v, g, beta).
            run = {
                "gla_head": lambda q, k, v, g: chunk_simple_gla(q, k, v, g)[0],
                "gla_key": lambda q, k, v, g: chunk_gla(q, k, v, g)[0],
                "delta": lambda q, k, v, beta: chunk_delta_rule(q, k, v, beta)[0],
                "gated_delta": lambda q, k, v, beta, g: chunk_gated_delta_rule(q, k, v, g, beta)[0],
                "rwkv7": lambda r, w, k, v, a, b: chunk_rwkv7(r, w, k, v, a, b, scale=1.0)[0],
            }[op]
        else:
            if op != "mlstm":
                raise Skip("xLSTM's kernels are mLSTM only")
            from mlstm_kernels.torch.chunkwise import mlstm_chunkwise__xl_chunk

            # (B, H, T, D) layout; returns h.
            run = lambda q, k, v, i, f: mlstm_chunkwise__xl_chunk(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), i.transpose(1, 2), f.transpose(1, 2)
            ).transpose(1, 2)
    except ImportError as err:
        raise Skip(f"{system} does not import: {err}") from err
    tensors = [torch.tensor(np.asarray(a), device="cuda", requires_grad=(mode == "fwd+bwd")) for a in args]

    def call():
        if mode == "fwd":
            with torch.no_grad():
                out = run(*tensors)
        else:
            for t in tensors:
                t.grad = None
            run(*tensors).float().sum().backward()
            out = tensors[0].grad
        torch.cuda.synchronize()
        return out

    torch.cuda.reset_peak_memory_stats()
    return call, torch.cuda.max_memory_allocated


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="--preset tiny")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--systems", nargs="+", help="sequential, chunked, chunked-<C>, attention, fla, xlstm")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int)
    parser.add_argument("--dv", type=int)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip attention rows whose scores need more")
    parser.add_argument(
        "--malloc",
        choices=["default", "reuse"],
        default="default",
        help="reuse: glibc keeps freed memory (benchmarks/README.md, 'The allocator')",
    )
    parser.add_argument(
        "--order",
        choices=["interleaved", "blocks", "isolated"],
        default="interleaved",
        help="interleaved: a, b, c, a, b, c, ... (drift hits all alike); blocks: each system's repeats in a row "
        "(a large program run just before slows the next one: DECISIONS.md); isolated: each row in a fresh "
        "process, as a training loop runs its one program",
    )
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    malloc = reuse_host_memory() if a.malloc == "reuse" else "default"
    preset = PRESETS["tiny" if a.tiny else a.preset]
    lengths, systems = a.lengths or preset["lengths"], a.systems or preset["systems"]
    batch, dk, dv = a.batch or preset.get("batch", 2), a.dk or preset.get("dk", 64), a.dv or preset.get("dv", 64)
    repeats, dtype = a.repeats or preset["repeats"], jnp.dtype(a.dtype)
    env = dict(timing.environment(), malloc=malloc, order=a.order)
    out = a.out or default_out(f"{env['backend']}-linear-attention")
    rows = []
    for op in a.ops:
        for steps in lengths:
            if a.order == "isolated":  # each row's process makes its own inputs
                for mode in a.modes:
                    for system in systems:
                        row = _isolated(a, op, steps, mode, system, batch, dk, dv, repeats)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                continue
            args = inputs(op, batch, steps, a.heads, dk, dv, dtype)
            for mode in a.modes:
                built, notes = {}, {}
                for system in systems:
                    try:
                        if system in ("fla", "xlstm"):
                            call, peak = build_torch(op, system, mode, args)
                            built[system] = (call, peak)
                        else:
                            built[system] = build_jax(op, system, mode, args, a.max_gb)
                    except Skip as why:
                        notes[system] = str(why)
                    except Exception as err:  # noqa: BLE001 - one failing row must not stop the sweep
                        notes[system] = f"failed: {type(err).__name__}: {err}"
                        traceback.print_exc()
                targets = {s: (b[0] if callable(b[0]) else b[0]) for s, b in built.items()}
                if a.order == "blocks":
                    results = {name: timing.measure(t, repeats) for name, t in targets.items()}
                else:
                    results = timing.compare(targets, repeats) if targets else {}
                for system in systems:
                    row = dict(op=op, T=steps, mode=mode, system=system, batch=batch, heads=a.heads, dk=dk, dv=dv)
                    if system in results:
                        r, extra = results[system], built[system][1]
                        peak = extra() if callable(extra) else extra
                        row.update(
                            median_ms=1e3 * r.median_s, compile_s=r.compile_s, peak_mb=peak / 2**20 if peak else None
                        )
                    else:
                        row["note"] = notes.get(system, "")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    (out / "results.md").write_text(table(rows, env))
    plot(rows, out / "results.png")
    print(table(rows, env))
    print(f"wrote {out}/results.json, results.md", file=sys.stderr)
    return 0


def _isolated(a, op: str, steps: int, mode: str, system: str, batch: int, dk: int, dv: int, repeats: int) -> dict:
    """One row measured in a fresh process (``--order blocks`` there): no program run before it
    in the process changes its speed (DECISIONS.md, "The matrix-state benchmark measures each
    row alone")."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "benchmarks.linear_attention", "--order", "blocks", "--ops", op,
                   "--lengths", str(steps), "--modes", mode, "--systems", system, "--batch", str(batch),
                   "--heads", str(a.heads), "--dk", str(dk), "--dv", str(dv), "--dtype", a.dtype,
                   "--repeats", str(repeats), "--max-gb", str(a.max_gb), "--malloc", a.malloc,
                   "--out", tmp]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            return dict(op=op, T=steps, mode=mode, system=system, batch=batch, heads=a.heads, dk=dk, dv=dv,
                        note="failed: " + (done.stderr.strip().splitlines() or ["no output"])[-1])  # fmt: skip
        return json.loads((Path(tmp) / "results.json").read_text())["rows"][0]


def table(rows: list[dict], env: dict) -> str:
    """Markdown: one line per (op, T, mode), time and peak memory per system, and the ratios
    of ``sequential`` and ``attention`` to ``chunked``."""
    systems = list(dict.fromkeys(r["system"] for r in rows))
    head = (
        f"`{env['command']}`\n\n{env['device_kind']} ({env['backend']}), jax {env['jax']}, {env['date']}, "
        f"allocator: {env.get('malloc', 'default')}, order: {env.get('order', 'interleaved')}\n\n"
    )
    cols = " | ".join(f"{s} ms | {s} MiB" for s in systems)
    lines = [
        head + f"| op | T | mode | {cols} | sequential / chunked | attention / chunked |",
        "|" + "---|" * (3 + 2 * len(systems) + 2),
    ]
    keys = list(dict.fromkeys((r["op"], r["T"], r["mode"]) for r in rows))
    for key in keys:
        got = {r["system"]: r for r in rows if (r["op"], r["T"], r["mode"]) == key}
        cells, ms = [], {}
        for s in systems:
            r = got.get(s, {})
            ms[s] = r.get("median_ms")
            cells.append(f"{r['median_ms']:.1f}" if r.get("median_ms") else "skip")
            cells.append(f"{r['peak_mb']:.0f}" if r.get("peak_mb") else "-")
        ratio = lambda s, ms=ms: f"{ms[s] / ms['chunked']:.1f}x" if ms.get(s) and ms.get("chunked") else "-"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | "
            + " | ".join(cells)
            + f" | {ratio('sequential')} | {ratio('attention')} |"
        )
    notes = sorted({f"{r['system']}: {r['note']}" for r in rows if r.get("note")})
    return "\n".join(lines) + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(dict.fromkeys((r["op"], r["mode"]) for r in rows))
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, (op, mode) in zip(axes[0], keys):
        for system in dict.fromkeys(r["system"] for r in rows):
            pts = [
                (r["T"], r["median_ms"])
                for r in rows
                if (r["op"], r["mode"], r["system"]) == (op, mode, system) and r.get("median_ms")
            ]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=system)
        ax.set_title(f"{op} {mode}")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
