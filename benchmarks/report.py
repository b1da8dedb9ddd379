"""Derived figures, the Markdown report and the PNG plots of a benchmark run.

Pure functions of the run's ``meta`` and ``records`` (the JSON file's content), so a
report can be rebuilt from a JSON file: ``python -m benchmarks.report results.json``.
No JAX import here.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

CELL_NAMES = {"lstm": "LSTM", "gru": "GRU", "elman": "Elman", "mingru": "minGRU", "lru": "LRU"}
FLAT_MIN_T = 256  # time-per-step flatness is taken over T >= this


def measured(meta: dict, records: list[dict]) -> list[str]:
    """The configured systems that have at least one record, in order (vmap check apart)."""
    have = {r["system"] for r in records}
    return [s for s in meta["config"]["systems"] if s in have and s != "rnnjax-vmap"]


def lookup(records: list[dict]) -> dict[tuple, dict]:
    """(system, cell, mode, T) -> record; cell-independent systems under every cell."""
    table = {}
    cells = {r["cell"] for r in records if r.get("cell") not in (None, "*")}
    for r in records:
        if r.get("cell") == "*":
            for c in cells:
                table[(r["system"], c, r["mode"], r["T"])] = r
        else:
            table[(r["system"], r["cell"], r["mode"], r["T"])] = r
    return table


def ok(rec: dict | None) -> bool:
    return bool(rec) and rec.get("status") == "ok"


def derived(meta: dict, records: list[dict]) -> dict:
    """Flatness of rnnjax's time per step, compile time vs T, vmap / batched ratio."""
    cfg = meta["config"]
    table = lookup(records)
    out: dict = {"flatness": {}, "compile_s": {}, "vmap_over_batched": {}}
    for cell in cfg["cells"]:
        for mode in cfg["modes"]:
            key = f"{cell} {mode}"
            per_step = [table[("rnnjax", cell, mode, t)]["per_step_us"] for t in cfg["lengths"]
                        if t >= FLAT_MIN_T and ok(table.get(("rnnjax", cell, mode, t)))]
            if len(per_step) >= 2:
                out["flatness"][key] = max(per_step) / min(per_step)
            for system in cfg["systems"]:
                comp = {t: table[(system, cell, mode, t)]["compile_s"] for t in cfg["lengths"]
                        if ok(table.get((system, cell, mode, t)))
                        and table[(system, cell, mode, t)].get("compile_s") is not None}
                if comp:
                    out["compile_s"].setdefault(key, {})[system] = comp
            t = cfg.get("vmap_length")
            a, b = table.get(("rnnjax-vmap", cell, mode, t)), table.get(("rnnjax", cell, mode, t))
            if ok(a) and ok(b):
                # Interleaved calls where measured (same machine state for both), else the two medians.
                ratio = a.get("vmap_over_batched_interleaved")
                out["vmap_over_batched"][key] = ratio if ratio is not None else a["median_s"] / b["median_s"]
    return out


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _cell_value(rec: dict | None, field: str = "median_s") -> str:
    if rec is None:
        return "—"
    if rec.get("status") != "ok":
        return "skip" if rec.get("status") == "skipped" else "error"
    if field == "median_s":
        return _fmt_ms(rec["median_s"])
    if field == "memory":
        b = rec.get("memory_bytes")
        return "—" if b is None else f"{b / 2**20:.3g}"
    if field == "faults":
        f = rec.get("page_faults_per_call")
        return "—" if f is None else f"{f:.3g}"
    raise ValueError(field)


# The rnnjax configurations the time table gives ratios to PyTorch and Flax for, when measured.
RATIO_SYSTEMS = ("rnnjax", "rnnjax-autodiff", "rnnjax-shard")


def _ratio(table, cell, mode, t, other, system="rnnjax") -> str:
    a, b = table.get((system, cell, mode, t)), table.get((other, cell, mode, t))
    if ok(a) and ok(b):
        return f"{a['median_s'] / b['median_s']:.3g}"
    return "—"


