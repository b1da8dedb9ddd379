"""What the suite measures: one entry of :data:`SYSTEMS` per implementation.

A system turns a :class:`Problem` (cell, mode, shapes, dtype) and the shared input array
into a :class:`Built`: a zero-argument ``run`` that does one forward (``"fwd"``) or one
forward+backward pass (``"fwd+bwd"``: gradient of ``sum(outputs)`` with respect to the
parameters and the inputs, as PyTorch's ``.backward()`` computes) and waits for it, plus
what compiling it cost and how much memory it needs. Every JAX system is jit-compiled
ahead of time (``lower().compile()``, timed apart) and the compiled executable is what
runs.

Add a variant with one line, e.g. ``SYSTEMS["rnnjax-unroll4"] = Rnnjax(method=rj.Sequential(unroll=4))``;
the method value is passed to ``rj.scan`` as it is. A system that cannot run a problem (peer
not installed, no such cell, too much memory) raises :class:`Skip` with a note, and the
suite goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing

CELLS = ("lstm", "gru", "elman", "mingru", "lru")
MODES = ("fwd", "fwd+bwd")
LINEAR_CELLS = ("mingru", "lru")


class Skip(Exception):
    """The system does not run this problem; ``str(exc)`` says why (goes in the notes)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    cell: str  # one of CELLS
    mode: str  # one of MODES
    batch: int
    length: int  # T
    input_size: int  # D
    hidden_size: int  # H
    dtype: str = "float32"
    seed: int = 0

    @property
    def jax_dtype(self):
        return jnp.dtype(self.dtype)


@dataclasses.dataclass
class Built:
    """A compiled problem. ``run()`` does one pass and blocks until it is done."""

    run: Callable[[], Any]
    compile_s: float | None = None  # trace + lower + compile (JAX); None for eager systems
    lower_s: float | None = None  # trace + lower only
    memory_bytes: int | None = None
    memory_source: str | None = None  # "xla-memory-analysis", "torch-cuda-max-allocated", "rss-delta"
    memory_detail: dict | None = None
    probe_memory: Callable[[Callable[[], Any]], tuple[int | None, str]] | None = None
    info: dict = dataclasses.field(default_factory=dict)
    compiled: Any = None  # the JAX executable (as_text, cost_analysis), for profile_step

    def first_call(self) -> float:
        """The warm-up call: its time (and, for eager systems, the memory it needed)."""
        if self.probe_memory is not None and self.memory_bytes is None:
            (self.memory_bytes, self.memory_source), seconds = timing.timed_call(lambda: self.probe_memory(self.run))
            return seconds
        return timing.timed_call(self.run)[1]


@dataclasses.dataclass(frozen=True)
class System:
    """Base of every system. ``cells``/``modes``: what it runs; anything else is n/a."""

    cells: tuple[str, ...] = CELLS
    modes: tuple[str, ...] = MODES
    framework: str = "jax"
    cell_independent: bool = False  # one measurement per (mode, T), shared by all cells
    only_at_vmap_length: bool = False  # measured at --vmap-length only (derived figures)
    same_as_rnnjax: bool = False  # computes rnnjax's numbers (same params): --check compares
    note: str = ""  # said once in the report's notes

    def unavailable(self) -> str | None:
        """A note when the system cannot run at all here (peer not installed...)."""
        return None

    def build(self, prob: Problem, x: np.ndarray) -> Built:
        raise NotImplementedError


# --------------------------------------------------------------------------- helpers


def loss(ys: jax.Array) -> jax.Array:
    """The scalar every system differentiates: the sum of all outputs, in float32."""
    return jnp.sum(ys.astype(jnp.float32))


