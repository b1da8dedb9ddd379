# %% [markdown]
# # 01 · Quickstart: an Elman network that classifies text
#
# The classic recurrent network (Elman 1990),
#
# $$h_t = \tanh(W_{hh} h_{t-1} + W_{xh} x_t + b_h), \qquad p(\text{class}) = \mathrm{softmax}(W_{hy} h_T + b_y),$$
#
# trained with Adam on categorical cross-entropy — the recipe known from Keras as
# `Embedding → SimpleRNN(64) → Dense(softmax)`. We write it twice: first with rnnjax's
# functional API (`rj.Elman`, `rj.scan`, `rj.train`), then as a Flax NNX model around
# `rnnjax.flax.nnx.Recurrent`, which declares the same parameters to Flax and calls the
# same core.
#
# **The task.** Real text that ships with every Python: the docstrings of the standard
# library. Each example is the first words of a docstring; the label is the package it
# comes from (`asyncio`, `email`, `importlib`, `logging`, `multiprocessing`, `xml`). The
# files are parsed with `ast`, nothing is imported or downloaded.

# %%
import ast
import collections
import re
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import rnnjax as rj

# One JAX device: rj.distributed.use_cpu_cores() would make every CPU core a device, so that
# mesh="local" splits each batch over them, but on jax 0.10.2 XLA:CPU sometimes hangs running
# a program on two CPU devices at once (benchmarks/lab/two_device_hang.py).

start_notebook = time.perf_counter()
PACKAGES = ["asyncio", "email", "importlib", "logging", "multiprocessing", "xml"]
MAX_WORDS, VOCAB = 40, 3000


