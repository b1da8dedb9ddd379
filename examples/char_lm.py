"""Demonstration: a character-level GRU language model trained on the docstrings of
Python's standard library (real English and code-like text present on every machine).

    python examples/char_lm.py            # about a minute on a 2-core CPU, on every core
    python examples/char_lm.py --steps 20 # a smoke run
    python examples/char_lm.py --checkpoint-dir runs/char_lm  # keep the checkpoint; a rerun resumes

It trains through rnnjax.train (masked cross-entropy, a jitted Optax step with gradient
clipping, ``fit``, orbax checkpoints) and prints the held-out cross-entropy in bits per
character against two baselines (the character frequencies, and the best a model that sees
only the previous character can do), then text the model writes from a few prompts.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj

MODULES = [
    "argparse", "collections", "functools", "itertools", "json", "os", "pathlib", "re",
    "string", "textwrap", "typing", "random", "statistics", "heapq", "bisect", "csv",
    "datetime", "decimal", "fractions", "shutil", "subprocess", "threading", "logging",
    "unittest", "email.message", "http.client", "urllib.parse", "zipfile", "tarfile",
]


def stdlib_text() -> str:
    """Docstrings of a fixed set of standard-library modules and their public members."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            with warnings.catch_warnings():  # e.g. typing.io's deprecation on access
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(getattr(module, attr, None))
            if doc and len(doc) > 40:
                docs.append(doc)
    seen, unique = set(), []
    for d in docs:  # the same docstring is often reachable twice
        if d not in seen:
            seen.add(d)
            unique.append(d)
    text = "\n\n".join(unique)
    return "".join(c if 32 <= ord(c) < 127 or c == "\n" else "?" for c in text)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts / counts.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def baselines(train: np.ndarray, test: np.ndarray, vocab: int) -> tuple[float, float]:
    """Held-out bits/char of a unigram and an add-one-smoothed bigram model."""
    uni = np.bincount(train, minlength=vocab) + 1.0
    uni_bits = float(-np.log2(uni[test] / uni.sum()).mean())
    bi = np.ones((vocab, vocab))
    np.add.at(bi, (train[:-1], train[1:]), 1.0)
    bi /= bi.sum(axis=1, keepdims=True)
    bi_bits = float(-np.log2(bi[test[:-1], test[1:]]).mean())
    return uni_bits, bi_bits


def build(vocab: int, hidden: int, key: jax.Array):
    layer = rj.Stack([rj.RNN(rj.GRU(hidden)), rj.RNN(rj.GRU(hidden))], dropout=0.1)
    k_embed, k_layer, k_out = jax.random.split(key, 3)
    params = {
        "embed": jax.random.normal(k_embed, (vocab, 64)) * 0.1,
        "rnn": layer.init(k_layer, 64),
        "out_w": jax.random.normal(k_out, (hidden, vocab)) / math.sqrt(hidden),
        "out_b": jnp.zeros(vocab),
    }
    return layer, params