def _header(head: list[str]) -> list[str]:
    """A Markdown header: three left-aligned key columns, the rest right-aligned numbers."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]


def _points(cfg: dict, table: dict, systems: list[str]):
    """``(cell, mode, T, records)`` for every configured point where some system has a result."""
    for cell in cfg["cells"]:
        for mode in cfg["modes"]:
            for t in cfg["lengths"]:
                recs = [table.get((s, cell, mode, t)) for s in systems]
                if any(ok(r) for r in recs):
                    yield cell, mode, t, recs


def time_table(meta: dict, records: list[dict]) -> str:
    """Rows cell × mode × T; columns each system's median ms, then X/torch and X/flax for
    every measured X of :data:`RATIO_SYSTEMS` (rnnjax always), and rnnjax's µs per step."""
    cfg = meta["config"]
    table = lookup(records)
    systems = measured(meta, records)
    ratios = [s for s in RATIO_SYSTEMS if s == "rnnjax" or s in systems]
    head = ["cell", "mode", "T", *systems, *(f"{s}/{o}" for s in ratios for o in ("torch", "flax")), "rnnjax µs/step"]
    lines = _header(head)
    for cell, mode, t, recs in _points(cfg, table, systems):
        row = [CELL_NAMES.get(cell, cell), mode, str(t), *(_cell_value(r) for r in recs),
               *(_ratio(table, cell, mode, t, o, s) for s in ratios for o in ("torch", "flax")),
               f"{table[('rnnjax', cell, mode, t)]['per_step_us']:.3g}"
               if ok(table.get(("rnnjax", cell, mode, t))) else "—"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


HEADLINE_T = 1024  # the headline table's sequence length (the longest measured when absent)
PEERS = ("flax", "torch")


def headline_table(meta: dict, records: list[dict]) -> str:
    """One row per cell × mode at T = :data:`HEADLINE_T`: rnnjax's default, its fastest
    measured configuration (named), each peer of :data:`PEERS`, and both rnnjax columns over
    the faster peer. What ``python -m benchmarks.run`` prints; the full table is ``results.md``."""
    cfg = meta["config"]
    table = lookup(records)
    lengths = [t for t in cfg["lengths"] if any(ok(r) and r["T"] == t for r in records)]
    if not lengths:
        return "(no measurement)"
    t = HEADLINE_T if HEADLINE_T in lengths else max(lengths)
    ours = [s for s in measured(meta, records) if s.startswith("rnnjax")]
    lines = [f"T = {t} (ms, median; ratio < 1: rnnjax is faster than the faster peer)", "",
             "| cell | mode | rnnjax | fastest rnnjax (which) | flax | torch | rnnjax/peer | fastest/peer |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for cell in cfg["cells"]:
        for mode in cfg["modes"]:
            default = table.get(("rnnjax", cell, mode, t))
            mine = [(table[(s, cell, mode, t)]["median_s"], s) for s in ours if ok(table.get((s, cell, mode, t)))]
            peers = [table[(p, cell, mode, t)]["median_s"] for p in PEERS if ok(table.get((p, cell, mode, t)))]
            if not mine:
                continue
            best_s, best = min(mine)
            peer = min(peers) if peers else None
            ratio = lambda x: "—" if x is None or peer is None else f"{x / peer:.2f}"
            default_s = default["median_s"] if ok(default) else None
            lines.append("| " + " | ".join([
                CELL_NAMES.get(cell, cell), mode, _fmt_ms(default_s), f"{_fmt_ms(best_s)} ({best})",
                *(_cell_value(table.get((p, cell, mode, t))) for p in PEERS), ratio(default_s), ratio(best_s),
            ]) + " |")
    return "\n".join(lines)


def _value_table(meta: dict, records: list[dict], field: str, label=lambda system: system) -> str:
    """Rows cell × mode × T, one column per measured system: ``_cell_value(record, field)``."""
    cfg = meta["config"]
    table = lookup(records)
    systems = measured(meta, records)
    lines = _header(["cell", "mode", "T", *(label(s) for s in systems)])
    for cell, mode, t, recs in _points(cfg, table, systems):
        lines.append("| " + " | ".join([CELL_NAMES.get(cell, cell), mode, str(t),
                                        *(_cell_value(r, field) for r in recs)]) + " |")
    return "\n".join(lines)


def fault_table(meta: dict, records: list[dict]) -> str:
    """Minor page faults per timed call (memory the process touched for the first time)."""
    return _value_table(meta, records, "faults")


def memory_table(meta: dict, records: list[dict]) -> str:
    """Peak MiB; each column names its memory source."""
    sources = {}
    for r in records:
        if ok(r) and r.get("memory_source"):
            sources.setdefault(r["system"], set()).add(r["memory_source"])
    return _value_table(meta, records, "memory",
                        lambda s: f"{s} ({'/'.join(sorted(sources.get(s, {'n/a'})))})")


def header(meta: dict) -> str:
    cfg, dev, v = meta["config"], meta["device"], meta["versions"]
    vers = ", ".join(f"{k} {x}" for k, x in v.items() if x)
    torch = f"; torch threads {meta['torch_threads']}" if meta.get("torch_threads") else ""
    malloc = meta.get("malloc") or "default"
    if meta.get("malloc_env"):
        malloc += " (environment: " + " ".join(f"{k}={v}" for k, v in meta["malloc_env"].items()) + ")"
    return (
        f"# rnnjax benchmark: {dev['kind']} ({dev['platform']}, {dev['count']} device(s)), preset {meta['preset']}\n\n"
        f"- shapes: batch {cfg['batch']}, input {cfg['input_size']}, hidden {cfg['hidden_size']}, "
        f"{cfg['dtype']} (matrix products: {meta.get('matmul_precision', '?')}), batch-first (B, T, D); "
        f"same input for every system\n"
        f"- CPUs: {meta['cpu_count']} ({meta.get('cpu_model') or '?'}){torch}; XLA_FLAGS={meta.get('xla_flags') or ''!r}; "
        f"allocator: {malloc}\n"
        f"- {vers}\n"
        f"- time: median of up to {cfg['repeats']} runs after a warm-up call (per-point counts in the JSON); "
        f"compile time excluded and reported apart; fwd+bwd = gradient of sum(outputs) w.r.t. params and inputs\n"
        f"- command: `{meta['command']}`\n"
    )


def markdown(meta: dict, records: list[dict], der: dict | None = None) -> str:
    der = derived(meta, records) if der is None else der
    parts = [header(meta), "## Headline\n", headline_table(meta, records), "",
             "## Time per batch of sequences (ms, median)\n",
             "Ratios below 1 mean rnnjax is faster.\n", time_table(meta, records), "",
             "## Peak memory (MiB)\n",
             ("xla-memory-analysis: argument + output + temp bytes of the compiled executable "
              "(-per-device: one device's share of a program sharded over several); "
              "rss-delta: sampled rise of the process's resident memory during the warm-up call "
              "(approximate); torch-cuda-max-allocated: PyTorch's peak allocation.\n"),
             memory_table(meta, records), ""]
    if any(ok(r) and r.get("page_faults_per_call") is not None for r in records):
        parts += ["## Page faults per call\n",
                  ("Minor page faults of the process during the timed calls, per call: memory touched "
                   "for the first time (about 1 µs per 4 KiB page on the machine of the committed CPU "
                   "results). Large counts mean the allocator handed out fresh pages; see --malloc.\n"),
                  fault_table(meta, records), ""]
    if der["compile_s"]:
        cfg = meta["config"]
        parts += ["## Compile time (s: trace + lower + compile)\n",
                  "| cell | mode | system | " + " | ".join(f"T={t}" for t in cfg["lengths"]) + " |",
                  "|---|---|---|" + "---:|" * len(cfg["lengths"])]
        for key, per_system in der["compile_s"].items():
            cell, mode = key.split(" ")
            for system, comp in per_system.items():
                vals = [f"{comp[t]:.2f}" if t in comp else "—" for t in cfg["lengths"]]
                parts.append(f"| {CELL_NAMES.get(cell, cell)} | {mode} | {system} | " + " | ".join(vals) + " |")
        parts.append("")
    parts.append("## Derived\n")
    if der["flatness"]:
        parts.append(f"- rnnjax time per step, max/min over T >= {FLAT_MIN_T}: " + ", ".join(
            f"{k} {x:.2f}" for k, x in der["flatness"].items()))
    if der["vmap_over_batched"]:
        parts.append(f"- jax.vmap over single sequences / batched call, rnnjax at T={meta['config']['vmap_length']} "
                     "(medians of calls interleaved with each other): "
                     + ", ".join(f"{k} {x:.2f}" for k, x in der["vmap_over_batched"].items()))
    parts += ["", "## Notes\n", *(f"- {n}" for n in meta.get("notes", [])), ""]
    return "\n".join(parts)


def _draw(ax, cfg, table, systems, cell, mode, field, labels=None) -> bool:
    """One log-log panel: ``field(record)`` vs T for every system; whether anything was drawn."""
    drawn = False
    for k, system in enumerate(systems):
        pts = [(t, table[(system, cell, mode, t)]) for t in cfg["lengths"] if ok(table.get((system, cell, mode, t)))]
        pts = [(t, field(r)) for t, r in pts if field(r) is not None and field(r) > 0]
        if not pts:
            continue
        style = "--" if system == "attention" else ("-" if system.startswith("rnnjax") else ":")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                label=(labels or {}).get(system, system), color=f"C{k}")
        drawn = True
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return drawn


def _figure(rows: int, cols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows), squeeze=False, sharex=True)
    return plt, fig, axes


