"""Generation from the recurrent state vs attention's KV cache: prefill a prompt, then decode.

    python -m benchmarks.generation                  # CPU preset: contexts 1k, 8k, 32k, 14 mixers (~10 min, 2 cores)
    python -m benchmarks.generation --preset gpu     # contexts up to 128k, wider model, larger batch
    python -m benchmarks.generation --mixers attention gated_deltanet lstm --contexts 1024 8192
    python -m benchmarks.generation --tiny           # seconds: checks that everything runs

The model is :mod:`benchmarks.mixers` (embedding, ``layers`` blocks of mixer + MLP, readout),
every mixer at the same parameter count, float32. For each context ``T`` (a prompt of ``T``
random tokens) and mixer:

- **prefill**: :func:`benchmarks.mixers.prefill` on the prompt, the cells' parallel methods
  (chunkwise for the matrix-state cells, associative scans for the diagonal ones, the step
  loop for the dense ones), causal attention over the prompt in blocks of queries
  (``--attention-block``) that fills a KV cache of ``T + new_tokens`` steps. Median time;
  repeats fit ``--prefill-budget`` seconds (at least one after the warm-up call).
- **decode**: ``new_tokens`` greedy tokens by :func:`benchmarks.mixers.decode_step` under
  ``lax.scan``, in one jitted call compiled ahead, the caches donated (the call updates them in
  place and returns them, as a generation loop would). Tokens per second (batch x new tokens /
  median time), interleaved rounds over all mixers of a context.
- **memory**: the bytes of the caches after prefill (each layer's carry, or attention's keys
  and values), and XLA's compiled memory analysis of the decode call and of the prefill
  (arguments + outputs + temporaries - aliased). A recurrent mixer's cache and decode memory
  do not depend on ``T``; attention's grow with it.

Writes ``results.json``, ``results.md`` and ``results.png`` (tokens per second and decode
memory vs context) into ``bench-results/generation/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import mixers, timing
from benchmarks.output import default_out
from benchmarks.systems import xla_memory

# attention_block: one block's scores are batch x heads x block x T floats (heads = d / 32): 256 MiB
# at 32k on the CPU preset, 4 GiB at 128k on the GPU one (not tried on a GPU yet).
PRESETS = {
    "cpu": dict(contexts=[1024, 8192, 32768], d=128, layers=2, vocab=256, batch=1, new_tokens=64, repeats=5,
                prefill_budget=3.0, attention_block=512),
    "gpu": dict(contexts=[1024, 8192, 32768, 131072], d=256, layers=2, vocab=256, batch=4, new_tokens=256,
                repeats=10, prefill_budget=3.0, attention_block=256),
    "tiny": dict(contexts=[16, 40], d=16, layers=1, vocab=32, batch=1, new_tokens=4, repeats=1,
                 prefill_budget=0.0, attention_block=16),
}  # fmt: skip
MiB, KiB = 2**20, 2**10


def tree_bytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def prefill_fn(model: mixers.Model, max_len: int):
    """``(params, prompt) -> (last logits (B, vocab), caches)``."""

    def prefill(params, prompt):
        logits, caches = mixers.prefill(model, params, prompt, max_len)
        return logits[:, -1], caches

    return prefill


def decode_fn(model: mixers.Model, steps: int):
    """``(params, caches, token (B,)) -> (tokens (B, steps), caches)``: greedy, ``decode_step``
    under ``lax.scan``; the first token is ``token`` (the prompt's continuation)."""

    def decode(params, caches, token):
        def one(state, _):
            caches, token = state
            logits, caches = mixers.decode_step(model, params, caches, token)
            return (caches, jnp.argmax(logits, -1).astype(token.dtype)), token

        (caches, _), tokens = jax.lax.scan(one, (caches, token), length=steps)
        return tokens.T, caches

    return decode


class DonatingRun:
    """One call of a decode executable whose caches are donated (consumed): each call takes its
    own copy of the caches, all made before the timed calls."""

    def __init__(self, executable, params, caches, token, calls: int):
        self.executable, self.params, self.token = executable, params, token
        self.copies = [jax.block_until_ready(jax.tree.map(jnp.copy, caches)) for _ in range(calls)]

    def __call__(self):
        return jax.block_until_ready(self.executable(self.params, self.copies.pop(), self.token))


def build(model: mixers.Model, params, prompt, new_tokens: int, budget: float, repeats: int) -> dict:
    """Prefill compiled, warmed up and timed; the decode call compiled for its caches."""
    context = prompt.shape[1]
    pre = timing.compile_ahead(prefill_fn(model, context + new_tokens), params, prompt)
    (logits, caches), first = timing.timed_call(pre.run)
    n = int(np.clip(budget / max(first, 1e-9), 1, repeats))
    times = timing.time_calls(pre.run, n)
    token = jnp.argmax(logits, -1).astype(prompt.dtype)
    dec = timing.compile_ahead(decode_fn(model, new_tokens), params, caches, token, donate_argnums=1)
    decode_mem, decode_detail = xla_memory(dec.executable)
    prefill_mem = xla_memory(pre.executable)[0]
    row = dict(
        prefill_ms=1e3 * timing.median(times), prefill_first_ms=1e3 * first, prefill_repeats=n,
        prefill_compile_s=pre.compile_s, prefill_mib=prefill_mem / MiB if prefill_mem else None,
        cache_bytes=tree_bytes(caches), decode_compile_s=dec.compile_s,
        decode_mib=decode_mem / MiB if decode_mem else None, decode_detail=decode_detail,
    )  # fmt: skip
    return dict(row=row, run=DonatingRun(dec.executable, params, caches, token, repeats + 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="--preset tiny")
    parser.add_argument("--mixers", nargs="+", choices=mixers.MIXERS, default=list(mixers.MIXERS))
    parser.add_argument("--contexts", type=int, nargs="+", help="prompt lengths")
    parser.add_argument("--new-tokens", type=int, help="tokens generated by one decode call")
    parser.add_argument("--d", type=int, help="model width")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--repeats", type=int, help="decode: interleaved rounds; prefill: at most this many")
    parser.add_argument("--prefill-budget", type=float, help="seconds of timed prefill calls per row (at least 1)")
    parser.add_argument("--attention-block", type=int, help="attention's prefill: queries per block")
    parser.add_argument("--out", type=Path)
    a = parser.parse_args(argv)
    preset = PRESETS["tiny" if a.tiny else a.preset]
    cfg = {k: getattr(a, k) if getattr(a, k, None) is not None else v for k, v in preset.items()}
    env = timing.environment()
    out = a.out or default_out("generation")
    models = {m: mixers.Model(m, vocab=cfg["vocab"], d=cfg["d"], layers=cfg["layers"],
                              attention_block=cfg["attention_block"]) for m in a.mixers}  # fmt: skip
    params = {
        m: jax.jit(lambda k, model=model: mixers.init(model, k))(jax.random.key(0)) for m, model in models.items()
    }
    rows = []
    for context in cfg["contexts"]:
        prompt = jax.random.randint(jax.random.key(context), (cfg["batch"], context), 0, cfg["vocab"], jnp.int32)
        built, notes = {}, {}
        for m in a.mixers:
            try:
                built[m] = build(models[m], params[m], prompt, cfg["new_tokens"], cfg["prefill_budget"], cfg["repeats"])
            except Exception as err:  # noqa: BLE001 - one failing mixer must not stop the sweep
                notes[m] = f"failed: {type(err).__name__}: {err}"
                traceback.print_exc()
        results = timing.compare({m: b["run"] for m, b in built.items()}, cfg["repeats"]) if built else {}
        for m in a.mixers:
            row = dict(mixer=m, context=context, batch=cfg["batch"], new_tokens=cfg["new_tokens"], d=cfg["d"],
                       layers=cfg["layers"], params=mixers.param_count(params[m]))  # fmt: skip
            if m in built:
                r = results[m]
                row.update(built[m]["row"], decode_ms=1e3 * r.median_s, decode_first_ms=1e3 * r.first_s,
                           tokens_per_s=cfg["batch"] * cfg["new_tokens"] / r.median_s)  # fmt: skip
            else:
                row["note"] = notes[m]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "decode_detail"}), flush=True)
        built.clear()  # the caches' copies of this context go before the next one's
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(environment=env, config=cfg, rows=rows), indent=1))
    (out / "results.md").write_text(table(rows, env, cfg))
    plot(rows, out / "results.png")
    print(table(rows, env, cfg))
    print(f"wrote {out}/results.json, results.md", file=sys.stderr)
    return 0


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summary(rows: list[dict]) -> list[str]:
    """Per mixer over the contexts: is the cache the same size at every context, the decode
    memory's largest / smallest, tokens per second at the longest context vs attention's."""
    done = [r for r in rows if "tokens_per_s" in r]
    if not done:
        return []
    longest = max(r["context"] for r in done)
    attention = {r["context"]: r["tokens_per_s"] for r in done if r["mixer"] == "attention"}
    lines = []
    for m in dict.fromkeys(r["mixer"] for r in done):
        mine = [r for r in done if r["mixer"] == m]
        caches = {r["cache_bytes"] for r in mine}
        mems = [r["decode_mib"] for r in mine if r["decode_mib"]]
        at = next((r for r in mine if r["context"] == longest), None)
        line = f"- {m}: cache {'the same at every context' if len(caches) == 1 else 'grows with the context'}"
        line += f" ({min(caches) / KiB:.1f} .. {max(caches) / KiB:.1f} KiB)"
        if mems:
            line += f"; decode memory, largest / smallest context: {max(mems) / min(mems):.2f}"
        if at:
            line += f"; at context {longest}: {at['tokens_per_s']:.0f} tokens/s"
            if attention.get(longest):
                line += f", {at['tokens_per_s'] / attention[longest]:.1f}x attention's"
        lines.append(line)
    return lines


