"""A small language model whose token mixer is any rnnjax cell or causal softmax attention.

The model of the RNN-versus-Transformer comparisons (``benchmarks/recall.py``,
``benchmarks/char_lm_mixers.py``, ``benchmarks/generation.py``)::

    x = embed[tokens]
    for each of L blocks:  x = x + mixer(rmsnorm(x));  x = x + mlp(rmsnorm(x))
    logits = rmsnorm(x) @ w_out

``mlp`` is ``gelu(x W_1) W_2`` with hidden width ``mlp_ratio * d``. The mixer is
``attention`` (causal, rotary positions, ``jax.nn.dot_product_attention``) or an rnnjax cell
run by ``rj.scan``, with an input projection where the cell fixes its input width (RG-LRU,
Griffin's gated branch included) and an output projection where its output width is not
``d``. Each cell's width is chosen so the mixer's parameter count is the closest to
attention's ``4 d^2`` (:func:`spec`), so mixers compare at a matched parameter count.

Decoding: :func:`prefill` runs a prompt in parallel over time (the cell's chunkwise or
parallel method, attention over the whole prompt) and returns a cache: each recurrent
layer's carry (its size independent of the context) or attention's key/value buffers of
``max_len`` steps. :func:`decode_step` advances one token: ``cell.step`` on the carry, or
attention over the filled part of the buffers. Nothing is recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj

RECURRENT = (
    "lstm", "gru", "lru", "mingru", "paragru", "rglru", "slstm",
    "gla", "mamba2", "mlstm", "deltanet", "gated_deltanet", "rwkv7",
)  # fmt: skip
MIXERS = ("attention", *RECURRENT)
ATTENTION_HEAD = 32  # attention's head size; the matrix-state cells get attention's number of heads


def _heads(d: int) -> int:
    # Attention's head count, d / 32. With one head, Gated DeltaNet's initial decay (fla's: A ~ U(0, 16),
    # dt ~ logU(1e-3, 0.1), ~0.8 per step at seed 0) erased the state within ~10 steps and MQAR never
    # left chance in 1500 steps; several heads draw several decays.
    return max(1, d // ATTENTION_HEAD)


def _cell(mixer: str, d: int, width: int) -> Any:
    """The rnnjax cell of ``mixer`` at model width ``d`` and cell width ``width``."""
    h = _heads(d)
    return {
        "lstm": lambda: rj.LSTM(width),
        "gru": lambda: rj.GRU(width),
        "lru": lambda: rj.LRU(width),
        "mingru": lambda: rj.MinGRU(width),
        "paragru": lambda: rj.ParaGRU(width),
        "rglru": lambda: rj.RGLRU(width, num_heads=max(h for h in range(1, max(1, width // 64) + 1) if width % h == 0)),
        "slstm": lambda: rj.SLSTM(width, num_heads=4),
        "gla": lambda: rj.GLA(heads=h, key_size=width // 2, value_size=width),
        "mamba2": lambda: rj.Mamba2(heads=h, head_size=width, state_size=32),
        "mlstm": lambda: rj.MLSTM(heads=h, qk_head_size=width // 2, v_head_size=width),
        "deltanet": lambda: rj.DeltaNet(heads=h, key_size=width, value_size=width),
        "gated_deltanet": lambda: rj.GatedDeltaNet(heads=h, key_size=width, value_size=width),
        "rwkv7": lambda: rj.RWKV7(
            hidden_size=d, heads=d // width, head_size=width, decay_rank=16, a_rank=16, gate_rank=16
        ),
    }[mixer]()


def _widths(mixer: str, d: int) -> list[int]:
    if mixer == "rwkv7":  # its width is d: the heads are those of the other matrix-state cells
        return [d // _heads(d)]
    step = 16 if mixer in ("slstm", "gla", "mlstm") else 8  # slstm: 4 heads; gla/mlstm: key = width / 2
    return list(range(step, 4 * d + 1, step))


class MixerSpec(NamedTuple):
    """How one mixer is built: ``cell`` (None for attention), ``in_size`` (the input
    projection's width, None when the cell reads ``d`` features), ``gated`` (Griffin's GeLU
    branch multiplies the cell's output), ``out_size`` (the output projection's input width,
    None when the cell already returns ``d`` features) and its parameter count."""

    mixer: str
    cell: Any
    in_size: int | None
    gated: bool
    out_size: int | None
    params: int


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _build(mixer: str, d: int, width: int) -> MixerSpec:
    cell = _cell(mixer, d, width)
    fixed = getattr(cell, "fixed_input_size", lambda: None)()
    in_size = fixed if fixed is not None and fixed != d else None
    gated = mixer == "rglru"
    if gated:
        in_size = width
    cell_in = d if in_size is None else in_size
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(0), cell_in))
    out = cell.output_size(cell_in)
    out_size = None if out == d else out
    n = _count(shapes) + d * (in_size or 0) * (2 if gated else 1) + (out_size or (in_size if gated else 0)) * d
    return MixerSpec(mixer, cell, in_size, gated, out_size, n)


@functools.cache  # a search of ~50 eval_shapes; Model.spec reads it on every trace
def spec(mixer: str, d: int) -> MixerSpec:
    """The mixer at model width ``d`` whose parameter count is the closest to ``4 d^2``."""
    if mixer == "attention":
        return MixerSpec(mixer, None, None, False, None, 4 * d * d)
    if mixer not in RECURRENT:
        raise ValueError(f"mixer={mixer!r}; expected one of {MIXERS}")
    return min((_build(mixer, d, w) for w in _widths(mixer, d)), key=lambda s: abs(s.params - 4 * d * d))


@dataclasses.dataclass(frozen=True)
class Model:
    """The model's configuration: ``vocab`` tokens, width ``d``, ``layers`` blocks."""

    mixer: str
    vocab: int
    d: int = 64
    layers: int = 2
    mlp_ratio: int = 2
    method: Any = None  # rj.scan's method; None: the cell's default (Chunked for matrix-state cells)
    attention_block: int | None = None  # attention's queries in blocks of this many steps (scores
    # (B, heads, block, T) at a time, not (B, heads, T, T): a 32k prompt's would take 16 GiB); None: all at once

    @property
    def spec(self) -> MixerSpec:
        return spec(self.mixer, self.d)

    @property
    def attention_heads(self) -> int:
        return max(1, self.d // ATTENTION_HEAD)


def default_method(mixer: str) -> Any:
    """The method each cell trains with here: the parallel-in-time ones where the cell has one."""
    if mixer in ("lru", "mingru", "rglru"):
        return rj.Associative()
    return None  # matrix-state cells: rj.Chunked(); dense cells: their default loop


def _dense(key, n_in, n_out, dtype):
    return jax.random.normal(key, (n_in, n_out), dtype) / math.sqrt(n_in)


def init(model: Model, key: jax.Array, dtype: Any = jnp.float32) -> dict:
    """The parameters: ``embed`` (vocab, d), ``blocks`` (one dict per layer), ``norm``, ``out``."""
    d, s = model.d, model.spec
    keys = jax.random.split(key, model.layers + 2)
    blocks = []
    for k in keys[: model.layers]:
        km, k1, k2, kq, kk, kv, ko = jax.random.split(k, 7)
        if s.cell is None:
            mixer = {"wq": _dense(kq, d, d, dtype), "wk": _dense(kk, d, d, dtype), "wv": _dense(kv, d, d, dtype),
                     "wo": _dense(ko, d, d, dtype)}  # fmt: skip
        else:
            mixer = {"cell": s.cell.init(km, s.in_size or d, dtype)}
            if s.in_size is not None:
                mixer["w_in"] = _dense(kq, d, s.in_size, dtype)
            if s.gated:
                mixer["w_gate"] = _dense(kk, d, s.in_size, dtype)
            if s.out_size is not None or s.gated:
                mixer["w_out"] = _dense(ko, s.out_size or s.in_size, d, dtype)
        blocks.append({
            "norm_mixer": jnp.ones(d, dtype), "mixer": mixer, "norm_mlp": jnp.ones(d, dtype),
            "w_1": _dense(k1, d, model.mlp_ratio * d, dtype), "w_2": _dense(k2, model.mlp_ratio * d, d, dtype),
        })  # fmt: skip
    return {
        "embed": jax.random.normal(keys[-2], (model.vocab, d), dtype),
        "blocks": blocks,
        "norm": jnp.ones(d, dtype),
        "out": _dense(keys[-1], d, model.vocab, dtype),
    }


def _rms(x, g, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * g


def _rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary positions on ``x`` ``(B, T, heads, size)`` at ``positions`` ``(T,)``."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions[:, None].astype(jnp.float32) * freq  # (T, half)
    cos, sin = jnp.cos(angle)[:, None].astype(x.dtype), jnp.sin(angle)[:, None].astype(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def _qkv(model: Model, p: dict, x: jax.Array, start) -> tuple:
    b, t, _ = x.shape
    heads = model.attention_heads
    split = lambda w: (x @ w).reshape(b, t, heads, model.d // heads)
    positions = start + jnp.arange(t)
    return _rope(split(p["wq"]), positions), _rope(split(p["wk"]), positions), split(p["wv"])


class KVCache(NamedTuple):
    """Attention's decoding cache: keys and values ``(B, max_len, heads, head_size)`` and the
    number of filled steps."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int | None) -> jax.Array:
    """Causal attention of ``q, k, v`` ``(B, T, heads, size)``; with ``block < T``, the queries
    in blocks of ``block`` steps under ``lax.map``, each against all ``T`` keys (masked), so that
    only one block's scores ``(B, heads, block, T)`` exist at a time."""
    b, t = q.shape[:2]
    if block is None or t <= block:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    n = -(-t // block)
    blocks = jnp.pad(q, [(0, 0), (0, n * block - t), (0, 0), (0, 0)]).reshape(b, n, block, *q.shape[2:])

    def one(args):
        i, qb = args
        mask = (i * block + jnp.arange(block))[:, None] >= jnp.arange(t)  # padded rows see every key: no empty row
        return jax.nn.dot_product_attention(qb, k, v, mask=mask[None, None])

    y = jax.lax.map(one, (jnp.arange(n), jnp.moveaxis(blocks, 1, 0)))
    return jnp.moveaxis(y, 0, 1).reshape(b, n * block, *q.shape[2:])[:, :t]


def _mixer(model: Model, p: dict, x: jax.Array, max_len: int | None):
    """The mixer over a whole sequence ``x`` ``(B, T, d)``; returns ``(y, cache)``."""
    s = model.spec
    if s.cell is None:
        q, k, v = _qkv(model, p, x, 0)
        y = _causal_attention(q, k, v, model.attention_block).reshape(x.shape)
        if max_len is None:
            return y @ p["wo"], None
        pad = [(0, 0), (0, max_len - x.shape[1]), (0, 0), (0, 0)]
        return y @ p["wo"], KVCache(jnp.pad(k, pad), jnp.pad(v, pad), jnp.asarray(x.shape[1], jnp.int32))
    h = x if s.in_size is None else x @ p["w_in"]
    method = model.method if model.method is not None else default_method(model.mixer)
    y, carry = rj.scan(s.cell, p["cell"], h, method=method)
    return _project(s, p, x, y), carry


def _project(s: MixerSpec, p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    if s.gated:
        y = y * jax.nn.gelu(x @ p["w_gate"])
    return y if "w_out" not in p else y @ p["w_out"]


def _forward(model: Model, params: dict, tokens: jax.Array, max_len: int | None):
    x = params["embed"][tokens]
    caches = []
    for block in params["blocks"]:
        y, cache = _mixer(model, block["mixer"], _rms(x, block["norm_mixer"]), max_len)
        x = x + y
        x = x + jax.nn.gelu(_rms(x, block["norm_mlp"]) @ block["w_1"]) @ block["w_2"]
        caches.append(cache)
    return _rms(x, params["norm"]) @ params["out"], caches


def apply(model: Model, params: dict, tokens: jax.Array) -> jax.Array:
    """Logits ``(B, T, vocab)`` of ``tokens`` ``(B, T)`` ints, every position in parallel."""
    return _forward(model, params, tokens, None)[0]


def prefill(model: Model, params: dict, tokens: jax.Array, max_len: int) -> tuple[jax.Array, list]:
    """``apply`` on a prompt ``(B, T)`` that also returns the decoding cache (one entry per
    layer: the cell's carry, or a :class:`KVCache` of ``max_len >= T`` steps)."""
    if max_len < tokens.shape[-1]:
        raise ValueError(f"max_len={max_len} is shorter than the prompt's {tokens.shape[-1]} tokens")
    return _forward(model, params, tokens, max_len)


def decode_step(model: Model, params: dict, caches: list, token: jax.Array) -> tuple[jax.Array, list]:
    """One token ``(B,)`` ints through the model from ``caches``; returns logits ``(B, vocab)``
    and the caches with this token added."""
    s = model.spec
    x = params["embed"][token]
    new = []
    for block, cache in zip(params["blocks"], caches):
        p, h = block["mixer"], _rms(x, block["norm_mixer"])
        if s.cell is None:
            q, k, v = _qkv(model, p, h[:, None], cache.length)
            zero = jnp.zeros((), cache.length.dtype)
            at = (zero, cache.length, zero, zero)
            kb = jax.lax.dynamic_update_slice(cache.k, k, at)
            vb = jax.lax.dynamic_update_slice(cache.v, v, at)
            lengths = jnp.full(x.shape[:1], cache.length + 1, jnp.int32)
            y = jax.nn.dot_product_attention(q, kb, vb, key_value_seq_lengths=lengths).reshape(x.shape) @ p["wo"]
            cache = KVCache(kb, vb, cache.length + 1)
        else:
            cache, y = s.cell.step(p["cell"], cache, h if s.in_size is None else h @ p["w_in"])
            y = _project(s, p, h, y)
        x = x + y
        x = x + jax.nn.gelu(_rms(x, block["norm_mlp"]) @ block["w_1"]) @ block["w_2"]
        new.append(cache)
    return _rms(x, params["norm"]) @ params["out"], new


def generate(model: Model, params: dict, prompt: jax.Array, steps: int, max_len: int | None = None) -> jax.Array:
    """Greedy continuation of ``prompt`` ``(B, T)`` by ``steps`` tokens: one prefill, then
    ``decode_step`` under ``lax.scan`` (the cache carried, nothing recomputed)."""
    logits, caches = prefill(model, params, prompt, max_len or prompt.shape[-1] + steps)

    def one(state, _):
        caches, token = state
        logits, caches = decode_step(model, params, caches, token)
        return (caches, jnp.argmax(logits, -1)), token

    first = jnp.argmax(logits[:, -1], -1)
    _, tokens = jax.lax.scan(one, (caches, first), length=steps)
    return tokens.T


def cache_floats(model: Model, params: dict, batch: int, context: int) -> int:
    """Numbers held per sequence to decode after ``context`` tokens: the recurrent carries, or
    attention's keys and values of ``context`` steps."""
    if model.spec.cell is None:
        return 2 * context * model.d * model.layers
    shapes = jax.eval_shape(lambda p: prefill(model, p, jnp.zeros((batch, 1), jnp.int32), 1)[1], params)
    per = sum(np.prod(x.shape) * (2 if jnp.issubdtype(x.dtype, jnp.complexfloating) else 1)
              for x in jax.tree.leaves(shapes))  # fmt: skip
    return int(per) // batch


def param_count(params: Any) -> int:
    return _count(params)
