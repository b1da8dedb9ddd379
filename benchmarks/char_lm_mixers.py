"""Character-level language modelling, every mixer at equal parameters: bits/char against tokens and seconds.

    python -m benchmarks.char_lm_mixers                       # CPU preset: 14 mixers, d=128 (~20 min, 2 cores)
    python -m benchmarks.char_lm_mixers --preset gpu          # d=256, 4 blocks, 256-character windows
    python -m benchmarks.char_lm_mixers --mixers attention gla lstm --steps 200
    python -m benchmarks.char_lm_mixers --tiny                # seconds: checks that everything runs

The text, split and baselines are ``make demo``'s (``examples/char_lm.py``): the docstrings of
a fixed set of standard-library modules, the first 90% of the characters to train on, the last
10% held out, bits/char of the character frequencies (unigram) and of an add-one bigram model
on the held-out text. The training text is about 230k characters (it varies a little with the
Python version): the CPU preset (250 steps of 32 x 128) sees it about 4.5 times, the GPU preset
(1000 of 32 x 256) about 36 times, where the held-out evaluations show which mixers overfit.

The model is :mod:`benchmarks.mixers` (blocks of mixer + MLP, each mixer at ~4 d^2 parameters)
on each cell's parallel method (``mixers.default_method``). Every mixer gets the same batches
(``batch`` windows of ``window + 1`` characters at random offsets, batch ``i`` seeded by
``i``), the same initialisation seed, AdamW with a linear warm-up and a cosine decay, gradients
clipped to norm 1, the same number of steps, trained by ``rj.train.fit`` over this process's
devices (``make_train_step(..., mesh="local")``; every CPU core a device).

Clock: the step is compiled (and run once) on a throwaway state before the clock starts: that
first call is reported apart (``first_call_s``: compilation plus one step). Training seconds
are ``fit``'s, less the held-out evaluations (every ``ceil(steps / evals)`` steps and after
the last, plus one before the first step, which is not timed); the train loss is the mean over
each ``--log-every`` steps. The held-out text is evaluated in windows of ``window`` characters.

Writes ``results.json`` (per mixer: the train curve as step, tokens, seconds, bits/char; the
held-out evaluations; speeds; the seconds and tokens to reach ``--threshold`` bits/char, the
bigram baseline by default), ``results.md`` and ``results.png`` (train bits/char against
tokens and against seconds, one line per mixer, held-out evaluations as dots) into
``bench-results/char-lm-mixers/`` or ``--out``. A failing mixer is recorded and skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj
from benchmarks import mixers, timing
from benchmarks.output import default_out

DEMO = Path(__file__).resolve().parents[1] / "examples" / "char_lm.py"
PRESETS = {
    "cpu": dict(d=128, layers=2, batch=32, window=128, steps=250, lr=3e-3, evals=5, log_every=10, eval_windows=None),
    "gpu": dict(d=256, layers=4, batch=32, window=256, steps=1000, lr=2e-3, evals=10, log_every=20, eval_windows=None),
    "tiny": dict(d=16, layers=1, batch=4, window=16, steps=6, lr=3e-3, evals=2, log_every=2, eval_windows=8),
}  # fmt: skip
LN2 = math.log(2.0)


def char_lm():
    """``examples/char_lm.py`` as a module (``examples`` is not a package)."""
    spec = importlib.util.spec_from_file_location("char_lm", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def corpus() -> dict:
    """The demo's text as token ids: ``train``, ``test`` (90/10), ``chars``, and the baselines'
    held-out bits/char ``unigram_bits``, ``bigram_bits``."""
    demo = char_lm()
    text = demo.stdlib_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, test = data[:split], data[split:]
    uni, bi = demo.baselines(train, test, len(chars))
    return dict(train=train, test=test, chars=chars, unigram_bits=uni, bigram_bits=bi)


def held_out_windows(test: np.ndarray, window: int, limit: int | None) -> np.ndarray:
    """Consecutive windows ``(n, window + 1)`` of the held-out text, each overlapping the next
    by one character (every character predicted once); the first ``limit`` if given."""
    n = (len(test) - 1) // window
    if limit is not None:
        n = min(n, limit)
    return np.stack([test[i * window : i * window + window + 1] for i in range(n)])


def train_one(mixer: str, data: dict, a: argparse.Namespace) -> dict:
    """Train one mixer's model; its curves, held-out evaluations and speeds."""
    model = mixers.Model(mixer, vocab=len(data["chars"]), d=a.d, layers=a.layers)
    train, per_step = data["train"], a.batch * a.window
    schedule = optax.warmup_cosine_decay_schedule(0.0, a.lr, max(1, a.steps // 10), a.steps, a.lr / 10)
    optimizer = optax.adamw(schedule, weight_decay=0.1)

    def loss_fn(p, tokens):
        return rj.train.softmax_cross_entropy(mixers.apply(model, p, tokens[:, :-1]), tokens[:, 1:])

    @jax.jit
    def held_out_bits(p, tokens):
        return rj.train.softmax_cross_entropy(mixers.apply(model, p, tokens[:, :-1]), tokens[:, 1:]) / LN2

    def batches(i: int) -> jax.Array:
        starts = np.random.default_rng((a.seed, i)).integers(0, len(train) - a.window - 1, a.batch)
        return jnp.asarray(np.stack([train[s : s + a.window + 1] for s in starts]))

    step = rj.train.make_train_step(loss_fn, optimizer, clip_norm=1.0, mesh="local")
    test = jnp.asarray(held_out_windows(data["test"], a.window, a.eval_windows))
    # The first call (compilation + one step) on a throwaway state, before the clock starts:
    # the step is donated, so the state trained below is a second initialisation, equal to it.
    throwaway = rj.train.TrainState.create(mixers.init(model, jax.random.key(a.seed)), optimizer)
    t0 = time.perf_counter()
    throwaway, metrics = step(throwaway, batches(0))
    jax.block_until_ready(metrics)
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(held_out_bits(throwaway.params, test))
    eval_first_call_s = time.perf_counter() - t0
    del throwaway

    params = mixers.init(model, jax.random.key(a.seed))
    state = rj.train.TrainState.create(params, optimizer)
    curve: list[dict] = []
    evals = [dict(step=0, tokens=0, seconds=0.0, bits=float(held_out_bits(params, test)))]
    clock = {"eval_s": 0.0, "train_s": 0.0}

    def on_log(record: dict) -> None:
        clock["train_s"] = record["seconds"] - clock["eval_s"]  # fit's clock, less the evaluations so far
        curve.append(dict(step=record["step"], tokens=record["step"] * per_step, seconds=clock["train_s"],
                          bits=record["loss"] / LN2))  # fmt: skip

    def evaluate(s) -> float:
        t = time.perf_counter()
        bits = float(held_out_bits(s.params, test))
        clock["eval_s"] += time.perf_counter() - t
        n = int(s.step)
        evals.append(dict(step=n, tokens=n * per_step, seconds=clock["train_s"], bits=bits))
        return bits

    state, history = rj.train.fit(step, state, batches, steps=a.steps, eval_fn=evaluate,
                                  eval_every=max(1, -(-a.steps // a.evals)), log_every=a.log_every,
                                  on_log=on_log, progress=False)  # fmt: skip
    seconds = clock["train_s"]
    reached = next((c for c in curve if c["bits"] <= a.threshold), None)
    return dict(
        mixer=mixer,
        method=_method(model),
        params=mixers.param_count(state.params),
        mixer_params=sum(mixers.param_count(block["mixer"]) for block in state.params["blocks"]),
        steps=a.steps,
        tokens=a.steps * per_step,
        first_call_s=first_call_s,
        eval_first_call_s=eval_first_call_s,
        train_s=seconds,
        eval_s=clock["eval_s"],
        steps_per_s=a.steps / seconds,
        tokens_per_s=a.steps * per_step / seconds,
        final_train_bits=curve[-1]["bits"],
        final_held_out_bits=evals[-1]["bits"],
        threshold_s=None if reached is None else reached["seconds"],
        threshold_tokens=None if reached is None else reached["tokens"],
        curve=curve,
        evals=evals,
        last_grad_norm=history["grad_norm"][-1],
    )


def _method(model: mixers.Model) -> str:
    """How the mixer runs over time: ``attention``, or the ``rj.scan`` method's name."""
    cell = model.spec.cell
    if cell is None:
        return "attention"
    method = mixers.default_method(model.mixer)
    return type(method if method is not None else rj.methods.default_method(cell)).__name__


def markdown(records: list[dict], meta: dict) -> str:
    c, env = meta["config"], meta["environment"]
    lines = [
        f"# Character-level LM, every mixer at ~4 d^2 parameters (`{env['command']}`)",
        "",
        f"{env['device_kind']} ({env['backend']}, {env['device_count']} device(s), {env['cpu_count']} CPUs), "
        f"jax {env['jax']}, rnnjax {env['rnnjax']}, {env['date']}",
        "",
        f"Text: {meta['text_chars']:,} characters of standard-library docstrings ({meta['vocab']} distinct), "
        f"train {meta['train_chars']:,}, held out {meta['test_chars']:,} (evaluated: {meta['eval_chars']:,}). "
        f"d={c['d']}, {c['layers']} blocks, {c['steps']} steps of {c['batch']} x {c['window']} characters, "
        f"AdamW lr {c['lr']:g} (warm-up + cosine), clip 1.0, seed {c['seed']}.",
        "",
        f"Baselines on the held-out text: bigram (add-one) {meta['bigram_bits']:.3f} bits/char, "
        f"character frequencies {meta['unigram_bits']:.3f}. Threshold: {c['threshold']:.3f} bits/char "
        f"(train loss, mean over {c['log_every']} steps). First call: compilation and one step, not in "
        f"train s; train s excludes the held-out evaluations.",
        "",
        "| mixer | method | params | mixer params | steps/s | tokens/s | first call s | train s | train bits/char "
        "| held-out bits/char | s to threshold | tokens to threshold |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['mixer']} | failed: {r['error']} |" + " |" * 10)
            continue
        reach = ("not reached", "not reached") if r["threshold_s"] is None else (
            f"{r['threshold_s']:.1f}", f"{r['threshold_tokens']:,}")  # fmt: skip
        lines.append(
            f"| {r['mixer']} | {r['method']} | {r['params']:,} | {r['mixer_params']:,} | {r['steps_per_s']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {r['first_call_s']:.1f} | {r['train_s']:.1f} | {r['final_train_bits']:.3f} | "
            f"{r['final_held_out_bits']:.3f} | {reach[0]} | {reach[1]} |"
        )
    done = [r for r in records if "error" not in r]
    if done:
        steps = [e["step"] for e in done[0]["evals"]]
        lines += ["", "Held-out bits/char at each evaluation (step):", "",
                  "| mixer | " + " | ".join(map(str, steps)) + " |", "|---|" + "---:|" * len(steps)]  # fmt: skip
        for r in done:
            lines.append(f"| {r['mixer']} | " + " | ".join(f"{e['bits']:.3f}" for e in r["evals"]) + " |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], meta: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    done = [r for r in records if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = plt.get_cmap("tab20")
    for i, r in enumerate(done):
        style = dict(color="black", lw=2) if r["mixer"] == "attention" else dict(color=colours(i % 20), lw=1.2)
        for ax, x in zip(axes, ("tokens", "seconds")):
            ax.plot([c[x] for c in r["curve"]], [c["bits"] for c in r["curve"]], label=r["mixer"], **style)
            ev = [e for e in r["evals"] if e["step"] > 0]
            ax.plot([e[x] for e in ev], [e["bits"] for e in ev], "o", ms=4, color=style["color"])
    for ax, x in zip(axes, ("tokens seen", "training seconds (compilation and evaluations excluded)")):
        for name, ls in (("bigram_bits", "--"), ("unigram_bits", ":")):
            ax.axhline(meta[name], color="grey", ls=ls, lw=1, label=name.split("_")[0])
        ax.set_xlabel(x)
    axes[1].set_xscale("log")
    top = meta["unigram_bits"] + 0.5
    low = min([min(c["bits"] for c in r["curve"]) for r in done if r["curve"]] + [meta["bigram_bits"]])
    axes[0].set_ylim(max(0.0, low - 0.1), top)
    axes[0].set_ylabel("bits/char (lines: train, dots: held out)")
    axes[1].legend(fontsize=7, ncol=2, loc="upper right")
    c = meta["config"]
    fig.suptitle(f"char LM, d={c['d']}, {c['layers']} blocks, {c['batch']}x{c['window']} chars/step, "
                 f"{meta['environment']['device_kind']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--mixers", nargs="+", choices=mixers.MIXERS, default=list(mixers.MIXERS))
    for name in ("d", "layers", "batch", "window", "steps", "evals", "log_every", "eval_windows"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    p.add_argument("--lr", type=float)
    p.add_argument("--threshold", type=float, help="bits/char to reach (default: the bigram baseline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    return p


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    preset = PRESETS["tiny" if a.tiny else a.preset]
    for name, value in preset.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    data = corpus()
    if a.threshold is None:
        a.threshold = data["bigram_bits"]
    env = timing.environment()
    env["command"] = "python -m benchmarks.char_lm_mixers " + " ".join(sys.argv[1:] if argv is None else argv)
    out = a.out or default_out("char-lm-mixers")
    out.mkdir(parents=True, exist_ok=True)
    n_eval = held_out_windows(data["test"], a.window, a.eval_windows).shape[0] * a.window
    meta = dict(environment=env, config={k: getattr(a, k) for k in (*PRESETS["cpu"], "threshold", "seed", "mixers")},
                text_chars=len(data["train"]) + len(data["test"]), vocab=len(data["chars"]),
                train_chars=len(data["train"]), test_chars=len(data["test"]), eval_chars=n_eval,
                unigram_bits=data["unigram_bits"], bigram_bits=data["bigram_bits"])  # fmt: skip
    print(f"text: {meta['text_chars']:,} chars, vocab {meta['vocab']}; held-out baselines: bigram "
          f"{meta['bigram_bits']:.3f}, unigram {meta['unigram_bits']:.3f} bits/char", flush=True)  # fmt: skip
    records: list[dict] = []
    for mixer in a.mixers:
        try:
            r = train_one(mixer, data, a)
        except Exception as err:  # noqa: BLE001 - one failing mixer must not stop the sweep
            traceback.print_exc()
            r = dict(mixer=mixer, error=f"{type(err).__name__}: {err}")
        records.append(r)
        if "error" not in r:
            print(f"{mixer:15s} params {r['params']:>9,d}  {r['steps_per_s']:6.2f} steps/s  first call "
                  f"{r['first_call_s']:5.1f} s  train {r['train_s']:6.1f} s  train {r['final_train_bits']:.3f}  "
                  f"held out {r['final_held_out_bits']:.3f} bits/char", flush=True)  # fmt: skip
        result = dict(meta=meta, records=records)
        (out / "results.json").write_text(json.dumps(result, indent=1))  # after every mixer: a stopped run keeps them
    (out / "results.md").write_text(markdown(records, meta))
    plot(records, meta, out / "results.png")
    print(markdown(records, meta))
    print(f"wrote {out}/results.json, results.md, results.png", file=sys.stderr)
    return result


if __name__ == "__main__":
    rj.distributed.use_cpu_cores()  # before JAX computes anything: the batch over every CPU core
    main()