def table(rows: list[dict], env: dict, cfg: dict) -> str:
    head = (
        f"`{env['command']}`\n\n{env['device_kind']} ({env['backend']}), jax {env['jax']}, {env['date']}; "
        f"d={cfg['d']}, {cfg['layers']} layers, vocab {cfg['vocab']}, batch {cfg['batch']}, "
        f"{cfg['new_tokens']} new tokens per decode call, float32\n\n"
    )
    lines = [
        head + "| mixer | context | prefill ms | prefill MiB | decode tokens/s | decode ms/token | vs attention "
        "| cache KiB | decode MiB | compile s (prefill + decode) |",
        "|" + "---|" * 10,
    ]
    attention = {r["context"]: r.get("tokens_per_s") for r in rows if r["mixer"] == "attention"}
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['mixer']} | {r['context']} |" + " - |" * 8)
            continue
        base = attention.get(r["context"])
        lines.append(
            f"| {r['mixer']} | {r['context']} | {r['prefill_ms']:.1f} | {_fmt(r['prefill_mib'], '.1f')} "
            f"| {r['tokens_per_s']:.0f} | {r['decode_ms'] / r['new_tokens']:.3f} "
            f"| {_fmt(base and r['tokens_per_s'] / base, '.1f')}x | {r['cache_bytes'] / KiB:.1f} "
            f"| {_fmt(r['decode_mib'], '.2f')} | {r['prefill_compile_s']:.1f} + {r['decode_compile_s']:.1f} |"
        )
    notes = [f"- {r['mixer']} at {r['context']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + [""] + summary(rows) + notes) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["mixer"] for r in rows):
        pts = [
            (r["context"], r["tokens_per_s"], r["decode_mib"]) for r in rows if r["mixer"] == m and "tokens_per_s" in r
        ]
        if not pts:
            continue
        style = dict(
            marker="o", label=m, linewidth=2.5 if m == "attention" else 1, color="k" if m == "attention" else None
        )
        speed.semilogx([p[0] for p in pts], [p[1] for p in pts], **style)
        if all(p[2] for p in pts):
            memory.loglog([p[0] for p in pts], [p[2] for p in pts], **style)
    speed.set(xlabel="context (tokens)", ylabel="decode tokens / s", title="greedy decoding speed")
    memory.set(xlabel="context (tokens)", ylabel="decode call MiB (XLA)", title="decode memory")
    speed.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