def docstrings(package):
    """Docstrings of every module, class and function in a standard-library package."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    found = []
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text.split()) >= 5:
                    found.append(text)
    return found


texts, labels = [], []
for label, package in enumerate(PACKAGES):
    found = docstrings(package)
    texts += found
    labels += [label] * len(found)
labels = np.array(labels)
print({p: int((labels == i).sum()) for i, p in enumerate(PACKAGES)}, "docstrings in all:", len(texts))

# %% [markdown]
# **Tokens.** Lower-cased words; the `VOCAB - 2` most frequent words of the training split
# get an index, the others share one "unknown" index, 0 is padding. Each docstring keeps
# its first `MAX_WORDS` words, and its true length goes to the model as `lengths`, so
# padding never enters the recurrence.

# %%
rng = np.random.default_rng(0)
order = rng.permutation(len(texts))
n_test = len(texts) // 5
test_idx, train_idx = order[:n_test], order[n_test:]
words = [re.findall(r"[a-z_]+|\d+|[^\sa-z_\d]", t.lower())[:MAX_WORDS] for t in texts]
counts = collections.Counter(w for i in train_idx for w in words[i])
index = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(VOCAB - 2))}   # 0: pad, 1: unknown
tokens = np.zeros((len(texts), MAX_WORDS), np.int32)
lengths = np.array([len(w) for w in words], np.int32)
for row, ws in enumerate(words):
    tokens[row, : len(ws)] = [index.get(w, 1) for w in ws]

train = {"tokens": tokens[train_idx], "lengths": lengths[train_idx], "labels": labels[train_idx]}
test = {"tokens": tokens[test_idx], "lengths": lengths[test_idx], "labels": labels[test_idx]}
majority = np.bincount(train["labels"]).argmax()
baseline = float(np.mean(test["labels"] == majority))
print(f"train {len(train_idx)}, test {len(test_idx)}; majority class '{PACKAGES[majority]}' gives test accuracy {baseline:.3f}")
print("example:", " ".join(words[test_idx[0]]), "->", PACKAGES[test["labels"][0]])

# %% [markdown]
# ## 1 · Functional: parameters are a pytree, the model is a function
#
# `rj.Elman(64)` is the recurrence above; `rj.scan` runs it over the embedded words with
# `lengths`. Its final carry is each sequence's state after its last real word — what
# Keras' `SimpleRNN` returns — and feeds the softmax readout. `rj.train` provides the
# jitted Adam step (with gradient clipping) and the training loop with its progress bar.

# %%
EMBED, HIDDEN, CLASSES = 32, 64, len(PACKAGES)
cell = rj.Elman(HIDDEN)                                   # tanh(x W_x + h W_h + b)


def init(key):
    k_emb, k_cell, k_out = jax.random.split(key, 3)
    return {
        "embed": 0.1 * jax.random.normal(k_emb, (VOCAB, EMBED)),
        "cell": cell.init(k_cell, input_size=EMBED),       # ElmanParams(w_x, w_h, b)
        "w_out": jax.random.normal(k_out, (HIDDEN, CLASSES)) / np.sqrt(HIDDEN),
        "b_out": jnp.zeros(CLASSES),
    }


def logits_fn(params, tokens, lengths):
    hs, h_last = rj.scan(cell, params["cell"], params["embed"][tokens], lengths=lengths)   # (B, T, 64), (B, 64)
    return h_last @ params["w_out"] + params["b_out"]      # the carry after each sequence's last word


def loss_fn(params, batch):
    logits = logits_fn(params, batch["tokens"], batch["lengths"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def batches(data, batch_size, seed):
    """Shuffled mini-batches forever (the last partial batch of each epoch is dropped)."""
    rng = np.random.default_rng(seed)
    n = len(data["labels"])
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield {k: v[perm[i : i + batch_size]] for k, v in data.items()}


@jax.jit
def accuracy(params, data):
    return jnp.mean(jnp.argmax(logits_fn(params, data["tokens"], data["lengths"]), -1) == data["labels"])


STEPS, BATCH = 400, 64
optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(2e-3))
step = rj.train.make_train_step(loss_fn, optimizer, mesh="local")
state = rj.train.TrainState.create(init(jax.random.key(0)), optimizer)
state, history = rj.train.fit(
    step, state, batches(train, BATCH, seed=1), steps=STEPS,
    eval_fn=lambda s: {"test_accuracy": float(accuracy(s.params, test))}, eval_every=100,
)
functional_accuracy = float(accuracy(state.params, test))
print(f"functional Elman: test accuracy {functional_accuracy:.3f} vs majority baseline {baseline:.3f}")
assert functional_accuracy > baseline + 0.2

# %%
plt.figure(figsize=(5, 3))
plt.plot(np.convolve(history["loss"], np.ones(20) / 20, mode="valid"))
plt.xlabel("step")
plt.ylabel("training cross-entropy (smoothed)")
plt.title("Elman(64) on standard-library docstrings")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · The same model in Flax NNX
#
# `rnnjax.flax.nnx.Recurrent` declares the Elman parameters as `nnx.Param`s and calls
# `rj.scan` for the computation, so it composes with `nnx.Embed` and `nnx.Linear` like any
# Flax layer. Training uses the same `rj.train` step on the model's parameter state
# (`nnx.split` / `nnx.merge`), which is how NNX models meet functional Optax code.

# %%
from flax import nnx

from rnnjax.flax import nnx as rjn


class Classifier(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs)
        self.rnn = rjn.Recurrent(rj.Elman(HIDDEN), input_size=EMBED, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, tokens, lengths):
        ys = self.rnn(self.embed(tokens), lengths=lengths)  # (B, T, 64), zeros past each length
        return self.out(rj.train.last_step(ys, lengths))


model = Classifier(nnx.Rngs(0))
graphdef, params = nnx.split(model)
print({jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model.rnn))})


def flax_loss(params, batch):
    logits = nnx.merge(graphdef, params)(batch["tokens"], batch["lengths"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


@jax.jit
def flax_accuracy(params, data):
    logits = nnx.merge(graphdef, params)(data["tokens"], data["lengths"])
    return jnp.mean(jnp.argmax(logits, -1) == data["labels"])


flax_step = rj.train.make_train_step(flax_loss, optimizer)
flax_state = rj.train.TrainState.create(params, optimizer)
flax_state, flax_history = rj.train.fit(flax_step, flax_state, batches(train, BATCH, seed=1), steps=STEPS, progress=False)  # silent
flax_test_accuracy = float(flax_accuracy(flax_state.params, test))
print(f"Flax NNX Elman: test accuracy {flax_test_accuracy:.3f} vs majority baseline {baseline:.3f}")
assert flax_test_accuracy > baseline + 0.2

# The Flax module computes exactly what the core computes with the same parameters.
trained = nnx.merge(graphdef, flax_state.params)
ys_module = trained.rnn(trained.embed(test["tokens"]), lengths=test["lengths"])
ys_core, _ = rj.scan(rj.Elman(HIDDEN), trained.rnn.core_params(), trained.embed(test["tokens"]), lengths=test["lengths"])
assert jnp.array_equal(ys_module, ys_core)

# %%
print(f"{'model':28s} test accuracy")
print(f"{'majority class':28s} {baseline:.3f}")
print(f"{'rnnjax functional Elman(64)':28s} {functional_accuracy:.3f}")
print(f"{'Flax NNX + rnnjax Elman(64)':28s} {flax_test_accuracy:.3f}")
print(f"notebook ran in {time.perf_counter() - start_notebook:.0f} s")
