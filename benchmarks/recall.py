"""Recall and copying, every mixer: multi-query associative recall (MQAR) and selective copying.

    python -m benchmarks.recall                  # CPU preset: 14 mixers at d = 64 (33 min on 2 idle cores)
    python -m benchmarks.recall --preset gpu     # d = 64, 128, 256, T = 256, up to 64 pairs, 2 learning rates
    python -m benchmarks.recall --widths 32 64 128   # the CPU preset over a grid of widths
    python -m benchmarks.recall --mixers attention deltanet lstm --widths 64
    python -m benchmarks.recall --tiny           # seconds: checks that everything runs

The model is :mod:`benchmarks.mixers` (2 blocks of mixer + MLP) with each mixer at the same
parameter count, trained by ``rj.train`` (AdamW, cosine schedule, the same steps and learning
rates for every mixer) on each cell's parallel method (``mixers.default_method``).

MQAR (Arora et al. 2023, "Zoology"; data as ``zoology/data/multiquery_ar.py`` makes it): ``k``
distinct keys from the first half of the vocabulary, each followed by its value from the second
half; then the queries: each key again, at gaps drawn from the power law ``p(g) ~ g^(a-1)``
(``a = 0.01``) without replacement, the other positions random tokens. The label of a query is
its key's value; accuracy counts the queried positions only. One model per (mixer, width)
trains on a mixture of the preset's pair counts (Zoology's protocol) and is tested on each.

Selective copying (Gu & Dao 2023, "Mamba", section 4.1.1): ``m`` coloured tokens at random
positions of ``L`` noise tokens, then ``m`` markers; at the i-th marker the model outputs the
i-th coloured token. Accuracy counts those ``m`` outputs.

Writes ``results.json``, ``results.md`` (accuracy per mixer, width and pair count) and
``results.png`` into ``bench-results/recall/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj
from benchmarks import mixers
from benchmarks.output import default_out

IGNORE = -100
PRESETS = {
    "cpu": dict(widths=[64], pairs=[4, 8, 16], seq_len=64, vocab=256, steps=1200, batch=64, lrs=[3e-3],
                train_examples=20000, test_examples=500, copy_widths=[64], copy_steps=400, copy_len=64, copy_tokens=8,
                copy_colours=8),
    "gpu": dict(widths=[64, 128, 256], pairs=[8, 16, 32, 64], seq_len=256, vocab=8192, steps=8000, batch=256,
                lrs=[1e-3, 3e-3], train_examples=100000, test_examples=3000, copy_widths=[64, 128, 256],
                copy_steps=8000, copy_len=256, copy_tokens=16, copy_colours=16),
    "tiny": dict(widths=[16], pairs=[2, 4], seq_len=16, vocab=32, steps=3, batch=4, lrs=[3e-3],
                 train_examples=64, test_examples=8, copy_widths=[16], copy_steps=3, copy_len=12, copy_tokens=3,
                 copy_colours=4),
}  # fmt: skip


def mqar(n: int, seq_len: int, vocab: int, pairs: int, seed: int, power_a: float = 0.01) -> tuple:
    """``n`` MQAR examples as Zoology's ``multiquery_ar`` makes them (one pass, random
    non-queries): inputs ``(n, seq_len)`` and labels ``(n, seq_len)``, ``-100`` where not queried."""
    if seq_len % 2 or vocab <= seq_len or 4 * pairs > seq_len:
        raise ValueError(f"seq_len={seq_len}, vocab={vocab}, pairs={pairs}: need an even seq_len < vocab "
                         f"and 4 * pairs <= seq_len")  # fmt: skip
    rng = np.random.default_rng(seed)
    context = 2 * pairs
    half = vocab // 2
    # Distinct keys in [1, half) and values in [half, vocab) per example (choice without replacement).
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :pairs] + 1
    values = np.argsort(rng.random((n, vocab - half)), axis=1)[:, :pairs] + half
    kvs = np.zeros((n, context), np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    space = (seq_len - context) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    # Successive sampling without replacement with probabilities p (numpy's choice(replace=False,
    # p=p)) is the Gumbel top-k of log p.
    gaps = np.argsort(-(np.log(p / p.sum()) + rng.gumbel(size=(n, space))), axis=1)[:, :pairs]
    queries = np.zeros((n, seq_len - context + 1), np.int64)
    np.put_along_axis(queries, gaps * 2, keys, axis=1)
    examples = np.concatenate([kvs, queries], axis=1)
    labels = np.full((n, seq_len + 1), IGNORE, np.int64)
    np.put_along_axis(labels, gaps * 2 + context + 1, values, axis=1)
    inputs, labels = examples[:, :-1], labels[:, 1:]
    noise = rng.integers(0, vocab, inputs.shape)
    inputs = np.where(inputs == 0, noise, inputs)
    return inputs.astype(np.int32), labels.astype(np.int32)


def selective_copying(n: int, length: int, tokens: int, colours: int, seed: int) -> tuple:
    """``n`` selective-copying examples: inputs ``(n, length + tokens)`` over the vocabulary
    ``0`` (noise), ``1`` (marker), ``2 .. colours + 1``; labels the colours in order at the markers."""
    rng = np.random.default_rng(seed)
    positions = np.sort(np.argsort(rng.random((n, length)), axis=1)[:, :tokens], axis=1)
    colour = rng.integers(2, colours + 2, (n, tokens))
    inputs = np.zeros((n, length + tokens), np.int64)
    np.put_along_axis(inputs, positions, colour, axis=1)
    inputs[:, length:] = 1
    labels = np.full(inputs.shape, IGNORE, np.int64)
    labels[:, length:] = colour  # the output at the i-th marker is the i-th colour
    return inputs.astype(np.int32), labels.astype(np.int32)


def masked_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    valid = labels != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(valid.sum(), 1)


def train_and_test(model: mixers.Model, train: tuple, tests: dict, steps: int, batch: int, lr: float,
                   seed: int = 0) -> dict:  # fmt: skip
    """Train ``model`` on ``train`` (inputs, labels) for ``steps`` batches; the accuracy on each
    of ``tests`` (name -> (inputs, labels)), the seconds it took and the final loss."""
    params = mixers.init(model, jax.random.key(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps, lr / 10)
    optimizer = optax.adamw(schedule, weight_decay=0.1)

    def loss_fn(p, b):
        return masked_loss(mixers.apply(model, p, b[0]), b[1])

    step = rj.train.make_train_step(loss_fn, optimizer, clip_norm=1.0, mesh="local")
    state = rj.train.TrainState.create(params, optimizer)
    inputs, labels = train

    def batches(i):
        rows = np.random.default_rng((seed, i)).integers(0, len(inputs), batch)
        return jnp.asarray(inputs[rows]), jnp.asarray(labels[rows])

    t0 = time.perf_counter()
    state, history = rj.train.fit(step, state, batches, steps=steps, progress=False, log_every=max(1, steps // 5))
    seconds = time.perf_counter() - t0

    @jax.jit
    def correct(p, x, y):
        hit = (jnp.argmax(mixers.apply(model, p, x), -1) == y) & (y != IGNORE)
        return hit.sum(), (y != IGNORE).sum()

    accuracy = {}
    for name, (x, y) in tests.items():
        counts = [correct(state.params, jnp.asarray(x[i : i + 250]), jnp.asarray(y[i : i + 250]))
                  for i in range(0, len(x), 250)]  # fmt: skip
        accuracy[name] = float(sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts)))
    return {"accuracy": accuracy, "train_s": seconds, "final_loss": float(np.mean(history["loss"][-20:])),
            "params": mixers.param_count(state.params)}  # fmt: skip


def run(args, save=lambda records: None) -> list[dict]:
    """Every (width, mixer, learning rate): MQAR, then selective copying; ``save(records)`` after each."""
    records = []
    for width in args.widths:
        for mixer in args.mixers:
            for lr in args.lrs:
                model = mixers.Model(mixer, vocab=args.vocab, d=width, layers=2)
                per = args.train_examples // len(args.pairs)
                parts = [mqar(per, args.seq_len, args.vocab, k, seed=10 + k) for k in args.pairs]
                train = tuple(np.concatenate(a) for a in zip(*parts))
                tests = {k: mqar(args.test_examples, args.seq_len, args.vocab, k, seed=1000 + k) for k in args.pairs}
                rec = dict(task="mqar", mixer=mixer, width=width, lr=lr, **train_and_test(
                    model, train, tests, args.steps, args.batch, lr))  # fmt: skip
                rec["state_floats"] = _state(model, args.seq_len)
                records.append(rec)
                _print(rec)
                save(records)
                if width not in args.copy_widths:
                    continue
                copy_vocab = args.copy_colours + 2
                cmodel = mixers.Model(mixer, vocab=copy_vocab, d=width, layers=2)
                ctrain = selective_copying(args.train_examples, args.copy_len, args.copy_tokens, args.copy_colours, 1)
                ctest = selective_copying(args.test_examples, args.copy_len, args.copy_tokens, args.copy_colours, 2)
                rec = dict(task="copy", mixer=mixer, width=width, lr=lr, **train_and_test(
                    cmodel, ctrain, {args.copy_tokens: ctest}, args.copy_steps, args.batch, lr))  # fmt: skip
                rec["state_floats"] = _state(cmodel, args.copy_len + args.copy_tokens)
                records.append(rec)
                _print(rec)
                save(records)
    return records


def _state(model: mixers.Model, context: int) -> int:
    params = jax.eval_shape(lambda: mixers.init(model, jax.random.key(0)))
    return mixers.cache_floats(model, params, 1, context)


def _print(rec: dict) -> None:
    acc = "  ".join(f"{k}: {v:6.1%}" for k, v in rec["accuracy"].items())
    print(f"{rec['task']:5s} {rec['mixer']:15s} d={rec['width']:<4d} lr={rec['lr']:.0e} params={rec['params']:>8,d} "
          f"state={rec['state_floats']:>7,d}  {acc}  loss {rec['final_loss']:.3f}  {rec['train_s']:.0f} s", flush=True)  # fmt: skip


def best(records: list[dict]) -> list[dict]:
    """Per (task, mixer, width), the run of the learning rate with the highest mean accuracy."""
    chosen: dict[tuple, dict] = {}
    for r in records:
        key = (r["task"], r["mixer"], r["width"])
        mean = np.mean(list(r["accuracy"].values()))
        if key not in chosen or mean > np.mean(list(chosen[key]["accuracy"].values())):
            chosen[key] = r
    return list(chosen.values())


def markdown(records: list[dict], args) -> str:
    lines = [f"# Recall and copying (`{args.command}`)", "",
             f"{jax.devices()[0].device_kind}, jax {jax.__version__}; every mixer at ~4 d^2 parameters, 2 blocks; "
             f"{args.steps} steps of {args.batch} for MQAR, {args.copy_steps} for copying; state = numbers held per sequence to decode (attention: its "
             f"key/value cache at the task's length).", ""]  # fmt: skip
    for task, title in (("mqar", f"MQAR, T={args.seq_len}, vocab {args.vocab}: accuracy per number of pairs"),
                        ("copy", f"Selective copying, {args.copy_tokens} of {args.copy_len} tokens: accuracy")):  # fmt: skip
        rows = [r for r in best(records) if r["task"] == task]
        if not rows:
            continue
        cols = list(rows[0]["accuracy"])
        lines += [f"## {title}", "", "| mixer | d | params | state | lr | " + " | ".join(map(str, cols)) + " | train s |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(cols) + "---:|"]  # fmt: skip
        for r in sorted(rows, key=lambda r: (r["width"], mixers.MIXERS.index(r["mixer"]))):
            accs = " | ".join(f"{r['accuracy'][c]:.1%}" for c in cols)
            lines.append(f"| {r['mixer']} | {r['width']} | {r['params']:,} | {r['state_floats']:,} | {r['lr']:.0e} | "
                         f"{accs} | {r['train_s']:.0f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in best(records) if r["task"] == "mqar"]
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab20")  # one colour per mixer in every panel
    for ax, width in zip(axes[0], widths):
        for r in (r for r in rows if r["width"] == width):
            pairs = [int(k) for k in r["accuracy"]]
            ax.plot(pairs, list(r["accuracy"].values()), "o-" if r["mixer"] == "attention" else ".-",
                    label=r["mixer"], color=colours(mixers.MIXERS.index(r["mixer"]) % 20))  # fmt: skip
        ax.set(title=f"MQAR, d = {width}", xlabel="key-value pairs", xscale="log", ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="center right")
    axes[0][0].set_ylabel("accuracy on the queries")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that everything runs")
    p.add_argument("--mixers", nargs="+", choices=mixers.MIXERS, default=list(mixers.MIXERS))
    for name, kind in (("widths", int), ("copy_widths", int), ("pairs", int), ("lrs", float)):
        p.add_argument(f"--{name.replace('_', '-')}", nargs="+", type=kind, dest=name)
    for name in ("seq_len", "vocab", "steps", "batch", "train_examples", "test_examples", "copy_steps", "copy_len",
                 "copy_tokens", "copy_colours"):  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name)
    p.add_argument("--out", type=Path)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    for name, value in PRESETS["tiny" if args.tiny else args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.command = "python -m benchmarks.recall " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or default_out("recall")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": args.command, "device": str(jax.devices()[0]), "devices": jax.device_count(),
            "jax": jax.__version__, "preset": {k: getattr(args, k) for k in PRESETS["cpu"]}}  # fmt: skip
    t0 = time.perf_counter()

    def save(records):  # after every run: a long sweep that stops keeps what it measured
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "results.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        (out / "results.md").write_text(markdown(records, args))

    records = run(args, save)
    save(records)
    plot(records, out / "results.png")
    data = {"meta": meta, "records": records}
    print(f"wrote {out}/results.json, results.md, results.png")
    return data


if __name__ == "__main__":
    rj.distributed.use_cpu_cores()  # before JAX computes anything: the batch over every CPU core
    main()