def _save(plt, fig, path, title):
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _grid(meta, records, field, ylabel, path, title, systems=None, labels=None):
    """One panel per (cell, mode): rows cells, columns modes."""
    cfg = meta["config"]
    table = lookup(records)
    systems = systems or measured(meta, records)
    cells, modes = cfg["cells"], cfg["modes"]
    plt, fig, axes = _figure(len(cells), len(modes))
    drawn = False
    for i, cell in enumerate(cells):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            drawn |= _draw(ax, cfg, table, systems, cell, mode, field, labels)
            ax.set_title(f"{CELL_NAMES.get(cell, cell)} {mode}", fontsize=10)
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == len(cells) - 1:
                ax.set_xlabel("sequence length T")
    _save(plt, fig, path, title)
    return drawn


def _time_and_memory(meta, records, path, title, mem_labels):
    """One row per (cell, mode): time per batch vs T, and beside it peak memory vs T."""
    cfg = meta["config"]
    table = lookup(records)
    systems = measured(meta, records)
    rows = [(c, m) for c in cfg["cells"] for m in cfg["modes"]]
    plt, fig, axes = _figure(len(rows), 2)
    for i, (cell, mode) in enumerate(rows):
        name = f"{CELL_NAMES.get(cell, cell)} {mode}"
        _draw(axes[i][0], cfg, table, systems, cell, mode, lambda r: r["median_s"] * 1e3)
        _draw(axes[i][1], cfg, table, systems, cell, mode, _memory_mib, mem_labels)
        axes[i][0].set(title=f"{name}: time", ylabel="ms per batch (median)")
        axes[i][1].set(title=f"{name}: peak memory", ylabel="MiB")
    for ax in axes[-1]:
        ax.set_xlabel("sequence length T")
    _save(plt, fig, path, title)


