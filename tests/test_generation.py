"""Decoding from the recurrent state: a prefill (the cells' chunkwise or parallel methods,
attention's KV cache) followed by one token at a time equals one forward pass over the whole
sequence, for every mixer of benchmarks/mixers.py, and so does the guide's recipe on a cell
(``rj.scan`` on the prompt, ``cell.step`` under ``jax.lax.scan``). Greedy generation equals
the argmax rollout of full forward passes. benchmarks/generation.py runs at its tiny sizes.

float64 throughout: the two evaluations sum the same products in other orders, so they agree
to ~1e-15 of the largest value; 1e-10 is far above that and far below any difference in what
is computed (a wrong position, a step's input read twice, a state left behind). Every
parameter gets noise: an initialisation that zeroes some weights (RWKV-7's output
projections, the norms' unit gains) would hide a wrong path behind a zero."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj
from benchmarks import generation, mixers
from tests.compat import enable_x64

RTOL64 = 1e-10
MATRIX = ("gla", "mamba2", "mlstm", "deltanet", "gated_deltanet", "rwkv7")
CHUNK = 8  # the matrix-state cells' chunk: prompts of 13 steps end inside their second chunk
VOCAB, D, BATCH, PROMPT, TOTAL = 11, 16, 2, 13, 19
# The fast set: attention (the KV cache, the blocked prefill) here, a matrix-state cell in the
# recipe's test and a dense cell in the greedy one; each mixer compiles its own programs (1-3 s).
ALL = [m if m == "attention" else pytest.param(m, marks=pytest.mark.slow) for m in mixers.MIXERS]


def randomise(tree, key, scale=0.3):
    """Every leaf plus ``scale`` standard normal noise (all leaves are real floating point)."""
    leaves, structure = jax.tree.flatten(tree)
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in leaves), [x.dtype for x in leaves]
    keys = jax.random.split(key, len(leaves))
    return structure.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def model_of(mixer: str, attention_block=None) -> mixers.Model:
    # attention's prefill in blocks of 5 queries (13 = 5 + 5 + 3, the last block padded)
    return mixers.Model(mixer, vocab=VOCAB, d=D, layers=2, method=rj.Chunked(CHUNK) if mixer in MATRIX else None,
                        attention_block=attention_block or (5 if mixer == "attention" else None))  # fmt: skip


@functools.partial(jax.jit, static_argnums=(0, 1))  # one program, not one per eager op and shape
def float64_params(model: mixers.Model, seed: int = 0):
    return randomise(mixers.init(model, jax.random.key(seed), jnp.float64), jax.random.key(seed + 1))


def assert_close(actual, expected):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL64, atol=RTOL64 * scale)


@jax.jit
def tokens_of(key):
    return jax.random.randint(key, (BATCH, TOTAL), 0, VOCAB)


def prefill_then_decode(model: mixers.Model, params, tokens, prompt: int):
    """Logits of every position: ``prefill`` on the first ``prompt`` tokens, then
    ``decode_step`` on each later token (teacher forcing) under ``lax.scan``."""
    logits, caches = mixers.prefill(model, params, tokens[:, :prompt], tokens.shape[1])

    def one(caches, token):
        out, caches = mixers.decode_step(model, params, caches, token)
        return caches, out

    _, later = jax.lax.scan(one, caches, tokens[:, prompt:].T)
    return jnp.concatenate([logits, jnp.moveaxis(later, 0, 1)], axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1))
def stepped_and_full(model: mixers.Model, reference: mixers.Model, params, tokens):
    return prefill_then_decode(model, params, tokens, PROMPT), mixers.apply(reference, params, tokens)


@pytest.mark.parametrize("mixer", ALL)
def test_prefill_then_decode_steps_equal_the_forward_pass(mixer):
    with enable_x64(True):
        model = model_of(mixer)
        # attention's reference runs unblocked: the blocked prefill is checked against it too
        reference = model_of(mixer, attention_block=TOTAL) if mixer == "attention" else model
        stepped, full = stepped_and_full(model, reference, float64_params(model), tokens_of(jax.random.key(2)))
        assert stepped.dtype == jnp.float64
        assert_close(stepped, full)


def greedy_rollout(model: mixers.Model, params, prompt, steps: int):
    """``steps`` greedy tokens, each the argmax of a full forward pass over everything so far
    (a buffer of ``T + steps`` tokens: the model is causal, so the tail does not matter)."""
    t = prompt.shape[1]
    buffer = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], steps), prompt.dtype)], axis=1)

    def one(i, buffer):
        logits = jax.lax.dynamic_index_in_dim(mixers.apply(model, params, buffer), i - 1, axis=1, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(buffer, jnp.argmax(logits, -1).astype(buffer.dtype), i, axis=1)

    return jax.lax.fori_loop(t, t + steps, one, buffer)[:, t:]


def benchmark_generate(model: mixers.Model, params, prompt, steps: int):
    """What benchmarks/generation.py times: its prefill, then its decode call."""
    logits, caches = generation.prefill_fn(model, prompt.shape[1] + steps)(params, prompt)
    return generation.decode_fn(model, steps)(params, caches, jnp.argmax(logits, -1).astype(prompt.dtype))[0]


@functools.partial(jax.jit, static_argnums=(0, 3))  # one program for the three
def three_generations(model: mixers.Model, params, prompt, steps: int):
    return tuple(f(model, params, prompt, steps) for f in (greedy_rollout, mixers.generate, benchmark_generate))


SLOW_GREEDY = [pytest.param(m, marks=pytest.mark.slow) for m in ("attention", "gated_deltanet")]


@pytest.mark.parametrize("mixer", ["gru", *SLOW_GREEDY])
def test_greedy_generation_equals_the_rollout_of_full_forward_passes(mixer):
    with enable_x64(True):
        model = model_of(mixer)
        params = float64_params(model, seed=3)
        prompt = tokens_of(jax.random.key(4))[:, :PROMPT]
        steps = TOTAL - PROMPT
        want, got, bench = three_generations(model, params, prompt, steps)
        assert got.shape == want.shape == (BATCH, steps)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(bench, want)
        assert len(np.unique(np.asarray(want))) > 1, "a constant rollout would not test much"


@jax.jit
def _recipe(params, xs):
    """The guide's recipe: ``rj.scan`` (chunkwise) on the prompt, then ``cell.step`` under
    ``jax.lax.scan`` on the rest; and ``rj.scan`` over the whole sequence."""
    _, carry = rj.scan(RECIPE_CELL, params, xs[:, :PROMPT], method=rj.Chunked(CHUNK))

    def step(carry, x):
        carry, y = RECIPE_CELL.step(params, carry, x)
        return carry, y

    carry, ys = jax.lax.scan(step, carry, jnp.moveaxis(xs[:, PROMPT:], 1, 0))
    full, last = rj.scan(RECIPE_CELL, params, xs, method=rj.Chunked(CHUNK))
    return (jnp.moveaxis(ys, 0, 1), carry), (full[:, PROMPT:], last)


RECIPE_CELL = rj.GatedDeltaNet(heads=2, key_size=4, value_size=3)


def test_chunkwise_prefill_then_cell_steps_equal_one_scan():
    with enable_x64(True):
        params = randomise(RECIPE_CELL.init(jax.random.key(5), 6, jnp.float64), jax.random.key(6))
        xs = jax.random.normal(jax.random.key(7), (BATCH, TOTAL, 6), jnp.float64)
        (ys, carry), (want_ys, want_carry) = _recipe(params, xs)
        assert ys.shape == (BATCH, TOTAL - PROMPT, 6)  # heads * value_size
        assert_close(ys, want_ys)
        for got, want in zip(jax.tree.leaves(carry), jax.tree.leaves(want_carry), strict=True):
            assert_close(got, want)


@pytest.mark.slow  # 14 mixers x 2 contexts, each compiled twice: minutes
def test_the_generation_benchmark_runs_at_its_tiny_sizes(tmp_path):
    assert generation.main(["--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    contexts = generation.PRESETS["tiny"]["contexts"]
    rows = {(r["mixer"], r["context"]): r for r in result["rows"]}
    assert set(rows) == {(m, c) for m in mixers.MIXERS for c in contexts}
    failed = [r["note"] for r in rows.values() if "tokens_per_s" not in r]
    assert not failed and all(r["tokens_per_s"] > 0 and r["prefill_ms"] > 0 for r in rows.values()), failed
    for m in mixers.RECURRENT:  # the recurrent state and the decode call's memory do not grow with the context
        assert len({rows[m, c]["cache_bytes"] for c in contexts}) == 1, m
        assert len({rows[m, c]["decode_mib"] for c in contexts}) == 1, m
    attention = [rows["attention", c] for c in sorted(contexts)]
    assert attention[0]["cache_bytes"] < attention[1]["cache_bytes"]
    assert attention[0]["decode_mib"] < attention[1]["decode_mib"]
    assert (tmp_path / "results.md").read_text().count("\n| ") == 1 + len(rows)
    assert (tmp_path / "results.png").exists() or not _has_matplotlib()


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