def main(
    steps: int = 600,
    hidden: int = 192,
    batch: int = 32,
    window: int = 96,
    seed: int = 0,
    checkpoint_dir: str | None = None,
) -> dict:
    text = stdlib_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, test = data[:split], data[split:]
    vocab = len(chars)
    print(f"text: {len(data):,} characters of standard-library docstrings, {vocab} distinct; "
          f"train {len(train):,}, held out {len(test):,}")

    layer, params = build(vocab, hidden, jax.random.key(seed))

    def logits_fn(p, tokens, key=None, carry=None):
        ys, carry = layer.apply(p["rnn"], p["embed"][tokens], carry=carry, key=key)
        return ys @ p["out_w"] + p["out_b"], carry

    def loss_fn(p, batch):
        tokens, key = batch
        logits, _ = logits_fn(p, tokens[:, :-1], key)
        return rj.train.softmax_cross_entropy(logits, tokens[:, 1:])

    schedule = optax.cosine_decay_schedule(3e-3, steps, alpha=0.1)
    optimizer = optax.adam(schedule)
    # The batch split over this process's devices: every CPU core with use_cpu_cores() below.
    train_step = rj.train.make_train_step(loss_fn, optimizer, clip_norm=1.0, mesh="local")
    state = rj.train.TrainState.create(params, optimizer)

    @jax.jit
    def eval_bits(p, tokens):
        logits, _ = logits_fn(p, tokens[:, :-1])
        return rj.train.softmax_cross_entropy(logits, tokens[:, 1:]) / math.log(2)

    temporary = tempfile.TemporaryDirectory(prefix="char_lm_") if checkpoint_dir is None else None
    directory = checkpoint_dir if temporary is None else temporary.name
    if rj.train.checkpoint_steps(directory):  # resume where an earlier run stopped
        state = rj.train.restore_checkpoint(directory, state)
        print(f"resumed from the checkpoint of step {int(state.step)} in {directory}")

    key = jax.random.key(seed + 1)

    def batches(i: int):
        """Batch i depends on i only, so a resumed run sees the batches it would have seen."""
        starts = np.random.default_rng((seed, i)).integers(0, len(train) - window - 1, batch)
        tokens = jnp.asarray(np.stack([train[s : s + window + 1] for s in starts]))
        return tokens, jax.random.fold_in(key, i)  # the dropout key

    def report(record):
        print(f"step {record['step']:5d}  train loss {record['loss'] / math.log(2):.3f} bits/char  "
              f"({record['seconds']:.0f} s)")

    first_step, t0 = int(state.step), time.perf_counter()
    state, _ = rj.train.fit(train_step, state, batches, steps=max(0, steps - int(state.step)),
                            log_every=max(1, steps // 6), on_log=report, progress=False)
    train_seconds = time.perf_counter() - t0
    params = state.params

    # Held-out text in windows of 256 predictions, each window overlapping the next by one.
    n_windows = (len(test) - 1) // 256
    test_tokens = jnp.asarray(np.stack([test[i * 256 : i * 256 + 257] for i in range(n_windows)]))
    model_bits = float(eval_bits(params, test_tokens))
    uni_bits, bi_bits = baselines(train, test, vocab)
    print(f"\nheld-out cross-entropy (bits/char): rnnjax GRU {model_bits:.3f} | "
          f"bigram {bi_bits:.3f} | character frequencies {uni_bits:.3f}")

    # Streaming generation: the prompt goes through rj.scan, then one cell step per character.
    cells = [l.cell for l in layer.layers]

    @jax.jit
    def generate(p, prompt, key):
        logits, carry = logits_fn(p, prompt)

        def one(state, k):
            carry, logit = state
            token = jax.random.categorical(k, logit / 0.6)
            x = p["embed"][token]
            new = []
            for cell, cp, c in zip(cells, p["rnn"], carry):
                c, x = cell.step(cp, c, x)
                new.append(c)
            return (tuple(new), x @ p["out_w"] + p["out_b"]), token

        _, tokens = jax.lax.scan(one, (carry, logits[-1]), jax.random.split(key, 160))
        return tokens

    print("\nwhat it writes (temperature 0.6):")
    samples = {}
    for prompt in ["Return the ", "If the ", "This module "]:
        out = generate(params, jnp.asarray([index[c] for c in prompt]), jax.random.key(len(prompt)))
        samples[prompt] = prompt + "".join(chars[i] for i in np.asarray(out))
        print("  " + repr(samples[prompt]))
    print(f"\ntrained {int(state.step) - first_step} steps of {batch}x{window} characters in {train_seconds:.0f} s on {jax.devices()[0]}")

    if int(state.step) not in rj.train.checkpoint_steps(directory):
        rj.train.save_checkpoint(directory, state)
    restored = rj.train.restore_checkpoint(directory, jax.eval_shape(lambda: state))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
    where = directory if checkpoint_dir is not None else "a temporary directory (--checkpoint-dir keeps it)"
    print(f"checkpoint of step {int(state.step)} in {where}; restored {'identical' if same else 'DIFFERENT'}")
    if temporary is not None:
        temporary.cleanup()
    return {"model_bits": model_bits, "bigram_bits": bi_bits, "unigram_bits": uni_bits, "samples": samples,
            "restored_identical": same}


if __name__ == "__main__":
    rj.distributed.use_cpu_cores()  # before JAX computes anything: each CPU core a device
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None,
                        help="save the final state here (a rerun resumes from it); a temporary directory by default")
    args = parser.parse_args()
    main(steps=args.steps, hidden=args.hidden, seed=args.seed, checkpoint_dir=args.checkpoint_dir)