def _memory_mib(rec: dict) -> float | None:
    return None if rec.get("memory_bytes") is None else rec["memory_bytes"] / 2**20


def plots(meta: dict, records: list[dict], out: Path) -> list[Path]:
    """time_memory.png (per cell and mode: ms per batch vs T beside peak MiB vs T), and the
    same figures one grid each: time.png, memory.png, plus compile.png (s vs T)."""
    cfg = meta["config"]
    dev = meta["device"]["kind"]
    sub = f"{dev}, B={cfg['batch']}, D={cfg['input_size']}, H={cfg['hidden_size']}, {cfg['dtype']}"
    mem_src = {r["system"]: r["memory_source"] for r in records if ok(r) and r.get("memory_source")}
    mem_labels = {s: f"{s} ({m})" for s, m in mem_src.items() if m != "xla-memory-analysis"}
    paths = [out / "time_memory.png", out / "time.png", out / "memory.png", out / "compile.png"]
    _time_and_memory(meta, records, paths[0], f"Time and peak memory vs T ({sub}; memory: XLA memory "
                     "analysis unless labelled)", mem_labels)
    _grid(meta, records, lambda r: r["median_s"] * 1e3, "ms per batch (median)", paths[1],
          f"Time per batch of sequences vs T ({sub})")
    _grid(meta, records, _memory_mib, "peak MiB", paths[2],
          f"Peak memory vs T, XLA memory analysis unless labelled ({sub})", labels=mem_labels)
    _grid(meta, records, lambda r: r.get("compile_s"), "compile s", paths[3],
          f"Compile time (trace + lower + compile) vs T ({sub})")
    return paths


def write_all(meta: dict, records: list[dict], out: Path, plot: bool = True) -> dict[str, Path]:
    """Write results.json, results.md and the PNGs into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    der = derived(meta, records)
    files = {"json": out / "results.json", "md": out / "results.md"}
    files["json"].write_text(json.dumps({"meta": meta, "derived": _jsonable(der), "records": records},
                                        indent=1, default=str))
    files["md"].write_text(markdown(meta, records, der))
    if plot:
        for p in plots(meta, records, out):
            files[p.stem] = p
    return files


def _jsonable(der: dict) -> dict:
    return json.loads(json.dumps(der, default=str))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def main(argv=None) -> None:
    """Rebuild results.md and the plots from a results.json."""
    path = Path((argv or sys.argv[1:])[0])
    data = json.loads(path.read_text())
    meta, records = data["meta"], data["records"]
    for r in records:  # JSON object keys of derived figures are strings; records are fine
        r["T"] = int(r["T"])
    files = write_all(meta, records, path.parent)
    print("\n".join(f"{k}: {v}" for k, v in files.items()))


if __name__ == "__main__":
    main()