def xla_memory(compiled) -> tuple[int | None, dict | None]:
    """Peak-memory estimate of a compiled executable: argument + output + temp - alias."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None, None
    if m is None:
        return None, None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
    detail = {f: int(getattr(m, f, 0) or 0) for f in fields}
    total = (detail["argument_size_in_bytes"] + detail["output_size_in_bytes"]
             + detail["temp_size_in_bytes"] - detail["alias_size_in_bytes"])
    return total, detail


def compile_jax(apply: Callable, params: Any, x: jax.Array, mode: str, jit_kwargs: dict | None = None) -> Built:
    """Jit ``apply(params, x) -> ys`` (fwd) or its gradient (fwd+bwd), compile, time it."""
    if mode == "fwd":
        fn = apply
    elif mode == "fwd+bwd":
        fn = jax.grad(lambda p, xs: loss(apply(p, xs)), argnums=(0, 1))
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    compiled = timing.compile_ahead(fn, params, x, **(jit_kwargs or {}))
    mem, detail = xla_memory(compiled.executable)
    return Built(compiled.run, compile_s=compiled.compile_s, lower_s=compiled.lower_s, memory_bytes=mem,
                 memory_source="xla-memory-analysis" if mem is not None else None, memory_detail=detail,
                 compiled=compiled.executable)


_PARAMS: dict[tuple, Any] = {}


def cached_init(key: tuple, init: Callable[[], Any], jit: Callable = jax.jit) -> Any:
    """``jit(init)()`` once per key: parameters depend on (cell, D, H, dtype, seed), not on T,
    so every length reuses them, and one compiled init replaces many eager op compiles."""
    if key not in _PARAMS:
        _PARAMS[key] = jit(init)()
    return _PARAMS[key]


def rnnjax_params(cell: rj.Cell, prob: Problem) -> Any:
    return cached_init(("rnnjax", cell, prob.input_size, prob.dtype, prob.seed),
                       lambda: cell.init(jax.random.key(prob.seed), prob.input_size, prob.jax_dtype))


def as_jax(x: np.ndarray, prob: Problem) -> jax.Array:
    return jax.device_put(jnp.asarray(x, prob.jax_dtype))


def rnnjax_cell(name: str, hidden_size: int) -> rj.Cell:
    """The rnnjax cell benchmarked for each cell name (PyTorch's conventions)."""
    cells = {
        "lstm": lambda: rj.LSTM(hidden_size),
        "gru": lambda: rj.GRU(hidden_size),  # reset_after=True, as nn.GRU and cuDNN
        "elman": lambda: rj.Elman(hidden_size),  # tanh, as nn.RNN
        "mingru": lambda: rj.MinGRU(hidden_size),
        "lru": lambda: rj.LRU(hidden_size),  # output size = input size
    }
    if name not in cells:
        raise ValueError(f"unknown cell {name!r}; expected one of {CELLS}")
    return cells[name]()


# --------------------------------------------------------------------------- rnnjax


@dataclasses.dataclass(frozen=True)
class Rnnjax(System):
    """``rj.scan(cell, params, xs, method=method)``; ``vmap``: over single sequences instead;
    ``wrap``: scan ``wrap(cell)`` (e.g. ``rj.Mixed``) with the cell's own parameters."""

    method: Any = "sequential"  # a method value, or its name for the default value
    vmap: bool = False
    wrap: Callable[[rj.Cell], rj.Cell] | None = None
    same_as_rnnjax: bool = True

    def build(self, prob, x):
        cell = rnnjax_cell(prob.cell, prob.hidden_size)
        params = rnnjax_params(cell, prob)
        if self.wrap is not None:
            cell = self.wrap(cell)

        def apply(p, xs):
            return rj.scan(cell, p, xs, method=self.method)[0]

        if self.vmap:
            apply = jax.vmap(apply, in_axes=(None, 0))
        return compile_jax(apply, params, as_jax(x, prob), prob.mode)


@dataclasses.dataclass(frozen=True)
class RnnjaxShard(System):
    """rnnjax with the batch split over all local devices: ``rj.scan`` inside
    ``rj.distributed.data_parallel(mesh, "batch")``, as ``make_train_step(mesh=...)`` runs it.

    Each device scans its part of the batch under ``jax.shard_map``; the parameters enter
    replicated, so the backward pass reduces their gradients with one all-reduce after the
    loop instead of one per step.
    """

    method: Any = "sequential"  # as Rnnjax's
    same_as_rnnjax: bool = True

    def unavailable(self):
        if not (hasattr(jax, "shard_map") and hasattr(jax.lax, "pcast")):
            return f"needs jax.shard_map and jax.lax.pcast (JAX {jax.__version__} has not both)"
        if jax.local_device_count() < 2:
            return "needs several devices: on CPU start with --host-devices N (N >= 2)"
        return None

    def build(self, prob, x):
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        devices = jax.local_devices()
        n = len(devices)
        if n < 2:
            raise Skip(self.unavailable())
        if prob.batch % n:
            raise Skip(f"batch {prob.batch} is not divisible by the {n} devices")
        mesh = Mesh(np.array(devices), ("batch",))
        cell = rnnjax_cell(prob.cell, prob.hidden_size)
        params = rnnjax_params(cell, prob)

        def apply(p, xs):
            with rj.distributed.data_parallel(mesh, "batch"):
                return rj.scan(cell, p, xs, method=self.method)[0]

        xs = jax.device_put(jnp.asarray(x, prob.jax_dtype), NamedSharding(mesh, P("batch")))
        params = jax.device_put(params, NamedSharding(mesh, P()))
        built = compile_jax(apply, params, xs, prob.mode)
        built.info["devices"] = n
        if built.memory_source == "xla-memory-analysis":  # an SPMD executable reports one device's share
            built.memory_source = "xla-memory-analysis-per-device"
        return built


# --------------------------------------------------------------------------- flax


@dataclasses.dataclass(frozen=True)
class Flax(System):
    """Flax linen ``nn.RNN`` around the equivalent cell."""

    cell_classes: tuple[tuple[str, str], ...] = (
        ("lstm", "OptimizedLSTMCell"), ("gru", "GRUCell"), ("elman", "SimpleCell"))
    cells: tuple[str, ...] = ("lstm", "gru", "elman")
    note: str = "Flax linen nn.RNN: OptimizedLSTMCell, GRUCell, SimpleCell; no minGRU/LRU cell"

    def build(self, prob, x):
        import flax.linen as nn

        name = dict(self.cell_classes)[prob.cell]
        model = nn.RNN(getattr(nn, name)(features=prob.hidden_size, dtype=prob.jax_dtype,
                                         param_dtype=prob.jax_dtype))
        variables = cached_init(
            ("flax", name, prob.batch, prob.input_size, prob.hidden_size, prob.dtype, prob.seed),
            lambda: model.init(jax.random.key(prob.seed), jnp.zeros((prob.batch, 1, prob.input_size), prob.jax_dtype)))
        built = compile_jax(model.apply, variables, as_jax(x, prob), prob.mode)
        built.info["cell"] = f"nn.{name}"
        return built


@dataclasses.dataclass(frozen=True)
class JaxCudnn(System):
    """``jax.experimental.rnn.lstm``: cuDNN's LSTM called from JAX (GPU only, LSTM only)."""

    cells: tuple[str, ...] = ("lstm",)
    note: str = ("jax-cudnn: jax.experimental.rnn.lstm (cuDNN's LSTM from JAX, one layer, all lengths T); "
                 "GPU only")

    def unavailable(self):
        if jax.default_backend() != "gpu":
            return "jax.experimental.rnn runs on GPUs only"
        return None

    def build(self, prob, x):
        from jax.experimental import rnn

        if jax.default_backend() != "gpu":
            raise Skip(self.unavailable())
        weights = cached_init(
            ("jax-cudnn", prob.input_size, prob.hidden_size, prob.dtype, prob.seed),
            lambda: rnn.init_lstm_weight(jax.random.key(prob.seed), prob.input_size, prob.hidden_size, 1,
                                         False).astype(prob.jax_dtype))
        zeros = jnp.zeros((1, prob.batch, prob.hidden_size), prob.jax_dtype)
        lengths = jnp.full((prob.batch,), prob.length, jnp.int32)

        def apply(w, xs):
            return rnn.lstm(xs, zeros, zeros, w, lengths, prob.input_size, prob.hidden_size, 1, 0.0, False)[0]

        return compile_jax(apply, weights, as_jax(x, prob), prob.mode)


# --------------------------------------------------------------------------- equinox


@dataclasses.dataclass(frozen=True)
class Equinox(System):
    """Equinox ``eqx.nn.LSTMCell``/``GRUCell``, vmapped over the batch, under ``lax.scan``."""

    cells: tuple[str, ...] = ("lstm", "gru")
    note: str = "Equinox eqx.nn.LSTMCell / GRUCell under lax.scan; no Elman/minGRU/LRU cell"

    def unavailable(self):
        try:
            import equinox  # noqa: F401
        except ImportError:
            return "equinox is not installed"
        return None

    def build(self, prob, x):
        import equinox as eqx

        cls = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[prob.cell]
        cell = cached_init(("equinox", prob.cell, prob.input_size, prob.hidden_size, prob.dtype, prob.seed),
                           lambda: cls(prob.input_size, prob.hidden_size, dtype=prob.jax_dtype,
                                       key=jax.random.key(prob.seed)), jit=eqx.filter_jit)
        params, static = eqx.partition(cell, eqx.is_array)
        is_lstm = prob.cell == "lstm"

        def apply(p, xs):
            c = eqx.combine(p, static)
            xs_tm = jnp.swapaxes(xs, 0, 1)  # (T, B, D), as rnnjax does internally
            h0 = jnp.zeros((xs.shape[0], prob.hidden_size), xs.dtype)
            carry = (h0, h0) if is_lstm else h0

            def body(carry, xt):
                new = jax.vmap(c)(xt, carry)
                return new, (new[0] if is_lstm else new)

            return jnp.swapaxes(jax.lax.scan(body, carry, xs_tm)[1], 0, 1)

        return compile_jax(apply, params, as_jax(x, prob), prob.mode)


# --------------------------------------------------------------------------- torch


def _torch():
    import torch

    return torch


def torch_device() -> str | None:
    """PyTorch's device matching JAX's default backend, or None when it has none."""
    torch = _torch()
    platform = jax.default_backend()
    if platform == "cpu":
        return "cpu"
    if platform in ("gpu", "cuda", "rocm") and torch.cuda.is_available():
        return "cuda"
    return None


class RssSampler:
    """Peak resident set size of this process while a call runs, sampled every 0.2 ms."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import psutil  # fallback off Linux

            return psutil.Process().memory_info().rss

    @staticmethod
    def trim() -> None:
        """Hand freed heap memory back to the OS (glibc), so the baseline is what is live."""
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def peak_delta(self, fn: Callable[[], Any]) -> int:
        self.trim()
        base = self.rss()
        peak = [base]
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                peak[0] = max(peak[0], self.rss())
                stop.wait(0.0002)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            stop.set()
            thread.join()
        peak[0] = max(peak[0], self.rss())
        return peak[0] - base


@dataclasses.dataclass(frozen=True)
class Torch(System):
    """PyTorch ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (batch_first), eager; cuDNN on GPU."""

    cells: tuple[str, ...] = ("lstm", "gru", "elman")
    framework: str = "torch"
    note: str = ("PyTorch nn.LSTM / nn.GRU / nn.RNN(tanh), batch_first, eager (cuDNN on GPU); "
                 "forward under torch.no_grad(); fwd+bwd = sum(outputs).backward() with x.requires_grad")

    def unavailable(self):
        try:
            _torch()
        except ImportError:
            return "torch is not installed"
        if torch_device() is None:
            return f"PyTorch has no device matching JAX's {jax.default_backend()!r} backend"
        return None

    def build(self, prob, x):
        torch = _torch()
        device = torch_device()
        if device is None:
            raise Skip(self.unavailable())
        dtype = getattr(torch, prob.dtype)
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[prob.cell]
        torch.manual_seed(prob.seed)
        module = cls(prob.input_size, prob.hidden_size, batch_first=True).to(device=device, dtype=dtype)
        xs = torch.from_numpy(np.asarray(x, np.float32)).to(device=device, dtype=dtype)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        if prob.mode == "fwd":
            def run():
                with torch.no_grad():
                    y = module(xs)[0]
                sync()
                return y
        else:
            xs.requires_grad_(True)

            def run():
                module.zero_grad(set_to_none=True)
                xs.grad = None
                y = module(xs)[0]
                y.float().sum().backward()
                sync()
                return [p.grad for p in module.parameters()], xs.grad

        # One-time library set-up (oneDNN kernels, cuDNN handles) on a one-step slice, so the
        # warm-up call's memory probe sees the pass itself.
        with torch.no_grad():
            module(xs[:, :1])
        if device == "cuda":
            def probe(fn):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                fn()
                return int(torch.cuda.max_memory_allocated()), "torch-cuda-max-allocated"
        else:
            def probe(fn):
                return RssSampler().peak_delta(fn), "rss-delta"

        return Built(run, probe_memory=probe,
                     info={"device": device, "threads": torch.get_num_threads()})


# --------------------------------------------------------------------------- attention


@dataclasses.dataclass(frozen=True)
class Attention(System):
    """Causal self-attention of width ``hidden_size``: Q/K/V/O projections and
    ``jax.nn.dot_product_attention(is_causal=True)``; the O(T^2) reference."""

    heads: int = 1
    max_gb: float = 4.0  # skip when the estimated score memory exceeds this
    cell_independent: bool = True
    note: str = ""

    def score_bytes(self, prob: Problem) -> int:
        # scores + probabilities, kept for the backward pass and their gradients there.
        per = prob.batch * self.heads * prob.length**2 * 4
        return per * (2 if prob.mode == "fwd" else 4)

    def build(self, prob, x):
        h, n = prob.hidden_size, self.heads
        if h % n:
            raise Skip(f"hidden size {h} is not divisible by {n} heads")
        need = self.score_bytes(prob)
        if need > self.max_gb * 2**30:
            raise Skip(f"T={prob.length}: attention scores need ~{need / 2**30:.1f} GiB > "
                       f"--attention-max-gb {self.max_gb:g}")
        d, dt = prob.input_size, prob.jax_dtype

        def init():
            keys = jax.random.split(jax.random.key(prob.seed), 4)
            shapes = {"wq": (d, h), "wk": (d, h), "wv": (d, h), "wo": (h, h)}
            return {w: jax.random.normal(k, shape, dt) / np.sqrt(shape[0]) for k, (w, shape) in zip(keys, shapes.items())}

        params = cached_init(("attention", d, h, prob.dtype, prob.seed), init)

        def apply(p, xs):
            b, t, _ = xs.shape
            q, k, v = ((xs @ p[w]).reshape(b, t, n, h // n) for w in ("wq", "wk", "wv"))
            o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            return o.reshape(b, t, h) @ p["wo"]

        built = compile_jax(apply, params, as_jax(x, prob), prob.mode)
        built.info["heads"] = n
        return built


# --------------------------------------------------------------------------- registry

#: Every system the suite knows; ``--systems`` picks from these. One line per variant.
SYSTEMS: dict[str, System] = {
    "rnnjax": Rnnjax(note="rnnjax: rj.scan(cell, params, xs)"),
    "rnnjax-remat": Rnnjax(method=rj.Sequential(remat="step"), modes=("fwd+bwd",),
                           note='rnnjax-remat: rj.scan(method=rj.Sequential(remat="step")), fwd+bwd only '
                                "(forward is rnnjax's)"),
    "rnnjax-remat-sqrt": Rnnjax(method=rj.Sequential(remat="sqrt"), modes=("fwd+bwd",),
                                note='rnnjax-remat-sqrt: rj.scan(method=rj.Sequential(remat="sqrt")), sqrt(T) nested '
                                     "checkpoints, fwd+bwd only"),
    "rnnjax-unroll4": Rnnjax(method=rj.Sequential(unroll=4)),
    "rnnjax-unroll16": Rnnjax(method=rj.Sequential(unroll=16)),
    "rnnjax-unroll64": Rnnjax(method=rj.Sequential(unroll=64)),
    "rnnjax-autodiff": Rnnjax(method=rj.Sequential(gradient="autodiff"), cells=("lstm", "gru", "elman"),
                              modes=("fwd+bwd",),
                              note='rnnjax-autodiff: rj.scan(method=rj.Sequential(gradient="autodiff")), JAX\'s own '
                                   "derivative of the loop (the default before the sequence-level one); fwd+bwd only"),
    "rnnjax-assoc": Rnnjax(method=rj.Associative(), cells=LINEAR_CELLS),
    "rnnjax-chunked": Rnnjax(method=rj.Chunked(), cells=LINEAR_CELLS),
    "rnnjax-newton": Rnnjax(method=rj.Newton()),
    "rnnjax-auto": Rnnjax(method=rj.Auto()),
    "rnnjax-bf16": Rnnjax(wrap=functools.partial(rj.Mixed, compute_dtype=jnp.bfloat16), same_as_rnnjax=False,
                          note="rnnjax-bf16: rj.Mixed(cell, compute_dtype=bfloat16): float32 params and carry, bfloat16 outputs"),
    "rnnjax-f16": Rnnjax(wrap=functools.partial(rj.Mixed, compute_dtype=jnp.float16), same_as_rnnjax=False,
                         note="rnnjax-f16: rj.Mixed(cell, compute_dtype=float16): float32 params and carry, float16 outputs"),
    "rnnjax-shard": RnnjaxShard(note="rnnjax-shard: batch split over the host devices by rj.distributed.data_parallel "
                                     "(shard_map), one all-reduce of parameter gradients after the loop"),
    "rnnjax-vmap": Rnnjax(vmap=True, only_at_vmap_length=True,
                          note="rnnjax-vmap: jax.vmap of the single-sequence call, at --vmap-length only"),
    "rnnjax-kernel": Rnnjax(method=rj.Kernel(), cells=("lstm", "gru", "elman"),
                            note="rnnjax-kernel: rj.scan(method=rj.Kernel()), one Pallas kernel per direction (GPU)"),
    "rnnjax-kernel-bf16": Rnnjax(method=rj.Kernel(), cells=("lstm", "gru", "elman"), same_as_rnnjax=False,
                                 wrap=functools.partial(rj.Mixed, compute_dtype=jnp.bfloat16),
                                 note="rnnjax-kernel-bf16: rj.Kernel() on rj.Mixed(cell, compute_dtype=bfloat16)"),
    "jax-cudnn": JaxCudnn(),
    "flax": Flax(),
    "flax-lstmcell": Flax(cell_classes=(("lstm", "LSTMCell"),), cells=("lstm",), note="flax-lstmcell: nn.LSTMCell"),
    "equinox": Equinox(),
    "torch": Torch(),
    "attention": Attention(),
}

DEFAULT_SYSTEMS = ("rnnjax", "rnnjax-autodiff", "rnnjax-remat", "rnnjax-remat-sqrt", "flax", "equinox", "torch",
                   "attention")
# With --host-devices N > 1 these follow rnnjax-autodiff in the default list.
HOST_DEVICE_SYSTEMS = ("rnnjax-shard",)


@functools.cache
def versions() -> dict[str, str | None]:
    """Versions of everything that may be measured (None: not installed)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("rnnjax", "jax", "jaxlib", "flax", "optax", "equinox", "torch", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
