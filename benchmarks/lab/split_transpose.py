"""Decision script: GRU's sequence-level gradient with the gate columns cut by slicing
(``zx[..., :2H]``) against ``jnp.split``, in ``GRU.update`` and the fused engine's ``_kept``.

    python -m benchmarks.lab.split_transpose [--length 1024] [--hidden 128] [--repeats 15]

The transpose of a slice is a zero pad to the full width; that of ``jnp.split`` is a
concatenate. Prints, for both variants compiled in one process (B=32, D=H=128, float32,
gradient of sum(outputs) w.r.t. parameters and inputs), the pads in the optimised HLO and
the median ms of interleaved calls, with Flax's ``nn.GRUCell`` under ``nn.RNN`` alongside.
Figures: ``benchmarks/lab/DECISIONS.md``.
"""

from __future__ import annotations

import argparse
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
from benchmarks import timing
from rnnjax.engines import fused


class SlicedGRU(rj.GRU):
    """``rj.GRU`` with the update as it was before the decision: gate columns by slicing."""

    def update(self, params, carry, zx, zh):
        hid = self.hidden_size
        pre = zx[..., : 2 * hid] + zh[..., : 2 * hid] + params.b_x[: 2 * hid] + params.b_h[: 2 * hid]
        xn = zx[..., 2 * hid :] + params.b_x[2 * hid :]
        hn = zh[..., 2 * hid :] + params.b_h[2 * hid :]
        r, z = jnp.split(jax.nn.sigmoid(pre), 2, axis=-1)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * carry
        return h, h


def sliced_kept(zx, zh, k):
    if k == 0:
        return zx, zh
    summed = zx[..., :k] + zh[..., :k]
    return (summed,) if k == zx.shape[-1] else (summed, zx[..., k:], zh[..., k:])


@contextlib.contextmanager
def sliced_engine():
    saved, fused._kept = fused._kept, sliced_kept
    try:
        yield
    finally:
        fused._kept = saved


def gradient(apply):
    return jax.grad(lambda p, xs: apply(p, xs).sum(), argnums=(0, 1))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=128, help="D = H")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    h = args.hidden
    params = rj.GRU(h).init(jax.random.key(0), h)
    xs = jax.random.normal(jax.random.key(1), (args.batch, args.length, h))
    compiled = {}
    with sliced_engine():  # traced and compiled here; the compiled program keeps the slices
        compiled["slice"] = timing.compile_ahead(gradient(lambda p, x: rj.scan(SlicedGRU(h), p, x)[0]), params, xs)
    compiled["split"] = timing.compile_ahead(gradient(lambda p, x: rj.scan(rj.GRU(h), p, x)[0]), params, xs)
    model = nn.RNN(nn.GRUCell(h))
    variables = model.init(jax.random.key(0), xs[:, :1])
    compiled["flax"] = timing.compile_ahead(gradient(model.apply), variables, xs)
    for a, b in zip(jax.tree.leaves(compiled["slice"].run()), jax.tree.leaves(compiled["split"].run())):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for name in ("slice", "split"):
        pads = compiled[name].executable.as_text().count(" pad(")
        print(f"{name:6s} pads in the optimised HLO: {pads}")
    results = timing.compare(compiled, args.repeats)
    for name, t in results.items():
        print(f"{name:6s} median {1e3 * t.median_s:7.1f} ms  (/flax {t.median_s / results['flax'].median_s:.3f})")


if __name__ == "__main__":
    main()
