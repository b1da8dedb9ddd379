"""Float32 error of the chunkwise delta rule and RWKV-7 per chunk size, against the float64
step recurrence on the same numbers (fla picks 64 for the delta rule and 16 for RWKV-7 "for
stability"; this measures ours). Error: max |o - o_ref| / max |o_ref|, over a few seeds.

    python -m benchmarks.lab.delta_chunk_accuracy
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj

B, T, H, D = 2, 1024, 2, 64
SIZES = (16, 32, 64, 128)


def unit(a):
    return a / jnp.linalg.norm(a, axis=-1, keepdims=True)


def cases(key):
    """``(name, op, args)``: per-head decays weak and strong, beta up to 2, per-key decays
    strong (KDA), RWKV-7's own range and much stronger decays."""
    ks = jax.random.split(key, 6)
    q, k = jax.random.normal(ks[0], (B, T, H, D)), unit(jax.random.normal(ks[1], (B, T, H, D)))
    v = jax.random.normal(ks[2], (B, T, H, D))
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))  # (0, 2)
    head = lambda scale: -scale * jax.nn.softplus(jax.random.normal(ks[4], (B, T, H)))
    key_decay = lambda scale: -scale * jax.nn.softplus(jax.random.normal(ks[4], (B, T, H, D)))
    gate = jax.nn.sigmoid(jax.random.normal(ks[5], (B, T, H, D)))
    rwkv = lambda w: (q, w, k * (1 - 0.5 * gate), v, -k, k * gate)
    delta = rj.linear_attention.delta_rule
    return [
        ("gated delta, log decay ~ -0.05", delta, (q, k, v, beta, head(0.07))),
        ("gated delta, log decay ~ -5", delta, (q, k, v, beta, head(7.0))),
        ("KDA, per-key log decay ~ -5", delta, (q, k, v, beta, key_decay(7.0))),
        ("rwkv7, log w in (-0.61, 0)", rj.linear_attention.rwkv7, rwkv(-np.exp(-0.5) * gate)),
        ("rwkv7, log w ~ -5", rj.linear_attention.rwkv7, rwkv(key_decay(7.0))),
    ]


def main() -> None:
    jax.config.update("jax_enable_x64", True)
    print(f"B={B}, T={T}, heads={H}, d={D}; float32 error relative to max|o|, worst of 3 seeds")
    print("| case | " + " | ".join(f"C={c}" for c in SIZES) + " | sequential |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    rows: dict[str, list[float]] = {}
    for seed in range(3):
        for name, op, args in cases(jax.random.key(seed)):
            args64 = [jnp.asarray(a, jnp.float64) for a in args]
            ref = np.asarray(op(*args64, method=rj.Sequential())[0])
            args32 = [jnp.asarray(a, jnp.float32) for a in args]
            errs = []
            for method in (*(rj.Chunked(c) for c in SIZES), rj.Sequential()):
                o = np.asarray(jax.jit(lambda *a, m=method, f=op: f(*a, method=m)[0])(*args32), np.float64)
                errs.append(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
            rows[name] = [max(a, b) for a, b in zip(rows.get(name, errs), errs)]
    for name, errs in rows.items():
        print(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
